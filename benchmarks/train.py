"""Training throughput: evolm vs Hugging Face transformers on the same config, batch and dtype.

One process, the same weights (transformers' model is built from the same config and its
weights copied into evolm), a full step each: forward + backward + AdamW. Configs from the
issue: a GPT-2-style model (6 layers, 384 wide, LayerNorm, learned positions, GELU) and a
Llama-style one (RMSNorm, SwiGLU, RoPE, GQA), context 256, vocabulary 50,304, batch 8.

    python benchmarks/train.py [--dtypes float32,bfloat16] [--steps 5] [--warmup 2] [--repeat 3] [--compile] [--nanogpt]
                               [--device cuda] [--size gpt2-124m] [--batch 16] [--context 1024]

``--compile`` adds evolm with per-block ``torch.compile`` and the inductor-fused loss kernel (what
``train.compile: true`` does). ``--nanogpt`` adds, for the GPT-2-style config, a minimal GPT written
here in nanoGPT's structure (fused c_attn, SDPA causal attention, tied head, ``F.cross_entropy`` on
the full logits) compiled whole with ``torch.compile``: the issue's nanoGPT reference point.

``--device cuda`` runs it on a GPU and adds model FLOPs utilisation (the cost card's training
FLOPs per token, 6N + attention, times tokens/s, over the card's dense bf16 peak or
``--peak-tflops``). ``--size gpt2-124m`` swaps the small configs for GPT-2 small's shape (12
layers, 768 wide, 12 heads), where a GPU has enough work to show its MFU.
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

from evolm.analysis.cost import cost_card  # noqa: E402
from evolm.interop.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from evolm.model import build  # noqa: E402
from evolm.train.loop import peak_flops  # noqa: E402
from evolm.train.optim import make_optimizer  # noqa: E402
from stats import median_spread, sync  # noqa: E402  (benchmarks/stats.py)

V, T, B = 50304, 256, 8
SIZES = {"small": dict(layers=6, width=384, heads=6, kv_heads=2, ff=1024),  # the configs
         "gpt2-124m": dict(layers=12, width=768, heads=12, kv_heads=4, ff=2048)}
SIZE = SIZES["small"]


def hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    z = SIZE
    gpt2 = GPT2Config(vocab_size=V, n_positions=T, n_embd=z["width"], n_layer=z["layers"], n_head=z["heads"],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    llama = LlamaConfig(vocab_size=V, hidden_size=z["width"], intermediate_size=z["ff"],
                        num_hidden_layers=z["layers"], num_attention_heads=z["heads"],
                        num_key_value_heads=z["kv_heads"], max_position_embeddings=T, tie_word_embeddings=True)
    return [("gpt2-style", GPT2LMHeadModel, gpt2), ("llama-style", LlamaForCausalLM, llama)]


class NanoGPTStyle(torch.nn.Module):
    """GPT-2 in nanoGPT's shape (our own few lines, not nanoGPT's code): the baseline to beat."""

    def __init__(self, n_layer=6, n_embd=384, n_head=6):
        super().__init__()
        nn = torch.nn
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(V, n_embd), nn.Embedding(T, n_embd)
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            self.blocks.append(nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(n_embd), c_attn=nn.Linear(n_embd, 3 * n_embd), c_proj=nn.Linear(n_embd, n_embd),
                ln_2=nn.LayerNorm(n_embd), c_fc=nn.Linear(n_embd, 4 * n_embd), mlp_proj=nn.Linear(4 * n_embd, n_embd))))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            q, k, v = blk["c_attn"](blk["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["c_proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["mlp_proj"](F.gelu(blk["c_fc"](blk["ln_2"](x)), approximate="tanh"))
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))


def time_steps(step, steps: int) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return B * T * steps / (time.perf_counter() - t)


def race(engines: dict, warmup: int, steps: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Warm every engine up, then time them ``repeat`` times, interleaved (so a slow minute of a
    shared machine hits all of them): engine -> (median tokens/s, half the spread / median)."""
    for step, extra in engines.values():
        for _ in range(warmup + extra):
            step()
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeat):
        for k, (step, _) in engines.items():
            runs[k].append(time_steps(step, steps))
    return {k: median_spread(v) for k, v in runs.items()}


