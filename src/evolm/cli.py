"""The ``evolm`` command: thin, one subcommand per verb; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"evolm: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def resolve_config(spec: str):
    """A preset name, an evolm config JSON, or a Hugging Face config.json / model folder."""
    from evolm.config import ConfigError, ModelConfig
    from evolm.presets import get_preset

    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if os.path.isfile(path):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                _fail(f"{path}: not valid JSON ({e})")
        if "model_type" in d:
            from evolm.interop.hf import config_from_hf
            return config_from_hf(d)
        return ModelConfig.from_dict(d.get("model", d), source=path)
    try:
        return get_preset(spec)
    except ConfigError as e:
        _fail(str(e))


# --- arch ------------------------------------------------------------------------------------
def cmd_arch(args) -> None:
    from evolm.analysis import cost
    from evolm.presets import list_presets, get_preset

    if args.arch_cmd == "list":
        rows = []
        for name in list_presets():
            c = get_preset(name)
            card = cost.cost_card(c)
            rows.append((name, cost.human(card["params_total"]), cost.human(card["params_active"]),
                         c.meta.get("family", ""), c.meta.get("hf_id", "")))
        width = max(len(r[0]) for r in rows)
        print(f"{'preset':<{width}}  {'params':>8}  {'active':>8}  family    reference")
        for r in rows:
            print(f"{r[0]:<{width}}  {r[1]:>8}  {r[2]:>8}  {r[3]:<8}  {r[4]}")
    elif args.arch_cmd == "show":
        card = cost.cost_card(resolve_config(args.name), context_len=args.context)
        print(json.dumps(card, indent=2) if args.json else cost.format_card(card))
    elif args.arch_cmd == "compare":
        cards = [cost.cost_card(resolve_config(n), context_len=args.context) for n in args.names]
        print(json.dumps(cards, indent=2) if args.json else cost.compare_table(cards))
    elif args.arch_cmd == "diff":
        a, b = resolve_config(args.a), resolve_config(args.b)
        rows = cost.diff_configs(a, b)
        if args.json:
            print(json.dumps({k: [va, vb] for k, va, vb in rows}, indent=2, default=str))
            return
        if not rows:
            print(f"{args.a} and {args.b} have the same architecture")
        w = max((len(r[0]) for r in rows), default=0)
        print(f"{'field':<{w}}  {args.a}  ->  {args.b}")
        for k, va, vb in rows:
            print(f"{k:<{w}}  {va!r}  ->  {vb!r}")


# --- convert ---------------------------------------------------------------------------------
def cmd_convert(args) -> None:
    import torch

    from evolm.loading import load, save

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             None: None}[args.dtype]
    model, tok = load(args.model, dtype=dtype)
    save(model, args.out, tokenizer=tok, fmt=args.to)
    print(f"wrote {args.to} model to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evolm", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("arch", help="architecture presets, cost cards and comparisons")
    asub = a.add_subparsers(dest="arch_cmd", required=True)
    asub.add_parser("list", help="list every preset with its size")
    s = asub.add_parser("show", help="cost card of one architecture")
    s.add_argument("name", help="preset name, config JSON, or HF config.json / folder")
    s.add_argument("--context", type=int, default=None, help="context length for KV/FLOP figures")
    s.add_argument("--json", action="store_true")
    s = asub.add_parser("compare", help="cost cards side by side")
    s.add_argument("names", nargs="+")
    s.add_argument("--context", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s = asub.add_parser("diff", help="config fields that differ between two architectures")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_arch)

    c = sub.add_parser("convert", help="convert a model between formats")
    c.add_argument("--model", required=True, help="HF folder, GGUF file or evolm checkpoint")
    c.add_argument("--to", choices=["hf", "evolm"], default="hf")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from evolm.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
