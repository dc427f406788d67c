"""Reading the small text files that describe models and runs (config.json, tokenizer_config.json,
data specs), as untrusted input.

Each loader owns one error type (``ConfigError``, ``TokenizerError``, ``DataError`` ...) and every
failure is one line naming the file and what was expected. The failures of reading a JSON file are
the same everywhere (not UTF-8, not JSON, nested past the parser's recursion limit, a document of
gigabytes, the wrong top-level type), so they are handled once here and the loader passes its own
error type in.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from typing import Any

MAX_JSON_BYTES = 512 * 2**20  # the largest tokenizer.json on the Hub is ~35 MB; config files are kB


def read_json(path: str | os.PathLike, error: type[Exception], expect: type | None = dict,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of ``path``, or ``error`` naming the file. ``expect``: the top-level type
    (a dict for every config file; None accepts any)."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise error(f"{path}: {size} bytes; a JSON file here is expected to be under {max_bytes} bytes")
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(e, error):
            raise
        raise error(f"{path}: not valid JSON ({first_line(e)})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_json_name(expect)} at the top level, got {short(value)}")
    return value


def has_type(value: Any, hint: Any) -> bool:
    """Whether a value read from a file has the declared (dataclass field) type.

    As JSON and YAML spell values: an int does for a float, a list for a tuple; but a bool is not an
    int, and a float must be finite (``1e999`` parses as inf).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if origin is list:
        return isinstance(value, list) and all(has_type(v, args[0]) for v in value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, (list, tuple)) and all(has_type(v, args[0]) for v in value)
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(has_type, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(has_type(k, args[0]) and has_type(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def describe(hint: Any) -> str:
    """A declared type as Python spells it (``int``, ``str | None``), for an error message."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def short(value: Any, n: int = 60) -> str:
    """``repr(value)``, cut to ``n`` characters (a message stays one readable line)."""
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def did_you_mean(key: Any, choices) -> str:
    """``"; did you mean 'x'?"`` naming the choice closest to a misspelt ``key``, or ``""``: the
    tail every "unknown key" message in the project ends with."""
    import difflib

    close = difflib.get_close_matches(str(key), sorted(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (Rust and torch errors run to several)."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def is_library_error(e: BaseException) -> bool:
    """An error raised by a compiled extension on bad input: an ``Exception``, or pyo3's
    ``PanicException`` (a Rust panic in ``tokenizers`` / ``safetensors``), which derives from
    ``BaseException`` so that ``except Exception`` misses it."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _json_name(t: type) -> str:
    return {dict: "object", list: "array", str: "string"}.get(t, t.__name__)


__all__ = ["read_json", "has_type", "describe", "short", "first_line", "is_library_error", "MAX_JSON_BYTES"]
