"""Prefill and decode speed: evolm vs Hugging Face transformers (and llama.cpp), same weights.

Runs in one process on the same GGUF file (SmolLM2-135M-Instruct Q4_1 by default): evolm and
transformers both dequantize it to the same float weights; llama.cpp (llama-cpp-python, when
installed) runs the quantized file natively, at every batch through its own batch API
(benchmarks/llamacpp_peer.py). Prints prefill tokens/s for a 256-token prompt and decode tokens/s
for 128 new tokens at batch 1 and 8, the ratio evolm / transformers, and what decoding asks of the
memory: the bytes one step reads (weights as stored, KV cache at the mean length) and the GB/s
reached, against the host's read bandwidth measured at the start (a GPU's: ``--peak-gbs``).

    python benchmarks/decode.py [--model smollm2|gemma3|PATH.gguf] [--dtypes float32,bfloat16]
                                [--batches 1,8] [--new 128] [--prompt-len 256] [--int8] [--int4] [--blocks] [--block-step]
                                [--compile] [--kernels-ab] [--repeat N] [--quality] [--no-llamacpp]
                                [--device cuda] [--random PRESET]

Variants: ``evolm`` (eager decoding loop), ``int8`` / ``int4`` (weight-only quantized linears and
head, see ``evolm/quant/``), ``blocks`` (the file's own blocks kept, fp32 arithmetic with the same
weights as ``evolm``, see ``evolm/quant/blocks.py``) and, with ``--compile``, each of them again decoding with the
``torch.compile``-d step over a static cache (``generate(..., compile=True)``; their prefill is
timed as generate runs it, through the compiled prefill graph). ``--kernels-ab``
builds every quantized variant both with evolm's C++ int8-activation kernels (``evolm/kernels``)
and with PyTorch's, to compare them in one run. ``--repeat N``
times every engine N times, interleaved, and prints the median and the spread (the machine may be
shared). ``--quality`` prints, for each quantized variant, its logit error against the float model
on a real text and how many of 64 greedy tokens it shares with it on real prompts.

``--defaults`` runs ``benchmarks/startup.py`` instead: each engine as its own process, as a user
starts it (`evolm generate` with no flags, forced paths, transformers, llama.cpp), timing the first
token from process start and the decode rate after it.

``--device cuda`` runs every engine on the GPU (llama.cpp stays on the CPU build, so it is left
out) and adds the memory bandwidth that decoding reaches: the bytes one step must read (every
weight it multiplies, the KV cache at the average length) times steps per second, against the
card's peak. ``--random PRESET`` builds evolm's preset (e.g. ``llama-3-8b``) with random weights
and transformers' model from the same config and weights, for speed on machines without the
model file (greedy tokens of random weights mean nothing; the speed is that of the real model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm.cache import KVCache, StaticKVCache  # noqa: E402
from evolm.infer.decode import generate, prefill  # noqa: E402
from evolm.infer.sampling import SamplingParams  # noqa: E402
from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402
from evolm.quant import KernelPolicy, quantize_int4, quantize_int8  # noqa: E402
from llamacpp_peer import LlamaCppBatch, gguf_step_bytes, host_bandwidth, model_step_bytes  # noqa: E402
from stats import median_spread, sync  # noqa: E402  (benchmarks/stats.py)


def _prompt(vocab: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (batch, length), generator=g)


def _timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


POLICY = KernelPolicy.from_env()  # the EVOLM_* switches, read once for the whole run


def bench_evolm(model, ids: torch.Tensor, new: int, compile: bool = False, warm: bool = True) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s); decode = extra tokens / extra time beyond the first token."""
    run = lambda n: generate(model, ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True),  # noqa
                             compile=compile, policy=POLICY)
    with torch.inference_mode():
        if warm:
            run(2)  # warm-up (and compilation, for compiled paths)
            run(2)
        prefill = min(_timed(lambda: generate_prefill(model, ids, compile)) for _ in range(2))
        one = min(_timed(lambda: run(1)) for _ in range(2))
        full = _timed(lambda: TOKENS.__setitem__((id(model), compile), run(new)))
    return ids.numel() / prefill, ids.shape[0] * (new - 1) / (full - one)


