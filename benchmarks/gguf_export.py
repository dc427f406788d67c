"""GGUF export, checked three ways per family and type: evolm, transformers and llama.cpp read the file.

For every family evolm exports (tiny random models of each, plus the real SmolLM2-135M-Instruct
and Gemma 3 270M re-exported from their GGUFs) and every ``--types`` entry, writes the file with
``evolm.interop.gguf_export.export_gguf`` and prints one markdown row:

- ``evolm``: max |logit difference| between the source model and evolm reading the file back
  (0 means bit-equal; for f16 / bf16 / q* it is the rounding of the weights), and the share of
  positions whose top-1 token is unchanged, on a 48-token text;
- ``transformers``: max |logit difference| between transformers' GGUF loader and evolm on the same
  file (``-`` where transformers' loader cannot express the config: it takes head_dim, Gemma's
  query scale and RoPE scaling from its defaults, and has no OLMo 2 GGUF loader);
- ``llama.cpp``: how many of ``--new`` greedy tokens llama.cpp (llama-cpp-python, one thread)
  shares with evolm decoding the same file, from a fixed prompt;
- file size and seconds to export.

    python benchmarks/gguf_export.py [--types f32,f16,bf16,q8_0,q4_0,q4_k_m] [--families tiny,smollm2,gemma3]
                                     [--tiny gpt2,mixtral,...] [--new 16] [--out /tmp/gguf-export]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from evolm.infer.decode import generate  # noqa: E402
from evolm.infer.sampling import SamplingParams  # noqa: E402
from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402
from evolm.interop.gguf_export import export_gguf  # noqa: E402

# tiny random models (tests/test_gguf_export.py's configs); those transformers' GGUF loader can express
TINY = ["llama", "llama-plain", "qwen2", "qwen3-hd", "gemma2-hd", "gemma3-hd", "olmo2", "qwen3", "gemma3",
        "gpt2", "gpt2-hf", "mixtral", "qwen3moe", "qwen3moe-hf", "deepseek3", "deepseek2"]
HF_OK = {"qwen2", "qwen3-hd", "gemma2-hd", "gemma3-hd", "llama-plain", "smollm2", "gemma3-270m", "gpt2-hf",
         "qwen3moe-hf"}


def tiny_models(names: list[str]):
    import test_gguf_export as t  # the tests' tiny configs and tokenizers, one definition

    bpe, spm = t.make_bpe(), t.make_spm()
    for name in names:
        yield name, t.random_model(name), t.tokenizer_for(name, bpe, spm)


def real_models(which: list[str]):
    for alias, label in (("smollm2", "smollm2"), ("gemma3", "gemma3-270m")):
        if alias in which:
            model, tok = load_gguf(find_asset(alias))
            yield label, model, tok


def greedy_evolm(model, ids, n):
    return generate(model, [ids], SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))[0]


def greedy_llama_cpp(path, ids, n, n_ctx: int = 256):
    """``n`` greedy tokens that llama.cpp (llama-cpp-python, one thread) decodes from the file after ``ids``."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=64, verbose=False, seed=0)
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    del llm
    return out


def shared_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def row(label, model, tok, qtype, out: Path, n_new: int, has_llama_cpp: bool) -> str:
    path = out / f"{label}-{qtype}.gguf"
    t0 = time.perf_counter()
    export_gguf(model, path, tok, qtype)
    secs = time.perf_counter() - t0
    back, tok2 = load_gguf(path)
    text = "The quick brown fox jumps over the lazy dog. But soft, what light through yonder window breaks?"
    ids = torch.tensor([tok.encode(text)[:48]])
    with torch.no_grad():
        ref, got = model(ids), back(ids)
    d_evolm = (ref - got).abs().max().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    d_hf = "-"
    if label in HF_OK:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            d_hf = f"{(hf(ids).logits - got).abs().max().item():.1e}"
        del hf
    cpp = "-"
    if has_llama_cpp:
        prompt = ids[0, :12].tolist()
        want = greedy_evolm(back, prompt, n_new)
        cpp = f"{shared_prefix(greedy_llama_cpp(path, prompt, n_new), want)}/{n_new}"
    size = path.stat().st_size / 2**20
    path.unlink()
    return f"| {label} | {qtype} | {d_evolm:.1e} | {100 * top1:.0f}% | {d_hf} | {cpp} | {size:.1f} | {secs:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0")
    ap.add_argument("--families", default="tiny,smollm2,gemma3")
    ap.add_argument("--tiny", default=",".join(TINY), help="which tiny models 'tiny' means")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--out", default="/tmp/gguf-export")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    try:
        import llama_cpp  # noqa: F401
        has_llama_cpp = True
    except ImportError:
        has_llama_cpp = False
    which = args.families.split(",")
    models = [*(tiny_models(args.tiny.split(",")) if "tiny" in which else []), *real_models(which)]
    print("| model | type | evolm: max abs dlogit | top-1 kept | transformers vs evolm | llama.cpp greedy = evolm "
          "| MiB | export s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, model, tok in models:
        for qtype in args.types.split(","):
            print(row(label, model, tok, qtype, out, args.new, has_llama_cpp), flush=True)


if __name__ == "__main__":
    main()
