"""Encoder forward speed: transformers vs evolm on the same weights, same dtype, one process.

``--model`` picks the weights:

- ``minilm`` (the packaged all-MiniLM-L6-v2) or a BERT Hugging Face folder: real weights, loaded by
  both engines (``evolm.load`` and ``BertModel.from_pretrained``); both run to the last hidden
  states, the work a sentence-embedding or classification request does.
- a preset (``bert-base``, ``roberta-base``, ``modernbert-base``): evolm's random initialisation,
  written to transformers' masked-LM model through ``interop.hf``; both run to the vocabulary logits.

Each batch row has a different real length (row i: T - i * T // (2b); batch 1: all T), right-padded.
The outputs are checked to agree on the real tokens before timing; the engines are then timed
interleaved, many times, and the medians, their spread and the ratio to transformers are printed
(tokens per second counts the real tokens):

    python benchmarks/encoder.py [--model minilm|PATH|PRESET] [--dtypes float32,bfloat16] [--batches 1,32]
                                 [--lengths 128] [--repeat 10] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm import load  # noqa: E402
from evolm.interop.hf import config_to_hf, find_asset, state_dict_to_hf  # noqa: E402
from evolm.model import build  # noqa: E402
from evolm.presets import get_preset, list_presets  # noqa: E402
from stats import median_spread, sync  # noqa: E402  (benchmarks/stats.py)


def transformers_twin(model):
    """transformers' model of ``model``'s head class, holding ``model``'s weights."""
    import transformers
    h = config_to_hf(model.config)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in h.items() if k != "architectures"})
    hf = getattr(transformers, h["architectures"][0])._from_config(cfg, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=False)
    if unexpected or [k for k in missing if "decoder" not in k]:  # the tied decoder is not stored
        raise RuntimeError(f"weights did not transfer: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def engines(name: str, dtype: torch.dtype, device: torch.device) -> tuple[dict, int]:
    """{engine: f(ids, mask) -> output} for ``--model``, and the vocabulary size."""
    if name in list_presets():
        torch.manual_seed(0)
        ours = build(get_preset(name)).eval()
        hf = transformers_twin(ours).eval().to(device, dtype)
        ours = ours.to(device, dtype)
        return {"transformers": lambda x, m: hf(input_ids=x, attention_mask=m).logits,
                "evolm": lambda x, m: ours(x, attention_mask=m)}, ours.config.vocab_size
    from transformers import BertModel

    path = str(find_asset(name) if not os.path.isdir(name) else name)
    ours = load(path, dtype=dtype, device=device)[0].eval()
    hf = BertModel.from_pretrained(path, dtype=dtype, add_pooling_layer=False).to(device).eval()
    return {"transformers": lambda x, m: hf(input_ids=x, attention_mask=m).last_hidden_state,
            "evolm": lambda x, m: ours(x, attention_mask=m, return_hidden=True)}, ours.config.vocab_size


def batch(b: int, T: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids of ``b`` rows, row i of real length T - i * T // (2b) (batch 1: all T), right-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 30000), (b, T), generator=g)
    mask = torch.zeros(b, T, dtype=torch.long)
    for i in range(b):
        mask[i, :T - i * T // (2 * b)] = 1
    return (ids * mask).to(device), mask.to(device)


def time_pair(fns: dict, ids, mask, repeat: int) -> tuple[float, dict]:
    """Max |evolm - transformers| on the real tokens, and each engine's timings (interleaved)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():  # warm-up
            f(ids, mask)
            f(ids, mask)
        diff = (fns["evolm"](ids, mask) - fns["transformers"](ids, mask)).float()[mask.bool()].abs().max()
        for _ in range(repeat):
            for k, f in fns.items():
                sync()
                t = time.perf_counter()
                f(ids, mask)
                sync()
                times[k].append(time.perf_counter() - t)
    return float(diff), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm",
                    help="'minilm' (the packaged all-MiniLM-L6-v2), a BERT HF folder, or a preset (bert-base, ...)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--lengths", default="128", help="padded sequence lengths, comma-separated")
    ap.add_argument("--repeat", type=int, default=10, help="timed runs per engine (interleaved)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"model {args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}, {args.repeat} interleaved runs per engine")
    rows = []
    for dtype_name in args.dtypes.split(","):
        fns, vocab = engines(args.model, getattr(torch, dtype_name), device)
        for b, T in ((b, T) for T in map(int, args.lengths.split(",")) for b in map(int, args.batches.split(","))):
            ids, mask = batch(b, T, vocab, device)
            diff, times = time_pair(fns, ids, mask, args.repeat)
            print(f"  {dtype_name} batch {b} length {T}: max |evolm - transformers| {diff:.2e}")
            real = int(mask.sum())
            speeds = {k: median_spread([real / s for s in v]) for k, v in times.items()}
            for k, (tps, spread) in speeds.items():
                ratio = tps / speeds["transformers"][0]
                rows.append((dtype_name, b, T, k, tps, spread, ratio))
                print(f"  {dtype_name} batch {b} length {T} {k}: {tps:,.0f} tok/s ±{spread:.0%} ({ratio:.3f}x)",
                      flush=True)
        del fns
    print("\n| dtype | batch | length | engine | tok/s (real tokens) | vs transformers |")
    print("|---|---|---|---|---|---|")
    for dtype_name, b, T, k, tps, spread, ratio in rows:
        print(f"| {dtype_name} | {b} | {T} | {k} | {tps:,.0f} ±{spread:.0%} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
