#!/bin/bash
# Full-set SmolLM2-135M-Instruct scores (docs/evaluation.md), one task after another; resumable: the
# per-request cache next to each results file lets an interrupted run continue where it stopped.
#   bash scripts/eval_full.sh [OUT_DIR]      (default runs/eval_full)
set -e
cd "$(dirname "$0")/.."
OUT=${1:-runs/eval_full}
M=$(.venv/bin/python -c "from evolm.interop.gguf import find_asset; print(find_asset('smollm2'))")
mkdir -p "$OUT"
for t in arc_challenge piqa arc_easy winogrande hellaswag; do
  if [ ! -s "$OUT/$t.json" ]; then
    echo "=== $t $(date)"
    .venv/bin/evolm eval --model "$M" --tasks $t --batch-size 32 --out "$OUT/$t.json"
  fi
done
echo "=== done $(date)"
