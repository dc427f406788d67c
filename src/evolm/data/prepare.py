"""``evolm data prepare``: sources -> clean, filtered, deduplicated, split, tokenized shards.

The pipeline, per source in the order given (dedup spans all sources, first one wins)::

    read documents -> clean + quality rules (filters.py)        [worker processes]
                   -> exact dedup (normalized hash)            (dedup.py)
                   -> near dedup (MinHash LSH)                 [signatures in workers]
                   -> document-level train/val split
                   -> tokenize + EOS -> uint16/uint32 shards   [worker processes]
    -> manifest.json: sources, counts, tokens, what each rule removed, tokenizer hash

The split is decided per document by a seeded hash of its content, so a document is held
out or not regardless of the order or the other documents, and no document is ever cut
between train and val. Each source with at least two documents keeps at least
``min_val_docs`` of them for validation.

The post-dedup text of one source is held in memory; at this project's scale (tens of MB)
that is simple and fast. Larger corpora are prepared in parts and mixed by weight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import typing
from pathlib import Path
from typing import Any, Callable

from evolm.data.corpora import BUILTIN, default_data_dir
from evolm.data.dedup import ExactDedup, NearDedup, text_hash
from evolm.data.filters import QualityFilter, describe_removals
from evolm.data.mixture import MANIFEST, load_manifest
from evolm.data.parallel import default_workers
from evolm.data.shards import ShardWriter, dtype_for_vocab, tokenize, tokenizer_fingerprint, vocab_size_of
from evolm.data.sources import DataError, Document, SourceSpec, iter_documents
from evolm.config import MAX_INT
from evolm.inputs import describe, did_you_mean, first_line, has_type, read_json, short

FORMAT = "evolm-shards/1"


class EmptyCorpusError(DataError):
    """A source has no documents left after filtering and dedup; the message says which rule
    removed what."""


@dataclasses.dataclass
class PrepareOptions:
    """Options of a prepare run; also accepted as top-level keys of a spec file."""

    val_fraction: float = 0.05
    min_val_docs: int = 1
    seed: int = 0
    quality_filter: bool = True  # False: keep every document (each source's filter preset skipped)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    append_eos: bool = True
    shard_tokens: int = 1 << 28


def load_spec(spec: Any) -> tuple[list[SourceSpec], dict]:
    """Sources (and option overrides) from a list, a ``{"sources": [...], ...}`` dict, or a
    JSON/YAML file holding either. Each source may be a built-in name, a path or a dict.
    A bad spec raises :class:`DataError` (naming the file, for a spec file)."""
    if isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith((".json", ".yaml", ".yml")):
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"data spec file not found: {p}")
        try:
            return _spec_from(_read_spec_file(p))
        except DataError as e:
            raise DataError(f"{p}: {e}") from None
    return _spec_from(spec)


def _read_spec_file(p: Path) -> Any:
    if p.suffix == ".json":
        return read_json(p, DataError, expect=None)
    import yaml

    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"not valid YAML ({first_line(e)})") from None


def _spec_from(spec: Any) -> tuple[list[SourceSpec], dict]:
    options: dict = {}
    if isinstance(spec, dict):
        allowed = {"sources"} | {f.name for f in dataclasses.fields(PrepareOptions)}
        for key in spec:
            if key not in allowed:
                raise DataError(f"data spec: unknown key {key!r}{did_you_mean(key, allowed)} "
                                f"(allowed: {sorted(allowed)})")
        if "sources" not in spec:
            raise DataError("data spec: missing 'sources' (a list of built-in names, paths or source dicts)")
        options = {k: v for k, v in spec.items() if k != "sources"}
        spec = spec["sources"]
    if isinstance(spec, (str, os.PathLike, SourceSpec)):
        spec = [spec]
    if not isinstance(spec, list):
        raise DataError(f"data spec: sources must be a list of built-in names, paths or source dicts, "
                        f"got {short(spec)}")
    specs = [SourceSpec.from_any(s) for s in spec]
    if not specs:
        raise DataError("data spec: no sources")
    names = [s.name for s in specs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise DataError(f"data spec: source names must be unique, repeated: {dups} (set 'name' on each)")
    return specs, options


# the ranges of PrepareOptions' numbers: (low, high), both included unless noted in the check
_OPTION_RANGES = {"val_fraction": (0, 1), "min_val_docs": (0, MAX_INT), "near_threshold": (0, 1),
                  "num_perm": (1, 4096), "ngram": (1, 1024), "shard_tokens": (1, 2**40), "seed": (0, 2**63 - 1)}


def load_options(options: dict, source: str = "prepare") -> PrepareOptions:
    """:class:`PrepareOptions` from a spec file's top-level keys or ``prepare(**options)``, each key
    known and of its type and range, or a :class:`DataError` naming ``source`` and the key."""
    hints = typing.get_type_hints(PrepareOptions)
    for key, value in options.items():
        if key not in hints:
            raise DataError(f"{source}: unknown option {key!r}{did_you_mean(key, hints)}")
        if not has_type(value, hints[key]):
            raise DataError(f"{source}: {key} must be {describe(hints[key])}, got {short(value)}")
        low, high = _OPTION_RANGES.get(key, (None, None))
        if low is not None and not (low <= value <= high) or (key == "val_fraction" and value == 1):
            raise DataError(f"{source}: {key} must be in [{low}, {high}{')' if key == 'val_fraction' else ']'}, "
                            f"got {value}")
    return PrepareOptions(**options)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _input_stamp(spec: SourceSpec, data_dir: Path) -> Any:
    """What changes when a source's input changes (for skipping an up-to-date prepare)."""
    if spec.kind == "builtin":
        meta = data_dir / f"{spec.name}.json"
        return json.loads(meta.read_text()) if meta.exists() else None
    p = Path(spec.path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def split_documents(docs: list[Document], val_fraction: float, min_val_docs: int, seed: int
                    ) -> tuple[list[Document], list[Document]]:
    """Document-level train/val split by a seeded hash of each document's content.

    A document is held out when its hash, read as a number in [0, 1), is below ``val_fraction``:
    its side depends on its own text only, so removing other documents (a quality filter, dedup)
    never moves it, and data prepared with and without a filter share one held-out set (the
    lab's data ablations rely on this). Sources too small to draw ``min_val_docs`` that way hold
    out the documents with the smallest hashes instead.
    """
    n = len(docs)
    if val_fraction <= 0 or n < 2:
        return docs, []
    salt = str(seed).encode()
    u = [int.from_bytes(hashlib.blake2b(salt + text_hash(d.text), digest_size=8).digest(), "big") / 2.0 ** 64
         for d in docs]
    val = {i for i in range(n) if u[i] < val_fraction}
    if len(val) < min(n - 1, min_val_docs) or len(val) == n:
        val = set(sorted(range(n), key=u.__getitem__)[:min(n - 1, max(1, min_val_docs))])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def prepare(spec: Any, tokenizer: Any, out_dir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
            workers: int | None = None, reuse: bool = True, log: Callable[[str], None] | None = print,
            **options: Any) -> dict:
    """Prepare token shards for ``spec`` in ``out_dir`` and return the manifest.

    ``tokenizer`` is any object with ``encode(text) -> list[int]``, ``vocab_size`` and
    ``eos_id`` (None for no EOS). ``data_dir`` holds the installed built-in corpora.
    ``options`` are the fields of `PrepareOptions` (they override the spec file's). With
    ``reuse``, an ``out_dir`` already prepared from the same inputs, options and tokenizer
    is returned as is.
    """
    log = log or (lambda s: None)
    specs, spec_options = load_spec(spec)
    opts = load_options({**spec_options, **options}, source="prepare")
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    workers = workers or default_workers()

    vocab = vocab_size_of(tokenizer)
    dtype = dtype_for_vocab(vocab)
    eos = getattr(tokenizer, "eos_id", None)
    tok_hash = tokenizer_fingerprint(tokenizer)
    fingerprint = hashlib.sha256(json.dumps({
        "format": FORMAT, "specs": [s.to_dict() for s in specs], "options": dataclasses.asdict(opts),
        "tokenizer": tok_hash, "inputs": [_input_stamp(s, data_dir) for s in specs],
    }, sort_keys=True, default=str).encode()).hexdigest()
    if reuse and (out_dir / MANIFEST).exists():
        try:
            old = load_manifest(out_dir)
        except (json.JSONDecodeError, OSError):
            old = {}
        if old.get("fingerprint") == fingerprint and _shards_present(out_dir, old):
            log(f"data in {out_dir} is up to date ({old['totals']['tokens']['train']:,} train tokens)")
            return old

    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise DataError(f"output folder {out_dir} exists and is not a prepared-data folder (no {MANIFEST}); "
                        "choose a new or empty folder: prepare replaces the folder it writes")
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t_start = time.perf_counter()
    exact = ExactDedup() if opts.exact_dedup else None
    near = (NearDedup(opts.near_threshold, opts.num_perm, opts.ngram, seed=1, workers=workers)
            if opts.near_dedup else None)
    sources: dict[str, dict] = {}
    max_id = -1
    try:
        for s in specs:
            t0 = time.perf_counter()
            preset = s.filters or (BUILTIN[s.name].filters if s.kind == "builtin" else "gopher")
            preset = preset if opts.quality_filter else "none"
            qf = QualityFilter(preset, s.filter_overrides, workers)
            docs = list(qf(iter_documents(s, data_dir)))  # each stage drains its pool before the next
            t1 = time.perf_counter()
            if exact is not None:
                docs = list(exact(docs))
            if near is not None:
                docs = list(near(docs))
            t2 = time.perf_counter()
            exact_rm = exact.removed.get(s.name, {"docs": 0, "chars": 0}) if exact else {"docs": 0, "chars": 0}
            near_rm = near.removed.get(s.name, {"docs": 0, "chars": 0}) if near else {"docs": 0, "chars": 0}
            if not docs:
                raise EmptyCorpusError(_empty_message(s, qf.report, exact_rm, near_rm))
            train, val = split_documents(docs, opts.val_fraction, opts.min_val_docs, opts.seed)
            splits = {}
            for split, part in (("train", train), ("val", val)):
                writer = ShardWriter(tmp / split, _file_name(s.name), dtype, opts.shard_tokens)
                try:
                    for arr in tokenize((d.text for d in part), tokenizer, workers, opts.append_eos):
                        if len(arr):
                            max_id = max(max_id, int(arr.max()))
                        writer.add(arr)
                except DataError as e:
                    raise DataError(f"source {s.name!r}: {e}") from e
                shards = writer.close()
                splits[split] = {"docs": writer.docs, "tokens": writer.tokens, "shards": shards}
            sources[s.name] = {
                "kind": s.kind, "tier": docs[0].tier, "weight": s.weight, "spec": s.to_dict(),
                "filters": qf.report, "exact_duplicates": exact_rm, "near_duplicates": near_rm,
                "docs": len(docs), "chars": sum(len(d.text) for d in docs), "splits": splits,
                "seconds": round(time.perf_counter() - t0, 2),
                "phase_seconds": {"read_filter": round(t1 - t0, 2), "dedup": round(t2 - t1, 2),
                                  "tokenize": round(time.perf_counter() - t2, 2)},
            }
            r = qf.report
            log(f"  {s.name:14s} {r['docs_in']:6d} docs -> {r['docs_out']} after filters ({preset}) -> "
                f"{len(docs)} after dedup (-{exact_rm['docs']} exact, -{near_rm['docs']} near); "
                f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
                f"({sources[s.name]['seconds']:.1f}s)")
        total_w = sum(v["weight"] for v in sources.values())
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": fingerprint,
            "tokenizer": {"hash": tok_hash, "vocab_size": vocab, "eos_id": eos, "dtype": dtype.name,
                          "append_eos": bool(opts.append_eos and eos is not None), "max_token_id": max_id},
            "options": dataclasses.asdict(opts),
            "sources": sources,
            "mixture": {k: (v["weight"] / total_w if total_w > 0 else 0.0) for k, v in sources.items()},
            "totals": {
                "docs_in": sum(v["filters"]["docs_in"] for v in sources.values()),
                "docs": sum(v["docs"] for v in sources.values()),
                "chars": sum(v["chars"] for v in sources.values()),
                "tokens": {sp: sum(v["splits"][sp]["tokens"] for v in sources.values()) for sp in ("train", "val")},
            },
            "near_duplicate_examples": near.pairs[:20] if near else [],
            "seconds": round(time.perf_counter() - t_start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # swap the new folder in; the old one survives until the new one is complete
    old_dir = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old_dir)
    os.replace(tmp, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    t = manifest["totals"]
    log(f"prepared {t['docs']} docs, {t['tokens']['train']:,} train + {t['tokens']['val']:,} val tokens "
        f"({manifest['tokenizer']['dtype']}) in {out_dir} ({manifest['seconds']:.1f}s)")
    return manifest


def _shards_present(out_dir: Path, manifest: dict) -> bool:
    for info in manifest.get("sources", {}).values():
        for split, s in info["splits"].items():
            for sh in s["shards"]:
                if not (out_dir / split / sh["file"]).exists():
                    return False
    return True


def _empty_message(s: SourceSpec, report: dict, exact_rm: dict, near_rm: dict) -> str:
    where = f" ({s.path})" if s.path else ""
    if report["docs_in"] == 0:
        return f"source {s.name!r}{where}: no documents were read"
    msg = (f"source {s.name!r}{where}: all {report['docs_in']} documents were removed. "
           f"Filters ({report['preset']}): {describe_removals(report)}")
    if exact_rm["docs"] or near_rm["docs"]:
        msg += f"; exact duplicates: {exact_rm['docs']}, near duplicates: {near_rm['docs']}"
    if report["removed"]:
        top = max(report["removed"].items(), key=lambda kv: kv[1]["docs"])[0]
        if top != "empty":
            msg += (f". To keep them, relax that rule in the source spec, e.g. "
                    f"filter_overrides: {{{top}: null}}, or set filters: none")
    return msg
