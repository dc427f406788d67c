"""Mamba, Mamba-2 and hybrids on CPU: evolm vs transformers' MambaForCausalLM / Mamba2ForCausalLM /
JambaForCausalLM (their slow PyTorch paths), same weights, and decode time per token against the context length.

Builds evolm's preset (``mamba-130m`` by default; ``--preset mamba2-130m`` for Mamba-2) with random
weights and transformers' model from the same config.json and the same tensors (``interop/hf.py``;
greedy tokens of random weights mean nothing, the speed is that of the real shape). Without the CUDA
kernels (``mamba_ssm``, ``causal_conv1d``) transformers runs its reference scans (Mamba: one step per
token with a matmul read-out; Mamba-2: the SSD chunks in einsums); evolm runs ``nn/mamba.py``'s
chunked scan or ``nn/mamba2.py``'s SSD chunks (heads grouped, states passed chunk to chunk). Both are timed in one process, interleaved, ``--repeat``
times, and reported as median and spread (the machine may be shared):

- prefill tokens/s of a ``--prompt-len`` prompt (one forward with a cache);
- decode tokens/s of ``--new`` greedy tokens (each library's own generate), excluding the first;
- decode seconds per token at each context of ``--contexts``: each context is read into its own
  cache, then ``--steps`` single-token steps go round the contexts (median and spread over the steps). A Mamba layer's state has the same size at any length,
  so the curve should be flat (an attention layer's step reads a cache that grows with it).

    python benchmarks/ssm.py [--preset mamba-130m | mamba2-130m] [--layers N] [--prompt-len 256] [--new 32]
                             [--contexts 256,1024,2048,4096,8192] [--steps 16] [--repeat 3]
                             [--threads 1] [--out runs/ssm] [--set FIELD=VALUE ...]
    python benchmarks/ssm.py --preset jamba-v0.1 --layers 8 --set d_model=512 d_ff=1024 n_heads=8 \
        n_kv_heads=2 mamba_dt_rank=32 vocab_size=32000      # a Jamba block of 8 layers at a CPU width

Writes ``decode_vs_context.png`` (matplotlib; a text table ``decode_vs_context.txt`` without it)
and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import evolm  # noqa: E402
from evolm.cache import KVCache  # noqa: E402
from evolm.infer.decode import generate  # noqa: E402
from evolm.infer.sampling import SamplingParams  # noqa: E402
from evolm.interop.hf import config_to_hf, state_dict_to_hf  # noqa: E402
from evolm.presets import get_preset  # noqa: E402
from stats import median_spread  # noqa: E402  (benchmarks/stats.py)


def build_pair(preset: str, layers: int | None, overrides: dict | None = None):
    """evolm's preset with random weights and transformers' model of its family (MambaForCausalLM,
    JambaForCausalLM) holding the same tensors."""
    import transformers

    overrides = dict(overrides or {}, **({"n_layers": layers} if layers else {}))
    torch.manual_seed(0)
    ours = evolm.build(get_preset(preset, **overrides)).eval()
    h = config_to_hf(ours.config)
    hc = transformers.AutoConfig.for_model(**{k: v for k, v in h.items() if k != "architectures"},
                                           use_mambapy=False, use_associative_scan=False)
    hf = getattr(transformers, h["architectures"][0])(hc).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), ours.config, fused_experts=True),
                                             strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weights do not line up: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return ours, hf


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prefill_rates(ours, hf, ids: torch.Tensor) -> dict[str, float]:
    """Seconds to read ``ids`` into a fresh cache, each engine once."""
    def evolm_prefill():
        ours(ids, cache=KVCache.for_model(ours, ids.shape[0], ids.shape[1] + 1), last_only=True)

    def hf_prefill():
        hf(ids, use_cache=True, logits_to_keep=1)
    return {"evolm": timed(evolm_prefill), "transformers": timed(hf_prefill)}


def decode_rates(ours, hf, ids: torch.Tensor, new: int) -> dict[str, float]:
    """Seconds per decoded token beyond the first (generate of ``new`` minus generate of 1)."""
    def ev(n):
        return timed(lambda: generate(ours, ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)))

    def tf(n):
        return timed(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False))
    return {"evolm": (ev(new) - ev(1)) / (new - 1), "transformers": (tf(new) - tf(1)) / (new - 1)}


def decode_vs_context(model, contexts: list[int], steps: int) -> dict[int, list[float]]:
    """Seconds of each of ``steps`` decode steps after ``n`` tokens are in the cache, for every ``n`` of
    ``contexts``: every context is read into its own cache first, then the steps go round the
    contexts, so that a change of the machine's load falls on all of them alike."""
    caches, last = {}, {}
    for n in contexts:
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        caches[n] = KVCache.for_model(model, 1, n + steps + 2)
        model(ids, cache=caches[n], last_only=True)
        last[n] = ids[:, -1:]
    for n in contexts:  # one untimed step each: the first after a long prefill can pay allocator work
        model(last[n], cache=caches[n], last_only=True)
    times: dict[int, list[float]] = {n: [] for n in contexts}
    for _ in range(steps):
        for n in contexts:
            times[n].append(timed(lambda: model(last[n], cache=caches[n], last_only=True)))
    return times


