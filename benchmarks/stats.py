"""Summary of repeated timings on a shared machine: the median and how far the runs spread."""

from __future__ import annotations

import statistics

import torch


def median_spread(xs: list[float]) -> tuple[float, float]:
    """Median and half the max-min spread, relative to the median."""
    med = statistics.median(xs)
    return med, (max(xs) - min(xs)) / 2 / med if med else 0.0


def sync() -> None:
    """Wait for the GPU's queued work (timings of asynchronous CUDA calls); nothing on a CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
