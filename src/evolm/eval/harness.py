"""``evolm eval``: score a model on benchmarks and write lm-eval-shaped results.

``evaluate`` gathers every request of every task, scores the log-likelihood ones in one batched
pass through ``LoglikScorer`` and the generate-until ones through ``generation.generate_until``
(both cached per request next to ``out``, so a killed run resumes), runs generated code in the
sandbox, then applies lm-eval's metrics. Task names: the multiple-choice tasks of ``tasks.py``,
``mmlu`` (57 subjects), ``truthfulqa`` (mc1 + mc2), the generative tasks of ``generative.py``
(``gsm8k_cot``, ``gsm8k``, ``humaneval``, ``humaneval_64``, ``mbpp``), and ``ppl:PATH``
(perplexity / bits-per-byte of a text file, folder or token shards; ``ppl:PATH@STRIDE`` for a
strided sliding window). The JSON has lm-eval's shape::

    {"results": {"arc_easy": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": ..}},
     "groups": {"mmlu": {...}}, "config": {...}, "n-samples": {"arc_easy": {"original": N, "effective": n}}}

MMLU: each subject is a task ``mmlu_<subject>``; the ``mmlu`` entry holds lm-eval's aggregate
(mean over all questions, ``weight_by_size``) as ``acc`` and the macro average over subjects as
``acc_macro``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np

from .generation import generate_until
from .generative import GEN_TASKS, GenTask, with_samples
from .loglik import LoglikScorer
from .tasks import Task, get_task


def _stderr(xs) -> float:
    """Sample standard deviation / sqrt(n): lm-eval's ``mean_stderr``."""
    n = len(xs)
    return float(np.std(np.asarray(xs, dtype=float), ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def bootstrap_perplexity_stderr(lls, iters: int = 100_000) -> float:
    """lm-eval's bootstrap stderr of ``perplexity = exp(-mean(ll))``, draw for draw.

    lm-eval (``bootstrap_stderr``) resamples in chunks of 1000, chunk i drawing with
    ``random.Random(i).choices(xs, k=n)``; ``choices`` takes ``xs[floor(random() * n)]`` and
    ``random()`` is MT19937's 53-bit double, which numpy's ``RandomState`` seeded with the same
    key array reproduces. So this is lm-eval's number (to float rounding), vectorised.
    """
    xs = np.asarray(lls, dtype=float)
    n = len(xs)
    if n < 2 or iters < 1:
        return float("nan")
    chunk = min(1000, iters)
    reps = []
    for i in range(iters // chunk):
        u = np.random.RandomState([i]).random_sample(chunk * n).reshape(chunk, n)
        reps.append(np.exp(-xs[np.floor(u * n).astype(np.int64)].mean(axis=1)))
    r = np.concatenate(reps)
    return float(np.std(r, ddof=1))


def score_task(task: Task, docs: list[dict], lls: list[list[tuple[float, bool]]],
               bootstrap_iters: int = 100_000) -> dict:
    """lm-eval's ``process_results`` + aggregation for one task, from per-doc request results."""
    out: dict[str, float] = {}
    if task.output_type == "loglikelihood":
        ll = [r[0][0] for r in lls]
        acc = [float(r[0][1]) for r in lls]
        out["perplexity"] = math.exp(-sum(ll) / len(ll))
        out["perplexity_stderr"] = bootstrap_perplexity_stderr(ll, bootstrap_iters)
        out["acc"], out["acc_stderr"] = float(np.mean(acc)), _stderr(acc)
        return out
    if "mc2" in task.metrics:  # TruthfulQA MC2: normalized probability mass of the true answers
        mass = []
        for doc, res in zip(docs, lls):
            p = np.exp(np.array([r[0] for r in res]))
            labels = np.array(doc["mc2_targets"]["labels"])
            mass.append(float((p / p.sum())[labels == 1].sum()))
        out["acc"], out["acc_stderr"] = float(np.mean(mass)), _stderr(mass)
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


def _resolve(name, data_dir, samples: int | None, temperature: float | None):
    """A task name -> ('mc', [Task]) | ('gen', [GenTask]) | ('ppl', (path, stride))."""
    if not isinstance(name, str):
        return ("gen", [name]) if isinstance(name, GenTask) else ("mc", [name])
    if name.startswith("ppl:"):
        spec = name[4:]
        path, _, stride = spec.rpartition("@") if "@" in spec and spec.rsplit("@", 1)[1].isdigit() else (spec, "", "")
        if not path:
            raise ValueError("ppl task needs a path: ppl:FILE_OR_FOLDER[@STRIDE]")
        return "ppl", (path, int(stride) if stride else None)
    if name in GEN_TASKS:
        t = GEN_TASKS[name]
        if samples and samples > 1:
            t = with_samples(t, samples, temperature if temperature is not None else 0.8)
        return "gen", [t]
    return "mc", get_task(name, data_dir)


def evaluate(model, tokenizer, tasks, limit: int | None = None, shots: int | None = None, batch_size: int = 8,
             out: str | Path | None = None, seed: int = 1234, data_dir=None, cache: bool = True,
             model_id: str = "", progress: bool = True, samples: int | None = None,
             temperature: float | None = None, max_length: int | None = None, code_workers: int = 4,
             bootstrap_iters: int = 100_000, share_context: bool = True) -> dict:
    """Run ``tasks`` (names or ``Task``; comma string allowed) and return lm-eval-shaped results.

    ``shots=None`` uses each task's default (0 for multiple choice, 8 for gsm8k_cot, 5 for gsm8k,
    3 for mbpp, as lm-eval); ``samples``/``temperature``: code tasks draw that many samples per
    problem (pass@k); ``max_length``: the context window (default the model's ``max_seq_len``);
    ``share_context=False``: one row per request, lm-eval's way (see ``evolm.eval.loglik``).
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    groups = {(t if isinstance(t, str) else t.name): _resolve(t, data_dir, samples, temperature) for t in tasks}
    cache_path = Path(str(out) + ".cache.jsonl") if (out and cache) else None
    scorer = LoglikScorer(model, tokenizer, batch_size=batch_size, cache_path=cache_path, max_length=max_length,
                          model_id=model_id, progress=progress, share_context=share_context)
    t0 = time.time()
    results, n_samples, group_results, notes, fewshot = {}, {}, {}, {}, {}

    # ---- log-likelihood tasks: every request of every task in one sorted, batched pass
    per_task: list[tuple[Task, list[dict], list[list[tuple[str, str]]], int]] = []
    flat: list[tuple[str, str]] = []
    for kind, ts in groups.values():
        if kind != "mc":
            continue
        for task in ts:
            docs = task.docs(data_dir)
            n_orig = len(docs)
            docs = docs[:limit] if limit else docs
            k = shots or 0
            prefixes = task.contexts(docs, k, seed, data_dir)
            reqs = [task.requests(d, p) for d, p in zip(docs, prefixes)]
            per_task.append((task, docs, reqs, n_orig))
            flat.extend(r for rs in reqs for r in rs)
            fewshot[task.name] = k
    answers = scorer.loglikelihood(flat) if flat else []
    n_requests = len(flat)
    pos = 0
    for task, docs, reqs, n_orig in per_task:
        lls = []
        for rs in reqs:
            lls.append(answers[pos:pos + len(rs)])
            pos += len(rs)
        results[task.name] = {"alias": task.name, **score_task(task, docs, lls, bootstrap_iters)}
        n_samples[task.name] = {"original": n_orig, "effective": len(docs)}
        if task.note:
            notes[task.name] = task.note

    # ---- generate-until tasks
    for kind, ts in groups.values():
        if kind != "gen":
            continue
        for task in ts:
            docs = task.docs(data_dir)
            n_orig = len(docs)
            docs = docs[:limit] if limit else docs
            ctxs = task.contexts(docs, shots, seed, data_dir)
            reqs = [(c, task.gen_kwargs) for c in ctxs for _ in range(task.repeats)]
            keys = [str(r) for _ in ctxs for r in range(task.repeats)] if task.repeats > 1 else None
            texts = generate_until(model, tokenizer, reqs, batch_size=batch_size, max_length=scorer.max_length,
                                   seed=seed, cache=scorer, progress=progress, keys=keys)
            resps = [texts[i * task.repeats:(i + 1) * task.repeats] for i in range(len(docs))]
            metrics = task.score(task, docs, resps)
            details = metrics.pop("_details", None)
            results[task.name] = {"alias": task.name, **metrics}
            n_samples[task.name] = {"original": n_orig, "effective": len(docs)}
            n_requests += len(reqs)
            fewshot[task.name] = task.num_fewshot if shots is None else shots
            if task.note:
                notes[task.name] = task.note
            if out:  # the generations themselves, next to the results, for inspection
                rows = [{"doc": i, "responses": r, **(details[i] if details else {})} for i, r in enumerate(resps)]
                Path(str(out) + f".{task.name}.samples.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # ---- perplexity of a corpus
    for name, (kind, spec) in groups.items():
        if kind != "ppl":
            continue
        from .perplexity import evaluate_perplexity

        path, stride = spec
        m = evaluate_perplexity(scorer, path, stride=stride, limit=limit)
        results[name] = {"alias": name, **m, "stride": stride, "max_length": scorer.max_length}
        n_samples[name] = {"original": m["n_docs"], "effective": m["n_docs"]}

    for gname, (kind, ts) in groups.items():
        if kind == "mc" and len(ts) > 1 and gname == "mmlu":
            n = np.array([n_samples[t.name]["effective"] for t in ts], dtype=float)
            accs = np.array([results[t.name]["acc"] for t in ts])
            errs = np.array([results[t.name]["acc_stderr"] for t in ts])
            micro = float((accs * n).sum() / n.sum())
            # lm-eval's pooled stderr of a size-weighted mean of subgroup means
            pooled = float(math.sqrt(np.nansum((n / n.sum()) ** 2 * errs ** 2)))
            group_results[gname] = {"alias": gname, "acc": micro, "acc_stderr": pooled,
                                    "acc_macro": float(accs.mean()), "n_subtasks": len(ts)}
            results[gname] = dict(group_results[gname])
    elapsed = time.time() - t0
    config = {"model": model_id, "num_fewshot": fewshot, "limit": limit, "batch_size": batch_size,
              "fewshot_seed": seed, "n_requests": n_requests, "eval_seconds": round(elapsed, 3),
              "requests_per_second": round(n_requests / elapsed, 3) if elapsed > 0 and n_requests else None,
              "max_length": scorer.max_length, "task_notes": notes}
    res = {"results": results, "groups": group_results, "config": config, "n-samples": n_samples}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res


def evaluate_in_training(model, tokenizer, tasks: list[str], limit: int, batch_size: int,
                         shots: int | None = None, seed: int = 1234, data_dir=None) -> dict[str, float]:
    """Benchmark scores at a training checkpoint, as flat ``{"arc_easy/acc_norm": 0.41, ...}``.

    Meant to be called from the pretraining loop every N steps (a recipe option), so score
    curves over training come for free. Side-effect free: no cache file, no output, no progress
    bar; the model is put in eval mode and its previous mode restored; Python's, NumPy's and
    torch's random states are saved and restored, so training continues exactly as it would have
    without the evaluation (sampled tasks use their own seeded generator).
    """
    import torch

    was_training = model.training
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    model.eval()
    try:
        res = evaluate(model, tokenizer, list(tasks), limit=limit, shots=shots, batch_size=batch_size, out=None,
                       seed=seed, data_dir=data_dir, cache=False, progress=False, bootstrap_iters=0)
    finally:
        model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
    flat: dict[str, float] = {}
    for task, metrics in res["results"].items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k and not k.startswith("n_"):
                flat[f"{task}/{k}"] = float(v)
    return flat


def markdown_table(res: dict) -> str:
    """lm-eval-style table: task | n | metric | value | stderr."""
    lines = ["| Task | n | Metric | Value | Stderr |", "|---|---:|---|---:|---:|"]
    ns = res.get("n-samples", {})
    for name, m in res["results"].items():
        n = ns.get(name, {}).get("effective", "")
        for key, val in m.items():
            if not isinstance(val, (int, float)) or isinstance(val, bool) or "stderr" in key \
                    or key.startswith("n_") or key in ("loglikelihood", "stride", "max_length"):
                continue
            err = m.get(f"{key}_stderr", float("nan"))
            if "," in key:  # lm-eval's "exact_match,strict-match" -> "exact_match_stderr,strict-match"
                err = m.get(key.replace(",", "_stderr,", 1), float("nan"))
            err_s = "" if err is None or (isinstance(err, float) and math.isnan(err)) else f"{err:.4f}"
            lines.append(f"| {name} | {n} | {key} | {val:.4f} | {err_s} |")
    return "\n".join(lines)


def add_eval_args(p) -> None:
    """The ``evolm eval`` arguments (cli.py calls this on its subparser)."""
    p.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint")
    p.add_argument("--tasks", default="", help="comma list, e.g. hellaswag,arc_easy,piqa,mmlu,gsm8k_cot,"
                                              "humaneval,truthfulqa,ppl:FILE[@STRIDE]")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot examples per prompt (default: each task's own, 0 for multiple choice)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="results JSON (per-request cache at OUT.cache.jsonl)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot selection seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--data-dir", default=None, help="benchmark data (default data/eval or $EVOLM_EVAL_DATA)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the request cache")
    p.add_argument("--samples", type=int, default=None, help="code tasks: samples per problem (pass@k)")
    p.add_argument("--temperature", type=float, default=None, help="code tasks with --samples: temperature")
    p.add_argument("--max-length", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--ppl", action="append", default=[], metavar="PATH[@STRIDE]",
                   help="also report perplexity / bits-per-byte of a text file, folder or token shards")


def main_cli(args) -> int:
    """Entry point for ``evolm eval`` (args from ``add_eval_args``)."""
    from evolm.infer.prepare import InferenceOptions, load_for_inference

    model, tok = load_for_inference(args.model, InferenceOptions(device="cpu", dtype=args.dtype))
    tasks = [t for t in (args.tasks or "").split(",") if t] + [f"ppl:{p}" for p in args.ppl]
    if not tasks:
        raise SystemExit("evolm eval: give --tasks and/or --ppl")
    res = evaluate(model, tok, tasks, limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                   out=args.out, seed=args.seed, data_dir=args.data_dir, cache=not args.no_cache,
                   model_id=str(args.model), samples=args.samples, temperature=args.temperature,
                   max_length=args.max_length)
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
