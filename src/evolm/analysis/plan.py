"""The memory planner: what one GPU holds to train (or serve) a config under a parallel layout.

Part of the cost card (``analysis/cost.py``, whose parameter, FLOP and KV-cache counts it reuses):
before a run, ``evolm arch plan llama-3-8b --gpus 8 --gpu-mem 80GB --seq 8192`` says, per GPU, the
bytes of parameters, gradients, optimizer state, activations of one micro batch (with and without
activation checkpointing), the transient buffers of FSDP and of the loss, and the KV cache at
inference; then which layouts fit, ranked by an estimate of their communication. The figures are
checked against tensors measured on CPU (tests/test_plan.py; docs/distributed.md has the table).

Layout ``{dp_replicate, dp_shard, cp, tp, pp, ep}`` (torchtitan's mesh; the world is
``dp_replicate * dp_shard * cp * tp * pp``, and ``ep`` borrows its ranks from ``dp_shard * cp``
as torchtitan's expert parallelism does, so it must divide that product and be a multiple of cp):
  dp_shard (FSDP2, Zhao et al. 2023, arXiv:2304.11277) shards parameters, gradients and optimizer
  state over ``dp_shard * cp`` ranks (evolm's expert parallelism leaves the experts out of FSDP:
  each rank holds ``n_experts / ep`` of them whole, parallel/expert.py); dp_replicate keeps
  whole copies (HSDP; with dp_shard = 1 it is DDP, whose gradient buckets hold a second copy of
  the gradients). tp (Megatron, Shoeybi et al. 2019, arXiv:1909.08053) splits attention heads,
  MLP widths, the vocabulary of the embedding and LM head (vocab-parallel) and the dense experts;
  norms, routers and MLA's down-projections stay whole. With sequence parallelism (Korthikanti
  et al. 2022, arXiv:2205.05198) the activations between blocks are split over the sequence too;
  only the inputs the column-parallel projections gather back to the whole sequence stay whole.
  pp splits the layers into contiguous stages as parallel/pipeline.py does (``split_layers``;
  embeddings on the first, final norm, head and loss on the last, a tied embedding on both); under 1F1B stage s holds ``min(pp - s, microbatches)`` micro batches of
  activations, under GPipe all of them; FSDP under pp keeps a stage's parameters gathered through
  the step (parallel/pipeline.py). cp splits every activation along the sequence. ep splits the
  routed experts. Under tp the loss is parallel/tensor.py's vocab-parallel one (fp32 logits of the
  whole sequence over V/tp columns), not the fused chunked loss.
  The layout itself is ``evolm.parallel.layout.ParallelLayout``, read and checked by its rules.

Precision (state the convention: ``Precision``):
  ``bf16`` is evolm's trainer (``train.dtype: bfloat16``): fp32 parameters, which are the master
  weights (no separate copy), autocast to bf16 for matmuls; fp32 gradients and fp32 AdamW moments:
  16 bytes per parameter, sharded. Autocast makes a bf16 copy of each weight per matmul, and the
  backward needs it, so the forward keeps bf16 copies of every (gathered) weight it used: counted
  as ``autocast_weight_copies``. The residual stream stays fp32 (fp32 embedding + bf16 branch).
  ``bf16-params`` is torchtitan's FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``:
  the same 16 sharded bytes per parameter, but the gathered parameters and every activation are bf16.
  ``fp32``: everything in fp32. AdamW keeps two moments in the parameter's dtype; SGD one (momentum).

Activations are counted as what autograd saves for the backward (the unique storages), per layer
kind, from evolm's own code: a norm keeps its fp32 input and its normalised output; each linear
its input (under autocast a separate bf16 copy per consumer when the producer is fp32); SDPA
(flash / CPU flash) q, k, v, output and the fp32 log-sum-exp, plus a float copy of the mask for a
masked layer (sliding windows shorter than the sequence, documents); soft-capped attention
materialises the T x T scores; a gated MLP four ``d_ff`` vectors per token; an MoE layer the
router's scores, the k copies of each token sent to experts, their expert MLP activations and the
k outputs; MLA its low-rank latents, the re-expanded keys/values and the concatenated q/k. The
loss is evolm's fused chunked cross-entropy (``nn/loss.py``): it keeps the gradient of the final
states (N x d) and of the head (V x d, fp32) from the forward, and a chunk of logits as workspace;
``loss="unfused"`` is a plain ``cross_entropy(logits.float())`` (torchtitan's), which keeps N x V
fp32 log-probabilities. Activation checkpointing (per block, as ``train/parallel.py``) keeps each
block's input and recomputes one block at a time in the backward.

The peak is the sum of the resident terms and the largest transient one. It is an upper bound:
gradients grow while activations are freed in the backward.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from evolm.analysis import cost
from evolm.config import ModelConfig
from evolm.parallel.layout import FIELDS, LayoutError, ParallelLayout, layout_from_dict

def fsdp_degree(layout: ParallelLayout) -> int:
    """Ranks a dense parameter is sharded over: dp_shard x cp (the layout's ``dp_shard_cp``)."""
    return layout.dp_shard * layout.cp


def layout_text(layout: ParallelLayout) -> str:
    """``dp_shard=4,tp=2``: the --layout spelling of a (resolved) layout."""
    return ",".join(f"{k}={getattr(layout, k)}" for k in FIELDS if getattr(layout, k) != 1) or "dp_shard=1"


def parse_layout(text: str | None, gpus: int) -> ParallelLayout:
    """``"dp_shard=8,tp=1"`` -> the resolved ``ParallelLayout`` (parallel/layout.py: the same rules as a
    recipe's ``parallel:`` section; one field may be -1, dp_shard by default, "the GPUs left").
    Errors name the key and what was expected."""
    if gpus < 1:
        raise LayoutError(f"--gpus must be a positive integer, got {gpus}")
    values: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise LayoutError(f"--layout: {item!r} is not KEY=N (expected e.g. dp_shard=4,tp=2; keys: {', '.join(FIELDS)})")
        key, _, val = (part.strip() for part in item.partition("="))
        if key in values:
            raise LayoutError(f"--layout: {key} is given twice")
        if not re.fullmatch(r"-?\d+", val):
            raise LayoutError(f"--layout: {key}={val!r}: expected a positive integer (or -1: the GPUs left)")
        values[key] = int(val)
    layout = layout_from_dict(values, where="--layout")
    try:
        return layout.resolve(gpus)
    except LayoutError as e:
        raise LayoutError(f"--layout on --gpus {gpus}: {e}".replace("processes were started (WORLD_SIZE)",
                                                                     "GPUs were given (--gpus)")) from None


def check_layout(c: ModelConfig, layout: ParallelLayout, seq: int) -> None:
    """Whether the model can be split this way (clear message otherwise)."""
    L = layout
    if L.tp > 1:
        heads = [c.n_heads] + ([c.n_kv_heads] if c.attention == "mha" else [])
        if any(h % L.tp for h in heads):
            raise ValueError(f"tp={L.tp} must divide the attention heads ({c.n_heads} query, "
                             f"{c.n_kv_heads} key/value heads)")
    if L.pp > c.n_layers:
        raise ValueError(f"pp={L.pp} exceeds the {c.n_layers} layers")
    if seq % L.cp:
        raise ValueError(f"cp={L.cp} must divide --seq {seq}")
    if L.ep > 1 and (c.n_experts == 0 or c.n_experts % L.ep):
        raise ValueError(f"ep={L.ep} needs routed experts divisible by it (the model has {c.n_experts})")


# --- precision -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bytes per value of each kind of tensor (see the module docstring)."""
    name: str
    param: int          # the stored (sharded) parameters: the master weights
    grad: int           # gradients
    moment: int         # each optimizer moment
    gather: int         # the parameters as FSDP gathers them and the forward reads them
    compute: int        # matmul inputs/outputs
    autocast: bool      # fp32 weights autocast to bf16 (bf16 weight copies kept for the backward)

    @property
    def resid(self) -> int:
        """The residual stream: the embedding's dtype (fp32 + a bf16 branch stays fp32)."""
        return self.gather


PRECISIONS = {
    "bf16": Precision("bf16 autocast, fp32 params (evolm)", 4, 4, 4, 4, 2, True),
    "bf16-params": Precision("bf16 params via FSDP MixedPrecisionPolicy (torchtitan)", 4, 4, 4, 2, 2, False),
    "fp32": Precision("fp32", 4, 4, 4, 4, 4, False),
}
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}


