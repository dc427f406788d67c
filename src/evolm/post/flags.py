"""Command-line flags derived from a typed config's fields, so that a flag and its field cannot drift.

A post-training run is described by a frozen dataclass (``SFTConfig``, ``DPOConfig``,
``GRPOConfig``); the library takes that object, and the command line is only a way to fill it.
Each field declares its help text (and, where the flag is not simply ``--field-name``, its flag)
with :func:`option`; :func:`add_options` turns the fields into ``argparse`` arguments and
:func:`from_args` turns the parsed namespace back into the config. A field whose type is itself a
dataclass is a *section*: an argument group whose fields are flags of the same parser (so field
names must be unique across a config's sections), with the section's own defaults.

The mapping, by field type: ``bool`` -> ``--flag`` (``store_true``), or ``--no-flag`` (``store_false``)
for a field that defaults to True; ``tuple[str, ...]`` -> a repeatable flag; ``int`` / ``float``
/ ``str`` (optionally ``| None``) -> a valued flag; no default -> a required flag. litgpt derives
its CLI from typed configs in the same spirit (with jsonargparse); we keep plain argparse and
today's flag names.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
           choices: typing.Sequence[str] | None = None, group: str | None = None, cli: bool = True,
           metavar: str | None = None) -> Any:
    """A dataclass field that also describes its command-line flag.

    ``flag``: the flag's name when it is not ``--`` + the field name with dashes (e.g. ``--no-chat``
    for a field ``chat`` that defaults to True). ``group``: the argument group in ``--help``.
    ``cli=False``: a library-only field, no flag. A dataclass ``default`` becomes a default factory.
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "group": group,
            "cli": cli, "metavar": metavar}
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    """The flag of field ``f`` (``--lora-r`` for ``lora_r`` unless the field names another)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar(tp) -> tuple[type, bool]:
    """(the base type, is it a tuple of that type) of ``int | None``, ``tuple[str, ...]`` and the like."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0], True
    if args:  # Optional[X] / X | None
        return _scalar(args[0])
    return tp, False


def _default(f: dataclasses.Field):
    """The field's default value (calling its factory), or MISSING for a required field."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_options(parser: argparse.ArgumentParser, cls, defaults=None, _groups=None) -> None:
    """Add one flag per field of config class ``cls`` (recursing into sections) to ``parser``.

    ``defaults``: an instance of ``cls`` whose values become the flags' defaults (how a section
    declared as ``loop: LoopOptions = option(LoopOptions(steps=50))`` gives GRPO its own default
    step count); without it, the fields' own defaults.
    """
    groups = {} if _groups is None else _groups
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = _default(f) if defaults is None else getattr(defaults, f.name)
            add_options(parser, tp, sub, groups)
            continue
        if not f.metadata.get("cli", True):
            continue
        title = f.metadata.get("group") or getattr(cls, "flag_group", None)
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        where = groups[title] if title else parser
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        where.add_argument(flag_name(f), dest=f.name, **_argument(f, hints[f.name], default))


def _argument(f: dataclasses.Field, tp, default) -> dict[str, Any]:
    kw: dict[str, Any] = {"help": f.metadata.get("help")}
    base, repeated = _scalar(tp)
    if default is dataclasses.MISSING:
        kw["required"] = True
    elif base is bool:
        return {**kw, "action": "store_false" if default else "store_true", "default": default}
    else:
        kw["default"] = list(default) if repeated else default
    if repeated:
        kw["action"] = "append"
    kw["type"] = base
    if f.metadata.get("choices"):
        kw["choices"] = list(f.metadata["choices"])
    if f.metadata.get("metavar"):
        kw["metavar"] = f.metadata["metavar"]
    return kw


def from_args(cls, args: argparse.Namespace):
    """The config ``cls`` that parsed flags ask for (sections built from their own fields)."""
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = from_args(tp, args)
        elif f.metadata.get("cli", True) and hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if _scalar(tp)[1] and v is not None else v
    return cls(**values)


def parse(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """Parse ``argv`` into config ``cls`` (argparse exits with a usage message on bad flags)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_options(p, cls)
    return from_args(cls, p.parse_args(argv))


def flat(config) -> dict[str, Any]:
    """Every field of ``config`` by name, sections flattened (what the flags of the run were)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out.update(flat(v) if dataclasses.is_dataclass(v) else {f.name: v})
    return out


def invalid(config, name: str, why: str) -> ValueError:
    """The error for a bad field value, naming the field and its flag: ``DPOConfig.max_len (--max-len): ...``."""
    f = next((f for f in dataclasses.fields(config) if f.name == name), None)
    where = f"{type(config).__name__}.{name}" + (f" ({flag_name(f)})" if f is not None else "")
    return ValueError(f"{where}: {why}")


def require(config, name: str, ok: bool, why: str) -> None:
    """Raise :func:`invalid` unless ``ok``."""
    if not ok:
        raise invalid(config, name, why)


__all__ = ["option", "flag_name", "add_options", "from_args", "parse", "flat", "invalid", "require"]
