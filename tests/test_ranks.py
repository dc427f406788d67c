"""The multi-process test runner (tests/ranks.py) itself: ranks see each other, failures surface."""

import pytest
import torch
import torch.distributed as dist

from ranks import run_ranks


def _sum_of_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world, float(t)


def _fails_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def test_every_rank_joins_one_group():
    assert run_ranks(3, _sum_of_ranks) == [(0, 3, 3.0), (1, 3, 3.0), (2, 3, 3.0)]


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 failed.*rank one says no"):
        run_ranks(2, _fails_on_rank_one, timeout=60)