# --- parameters per layer (the cost card's counts, split by layer) -------------------------------
def _supported(c: ModelConfig) -> None:
    kinds = {c.layer_mixer(i) for i in range(c.n_layers)}
    if c.encoder_layers or c.vision is not None or kinds - {"mha", "mla"} or c.head != "lm":
        raise ValueError(f"{c.name}: the planner models decoder-only attention models (MHA/GQA/MQA, MLA, "
                         f"MoE); this one has mixers {sorted(kinds)}, encoder_layers={c.encoder_layers}, "
                         f"vision={'yes' if c.vision else 'no'}, head={c.head!r}")


def layer_params(c: ModelConfig, i: int) -> dict[str, int]:
    """Parameters of block i by part, from the cost card's per-part sizes (``cost.param_counts``
    sums the same over the layers): attention, attention_down (MLA's q_a/kv_a, kept whole under
    tp), mlp, experts, shared_experts, router, norms."""
    attn, attn_norms = cost._attention_size(c)
    down = 0
    if c.attention == "mla":
        b = 1 if c.qkv_bias else 0
        down = (c.d_model + b) * (c.kv_lora_rank + c.qk_rope_head_dim)
        if c.q_lora_rank is not None:
            down += c.d_model * c.q_lora_rank + b * c.q_lora_rank
    p = dict(attention=attn - down, attention_down=down, mlp=0, experts=0, shared_experts=0, router=0,
             norms=attn_norms + cost._BLOCK_NORMS[c.norm_placement] * cost._norm_size(c, c.d_model))
    if c.layer_is_moe(i):
        p["router"] = c.n_experts * c.d_model
        p["experts"] = c.n_experts * (3 if c.mlp == "glu" else 2) * c.d_model * c.moe_d_ff
        if c.n_shared_experts:
            p["shared_experts"] = cost._mlp_size(c, c.moe_d_ff * c.n_shared_experts)
    else:
        p["mlp"] = cost._mlp_size(c, c.d_ff)
    if i == 0 and not c.first_attn_norm:
        p["norms"] -= cost._norm_size(c, c.d_model)
    return p


def outer_params(c: ModelConfig) -> dict[str, int]:
    """Parameters outside the blocks: embeddings, final norm, LM head (0 when tied)."""
    parts = cost.param_counts(c)
    final = (c.final_norm + c.embed_norm) * cost._norm_size(c, c.d_model)
    return {"embeddings": parts["embeddings"], "final_norm": final, "lm_head": parts["lm_head"]}


def stages(c: ModelConfig, pp: int) -> list[range]:
    """The layer ranges of the pp stages: parallel/pipeline.py's own split (``balance="params"``:
    the costliest stage minimised, the LM head counted on the last), cached per config."""
    if pp == 1:
        return [range(c.n_layers)]
    key = (json.dumps(c.to_dict(), sort_keys=True, default=str), pp)
    if key not in _STAGES:
        from evolm.parallel.pipeline import split_layers

        _STAGES[key] = split_layers(c, pp)
    return _STAGES[key]


_STAGES: dict[tuple, list[range]] = {}


def _tp_split(part: str, layout: ParallelLayout) -> int:
    """The divisor tp (or ep) applies to a part of the parameters."""
    if part == "experts":
        return layout.ep if layout.ep > 1 else layout.tp
    if part in ("attention", "mlp", "shared_experts", "embeddings", "lm_head"):
        return layout.tp
    return 1  # norms, router, MLA down-projections


