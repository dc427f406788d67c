"""DeepSeek-V3's auxiliary-loss-free router bias update (arXiv:2412.19437 sec. 2.1.2) counts the
whole step: every micro-batch of gradient accumulation, summed across data-parallel ranks.

After each optimizer step every router's bias moves by ``gamma * sign(mean_load - load_i)``. The
load is a sum of token counts, so two processes that each see half of the global batch must
produce biases identical to each other and *exactly* equal to one process that sees the union of
both halves with the same micro-batching. Run as a script under ``torchrun`` (``_worker``), this
file is also the two-process side of that test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evolm import ModelConfig, build
from evolm.train.loop import LoopConfig, Phase, Runtime, run, update_moe_bias

ROOT = Path(__file__).resolve().parents[1]
RATE = 1e-3  # Router.update_bias's default gamma
PHASES = [Phase("moe", steps=4, accum=3)]


def _config() -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, norm="rmsnorm", pos_emb="rope",
                       max_seq_len=16, mlp="glu", activation="silu", mlp_bias=False, n_experts=8,
                       n_experts_per_tok=2, moe_d_ff=16, router="sigmoid", router_bias=True)


def _model():
    torch.manual_seed(0)
    return build(_config())


def _loop(mode: str = "none") -> LoopConfig:
    return LoopConfig(lr=1e-2, distributed=mode, log_every=1, eval_every=0, ckpt_every=0, grad_clip=1.0)


def _half(rank: int, i: int) -> torch.Tensor:
    """Micro-batch ``i`` of data-parallel rank ``rank``: 2 sequences of 12 (+1) tokens."""
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randint(0, 64, (2, 13), generator=g)


class ShardTask:
    """Rank ``rank``'s micro-batches (``ranks=(rank,)``), or the union of several ranks' micro-batch
    ``i`` as one micro-batch (``ranks=(0, 1)``): the global batch seen by one process."""

    def __init__(self, ranks: tuple[int, ...], world: int = 1):
        self.ranks, self.world, self.i = ranks, world, 0

    def start_phase(self, index, phase):
        pass

    def next_batch(self):
        self.i += 1
        return torch.cat([_half(r, self.i) for r in self.ranks])

    def loss(self, model, batch):
        return model(batch[:, :-1], targets=batch[:, 1:]), {"tokens": batch[:, :-1].numel()}

    def after_step(self, model):
        update_moe_bias(model, self.world)

    def evaluate(self, model):
        return {}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def _biases(model) -> torch.Tensor:
    return torch.stack([layer.mlp.gate.e_score_correction_bias.detach().clone() for layer in model.layers])


def _worker(out: str, mode: str) -> None:
    """One rank of the two-process run: train, then save this rank's biases and losses."""
    rt = Runtime.create(mode)
    model = _model()
    summary = run(model, ShardTask((rt.rank,), rt.world), PHASES, _loop(mode), Path(out) / "run", rt=rt,
                  log=lambda s: None)
    torch.save({"bias": _biases(model), "losses": summary["losses"]}, Path(out) / f"rank{rt.rank}.pt")


# --- one process, gradient accumulation ---------------------------------------------------------
def _routed_counts(model, batches: list[torch.Tensor]) -> torch.Tensor:
    """(layers, experts) tokens per expert over ``batches``, routed again from each MoE layer's
    input with the router alone (the model's own counters are not consulted)."""
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, []).append(a[0]))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        for b in batches:
            model(b[:, :-1])
    for h in hooks:
        h.remove()
    E = model.config.n_experts
    return torch.stack([sum(torch.bincount(layer.mlp.gate(x.reshape(-1, x.shape[-1]))[2].reshape(-1), minlength=E)
                            for x in inputs[i]) for i, layer in enumerate(model.layers)])


def test_bias_update_counts_every_micro_batch(tmp_path):
    model = _model()
    accum = PHASES[0].accum
    batches = [_half(0, i) for i in range(1, accum + 1)]
    ref = _model()  # the same weights and bias before the first step: route the step's micro-batches
    total = _routed_counts(ref, batches)
    last = _routed_counts(ref, batches[-1:])
    want = RATE * torch.sign(total.float().mean(-1, keepdim=True) - total.float())
    assert not torch.equal(want, RATE * torch.sign(last.float().mean(-1, keepdim=True) - last.float())), \
        "the data should tell the whole step from its last micro-batch"
    one_step = [Phase("moe", steps=1, accum=accum)]
    run(model, ShardTask((0,)), one_step, _loop(), tmp_path / "r", log=lambda s: None)
    torch.testing.assert_close(_biases(model), want, rtol=0, atol=0)
    assert all(layer.mlp.step_counts is None for layer in model.layers)  # reset for the next step


def test_eval_forwards_do_not_count():
    model = _model().eval()
    with torch.no_grad():
        model(_half(0, 1)[:, :-1])
    assert all(layer.mlp.step_counts is None for layer in model.layers)
    update_moe_bias(model)
    assert not _biases(model).any()  # no training forward: every load equal to the mean


# --- two processes on gloo equal one process over the union of their data ---------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_over_the_union(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29000 + os.getpid() % 500),
                           __file__, str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["bias"], r1["bias"])

    single = _model()
    summary = run(single, ShardTask((0, 1)), PHASES, _loop(), tmp_path / "single", log=lambda s: None)
    assert torch.equal(_biases(single), r0["bias"])
    assert _biases(single).abs().max() > 0 and len(torch.unique(_biases(single))) > 2  # it moved, unevenly
    assert max(abs(a - b) for a, b in zip(summary["losses"], r0["losses"])) < 1e-5


if __name__ == "__main__":
    _worker(*sys.argv[1:])
