"""Pretraining objectives (data/objectives.py): BERT's masked LM, T5's span corruption, BART's
text infilling, and their wiring into recipes and `evolm pretrain`.

References: transformers' ``DataCollatorForLanguageModeling`` run on the same batch (the masking
rates), the exact distribution of a uniform random composition (T5's span lengths), T5's counting
formula, the Poisson law (BART's span lengths), and reconstruction of the original text.
"""

from __future__ import annotations

import inspect
import json
import math
from math import comb

import numpy as np
import pytest
import torch

from evolm.data.objectives import (Objective, ObjectiveConfig, ObjectiveError, infill_plan, infill_row, mlm_row,
                                   poisson_spans, random_segmentation, sentinel, span_corrupt_row, span_counts,
                                   span_lengths, word_start_table)
from evolm.tokenizer import train_bpe
from evolm.train.recipe import RecipeError, load_recipe, recipe_from_dict


def _text() -> str:
    import collections
    import textwrap

    return inspect.getsource(collections) + inspect.getsource(textwrap)


@pytest.fixture(scope="module")
def tok_ids():
    """A real byte-level BPE with BERT's [MASK] and T5's sentinels added as pretraining adds them."""
    tok = train_bpe([_text()], vocab_size=500)
    tok.backend.add_special_tokens(ObjectiveConfig(name="mlm").tokens_to_add())
    tok.backend.add_special_tokens(ObjectiveConfig(name="span_corruption", sentinels=40).tokens_to_add())
    return tok, np.array(tok.encode(_text()), dtype=np.int64)


def _windows(ids: np.ndarray, rows: int, length: int) -> torch.Tensor:
    return torch.from_numpy(ids[:rows * length].reshape(rows, length).copy())


def _sigma_ok(count: int, n: int, p: float, k: float = 5.0) -> bool:
    """``count`` of ``n`` Bernoulli(p) trials lies within k standard deviations of n * p."""
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p))


# --- masked LM ------------------------------------------------------------------------------------
def test_mlm_structure_and_rates_match_transformers_collator(tok_ids):
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    tok, ids = tok_ids
    x = _windows(ids, 64, 256)
    x[:, ::50] = tok.eos_id  # document separators inside the windows: special, never selected
    ob = Objective(ObjectiveConfig(name="mlm"), tok)
    ex = ob(x, seed=7, step=3)
    inp, lab, mask_id = ex.input_ids, ex.targets, tok.token_to_id("[MASK]")
    selected = lab != -100
    special = torch.isin(x, torch.tensor(sorted(tok.special_ids)))
    assert not (selected & special).any()
    assert torch.equal(lab[selected], x[selected])  # unshifted: the original token at its own position
    assert torch.equal(inp[~selected], x[~selected])  # nothing else changes
    n_real = int((~special).sum())
    n_sel = int(selected.sum())
    assert _sigma_ok(n_sel, n_real, 0.15)
    mine = [int((inp[selected] == mask_id).sum()), int((inp[selected] == x[selected]).sum())]
    assert _sigma_ok(mine[0], n_sel, 0.8) and _sigma_ok(mine[1], n_sel, 0.1 + 0.1 / tok.vocab_size)

    # transformers' collator on the same windows: the same rates within sampling noise of both
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, mask_token="[MASK]", pad_token=tok.eos_token)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15, seed=0, return_tensors="pt")
    hf_in, hf_lab = collator.torch_mask_tokens(x.clone())
    hf_sel = hf_lab != -100
    assert not (hf_sel & special).any() and torch.equal(hf_lab[hf_sel], x[hf_sel])
    hf_n = int(hf_sel.sum())
    theirs = [int((hf_in[hf_sel] == mask_id).sum()), int((hf_in[hf_sel] == x[hf_sel]).sum())]
    assert abs(n_sel / n_real - hf_n / n_real) < 5 * math.sqrt(2 * 0.15 * 0.85 / n_real)
    for a, b, p in zip(mine, theirs, (0.8, 0.1)):
        assert abs(a / n_sel - b / hf_n) < 5 * math.sqrt(p * (1 - p) * (1 / n_sel + 1 / hf_n))