def plot(contexts: list[int], per_token: list[float], spreads: list[float], out: Path, title: str,
         label: str = "Mamba") -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = out / "decode_vs_context.txt"
        path.write_text("context  ms/token\n" + "".join(f"{c:>7}  {1e3 * t:.2f}\n" for c, t in zip(contexts, per_token)))
        return path
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ms = [1e3 * t for t in per_token]
    ax.errorbar(contexts, ms, yerr=[m * s for m, s in zip(ms, spreads)], marker="o", capsize=3, label=f"evolm {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
    ax.set_ylim(0, max(ms) * 1.3)
    ax.set_xlabel("context (tokens in the cache)")
    ax.set_ylabel("decode ms / token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "decode_vs_context.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mamba-130m")
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (a shorter run of the same width)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--contexts", default="256,1024,2048,4096,8192")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/ssm")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="ModelConfig overrides, values as JSON (a smaller jamba-v0.1: d_model=512 n_experts=4 ...)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ours, hf = build_pair(a.preset, a.layers, {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)})
    c = ours.config
    shape = f"{a.preset} shape ({c.n_layers} layers, d_model {c.d_model}{', ' + ' '.join(a.set) if a.set else ''}), " \
        f"random weights, fp32, {a.threads} thread(s)"
    print(shape)
    ids = torch.randint(3, c.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(ids[:, :64]).logits
        logits_diff = (ours(ids[:, :64]) - ref).abs().max().item()
        print(f"same weights: logits max |diff| over 64 tokens = {logits_diff:.2e} "
              f"(largest |logit| {ref.abs().max().item():.3g})")
        pre = {"evolm": [], "transformers": []}
        dec = {"evolm": [], "transformers": []}
        for _ in range(a.repeat):  # interleaved: both engines see the same load
            for k, v in prefill_rates(ours, hf, ids).items():
                pre[k].append(a.prompt_len / v)
            for k, v in decode_rates(ours, hf, ids[:, :16], a.new).items():
                dec[k].append(1 / v)
        results = {"shape": shape, "logits_max_abs_diff": logits_diff, "prefill_tok_s": {}, "decode_tok_s": {}}
        for name, table in (("prefill", pre), ("decode", dec)):
            for engine, xs in table.items():
                med, spread = median_spread(xs)
                results[f"{name}_tok_s"][engine] = {"median": med, "spread": spread, "runs": xs}
                print(f"{name:8s} {engine:13s} {med:9.1f} tok/s  (+-{100 * spread:.0f}%, {a.repeat} runs)")
            r = results[f"{name}_tok_s"]
            print(f"{name:8s} evolm / transformers: {r['evolm']['median'] / r['transformers']['median']:.2f}x")
        contexts = [int(x) for x in a.contexts.split(",")]
        # each context read once (its prefill dominates the run), the spread over its --steps decode steps
        per_ctx = decode_vs_context(ours, contexts, a.steps)
        meds, spreads = zip(*(median_spread(per_ctx[n]) for n in contexts))
        results["decode_s_per_token_at_context"] = {str(n): {"median": m, "spread": s} for n, m, s in
                                                    zip(contexts, meds, spreads)}
        for n, m, s in zip(contexts, meds, spreads):
            print(f"decode at context {n:>5}: {1e3 * m:6.2f} ms/token (+-{100 * s:.0f}%)")
    path = plot(contexts, list(meds), list(spreads), out, f"{a.preset} decode time per token vs context\n" + shape)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {path} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
