"""Install the built-in post-training data: BIG-bench natural_instructions + OpenAI evals (SFT), hhh_alignment (DPO).

Reads the bigbench sdist and the evals wheel from PyPI (``pip download --no-deps``; never
installed), the sdist as a stream, and writes
data/post/{natural_instructions,hhh_alignment,openai_evals}/{train,val}.jsonl. Idempotent.

Usage: python scripts/install_post_data.py [--data-dir DIR] [--sdist PATH] [--evals-wheel PATH]
                                           [--no-evals] [--force] [--keep-sdist]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from evolm.post.data import install_post_data  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="target folder (default: data/post or $EVOLM_POST_DATA)")
    p.add_argument("--sdist", default=None, help="a local bigbench-1.0.0.tar.gz (default: pip download it)")
    p.add_argument("--evals-wheel", default=None, help="a local evals-3.0.1.post1 wheel (default: pip download it)")
    p.add_argument("--no-evals", action="store_true", help="skip the OpenAI evals chat samples")
    p.add_argument("--force", action="store_true", help="rewrite even if already installed")
    p.add_argument("--keep-sdist", action="store_true", help="keep the downloaded sdist / wheel in the temp folder")
    a = p.parse_args()
    print("post-training data at", install_post_data(a.data_dir, a.sdist, a.force, a.keep_sdist,
                                                         evals=not a.no_evals, evals_wheel=a.evals_wheel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