def test_mlm_is_keyed_by_seed_step_and_row(tok_ids):
    tok, ids = tok_ids
    x = _windows(ids, 4, 128)
    ob = Objective(ObjectiveConfig(name="mlm"), tok)
    a = ob(x, seed=1, step=5)
    assert torch.equal(a.input_ids, ob(x, seed=1, step=5).input_ids)
    assert not torch.equal(a.input_ids, ob(x, seed=1, step=6).input_ids)
    # rows 2..3 of a batch get the noise of rows 2..3 whichever process holds them
    tail = ob(x[2:], seed=1, step=5, first_row=2)
    assert torch.equal(tail.input_ids, a.input_ids[2:]) and torch.equal(tail.targets, a.targets[2:])
    held = ob(x, seed=1, step=5, held_out=True)
    assert not torch.equal(held.input_ids, a.input_ids)


def test_whole_word_masking_selects_words_entirely(tok_ids):
    tok, _ = tok_ids
    text = "def namedtuple(typename, field_names):\n    return OrderedDict(sorted_items) + defaultdict\n" * 40
    ids = np.array(tok.encode(text), dtype=np.int64)
    table = word_start_table(tok)
    pieces = [tok.id_to_token(int(i)) for i in ids[:12]]
    starts = [bool(table[0, i]) for i in ids[:12]]
    # byte-level BPE: a word starts at a token spelled with a leading space (Ġ)
    assert starts == [p.startswith("Ġ") for p in pieces]
    special = np.zeros(tok.vocab_size, dtype=bool)
    rng = np.random.default_rng(0)
    _, lab = mlm_row(ids, rng, rate=0.15, mask_id=0, vocab_size=tok.vocab_size, special=special,
                     word_start=table)
    from evolm.data.objectives import word_starts

    word = np.cumsum(word_starts(ids, table, special))
    sel = lab != -100
    for w in np.unique(word):
        assert sel[word == w].all() or not sel[word == w].any()
    n_words = len(np.unique(word))
    assert _sigma_ok(len(np.unique(word[sel])), n_words, 0.15)
    assert (word[1:] == word[:-1]).any()  # words of several tokens exist in this text


# --- T5 span corruption ----------------------------------------------------------------------------
@pytest.mark.parametrize("length, noise, spans", [
    (256, 38, 13),  # 38.4 -> 38; 12.67 -> 13
    (512, 77, 26),  # 76.8 -> 77; 25.67 -> 26
    (10, 2, 1),  # 1.5 rounds half to even -> 2; 0.67 -> 1
    (30, 4, 1),  # 4.5 -> 4 (half to even); 1.33 -> 1
    (3, 1, 1),  # at least one noise token and one span
])
def test_t5_counts_follow_its_formula(length, noise, spans):
    assert span_counts(length, 0.15, 3.0) == (noise, spans)
    keep, drop = span_lengths(length, 0.15, 3.0, np.random.default_rng(length))
    assert drop.sum() == noise and keep.sum() == length - noise and len(keep) == len(drop) == spans
    assert (keep > 0).all() and (drop > 0).all()


def test_t5_span_lengths_are_a_uniform_random_composition():
    """P(a given span has j tokens) of n tokens cut into k non-empty runs, uniformly among the
    C(n-1, k-1) cuttings, is C(n-j-1, k-2) / C(n-1, k-1)."""
    n, k, draws = 38, 13, 20000
    rng = np.random.default_rng(0)
    counts = np.bincount([random_segmentation(n, k, rng)[i % k] for i in range(draws)], minlength=n)
    for j in range(1, 8):
        p = comb(n - j - 1, k - 2) / comb(n - 1, k - 1)
        assert _sigma_ok(int(counts[j]), draws, p), (j, counts[j] / draws, p)


