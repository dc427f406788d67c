"""Post-training data: row formats, validation errors, and the assistant-only loss mask checked
against transformers' ``return_assistant_tokens_mask`` on a template with generation tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evolm.post.data import (CHATML, IGNORE, DataError, encode_examples, encode_pair, hhh_rows, load_preferences,
                             load_sft, natural_instruction_rows, openai_evals_rows, render, resolve)
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
    from evolm.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf(find_asset("smollm2"))
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
        resolve("hhh_alignment")


def test_truncation_and_dropping(tok, tmp_path):
    long = {"prompt": "Hello there " * 30, "response": "fine"}
    ex = load_sft(_write(tmp_path, [long, {"prompt": "hi", "response": "Hello there, how are you?"}]))
    out = encode_examples(tok, ex, max_len=40)
    assert out.dropped == 1 and out.truncated == 1 and len(out) == 1


# --- the BIG-bench converters (on rows shaped like the real task files) ---------------------------
def test_bigbench_converters():
    task = {"examples": [
        {"input": "Can you help?", "target_scores": {"Sure.": 1, "No.": 0}},
        {"input": "First question\n\nAssistant:  An answer.\n\nHuman:  A follow-up?",
         "target_scores": {"Better": 1, "Worse": 0}},
    ]}
    rows = hhh_rows(task, "helpful")
    assert rows[0] == {"prompt": "Can you help?", "chosen": "Sure.", "rejected": "No.", "subset": "helpful"}
    assert rows[1]["prompt"] == [{"role": "user", "content": "First question"},
                                 {"role": "assistant", "content": "An answer."},
                                 {"role": "user", "content": "A follow-up?"}]
    ni = natural_instruction_rows({"task_prefix": "Definition: add.", "examples": [
        {"input": "1+1", "target": ["2", "two"]}, {"input": "x", "target": []}]}, "subtask999")
    assert ni == [{"messages": [{"role": "user", "content": "Definition: add.\n\n1+1"},
                                {"role": "assistant", "content": "2"}], "task": "subtask999"}]


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


def test_installed_builtin_sets_are_valid():
    """When data/post is installed: the real 221 hhh pairs and the natural_instructions subset load."""
    try:
        tr, va = resolve("hhh_alignment", "train"), resolve("hhh_alignment", "val")
        ni = resolve("natural_instructions", "val")
    except DataError as e:
        pytest.skip(str(e))
    pairs = load_preferences(tr) + load_preferences(va)
    assert len(pairs) == 221
    train_prompts = {json.dumps(p.prompt) for p in load_preferences(tr)}
    assert not train_prompts & {json.dumps(p.prompt) for p in load_preferences(va)}  # split by prompt
    assert len(load_sft(ni)) > 100
    try:
        assert len(load_sft(resolve("openai_evals", "val"))) > 100
    except DataError:
        pass  # installed with --no-evals
