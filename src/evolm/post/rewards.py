"""Reward functions for GRPO: verifiable rewards scored by rules, not by a learned model.

DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) and DeepSeek-R1 (arXiv:2501.12948) train with
rule-based rewards: an *accuracy* reward (is the final answer right?) and a *format* reward (did
the model state it the way we asked?). A rule cannot be reward-hacked the way a learned reward
model can, and it needs no second network.

Every reward function has one signature, ``fn(prompt: str, completion: str, answer: str) -> float``;
users pass their own as ``module:func`` or ``path/to/file.py:func``.

The final answer of a completion is read the way GSM8K writes its references: the number after
``####`` (Cobbe et al. 2021, arXiv:2110.14168); failing that, the number after "answer is"; failing
that, the last number in the text. Numbers are compared as values (``1,000`` == ``1000.0``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from typing import Callable

RewardFn = Callable[[str, str, str], float]

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(" + _NUM + ")", re.IGNORECASE)
_ANY = re.compile(_NUM)
_FORMAT = re.compile(r"####\s*(" + _NUM + r")\s*\.?\s*$")


def parse_number(text: str) -> float | None:
    """'1,234' -> 1234.0, '$5' -> 5.0, '-3.50' -> -3.5; None when it is not a number."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer stated in ``text`` ('#### N', else 'answer is N', else the last number)."""
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    found = _ANY.findall(text)
    return found[-1].strip() if found else None


def exact_numeric(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final number equals the reference's (GSM8K: the number after '####')."""
    ref = extract_answer(answer) if "####" in answer else answer
    want, got = parse_number(ref or ""), extract_answer(completion)
    if want is None:
        raise ValueError(f"exact_numeric: the reference answer {answer!r} holds no number; this reward is for "
                         f"tasks with numeric answers (GSM8K style)")
    value = parse_number(got) if got is not None else None
    return float(value is not None and abs(value - want) <= 1e-6 * max(1.0, abs(want)))


def format_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion ends with its answer written GSM8K's way, '#### <number>'; else 0.0."""
    return float(bool(_FORMAT.search(completion.strip())))


BUILTIN: dict[str, RewardFn] = {"exact_numeric": exact_numeric, "format": format_reward}


def load_reward_fn(spec: str) -> RewardFn:
    """A user's reward function from ``'package.module:func'`` or ``'path/to/file.py:func'``.

    The function is checked to take three positional arguments (prompt, completion, answer).
    """
    if ":" not in spec or spec.endswith(":") or spec.startswith(":"):
        raise ValueError(f"--reward-fn {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise ValueError(f"--reward-fn {spec!r}: file {target!r} not found")
        mod_name = "_evolm_reward_" + re.sub(r"\W", "_", os.path.abspath(target))
        loader_spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"--reward-fn {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"--reward-fn {spec!r}: cannot import module {target!r} ({e}); is it on PYTHONPATH?"
                             ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"--reward-fn {spec!r}: module {target!r} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("prompt", "completion", "answer")
    except TypeError:
        raise ValueError(f"--reward-fn {spec!r}: {name}{inspect.signature(fn)} must accept three positional "
                         f"arguments (prompt, completion, answer) and return a float") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn


def resolve_rewards(names: str | list[str] | None, user_fns: list[str] | None = None,
                    weights: list[float] | None = None) -> list[tuple[str, RewardFn, float]]:
    """``'exact_numeric,format'`` (+ ``module:func`` specs) -> [(name, function, weight)].

    The total reward of a completion is the weighted sum; weights default to 1.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[tuple[str, RewardFn]] = []
    for n in names or []:
        if n not in BUILTIN:
            raise ValueError(f"--reward: unknown built-in reward {n!r}; known: {sorted(BUILTIN)} "
                             f"(pass your own with --reward-fn module:func)")
        out.append((n, BUILTIN[n]))
    for spec in user_fns or []:
        name = spec.rsplit(":", 1)[-1]  # the function's name labels its metric
        while name in {n for n, _ in out}:
            name += "_"
        out.append((name, load_reward_fn(spec)))
    if not out:
        raise ValueError("grpo: no reward function; pass --reward exact_numeric,format and/or --reward-fn module:func")
    weights = list(weights) if weights else [1.0] * len(out)
    if len(weights) != len(out):
        raise ValueError(f"--reward-weights: {len(weights)} weights for {len(out)} reward functions "
                         f"({[n for n, _ in out]})")
    return [(n, f, float(w)) for (n, f), w in zip(out, weights)]


def score(rewards: list[tuple[str, RewardFn, float]], prompt: str, completion: str,
          answer: str) -> tuple[float, dict[str, float]]:
    """Weighted total and the per-function values for one completion; a failing user function says which."""
    parts: dict[str, float] = {}
    for name, fn, _ in rewards:
        try:
            v = float(fn(prompt, completion, answer))
        except Exception as e:
            raise ValueError(f"reward function {name!r} failed on completion {completion[:80]!r}: "
                             f"{type(e).__name__}: {e}") from e
        if not math.isfinite(v):
            raise ValueError(f"reward function {name!r} returned {v} (must be a finite float)")
        parts[name] = v
    return sum(w * parts[n] for n, _, w in rewards), parts


__all__ = ["RewardFn", "parse_number", "extract_answer", "exact_numeric", "format_reward", "BUILTIN",
           "load_reward_fn", "resolve_rewards", "score"]