def test_span_corruption_reconstructs_and_uses_sentinels_from_the_vocab_end(tok_ids):
    tok, ids = tok_ids
    V = tok.vocab_size
    assert [tok.token_to_id(sentinel(i)) for i in range(3)] == [V - 1, V - 2, V - 3]
    x = _windows(ids, 8, 256)
    ob = Objective(ObjectiveConfig(name="span_corruption", sentinels=40), tok)
    ex = ob(x, seed=3, step=0)
    noise, spans = span_counts(256, 0.15, 3.0)
    assert ex.input_ids.shape == (8, 256 - noise + spans) and ex.targets.shape == (8, noise + spans + 1)
    assert torch.equal(ex.decoder_input_ids[:, 1:], ex.targets[:, :-1])
    assert (ex.decoder_input_ids[:, 0] == ob.decoder_start_id).all()
    sent = {V - 1 - i: i for i in range(40)}
    for row in range(8):
        inp, tgt = ex.input_ids[row].tolist(), ex.targets[row].tolist()
        assert [sent[t] for t in inp if t in sent] == list(range(spans))  # one sentinel per span, in order
        assert [sent[t] for t in tgt if t in sent] == list(range(spans + 1))  # closed by the next one
        dropped, cur = {}, None
        for t in tgt:
            if t in sent:
                cur = sent[t]
                dropped[cur] = []
            else:
                dropped[cur].append(t)
        rebuilt = [u for t in inp for u in (dropped[sent[t]] if t in sent else [t])]
        assert rebuilt == x[row].tolist()
        assert dropped[spans] == [] and inp[-1] == V - spans  # T5's layout ends with a noise span


def test_span_corruption_needs_enough_sentinels(tok_ids):
    tok, ids = tok_ids
    ob = Objective(ObjectiveConfig(name="span_corruption", sentinels=5), tok)
    with pytest.raises(ObjectiveError, match="raise objective.sentinels"):
        ob(_windows(ids, 1, 256), seed=0)
    with pytest.raises(ObjectiveError, match="lacks <extra_id_40>"):
        Objective(ObjectiveConfig(name="span_corruption", sentinels=100), tok)


# --- BART text infilling ---------------------------------------------------------------------------
def test_poisson_span_lengths():
    rng = np.random.default_rng(0)
    draws = np.concatenate([poisson_spans(1000, 3.0, rng)[:-1] for _ in range(40)])  # the last is cut
    assert abs(draws.mean() - 3.0) < 5 * math.sqrt(3.0 / len(draws))
    assert _sigma_ok(int((draws == 0).sum()), len(draws), math.exp(-3.0))
    for budget in (1, 7, 77):
        assert poisson_spans(budget, 3.0, rng).sum() == budget


def test_text_infilling_masks_30_percent_in_spans_and_reconstructs(tok_ids):
    tok, ids = tok_ids
    n, mask_id = 200, tok.token_to_id("[MASK]")
    inserts = 0
    for seed in range(30):
        tokens = ids[seed * n:(seed + 1) * n]
        plan = infill_plan(n, 0.3, 3.0, np.random.default_rng(seed))
        assert sum(length for _, length in plan) == math.ceil(0.3 * n)
        ends = [s + length for s, length in plan]
        assert all(e <= s for e, (s, _) in zip(ends, plan[1:]))  # in order, no overlap
        inserts += sum(length == 0 for _, length in plan)
        out = infill_row(tokens, np.random.default_rng(seed), rate=0.3, mean_span=3.0, mask_id=mask_id)
        assert (out == mask_id).sum() == len(plan)  # one mask per span, an insertion included
        rebuilt, pos, k = [], 0, 0
        for t in out.tolist():  # fill each mask with its span from the plan
            if t == mask_id:
                s, length = plan[k]
                rebuilt += tokens[s:s + length].tolist()
                k += 1
            else:
                rebuilt.append(t)
        assert rebuilt == tokens.tolist()
    assert inserts > 0  # 0-length spans (Poisson(3) gives 5% zeros) insert a mask


