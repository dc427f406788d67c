"""Evaluation speed: requests/s of evolm's harness vs lm-eval + transformers (HFLM), one process.

Same GGUF weights (SmolLM2-135M-Instruct Q4_1 by default, dequantized to fp32 by both), same
local data, same task and documents, same batch size. evolm runs ``evolm.eval.evaluate`` (no
request cache); lm-eval runs ``simple_evaluate`` with its own task YAML pointed at the local
JSONL (``lm_eval_adapter.local_task_dir``) and ``HFLM`` around the transformers model. Each side
is timed ``--repeat`` times, interleaved (the machine may be shared), and the median is printed
with the ratio evolm / lm-eval. The scores are printed too: they must agree. ``evolm (rows)`` is
evolm with ``share_context=False`` (one row per request, lm-eval's batching), to show what reading
each shared context once buys.

    python benchmarks/eval_speed.py [--task arc_easy] [--limit 40] [--batch-size 8] [--repeat 2]
                                    [--model smollm2|PATH.gguf] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import evolm
    from evolm.eval.harness import evaluate
    from evolm.eval.lm_eval_adapter import local_task_dir
    from evolm.interop.gguf import find_asset
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_asset(a.model) if not a.model.endswith(".gguf") else Path(a.model)
    model, tok = evolm.load(path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hft = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tdir = Path(tempfile.mkdtemp(prefix="evolm-evalspeed-"))
    (name,) = local_task_dir(tdir, tasks=[a.task])
    tm = TaskManager(include_path=str(tdir))
    lm = HFLM(pretrained=hf, tokenizer=hft, batch_size=a.batch_size)

    times: dict[str, list[float]] = {"evolm": [], "evolm (rows)": [], "lm-eval+transformers": []}
    scores: dict[str, dict] = {}
    n_req = None
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        ours = evaluate(model, tok, [a.task], limit=a.limit, batch_size=a.batch_size, cache=False, progress=False)
        times["evolm"].append(time.perf_counter() - t0)
        n_req = ours["config"]["n_requests"]
        scores["evolm"] = {k: ours["results"][a.task][k] for k in ("acc", "acc_norm") if k in ours["results"][a.task]}
        t0 = time.perf_counter()
        rows = evaluate(model, tok, [a.task], limit=a.limit, batch_size=a.batch_size, cache=False, progress=False,
                        share_context=False)
        times["evolm (rows)"].append(time.perf_counter() - t0)
        scores["evolm (rows)"] = {k: rows["results"][a.task][k] for k in scores["evolm"]}
        t0 = time.perf_counter()
        ref = simple_evaluate(lm, tasks=[name], limit=a.limit, num_fewshot=0, task_manager=tm, bootstrap_iters=0)
        times["lm-eval+transformers"].append(time.perf_counter() - t0)
        scores["lm-eval+transformers"] = {k: ref["results"][name][f"{k},none"] for k in scores["evolm"]}

    print(f"\n{a.task}, first {a.limit} docs = {n_req} requests, batch {a.batch_size}, "
          f"{torch.get_num_threads()} threads, fp32, {path.name}")
    print("| engine | median s | requests/s | scores |\n|---|---:|---:|---|")
    rps = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        rps[k] = n_req / med
        print(f"| {k} | {med:.1f} | {rps[k]:.2f} | {scores[k]} |")
    print(f"\nratio evolm / lm-eval+transformers: {rps['evolm'] / rps['lm-eval+transformers']:.2f}x, "
          f"evolm (rows) / lm-eval+transformers: {rps['evolm (rows)'] / rps['lm-eval+transformers']:.2f}x "
          f"(all runs: {times})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
