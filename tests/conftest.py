"""Shared fixtures: deterministic seeds, and the padded-batch helpers the parity tests share."""

from __future__ import annotations

import types

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def padded_batch(vocab: int, lengths: list[int], left: bool = True, seed: int = 0):
    """Random token ids for sequences of different ``lengths``, padded to the longest.

    Returns ids (B, T), attention mask (B, T) and position ids counted over real tokens only
    (cumsum(mask) - 1, as transformers' ``generate`` does; padding slots get 1).
    """
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[b, sl] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, sl] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def max_real_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| over the real (unpadded) positions of (B, T, V) logits."""
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@pytest.fixture
def batch_tools():
    return types.SimpleNamespace(padded_batch=padded_batch, max_real_diff=max_real_diff)


def cli_args(add_args, **kw):
    """Parse ``--key value`` flags (``key=True`` for a bare flag) with a command's ``add_*_args``."""
    import argparse

    p = argparse.ArgumentParser()
    add_args(p)
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)
