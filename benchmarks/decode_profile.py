"""Where a decode step's time goes: ``torch.profiler`` around compiled greedy decoding.

Loads a GGUF model (SmolLM2 by default), optionally fuses q/k/v and gate/up and quantizes it,
warms up ``generate(..., compile=True)``, then profiles ``--steps`` decode steps and prints the
operators by self CPU time (the quantized matmul kernels, the inductor graph's own kernels as
``Call CompiledFxGraph ...``, dynamo's guard check as ``TorchDynamo Cache Lookup``). Divide a row
by ``--steps`` for its time per token; the profiler itself adds overhead to every call.

    python benchmarks/decode_profile.py [--model smollm2|gemma3|PATH.gguf] [--quant int4|int8|blocks|none]
                                        [--dtype float32|bfloat16] [--no-fuse] [--steps 32]
                                        [--threads 2] [--rows 25]
                                        [--kernels]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import evolm.quant as quant  # noqa: E402
from evolm.quant import KernelPolicy  # noqa: E402
from evolm.infer import SamplingParams, generate  # noqa: E402
from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quant", choices=("int4", "int8", "blocks", "none"), default="int4",
                    help="blocks: keep the file's quantized blocks (load_gguf(blocks=True), fp32 arithmetic)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--kernels", action="store_true",
                    help="one row per inductor kernel of the graph (recompiles the step: minutes)")
    a = ap.parse_args()
    if a.kernels:
        torch._inductor.config.cpp.enable_kernel_profile = True
    torch.set_num_threads(a.threads)
    policy = KernelPolicy.from_env()  # the EVOLM_* switches, read once
    path = a.model if a.model.endswith(".gguf") else find_asset(a.model)
    model = load_gguf(path, tokenizer=False, dtype=getattr(torch, a.dtype), blocks=a.quant == "blocks")[0].eval()
    if not a.no_fuse:
        model.fuse_for_inference()
    if a.quant in ("int4", "int8"):
        getattr(quant, f"quantize_{a.quant}")(model, policy=policy)
    ids = torch.randint(100, min(model.config.vocab_size, 30000), (1, a.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    run = lambda n: generate(model, ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True),  # noqa
                             compile=True, policy=policy)
    with torch.inference_mode():
        run(4)  # compile (minutes the first time), then warm
        run(4)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            run(a.steps + 1)  # the prompt's prefill is in the profile too (aten::mm of the prompt)
    print(f"{path}, {a.dtype}, {a.quant}, fused={not a.no_fuse}, {a.threads} threads, {a.steps} decode steps")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
