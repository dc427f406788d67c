"""``evolm data synthesize`` generation speed: tokens per second at several ``--batch`` sizes.

The same prompts (the first ``--topics-n`` lines of recipes/textbook-topics.txt in the textbook
template, chat-wrapped), the same seed and settings, one folder per batch size; the model is
loaded once per batch size as the command loads it (the fast path ``choose_path`` picks: a GGUF
file's blocks kept, projections fused). Generation tokens per second is the command's own figure
(completion tokens / wall time from the first request to the last text, loading excluded). The
texts must be the same bytes at every batch size (each has its own seed; the engine's logits do
not depend on the company): the script says whether they are.

    .venv/bin/python benchmarks/synthesize.py --model smollm2 --batches 1,8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Write a textbook section for students about {topic}. Explain it clearly, with an example."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a model path, or smollm2 / gemma3 (the installed GGUFs)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--topics-n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/synthesize-bench")
    ap.add_argument("--json", default=None, help="append one JSON line per batch size to this file")
    args = ap.parse_args()

    import torch

    from evolm.data.synthesize import SynthesisConfig, synthesize

    torch.set_num_threads(args.threads)
    model = args.model
    if model in ("smollm2", "gemma3"):
        from evolm.interop.gguf import find_asset

        model = str(find_asset(model))
    out = Path(args.out)
    topics = out / "topics.txt"
    out.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "recipes/textbook-topics.txt").read_text().splitlines()[:args.topics_n]
    topics.write_text("\n".join(lines) + "\n")
    texts = {}
    for b in (int(x) for x in args.batches.split(",")):
        folder = out / f"batch-{b}"
        shutil.rmtree(folder, ignore_errors=True)
        config = SynthesisConfig(model=model, out=str(folder), topics=str(topics), template=TEMPLATE, chat=True,
                                 max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=0, batch=b)
        m = synthesize(config, log=lambda s: print(s, file=sys.stderr, flush=True))
        s = m["sessions"][-1]
        texts[b] = (folder / "generated.jsonl").read_text().splitlines()
        row = {"model": Path(model).name, "batch": b, "threads": args.threads, "texts": s["texts"],
               "tokens": s["tokens"], "seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"]}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    by_key = {b: sorted((r["i"], r["j"], r["text"]) for r in map(json.loads, t)) for b, t in texts.items()}
    same = len({json.dumps(v) for v in by_key.values()}) == 1  # text for text, by (prompt, sample)
    print(f"texts identical across batch sizes {sorted(texts)}: {same}", flush=True)


if __name__ == "__main__":
    main()
