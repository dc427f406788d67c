"""Sharded checkpoints (torch.distributed.checkpoint): save under one layout (one process, DDP,
FSDP2, tensor parallel, pipeline stages), load under another with every model and optimizer
tensor equal (max |diff| 0) and the next steps' losses equal; a
stopped-and-resumed run equal bit for bit to the uninterrupted one; the data position under a
changed data-parallel degree (re-derived, or a message naming both degrees); a save killed before
it is published leaves the previous checkpoint; the shards' index never runs code."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from evolm import ModelConfig, build
from evolm.checkpoint import CheckpointError, load_checkpoint
from evolm.parallel import checkpoint as dckpt
from evolm.train import parallel as par
from evolm.train.loop import LoopConfig, Phase, latest_checkpoint, run
from evolm.train.optim import make_optimizer
from ranks import run_ranks
from test_train import corpus  # noqa: F401 - the fixture: real text (standard-library sources, docstrings)

ROOT = Path(__file__).resolve().parents[1]
# Llama-style: GQA, RMSNorm, RoPE, SwiGLU
CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, norm="rmsnorm", pos_emb="rope",
                  mlp="glu", activation="silu", max_seq_len=16)


def _build(seed: int, n_layers: int = 2):
    torch.manual_seed(seed)
    return build(CFG.replace(n_layers=n_layers))


def _batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 96, (4, 13), generator=g)


def _wrapped(layout: str, world: int, seed: int, n_layers: int = 2):
    model = _build(seed, n_layers)
    net = par.parallelize(model, layout, world, torch.device("cpu"))
    return net, make_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


def _steps(net, opt, start: int, n: int) -> list[float]:
    """AdamW steps on whole batches, the same on every rank: gradients averaged over equal
    copies are exact, so any layout's step equals one process's bit for bit."""
    out = []
    for i in range(start, start + n):
        x = _batch(i)
        loss = net(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def _full(net, opt, gather: bool = True) -> dict:
    """Every model and optimizer value, gathered (on rank 0; ``gather=False``: this rank's own,
    for pipeline stages), keyed by the plain model's names, as numpy arrays (tensors in shared
    memory do not outlive the rank process that made them)."""
    opts = StateDictOptions(full_state_dict=gather, cpu_offload=gather, flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(net, opt, options=opts)
    return {**{f"model.{k}": v.detach().numpy().copy() for k, v in msd.items()},
            **{f"optim.{k}": v.detach().numpy().copy() if isinstance(v, torch.Tensor) else v for k, v in osd.items()}}


def _rank_state(rank: int, world: int) -> dict:
    return {"dp_rank": rank, "dp_degree": world, "task": {}, "rng": {}}


def save_then_continue(rank: int, world: int, layout: str, folder: str):
    """Two steps, a sharded save, two more steps: (state at the save, the later losses)."""
    net, opt = _wrapped(layout, world, seed=0)
    _steps(net, opt, 0, 2)
    dckpt.save(net, opt, folder, progress={"global_step": 2}, rank_state=_rank_state(rank, world),
               rank=rank, world=world)
    state = _full(net, opt)
    return state, _steps(net, opt, 2, 2)


def load_then_continue(rank: int, world: int, layout: str, folder: str, n_layers: int = 2):
    """A model of other random weights, the checkpoint loaded into it, two steps."""
    net, opt = _wrapped(layout, world, seed=1, n_layers=n_layers)
    dckpt.load(net, opt, folder)
    state = _full(net, opt)
    return state, _steps(net, opt, 2, 2)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    arrays = [k for k in a if isinstance(a[k], np.ndarray)]
    for k in set(a) - set(arrays):
        assert a[k] == b[k], k
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in arrays)


def fsdp_then_ddp(rank: int, world: int, folder: str):
    """Save under FSDP 2, then, in the same two processes, load into a DDP-wrapped model."""
    saved = save_then_continue(rank, world, "fsdp", folder)
    return saved, load_then_continue(rank, world, "ddp", folder)


def test_fsdp2_to_ddp2_and_to_one_process_exactly_each_rank_writing_its_shards(tmp_path):
    folder = tmp_path / "step_0000002"
    (state, later), (ddp, ddp_later) = run_ranks(2, fsdp_then_ddp, str(folder))[0]
    assert any(k.startswith("model.") for k in state) and any(k.endswith(".exp_avg_sq") for k in state)
    shards = sorted(p.name for p in (folder / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    sizes = [(folder / "dcp" / s).stat().st_size for s in shards[1:]]
    assert min(sizes) > 0.4 * max(sizes)  # halves, not everything on rank 0
    assert sorted(p.name for p in folder.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert _max_diff(state, ddp) == 0.0 and ddp_later == later  # every parameter and AdamW moment
    one, one_later = load_then_continue(0, 1, "none", str(folder))
    assert _max_diff(state, one) == 0.0 and one_later == later  # ... and the next steps' losses


def _on_layout(layout, world: int, seed: int):
    """The model split by ``evolm.parallel.parallelize`` for ``layout`` (tensor parallel, FSDP ...)."""
    from evolm.parallel import parallelize

    model = _build(seed)
    layout = layout.resolve(world)
    net = parallelize(model, layout, layout.build_mesh("cpu"), device=torch.device("cpu"))
    return net, make_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


def tp_then_fsdp(rank: int, world: int, folder: str, one_folder: str):
    """Save under tensor parallel 2, then, in the same processes, load it under FSDP 2; and load
    there the checkpoint one process saved."""
    from evolm.parallel import ParallelLayout

    net, opt = _on_layout(ParallelLayout(dp_shard=1, tp=2), world, seed=0)
    _steps(net, opt, 0, 2)
    dckpt.save(net, opt, folder, progress={}, rank_state=_rank_state(0, 1), rank=rank, world=world)
    saved, tp_later = _full(net, opt), _steps(net, opt, 2, 2)
    fsdp = ParallelLayout(dp_shard=2)
    net, opt = _on_layout(fsdp, world, seed=1)
    dckpt.load(net, opt, folder)
    loaded, later = _full(net, opt), _steps(net, opt, 2, 2)
    net, opt = _on_layout(fsdp, world, seed=1)
    dckpt.load(net, opt, one_folder)
    return saved, tp_later, loaded, later, (_full(net, opt), _steps(net, opt, 2, 2))


def test_tp2_and_one_process_to_fsdp2_exactly(tmp_path):
    folder, one_folder = tmp_path / "tp" / "step_0000002", tmp_path / "one" / "step_0000002"
    one_saved = save_then_continue(0, 1, "none", str(one_folder))
    saved, tp_later, loaded, later, one_to_fsdp = run_ranks(2, tp_then_fsdp, str(folder), str(one_folder))[0]
    assert _max_diff(one_saved[0], one_to_fsdp[0]) == 0.0 and one_to_fsdp[1] == one_saved[1]
    assert _max_diff(saved, loaded) == 0.0  # tp's row/column shards -> fsdp's row shards, bit for bit
    one, one_later = load_then_continue(0, 1, "none", str(folder))
    assert _max_diff(saved, one) == 0.0 and later == one_later  # fsdp continues as one process would
    # tensor parallel's own continuation differs only by its partial sums' rounding
    assert max(abs(a - b) / b for a, b in zip(tp_later, later)) < 1e-5


def pp_then_continue(rank: int, world: int, folder: str, stages_per_rank: int):
    """Two AdamW steps through a 2-rank pipeline (GPipe or looped stages), a sharded save; this
    rank's model + optimizer values (its stages' parameters) and the next two steps' losses."""
    from torch.distributed.device_mesh import init_device_mesh

    from evolm.parallel.pipeline import pipeline

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    pipe = pipeline(_build(0, 2 * stages_per_rank), mesh["pp"], "gpipe" if stages_per_rank == 1 else "loopedbfs", n_microbatches=2,
                    stages_per_rank=stages_per_rank)
    opt = make_optimizer(pipe.module, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)

    def steps(start):
        out = []
        for i in range(start, start + 2):
            x = _batch(i)
            out.append(pipe.step(x[:, :-1], x[:, 1:]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out

    steps(0)
    dckpt.save(dckpt.stateful(pipe), opt, folder, progress={}, rank_state=_rank_state(0, 1), rank=rank, world=world)
    return _full(dckpt.stateful(pipe), opt, gather=False), steps(2)


@pytest.mark.parametrize("stages_per_rank", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["gpipe", "looped"])
def test_pp2_to_one_process_exactly(tmp_path, stages_per_rank):
    folder = tmp_path / "step_0000002"
    ranks = run_ranks(2, pp_then_continue, str(folder), stages_per_rank)
    saved = {k: v for state, _ in ranks for k, v in state.items()}  # each rank: its stages' part
    one, one_later = load_then_continue(0, 1, "none", str(folder), n_layers=2 * stages_per_rank)
    assert set(one) == set(saved) and _max_diff(saved, one) == 0.0  # every tensor, bit for bit
    # the pipeline's micro-batched loss and one process's whole-batch loss round differently
    assert max(abs(a - b) / b for a, b in zip(ranks[0][1], one_later)) < 1e-5


# --- through the trainer -------------------------------------------------------------------------
class RankTask:
    """Rank r of w trains on rows [4r/w, 4(r+1)/w) of the step's batch; the position is global."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world, self.i = rank, world, 0

    def start_phase(self, index, phase):
        pass

    def next_batch(self):
        self.i += 1
        n = 4 // self.world
        return _batch(self.i)[self.rank * n:(self.rank + 1) * n]

    def loss(self, model, batch):
        return model(batch[:, :-1], targets=batch[:, 1:]), {}

    def evaluate(self, model):
        x = _batch(-1)
        return {"val_loss": float(model(x[:, :-1], targets=x[:, 1:]))}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]

    def reshard_data_state(self, states, saved, dp_rank, dp_degree):
        return states[0]  # the position is the global step count, the same on every rank


class FixedSplitTask(RankTask):
    """A task that cannot say how its position maps onto another data-parallel degree."""

    reshard_data_state = None


PHASES = [Phase("a", steps=5, warmup_steps=1, schedule="cosine")]


def _loop_cfg(distributed: str) -> LoopConfig:
    return LoopConfig(lr=1e-2, grad_clip=0.5, log_every=1, eval_every=0, ckpt_every=2, keep_checkpoints=5,
                      distributed=distributed, ckpt_format="dcp")


def trainer_runs(rank: int, world: int, layout: str, out: str, stop: int | None, resume: bool,
                 task: type = RankTask):
    summary = run(_build(0), task(rank, world), PHASES, _loop_cfg(layout), out, resume=resume,
                  stop_after_steps=stop, log=lambda s: None)
    return summary["losses"]


def tp_runs(rank: int, world: int, tmp: str):
    """Under tensor parallel 2 (one data-parallel rank): the whole run, the run stopped after 3
    steps and resumed; then the stopped run resumed under FSDP 2 (data-parallel degree 1 -> 2)."""
    import dataclasses
    import shutil

    from evolm.parallel import ParallelLayout

    def go(layout, dp, out, stop, resume):
        cfg = dataclasses.replace(_loop_cfg("none"), parallel=layout)
        return run(_build(0), RankTask(*dp), PHASES, cfg, out, resume=resume, stop_after_steps=stop,
                   log=lambda s: None)["losses"]

    tp = ParallelLayout(dp_shard=1, tp=2)
    full = go(tp, (0, 1), f"{tmp}/full", None, False)
    go(tp, (0, 1), f"{tmp}/cut", 3, False)
    if rank == 0:
        shutil.copytree(f"{tmp}/cut", f"{tmp}/cut_fsdp")
    dist.barrier()
    resumed = go(tp, (0, 1), f"{tmp}/cut", None, True)
    as_fsdp = go(ParallelLayout(dp_shard=2), (rank, world), f"{tmp}/cut_fsdp", None, True)
    return full, resumed, as_fsdp


def uninterrupted_and_resumed(rank: int, world: int, tmp: str):
    """Under FSDP 2: the whole run; the run stopped after 3 steps; that run resumed."""
    import shutil

    full = trainer_runs(rank, world, "fsdp", f"{tmp}/full", None, False)
    trainer_runs(rank, world, "fsdp", f"{tmp}/cut", 3, False)
    cut = sorted(os.listdir(f"{tmp}/cut/checkpoints"))
    if rank == 0:  # kept as stopped, for the tests that resume it otherwise
        shutil.copytree(f"{tmp}/cut", f"{tmp}/cut_at_3")
    dist.barrier()
    return full, cut, trainer_runs(rank, world, "fsdp", f"{tmp}/cut", None, True)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    full, cut, resumed = run_ranks(2, uninterrupted_and_resumed, str(tmp))[0]
    return tmp, full, cut, resumed


def test_a_stopped_and_resumed_sharded_run_equals_the_uninterrupted_one_bit_for_bit(fsdp_runs):
    tmp, full, cut, resumed = fsdp_runs
    assert cut == ["step_0000002", "step_0000003"]
    assert len(full) == 5 and resumed == full


def test_a_sharded_step_is_a_model_too(fsdp_runs, tmp_path):
    step = fsdp_runs[0] / "full" / "checkpoints" / "step_0000004"
    assert not (step / "model.safetensors").exists()  # the gather DCP avoids
    from_shards = load_checkpoint(str(step)).state_dict()  # read from the shards
    from evolm.cli import main

    assert main(["checkpoint", "consolidate", str(step), "--out", str(tmp_path / "consolidated")]) == 0
    consolidated = load_checkpoint(str(tmp_path / "consolidated")).state_dict()
    final = load_checkpoint(str(fsdp_runs[0] / "full")).state_dict()
    assert max(float((from_shards[k] - consolidated[k]).abs().max()) for k in from_shards) == 0.0
    assert any(float((from_shards[k] - final[k]).abs().max()) > 0 for k in final)  # step 4 is not step 5


def test_one_process_resume_is_bit_exact_too(tmp_path):
    full = trainer_runs(0, 1, "none", str(tmp_path / "full"), None, False)
    trainer_runs(0, 1, "none", str(tmp_path / "cut"), 2, False)
    assert trainer_runs(0, 1, "none", str(tmp_path / "cut"), None, True) == full


def _mlp_only(seed: int):
    model = _build(seed)
    for n, p in model.named_parameters():
        p.requires_grad = "mlp" in n
    return model


def test_a_partly_frozen_run_stores_its_trainable_part_and_resumes_bit_for_bit(tmp_path):
    """As the full path's trainable.safetensors: the frozen base is not stored (it comes from the
    base model the run starts from), the trainable part and its optimizer state are."""
    cfg = _loop_cfg("none")
    full = run(_mlp_only(0), RankTask(), PHASES, cfg, tmp_path / "full", log=lambda s: None)["losses"]
    run(_mlp_only(0), RankTask(), PHASES, cfg, tmp_path / "cut", stop_after_steps=3, log=lambda s: None)
    step = latest_checkpoint(tmp_path / "cut")
    stored = dckpt.read_model_state(step)
    assert stored and all("mlp" in k for k in stored)
    resumed = run(_mlp_only(0), RankTask(), PHASES, cfg, tmp_path / "cut", resume=True, log=lambda s: None)
    assert resumed["losses"] == full


def test_a_changed_data_parallel_degree_names_both_degrees(fsdp_runs, tmp_path):
    import shutil

    shutil.copytree(fsdp_runs[0] / "cut_at_3", tmp_path / "r")
    with pytest.raises(CheckpointError, match="saved with data-parallel degree 2, resuming with 1: the data "
                                              "position of FixedSplitTask .* resume with data-parallel degree 2"):
        trainer_runs(0, 1, "none", str(tmp_path / "r"), None, True, FixedSplitTask)
    # a task that re-derives its position resumes on one process, continuing the fsdp run
    _, full, _, _ = fsdp_runs
    resumed = trainer_runs(0, 1, "none", str(tmp_path / "r"), None, True)
    assert len(resumed) == 5 and resumed[:3] == full[:3]  # the log up to the checkpoint
    assert max(abs(a - b) / b for a, b in zip(resumed, full)) < 1e-5  # one process's own rounding


@pytest.mark.slow
def test_tensor_parallel_resumes_bit_for_bit_and_under_fsdp2(tmp_path):
    full, resumed, as_fsdp = run_ranks(2, tp_runs, str(tmp_path))[0]
    assert len(full) == 5 and resumed == full  # tp 2 -> tp 2: bit for bit
    assert as_fsdp[:3] == full[:3]  # the log up to the checkpoint, then fsdp's own rounding
    assert max(abs(a - b) / b for a, b in zip(as_fsdp, full)) < 1e-5


def test_pretraining_rederives_the_position_when_the_global_batch_is_kept():
    from evolm.train.pretrain import PretrainTask

    loader = {"step": 7, "cursors": {"code": 9}, "global_batch": 4}
    states = [{"loader": dict(loader)}, {"loader": dict(loader)}]
    task = SimpleNamespace(recipe=SimpleNamespace(train=SimpleNamespace(micro_batch=4)))
    assert PretrainTask.reshard_data_state(task, states, 2, 0, 1) == states[0]  # 2 x 2 rows -> 1 x 4
    task.recipe.train.micro_batch = 2
    with pytest.raises(CheckpointError, match=r"saved with data-parallel degree 2 \(4 rows per loader step = "
                                              r"micro_batch 2 x 2\), resuming with degree 1 .* set "
                                              r"train.micro_batch to 4"):
        PretrainTask.reshard_data_state(task, states, 2, 0, 1)
    with pytest.raises(CheckpointError, match="no micro_batch gives 4 rows over 3 ranks"):
        PretrainTask.reshard_data_state(task, states, 2, 0, 3)


# --- atomic, and safe to read ----------------------------------------------------------------------
def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    net, opt = _wrapped("none", 1, seed=0)
    _steps(net, opt, 0, 1)
    kw = dict(rank_state=_rank_state(0, 1), rank=0, world=1)
    dckpt.save(net, opt, tmp_path / "step_0000001", progress={"global_step": 1}, **kw)
    before = _full(net, opt)
    _steps(net, opt, 1, 1)

    def killed(tmp):
        raise KeyboardInterrupt("killed after the shards, before the rename")

    with pytest.raises(KeyboardInterrupt):
        dckpt.save(net, opt, tmp_path / "step_0000002", progress={"global_step": 2}, before_publish=killed, **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    with pytest.raises(KeyboardInterrupt):  # over the same folder: the old one stays whole
        dckpt.save(net, opt, tmp_path / "step_0000001", progress={"global_step": 2}, before_publish=killed, **kw)
    net2, opt2 = _wrapped("none", 1, seed=1)
    dckpt.load(net2, opt2, tmp_path / "step_0000001")
    assert _max_diff(before, _full(net2, opt2)) == 0.0
    # a multi-rank save killed outright cannot clean up: its temporary folder is not a checkpoint,
    # and the next save of that step removes it
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "step_0000001").rename(tmp_path / "checkpoints" / ".tmp-step_0000002")
    assert latest_checkpoint(tmp_path) is None
    dckpt.save(net, opt, tmp_path / "checkpoints" / "step_0000002", progress={"global_step": 2}, **kw)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_the_shard_index_is_read_without_running_code(tmp_path, monkeypatch):
    net, opt = _wrapped("none", 1, seed=0)
    dckpt.save(net, opt, tmp_path / "s", progress={}, rank_state=_rank_state(0, 1), rank=0, world=1)
    (tmp_path / "s" / "dcp" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"\.metadata: holds objects beyond DCP's index \(posix.system"):
        dckpt.load(net, opt, tmp_path / "s")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "s" / "dcp" / ".metadata").write_bytes(b"\x80\x04trunc")
    with pytest.raises(CheckpointError, match="damaged"):
        dckpt.load(net, opt, tmp_path / "s")


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    net, opt = _wrapped("none", 1, seed=0)
    dckpt.save(net, opt, tmp_path / "s", progress={}, rank_state=_rank_state(0, 1), rank=0, world=1)
    torch.manual_seed(0)
    other = build(CFG.replace(n_layers=3))
    with pytest.raises(CheckpointError, match=r"does not fit this run's model and optimizer \(saved but not "
                                              r"here: none; here but not saved: model.layers.2"):
        dckpt.load(other, make_optimizer(other, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8),
                   tmp_path / "s")
    one = build(CFG.replace(n_layers=1))  # a layer fewer: refused too, not loaded in part
    with pytest.raises(CheckpointError, match=r"saved but not here: model.layers.1.*here but not saved: none"):
        dckpt.load(one, make_optimizer(one, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8),
                   tmp_path / "s")


# --- end to end: torchrun fsdp 2 -> one process ------------------------------------------------------
@pytest.mark.slow
def test_pretrain_under_torchrun_fsdp2_resumes_in_one_process(corpus, tmp_path):
    """`evolm pretrain` under torchrun (fsdp, 2 ranks, sharded checkpoints), stopped after 3
    steps, resumed by one process with micro_batch doubled (the same global batch): the losses
    continue those of the uninterrupted run (one process vs two: equal within 1e-5)."""
    import yaml

    from evolm.train.pretrain import pretrain
    from evolm.train.recipe import recipe_from_dict
    from test_train import _losses, _recipe_dict

    d = _recipe_dict(corpus, micro_batch=1, distributed="fsdp", ckpt_format="dcp", sample_prompts=[])
    d["stages"] = d["stages"][:1]
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 500), "-m", "evolm.cli", "pretrain",
                           "--config", str(recipe_path), "--out", str(tmp_path / "run"), "--stop-after", "3"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = tmp_path / "run" / "checkpoints" / "step_0000003"
    assert (step / "dcp" / "__1_0.distcp").is_file() and (step / "rank_00001.pt").is_file()
    from evolm.loading import load

    model, tok = load(str(step))  # what `evolm generate --model STEP` loads: the shards + the tokenizer
    assert tok.vocab_size == 300 and model.config.vocab_size == 300
    one = {**d, "train": {**d["train"], "micro_batch": 2, "distributed": "none"}}
    quiet = lambda s: None  # noqa: E731
    pretrain(recipe_from_dict(one), out_dir=str(tmp_path / "run"), resume=True, log=quiet)
    pretrain(recipe_from_dict(one), out_dir=str(tmp_path / "whole"), log=quiet)
    resumed, whole = _losses(tmp_path / "run"), _losses(tmp_path / "whole")
    assert len(resumed) == len(whole) == 6
    assert max(abs(a - b) / abs(b) for a, b in zip(resumed, whole)) < 1e-5