def stage_params(c: ModelConfig, layout: ParallelLayout, s: int) -> dict[str, float]:
    """Parameters stage s of this GPU holds after the tp/ep/pp split, before FSDP sharding."""
    layers = stages(c, layout.pp)[s]
    tot: dict[str, float] = {}
    for i in layers:
        for k, v in layer_params(c, i).items():
            tot[k] = tot.get(k, 0) + v / _tp_split(k, layout)
    outer = outer_params(c)
    first, last = s == 0, s == layout.pp - 1
    tot["embeddings"] = outer["embeddings"] / layout.tp if first else 0
    tot["final_norm"] = outer["final_norm"] if last else 0
    head = outer["lm_head"] or (c.vocab_size * c.d_model if layout.pp > 1 else 0)  # a tied head: a copy on the last stage
    tot["lm_head"] = head / layout.tp if last else 0
    return tot


# --- activations ---------------------------------------------------------------------------
def _norm(dim: int, b_in: int, P: Precision, c: ModelConfig, rms: bool = False) -> tuple[float, int]:
    """(bytes saved per token, output dtype bytes) of one norm over ``dim`` on a ``b_in``-byte input
    (``rms``: a plain RMSNorm whatever the config says, as MLA's latent norms are)."""
    if c.norm == "layernorm" and not rms:  # F.layer_norm keeps its (fp32 under autocast) input, mean and rstd
        b = 4 if P.autocast else b_in
        return b * dim + 8, b
    if c.norm_unit_offset and not rms:  # Gemma: xf and xf * rsqrt, both fp32; casts back to the input dtype
        return 8 * dim + 4, b_in
    # xf = x.float() (x itself when fp32), rsqrt, and weight * xn with xn in the input's dtype
    return 4 * dim + b_in * dim + 4, max(b_in, P.gather)


def _linear_inputs(dim: int, b_out: int, consumers: int, P: Precision) -> float:
    """Bytes per token the ``consumers`` linears reading one tensor keep: the tensor itself when it
    is already in the compute dtype, else (autocast) one bf16 copy each."""
    return P.compute * dim * (1 if b_out == P.compute else consumers)


def _attention_core(c: ModelConfig, P: Precision, T: int, masked: bool, cpu: bool = False) -> dict[str, float]:
    """Bytes per token of the score computation and its output projection's input. CUDA's flash and
    memory-efficient kernels write their output (B, T, H, d)-contiguous, so o_proj reads it as it is;
    the CPU flash kernel writes (B, H, T, d), and o_proj keeps a transposed copy (``cpu``)."""
    cb = P.compute
    if c.attention == "mla":
        dqk, dv, H = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, c.n_heads
        k_bytes = cb * H * dqk  # k = cat(k_nope, k_rot): every head
        v_bytes = 0.0  # v is a view of kv_b's output, counted with MLA's projections
    else:
        dqk = dv = c.head_dim
        H = c.n_heads
        k_bytes = v_bytes = cb * c.n_kv_heads * c.head_dim
    out = {"q": cb * H * dqk, "k": k_bytes, "v": v_bytes, "attn_out": cb * H * dv, "lse": 4 * H}
    if cpu and dqk != dv:  # MLA on CPU: no fused kernel takes q/k and v of different widths, so the
        # math path runs, in fp32 whatever the input: q, k, a contiguous v, the T x T probabilities
        return {"q": 4 * H * dqk, "k": 4 * H * dqk, "v": 4 * H * dv, "scores": 4 * H * T, "attn_out": cb * H * dv}
    if c.attn_softcap is not None:  # the math path: T x T scores, tanh, softmax, probabilities
        rep = c.attention == "mha" and c.n_kv_heads != H
        if rep:  # keys/values repeated to every head
            out["k"] = out["v"] = cb * H * c.head_dim
        out["scores"] = T * H * (cb + 4 + (cb if cb != 4 else 0)) + T  # + the causal bool mask
        out["lse"] = 0
        out["attn_out"] *= 2  # its (B, H, T, d) output and o_proj's transposed copy
    elif cpu:
        out["attn_out"] *= 2
    return out


def layer_activations(c: ModelConfig, i: int, P: Precision, T: int, cpu: bool = False, ep: int = 1) -> dict[str, float]:
    """Bytes per token that block i keeps for the backward, by part (no tp/cp division; the masks,
    per sequence, are :func:`_mask_bytes`). ``cpu``: the CPU attention kernel's layout."""
    d, cb = c.d_model, P.compute
    r = P.resid
    acts: dict[str, float] = {}
    placement = c.norm_placement
    if placement not in ("pre", "sandwich", "olmo2", "post", "parallel", "parallel2"):
        raise ValueError(f"norm_placement {placement!r}: not modelled")
    # the mixer's input norm
    n_saved, n_out = _norm(d, r, P, c) if placement != "olmo2" else (0, r)
    acts["norms"] = n_saved
    # attention projections
    if c.attention == "mla":
        acts["qkv_inputs"] = _linear_inputs(d, n_out, 2, P)  # q_proj (or q_a_proj) and kv_a_proj
        acts["mla_latents"] = 0
        for rank in ([c.q_lora_rank] if c.q_lora_rank is not None else []) + [c.kv_lora_rank]:
            s, o = _norm(rank, cb, P, c, rms=True)  # q_a_layernorm, kv_a_layernorm
            acts["mla_latents"] += s + _linear_inputs(rank, o, 1, P)
        math = cpu and c.qk_nope_head_dim + c.qk_rope_head_dim != c.v_head_dim  # see _attention_core
        acts["mla_kv"] = 0 if math else cb * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b's output (v: a view)
    else:
        acts["qkv_inputs"] = _linear_inputs(d, n_out, 3, P)
        qk = c.layer_qk_norm(i)
        if qk in ("head", "full"):
            hq, hk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            acts["qk_norm"] = _norm(hq, cb, P, c)[0] + _norm(hk, cb, P, c)[0] - 8 + \
                (4 * (c.n_heads + c.n_kv_heads) if qk == "head" else 0)  # rsqrt per head
    window = c.layer_kv_span(i)
    acts.update(_attention_core(c, P, T, window is not None and window < T, cpu))
    if placement in ("sandwich", "olmo2"):  # a norm on the branch's (compute-dtype) output
        acts["norms"] += _norm(d, cb, P, c)[0]
    # the channel part
    if placement in ("pre", "sandwich", "post", "parallel2"):
        s, m_out = _norm(d, r, P, c)
        acts["norms"] += s
    else:
        m_out = n_out if placement == "parallel" else r
    glu = c.mlp == "glu"
    if c.layer_is_moe(i):
        k, E, f = c.n_experts_per_tok, c.n_experts, c.moe_d_ff
        # the router reads x.float(): a bf16 copy under autocast, else an fp32 tensor (the norm's
        # output itself in fp32, which the shared experts then share)
        router_in = cb * d if P.autocast else 4 * d
        scores = 4 * E * (2 if c.moe_aux_loss_coef or c.moe_z_loss_coef else 1)
        G = c.n_expert_groups
        groups = (16 * G + E) if G > 1 else 0  # the groups' top-2 indices, the experts' keep mask
        acts["router"] = router_in + scores + groups + 36 * k + 4  # top-k indices, order, token ids, weights
        acts["expert_inputs"] = cb * k * d  # the k copies of each token sent to its experts
        acts["expert_mlp"] = k * cb * f * (4 if glu else 2)
        if ep > 1:  # parallel/expert.py: the rows received by all-to-all, their outputs, the rows sent back
            acts["ep_dispatch"] = 3 * k * d * cb
        # the expert outputs and the router weights (their product's inputs), and the product
        # (index_add_ keeps its source), in the residual dtype
        acts["expert_outputs"] = k * d * (cb + P.resid) + 4 * k
        if c.n_shared_experts:
            fs = f * c.n_shared_experts
            shared_in = 0 if cb == 4 else _linear_inputs(d, m_out, 2 if glu else 1, P)
            acts["shared_expert_inputs"] = shared_in
            acts["shared_experts"] = cb * fs * (4 if glu else 2)
    else:
        shared_norm = placement == "parallel" and m_out == cb  # the q/k/v inputs' storage, counted there
        acts["mlp_inputs"] = 0 if shared_norm else _linear_inputs(d, m_out, 2 if glu else 1, P)
        acts["mlp"] = cb * c.d_ff * (4 if glu else 2)
    if placement in ("sandwich", "olmo2"):
        acts["norms"] += _norm(d, cb, P, c)[0]
    return acts


