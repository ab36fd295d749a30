#!/usr/bin/env bash
# Adding MUDD to an existing model (docs/convert.md). Settings fixed before any run:
#   1. the "existing checkpoint": a Llama-shaped residual model (tfm++-tiny: 4 layers, dim 256, 8k vocabulary,
#      SwiGLU, RMSNorm, RoPE, no q/k norm) trained 300 steps of 16 x 256 tokens on the bundled corpus (seed 0),
#      then written as a transformers Llama checkpoint;
#   2. continued training from that Llama folder, 150 steps of 16 x 256 tokens at peak lr 1e-3 (the cpu recipe
#      otherwise), as residual and with MUDD added (identity at the start), seeds 0-2, one `mudd compare`.
# Resumable (re-running skips what is finished); small result files go to docs/results/convert-continue/.
#   bash scripts/experiments/convert_continue.sh [MUDD_BIN] [RUNS_DIR]
set -euo pipefail
. "$(dirname "$0")/common.sh"
MUDD=${1:-.venv/bin/mudd}
RUNS=${2:-runs/convert-continue}
DOCS=docs/results/convert-continue
BASE="$RUNS/base"
if [ ! -f "$BASE/checkpoints/step_000300/trainer_state.json" ]; then
  "$MUDD" train --preset tfm++-tiny --max-steps 300 --batch-size 16 --seq-len 256 --eval-every 50 --save-every 100 \
      --eval-windows 64 --sample-tokens 0 --no-tensorboard --no-progress --seed 0 --out "$BASE"
fi
mkdir -p "$DOCS/base"
cp "$BASE/metrics.jsonl" "$BASE/run.json" "$DOCS/base/"
[ -f "$RUNS/llama/config.json" ] || "$MUDD" convert "$BASE/checkpoints/step_000300" "$RUNS/llama" --transformers-format
out="$RUNS/continue"
restore_compare "$out" "$DOCS/continue"
"$MUDD" compare --init-from "$RUNS/llama" --preset tfm++-tiny --connections residual,mudd --baseline residual \
    --seeds 3 --steps 150 --batch-size 16 --seq-len 256 --lr 1e-3 --eval-every 25 --eval-windows 64 \
    --out "$out" --no-progress
keep_compare "$out" "$DOCS/continue"
