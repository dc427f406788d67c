"""Prefill and decode speed: evolm vs Hugging Face transformers (and llama.cpp), same weights.

Runs in one process on the same GGUF file (SmolLM2-135M-Instruct Q4_1 by default): evolm and
transformers both dequantize it to the same float weights; llama.cpp (llama-cpp-python, when
installed) runs the quantized file natively. Prints prefill tokens/s for a 256-token prompt and
decode tokens/s for 128 new tokens at batch 1 and 8, and the ratio evolm / transformers.

    python benchmarks/decode.py [--model smollm2|gemma3|PATH.gguf] [--dtypes float32,bfloat16]
                                [--batches 1,8] [--new 128] [--prompt-len 256] [--int8] [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm.generate import SamplingParams, generate  # noqa: E402
from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402


def _prompt(vocab: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (batch, length), generator=g)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_evolm(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s); decode = extra tokens / extra time beyond the first token."""
    run = lambda n: generate(model, ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))  # noqa
    with torch.inference_mode():
        run(2)  # warm-up (and compilation, for compiled paths)
        run(2)
        prefill = min(_timed(lambda: model(ids, last_only=True)) for _ in range(2))
        one = min(_timed(lambda: run(1)) for _ in range(2))
        full = _timed(lambda: run(new))
    return ids.numel() / prefill, ids.shape[0] * (new - 1) / (full - one)


def bench_hf(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    mask = torch.ones_like(ids)
    run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa
                                   do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        run(2)
        prefill = min(_timed(lambda: model(ids, logits_to_keep=1)) for _ in range(2))
        one = min(_timed(lambda: run(1)) for _ in range(2))
        full = _timed(lambda: run(new))
    return ids.numel() / prefill, ids.shape[0] * (new - 1) / (full - one)


def bench_llamacpp(path: str, ids: torch.Tensor, new: int) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=ids.shape[1] + new + 8, n_threads=torch.get_num_threads(), verbose=False,
                logits_all=False)
    toks = ids[0].tolist()
    t = time.perf_counter()
    llm.eval(toks)
    prefill = len(toks) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return prefill, new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--int8", action="store_true", help="also run evolm with int8 weight-only linears")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model if args.model.endswith(".gguf") else find_asset(args.model)
    print(f"model {os.path.basename(path)}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, _ = load_gguf(path, dtype=dtype)
        ours.eval()
        variants = [("evolm", ours)]
        if args.int8:
            from evolm.quant import quantize_int8

            q8, _ = load_gguf(path, dtype=dtype)
            variants.append(("evolm int8", quantize_int8(q8.eval())))
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                      dtype=dtype).eval()
        for b in map(int, args.batches.split(",")):
            ids = _prompt(ours.config.vocab_size, b, args.prompt_len)
            ref = bench_hf(hf, ids, args.new) if hf is not None else None
            for name, m in variants:
                p, d = bench_evolm(m, ids, args.new)
                rows.append((dtype_name, b, name, p, d, ref))
            if ref is not None:
                rows.append((dtype_name, b, "transformers", ref[0], ref[1], None))
        del hf
    cpp = bench_llamacpp(path, _prompt(49152, 1, args.prompt_len), args.new)
    print(f"\n| dtype | batch | engine | prefill tok/s | decode tok/s | vs transformers (prefill / decode) |")
    print("|---|---|---|---|---|---|")
    for dtype_name, b, name, p, d, ref in rows:
        ratio = f"{p / ref[0]:.2f}x / {d / ref[1]:.2f}x" if ref else ""
        print(f"| {dtype_name} | {b} | {name} | {p:,.0f} | {d:,.1f} | {ratio} |")
    if cpp:
        print(f"| {os.path.basename(path).split('.')[-2]} | 1 | llama.cpp | {cpp[0]:,.0f} | {cpp[1]:,.1f} | |")


if __name__ == "__main__":
    main()
