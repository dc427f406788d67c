"""An ordered process-pool map for the CPU-bound steps of data preparation.

Filtering, MinHash signatures and tokenization are embarrassingly parallel over documents,
but their *results* must come back in input order so that a prepared dataset does not depend
on the number of workers (tested: parallel tokenization equals serial, byte for byte).

Workers are forked on Linux: forking shares the already-imported library and the tokenizer
instead of re-importing torch in every worker (seconds each with spawn). Elsewhere the
default start method is used, and the worker state must then be picklable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Any, Callable, Iterable, Iterator

_STATE: dict[str, Any] = {}


def worker_state() -> dict[str, Any]:
    """The state set by the ``init`` function of the current pool (or serial run)."""
    return _STATE


def _noop() -> None:
    pass


def _init(init: Callable[..., None], args: tuple) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    init(*args)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                init: Callable[..., None] | None = None, init_args: tuple = ()) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes, results in input order.

    ``init(*init_args)`` runs once per worker (or once here when ``workers <= 1``) and
    stores what ``fn`` needs via ``worker_state()``; ``fn`` must be a module-level function.
    """
    if workers <= 1:
        if init is not None:
            init(*init_args)
        yield from map(fn, items)
        return
    method = "fork" if sys.platform.startswith("linux") else None
    ctx = mp.get_context(method)
    with ctx.Pool(workers, initializer=_init, initargs=(init or _noop, init_args)) as pool:
        yield from pool.imap(fn, items, chunksize=1)


def batched(seq: Iterable[Any], max_items: int = 256, max_chars: int = 1 << 20,
            size: Callable[[Any], int] = len) -> Iterator[list[Any]]:
    """Group items into batches of at most ``max_items`` and about ``max_chars`` characters."""
    batch: list[Any] = []
    chars = 0
    for it in seq:
        batch.append(it)
        chars += size(it)
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