def generate_prefill(model, ids: torch.Tensor, compile: bool) -> torch.Tensor:
    """The prompt's forward as generate() runs it: into a fresh cache, compiled with ``compile``."""
    B, T = ids.shape
    cache = StaticKVCache(B, T + 1, device=ids.device) if compile else KVCache.for_model(model, B, T + 1)
    return prefill(model, ids, cache, compile=compile, policy=POLICY)


TOKENS: dict = {}  # (model, compiled) -> the greedy tokens of the last timed run


def bench_hf(model, ids: torch.Tensor, new: int, warm: bool = True) -> tuple[float, float]:
    mask = torch.ones_like(ids)
    run = lambda n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa
                                   do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        if warm:
            run(2)
        prefill = min(_timed(lambda: model(ids, logits_to_keep=1)) for _ in range(2))
        one = min(_timed(lambda: run(1)) for _ in range(2))
        full = _timed(lambda: run(new))
    return ids.numel() / prefill, ids.shape[0] * (new - 1) / (full - one)


def random_models(preset: str, dtype: torch.dtype, device: str, hf: bool):
    """evolm's ``preset`` with random weights (normal(0, 0.02) as built) on ``device``, and
    transformers' model of the same config holding the same weights (None without ``hf``)."""
    from evolm.interop.hf import config_to_hf, state_dict_to_hf
    from evolm.model import build

    torch.manual_seed(0)
    ours = build(preset, device=device, dtype=dtype).eval()
    if not hf:
        return ours, None
    from transformers import AutoConfig, AutoModelForCausalLM

    h = config_to_hf(ours.config, dtype=dtype)
    with torch.device(device):
        ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**h), dtype=dtype)
    ref.load_state_dict(state_dict_to_hf(ours.state_dict(), ours.config), strict=False)
    return ours, ref.eval()


def quality(ref, model, tok_ids: list[list[int]], text_ids: torch.Tensor, new: int = 64) -> str:
    """Logit error on a real text and greedy agreement over ``new`` tokens on real prompts, vs ``ref``."""
    with torch.inference_mode():
        want, got = ref(text_ids).float(), model(text_ids).float()
        rel = ((got - want).norm() / want.norm()).item()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        p = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
        a, b = generate(ref, tok_ids, p), generate(model, tok_ids, p)
    same = [next((i for i, (x, y) in enumerate(zip(r, q)) if x != y), len(r)) for r, q in zip(a, b)]
    return (f"logits rel. error {rel:.2e}, next-token argmax agreement {top1:.1%} over {text_ids.shape[1]} "
            f"positions; greedy {new}-token continuations identical up to token {same} (of {new})")


QUALITY_TEXT = ("The history of the Roman Empire spans more than a thousand years. It began when Augustus "
                "became the first emperor in 27 BC and, in the west, ended in 476 AD. def fibonacci(n):\n"
                "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n")
QUALITY_PROMPTS = ["The capital of France is", "def quicksort(arr):", "Once upon a time, in a small village,",
                   "Photosynthesis is the process by which"]


