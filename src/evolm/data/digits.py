"""A small captioned image set from real handwriting: the UCI digits that scikit-learn ships.

A vision-language model needs images with text about them. The UCI "Optical Recognition of
Handwritten Digits" set (Alpaydin & Kaynak 1998; 1,797 scans of 43 writers, each an 8x8 grid of
ink counts 0..16) is inside every scikit-learn wheel (``sklearn/datasets/data/digits.csv.gz``,
what ``sklearn.datasets.load_digits`` reads), so it comes from a pinned package registry like the
rest of evolm's data (``constraints.txt``: scikit-learn) and needs no download at run time.

Each scan becomes an 8-bit grey image (white ink on black) and a caption naming its digit,
``"a handwritten digit seven"``. Whether a model's caption names the right digit is a task that
only the image can settle (every caption shares the prefix), so caption accuracy measures what
the vision path contributes. Images reach a model through :mod:`evolm.images`, the same code
``evolm generate --image`` and the server use, so training and inference see identical tensors.

The train/held-out split is a seeded permutation, the same on every machine for a given seed.
We read the CSV directly instead of calling ``load_digits``: importing scikit-learn costs ~2 s
and nothing of it is needed beyond the file's location.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evolm.data.sources import DataError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION = "a handwritten digit {word}"
PROMPT = "a handwritten digit"  # what every caption starts with: generation continues it
N_DIGITS = 1797  # rows of the UCI set as scikit-learn ships it
INSTALL = "pip install scikit-learn==1.9.1 -c constraints.txt (or: pip install -e '.[vision]')"


@dataclass(frozen=True)
class Digit:
    """One scan: its 8x8 grey image (uint8, 0 = paper, 255 = full ink), its label, its caption."""

    image: np.ndarray
    label: int
    index: int  # row in the UCI file

    @property
    def caption(self) -> str:
        return caption(self.label)


def caption(label: int) -> str:
    return CAPTION.format(word=WORDS[label])


def digits_file() -> Path:
    """Where the installed scikit-learn keeps the digits CSV (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the digits set comes with scikit-learn, which is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed scikit-learn (expected the UCI digits CSV); {INSTALL}")
    return path


def load_digits_array(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) uint8, labels (N,) int64) of the UCI digits, ink scaled 0..16 -> 0..255."""
    path = Path(path) if path is not None else digits_file()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not the UCI digits CSV (64 ink counts and a label per row): {e}") from None
    if table.ndim != 2 or table.shape[1] != 65 or not np.isin(table[:, 64], np.arange(10)).all() \
            or table[:, :64].min() < 0 or table[:, :64].max() > 16:
        raise DataError(f"{path}: expected rows of 64 ink counts in 0..16 and a label 0..9, got shape {table.shape}")
    images = np.rint(table[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return images, table[:, 64].astype(np.int64)


def split_digits(val_fraction: float = 0.2, seed: int = 0, path: str | os.PathLike | None = None,
                 ) -> tuple[list[Digit], list[Digit]]:
    """(train, held-out) digits: a permutation seeded by ``seed``, the first ``val_fraction`` held out."""
    if not 0 < val_fraction < 1:
        raise DataError(f"digits: val_fraction must be in (0, 1), got {val_fraction}")
    images, labels = load_digits_array(path)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(val_fraction * len(labels)))
    rows = [Digit(images[i], int(labels[i]), int(i)) for i in order]
    return rows[n_val:], rows[:n_val]


def named_digit(text: str) -> int | None:
    """The digit a caption names (its first digit word), or None when it names none."""
    for word in text.lower().replace(".", " ").replace(",", " ").split():
        if word in WORDS:
            return WORDS.index(word)
    return None


__all__ = ["Digit", "WORDS", "CAPTION", "PROMPT", "caption", "digits_file", "load_digits_array", "split_digits",
           "named_digit"]
