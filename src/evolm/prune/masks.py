"""How many weights to zero and which: a sparsity target and the masks every pruner shares.

A target is either *unstructured* (a fraction of the weights, anywhere) or *semi-structured*
``N:M``: in every ``M`` consecutive inputs of an output row, ``N`` weights are kept and ``M - N``
zeroed (NVIDIA's convention, "2:4" = 2 non-zeros in every 4, what Ampere's sparse tensor cores run;
SparseGPT and Wanda use it with N = M/2, where "zeros of" and "non-zeros of" agree).

The pruners differ only in the score they rank by and the group a score is compared in:
magnitude compares |W| over the whole layer, Wanda compares |W|·‖X‖ within an output row, SparseGPT
compares its OBS error within a block of columns. Masks here are boolean, True where the weight
becomes zero, and always zero *exactly* ``floor(fraction * size)`` weights of a group (ties broken
by position), so the sparsity a user asks for is the sparsity the layer gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PruneError(ValueError):
    """A pruning request that cannot be carried out (bad target, model or layer), named in one line."""


@dataclass(frozen=True)
class Sparsity:
    """``fraction`` of the weights zeroed (unstructured), or ``n`` kept in every ``m`` (``n:m``)."""

    fraction: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.m or self.n:
            if not 0 < self.n < self.m:
                raise PruneError(f"prune: pattern {self.n}:{self.m}: expected N:M with 0 < N < M")
        elif not 0 < self.fraction < 1:
            raise PruneError(f"prune: --sparsity {self.fraction}: expected a fraction strictly between 0 and 1 (0.5 "
                             f"zeroes half of each layer's weights)")

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> "Sparsity":
        """From the CLI's ``--sparsity F`` or ``--pattern N:M`` (neither: 50% unstructured)."""
        if sparsity is not None and pattern is not None:
            raise PruneError("prune: give --sparsity or --pattern, not both")
        if pattern is None:
            return cls(0.5 if sparsity is None else float(sparsity))
        n, sep, m = str(pattern).partition(":")
        if not sep or not n.strip().isdigit() or not m.strip().isdigit():
            raise PruneError(f"prune: --pattern {pattern!r}: expected N:M, two whole numbers (e.g. 2:4)")
        n, m = int(n), int(m)
        if not 0 < n < m:
            raise PruneError(f"prune: --pattern {pattern}: expected N:M with 0 < N < M (2:4 keeps 2 of every 4 "
                             f"consecutive weights)")
        return cls(fraction=1 - n / m, n=n, m=m)

    @property
    def semi_structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.fraction:g}"

    def record(self) -> dict:
        return {"pattern": str(self)} if self.m else {"sparsity": self.fraction}

    def check_columns(self, columns: int, name: str) -> None:
        """An ``n:m`` pattern needs the layer's inputs to be whole groups of ``m``."""
        if self.m and columns % self.m:
            raise PruneError(f"prune: {name} has {columns} inputs, not a multiple of {self.m}: it cannot take the "
                             f"{self} pattern")


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` smallest scores of each row of ``scores`` (a 2-D tensor)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the ``m - n`` smallest scores of every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    return smallest(scores.reshape(-1, m), m - n).reshape(rows, cols)


def row_mask(scores: torch.Tensor, target: Sparsity) -> torch.Tensor:
    """Scores compared within each output row (Wanda): ``floor(fraction * columns)`` zeros a row, or n:m."""
    if target.m:
        return nm_mask(scores, target.n, target.m)
    return smallest(scores, int(scores.shape[1] * target.fraction))


def group_mask(scores: torch.Tensor, target: Sparsity) -> torch.Tensor:
    """Scores compared over the whole tensor (magnitude per layer; SparseGPT per block of columns):
    ``floor(fraction * size)`` zeros, or n:m within each row."""
    if target.m:
        return nm_mask(scores, target.n, target.m)
    return smallest(scores.reshape(1, -1), int(scores.numel() * target.fraction)).reshape(scores.shape)


__all__ = ["PruneError", "Sparsity", "smallest", "nm_mask", "row_mask", "group_mask"]
