"""``evolm data synthesize``: a corpus written by a model, cleaned like any other source.

"Textbooks Are All You Need" (Gunasekar et al. 2023, arXiv:2306.11644) trains phi-1 on ~1B
tokens of GPT-3.5-written "textbook" text, made diverse by asking for many topics and audiences,
and shows that such data can stand in for far more web text. This module makes that kind of
source with a model evolm runs: prompts come from a file, or from a template filled with seed
topics; each prompt is sampled ``n`` times; the texts go through the same quality filters and
exact / near-duplicate removal as every prepared source (``filters.py``, ``dedup.py``: a model
repeats itself, across samples and within one); what is kept is a JSONL file that ``data prepare``
and recipes read like any other source (``{"name": ..., "path": OUT/texts.jsonl}``).

Generation goes through the serving engine (``evolm.serve.scheduler.Engine``, continuous
batching: a finished text frees its row at once), with the model prepared the way ``generate``
and ``serve`` prepare it (``evolm.infer.prepare.choose_path``: a GGUF file's blocks kept, q/k/v
and gate/up fused). Each text has its own seed, derived from ``(seed, prompt, sample)``, and its
own random generator; the engine's logits do not depend on which other texts share a step (it
pads decode steps to ``min_decode_rows`` rows so that the CPU runs the same kernels alone or in a
crowd), so the output is the same bytes for any ``--batch`` -- greedy or sampled -- and a run that
is interrupted and started again gives what an uninterrupted one gives. (Above 8 rows a GGUF
file's block layers switch from their kernel to a dense product, another order of fp32 sums: keep
``--batch`` at 8 or below with kept blocks to keep that promise.)

The folder ``OUT``:

- ``generated.jsonl``: every text as it finished, appended and flushed at once -- nothing
  generated is lost, and a new run with the same settings generates only what is missing;
- ``texts.jsonl``: the kept texts, ``{"id", "text", "prompt", ...topic fields}``, in prompt order
  (rewritten whole, atomically, after each run);
- ``synthesis.json``: the manifest -- model, settings, counts generated / kept / dropped per
  reason, tokens, generation tokens per second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evolm.data.sources import DataError, Document

FORMAT = "evolm-synthetic/1"
GENERATED, TEXTS, MANIFEST = "generated.jsonl", "texts.jsonl", "synthesis.json"


class SynthesisError(DataError):
    """Bad synthesis input or settings: the message names the file, line, field or flag."""


@dataclass(frozen=True)
class SynthesisConfig:
    """What to generate and how to clean it (``evolm data synthesize``'s flags).

    ``prompts``: a ``.txt`` file (one prompt a line) or ``.jsonl`` (a ``"prompt"`` field a
    record). Or ``topics`` (``.txt``: one topic a line, the field ``{topic}``; ``.jsonl``: any
    fields) and a ``template`` naming them (``"Write a textbook section about {topic}."``).
    ``n``: samples per prompt. ``chat``: wrap each prompt as a user turn (the tokenizer's chat
    template). ``filters`` / ``filter_overrides``: a ``filters.py`` preset and its changes, as in a
    source spec. ``drop_truncated``: drop texts cut by ``max_new_tokens`` (kept by default).
    """

    model: str
    out: str
    prompts: str | None = None
    topics: str | None = None
    template: str | None = None
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch: int = 8
    chat: bool = False
    system: str | None = None
    filters: str = "gopher"
    filter_overrides: dict = field(default_factory=dict)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8
    drop_truncated: bool = False
    name: str = "synthetic"
    min_decode_rows: int = 4

    def check(self) -> None:
        """Every setting in range, before the model is loaded (a ValueError naming the flag)."""
        from evolm.data.filters import make_rules

        if (self.prompts is None) == (self.topics is None):
            raise SynthesisError("give either --prompts FILE or --topics FILE with --template")
        if self.topics is not None and not self.template:
            raise SynthesisError(f"--topics {self.topics}: needs --template naming its fields, e.g. "
                                 "--template 'Write a textbook section about {topic}.'")
        if self.prompts is not None and self.template:
            raise SynthesisError("--template fills --topics; with --prompts each line is already a prompt")
        for flag, value in (("--n", self.n), ("--batch", self.batch), ("--max-new-tokens", self.max_new_tokens)):
            if not (isinstance(value, int) and value >= 1):
                raise SynthesisError(f"{flag} must be an integer >= 1, got {value!r}")
        if not 0 < self.near_threshold <= 1:
            raise SynthesisError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")
        try:
            self.sampling(0)
        except ValueError as e:  # "SamplingParams: field 'top_p' must be ..." -> "--top-p must be ..."
            msg = str(e).removeprefix("SamplingParams: field ")
            name = msg.split("'")[1] if msg.startswith("'") else ""
            raise SynthesisError(f"--{name.replace('_', '-')}{msg[len(name) + 2:]}" if name else str(e)) from None
        make_rules(self.filters, self.filter_overrides)

    def sampling(self, seed: int):
        from evolm.infer.sampling import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              seed=seed)

    def generation_settings(self) -> dict:
        """The settings a generated text depends on (not the batch, not the cleaning)."""
        keep = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "chat",
                "system")
        return {k: getattr(self, k) for k in keep}


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and the fields it was made from (kept with its texts)."""

    text: str
    fields: dict = field(default_factory=dict)


# --- prompts -----------------------------------------------------------------------------------


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-empty lines ``(line number, text)`` of a UTF-8 text file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SynthesisError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def _records(path: Path, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` of a JSONL file (a ``.txt`` file gives ``{"line": text}``)."""
    out = []
    for lineno, line in _lines(path, what):
        if not path.name.endswith((".jsonl", ".json", ".ndjson")):
            out.append((lineno, {"line": line}))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SynthesisError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise SynthesisError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append((lineno, rec))
    if not out:
        raise SynthesisError(f"{path}: no {what}s (the file is empty)")
    return out


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a template, in order (``{{`` and ``}}`` are literal braces)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise SynthesisError(f"--template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    for f in names:
        if not f.isidentifier():
            raise SynthesisError(f"--template: field {{{f}}} must be a plain name like {{topic}}")
    return list(dict.fromkeys(names))


def load_prompts(config: SynthesisConfig) -> list[Prompt]:
    """The prompts of ``config``: its prompts file, or its template filled with each topic."""
    if config.prompts is not None:
        path = Path(config.prompts)
        prompts = []
        for lineno, rec in _records(path, "prompt"):
            text = rec.get("line", rec.get("prompt"))
            if not isinstance(text, str) or not text.strip():
                raise SynthesisError(f"{path}:{lineno}: expected a non-empty string field 'prompt' "
                                     f"(keys: {sorted(rec)})")
            prompts.append(Prompt(text, {k: v for k, v in rec.items() if k not in ("line", "prompt")}))
        return prompts
    path, names = Path(config.topics), template_fields(config.template)
    if not names:
        raise SynthesisError(f"--template {config.template!r} names no field: every prompt would be the same; "
                             "put {topic} in it, or give --prompts")
    prompts = []
    for lineno, rec in _records(path, "topic"):
        fields = {"topic": rec["line"]} if "line" in rec else rec
        missing = [f for f in names if f not in fields]
        if missing:
            raise SynthesisError(f"{path}:{lineno}: the template's field {{{missing[0]}}} is missing "
                                 f"(this record has: {sorted(fields)})")
        prompts.append(Prompt(config.template.format_map(fields), {f: fields[f] for f in names}))
    return prompts


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample ``sample`` of prompt ``prompt``: its own, whatever runs beside it."""
    digest = hashlib.blake2b(f"{seed}:{prompt}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# --- generation --------------------------------------------------------------------------------


def _read_generated(path: Path) -> dict[tuple[int, int], dict]:
    """The records already generated, by ``(prompt, sample)``; a line cut by a crash is dropped
    from the file (its text is generated again)."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    done, good = {}, 0
    for line in raw.splitlines(keepends=True):
        try:
            rec = json.loads(line) if line.endswith(b"\n") else None
        except json.JSONDecodeError:
            rec = None
        if rec is None:
            break
        done[(rec["i"], rec["j"])] = rec
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return done


def _settings_file(out: Path, config: SynthesisConfig, model_stamp: dict, prompts: list[Prompt]) -> None:
    """Write the generation settings, or check them against those of the texts already there."""
    settings = {"format": FORMAT, "model": model_stamp, "generation": config.generation_settings(),
                "prompts": hashlib.sha256(json.dumps([p.text for p in prompts]).encode()).hexdigest()}
    path = out / "settings.json"
    if path.exists() and (out / GENERATED).exists():
        old = json.loads(path.read_text())
        for key in ("model", "generation", "prompts"):
            if old.get(key) != settings[key]:
                what = {k: (old[key].get(k), v) for k, v in settings[key].items() if old[key].get(k) != v} \
                    if isinstance(settings[key], dict) and isinstance(old.get(key), dict) else "changed"
                raise SynthesisError(f"{out}: holds texts generated with other {key} settings ({what}); "
                                     f"use another --out, or delete {out / GENERATED} to start again")
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _model_stamp(model: str) -> dict:
    p = Path(model)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"path": str(p), "bytes": sum(f.stat().st_size for f in files)}


def generate_texts(model, tokenizer, jobs: list[tuple[int, int, list[int], Any]], batch: int,
                   on_text: Callable[[int, int, str, int, str], None], min_decode_rows: int = 4) -> dict:
    """Generate ``(prompt, sample, prompt ids, SamplingParams)`` jobs, at most ``batch`` at a time,
    calling ``on_text(prompt, sample, text, tokens, finish_reason)`` as each finishes (in the order
    they finish). Returns ``{"texts", "tokens", "seconds", "tokens_per_s"}`` of this call."""
    from evolm.serve.scheduler import DoneEvent, Engine, ErrorEvent, GenRequest, TokenEvent

    if not jobs:
        return {"texts": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": None}
    # max_batch >= 2 keeps the padding to min_decode_rows even at --batch 1: the same kernels alone
    engine = Engine(model, tokenizer, max_batch=max(batch, 2), min_decode_rows=min_decode_rows)
    for i, j, ids, params in jobs:
        try:
            engine.check(ids, params.max_new_tokens)
        except ValueError as e:
            raise SynthesisError(f"prompt {i + 1}: {e}") from None
    events: queue.Queue = queue.Queue()
    pieces: dict[int, list[str]] = {}
    counts: dict[int, int] = {}
    pending = list(reversed(range(len(jobs))))
    running = tokens = 0
    t0 = time.perf_counter()
    engine.start()
    try:
        while pending or running:
            while pending and running < batch:
                k = pending.pop()
                i, j, ids, params = jobs[k]
                engine.submit(GenRequest(list(ids), params, events.put, index=k))
                running += 1
            ev = events.get()
            if isinstance(ev, TokenEvent):
                pieces.setdefault(ev.index, []).append(ev.text)
                counts[ev.index] = counts.get(ev.index, 0) + 1
                continue
            running -= 1
            if isinstance(ev, ErrorEvent):
                i, j = jobs[ev.index][:2]
                raise SynthesisError(f"prompt {i + 1}, sample {j + 1}: generation failed: {ev.message}")
            assert isinstance(ev, DoneEvent)
            i, j = jobs[ev.index][:2]
            tokens += ev.completion_tokens
            on_text(i, j, "".join(pieces.pop(ev.index, [])) + ev.text, ev.completion_tokens, ev.finish_reason)
    finally:
        engine.stop()
    seconds = time.perf_counter() - t0
    return {"texts": len(jobs), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None}


# --- cleaning ----------------------------------------------------------------------------------


def clean(records: list[dict], config: SynthesisConfig, workers: int = 1) -> tuple[list[tuple[Document, dict]], dict]:
    """The records that survive, in order, and what was dropped per reason: texts cut at
    ``max_new_tokens`` (with ``drop_truncated``), each quality rule (``filter:<rule>``), exact and
    near duplicates of an earlier text -- the order and code of ``data prepare``."""
    from evolm.data.dedup import ExactDedup, NearDedup
    from evolm.data.filters import QualityFilter

    dropped: dict[str, int] = {}
    by_id = {f"{r['i']}-{r['j']}": r for r in records}
    docs = []
    for r in records:
        if config.drop_truncated and r["finish"] == "length":
            dropped["truncated"] = dropped.get("truncated", 0) + 1
            continue
        docs.append(Document(r["text"], config.name, f"{r['i']}-{r['j']}"))
    qf = QualityFilter(config.filters, config.filter_overrides, workers)
    kept = list(qf(docs))
    for rule, e in qf.report["removed"].items():
        dropped[f"filter:{rule}"] = e["docs"]
    for on, stage, reason in ((config.exact_dedup, ExactDedup, "exact_duplicate"),
                              (config.near_dedup, lambda: NearDedup(config.near_threshold, workers=workers),
                               "near_duplicate")):
        if on:
            dedup = stage()
            kept = list(dedup(kept))
            dropped[reason] = dedup.removed.get(config.name, {"docs": 0})["docs"]
    return [(d, by_id[d.doc_id]) for d in kept], dropped


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- the command -------------------------------------------------------------------------------


def synthesize(config: SynthesisConfig, inference=None, log: Callable[[str], None] | None = print) -> dict:
    """Generate what ``config.out`` still lacks, clean it, write the source; return the manifest.

    ``inference``: an :class:`evolm.infer.prepare.InferenceOptions` (default: float32 on the CPU,
    the fast path ``choose_path`` picks for the model).
    """
    from evolm.infer.prepare import InferenceOptions, choose_path, load_for_inference
    from evolm.infer.text import chat_prompt_ids

    log = log or (lambda s: None)
    config.check()
    prompts = load_prompts(config)
    options, why = choose_path(config.model, inference or InferenceOptions(device="cpu", dtype="float32"))
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise SynthesisError(f"--out {out}: exists and is not a folder")
    t_load = time.perf_counter()
    model, tok = load_for_inference(config.model, options)
    load_s = time.perf_counter() - t_load
    if config.chat and not getattr(tok, "chat_template", None):
        raise SynthesisError(f"{config.model}: the tokenizer has no chat template; drop --chat")
    from evolm.quant.blocks import KERNEL_ROWS, BlockLinear

    if config.batch > KERNEL_ROWS and any(isinstance(m, BlockLinear) for m in model.modules()):
        log(f"note: --batch {config.batch} > {KERNEL_ROWS}: steps of more rows compute the GGUF blocks as a dense "
            f"product (another order of sums), so texts may differ from those of a smaller --batch")
    out.mkdir(parents=True, exist_ok=True)
    _settings_file(out, config, _model_stamp(config.model), prompts)
    done = _read_generated(out / GENERATED)

    def ids_of(p: Prompt) -> list[int]:
        if config.chat:
            messages = ([{"role": "system", "content": config.system}] if config.system else [])
            return chat_prompt_ids(tok, messages + [{"role": "user", "content": p.text}])
        return list(tok.encode(p.text))

    jobs = []
    for i, p in enumerate(prompts):
        ids = None
        for j in range(config.n):
            if (i, j) not in done:
                ids = ids if ids is not None else ids_of(p)
                jobs.append((i, j, ids, config.sampling(sample_seed(config.seed, i, j))))
    log(f"{len(prompts)} prompts x {config.n}: {len(done)} texts already in {out / GENERATED}, "
        f"{len(jobs)} to generate (batch {config.batch}; {'; '.join(why)})")
    fh = open(out / GENERATED, "a", encoding="utf-8")
    progress = {"n": 0, "t": time.perf_counter()}

    def on_text(i: int, j: int, text: str, tokens: int, finish: str) -> None:
        rec = {"i": i, "j": j, "seed": sample_seed(config.seed, i, j), "prompt": prompts[i].text,
               **{k: v for k, v in prompts[i].fields.items() if k not in ("i", "j", "seed", "prompt", "text")},
               "text": text, "tokens": tokens, "finish": finish}
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        done[(i, j)] = rec
        progress["n"] += 1
        if time.perf_counter() - progress["t"] > 30 or progress["n"] == len(jobs):
            progress["t"] = time.perf_counter()
            log(f"  {progress['n']}/{len(jobs)} texts generated")

    try:
        session = generate_texts(model, tok, jobs, config.batch, on_text, config.min_decode_rows)
    finally:
        fh.close()
    records = [done[k] for k in sorted(done) if k[1] < config.n]  # a smaller --n than before: its first samples
    kept, dropped = clean(records, config)
    lines = []
    for d, r in kept:
        extra = {k: v for k, v in r.items() if k not in ("i", "j", "seed", "text", "tokens", "finish")}
        lines.append(json.dumps({"id": d.doc_id, "text": d.text, **extra}, ensure_ascii=False) + "\n")
    _write_atomic(out / TEXTS, "".join(lines))
    manifest = _manifest(out, config, options, records, kept, dropped, session, load_s)
    log(f"kept {manifest['kept']['texts']} of {len(records)} texts ({manifest['kept']['tokens']:,} tokens) in "
        f"{out / TEXTS}; dropped {dropped or 'none'}; generated {session['tokens']:,} tokens this run "
        f"({session['tokens_per_s'] or 0:.1f} tokens/s)")
    return manifest


def _manifest(out: Path, config: SynthesisConfig, options, records: list[dict], kept: list, dropped: dict,
              session: dict, load_s: float) -> dict:
    import torch

    path = out / MANIFEST
    old = json.loads(path.read_text()) if path.exists() else {}
    sessions = old.get("sessions", []) + ([{**session, "batch": config.batch, "threads": torch.get_num_threads(),
                                            "load_seconds": round(load_s, 2)}] if session["texts"] else [])
    gen_tokens = sum(s["tokens"] for s in sessions)
    gen_seconds = sum(s["seconds"] for s in sessions)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "out")}
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": config.model,
        "inference": {"device": options.device, "dtype": str(options.dtype), "keep_blocks": options.keep_blocks,
                      "fuse": options.fuse, "quantize": options.quantize},
        "settings": settings,
        "generated": {"texts": len(records), "tokens": sum(r["tokens"] for r in records),
                      "truncated": sum(r["finish"] == "length" for r in records)},
        "kept": {"texts": len(kept), "tokens": sum(r["tokens"] for _, r in kept),
                 "chars": sum(len(d.text) for d, _ in kept)},
        "dropped": dropped,
        "tokens_per_s": round(gen_tokens / gen_seconds, 2) if gen_seconds else None,
        "sessions": sessions,
        "source": {"name": config.name, "path": str(out / TEXTS)},
    }
    _write_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_arguments(p) -> None:
    """``evolm data synthesize``'s own flags (the model loading flags are generate's, added by the CLI)."""
    p.add_argument("--model", required=True, help="the model that writes: HF folder, GGUF file or evolm checkpoint")
    p.add_argument("--out", required=True, help="folder: generated.jsonl (every text), texts.jsonl (the source), "
                                                "synthesis.json (the manifest); run again to continue")
    p.add_argument("--prompts", default=None, help="prompts: .txt (one a line) or .jsonl (a 'prompt' field)")
    p.add_argument("--topics", default=None, help="seed topics: .txt (one a line: {topic}) or .jsonl (any fields)")
    p.add_argument("--template", default=None, help="prompt template naming the topics' fields: 'About {topic}.'")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="each text's seed derives from it, its prompt and sample")
    p.add_argument("--batch", type=int, default=8, help="texts generated together (continuous batching)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--system", default=None, help="--chat: a system prompt")
    p.add_argument("--filters", default="gopher", help="quality rules: gopher, gopher_quality, code, none")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact and near duplicates")
    p.add_argument("--near-threshold", type=float, default=0.8, help="MinHash Jaccard at which a text is a duplicate")
    p.add_argument("--drop-truncated", action="store_true", help="drop texts cut at --max-new-tokens")
    p.add_argument("--name", default="synthetic", help="the source's name in the manifest's snippet")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def config_from_args(args) -> SynthesisConfig:
    return SynthesisConfig(
        model=args.model, out=args.out, prompts=args.prompts, topics=args.topics, template=args.template, n=args.n,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, batch=args.batch,
        chat=args.chat, system=args.system, filters=args.filters, exact_dedup=args.dedup, near_dedup=args.dedup,
        near_threshold=args.near_threshold, drop_truncated=args.drop_truncated, name=args.name)


__all__ = ["SynthesisConfig", "SynthesisError", "synthesize", "load_prompts", "clean", "generate_texts",
           "sample_seed", "template_fields", "add_arguments", "config_from_args"]
