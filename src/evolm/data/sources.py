"""Where documents come from: user files (text, JSONL, Parquet) and the built-in corpora.

Everything downstream (filters, dedup, shards) sees one stream of `Document`s. A *source* is
a named, weighted origin of documents, described by a `SourceSpec`; a mixture is a list of
them (see ``mixture.py``). Readers fail with messages that name the file, the line and the
field, because a 10 GB JSONL with one bad record is a poor place to guess.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
import typing
from typing import Any, Iterator

from evolm.inputs import describe, did_you_mean, has_type, short


class DataError(ValueError):
    """Bad data input: the message names the file, line, field or source at fault."""


@dataclass
class Document:
    """One unit of text: a play, a book of the Bible, a Python file, a JSONL record.

    Documents are what the train/val split and dedup act on, and their boundaries survive
    tokenization (``shards.py``) so that training can mask attention across them.
    """

    text: str
    source: str
    doc_id: str
    tier: str = "medium"


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
KINDS = ("builtin", "text", "jsonl", "parquet")
FILTER_PRESETS = ("gopher", "gopher_quality", "code", "none")


@dataclass
class SourceSpec:
    """One source of a mixture: what to read, how to filter it, and how much to sample it.

    ``kind`` is guessed from ``path`` when left out (``.jsonl`` -> jsonl, ``.parquet`` ->
    parquet, anything else -> text) and is ``builtin`` when ``name`` is a built-in corpus
    and no path is given. ``filters`` picks a rule preset from ``filters.py`` and
    ``filter_overrides`` changes single thresholds (``{"dup_line_frac": null}`` drops a rule).
    """

    name: str
    path: str | None = None
    kind: str | None = None
    weight: float = 1.0
    tier: str | None = None
    text_field: str = "text"
    filters: str | None = None  # None -> the built-in corpus' own preset, else "gopher"
    filter_overrides: dict = field(default_factory=dict)
    glob: str | None = None  # folders: which files to read (default: TEXT_SUFFIXES)
    separator: str | None = None  # text files: split one file into documents on this string

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise DataError(f"source needs a non-empty 'name', got {short(self.name)}")
        for f, hint in typing.get_type_hints(SourceSpec).items():  # a spec file can hold anything
            if not has_type(getattr(self, f), hint):
                raise DataError(f"source {self.name!r}: {f} must be {describe(hint)}, got {short(getattr(self, f))}")
        if self.kind is None:
            self.kind = guess_kind(self.name, self.path)
        if self.kind not in KINDS:
            raise DataError(f"source {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "builtin" and not self.path:
            raise DataError(f"source {self.name!r}: kind {self.kind!r} needs a 'path'")
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise DataError(f"source {self.name!r}: weight must be a number >= 0, got {self.weight!r}")
        if self.filters is not None and self.filters not in FILTER_PRESETS:
            raise DataError(
                f"source {self.name!r}: filters must be one of {FILTER_PRESETS}, got {self.filters!r}"
            )

    @classmethod
    def from_any(cls, obj: Any) -> "SourceSpec":
        """A spec from a dict, a `SourceSpec`, or a string (built-in name or a path)."""
        if isinstance(obj, SourceSpec):
            return obj
        if isinstance(obj, (str, os.PathLike)):
            s = str(obj)
            from evolm.data.corpora import BUILTIN

            if s in BUILTIN:
                return cls(name=s)
            p = Path(s)
            return cls(name=_name_from_path(p), path=s)
        if isinstance(obj, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            for key in obj:
                if key not in known:
                    raise DataError(f"source spec: unknown key {key!r}{did_you_mean(key, known)} "
                                    f"(known: {sorted(known)})")
            d = dict(obj)
            if "name" not in d:
                if d.get("path"):
                    d["name"] = _name_from_path(Path(d["path"]))
                else:
                    raise DataError(f"source spec {short(obj)} needs a 'name' or a 'path'")
            return cls(**d)
        raise DataError(f"cannot make a source from {short(obj)} (want a name, a path or a dict)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _name_from_path(p: Path) -> str:
    name = p.name
    for suf in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".txt"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name or "data"


def guess_kind(name: str, path: str | None) -> str:
    if path is None:
        return "builtin"
    lower = str(path).lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


# --- readers --------------------------------------------------------------------------------


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def read_text(path: str | os.PathLike, source: str, tier: str = "medium", glob: str | None = None,
              separator: str | None = None) -> Iterator[Document]:
    """Plain text: one file, or every matching file under a folder (sorted, so reproducible).

    A file is one document, or several when ``separator`` is given (e.g. ``"\\n\\n\\n"`` to
    split a single big file into the chapters the train/val split can then tell apart).
    """
    root = Path(path)
    _require(root, f"source {source!r}: text path")
    if root.is_dir():
        if glob:
            files = sorted(p for p in root.rglob(glob) if p.is_file())
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES))
        if not files:
            pattern = glob or " ".join("*" + s for s in TEXT_SUFFIXES)
            raise DataError(f"source {source!r}: no files matching {pattern} under {root}")
    else:
        files = [root]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"source {source!r}: {f} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
        parts = text.split(separator) if separator else [text]
        for i, part in enumerate(parts):
            doc_id = rel if len(parts) == 1 else f"{rel}#{i}"
            yield Document(part, source, doc_id, tier)


def read_jsonl(path: str | os.PathLike, source: str, text_field: str = "text",
               tier: str = "medium") -> Iterator[Document]:
    """JSON Lines (optionally gzipped): one object per line, its ``text_field`` is the document.

    ``text_field`` may be dotted (``"meta.body"``) for nested objects. A record without the
    field, or with a non-string value, is an error naming file, line and field: silently
    skipping it would hide a wrong field name that drops the whole corpus.
    """
    p = Path(path)
    _require(p, f"source {source!r}: JSONL file")
    opener = gzip.open if p.name.endswith(".gz") else open
    keys = text_field.split(".")
    with opener(p, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            value: Any = rec
            for k in keys:
                if not isinstance(value, dict) or k not in value:
                    have = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(
                        f"{p}:{lineno}: record has no text field {text_field!r} (keys: {have}); "
                        f"set text_field in the source spec"
                    )
                value = value[k]
            if not isinstance(value, str):
                raise DataError(
                    f"{p}:{lineno}: field {text_field!r} must be a string, got {type(value).__name__}"
                )
            doc_id = str(rec.get("id", lineno)) if isinstance(rec, dict) else str(lineno)
            yield Document(value, source, f"{p.name}:{doc_id}", tier)


def read_parquet(path: str | os.PathLike, source: str, text_field: str = "text",
                 tier: str = "medium") -> Iterator[Document]:
    """Parquet file, or a folder of them, read in record batches (needs ``pyarrow``)."""
    root = Path(path)
    _require(root, f"source {source!r}: Parquet path")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(
            f"source {source!r}: reading Parquet needs pyarrow (pip install pyarrow)"
        ) from e
    files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{f}: no column {text_field!r} (columns: {names}); set text_field in the source spec")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                if not isinstance(value, str):
                    raise DataError(
                        f"{f}: row {row}: column {text_field!r} must be a string, got {type(value).__name__}"
                    )
                yield Document(value, source, f"{f.name}:{row}", tier)
                row += 1


def iter_documents(spec: SourceSpec, data_dir: str | os.PathLike | None = None) -> Iterator[Document]:
    """All documents of one source, in a reproducible order."""
    tier = spec.tier or "medium"
    if spec.kind == "builtin":
        from evolm.data.corpora import read_corpus

        yield from read_corpus(spec.name, data_dir, tier=spec.tier)
    elif spec.kind == "text":
        yield from read_text(spec.path, spec.name, tier, spec.glob, spec.separator)
    elif spec.kind == "jsonl":
        yield from read_jsonl(spec.path, spec.name, spec.text_field, tier)
    elif spec.kind == "parquet":
        yield from read_parquet(spec.path, spec.name, spec.text_field, tier)
    else:  # pragma: no cover - guarded in SourceSpec
        raise DataError(f"unknown source kind {spec.kind!r}")
