"""k-quant GGUF export against llama.cpp's own quantizer, on a real model.

Loads a real GGUF (default: the SmolLM2-135M-Instruct asset), writes it as f32 with evolm, then
for every ``--types`` entry writes the same model two ways:

- ``evolm``: ``export_gguf(model, ..., qtype)`` (our Q4_K / Q5_K / Q6_K quantizers and
  llama-quantize's per-tensor mix);
- ``llama.cpp``: ``llama_cpp.llama_model_quantize`` of the f32 file with that file type (its
  reference quantizers, no importance matrix, one thread);

and prints one markdown row: tensors whose type and bytes are equal, blocks equal in the tensors
that differ (if any) and the largest dequantized difference, the file size, both quantization
times, and the greedy text llama.cpp decodes from each file (``--new`` tokens after a chat
prompt, one thread): equal bytes must give equal text.

    python benchmarks/gguf_kquants.py [--model smollm2] [--types q4_k_m,q5_k_m,q6_k] [--new 32]
                                      [--out /tmp/gguf-kquants]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolm.interop.gguf import GGUFFile, find_asset, load_gguf  # noqa: E402
from evolm.interop.gguf_export import TYPES, export_gguf  # noqa: E402

from gguf_export import greedy_llama_cpp  # noqa: E402  (benchmarks/gguf_export.py, the script's folder)

PROMPT = "What is the capital of France?"


def llama_cpp_quantize(src: Path, dst: Path, qtype: str) -> float:
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(gguf.LlamaFileType[TYPES[qtype][1]]), 1
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src}")
    return time.perf_counter() - t0


def compare(ours: Path, theirs: Path) -> tuple[int, int, str, float, dict]:
    """(tensors equal, tensors, share of equal blocks in the others, max |dequantized diff|, types used)."""
    import gguf

    a, b = GGUFFile(ours), GGUFFile(theirs)
    equal, blocks, same_blocks, worst, kinds = 0, 0, 0, 0.0, {}
    for name, t in a.tensors.items():
        kind = gguf.GGMLQuantizationType(t.ggml_type)
        kinds[kind.name] = kinds.get(kind.name, 0) + 1
        x, y = np.asarray(a.raw(name)), np.asarray(b.raw(name))
        if kind == b.tensors[name].ggml_type and np.array_equal(x, y):
            equal += 1
            continue
        size = gguf.GGML_QUANT_SIZES[kind][1]
        if kind == b.tensors[name].ggml_type:
            eq = (x.reshape(-1, size) == y.reshape(-1, size)).all(axis=1)
            blocks, same_blocks = blocks + eq.size, same_blocks + int(eq.sum())
        worst = max(worst, float(np.abs(a.tensor(name) - b.tensor(name)).max()))
    share = "-" if blocks == 0 else f"{same_blocks / blocks:.4%}"
    return equal, len(a.tensors), share, worst, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default="/tmp/gguf-kquants")
    ap.add_argument("--keep", action="store_true", help="keep the files (for evolm eval --ppl)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model, tok = load_gguf(find_asset(args.model) if not args.model.endswith(".gguf") else args.model)
    f32 = export_gguf(model, out / "f32.gguf", tok, "f32")
    if tok.chat_template:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    else:  # a base model (Gemma 3 270M): the plain question
        ids = tok.encode(PROMPT)
    base = greedy_llama_cpp(f32, ids, args.new, n_ctx=512)
    print(f"f32: {f32.stat().st_size / 2**20:.1f} MiB; llama.cpp greedy: {tok.decode(base)!r}")
    print("| type | tensors equal (type + bytes) | blocks equal in the rest | max abs dequantized diff | types "
          "| MiB | evolm s | llama.cpp s | llama.cpp text from evolm's file = from its own | same as f32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for qtype in args.types.split(","):
        t0 = time.perf_counter()
        ours = export_gguf(model, out / f"evolm-{qtype}.gguf", tok, qtype)
        t_ours = time.perf_counter() - t0
        theirs = out / f"llama-cpp-{qtype}.gguf"
        t_cpp = llama_cpp_quantize(f32, theirs, qtype)
        equal, total, share, worst, kinds = compare(ours, theirs)
        a, b = greedy_llama_cpp(ours, ids, args.new, n_ctx=512), greedy_llama_cpp(theirs, ids, args.new, n_ctx=512)
        mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"| {qtype} | {equal}/{total} | {share} | {worst:.1e} | {mix} | {ours.stat().st_size / 2**20:.1f} "
              f"| {t_ours:.1f} | {t_cpp:.1f} | {a == b} | {a == base} |", flush=True)
        print(f"  {qtype} text: {tok.decode(a)!r}")
        if not args.keep:
            ours.unlink()
            theirs.unlink()
    if not args.keep:
        f32.unlink()


if __name__ == "__main__":
    main()
