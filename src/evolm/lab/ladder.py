"""The lineage as a ladder: GPT-2, then one innovation per rung, each judged against the rung before.

Each rung adds one change of the seed documents' timeline to everything below it, trained at the
same FLOPs as every other rung (``lab/budget.py``), with the same seeds, tokenizer and data
(``lab/ablate.py`` with ``ladder=True``). The widths a rung changes are matched as the papers match
them (SwiGLU at 2/3 of the MLP width; experts at equal active parameters, and on a side rung at
equal total parameters), and the rung's Δ is what that one step bought here. The model rungs train
on the data as it comes; the data rungs on top then add the quality filter, deduplication and a
final anneal on the highest-quality tier (the base recipe's second stage, the decay of a
warmup-stable-decay schedule).
"""

from __future__ import annotations

from dataclasses import replace

from evolm.lab.ablate import Variant

# the rungs, bottom to top; dims of the MLA rung fit lab-base.yaml's d_model 128 / 4 heads
LADDER: list[Variant] = [
    Variant("gpt2", {"norm": "layernorm", "norm_placement": "pre", "pos_emb": "learned", "mlp": "mlp",
                     "activation": "gelu_tanh", "qk_norm": None, "tie_embeddings": True, "sliding_window": None,
                     "sliding_window_pattern": 1, "attention": "mha", "n_experts": 0,
                     # the data as it comes: the data rungs at the top add the filter, dedup, anneal
                     "data.quality_filter": False, "data.exact_dedup": False, "data.near_dedup": False}),
    # Radford et al. 2019
    Variant("rmsnorm", {"norm": "rmsnorm"}),                                 # Zhang & Sennrich 2019
    Variant("rope", {"pos_emb": "rope"}),                                    # Su et al. 2021
    Variant("swiglu", {"mlp": "glu", "activation": "silu"}),                 # Shazeer 2020
    Variant("gqa", {"n_kv_heads": 2}),                                       # Ainslie et al. 2023
    Variant("qk-norm", {"qk_norm": "head"}),                                 # Dehghani et al. 2023
    Variant("untied-head", {"tie_embeddings": False}),                       # Llama, Press & Wolf 2017
    Variant("window-pattern", {"sliding_window": 32, "sliding_window_pattern": 2}),  # Beltagy 2020; Gemma 2
    Variant("olmo2-norm", {"norm_placement": "olmo2"}),                      # OLMo 2, 2025
    Variant("moe-shared", {"n_experts": 8, "n_experts_per_tok": 2, "n_shared_experts": 1}),  # DeepSeekMoE 2024
    # the same experts at equal *total* parameters: a side rung, also judged against the dense one
    Variant("moe-equal-total", {"n_experts": 8, "n_experts_per_tok": 2, "n_shared_experts": 1,
                                "lab.moe_match": "total"}, on="olmo2-norm", side=True),
    # MLA normalises its latent instead of per-head queries and keys, so the rung drops QK-norm
    Variant("mla", {"attention": "mla", "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                    "v_head_dim": 32, "qk_norm": None}),  # DeepSeek-V2 2024
    # data rungs (equal FLOPs = equal tokens here: the model no longer changes), all judged on the
    # held-out split of the filtered, deduplicated data (lab/runs.py)
    Variant("quality-filter", {"data.quality_filter": True}),               # Gopher rules, Rae et al. 2021
    Variant("dedup", {"data.exact_dedup": True, "data.near_dedup": True}),   # Lee et al. 2022 (MinHash)
    Variant("anneal", {"stages.decay.mixture": "high"}),                     # OLMo 2, Llama 3 annealing
]


def rungs(names: list[str] | None = None) -> list[Variant]:
    """The ladder, or its first rung plus the named ones (in ladder order); a side rung built on one
    left out builds on the nearest kept rung below it instead."""
    if not names:
        return list(LADDER)
    known = {v.name for v in LADDER}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown rung(s) {unknown}; the ladder: {', '.join(v.name for v in LADDER)}")
    chosen = [LADDER[0]] + [v for v in LADDER[1:] if v.name in names]
    kept = {v.name for v in chosen}
    order = [v.name for v in LADDER]
    return [v if v.on is None or v.on in kept else replace(v, on=_kept_before(v.on, kept, order)) for v in chosen]


def _kept_before(name: str, kept: set[str], order: list[str]) -> str:
    """The nearest main-line rung at or below ``name`` that a partial ladder keeps."""
    side = {v.name for v in LADDER if v.side}
    below = order[:order.index(name) + 1]
    return [n for n in below if n in kept and n not in side][-1]