def main() -> None:
    global SIZE, B, T
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also run evolm with per-block torch.compile")
    ap.add_argument("--nanogpt", action="store_true", help="also run a nanoGPT-style GPT compiled whole")
    ap.add_argument("--models", default="gpt2-style,llama-style")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per engine, interleaved; median reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="small: the issue's configs")
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--context", type=int, default=T)
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: the card's dense bf16 peak)")
    args = ap.parse_args()
    SIZE, B, T = SIZES[args.size], args.batch, args.context
    dev = torch.device(args.device)
    on_gpu = dev.type != "cpu"
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}; {args.size} configs, batch {B} x context {T}, vocab {V}")
    x = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    inp, tgt = x[:, :-1], x[:, 1:]
    rows = []
    for name, cls, hf_cfg in hf_models():
        if name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        hf = cls(hf_cfg).to(dev)
        cfg = config_from_hf(hf_cfg.to_dict())
        flops_per_token = cost_card(cfg, T)["flops_per_token"]
        for dtype in args.dtypes.split(","):
            amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext())
            peak = peak_flops(dev, dtype, args.peak_tflops)[0] if on_gpu else None

            def hf_step(model=hf, opt=make_optimizer(hf, 1e-4)):
                with amp:
                    logits = model(inp).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            engines = {"transformers": (hf_step, 0)}
            variants = [("evolm", False)] + ([("evolm compiled", True)] if args.compile else [])
            for label, compiled in variants:
                ours = build(cfg, device=dev)
                ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, hf_cfg.model_type), strict=False)
                if compiled:
                    for block in ours.layers:
                        block.compile()
                ours.compiled_loss = compiled  # as train.compile sets it

                def our_step(model=ours, opt=make_optimizer(ours, 1e-4)):
                    with amp:
                        loss = model(inp, targets=tgt)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                engines[label] = (our_step, 2 if compiled else 0)
            if args.nanogpt and name == "gpt2-style":
                torch.manual_seed(0)
                nano = NanoGPTStyle(SIZE["layers"], SIZE["width"], SIZE["heads"]).to(dev)
                nano_c = torch.compile(nano)

                def nano_step(model=nano_c, opt=make_optimizer(nano, 1e-4)):
                    with amp:
                        loss = model(inp, tgt)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                engines["nanoGPT-style compiled"] = (nano_step, 2)
            res = race(engines, args.warmup, args.steps, args.repeat)
            ref = res["transformers"][0]
            for label, (tps, spread) in res.items():
                mfu = f" | {flops_per_token * tps / peak:.1%}" if peak else ""
                rows.append((name, dtype, label, tps, spread, tps / ref, mfu))
                print(f"  {name} {dtype} {label}: {tps:,.0f} tok/s ({tps / ref:.2f}x){mfu}", flush=True)
    print(f"\n{args.repeat} interleaved runs of {args.steps} steps per engine: median tokens/s, +- half the spread")
    if on_gpu:
        print(f"MFU: {peak_flops(dev, 'bfloat16', args.peak_tflops)[1]} (fp32 rows against it too)")
    print("| model | dtype | engine | train tokens/s | vs transformers |" + (" MFU |" if on_gpu else ""))
    print("|---|---|---|---|---|" + ("---|" if on_gpu else ""))
    for name, dtype, engine, tps, spread, ratio, mfu in rows:
        print(f"| {name} | {dtype} | {engine} | {tps:,.0f} +-{spread:.0%} | {ratio:.2f}x{mfu} |")


if __name__ == "__main__":
    main()