def test_denoise_batch_pads_inputs_and_targets_the_original(tok_ids):
    tok, ids = tok_ids
    x = _windows(ids, 6, 128)
    ob = Objective(ObjectiveConfig(name="denoise", mask_token="[MASK]"), tok, decoder_start_id=tok.eos_id)
    ex = ob(x, seed=0, step=2)
    assert torch.equal(ex.targets, x)
    assert (ex.decoder_input_ids[:, 0] == tok.eos_id).all() and torch.equal(ex.decoder_input_ids[:, 1:], x[:, :-1])
    lengths = ex.attention_mask.sum(1)
    assert ex.input_ids.shape[1] == int(lengths.max()) and len(set(lengths.tolist())) > 1
    for r in range(6):
        assert (ex.input_ids[r, lengths[r]:] == ob.pad_id).all()


# --- recipes ---------------------------------------------------------------------------------------
def _recipe(tmp, **over) -> dict:
    d = {"name": "t", "model": {"preset": "tiny-llama"}, "tokenizer": {"train": {"vocab_size": 300}},
         "data": {"sources": [{"name": "x", "path": str(tmp)}]}}
    d.update(over)
    return d


def test_recipe_objective_field(tmp_path):
    assert recipe_from_dict(_recipe(tmp_path)).objective.name == "clm"
    r = recipe_from_dict(_recipe(tmp_path, objective="mlm"))
    assert (r.objective.name, r.objective.rate) == ("mlm", 0.15)
    r = recipe_from_dict(_recipe(tmp_path, objective={"name": "denoise", "mean_span": 3.5}))
    assert (r.objective.rate, r.objective.mean_span) == (0.3, 3.5)
    with pytest.raises(RecipeError, match="objective: name must be one of clm, mlm"):
        recipe_from_dict(_recipe(tmp_path, objective="bert"))
    with pytest.raises(RecipeError, match="objective: unknown key 'mask_rate'"):
        recipe_from_dict(_recipe(tmp_path, objective={"name": "mlm", "mask_rate": 0.2}))
    with pytest.raises(RecipeError, match="whole_word is an mlm option"):
        recipe_from_dict(_recipe(tmp_path, objective={"name": "denoise", "whole_word": True}))
    with pytest.raises(RecipeError, match="rate must be in"):
        recipe_from_dict(_recipe(tmp_path, objective={"name": "mlm", "rate": 1.5}))
    with pytest.raises(RecipeError, match="doc_masking is for the clm and mlm"):
        recipe_from_dict(_recipe(tmp_path, objective="span_corruption", train={"doc_masking": True}))


def test_tokenizer_without_a_mask_token_is_refused(tok_ids):
    bare = train_bpe(["some text to train on " * 50], vocab_size=280)
    with pytest.raises(ObjectiveError, match="no mask token.*objective.mask_token"):
        Objective(ObjectiveConfig(name="mlm"), bare)


def test_demo_recipes_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    r = load_recipe(str(root / "encoder-mlm.yaml"))
    assert r.objective.name == "mlm" and r.model.overrides["mask"] == "bidirectional"
    r = load_recipe(str(root / "t5-span.yaml"))
    assert r.objective.name == "span_corruption" and r.model.preset == "tiny-t5-v1_1"


# --- pretraining an encoder ---------------------------------------------------------------------
def _mlm_recipe(tmp, **objective) -> dict:
    return {
        "name": "enc", "seed": 5, "objective": {"name": "mlm", **objective},
        "model": {"preset": "tiny-llama", "overrides": {"vocab_size": "tokenizer", "mask": "bidirectional",
                                                         "max_seq_len": 64, "d_model": 64, "head_dim": 16,
                                                         "n_layers": 2, "rope_scaling": None}},
        "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"sources": [{"name": "code", "path": str(tmp / "code")}], "val_fraction": 0.1, "near_dedup": False},
        "optim": {"lr": 3e-3},
        "train": {"micro_batch": 4, "log_every": 1, "eval_every": 4, "eval_batches": 1, "ckpt_every": 3,
                  "sample_prompts": ["def [MASK](self):"]},
        "stages": [{"name": "a", "tokens": 4 * 64 * 10, "seq_len": 64, "warmup_steps": 2}],
    }


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    import collections
    import textwrap

    d = tmp_path_factory.mktemp("obj") / "code"
    d.mkdir()
    for m in (collections, textwrap, inspect):
        (d / f"{m.__name__}.py").write_text(inspect.getsource(m))
    return d.parent


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_an_encoder_with_mlm_and_resume_bit_exactly(code_dir, tmp_path):
    from evolm.train.pretrain import pretrain

    quiet = lambda s: None  # noqa: E731
    full = tmp_path / "full"
    summary = pretrain(recipe_from_dict(_mlm_recipe(code_dir)), out_dir=str(full), log=quiet)
    rows = _rows(full)
    assert rows[-1]["loss"] < rows[0]["loss"] and summary["val_loss"] > 0
    from evolm.tokenizer import Tokenizer

    tok = Tokenizer.from_file(str(full / "tokenizer.json"))
    assert tok.token_to_id("[MASK]") == tok.vocab_size - 1 == 300  # added after the trained vocabulary
    assert "def [MASK](self):" in (full / "report.md").read_text()  # the filled-in prompt is reported
    part = tmp_path / "part"
    r = recipe_from_dict(_mlm_recipe(code_dir))
    pretrain(r, out_dir=str(part), log=quiet, stop_after_steps=4)
    pretrain(r, out_dir=str(part), log=quiet, resume=True)
    assert [x["loss"] for x in _rows(part)] == [x["loss"] for x in rows]  # the same masks after a resume


