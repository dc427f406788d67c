"""``evolm eval``: score a model on benchmarks and write lm-eval-shaped results.

``evaluate`` gathers every request of every task, scores them in one batched pass through
``LoglikScorer`` (cached per request next to ``out``, so a killed run resumes), then applies
lm-eval's metrics. The JSON has lm-eval's shape::

    {"results": {"arc_easy": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": ..}},
     "groups": {"mmlu": {...}}, "config": {...}, "n-samples": {"arc_easy": {"original": N, "effective": n}}}

MMLU: each subject is a task ``mmlu_<subject>``; the ``mmlu`` entry holds lm-eval's aggregate
(mean over all questions, ``weight_by_size``) as ``acc`` and the macro average over subjects as
``acc_macro``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .loglik import LoglikScorer
from .tasks import Task, get_task


def _stderr(xs) -> float:
    """Sample standard deviation / sqrt(n): lm-eval's ``mean_stderr``."""
    n = len(xs)
    return float(np.std(np.asarray(xs, dtype=float), ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def score_task(task: Task, docs: list[dict], lls: list[list[tuple[float, bool]]]) -> dict:
    """lm-eval's ``process_results`` + aggregation for one task, from per-doc request results."""
    out: dict[str, float] = {}
    if task.output_type == "loglikelihood":
        ll = [r[0][0] for r in lls]
        acc = [float(r[0][1]) for r in lls]
        out["perplexity"] = math.exp(-sum(ll) / len(ll))
        out["perplexity_stderr"] = float("nan")  # lm-eval bootstraps this one; not reproduced
        out["acc"], out["acc_stderr"] = float(np.mean(acc)), _stderr(acc)
        return out
    acc, acc_norm = [], []
    for doc, res in zip(docs, lls):
        gold = task.doc_to_target(doc)
        ll = np.array([r[0] for r in res])
        acc.append(float(np.argmax(ll) == gold))
        if "acc_norm" in task.metrics:
            lens = np.array([float(len(c)) for c in task.doc_to_choice(doc)])
            acc_norm.append(float(np.argmax(ll / lens) == gold))
    out["acc"], out["acc_stderr"] = float(np.mean(acc)), _stderr(acc)
    if acc_norm:
        out["acc_norm"], out["acc_norm_stderr"] = float(np.mean(acc_norm)), _stderr(acc_norm)
    return out


def evaluate(model, tokenizer, tasks, limit: int | None = None, shots: int = 0, batch_size: int = 8,
             out: str | Path | None = None, seed: int = 1234, data_dir=None, cache: bool = True,
             model_id: str = "", progress: bool = True) -> dict:
    """Run ``tasks`` (names or ``Task``; comma string allowed) and return lm-eval-shaped results."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    groups: dict[str, list[Task]] = {}
    for t in tasks:
        groups[t if isinstance(t, str) else t.name] = get_task(t, data_dir) if isinstance(t, str) else [t]
    cache_path = Path(str(out) + ".cache.jsonl") if (out and cache) else None
    scorer = LoglikScorer(model, tokenizer, batch_size=batch_size, cache_path=cache_path,
                          model_id=model_id, progress=progress)
    t0 = time.time()
    per_task: list[tuple[Task, list[dict], list[list[tuple[str, str]]], int]] = []
    flat: list[tuple[str, str]] = []
    for ts in groups.values():
        for task in ts:
            docs = task.docs(data_dir)
            n_orig = len(docs)
            docs = docs[:limit] if limit else docs
            prefixes = task.contexts(docs, shots, seed, data_dir)
            reqs = [task.requests(d, p) for d, p in zip(docs, prefixes)]
            per_task.append((task, docs, reqs, n_orig))
            flat.extend(r for rs in reqs for r in rs)
    answers = scorer.loglikelihood(flat)
    elapsed = time.time() - t0

    results, n_samples, pos = {}, {}, 0
    for task, docs, reqs, n_orig in per_task:
        lls = []
        for rs in reqs:
            lls.append(answers[pos:pos + len(rs)])
            pos += len(rs)
        results[task.name] = {"alias": task.name, **score_task(task, docs, lls)}
        n_samples[task.name] = {"original": n_orig, "effective": len(docs)}
    group_results = {}
    for gname, ts in groups.items():
        if len(ts) > 1:  # MMLU
            n = np.array([n_samples[t.name]["effective"] for t in ts], dtype=float)
            accs = np.array([results[t.name]["acc"] for t in ts])
            errs = np.array([results[t.name]["acc_stderr"] for t in ts])
            micro = float((accs * n).sum() / n.sum())
            # lm-eval's pooled stderr of a size-weighted mean of subgroup means
            pooled = float(math.sqrt(np.nansum((n / n.sum()) ** 2 * errs ** 2)))
            group_results[gname] = {"alias": gname, "acc": micro, "acc_stderr": pooled,
                                    "acc_macro": float(accs.mean()), "n_subtasks": len(ts)}
            results[gname] = dict(group_results[gname])
    config = {"model": model_id, "num_fewshot": shots, "limit": limit, "batch_size": batch_size,
              "fewshot_seed": seed, "n_requests": len(flat), "eval_seconds": round(elapsed, 3),
              "requests_per_second": round(len(flat) / elapsed, 3) if elapsed > 0 else None,
              "task_notes": {t.name: t.note for t, *_ in per_task if t.note}}
    res = {"results": results, "groups": group_results, "config": config, "n-samples": n_samples}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res


def markdown_table(res: dict) -> str:
    """lm-eval-style table: task | n | metric | value | stderr."""
    lines = ["| Task | n | Metric | Value | Stderr |", "|---|---:|---|---:|---:|"]
    ns = res.get("n-samples", {})
    for name, m in res["results"].items():
        n = ns.get(name, {}).get("effective", "")
        for key in ("acc", "acc_norm", "acc_macro", "perplexity"):
            if key in m:
                err = m.get(f"{key}_stderr", float("nan"))
                err_s = "" if err is None or (isinstance(err, float) and math.isnan(err)) else f"{err:.4f}"
                lines.append(f"| {name} | {n} | {key} | {m[key]:.4f} | {err_s} |")
    return "\n".join(lines)


def add_eval_args(p) -> None:
    """The ``evolm eval`` arguments (cli.py calls this on its subparser)."""
    p.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint")
    p.add_argument("--tasks", required=True, help="comma list, e.g. hellaswag,arc_easy,piqa,mmlu")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="results JSON (per-request cache at OUT.cache.jsonl)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot selection seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--data-dir", default=None, help="benchmark data (default data/eval or $EVOLM_EVAL_DATA)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the request cache")


def main_cli(args) -> int:
    """Entry point for ``evolm eval`` (args from ``add_eval_args``)."""
    import torch

    import evolm

    model, tok = evolm.load(args.model, dtype=getattr(torch, args.dtype))
    res = evaluate(model, tok, args.tasks, limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                   out=args.out, seed=args.seed, data_dir=args.data_dir, cache=not args.no_cache,
                   model_id=str(args.model))
    print(markdown_table(res))
    c = res["config"]
    print(f"\n{c['n_requests']} requests in {c['eval_seconds']:.1f} s ({c['requests_per_second']} req/s)")
    if args.out:
        print(f"results written to {args.out}")
    return 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="evolm eval", description="evaluate a model on benchmarks")
    add_eval_args(p)
    return main_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
