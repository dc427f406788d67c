"""Pretraining: schedules, optimizer groups, recipes, exact resume, atomic checkpoints, DDP/FSDP."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evolm import ModelConfig, build
from evolm.train.optim import lr_at, param_groups
from evolm.train.pretrain import positions_from_segments, pretrain
from evolm.train.recipe import RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


# --- schedules and optimizer --------------------------------------------------------------------
def test_cosine_schedule_matches_formula():
    total, warm, floor = 100, 10, 0.1
    for step in range(total):
        if step < warm:
            want = (step + 1) / warm
        else:
            frac = (step - warm) / (total - warm - 1)
            want = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        assert lr_at(step, total, warm, "cosine", floor) == pytest.approx(want)
    assert lr_at(total - 1, total, warm, "cosine", floor) == pytest.approx(floor)


def test_linear_and_wsd_schedules():
    assert [lr_at(s, 5, 0, "linear", 0.0) for s in range(5)] == pytest.approx([1, .75, .5, .25, 0])
    wsd = [lr_at(s, 10, 2, "wsd", 0.0, decay_fraction=0.2) for s in range(10)]
    assert wsd == pytest.approx([.5, 1, 1, 1, 1, 1, 1, 1, .5, 0])
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_at(0, 10, 0, "exponential")


def test_no_weight_decay_on_norms_biases_embeddings():
    m = build(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16))
    decay, no_decay = param_groups(m, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    for name, p in m.named_parameters():
        is_matrix = p.ndim >= 2 and "embed" not in name
        assert (id(p) in decay_ids) == is_matrix, name
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_positions_restart_at_document_boundaries():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


# --- recipes ------------------------------------------------------------------------------------
def _recipe_dict(tmp: Path, **train) -> dict:
    return {
        "name": "t", "seed": 3,
        "model": {"preset": "tiny-llama", "overrides": {"vocab_size": "tokenizer", "rope_scaling": None,
                                                         "max_seq_len": 64, "d_model": 64, "head_dim": 16,
                                                         "n_layers": 2}},
        "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"sources": [{"name": "code", "path": str(tmp / "corpus" / "code")},
                             {"name": "prose", "path": str(tmp / "corpus" / "prose.txt"), "separator": "\n\n"}],
                 "val_fraction": 0.1, "near_dedup": False},
        "optim": {"lr": 3e-3},
        "train": {"micro_batch": 2, "tokens_per_step": 128, "log_every": 1, "eval_every": 4, "eval_batches": 1,
                  "ckpt_every": 3, "sample_prompts": ["def "], "sample_tokens": 4, **train},
        "stages": [{"name": "a", "tokens": 128 * 6, "seq_len": 32, "warmup_steps": 2},
                   {"name": "b", "tokens": 128 * 4, "seq_len": 64, "rope_theta": 40000.0, "schedule": "linear",
                    "lr_end": 0.0, "mixture": {"prose": 1.0}}],
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real text: a few standard-library modules as code, their docstrings as prose."""
    import collections
    import json as json_mod
    import textwrap

    tmp = tmp_path_factory.mktemp("train")
    code = tmp / "corpus" / "code"
    code.mkdir(parents=True)
    prose = []
    for mod in (collections, json_mod.decoder, json_mod.encoder, textwrap, inspect):
        src = inspect.getsource(mod)
        (code / f"{mod.__name__.replace('.', '_')}.py").write_text(src)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and doc not in prose:
                prose.append(doc)
    (tmp / "corpus" / "prose.txt").write_text("\n\n".join(prose))
    return tmp


