"""Tokenizer unit tests: training, round trips, saving for transformers, chat templates, errors.

References: Hugging Face ``transformers`` (AutoTokenizer loading what we save, and its
``apply_chat_template`` rendering the same template), and the tokenizers library's own byte
alphabet. Real-vocabulary exactness (SmolLM2, Gemma 3) lives in ``test_real_models.py``.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import pre_tokenizers  # noqa: E402

from evolm.interop.gguf_vocab import _merges_from_ranked_vocab, tokenizer_from_gguf_metadata  # noqa: E402
from evolm.tokenizer import Tokenizer, TokenizerError, byte_alphabet, train_bpe  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "def add(a, b):\n    return a + b\n",
    "To be, or not to be, that is the question.",
    "Numbers 12345 and 67890; symbols !@#$%^&*()",
] * 20

TEXTS = ["Hello world", "  spaces   and\ttabs\n\nnewlines", "naïve café 日本語 🤖👍🏽", "", "x" * 50,
         "<|endoftext|> special in the middle <|endoftext|>"]

CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# a template exercising what transformers' environment provides: raise_exception, loop controls,
# the special tokens as variables, tojson without HTML escaping, trim_blocks / lstrip_blocks
FANCY = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['content'] == 'skip me' %}{% continue %}{% endif %}
<{{ message['role'] }}>{{ message['content'] | trim }}</{{ message['role'] }}>{{ eos_token }}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CHATS = [
    [{"role": "user", "content": "Hi <b>there</b> & you"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "skip me"},
     {"role": "user", "content": "and 3+3"}, {"role": "user", "content": "after break"}],
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = train_bpe(iter(CORPUS), vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def test_byte_alphabet_is_gpt2s():
    table = byte_alphabet()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_train_bpe_round_trips_any_text(bpe):
    assert bpe.vocab_size <= 400
    assert [bpe.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert bpe.bos_id == bpe.eos_id == 0 and not bpe.add_bos
    for text in TEXTS:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    # merges were learned: a frequent word is shorter than its bytes
    assert len(bpe.encode(" quick")) < len(" quick".encode())
    assert bpe.encode("<|endoftext|>") == [0]  # special tokens stay whole
    assert bpe.decode([0, *bpe.encode("hi")], skip_special_tokens=True) == "hi"


def test_train_bpe_from_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(CORPUS))
    tok = train_bpe([f], vocab_size=300)
    assert tok.decode(tok.encode("The lazy dog")) == "The lazy dog"
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_bpe(iter(CORPUS), vocab_size=100)


def test_save_loads_in_transformers_and_back(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    again = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert ref.encode(text) == bpe.encode(text) == again.encode(text)
        ids = bpe.encode(text)
        assert ref.decode(ids) == bpe.decode(ids) == again.decode(ids)
        assert ref.decode(ids, skip_special_tokens=True) == bpe.decode(ids, skip_special_tokens=True)
    assert (ref.bos_token, ref.eos_token) == (bpe.bos_token, bpe.eos_token)
    chat = [{"role": "user", "content": "hello"}]
    assert again.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_bos_template_is_saved_and_applied(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(bpe.backend, bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos=True, add_eos=True)
    ids = tok.encode("hi")
    assert ids[0] == 1 and ids[-1] == 2 and tok.encode("hi", add_special_tokens=False) == ids[1:-1]
    tok.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ref.encode("hi") == ids
    assert Tokenizer.from_hf_dir(tmp_path).encode("hi") == ids
    tok.set_special_tokens_template(False, False)  # restore the shared backend for other tests


@pytest.mark.parametrize("template", [CHATML, FANCY], ids=["chatml", "fancy"])
def test_chat_template_renders_like_transformers(bpe, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(bpe.backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template)
    tok.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tools = [{"name": "add", "description": "a <b> & c"}]
    for chat in CHATS:
        for gen in (True, False):
            want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, tools=tools)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tools=tools) == want
    ids = tok.apply_chat_template(CHATS[0], tokenize=True)
    assert ids == tok.encode(tok.apply_chat_template(CHATS[0]), add_special_tokens=False)


def test_chat_template_errors(bpe):
    import jinja2

    tok = Tokenizer(bpe.backend, eos_token="<|endoftext|>", chat_template=FANCY)
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(bpe.backend).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="does not parse"):
        Tokenizer(bpe.backend, chat_template="{% for %}").apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        tok.apply_chat_template(["not a dict"])


def test_constructor_errors(bpe, tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers JSON"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in the vocabulary"):
        Tokenizer(bpe.backend, eos_token="<nope>")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model='bert'"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        tokenizer_from_gguf_metadata({"general.architecture": "llama"})


def test_eos_ids_include_end_of_turn_tokens(bpe):
    tok = Tokenizer(bpe.backend, bos_token="<|im_start|>", eos_token="<|endoftext|>", eos_token_ids=[7])
    assert tok.eos_ids == [0, 7, 2]  # EOS, the config's extra stop id, then <|im_end|> (a special token)


def test_merges_from_ranked_vocab_matches_transformers():
    """The merge order derived for a SentencePiece vocabulary equals transformers' derivation,
    including ties in score (pieces of equal score are ordered by their split lengths)."""
    tu = pytest.importorskip("transformers.tokenization_utils_base")
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc", "ca", "cab", "bca", "abca", "aa"])}
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -1.0, "abc": -2.0, "ca": -1.0, "cab": -2.0,
              "bca": -2.0, "abca": -3.0, "aa": -0.5}
    assert _merges_from_ranked_vocab(vocab, scores) == tu.generate_merges(vocab, scores)
    positions = {t: -i for t, i in vocab.items()}
    assert _merges_from_ranked_vocab(vocab, positions) == tu.generate_merges(vocab, positions)


# ---- WordPiece (BERT) and unigram (T5): loading real files, training, round trips ---------------
VARIED = ["Hello World, unaffable!", "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.",
          "naïve café Ölfeld ÉCOLE — «quotes» and ‘curly’", "日本語のテキスト 中文 한국어", "emoji 🤖👍🏽 ok",
          "  spaces   and\ttabs\n\nnewlines  ", "e-mail: someone@example.com, url https://x.org/a?b=1",
          "Numbers 12345.678 and 1e-9; symbols !@#$%^&*()[]{}", "", "x" * 300,
          "[CLS] special [SEP] tokens [MASK] in text [PAD]", "supercalifragilisticexpialidocious antidisestablishment",
          "def add(a, b):\n    return a + b  # code"]


@pytest.fixture(scope="module")
def minilm_dir():
    from evolm.interop.hf import find_asset

    try:
        return find_asset("minilm")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_minilm_tokenizer_json_gives_the_ids_of_transformers_and_tokenizers(minilm_dir):
    """sentence-transformers' MiniLM ships a WordPiece tokenizer.json with fixed padding and truncation at
    128: evolm, like transformers, encodes without them (a text is its own length, longer texts are whole)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend

    tok = Tokenizer.from_hf_dir(minilm_dir)
    ref = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    raw = Backend.from_file(str(minilm_dir / "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    assert (tok.bos_token, tok.eos_token, tok.pad_id, tok.mask_id) == ("[CLS]", "[SEP]", 0, 103)
    for text in VARIED + [" ".join(VARIED) * 3]:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"] == raw.encode(text).ids, text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert len(tok.encode(" ".join(VARIED) * 3)) > 128  # the file's truncation is off


@pytest.mark.parametrize("model", ["wordpiece", "unigram", "bpe"])
def test_trained_tokenizers_round_trip_and_load_in_transformers(model, tmp_path):
    """Each kind, trained here, saved, and read back by evolm and by transformers' AutoTokenizer gives the
    same ids; decoding gives the text back (as the kind normalizes it)."""
    transformers = pytest.importorskip("transformers")
    from evolm.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(CORPUS), vocab_size=300 if model == "bpe" else 120, model=model)
    tok.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS[:5] + VARIED:
        ids = tok.encode(text)
        assert ids == again.encode(text) == ref(text)["input_ids"], text
    for text in ("The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question."):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    pair = tok.backend.encode("to be", "a step")
    if model == "wordpiece":  # BERT's [CLS] A [SEP] B [SEP] with segment ids
        assert pair.tokens[0] == "[CLS]" and pair.tokens.count("[SEP]") == 2 and pair.type_ids[-1] == 1
        assert tok.mask_id == 4 and tok.encode("the")[0] == tok.bos_id == 2
        assert ref.decode(tok.encode("To be, or not")) == tok.decode(tok.encode("To be, or not"))
    if model == "unigram":  # T5: the text, then </s>; ids 0, 1, 2 are <pad>, </s>, <unk>
        assert tok.encode("to be")[-1] == tok.eos_id == 1 and tok.pad_id == 0
        assert tok.decode(tok.encode("to   be"), skip_special_tokens=True) == "to be"  # runs of spaces folded


def test_train_tokenizer_errors():
    from evolm.tokenizer import train_tokenizer

    with pytest.raises(TokenizerError, match="model 'sentencepiece'"):
        train_tokenizer(iter(CORPUS), 100, model="sentencepiece")
    with pytest.raises(TokenizerError, match="needs 5"):
        train_tokenizer(iter(CORPUS), 100, model="wordpiece", special_tokens=["[PAD]"])
    with pytest.raises(TokenizerError, match="lowercase"):
        train_tokenizer(iter(CORPUS), 100, model="unigram", lowercase=True)
    with pytest.raises(TokenizerError, match="vocab_size=3"):
        train_tokenizer(iter(CORPUS), 3, model="unigram")
    uncased = train_tokenizer(iter(CORPUS), 120, model="wordpiece", lowercase=True)
    assert uncased.encode("THE Quick") == uncased.encode("the quick")
