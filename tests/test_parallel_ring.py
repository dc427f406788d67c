"""Context parallelism: ring attention (evolm/parallel/ring.py) equals full attention, and a model
trained with its sequence split over two gloo processes (evolm/parallel/context.py) follows the
one-process run.

The reference is evolm's own single-device attention (``nn/attention.attend`` over the mask that
``nn/masks.attention_mask`` plans for the whole sequence), which tests/test_attention.py checks
against transformers; here it is compared in float64, where the ring must agree to 1e-10.
"""

import pytest
import torch
import torch.distributed as dist

from ranks import run_ranks

from evolm.nn.attention import attend
from evolm.nn.masks import attention_mask
from evolm.parallel.ring import RingSpec, SequenceLayout, ring_attention

# ---------------------------------------------------------------------------------------------
# ring attention vs full attention


def _full_attention(q, k, v, scale, softcap, window, doc_ids, causal=True):
    T = q.shape[2]
    slots = torch.arange(T)
    mask = attention_mask(slots, slots, None, window, doc_ids, "causal" if causal else "bidirectional")
    if softcap is None:
        return attend(q, k, v, mask, False, scale)
    # attend's soft-capped path takes its softmax in float32 (as Gemma 2 does): written out in full precision here
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = softcap * torch.tanh(q @ k.transpose(-1, -2) * scale / softcap)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _inputs(T, H, Hkv, D, Dv, docs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(2, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(2, Hkv, T, Dv, generator=g, dtype=dtype)
    dout = torch.randn(2, H, T, Dv, generator=g, dtype=dtype)
    doc_ids = None
    if docs:  # rows of several documents of random lengths, differently in each row
        doc_ids = torch.cumsum(torch.rand(2, T, generator=g) < 0.15, dim=-1)
    return q, k, v, dout, doc_ids


def _ring_vs_full(rank, world, case):
    T, H, Hkv, D, Dv = case["T"], case["H"], case["Hkv"], case["D"], case.get("Dv", case["D"])
    dtype = case["dtype"]
    q, k, v, dout, doc_ids = _inputs(T, H, Hkv, D, Dv, case.get("docs", False), dtype)
    scale, softcap, window = case.get("scale", D ** -0.5), case.get("softcap"), case.get("window")
    causal = case.get("causal", True)
    # reference: full attention on every rank, its gradients
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = _full_attention(*ref, scale, softcap, window, doc_ids, causal)
    out_ref.backward(dout)
    layout = SequenceLayout(world, T, case.get("layout", "zigzag"))
    idx = layout.slots(rank)
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    stats = {}
    spec = RingSpec(dist.group.WORLD, layout, scale, softcap, window, causal, stats)
    out = ring_attention(*local, spec, doc_ids[:, idx] if doc_ids is not None else None)
    out.backward(dout[:, :, idx])
    diffs = {"out": (out - out_ref[:, :, idx]).abs().max().item()}
    for name, t, r in zip("qkv", local, ref):
        diffs["d" + name] = (t.grad - r.grad[:, :, idx]).abs().max().item()
    return diffs, stats


CASES = {
    "causal-mha": dict(T=32, H=4, Hkv=4, D=8),
    "causal-gqa": dict(T=32, H=4, Hkv=2, D=8),
    "causal-mqa-softcap-scale": dict(T=32, H=4, Hkv=1, D=8, softcap=5.0, scale=0.3),
    "window-gqa": dict(T=48, H=4, Hkv=2, D=8, window=7),
    "window-long": dict(T=48, H=2, Hkv=1, D=8, window=20),
    "docs-gqa": dict(T=48, H=4, Hkv=2, D=8, docs=True),
    "docs-window": dict(T=48, H=4, Hkv=2, D=8, docs=True, window=9),
    "mla-shaped-v": dict(T=32, H=4, Hkv=4, D=12, Dv=8),
    "bidirectional-window": dict(T=32, H=2, Hkv=2, D=8, causal=False, window=10),
    "contiguous-layout": dict(T=32, H=4, Hkv=2, D=8, layout="contiguous", window=9),
    "striped-layout": dict(T=32, H=4, Hkv=2, D=8, layout="striped", docs=True),
}


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_full_attention_float64(world):
    """Outputs and the gradients of q, k and v, for every case, at cp = 2 and 4 (float64: < 1e-10)."""
    cases = {name: dict(c, dtype=torch.float64) for name, c in CASES.items()}
    results = run_ranks(world, _ring_many, cases)
    for name in cases:
        worst = max(max(r[name][0].values()) for r in results)
        assert worst < 1e-10, (name, [r[name][0] for r in results])


def test_ring_attention_float32():
    """The same in float32 (< 1e-5), causal GQA with a window and documents, cp = 2."""
    cases = {"f32": dict(T=64, H=4, Hkv=2, D=16, window=13, docs=True, dtype=torch.float32),
             "f32-causal": dict(T=64, H=4, Hkv=2, D=16, dtype=torch.float32)}
    results = run_ranks(2, _ring_many, cases)
    for name in cases:
        worst = max(max(r[name][0].values()) for r in results)
        assert worst < 1e-5, (name, [r[name][0] for r in results])


def _ring_many(rank, world, cases):
    return {name: _ring_vs_full(rank, world, case) for name, case in cases.items()}


def test_zigzag_balances_causal_work():
    """Zigzag: every rank computes 2N + 1 chunk pairs and the same number of query-key pairs; the
    contiguous split gives the last rank the most (the imbalance the zigzag layout removes)."""
    case = dict(T=64, H=2, Hkv=1, D=8, dtype=torch.float64)
    for world in (2, 4):
        runs = run_ranks(world, _ring_many, {"zigzag": case, "contiguous": dict(case, layout="contiguous")})
        zig, cont = [r["zigzag"][1] for r in runs], [r["contiguous"][1] for r in runs]
        assert [s["blocks"] for s in zig] == [2 * world + 1] * world
        assert len({s["pairs"] for s in zig}) == 1
        assert [s["blocks"] for s in cont] == list(range(1, world + 1))
        assert cont[-1]["pairs"] > zig[0]["pairs"] > cont[0]["pairs"]


def test_layouts_hold_every_slot_once_and_refuse_bad_lengths():
    for kind in ("zigzag", "contiguous", "striped"):
        layout = SequenceLayout(4, 32, kind)
        slots = torch.cat([layout.slots(r) for r in range(4)])
        assert sorted(slots.tolist()) == list(range(32))
    assert SequenceLayout(2, 16).slots(1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert SequenceLayout(2, 16).slots(0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="multiple of 8"):
        SequenceLayout(4, 36)
    with pytest.raises(ValueError, match="layout 'ring'"):
        SequenceLayout(2, 16, "ring")