def test_recipe_typos_suggest_the_closest_key(tmp_path):
    d = _recipe_dict(tmp_path)
    d["train"]["micro_bacth"] = 4
    with pytest.raises(RecipeError, match="unknown key 'micro_bacth'.*did you mean 'micro_batch'"):
        recipe_from_dict(d)
    d = _recipe_dict(tmp_path)
    d["stages"][1]["shedule"] = "cosine"
    with pytest.raises(RecipeError, match=r"stages\[1\].*did you mean 'schedule'"):
        recipe_from_dict(d)
    d = _recipe_dict(tmp_path)
    d["stages"][0]["schedule"] = "exp"
    with pytest.raises(RecipeError, match="schedule must be one of"):
        recipe_from_dict(d)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("section, key, value, says", [
    ("stages", "seq_len", [1, "x"], r"stages\[0\]: seq_len must be int, got \[1, 'x'\]"),
    ("train", "micro_batch", [], r"train: micro_batch must be int, got \[\]"),
    ("train", "compile", "yes", "train: compile must be bool"),
    ("train", "eval_tasks", "arc_easy", r"train: eval_tasks must be list\[str\]"),
    ("optim", "betas", [0.9], r"optim: betas must be tuple\[float, float\]"),
    ("optim", "lr", "3e-4", "optim: lr must be float, got '3e-4' .*write 3.0e-4"),
])
def test_recipe_values_of_the_wrong_type_name_the_key(tmp_path, section, key, value, says):
    d = _recipe_dict(tmp_path)
    (d["stages"][0] if section == "stages" else d[section])[key] = value
    with pytest.raises(RecipeError, match=says):
        recipe_from_dict(d)


def test_loop_config_and_phases_take_the_recipe_values(tmp_path):
    from evolm.train.config import LoopConfig
    from evolm.train.pretrain import plan_stages

    d = _recipe_dict(tmp_path, dtype="bfloat16", eval_tasks=["arc_easy"], eval_tasks_limit=3)
    d["optim"]["betas"] = [0.8, 0.9]
    r = recipe_from_dict(d)
    cfg = LoopConfig.from_recipe(r)
    assert (cfg.lr, cfg.betas, cfg.dtype, cfg.eval_tasks, cfg.eval_tasks_limit, cfg.log_every) == \
        (3e-3, (0.8, 0.9), "bfloat16", ["arc_easy"], 3, 1)
    a, b = (p.phase() for p in plan_stages(r, world=1))
    assert (a.name, a.schedule, a.warmup_steps, a.lr_end, a.steps, a.accum) == ("a", "cosine", 2, 0.1, 6, 2)
    assert (b.name, b.schedule, b.warmup_steps, b.lr_end, b.steps, b.accum) == ("b", "linear", 0, 0.0, 4, 1)


@pytest.mark.parametrize("name", ["demo", "gpt2-124m", "three-stage"])
def test_shipped_recipes_parse(name):
    r = load_recipe(str(ROOT / "recipes" / f"{name}.yaml"))
    assert r.stages and r.model.preset


def test_vocab_mismatch_and_missing_data_are_clear(corpus, tmp_path):
    d = _recipe_dict(corpus)
    d["model"]["overrides"]["vocab_size"] = 100
    with pytest.raises(RecipeError, match="tokenizer has 300 tokens but the model's vocab_size is 100"):
        pretrain(recipe_from_dict(d), out_dir=str(tmp_path / "r1"), log=lambda s: None)
    d = _recipe_dict(corpus)
    d["data"]["sources"][0]["path"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrain(recipe_from_dict(d), out_dir=str(tmp_path / "r2"), log=lambda s: None)
    d = _recipe_dict(corpus)
    d["model"]["overrides"]["n_layrs"] = 3
    with pytest.raises(RecipeError, match="did you mean 'n_layers'"):
        pretrain(recipe_from_dict(d), out_dir=str(tmp_path / "r3"), log=lambda s: None)


# --- a real (tiny) run ----------------------------------------------------------------------------
def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    summary = pretrain(recipe_from_dict(_recipe_dict(corpus)), out_dir=str(out), log=lambda s: None)
    return out, summary


def test_run_folder_has_metrics_plot_report_and_a_loadable_model(full_run):
    out, summary = full_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("step", "stage", "loss", "lr", "tokens_per_s", "mfu"):
        assert all(key in r for r in rows)
    assert {r["stage"] for r in rows} == {"a", "b"}
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 6, 8, 10] and all(r["val_loss"] > 0 for r in evals)
    assert rows[-1]["lr"] == 0.0  # the second stage decays to zero
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tb").iterdir())
    assert (out / "loss.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Stages" in report and "final val loss" in report
    median_mfu = sorted(r["mfu"] for r in rows)[4:6]  # the report gives the median MFU, not just its peak
    assert f"MFU {100 * summary['mfu']:.1f}% against" in report and median_mfu[0] <= summary["mfu"] <= median_mfu[1]
    assert "| prose | 0 |" not in report and "| code | 0 |" not in report  # token counts filled in
    # the run folder is a model: weights + config + tokenizer
    from evolm.checkpoint import load_checkpoint

    model = load_checkpoint(str(out))
    assert model.config.rope_theta == 40000.0  # the long-context stage's RoPE base is kept
    from evolm.tokenizer import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.vocab_size == 300
    assert summary["steps"] == 10


def test_resume_is_bit_exact_across_a_stage_boundary(corpus, full_run, tmp_path):
    out = tmp_path / "run"
    r = recipe_from_dict(_recipe_dict(corpus))
    quiet = lambda s: None  # noqa: E731
    pretrain(r, out_dir=str(out), log=quiet, stop_after_steps=4)  # mid stage a, between checkpoints
    pretrain(r, out_dir=str(out), log=quiet, resume=True, stop_after_steps=3)  # into stage b
    pretrain(r, out_dir=str(out), log=quiet, resume=True)
    assert _losses(out) == _losses(full_run[0])  # bit for bit


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from evolm import checkpoint as ck

    model = build(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    path = tmp_path / "ckpt"
    ck.save_checkpoint(model, str(path), {"step": 1})
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck, "save_file", boom)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(model, str(path), {"step": 2})
    assert (path / "model.safetensors").read_bytes() == before
    assert ck.load_trainer_state(str(path))["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_activation_checkpointing_gives_the_same_gradients():
    from evolm.train.parallel import apply_activation_checkpointing

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, norm="rmsnorm", pos_emb="rope",
                      max_seq_len=16, mlp="glu", activation="silu")
    torch.manual_seed(0)
    a = build(cfg)
    b = build(cfg)
    b.load_state_dict(a.state_dict())
    apply_activation_checkpointing(b)
    x = torch.randint(0, 64, (2, 16))
    for m in (a, b):
        m.loss(x[:, :-1], x[:, 1:]).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-6, msg=n)


