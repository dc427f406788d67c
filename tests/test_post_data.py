"""Post-training data: row formats, validation errors, and the assistant-only loss mask checked
against transformers' ``return_assistant_tokens_mask`` on a template with generation tags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evolm.post.data import (CHATML, IGNORE, DataError, alpaca_rows, dpo_rows, encode_examples, encode_pair,
                             install_llamafactory, install_post_data, load_preferences, load_sft, openai_evals_rows,
                             render, resolve)
from evolm.tokenizer import train_bpe

# ChatML with {% generation %} around what the assistant must produce: content + <|im_end|>.
# transformers marks those characters' tokens in ``assistant_masks``; our template has no tags.
TAGGED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "fine, and you?"},
     {"role": "assistant", "content": "The quick fox.\n\nIt jumps."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " leading and trailing  "},
     {"role": "user", "content": "b"}, {"role": "assistant", "content": "\nnewline first"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "third"}],
]


@pytest.fixture(scope="module")
def tok():
    texts = ["Hello there, how are you? I am fine. The quick brown fox jumps over the lazy dog.\n"] * 40
    return train_bpe(texts, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     chat_template=CHATML)


def _reference_mask(tok, msgs):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|im_end|>")
    out = ref.apply_chat_template(msgs, chat_template=TAGGED, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("i", range(len(CHATS)))
def test_mask_matches_transformers_generation_tags(tok, i):
    msgs = CHATS[i]
    ids, mask = _reference_mask(tok, msgs)
    r = render(tok, msgs)
    assert r.ids == ids
    assert [int(x != IGNORE) for x in r.labels] == mask
    assert all(x == t for x, t in zip(r.labels, r.ids) if x != IGNORE)
    assert sum(mask) > 0 and r.labels.count(IGNORE) > 0


def test_mask_covers_exactly_assistant_text_and_end_of_turn(tok):
    """The trained tokens decode to the assistant contents, each followed by <|im_end|>."""
    msgs = CHATS[1]
    r = render(tok, msgs)
    im_end = tok.token_to_id("<|im_end|>")
    pieces, cur = [], []
    for x in r.labels:
        if x == IGNORE:
            if cur:
                pieces.append(cur)
            cur = []
        else:
            cur.append(x)
    assert cur == []
    assert [tok.decode(p) for p in pieces] == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert all(p[-1] == im_end for p in pieces)


def test_smollm2_real_template_mask():
    """SmolLM2's real template (adds a default system prompt): same mask as the tagged reference."""
    transformers = pytest.importorskip("transformers")
    from evolm.interop.gguf import find_asset
    from evolm.interop.gguf_vocab import tokenizer_from_gguf

    try:
        tok = tokenizer_from_gguf(find_asset("smollm2"))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tagged = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
              "<|im_end|>\n' }}{% endif %}" + TAGGED[len("{% for message in messages %}"):])
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|im_end|>")
    for msgs in CHATS:
        out = ref.apply_chat_template(msgs, chat_template=tagged, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        r = render(tok, msgs)
        assert r.ids == list(out["input_ids"])
        assert [int(x != IGNORE) for x in r.labels] == list(out["assistant_masks"])


def test_template_that_rewrites_history_falls_back_to_content_search(tok):
    """A template that drops earlier assistant turns' <think> (as Qwen3 does) breaks prefixes."""
    tpl = ("{% for m in messages %}{% set c = m['content'] %}"
           "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
           "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok2 = train_bpe(["hello there fox"] * 20, vocab_size=280,
                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], chat_template=tpl)
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>one"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>y</think>two"}]
    r = render(tok2, msgs)
    trained = tok2.decode([x for x in r.labels if x != IGNORE])
    assert trained == "one<|im_end|><think>y</think>two<|im_end|>"