def _mask_bytes(c: ModelConfig, layers: range, P: Precision, T: int) -> tuple[float, float]:
    """(float masks, boolean masks) of one sequence: SDPA converts a boolean mask to a float one of
    the query's dtype per masked layer and keeps it; the boolean masks, one per window, are shared
    by the layers (and kept by activation checkpointing as block inputs)."""
    masked = [i for i in layers if c.layer_kv_span(i) is not None and c.layer_kv_span(i) < T
              and c.attn_softcap is None]
    kinds = {c.layer_kv_span(i) for i in masked}
    return len(masked) * T * T * P.compute, len(kinds) * T * T


def _rope_bytes(c: ModelConfig, P: Precision) -> float:
    """cos/sin tables per token (one pair per RoPE base), in the residual dtype."""
    if c.pos_emb != "rope":
        return 0
    bases = 2 if (c.rope_local_theta is not None or c.rope_local_scaling is not None) else 1
    return bases * 2 * (c.rotary_dim // 2) * P.resid


def loss_bytes(c: ModelConfig, P: Precision, tokens: int, tp: int, loss: str, chunk: int | None = None
               ) -> tuple[dict[str, float], dict[str, float]]:
    """(kept for the backward, workspace) of the loss over ``tokens`` tokens of this rank."""
    V, d = c.vocab_size / tp, c.d_model
    _, h_out = _norm(d, P.resid, P, c) if c.final_norm else (0, P.resid)
    if tp > 1 and loss == "fused":  # parallel/tensor.py's vocab-parallel loss over the whole sequence
        # and this rank's V/tp columns: the fp32 exponentials and one-hot targets kept
        kept = {"vocab_parallel_logits": 8 * tokens * V, "gathered_hidden": _linear_inputs(d, h_out, 1, P) * tokens}
        if P.autocast:  # the head's bf16 copy, saved by its matmul
            kept["head_cast"] = V * d * P.compute
        return kept, {"logit_grads": 8 * tokens * V}
    if loss == "unfused":  # logits in the compute dtype, log-softmax kept in fp32; backward makes two more
        return {"log_probs": 4 * tokens * V, "final_hidden": _linear_inputs(d, h_out, 1, P) * tokens}, \
               {"logit_grads": (4 + P.compute) * tokens * V}
    rows = min(chunk or (4096 // (8 * P.compute) * 8), tokens)
    low, one_chunk = P.compute != 4, tokens <= rows
    kept = {"grad_hidden": h_out * tokens * d, "grad_head": V * d * (P.compute if (low and one_chunk) else 4)}
    work = {"logits_chunk": rows * V * P.compute}
    if low:
        work["fp32_rows"] = min(64 << 20, rows * V * 4)
        work["grad_hidden_chunk"] = rows * d * P.compute
        if not one_chunk:  # with one chunk the product is the kept gradient itself
            work["head_grad_product"] = V * d * P.compute
    if P.gather != P.compute:
        work["head_cast"] = V * d * P.compute
    return kept, work


# --- the plan ------------------------------------------------------------------------------
_TP_WHOLE = ("qkv_inputs", "mlp_inputs", "router", "mla_latents", "expert_inputs", "expert_outputs",
             "shared_expert_inputs", "ep_dispatch")


def _stage_activations(c, layout: ParallelLayout, s: int, P: Precision, seq: int, batch: int, loss: str,
                       checkpointing: bool, cpu: bool = False) -> dict[str, float]:
    """Bytes of one micro batch's activations on stage s of one GPU."""
    T_local = seq // layout.cp
    N = batch * T_local  # tokens of this rank
    tp = layout.tp
    layers = stages(c, layout.pp)[s]
    per_layer = []
    for i in layers:
        a = layer_activations(c, i, P, seq, cpu, layout.ep)
        # under tp (with sequence parallelism) everything splits, except what a module computes on the
        # gathered sequence at full width (parallel/tensor.py): linear inputs, MLA's replicated latent
        # path, the MoE router, the k copies of each token and their (partial) outputs
        whole = sum(v for k, v in a.items() if k in _TP_WHOLE)
        split = sum(a.values()) - whole
        per_layer.append(N * (whole + split / tp))
    out: dict[str, float] = {}
    fmask, bmask = _mask_bytes(c, layers, P, seq)
    masks = fmask * batch / layout.cp / tp
    if checkpointing:
        out["block_inputs"] = len(layers) * N * c.d_model * P.resid / tp
        out["recompute_one_block"] = max(per_layer, default=0)
        out["masks"] = bmask / layout.cp + masks / max(1, len(layers))  # one layer's float copy at a time
    else:
        out["blocks"] = sum(per_layer)
        out["masks"] = masks
    out["rope_tables"] = N * _rope_bytes(c, P)
    if P.autocast:  # bf16 copies of the gathered weights the forward used: saved for the backward, and
        # under checkpointing still held by autocast's cache of weight casts until the forward ends
        # autocast caches the casts of leaf parameters only: a routed expert's slice of the stacked
        # weights is a view, so its cast is kept only as a saved tensor, not under checkpointing
        skip = ("norms", "experts") if checkpointing else ("norms",)
        lin = [sum(v / _tp_split(k, layout) for k, v in layer_params(c, i).items() if k not in skip) for i in layers]
        out["autocast_weight_copies"] = P.compute * sum(lin)  # kept for the backward, or by autocast's cache
    if s == 0:
        out["token_ids"] = 8 * N
    if s == layout.pp - 1:
        out["final_norm"] = N * _norm(c.d_model, P.resid, P, c)[0] / tp if c.final_norm else 0
        kept, _ = loss_bytes(c, P, N, tp, loss)
        out.update({f"loss_{k}": v for k, v in kept.items()})
    return out


def _in_flight(layout: ParallelLayout, s: int, microbatches: int, schedule: str) -> int:
    if layout.pp == 1:
        return 1
    return microbatches if schedule == "gpipe" else min(layout.pp - s, microbatches)


def plan(config: ModelConfig | str, layout: ParallelLayout | str | None = None, *, gpus: int = 1, seq: int | None = None,
         batch: int = 1, gpu_mem: float | None = None, dtype: str = "bf16", optimizer: str = "adamw",
         activation_checkpointing: bool = False, loss: str = "fused", microbatches: int | None = None,
         schedule: str = "1f1b", device: str = "gpu") -> dict[str, Any]:
    """Per-GPU bytes of training ``config`` under ``layout`` (the busiest pipeline stage), with and
    without activation checkpointing, and of serving it (weights + KV cache at ``seq`` x ``batch``).

    ``batch``: sequences per micro batch per data-parallel rank; ``microbatches``: per step on the
    pipeline (default pp). ``device="cpu"``: the CPU attention kernel's layout (what the tests
    measure). All values are plain numbers (JSON-serialisable)."""
    c = cost._as_config(config)
    _supported(c)
    layout = parse_layout(layout, gpus) if layout is None or isinstance(layout, str) else layout
    if layout.world != gpus:
        raise LayoutError(f"layout {layout_text(layout)} spans {layout.world} GPUs, but gpus={gpus}")
    seq = c.max_seq_len if seq is None else int(seq)
    if seq <= 0 or batch <= 0:
        raise ValueError(f"seq and batch must be positive, got seq={seq}, batch={batch}")
    check_layout(c, layout, seq)
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZER_MOMENTS)}")
    if loss not in ("fused", "unfused"):
        raise ValueError(f"loss {loss!r}: expected fused (evolm's) or unfused")
    P = PRECISIONS[dtype]
    mb = layout.pp if microbatches is None else int(microbatches)
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device {device!r}: expected gpu or cpu")
    per_stage = [_plan_stage(c, layout, s, P, seq, batch, optimizer, loss, mb, schedule, device == "cpu")
                 for s in range(layout.pp)]
    worst = max(range(layout.pp), key=lambda s: per_stage[s]["peak"][activation_checkpointing])
    st = per_stage[worst]
    card = cost.cost_card(c, context_len=seq)
    infer = inference_bytes(c, layout, seq, batch, P.compute)
    out = {
        "name": c.name, "layout": layout.to_dict(), "layout_text": layout_text(layout), "gpus": gpus,
        "seq": seq, "batch": batch, "microbatches": mb, "schedule": schedule, "dtype": dtype,
        "precision": P.name, "optimizer": optimizer, "loss": loss,
        "activation_checkpointing": activation_checkpointing, "gpu_mem": gpu_mem,
        "params_total": card["params_total"], "stage": worst,
        "params_local": st["params_local"],
        "bytes": st["bytes"],
        "activations": st["activations"][False], "activations_checkpointed": st["activations"][True],
        "activation_parts": st["activation_parts"][activation_checkpointing],
        "transient": st["transient"],
        "peak": st["peak"][activation_checkpointing],
        "peak_without_checkpointing": st["peak"][False], "peak_with_checkpointing": st["peak"][True],
        "inference": infer,
        "kv_cache_bytes_per_token": infer["kv_cache_per_token"],
    }
    if gpu_mem:
        out["fits"] = out["peak"] <= gpu_mem
    return out


def _plan_stage(c, layout, s, P, seq, batch, optimizer, loss, mb, schedule, cpu) -> dict[str, Any]:
    params = stage_params(c, layout, s)
    expert = params.get("experts", 0)
    dense = sum(params.values()) - expert
    # with ep > 1 the experts (already split over ep) are left out of FSDP and replicated over the
    # other data-parallel ranks (parallel/expert.py); without, FSDP shards them like the rest
    shard_dense = fsdp_degree(layout)
    shard_expert = 1 if layout.ep > 1 else shard_dense
    local = dense / shard_dense + expert / shard_expert
    b = {"params": local * P.param, "grads": local * P.grad,
         "optimizer": local * P.moment * OPTIMIZER_MOMENTS[optimizer]}
    if layout.dp_replicate > 1 and shard_dense == 1:
        b["ddp_grad_buckets"] = local * P.grad
    if layout.tp > 1 and shard_dense == 1 and s == 0 and not c.tie_embeddings:  # measured: an untied
        # vocab-parallel embedding's gradient comes back Replicate (whole on every tp rank)
        b["tp_embedding_grad_whole"] = params["embeddings"] * (layout.tp - 1) * P.grad
    # FSDP2: a block's parameters gathered (the next one prefetched) and its unsharded gradients
    # before the reduce-scatter; the root module (embeddings, final norm, head) stays gathered from
    # its forward to its backward; under pp every block stays gathered (reshard_after_forward=False,
    # parallel/pipeline.py), so a stage holds all its parameters whole through the step
    transient: dict[str, float] = {}
    if shard_dense > 1:
        skip = ("experts",) if layout.ep > 1 else ()
        blocks = [sum(v / _tp_split(k, layout) for k, v in layer_params(c, i).items() if k not in skip)
                  for i in stages(c, layout.pp)[s]]
        big = max(blocks, default=0)
        root = params["embeddings"] + params["final_norm"] + params["lm_head"]
        transient["fsdp_gather"] = (2 * big if layout.pp == 1 else 0) * P.gather + big * P.grad
        gathered = root + (sum(blocks) if layout.pp > 1 else 0)
        b["fsdp_gathered" if layout.pp > 1 else "fsdp_root_gathered"] = gathered * P.gather * (1 - 1 / shard_dense)
    n_in = _in_flight(layout, s, mb, schedule)
    acts, parts = {}, {}
    for ac in (False, True):
        a = _stage_activations(c, layout, s, P, seq, batch, loss, ac, cpu)
        parts[ac] = {k: v * n_in for k, v in a.items()} if n_in > 1 else a
        if n_in > 1 and ac:  # only one block is recomputed at a time, whatever the micro batches
            parts[ac]["recompute_one_block"] = a["recompute_one_block"]
        if n_in > 1 and "autocast_weight_copies" in a:  # the step's one autocast context caches one
            parts[ac]["autocast_weight_copies"] = a["autocast_weight_copies"]  # cast per weight
        acts[ac] = sum(parts[ac].values())
    if s == layout.pp - 1:
        _, work = loss_bytes(c, P, batch * seq // layout.cp, layout.tp, loss)
        transient["loss_workspace"] = sum(work.values())
    resident = sum(b.values())
    peak = {ac: resident + acts[ac] + max(transient.values(), default=0) for ac in (False, True)}
    return {"params_local": local, "bytes": b, "activations": acts, "activation_parts": parts,
            "transient": transient, "peak": peak}


def inference_bytes(c: ModelConfig, layout: ParallelLayout, seq: int, batch: int, bytes_per_value: int = 2) -> dict[str, float]:
    """Serving on this layout's model-parallel group (tp x pp x ep; no FSDP): bf16 weights and the
    KV cache of ``batch`` sequences of ``seq`` tokens (the cost card's per-layer cache, split over
    key/value heads by tp, layers by pp, the sequence by cp)."""
    per_layer = cost.kv_values_per_token(c) * bytes_per_value
    kv_tp = min(layout.tp, c.n_kv_heads) if c.attention == "mha" else 1  # MLA's latent is shared by the heads
    stage_kv, stage_w = [], []
    for s, layers in enumerate(stages(c, layout.pp)):
        toks = sum(seq if c.layer_kv_span(i) is None else min(seq, c.layer_kv_span(i)) for i in layers)
        stage_kv.append(batch * per_layer * toks / kv_tp / layout.cp)
        p = stage_params(c, layout, s)
        stage_w.append((sum(p.values()) - p["experts"] + p["experts"] / (layout.ep if layout.ep > 1 else 1))
                       * bytes_per_value)
    per_token = per_layer * sum(1 for i in range(c.n_layers) if not c.layer_is_recurrent(i)) / kv_tp
    return {"weights": max(stage_w), "kv_cache": max(stage_kv), "kv_cache_per_token": per_token,
            "kv_cache_total": cost.kv_cache_bytes(c, seq, bytes_per_value, batch)}


# --- layouts that fit ----------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """The figures the communication estimate uses (H100 SXM nodes of 8: NVLink 4 at 450 GB/s each
    way, one 400 Gb/s NIC per GPU; 989 dense bf16 TFLOP/s at 40% MFU)."""
    gpus_per_node: int = 8
    intra_bw: float = 450e9
    inter_bw: float = 50e9
    flops: float = 989e12 * 0.4


def comm_estimate(c: ModelConfig, layout: ParallelLayout, seq: int, batch: int, P: Precision, mb: int,
                  checkpointing: bool, net: Network = Network()) -> dict[str, float]:
    """Seconds per optimizer step each GPU spends on communication and pipeline bubbles (not hidden
    behind compute; a ranking, not a forecast). Ring collectives move (n-1)/n of the buffer; a
    dimension is intra-node when it and the dimensions inside it (order pp, dp_replicate, dp_shard,
    cp, tp: tp innermost) fit in a node."""
    L = layout
    F = fsdp_degree(L)
    inner = {"tp": L.tp, "cp": L.cp * L.tp, "fsdp": F * L.tp, "dp_replicate": L.dp_replicate * F * L.tp}

    def bw(dim: str) -> float:
        return net.intra_bw if inner[dim] <= net.gpus_per_node else net.inter_bw

    s_params = max(sum(stage_params(c, L, s).values()) for s in range(L.pp))
    layers = math.ceil(c.n_layers / L.pp)
    N = batch * seq // L.cp
    t = {}
    ring = lambda n: (n - 1) / n  # noqa: E731
    if F > 1:
        t["fsdp"] = (2 * P.gather + P.grad) * s_params * ring(F) / bw("fsdp")
    if L.dp_replicate > 1:
        t["dp_replicate"] = 2 * P.grad * s_params / F * ring(L.dp_replicate) / bw("dp_replicate")
    if L.tp > 1:  # sequence parallel: an all-gather and a reduce-scatter per sub-layer, each way
        t["tp"] = mb * layers * 8 * N * c.d_model * P.compute * ring(L.tp) / bw("tp")
    if L.cp > 1:  # the ring passes keys/values cp-1 times forward, and keys/values + their gradients back
        kv = cost.kv_values_per_token(c)
        t["cp"] = mb * layers * 3 * (L.cp - 1) * N * kv * P.compute / bw("cp")
    if L.ep > 1:  # all-to-all dispatch and combine, forward and backward
        moe = sum(c.layer_is_moe(i) for i in range(c.n_layers)) / L.pp
        t["ep"] = mb * moe * 4 * N * c.n_experts_per_tok * c.d_model * P.compute * ring(L.ep) / net.intra_bw
    card = cost.cost_card(c, context_len=seq)
    compute = mb * batch * seq * card["flops_per_token"] * L.dp / L.world / net.flops
    # (each data-parallel rank's mb x batch x seq tokens, the model split over tp x pp x cp)
    if checkpointing:
        t["recompute"] = compute / 3  # one more forward
    if L.pp > 1:
        t["pp_bubble"] = compute * (L.pp - 1) / (mb + L.pp - 1)
    t["compute"] = compute
    return t


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest_layouts(config: ModelConfig | str, gpus: int, gpu_mem: float, *, seq: int | None = None, batch: int = 1,
                    dtype: str = "bf16", optimizer: str = "adamw", loss: str = "fused", top: int = 8,
                    microbatches: int | None = None, schedule: str = "1f1b",
                    net: Network = Network()) -> list[dict[str, Any]]:
    """Layouts of ``gpus`` whose peak fits ``gpu_mem``, cheapest estimated overhead first
    (communication + bubble + recomputation, :func:`comm_estimate`); checkpointing only where needed.
    ``microbatches``: per pipeline step (default: pp, the fewest 1F1B allows, the largest bubble)."""
    c = cost._as_config(config)
    seq = c.max_seq_len if seq is None else seq
    P = PRECISIONS[dtype]
    rows = []
    for rep, tp, pp, cp in itertools.product(_divisors(gpus), repeat=4):
        if gpus % (rep * tp * pp * cp) or tp > net.gpus_per_node:
            continue
        shard = gpus // (rep * tp * pp * cp)
        for ep in (_divisors(shard * cp) if c.n_experts else [1]):
            try:
                L = ParallelLayout(dp_shard=shard, dp_replicate=rep, tp=tp, pp=pp, cp=cp, ep=ep).resolve(gpus)
                check_layout(c, L, seq)
                if cp > 1 and (seq // cp) % 2:
                    continue
                for ac in (False, True):
                    mb = max(microbatches or 0, pp)
                    p = plan(c, L, gpus=gpus, seq=seq, batch=batch, gpu_mem=gpu_mem, dtype=dtype, optimizer=optimizer,
                             loss=loss, activation_checkpointing=ac, microbatches=mb, schedule=schedule)
                    if p["fits"]:
                        t = comm_estimate(c, L, seq, batch, P, p["microbatches"], ac, net)
                        overhead = sum(v for k, v in t.items() if k != "compute")
                        rows.append({"layout": layout_text(L), "activation_checkpointing": ac, "peak": p["peak"],
                                     "overhead_s": overhead, "compute_s": t["compute"], "terms": t})
                        break
            except ValueError:
                continue
    rows.sort(key=lambda r: (r["overhead_s"] / max(r["compute_s"], 1e-30), r["peak"]))
    return rows[:top]


# --- reading and writing ---------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
          "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30 (decimal and binary units, case-insensitive)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"--gpu-mem {text!r}: expected a size such as 80GB, 80GiB or 8e10")
    return float(m.group(1)) * _UNITS[m.group(2) or ""]


def format_plan(p: dict[str, Any], suggestions: list[dict[str, Any]] | None = None) -> str:
    """The plan as rich tables rendered to text."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    hb = cost.human_bytes
    buf = StringIO()
    con = Console(file=buf, width=110, force_terminal=False, color_system=None)
    con.print(f"{p['name']} on {p['gpus']} GPU(s), layout {p['layout_text']}, seq {p['seq']:,} x batch {p['batch']} "
              f"per micro batch\n{p['precision']}, {p['optimizer']}, {p['loss']} loss; the busiest pipeline stage: "
              f"{p['stage']} of {p['layout']['pp']}; the peak is an upper bound", highlight=False)
    t = Table()
    t.add_column("per GPU")
    t.add_column("bytes", justify="right")
    t.add_row("parameters (local shard)", hb(p["bytes"]["params"]))
    t.add_row("gradients", hb(p["bytes"]["grads"]))
    t.add_row(f"optimizer state ({p['optimizer']})", hb(p["bytes"]["optimizer"]))
    for k in ("ddp_grad_buckets", "fsdp_root_gathered", "fsdp_gathered"):
        if k in p["bytes"]:
            t.add_row(k.replace("_", " "), hb(p["bytes"][k]))
    t.add_row("activations, no checkpointing", hb(p["activations"]))
    t.add_row("activations, checkpointing", hb(p["activations_checkpointed"]))
    for k, v in p["activation_parts"].items():
        if v:
            t.add_row(f"  {k.replace('_', ' ')}", hb(v))
    for k, v in p["transient"].items():
        t.add_row(f"transient: {k.replace('_', ' ')}", hb(v))
    t.add_row("peak, no checkpointing", hb(p["peak_without_checkpointing"]))
    t.add_row("peak, checkpointing", hb(p["peak_with_checkpointing"]))
    if p.get("gpu_mem"):
        t.add_row("GPU memory", f"{hb(p['gpu_mem'])}: {'fits' if p['fits'] else 'does NOT fit'}")
    inf = p["inference"]
    t.add_row("inference: weights (bf16)", hb(inf["weights"]))
    t.add_row("inference: KV cache / token", hb(inf["kv_cache_per_token"]))
    t.add_row(f"inference: KV cache at {p['seq']:,} x {p['batch']}", hb(inf["kv_cache"]))
    con.print(t)
    if suggestions is not None:
        con.print("\nlayouts that fit, by estimated overhead (communication + pipeline bubble + recomputation, "
                  "as a share of compute; plan.comm_estimate)", highlight=False)
        s = Table()
        for col in ("layout", "checkpointing", "peak", "overhead"):
            s.add_column(col, justify="left" if col == "layout" else "right")
        for r in suggestions:
            s.add_row(r["layout"], "yes" if r["activation_checkpointing"] else "no", hb(r["peak"]),
                      f"{100 * r['overhead_s'] / r['compute_s']:.0f}%")
        if not suggestions:
            s.add_row("none fits", "", "", "")
        con.print(s)
    return buf.getvalue().rstrip()


# --- measurement (the reference the tests hold the plan to) ---------------------------------------
def measure_training_bytes(model, input_ids, targets, optimizer=None, autocast_dtype=None) -> dict[str, int]:
    """Bytes of one training step measured from the tensors themselves.

    ``params``, ``grads``, ``optimizer`` (moments; the step counters left out): the storages of the
    tensors (a sharded DTensor counts its local shard). ``saved``: the unique storages autograd
    saves for the backward (``saved_tensors_hooks``; parameters and bf16 copies of them left out,
    those are ``autocast_weight_copies``). ``live_after_forward``: every storage an operator created
    during the forward that is still alive when it returns (a dispatch mode holding weak references),
    parameters, their casts and the fused loss's kept workspace (``loss_workspace``) left out: what
    activation checkpointing keeps, since its saved tensors go through its own hooks.
    ``autocast_dtype``: the forward under CPU autocast (as the trainer's ``train.dtype: bfloat16``)."""
    import contextlib

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.multiprocessing.reductions import StorageWeakRef

    from evolm.nn import loss as loss_mod

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    pstore = {local(p).untyped_storage().data_ptr() for p in params}
    pstore |= {local(p.grad).untyped_storage().data_ptr() for p in params if p.grad is not None}

    def weight_ptr(t) -> int | None:
        """The storage of a parameter (or a view of one) seen during the forward: the model's own, or
        one FSDP2 gathered for this forward (an unsharded ``nn.Parameter`` it registers in place)."""
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return getattr(t, "_local_tensor", t).untyped_storage().data_ptr()
        return None

    gathered: dict[int, Any] = {}  # storages of gathered weights; FSDP frees them after a block (resize
    # to 0 bytes) and the allocator may give the address to an activation: held only while in use

    def is_gathered(ptr: int) -> bool:
        st = gathered.get(ptr)
        return st is not None and st.nbytes() > 0 and st.data_ptr() == ptr

    saved: dict[int, int] = {}
    casts: dict[int, int] = {}
    cast_ptrs: set[int] = set()  # storages made by casting a parameter (autocast's weight copies)

    def pack(t):
        try:  # a DTensor (tensor parallel) saves its local shard
            st = getattr(t, "_local_tensor", t).untyped_storage()
            ptr = st.data_ptr()
        except RuntimeError:  # a wrapper without a storage of its own
            return t
        if weight_ptr(t) is not None:
            gathered[ptr] = st
        elif ptr not in pstore and not is_gathered(ptr):
            (casts if ptr in cast_ptrs else saved)[ptr] = st.nbytes()
        return t

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs: dict[int, tuple] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = getattr(args[0], "_local_tensor", args[0]) if args else None
            cast = func is torch.ops.aten._to_copy.default and isinstance(src, torch.Tensor) and \
                (src.untyped_storage().data_ptr() in pstore or weight_ptr(args[0]) is not None)
            for t in tree_flatten(out)[0]:
                t = getattr(t, "_local_tensor", t)  # a DTensor: its local shard
                if not isinstance(t, torch.Tensor) or t.is_meta:
                    continue
                try:
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                except RuntimeError:  # another wrapper (an async collective's result): no storage of its own
                    continue
                if cast:
                    cast_ptrs.add(ptr)
                old = self.refs.get(ptr)
                if old is None or old[0].expired():  # an address may be reused after a free
                    self.refs[ptr] = (StorageWeakRef(st), cast, st.nbytes())
            return out

    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    live = Live()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx, live:
        loss = model(input_ids, targets=targets)
        # measured inside autocast: its cache of weight casts lives until the context exits
        scratch = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in loss_mod._scratch.free.values()}
        alive = {ptr: (n, cast) for ptr, (ref, cast, n) in live.refs.items() if not ref.expired() and ptr not in pstore
                 and not is_gathered(ptr)
                 and ptr not in scratch}
    loss.backward()
    def nbytes(t) -> int:  # a DTensor's local shard
        t = local(t)
        return t.numel() * t.element_size()

    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "saved": sum(saved.values()), "autocast_weight_copies": sum(casts.values()),
           "live_after_forward": sum(n for n, cast in alive.values() if not cast),
           "live_weight_copies": sum(n for n, cast in alive.values() if cast), "loss_workspace": sum(scratch.values())}
    if optimizer is not None:
        optimizer.step()
        out["optimizer"] = sum(nbytes(v) for state in optimizer.state.values()
                               for k, v in state.items() if torch.is_tensor(v) and k != "step")
    return out


def measure_one_step(config, seq: int, batch: int, dtype: str = "fp32",
                     activation_checkpointing: bool = False) -> tuple[dict[str, int], Any]:
    """One forward + backward + AdamW step of ``config`` built on the CPU (seed 0): the measured bytes
    (:func:`measure_training_bytes`) and the plan of that step, the pair the planner's checks compare
    (tests/test_plan.py, benchmarks/plan_check.py)."""
    import torch

    from evolm.model import build
    from evolm.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build(config).train()
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, config.vocab_size, (batch, seq))
    measured = measure_training_bytes(model, x, torch.roll(x, -1, 1), opt, torch.bfloat16 if dtype == "bf16" else None)
    return measured, plan(config, gpus=1, seq=seq, batch=batch, dtype=dtype,
                          activation_checkpointing=activation_checkpointing, device="cpu")


__all__ = ["fsdp_degree", "layout_text", "Precision", "PRECISIONS", "Network", "parse_layout", "parse_bytes", "plan", "suggest_layouts",
           "comm_estimate", "format_plan", "layer_params", "layer_activations", "stage_params", "stages",
           "inference_bytes", "loss_bytes", "measure_training_bytes", "measure_one_step"]
