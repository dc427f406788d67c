"""The memory planner against one measured training step on CPU (docs/distributed.md#memory-planner).

For tiny versions of the Llama-, Gemma 3-, DeepSeek- and Qwen3-MoE-style presets: one forward +
backward + AdamW step, measured from the tensors (``evolm.analysis.plan.measure_training_bytes``),
next to ``plan(..., device="cpu")``. Run: ``python benchmarks/plan_check.py`` (~10 s on one thread).
"""

from __future__ import annotations

import torch

from evolm.analysis import plan as P
from evolm.presets import get_preset

CASES = [("tiny-llama", 64, 2, "fp32", False), ("tiny-llama", 64, 2, "bf16", False), ("tiny-llama", 64, 2, "bf16", True),
         ("tiny-llama", 640, 2, "fp32", False), ("tiny-gemma3", 64, 2, "fp32", False), ("tiny-gemma3", 64, 2, "bf16", False),
         ("tiny-gemma3", 64, 2, "bf16", True), ("tiny-deepseek", 64, 2, "fp32", False),
         ("tiny-deepseek", 64, 2, "bf16", False), ("tiny-deepseek", 64, 2, "bf16", True),
         ("tiny-qwen3-moe", 64, 2, "bf16", False), ("tiny-mixtral", 64, 2, "fp32", False),
         # a small model, where the vocabulary (49,152 x 576) dominates: SmolLM2-135M cut to 4 layers
         ("smollm2-135m", 1024, 2, "bf16", False), ("smollm2-135m", 1024, 2, "fp32", True)]
SMALL = {"smollm2-135m": {"n_layers": 4}}


def main() -> None:
    torch.set_num_threads(1)
    print("| preset | seq x batch | dtype | ckpt | params+grads+AdamW planned = measured | activations planned | "
          "measured | diff |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for name, T, B, dtype, ac in CASES:
        c = get_preset(name).replace(max_seq_len=max(T, 64), **SMALL.get(name, {}))
        m, p = P.measure_one_step(c, T, B, dtype, ac)
        states = m["params"] + m["grads"] + m["optimizer"]
        planned_states = p["bytes"]["params"] + p["bytes"]["grads"] + p["bytes"]["optimizer"]
        if ac:  # what the forward leaves alive (the recomputed block is checked apart, tests/test_plan.py)
            planned = p["activations_checkpointed"] - p["activation_parts"]["recompute_one_block"]
            measured = m["live_after_forward"] + m["live_weight_copies"]
        else:
            planned, measured = p["activations"], m["saved"] + m["autocast_weight_copies"]
        same = "yes" if planned_states == states else f"NO ({planned_states} vs {states})"
        label = name + (" (4 layers)" if name in SMALL else "")
        print(f"| {label} | {T} x {B} | {dtype} | {'yes' if ac else 'no'} | {states:,} B: {same} | {planned:,.0f} | "
              f"{measured:,} | {100 * (planned - measured) / measured:+.1f}% |")


if __name__ == "__main__":
    main()
