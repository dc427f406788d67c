"""Sentence embeddings (evolm.infer.embed, `evolm embed`) on the real all-MiniLM-L6-v2 weights.

Reference: transformers' BertModel on the same folder, mean-pooled over the real tokens and scaled to
unit length, as sentence-transformers' Pooling + Normalize modules compute it (the folder's
1_Pooling/config.json and modules.json say so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolm.infer.embed import EmbeddingOptions, embed_texts, embedding_options, pool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The stock market fell sharply on Monday after the bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I can't believe it's already December!",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le gouvernement a annoncé de nouvelles mesures pour l'économie.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "The mitochondria is the powerhouse of the cell.",
    "Call me at 555-0199 or email jane.doe@example.org before 5 p.m.",
    "To be, or not to be, that is the question.",
    "🤖 Robots are taking over the kitchen 🍳",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
    "She scored twice in the second half to win the championship.",
    "Quantum entanglement links the states of two particles regardless of distance.",
    "Please restart your computer to finish installing the updates.",
    "The Eiffel Tower is 330 metres tall and was completed in 1889.",
    "He whispered, \"Don't tell anyone,\" and left the room.",
    "Rain is expected in the north-west with temperatures around 12°C.",
    "The court ruled that the contract was void from the start.",
    "naïve café résumé coöperate",
    "東京は日本の首都です。",
    "Машинное обучение меняет мир.",
    "A cat sleeps on the warm windowsill.",
    "Interest rates were increased by the central bank.",
    "x",
    "The the the the the the the the.",
    "Version 2.13.0 fixes a memory leak in the tokenizer (issue #4521).",
    "In 1492, Columbus sailed the ocean blue.",
    "Vaccines train the immune system to recognise a pathogen.",
    "My flight was delayed for three hours because of fog.",
    "Add the butter and stir until the sauce thickens.",
    "The orchestra performed Beethoven's Ninth Symphony.",
    "Climate change is raising sea levels around the world.",
    "Can you recommend a good book about ancient Rome?",
    "The new phone has a faster processor and a better camera.",
    "Two plus two equals four, but two times two also equals four.",
    "The defendant pleaded not guilty to all charges.",
    "Wind turbines generate electricity from moving air.",
    "He forgot his umbrella and got soaked on the way home.",
    "URL: https://example.com/path?query=1&lang=en#section",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "The volcano erupted, sending ash miles into the sky.",
    "Our team will meet on Thursday to review the budget.",
    "The puppy chased its tail in circles.",
    "GPUs accelerate the matrix multiplications of neural networks.",
    "A long sentence " + "that keeps going and going " * 40 + "until it is cut.",
    "Tea or coffee?",
    "The museum reopened after a two-year renovation.",
    "   leading and trailing spaces   ",
]

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar."),
    ("The central bank raised interest rates.", "Interest rates were increased by the central bank."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The team won the football match.", "The football side claimed victory in the game."),
]


@pytest.fixture(scope="module")
def minilm():
    from evolm import load
    from evolm.interop.hf import find_asset

    try:
        folder = find_asset("minilm")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load(folder, dtype=torch.float32)
    return folder, model, tok


def reference_embeddings(folder: Path, texts: list[str], max_length: int) -> torch.Tensor:
    from transformers import BertModel, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)


def test_the_folder_declares_mean_pooling_unit_length_and_256_tokens(minilm):
    folder, model, _ = minilm
    assert embedding_options(model, folder) == EmbeddingOptions("mean", True, 256)
    assert embedding_options(model, None) == EmbeddingOptions("mean", True, model.config.max_seq_len)


def test_minilm_embeddings_equal_transformers(minilm):
    """50 varied sentences (languages, code, emoji, one past the 256-token cut), in padded batches."""
    folder, model, tok = minilm
    assert len(SENTENCES) == 50
    ours = embed_texts(model, tok, SENTENCES, embedding_options(model, folder), batch_size=16)
    ref = reference_embeddings(folder, SENTENCES, 256)
    cos = (ours * ref).sum(-1)
    print(f"MiniLM embeddings vs transformers: min cosine {cos.min():.8f}, max |diff| {(ours - ref).abs().max():.2e}")
    assert cos.min() >= 0.99999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(50), atol=1e-5)


def test_a_batch_gives_each_text_its_own_embedding(minilm):
    """Padding is out of attention and out of the mean: a text embeds the same alone or among longer ones."""
    folder, model, tok = minilm
    opts = embedding_options(model, folder)
    together = embed_texts(model, tok, SENTENCES[:6], opts, batch_size=6)
    alone = torch.cat([embed_texts(model, tok, [s], opts) for s in SENTENCES[:6]])
    assert torch.allclose(together, alone, atol=1e-5)


def test_paraphrases_score_above_unrelated_pairs(minilm):
    folder, model, tok = minilm
    a = embed_texts(model, tok, [p[0] for p in PARAPHRASES], embedding_options(model, folder))
    b = embed_texts(model, tok, [p[1] for p in PARAPHRASES], embedding_options(model, folder))
    sim = a @ b.T  # unit vectors: dot product = cosine
    matched = sim.diag()
    unrelated = sim[~torch.eye(len(PARAPHRASES), dtype=torch.bool)]
    print(f"paraphrase cosine {matched.min():.3f}..{matched.max():.3f}, unrelated {unrelated.min():.3f}.."
          f"{unrelated.max():.3f}")
    assert matched.min() > unrelated.max()
    assert (sim.argmax(1) == torch.arange(len(PARAPHRASES))).all()


def test_pooling_reads_only_real_tokens():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(states, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(states, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(states, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="pooling 'sum'"):
        EmbeddingOptions(pooling="sum")


def evolm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "evolm.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_embed_command_writes_one_line_per_input(minilm, tmp_path):
    import numpy as np

    folder, model, tok = minilm
    texts = SENTENCES[:5]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    evolm("embed", "--model", str(folder), "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.jsonl"))
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(len(json.loads(x)) == 384 for x in lines)
    evolm("embed", "--model", str(folder), "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.npy"))
    arr = np.load(tmp_path / "e.npy")
    want = embed_texts(model, tok, texts, embedding_options(model, folder)).numpy()
    assert arr.shape == (5, 384) and np.abs(arr - want).max() < 1e-5
    assert np.abs(np.array([json.loads(x) for x in lines]) - want).max() < 1e-5
    (tmp_path / "bad.txt").write_text("one\n\nthree\n")
    bad = evolm("embed", "--model", str(folder), "--input", str(tmp_path / "bad.txt"), "--out",
                str(tmp_path / "x.jsonl"), check=False)
    assert bad.returncode == 2 and "bad.txt:2: empty line" in bad.stderr
