"""The lineage as a ladder: GPT-2, then one innovation per rung, each judged against the rung before.

Each rung adds one change of the seed documents' timeline to everything below it, trained at the
same FLOPs as every other rung (``lab/budget.py``), with the same seeds, tokenizer and data
(``lab/ablate.py`` with ``ladder=True``). The widths a rung changes are matched as the papers match
them (SwiGLU at 2/3 of the MLP width; experts at equal active parameters, and on a side rung at
equal total parameters), and the rung's Δ is what that one step bought here. The model rungs train
on the data as it comes; the data rungs on top then add the quality filter, deduplication and a
final anneal on the highest-quality tier (the base recipe's second stage, the decay of a
warmup-stable-decay schedule). Side rungs try a change the lineage did not keep (experts at equal
total parameters; attention replaced by Hyena's long convolutions) against the rung they branch from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from evolm.lab.ablate import Variant


@dataclass(frozen=True)
class Dims:
    """The base model's shape, from which the rungs that change a width take theirs."""

    d_model: int = 128
    n_heads: int = 4
    head_dim: int = 32
    seq_len: int = 128

    @classmethod
    def of(cls, base: dict) -> "Dims":
        o = (base.get("model") or {}).get("overrides") or {}
        d = o.get("d_model", cls.d_model)
        heads = o.get("n_heads", cls.n_heads)
        stages = base.get("stages") or [{}]
        return cls(d, heads, o.get("head_dim") or d // heads, stages[0].get("seq_len", cls.seq_len))


def ladder(dims: Dims = Dims()) -> list[Variant]:
    """The rungs, bottom to top, with widths for ``dims``: GQA at half the heads, a window of a
    quarter of the context, MLA's latent a quarter of d_model (DeepSeek-V2: 512 of 5120 with
    128-dim heads; at small widths a tenth leaves too little) and its RoPE part half a head."""
    h = dims.head_dim
    return [
        # Radford et al. 2019
        Variant("gpt2", {"norm": "layernorm", "norm_placement": "pre", "pos_emb": "learned", "mlp": "mlp",
                         "activation": "gelu_tanh", "qk_norm": None, "tie_embeddings": True, "sliding_window": None,
                         "sliding_window_pattern": 1, "attention": "mha", "n_experts": 0,
                         # the data as it comes: the data rungs at the top add the filter, dedup, anneal
                         "data.quality_filter": False, "data.exact_dedup": False, "data.near_dedup": False}),
        Variant("rmsnorm", {"norm": "rmsnorm"}),                                 # Zhang & Sennrich 2019
        Variant("rope", {"pos_emb": "rope"}),                                    # Su et al. 2021
        Variant("swiglu", {"mlp": "glu", "activation": "silu"}),                 # Shazeer 2020
        # Ainslie et al. 2023
        Variant("gqa", {"n_kv_heads": max(1, dims.n_heads // 2)}),
        Variant("qk-norm", {"qk_norm": "head"}),                                 # Dehghani et al. 2023
        Variant("untied-head", {"tie_embeddings": False}),                       # Llama, Press & Wolf 2017
        # attention -> Hyena at equal FLOPs: a side rung (the lineage keeps attention), judged against
        # the last rung whose every layer attends globally
        Variant("hyena", {"attention": "hyena"}, on="untied-head", side=True),   # Poli et al. 2023
        # Beltagy 2020; Gemma 2
        Variant("window-pattern", {"sliding_window": dims.seq_len // 4, "sliding_window_pattern": 2}),
        Variant("olmo2-norm", {"norm_placement": "olmo2"}),                      # OLMo 2, 2025
        Variant("moe-shared", {"n_experts": 8, "n_experts_per_tok": 2, "n_shared_experts": 1}),  # DeepSeekMoE 2024
        # the same experts at equal *total* parameters: a side rung, also judged against the dense one
        Variant("moe-equal-total", {"n_experts": 8, "n_experts_per_tok": 2, "n_shared_experts": 1,
                                    "lab.moe_match": "total"}, on="olmo2-norm", side=True),
        # attention -> a selective state space (Gu & Dao 2023) in every block, MLP kept, at equal FLOPs
        # (the budget gives the cheaper mixer more tokens): a side rung, judged against the dense one
        Variant("mamba", {"attention": "mamba", "pos_emb": "none", "qk_norm": None, "sliding_window": None,
                          "sliding_window_pattern": 1}, on="olmo2-norm", side=True),
        # a Jamba-style hybrid (Lieber et al. 2024): 3 of every 4 mixers Mamba (with Jamba's dt/B/C norms),
        # one attention layer without positions, MLPs kept; a side rung at equal FLOPs, like 'mamba'
        Variant("jamba", {"mixer_pattern": ["mamba", "mamba", "mamba", "mha"], "mamba_dt_b_c_norm": True,
                          "pos_emb": "none", "qk_norm": None, "sliding_window": None, "sliding_window_pattern": 1},
                on="olmo2-norm", side=True),
        # attention -> Mamba-2's SSD (Dao & Gu 2024) at equal FLOPs: heads of a head's width, a state of 64
        # per head (the paper's smaller models), two chunks per sequence; a side rung like Mamba's
        Variant("mamba2", {"attention": "mamba2", "pos_emb": "none", "qk_norm": None, "sliding_window": None,
                           "sliding_window_pattern": 1, "mamba_d_head": h, "mamba_d_state": 64,
                           "mamba_chunk_size": max(1, dims.seq_len // 2)}, on="olmo2-norm", side=True),
        # MLA normalises its latent instead of per-head queries and keys, so the rung drops QK-norm
        Variant("mla", {"attention": "mla", "kv_lora_rank": dims.d_model // 4, "qk_nope_head_dim": h,
                        "qk_rope_head_dim": h // 2, "v_head_dim": h, "qk_norm": None}),  # DeepSeek-V2 2024
        # data rungs (equal FLOPs = equal tokens here: the model no longer changes), all judged on the
        # held-out split of the filtered, deduplicated data (lab/runs.py)
        Variant("quality-filter", {"data.quality_filter": True}),               # Gopher rules, Rae et al. 2021
        Variant("dedup", {"data.exact_dedup": True, "data.near_dedup": True}),   # Lee et al. 2022 (MinHash)
        Variant("anneal", {"stages.decay.mixture": "high"}),                     # OLMo 2, Llama 3 annealing
    ]


LADDER = ladder()  # for recipes/lab-base.yaml: d_model 128, 4 heads of 32, seq_len 128

# ``--size``: the base recipe's shape for the ladder (``cpu``: as the recipe writes it)
SIZES: dict[str, dict] = {
    "cpu": {"budget": "flops=4e12"},  # 51 runs in ~46 min on 2 cores
    # GPT-2 small's shape (Radford et al. 2019): 12 layers, d_model 768, 12 heads, 1024 context;
    # half a million tokens a step (nanoGPT's), bf16 autocast, compiled blocks: for a GPU
    "124m": {"model": {"d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "head_dim": 64,
                       "d_ff": 3072, "max_seq_len": 1024},
             "train": {"micro_batch": 16, "tokens_per_step": 524288, "dtype": "bfloat16", "compile": True},
             "seq_len": 1024, "vocab_size": 32768,
             "budget": "flops=2e17"},  # ~270M tokens a run, 10x past GPT-2's 20 tokens per parameter / 9
}


def sized(base: dict, size: str) -> dict:
    """``base`` reshaped to one of ``SIZES``."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    spec = SIZES[size]
    d = copy.deepcopy(base)
    if "model" not in spec:
        return d
    d.setdefault("model", {}).setdefault("overrides", {}).update(spec["model"])
    d.setdefault("train", {}).update(spec["train"])
    d["stages"] = [dict(s, seq_len=spec["seq_len"]) for s in d.get("stages") or [{}]]
    train_tok = (d.get("tokenizer") or {}).get("train")
    if isinstance(train_tok, dict):
        train_tok["vocab_size"] = spec["vocab_size"]
    return d


def rungs(names: list[str] | None = None, base: dict | None = None) -> list[Variant]:
    """The ladder (widths for ``base``'s shape), or its first rung plus the named ones (in ladder
    order); a side rung built on one left out builds on the nearest kept rung below it instead."""
    full = ladder(Dims.of(base)) if base is not None else list(LADDER)
    if not names:
        return full
    known = {v.name for v in full}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown rung(s) {unknown}; the ladder: {', '.join(v.name for v in full)}")
    chosen = [full[0]] + [v for v in full[1:] if v.name in names]
    kept = {v.name for v in chosen}
    order = [v.name for v in full]
    return [v if v.on is None or v.on in kept else replace(v, on=_kept_before(v.on, kept, order)) for v in chosen]


def _kept_before(name: str, kept: set[str], order: list[str]) -> str:
    """The nearest main-line rung at or below ``name`` that a partial ladder keeps."""
    side = {v.name for v in LADDER if v.side}
    below = order[:order.index(name) + 1]
    return [n for n in below if n in kept and n not in side][-1]