# --- formats and validation ---------------------------------------------------------------------
def _write(tmp_path: Path, rows, name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_all_sft_formats_become_messages(tmp_path):
    p = _write(tmp_path, [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "p", "response": "r"},
        {"prompt": "p", "completion": "c", "system": "s"},
        {"instruction": "i", "input": "x", "output": "o"},
        {"instruction": "i", "input": "", "output": "o"},
    ])
    ex = load_sft(p)
    assert [e.messages for e in ex] == [
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
        [{"role": "user", "content": "i\n\nx"}, {"role": "assistant", "content": "o"}],
        [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}],
    ]
    assert ex[3].where.endswith("d.jsonl:4")


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "user", "content": "only a question"}]}, r"d.jsonl:2: no assistant turn"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"d.jsonl:2: messages\[0\]: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"d.jsonl:2: messages\[1\]: empty content for role 'assistant'"),
    ({"prompt": "p", "response": ""}, r"d.jsonl:2: field 'response' is empty"),
    ({"instruction": "i", "output": 3}, r"d.jsonl:2: field 'output' must be a string"),
    ({"text": "plain"}, r"d.jsonl:2: unrecognised row with keys \['text'\]"),
    ("{not json", r"d.jsonl:2: not valid JSON"),
])
def test_sft_errors_name_file_line_and_field(tmp_path, row, match):
    ok = {"prompt": "p", "response": "r"}
    with pytest.raises(DataError, match=match):
        load_sft(_write(tmp_path, [ok, row]))


def test_preference_rows(tmp_path):
    p = _write(tmp_path, [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
    ])
    pairs = load_preferences(p)
    assert pairs[0].prompt == [{"role": "user", "content": "q"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "good"}]
    assert len(pairs[1].prompt) == 3
    assert pairs[2].prompt == [{"role": "user", "content": "q"}] and pairs[2].rejected[0]["content"] == "bad"


@pytest.mark.parametrize("row, match", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"d.jsonl:1: 'chosen' == 'rejected'"),
    ({"prompt": "q", "chosen": "x"}, r"d.jsonl:1: preference row without 'rejected'"),
    ({"prompt": "", "chosen": "x", "rejected": "y"}, r"d.jsonl:1: field 'prompt' is empty"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "x"}], "rejected": "y"},
     r"d.jsonl:1: chosen\[0\]: unknown role 'bot'"),
])
def test_preference_errors(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        load_preferences(_write(tmp_path, [row]))


def test_preference_pair_labels_only_the_response(tok, tmp_path):
    p = _write(tmp_path, [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "how are you?"}],
                           "chosen": "I am fine.", "rejected": "The fox."}])
    enc = encode_pair(tok, load_preferences(p)[0])
    for side, text in (("chosen", "I am fine."), ("rejected", "The fox.")):
        trained = [x for x in enc[f"{side}_labels"] if x != IGNORE]
        assert tok.decode(trained) == text + "<|im_end|>"  # "Hello" (inside the prompt) is not scored
    assert enc["chosen_ids"][:enc["prompt_len"]] == enc["rejected_ids"][:enc["prompt_len"]]
    assert all(x == IGNORE for x in enc["chosen_labels"][:enc["prompt_len"]])


def test_missing_chat_template_is_a_clear_error(tmp_path):
    plain = train_bpe(["hello world"] * 10, vocab_size=270)
    ex = load_sft(_write(tmp_path, [{"prompt": "p", "response": "r"}]))
    with pytest.raises(DataError, match="has no chat template.*--chat-template chatml"):
        encode_examples(plain, ex, 64)


