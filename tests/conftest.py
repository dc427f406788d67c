"""Shared fixtures: deterministic seeds, the padded-batch helpers the parity tests share, and the
report of tests skipped for a missing asset.

A test that needs an installed asset (weights, corpora, benchmark data, chromium) skips with a
reason that starts ``missing asset`` and says ``required`` or ``optional`` (``evolm.assets.MissingAsset``).
At the end of the run those skips are listed in one block. Under ``make test``
(``EVOLM_REQUIRE_ASSETS=1``) a skip for a *required* asset is turned into a failure: CI must not go
green because the setup silently lost a data set.
"""

from __future__ import annotations

import os
import types

import pytest
import torch


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("EVOLM_REQUIRE_ASSETS") == "1":
        reason = _skip_reason(report)
        if "missing asset" in reason and "(required" in reason:
            report.outcome = "failed"
            report.longrepr = f"a required asset is missing (EVOLM_REQUIRE_ASSETS=1): {reason}"


def pytest_terminal_summary(terminalreporter):
    missing = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        if "missing asset" in reason:
            missing.append((report.nodeid or report.fspath, reason))
    if missing:
        terminalreporter.section(f"skipped for a missing asset ({len(missing)})", sep="=")
        for nodeid, reason in sorted(missing):
            terminalreporter.line(f"{nodeid}: {reason}")


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


class _IdsTokenizer:
    """What the serving engine asks of a tokenizer, for models without one: ids shown as <id>."""
    eos_ids: list[int] = []

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)

    def encode(self, text):
        return []


def served_greedy(model, prompts: list[list[int]], max_new: list[int], max_batch: int = 3,
                  max_len: int = 64, timeout: float = 120) -> list[list[int]]:
    """Each prompt's greedy tokens through the serving engine (``serve/scheduler.py``), all submitted
    at once: ``max_batch`` rows decode together, the rest join as rows finish. A test compares them
    with ``generate`` alone, row by row."""
    import threading

    from evolm.infer import SamplingParams
    from evolm.serve.scheduler import Engine, GenRequest, TokenEvent

    tokens, ended, cv = {}, set(), threading.Condition()

    def deliver(ev):
        with cv:
            if isinstance(ev, TokenEvent):
                tokens.setdefault(ev.index, []).append(ev.token_id)
            else:
                ended.add(ev.index)
                cv.notify_all()

    engine = Engine(model, _IdsTokenizer(), max_batch=max_batch, max_len=max_len)
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        engine.waiting.append(GenRequest(p, SamplingParams(max_new_tokens=m, temperature=0), deliver, index=i))
    engine.start()
    try:
        with cv:
            assert cv.wait_for(lambda: len(ended) == len(prompts), timeout), "the engine did not finish"
    finally:
        engine.stop()
    return [tokens.get(i, []) for i in range(len(prompts))]


def static_steps_equal_full(model, ids: torch.Tensor, split: int, max_len: int = 32):
    """What ``generate(compile=True)`` does, run eagerly: a prefill collector (PrefillKV) hands keys,
    values and recurrent states to a StaticKVCache, whose static mode then updates them in place;
    asserts the logits are the full forward's and no state tensor was replaced. Returns the cache."""
    from evolm.cache import PrefillKV, StaticKVCache

    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        collected = PrefillKV()
        outs = [model(ids[:, :split], cache=collected)]
        cache = StaticKVCache.for_model(model, B, max_len)
        cache.store_prefill(collected, split, None)
        cache.start_static()
        held = [t.data_ptr() for s in cache._states.values() for t in s]
        for t in range(split, T):
            outs.append(model(ids[:, t:t + 1], position_ids=torch.full((B, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert held == [t.data_ptr() for s in cache._states.values() for t in s]
    return cache


@pytest.fixture
def serving_tools():
    return types.SimpleNamespace(served_greedy=served_greedy, static_steps_equal_full=static_steps_equal_full)


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


def cli_config(config_class, **kw):
    """The typed config (``SFTConfig``, ``DPOConfig``, ...) that ``--key value`` flags ask for, through
    the flags derived from its fields (what the ``evolm`` subcommand builds)."""
    from evolm.post.flags import add_options, from_args

    return from_args(config_class, cli_args(lambda p: add_options(p, config_class), **kw))