def main() -> None:
    if "--defaults" in sys.argv:  # what a user gets without flags: one process per run (benchmarks/startup.py)
        import startup

        sys.argv.remove("--defaults")
        return startup.main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--int8", action="store_true", help="also run evolm with int8 weight-only linears")
    ap.add_argument("--int4", action="store_true", help="also run evolm with int4 (group 32) linears, int8 head")
    ap.add_argument("--blocks", action="store_true",
                    help="also run evolm keeping the file's quantized blocks (fp32 arithmetic, exact weights)")
    ap.add_argument("--compile", action="store_true", help="also run each evolm variant with the compiled step")
    ap.add_argument("--only-compiled", action="store_true", help="with --compile: skip the eager evolm variants")
    ap.add_argument("--block-step", action="store_true",
                    help="also run the CPU defaults: the file's blocks, fused, each block's decode step in C++")
    ap.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up (fuse_for_inference) in evolm variants")
    ap.add_argument("--kernels-ab", action="store_true",
                    help="build each quantized variant twice: with evolm's int8-activation kernels and with torch's")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per engine (interleaved); median printed")
    ap.add_argument("--quality", action="store_true", help="print quantized variants' error vs the float model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (llama.cpp only runs with cpu)")
    ap.add_argument("--random", default=None, metavar="PRESET",
                    help="random weights of this evolm preset instead of a GGUF file (speed only)")
    ap.add_argument("--peak-gbs", type=float, default=4800.0,
                    help="the device's peak memory bandwidth in GB/s for the utilisation column (cuda)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random:
        path = args.random
    else:
        path = args.model if args.model.endswith(".gguf") else find_asset(args.model)
    on_gpu = args.device != "cpu"
    if on_gpu:
        print(f"device {torch.cuda.get_device_name()}, bandwidth utilisation against {args.peak_gbs:,.0f} GB/s")
    print(f"model {os.path.basename(path)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.prompt_len}-token prompt, {args.new} new tokens, {args.repeat} timed run(s) per engine"
          + (", evolm variants fused (fuse_for_inference)" if args.fuse else ""))
    peak = args.peak_gbs
    if not on_gpu:
        read, copy = host_bandwidth(torch.get_num_threads())
        peak = read
        print(f"host memory bandwidth, {torch.get_num_threads()} threads: read {read:,.1f} GB/s, copy {copy:,.1f} GB/s "
              "(STREAM convention); the GB/s column is against the read figure")
    cpp_runs = {}  # batch -> llama.cpp context (its own batch API: one sequence id per row)
    if not (on_gpu or args.random or args.no_llamacpp):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (make bench-deps), no llama.cpp rows")
        else:
            n_ctx = args.prompt_len + args.new + 8
            cpp_runs = {b: LlamaCppBatch(path, b, n_ctx, torch.get_num_threads()) for b in map(int, args.batches.split(","))}
    cpp_tokens = {}
    step_bytes = {}  # (dtype, batch, engine) -> bytes a decode step reads
    rows, notes = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf = tok = None
        if args.random:
            ours, hf = random_models(args.random, dtype, args.device, not args.no_hf)
        else:
            ours, tok = load_gguf(path, dtype=dtype)
            ours = ours.to(args.device).eval()
            if not args.no_hf:
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=dtype).to(args.device).eval()

        def fresh(blocks=False):
            m = (random_models(args.random, dtype, args.device, False)[0] if args.random
                 else load_gguf(path, dtype=dtype, blocks=blocks)[0].to(args.device).eval())
            return m.fuse_for_inference() if args.fuse else m
        models = [("evolm", fresh() if args.fuse else ours)]
        if args.blocks and not args.random:
            models.append(("evolm blocks", fresh(blocks=True)))
        if args.block_step and not args.random and args.device == "cpu":
            from evolm.infer import block_step  # what `evolm generate` prepares on the CPU by default

            m = fresh(blocks=True).fuse_for_inference()
            block_step.attach(m)
            models.append(("evolm blocks+fuse+block step (defaults)", m))
        default_kernels = POLICY.quant_kernels
        for use in ([default_kernels, not default_kernels] if args.kernels_ab else [default_kernels]):
            policy = replace(POLICY, quant_kernels=use)  # taken by each layer when it is quantized
            tag = (" (evolm kernels)" if use else " (torch kernels)") if args.kernels_ab else ""
            if args.int8:
                models.append(("evolm int8" + tag, quantize_int8(fresh(), policy=policy)))
            if args.int4:
                models.append(("evolm int4" + tag, quantize_int4(fresh(), group_size=32, policy=policy)))
        variants = [] if args.compile and args.only_compiled else [(n, m, False) for n, m in models]
        if args.compile:
            variants += [(n + " compiled", m, True) for n, m in models]
        if args.quality and tok is not None:
            text = torch.tensor([tok.encode(QUALITY_TEXT)])
            prompts = [tok.encode(p) for p in QUALITY_PROMPTS]
            for name, m in models[1 if not args.fuse else 0:]:
                notes.append(f"{dtype_name} {name} vs {dtype_name} evolm: {quality(ours, m, prompts, text)}")
        for b in map(int, args.batches.split(",")):
            ids = _prompt(ours.config.vocab_size, b, args.prompt_len).to(args.device)
            mean_len = args.prompt_len + args.new / 2
            kv_bytes = torch.finfo(dtype).bits // 8
            step_bytes[dtype_name, b, "transformers"] = model_step_bytes(ours, b, mean_len, kv_bytes)  # same weights
            for name, m, _ in variants:
                step_bytes[dtype_name, b, name] = model_step_bytes(m, b, mean_len, kv_bytes)
            engines = []
            if hf is not None:
                engines.append(("transformers", lambda warm, hf=hf: bench_hf(hf, ids, args.new, warm)))
            for name, m, c in variants:
                engines.append((name, lambda warm, m=m, c=c: bench_evolm(m, ids, args.new, c, warm)))
            if b in cpp_runs and (dtype_name, b) == next((d, b) for d in args.dtypes.split(",")):  # once per batch
                cpp_name = f"llama.cpp ({os.path.basename(path).split('.')[-2]})"
                step_bytes[dtype_name, b, cpp_name] = gguf_step_bytes(path, b, mean_len)

                def run_cpp(warm, b=b, ids=ids):
                    prefill_rate, decode_rate, toks = cpp_runs[b].run(ids.cpu(), args.new)
                    cpp_tokens[b] = toks
                    return prefill_rate, decode_rate
                engines.append((cpp_name, run_cpp))
            times = {name: [] for name, _ in engines}
            for name, fn in engines:
                fn(True)  # warm-up, compilation
            for _ in range(args.repeat):
                for name, fn in engines:
                    times[name].append(fn(False))
            ref = None
            if "transformers" in times:
                hf_runs = times["transformers"]
                ref = (median_spread([p for p, _ in hf_runs])[0], median_spread([d for _, d in hf_runs])[0])
            for name, m, c in variants:  # the compiled step must decode the same tokens as the eager loop
                if c and (id(m), False) in TOKENS:
                    same = TOKENS[id(m), True] == TOKENS[id(m), False]
                    notes.append(f"{dtype_name} batch {b} {name}: greedy tokens {'equal' if same else 'DIFFER from'} "
                                 f"the eager loop's")
            for name, runs in times.items():
                p, d = median_spread([x for x, _ in runs]), median_spread([y for _, y in runs])
                rows.append((dtype_name, b, name, p, d, None if name == "transformers" else ref))
                print(f"  {dtype_name} batch {b} {name}: prefill {p[0]:,.0f}, decode {d[0]:,.1f} tok/s", flush=True)
        del hf
    peak_name = "peak" if on_gpu else "host read"
    print(f"\n| dtype | batch | engine | prefill tok/s | decode tok/s | vs transformers (prefill / decode) "
          f"| MB read per step | decode GB/s (% of {peak_name}) |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name, b, name, p, d, ref in rows:
        ratio = f"{p[0] / ref[0]:.2f}x / {d[0] / ref[1]:.2f}x" if ref else ""
        spread = lambda x: f" ±{x[1]:.0%}" if args.repeat > 1 else ""  # noqa: E731
        extra = " | |"
        if step_bytes.get((dtype_name, b, name)):
            gbs = step_bytes[dtype_name, b, name] * d[0] / b / 1e9  # steps/s = tokens/s / batch
            extra = f" {step_bytes[dtype_name, b, name] / 1e6:,.0f} | {gbs:,.1f} ({gbs / peak:.0%}) |"
        print(f"| {dtype_name} | {b} | {name} | {p[0]:,.0f}{spread(p)} | {d[0]:,.1f}{spread(d)} | {ratio} |{extra}")
    for b, toks in sorted(cpp_tokens.items()):  # the batched driver must decode what one sequence does
        if 1 in cpp_tokens and b != 1:
            one, row = cpp_tokens[1][0], toks[0]
            shared = next((i for i, (x, y) in enumerate(zip(one, row)) if x != y), len(one))
            notes.append(f"llama.cpp batch {b}: row 0 shares {shared} of {len(one)} greedy tokens with batch 1 "
                         "(same prompt; llama.cpp's sums differ with the batch shape)")
    for ctx in cpp_runs.values():
        ctx.close()
    for n in notes:
        print("\n" + n)


if __name__ == "__main__":
    main()
