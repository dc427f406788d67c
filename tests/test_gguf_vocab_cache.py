"""The GGUF vocabulary cache (interop/gguf_vocab.py): a tokenizer read back from the cache encodes,
decodes and names its special tokens exactly as the one built from the file's metadata, and a
changed file is built again."""

import os

import pytest

from evolm.interop.gguf import find_asset, read_metadata
from evolm.interop.gguf_vocab import _cache_path, file_cache_key, tokenizer_from_gguf_metadata

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # squares\n\n\tprint('tabs')",
    "Ünïcödé — 日本語のテキスト, emoji 🤖🎉, accents café naïve",
    "<|im_start|>user\nHi<|im_end|>\n<start_of_turn>model\n<bos><eos>",
    "   leading spaces and trailing   ",
    "12345 3.14159 1e-10 0xFF",
]


def _asset(name):
    try:
        return find_asset(name)
    except FileNotFoundError as e:
        pytest.skip(f"real GGUF not installed ({e})")


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_cached_vocabulary_equals_the_built_one(name, tmp_path, monkeypatch):
    path = _asset(name)  # found in the real cache; the vocabulary cache goes to an empty one
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path))
    meta = read_metadata(path, tokenizer=True)
    key = file_cache_key(path)
    built = tokenizer_from_gguf_metadata(meta, name=path, cache_key=key)
    # only SentencePiece vocabularies are cached (slow to rebuild); byte-level BPE builds faster
    assert _cache_path(key).is_file() == (meta["tokenizer.ggml.model"] == "llama")
    cached = tokenizer_from_gguf_metadata(meta, name=path, cache_key=key)
    plain = tokenizer_from_gguf_metadata(meta, name=path)  # no cache at all
    for text in TEXTS:
        ids = plain.encode(text)
        assert built.encode(text) == ids and cached.encode(text) == ids
        assert cached.decode(ids) == plain.decode(ids)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos", "add_eos", "chat_template"):
        assert getattr(cached, attr) == getattr(plain, attr)
    assert cached.vocab_size == plain.vocab_size


def test_a_changed_file_gets_another_key_and_a_bad_entry_is_rebuilt(tmp_path, monkeypatch):
    path = _asset("gemma3")
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path))
    key = file_cache_key(path)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(b"x")
    k1 = file_cache_key(str(copy))
    os.utime(copy, ns=(1, 1))
    assert file_cache_key(str(copy)) != k1  # modification time is part of the key
    assert file_cache_key(str(tmp_path / "missing.gguf")) is None
    meta = read_metadata(path, tokenizer=True)
    _cache_path(key).parent.mkdir(parents=True, exist_ok=True)
    _cache_path(key).write_text("{ truncated")
    tok = tokenizer_from_gguf_metadata(meta, name=path, cache_key=key)  # rebuilt, not an error
    assert tok.encode(TEXTS[0]) == tokenizer_from_gguf_metadata(meta, name=path).encode(TEXTS[0])


def test_block_verdicts_are_remembered_per_file_and_read_back(tmp_path, monkeypatch):
    """interop/gguf.py keeps which tensors' blocks rebuild the reference weights exactly: the second
    load of a file compares nothing (and does not import the gguf package's reference), a verdict
    'not exact' read back still leaves that tensor float, and a damaged record is compared again."""
    import json

    import evolm.interop.gguf as G

    path = _asset("smollm2")
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path))
    compared = []
    real = G._compare_blocks
    monkeypatch.setattr(G, "_compare_blocks", lambda f, name, *a: compared.append(name) or real(f, name, *a))
    first, _ = G.load_gguf(path, tokenizer=False, blocks=True)
    records = list((tmp_path / "verified").glob("*.json"))
    assert len(records) == 1 and compared
    verdicts = json.loads(records[0].read_text())
    assert sorted(verdicts) == sorted(compared) and all(v == "" for v in verdicts.values())

    compared.clear()
    second, _ = G.load_gguf(path, tokenizer=False, blocks=True)
    assert compared == []
    assert second.blocks_report == first.blocks_report

    name = next(iter(verdicts))  # a recorded "not exact" keeps the float weight, with the reason
    records[0].write_text(json.dumps({**verdicts, name: "its Q4_1 blocks do not rebuild (recorded)"}))
    third, _ = G.load_gguf(path, tokenizer=False, blocks=True)
    assert compared == [] and any("recorded" in v for v in third.blocks_report.values())

    records[0].write_text("{damaged")
    G.load_gguf(path, tokenizer=False, blocks=True)
    assert sorted(compared) == sorted(verdicts)