def test_objective_and_model_kind_must_agree(code_dir, tmp_path):
    from evolm.train.pretrain import pretrain

    d = _mlm_recipe(code_dir)
    d["model"]["overrides"]["mask"] = "causal"
    with pytest.raises(RecipeError, match="trains an encoder: set model.overrides.mask: bidirectional"):
        pretrain(recipe_from_dict(d), out_dir=str(tmp_path / "a"), log=lambda s: None)
    d = _mlm_recipe(code_dir)
    d["objective"] = "clm"
    with pytest.raises(RecipeError, match="a bidirectional model sees the tokens it predicts"):
        pretrain(recipe_from_dict(d), out_dir=str(tmp_path / "b"), log=lambda s: None)
    d = _mlm_recipe(code_dir)
    d["objective"] = "span_corruption"
    with pytest.raises(RecipeError, match="trains an encoder-decoder model"):
        pretrain(recipe_from_dict(d), out_dir=str(tmp_path / "c"), log=lambda s: None)


# --- pretraining an encoder-decoder ------------------------------------------------------------------
def _seq2seq_recipe(tmp, objective: str) -> dict:
    """T5 v1.1 (relative position buckets, gated GELU, no biases) for span corruption, BART (learned
    positions, post-norm, GELU) for text infilling: the tiny presets, the decoder starting from id 0."""
    d = _mlm_recipe(tmp)
    preset = "tiny-t5-v1_1" if objective == "span_corruption" else "tiny-bart"
    d["name"], d["objective"] = preset, {"name": objective, "sentinels": 20} if objective == "span_corruption" \
        else objective
    d["model"] = {"preset": preset, "overrides": {"vocab_size": "tokenizer", "max_seq_len": 64,
                                                  "decoder_start_token_id": 0}}
    d["train"]["sample_prompts"] = ["def <extra_id_0>(self):" if objective == "span_corruption" else "def <mask>"]
    d["train"]["sample_tokens"] = 6
    return d


@pytest.mark.parametrize("objective", ["span_corruption", "denoise"])
def test_pretrain_a_seq2seq_model_and_resume_bit_exactly(code_dir, tmp_path, objective):
    from evolm.train.pretrain import pretrain

    quiet = lambda s: None  # noqa: E731
    full = tmp_path / "full"
    summary = pretrain(recipe_from_dict(_seq2seq_recipe(code_dir, objective)), out_dir=str(full), log=quiet)
    rows = _rows(full)
    assert rows[-1]["loss"] < rows[0]["loss"] and summary["val_loss"] > 0
    part = tmp_path / "part"
    r = recipe_from_dict(_seq2seq_recipe(code_dir, objective))
    pretrain(r, out_dir=str(part), log=quiet, stop_after_steps=4)
    pretrain(r, out_dir=str(part), log=quiet, resume=True)
    assert [x["loss"] for x in _rows(part)] == [x["loss"] for x in rows]  # the same noise after a resume