# --- distributed: 2 CPU processes on gloo equal one process with the same global batch ----------
def _torchrun(recipe_path: Path, out: Path, *extra: str, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", str(nproc), "--master_port",
                           str(29500 + os.getpid() % 500), "-m", "evolm.cli", "pretrain", "--config", str(recipe_path),
                           "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _write_recipe(tmp_path: Path, corpus: Path, **train) -> Path:
    """This file's recipe (``_recipe_dict``) as ``tmp_path/r.yaml``, for a torchrun launch."""
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(corpus, **train)))
    return path


def _max_rel_diff(single: list[float], other: list[float]) -> float:
    """Max relative difference of two runs' logged losses (a layout against one process)."""
    return max(abs(a - b) / abs(a) for a, b in zip(single, other))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_loss_equals_single_process(corpus, full_run, tmp_path, mode):
    import yaml

    d = _recipe_dict(corpus, micro_batch=1, distributed=mode, sample_prompts=[])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    _torchrun(recipe_path, out)
    single, double = _losses(full_run[0]), _losses(out)
    assert len(single) == len(double) == 10
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-5
    if mode == "fsdp":  # sharded optimizer state gathered into one checkpoint, then scattered again
        _torchrun(recipe_path, tmp_path / "resumed", "--stop-after", "4")
        _torchrun(recipe_path, tmp_path / "resumed", "--resume")
        assert _losses(tmp_path / "resumed") == double


@pytest.mark.slow
def test_fsdp_evaluates_an_odd_number_of_held_out_batches(corpus, tmp_path):
    """Held-out batches are shared out across the data-parallel ranks; under FSDP each forward is a
    collective, so a rank without a batch of its own must still run one (and count nothing). One
    source and one eval batch: rank 1 has none (this hung forever). The val losses equal one process's."""
    import yaml

    d = _recipe_dict(corpus, micro_batch=1, distributed="fsdp", sample_prompts=[], eval_batches=1, eval_every=5)
    d["data"]["sources"] = d["data"]["sources"][1:]  # prose only: one held-out batch
    d["stages"] = d["stages"][:1]
    single = tmp_path / "single"
    pretrain(recipe_from_dict({**d, "train": {**d["train"], "distributed": "none"}}), out_dir=str(single),
             log=lambda s: None)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(d))
    _torchrun(recipe_path, tmp_path / "run")

    def val(run):
        return [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in json.loads(line)]
    one, two = val(single), val(tmp_path / "run")
    assert len(one) == len(two) >= 1
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-5
