"""Training throughput: evolm vs Hugging Face transformers on the same config, batch and dtype.

One process, the same weights (transformers' model is built from the same config and its
weights copied into evolm), a full step each: forward + backward + AdamW. Configs from the
issue: a GPT-2-style model (6 layers, 384 wide, LayerNorm, learned positions, GELU) and a
Llama-style one (RMSNorm, SwiGLU, RoPE, GQA), context 256, vocabulary 50,304, batch 8.

    python benchmarks/train.py [--dtypes float32,bfloat16] [--steps 5] [--warmup 2] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm.interop.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from evolm.model import build  # noqa: E402
from evolm.train.optim import make_optimizer  # noqa: E402

V, T, B = 50304, 256, 8


def hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2Config(vocab_size=V, n_positions=T, n_embd=384, n_layer=6, n_head=6, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)
    llama = LlamaConfig(vocab_size=V, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=T,
                        tie_word_embeddings=True)
    return [("gpt2-style", GPT2LMHeadModel, gpt2), ("llama-style", LlamaForCausalLM, llama)]


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return B * T * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also run evolm with per-block torch.compile")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; batch {B} x context {T}, vocab {V}")
    x = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    inp, tgt = x[:, :-1], x[:, 1:]
    rows = []
    for name, cls, hf_cfg in hf_models():
        torch.manual_seed(0)
        hf = cls(hf_cfg)
        cfg = config_from_hf(hf_cfg.to_dict())
        for dtype in args.dtypes.split(","):
            amp = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext())

            def hf_step(model=hf, opt=make_optimizer(hf, 1e-4)):
                with amp:
                    logits = model(inp).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ref = time_steps(hf_step, args.warmup, args.steps)
            rows.append((name, dtype, "transformers", ref, 1.0))
            variants = [("evolm", False)] + ([("evolm compiled", True)] if args.compile else [])
            for label, compiled in variants:
                ours = build(cfg)
                ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, hf_cfg.model_type), strict=False)
                if compiled:
                    for block in ours.layers:
                        block.compile()

                def our_step(model=ours, opt=make_optimizer(ours, 1e-4)):
                    with amp:
                        loss = model(inp, targets=tgt)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                tps = time_steps(our_step, args.warmup + (2 if compiled else 0), args.steps)
                rows.append((name, dtype, label, tps, tps / ref))
    print("\n| model | dtype | engine | train tokens/s | vs transformers |")
    print("|---|---|---|---|---|")
    for name, dtype, engine, tps, ratio in rows:
        print(f"| {name} | {dtype} | {engine} | {tps:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
