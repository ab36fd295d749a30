#!/usr/bin/env bash
# Peak-learning-rate sweep for the evidence runs (docs/results): every connection at each LR of a
# factor-2 grid, seed 0, 250 steps of 16 x 256 tokens (1.02 M tokens), on a 6-layer, 192-wide model of
# the `tiny` family (8k vocabulary) on the bundled corpus, with the `cpu` recipe otherwise. The shape, the
# grid and the connections were fixed before any run; so was the rule for a best LR on the edge of the grid:
# extend it by a factor of 2 that way until the best is inside (lr_sweep_report.py). The report writes choice.json. One `mudd compare` folder per LR; resumable: re-running
# skips finished runs, and a fresh machine restores the finished ones from docs/results/lr-sweep/ (where the
# small result files are copied: compare.json, results, each run's metrics.jsonl and run.json).
#   bash scripts/experiments/lr_sweep.sh [MUDD_BIN] [RUNS_DIR]
set -euo pipefail
. "$(dirname "$0")/common.sh"
MUDD=${1:-.venv/bin/mudd}
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${2:-runs/lr-sweep}
DOCS=docs/results/lr-sweep
CONNECTIONS=residual,ddformer,mudd,attnres,hc
for lr in 1e-3 2e-3 4e-3 8e-3; do
  out="$RUNS/lr$lr"
  restore_compare "$out" "$DOCS/lr$lr"
  "$MUDD" compare --preset tiny --set n_layer=6 --set dim=192 --set n_head=3 --connections "$CONNECTIONS" \
      --seeds 1 --steps 250 --batch-size 16 --seq-len 256 --lr "$lr" --eval-every 25 --eval-windows 64 \
      --out "$out" --no-progress
  keep_compare "$out" "$DOCS/lr$lr"
done
# Extensions past a best LR on the edge of the grid, one compare folder per LR with the connections that need it.
for round in 1 2 3; do
  extensions=$("$PYTHON" scripts/experiments/lr_sweep_report.py "$DOCS" --extensions)
  [ -z "$extensions" ] && break
  while read -r lr connections; do
    out="$RUNS/lr$lr"
    restore_compare "$out" "$DOCS/lr$lr"
    "$MUDD" compare --preset tiny --set n_layer=6 --set dim=192 --set n_head=3 --connections "$connections" \
        --baseline "${connections%%,*}" --seeds 1 --steps 250 --batch-size 16 --seq-len 256 --lr "$lr" \
        --eval-every 25 --eval-windows 64 --out "$out" --no-progress
    keep_compare "$out" "$DOCS/lr$lr"
  done <<< "$extensions"
done
"$PYTHON" scripts/experiments/lr_sweep_report.py "$DOCS"