def test_unknown_data_name_and_uninstalled_builtin(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not a built-in set"):
        resolve("no_such_set")
    monkeypatch.setenv("EVOLM_POST_DATA", str(tmp_path))
    with pytest.raises(DataError, match="not installed.*install_post_data.py"):
        resolve("dpo_en_demo")


def test_truncation_and_dropping(tok, tmp_path):
    long = {"prompt": "Hello there " * 30, "response": "fine"}
    ex = load_sft(_write(tmp_path, [long, {"prompt": "hi", "response": "Hello there, how are you?"}]))
    out = encode_examples(tok, ex, max_len=40)
    assert out.dropped == 1 and out.truncated == 1 and len(out) == 1


# --- the LLaMA-Factory demo converters (on rows shaped like the real data/*_demo.json) ---------------
ALPACA = [
    {"instruction": "Describe a process of making crepes.", "input": "", "output": "Making crepes is easy: mix."},
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
    {"instruction": "Describe a process of making crepes.", "input": "", "output": "Making crepes is easy: mix."},
    {"instruction": "", "input": "", "output": "an answer to nothing"},
    {"instruction": "Summarise.", "input": 3, "output": "x"},
    {"instruction": "Say hi.", "input": "", "output": "   "},
    {"text": "not an alpaca row"},
    "a bare string",
]


def test_alpaca_converter_skips_and_counts_bad_rows():
    c = alpaca_rows(ALPACA, "alpaca_en_demo.json")
    assert [r["messages"] for r in c.rows] == [
        [{"role": "user", "content": "Describe a process of making crepes."},
         {"role": "assistant", "content": "Making crepes is easy: mix."}],
        [{"role": "user", "content": "Rewrite the sentence in passive voice.\n\nThe cat chased the mouse."},
         {"role": "assistant", "content": "The mouse was chased by the cat."}]]
    assert [r["source_row"] for r in c.rows] == [0, 1]
    assert c.duplicates == 1
    assert len(c.skipped) == 5
    for got, want in zip(c.skipped, [r"^alpaca_en_demo.json\[3\]: field 'instruction' is empty",
                                     r"^alpaca_en_demo.json\[4\]: field 'input' must be a string",
                                     r"^alpaca_en_demo.json\[5\]: field 'output' is empty",
                                     r"^alpaca_en_demo.json\[6\]: not an Alpaca row .*\['text'\]",
                                     r"^alpaca_en_demo.json\[7\]: not an Alpaca row .*str"]):
        assert re.search(want, got), got
    with pytest.raises(DataError, match="expected a JSON list of Alpaca rows, got dict"):
        alpaca_rows({"instruction": "i"}, "alpaca_en_demo.json")


def _turn(who, text):
    return {"from": who, "value": text}


DPO = [
    {"conversations": [_turn("human", "Hi! Help me name a game.")],
     "chosen": _turn("gpt", "Sure: 'Angela's Day'."), "rejected": _turn("gpt", "No.")},
    {"conversations": [_turn("system", "You are a teacher."), _turn("human", "Tag the word {{ run }}.")],
     "chosen": _turn("gpt", "VERB"), "rejected": _turn("gpt", "NOUN")},
    {"conversations": [_turn("human", "2+2?"), _turn("gpt", "4"), _turn("human", "and times 3?")],
     "chosen": _turn("gpt", "12"), "rejected": _turn("gpt", "7")},
    {"conversations": [_turn("human", "Hi! Help me name a game.")],  # an exact repeat
     "chosen": _turn("gpt", "Sure: 'Angela's Day'."), "rejected": _turn("gpt", "No.")},
    {"conversations": [_turn("human", "Hi! Help me name a game.")],  # same prompt, another pair: kept
     "chosen": _turn("gpt", "Sure: 'Angela's Day'."), "rejected": _turn("gpt", "Maybe later.")},
    {"conversations": [_turn("human", "q")], "chosen": _turn("gpt", "same"), "rejected": _turn("gpt", "same")},
    {"conversations": [_turn("human", "q"), _turn("gpt", "a")], "chosen": _turn("gpt", "x"),
     "rejected": _turn("gpt", "y")},
    {"conversations": [_turn("bot", "q")], "chosen": _turn("gpt", "x"), "rejected": _turn("gpt", "y")},
    {"conversations": [_turn("human", "q")], "chosen": _turn("human", "x"), "rejected": _turn("gpt", "y")},
    {"conversations": [_turn("human", "q")], "chosen": _turn("gpt", ""), "rejected": _turn("gpt", "y")},
    {"conversations": [], "chosen": _turn("gpt", "x"), "rejected": _turn("gpt", "y")},
    {"prompt": "q", "chosen": "x", "rejected": "y"},
]


def test_dpo_converter_maps_sharegpt_roles_and_skips_bad_rows():
    c = dpo_rows(DPO, "dpo_en_demo.json")
    assert [r["source_row"] for r in c.rows] == [0, 1, 2, 4] and c.duplicates == 1
    assert c.rows[0] == {"prompt": [{"role": "user", "content": "Hi! Help me name a game."}],
                         "chosen": "Sure: 'Angela's Day'.", "rejected": "No.", "source_row": 0}
    assert [m["role"] for m in c.rows[1]["prompt"]] == ["system", "user"]
    assert [m["role"] for m in c.rows[2]["prompt"]] == ["user", "assistant", "user"]
    assert len(c.skipped) == 7
    for got, want in zip(c.skipped, [r"\[5\]: 'chosen' == 'rejected'",
                                     r"\[6\]: the prompt ends with an assistant turn",
                                     r"\[7\]: conversations\[0\]: unknown role \"from='bot'\"",
                                     r"\[8\]: field 'chosen' must be a \{'from': 'gpt'",
                                     r"\[9\]: field 'chosen' is empty",
                                     r"\[10\]: field 'conversations' must be a non-empty list",
                                     r"\[11\]: not a preference row with 'conversations'"]):
        assert re.search(r"^dpo_en_demo.json" + want, got), got


def _sdist(path: Path, alpaca, dpo, top="llamafactory-0.9.5") -> Path:
    """A tar.gz laid out like the LLaMA-Factory sdist (only what the installer reads, plus noise)."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, obj in (("data/alpaca_en_demo.json", alpaca), ("data/dpo_en_demo.json", dpo),
                          ("data/dataset_info.json", {}), ("src/llamafactory/__init__.py", "")):
            if obj is None:
                continue
            raw = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _many(n_alpaca=60, n_dpo=80):
    alpaca = [{"instruction": f"Question number {i}?", "input": "" if i % 3 else f"context {i}",
               "output": f"Answer {i}."} for i in range(n_alpaca)]
    dpo = [{"conversations": [_turn("human", f"Prompt {i // 2}?")], "chosen": _turn("gpt", f"good {i}"),
            "rejected": _turn("gpt", f"bad {i}")} for i in range(n_dpo)]  # two pairs per prompt
    return alpaca, dpo


def test_install_from_an_sdist_splits_by_prompt_and_loads(tmp_path):
    """Bad source rows are skipped and counted, never written; no prompt lands in both splits."""
    alpaca, dpo = _many()
    sdist = _sdist(tmp_path / "llamafactory-0.9.5.tar.gz", alpaca + ALPACA, dpo + DPO)
    out, log = tmp_path / "post", []
    counts = install_llamafactory(out, sdist, log=log.append)
    a, d = counts["alpaca_en_demo"], counts["dpo_en_demo"]
    assert a["train"] + a["val"] == 62 and a["skipped"] == 5 and a["duplicates"] == 1
    assert d["train"] + d["val"] == 84 and d["skipped"] == 7 and d["duplicates"] == 1
    assert a["val"] > 0 and d["val"] > 0 and sum("skipped" in line for line in log) == 12
    sft = {s: load_sft(out / "alpaca_en_demo" / f"{s}.jsonl") for s in ("train", "val")}
    prefs = {s: load_preferences(out / "dpo_en_demo" / f"{s}.jsonl") for s in ("train", "val")}
    assert not ({json.dumps(e.messages[:-1]) for e in sft["train"]} & {json.dumps(e.messages[:-1]) for e in sft["val"]})
    assert not ({json.dumps(p.prompt) for p in prefs["train"]} & {json.dumps(p.prompt) for p in prefs["val"]})
    # the split depends on content, not on the order of the source file
    again = install_llamafactory(tmp_path / "again", _sdist(tmp_path / "rev.tar.gz", alpaca[::-1], dpo[::-1]),
                                 log=lambda *_: None)
    lines = (tmp_path / "again" / "alpaca_en_demo" / "val.jsonl").read_text().splitlines()
    val = [json.loads(x)["messages"][0]["content"] for x in lines]
    assert sorted(val) == sorted(e.messages[0]["content"] for e in sft["val"] if e.messages[0]["content"] in
                                 {r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in alpaca})
    assert again["dpo_en_demo"]["val"] == sum(1 for p in prefs["val"] if p.meta["source_row"] < 80)


def test_install_is_idempotent_and_reinstalls_on_force(tmp_path, monkeypatch):
    import evolm.post.data as D

    sdist = _sdist(tmp_path / "llamafactory-0.9.5.tar.gz", *_many())
    calls = []

    def fake(data_dir, log=print):  # the real converter, on the local sdist instead of the asset cache
        calls.append(data_dir)
        return install_llamafactory(data_dir, sdist, log)

    monkeypatch.setattr(D, "install_llamafactory", fake)
    out = tmp_path / "post"
    install_post_data(out, evals=False, log=lambda *_: None)
    install_post_data(out, evals=False, log=lambda *_: None)
    assert len(calls) == 1
    stamp = json.loads((out / ".llamafactory.done").read_text())
    assert stamp["version"] == D.INSTALL_VERSION and "llamafactory==0.9.5" in stamp["source"]
    (out / "dpo_en_demo" / "val.jsonl").unlink()  # a split file gone: installed again
    install_post_data(out, evals=False, log=lambda *_: None)
    install_post_data(out, evals=False, force=True, log=lambda *_: None)
    assert len(calls) == 3


def test_sdist_without_the_demo_files_is_a_clear_error(tmp_path):
    sdist = _sdist(tmp_path / "other.tar.gz", [], None)
    with pytest.raises(DataError, match=r"other.tar.gz: no data/dpo_en_demo.json inside; is it llamafactory 0.9.5"):
        install_llamafactory(tmp_path / "post", sdist)


@pytest.mark.parametrize("old, new", [("natural_instructions", "alpaca_en_demo"), ("hhh_alignment", "dpo_en_demo"),
                                      ("hhh", "dpo_en_demo")])
def test_retired_bigbench_names_name_the_replacement(tmp_path, monkeypatch, old, new):
    monkeypatch.setenv("EVOLM_POST_DATA", str(tmp_path))
    (tmp_path / old).mkdir()  # even with an old install lying around
    want = rf"'{old}' was built from bigbench 1.0.0, which PyPI no longer serves.*use '{new}' instead"
    with pytest.raises(DataError, match=want):
        resolve(old)
    load = load_sft if new == "alpaca_en_demo" else load_preferences
    with pytest.raises(DataError, match=want):
        load(old, "val")


def test_openai_evals_converter():
    lines = [json.dumps({"input": [{"role": "system", "content": "Reply with a number."},
                                   {"role": "user", "content": "2+2?"}], "ideal": ["4", "four"]}).encode(),
             json.dumps({"input": "Capital of France?", "ideal": "Paris"}).encode(),
             json.dumps({"input": [{"role": "user", "content": "x"}], "ideal": None}).encode(),  # no answer
             json.dumps({"sample": 1}).encode(), b"not json"]
    rows = openai_evals_rows(lines, "demo/samples")
    assert [r["messages"] for r in rows] == [
        [{"role": "system", "content": "Reply with a number."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]]


def _installed(*names):
    try:
        return {n: {s: resolve(n, s) for s in ("train", "val")} for n in names}
    except DataError as e:
        pytest.skip(f"missing asset: post-training data (required; install: make post-data): {e}")


def _unique_valid_rows(kind: str, stamp_counts: dict) -> int:
    """From the cached sdist when it is there (no network), else as the install stamp recorded it."""
    from evolm.assets import is_present, load_manifest, local_path
    from evolm.post.data import read_llamafactory_demo

    a = load_manifest().assets["llamafactory"]
    if is_present(a):
        rows = read_llamafactory_demo(local_path(a))[kind]
        return len((alpaca_rows if kind == "alpaca_en_demo" else dpo_rows)(rows, kind).rows)
    c = stamp_counts[kind]
    return c["source_rows"] - c["duplicates"] - c["skipped"]


def test_installed_builtin_sets_are_valid():
    """When data/post is installed: every alpaca_en_demo row and dpo_en_demo pair loads, split by prompt."""
    files = _installed("alpaca_en_demo", "dpo_en_demo")
    stamp = json.loads((files["dpo_en_demo"]["train"].parents[1] / ".llamafactory.done").read_text())["counts"]
    sft = {s: load_sft(f) for s, f in files["alpaca_en_demo"].items()}
    n = len(sft["train"]) + len(sft["val"])
    assert n == _unique_valid_rows("alpaca_en_demo", stamp) and 900 <= n <= 999
    assert 0.05 < len(sft["val"]) / n < 0.2
    assert not ({json.dumps(e.messages[:-1]) for e in sft["train"]} & {json.dumps(e.messages[:-1]) for e in sft["val"]})
    prefs = {s: load_preferences(f) for s, f in files["dpo_en_demo"].items()}
    m = len(prefs["train"]) + len(prefs["val"])
    assert m == _unique_valid_rows("dpo_en_demo", stamp) and 280 <= m <= 300
    assert 0.1 < len(prefs["val"]) / m < 0.3
    assert not ({json.dumps(p.prompt) for p in prefs["train"]} & {json.dumps(p.prompt) for p in prefs["val"]})
    try:
        assert len(load_sft(resolve("openai_evals", "val"))) > 100
    except DataError:
        pass  # installed with --no-evals
