#!/usr/bin/env bash
# Stability at depth (issue: MUDD that trains well by default): a 24-layer, 128-wide model of the `tiny`
# family on the bundled corpus with the CPU recipe of the time (lr 3e-3, 1 % warm-up), plain MUDD against
# its stability controls and the residual baseline; every step logged (loss, gradient norm).
# Resumable: re-running skips finished runs and resumes unfinished ones. Small result files are copied to
# docs/results/stability-depth/.
#   bash scripts/experiments/stability_depth.sh [MUDD_BIN] [RUNS_DIR]
set -euo pipefail
MUDD=${1:-.venv/bin/mudd}
RUNS=${2:-runs/stability-depth}
DOCS=docs/results/stability-depth
SHAPE=(--preset tiny --set n_layer=24 --set dim=128 --set n_head=2 --max-steps 400 --batch-size 8 --seq-len 128
       --eval-every 50 --eval-windows 32 --save-every 100 --keep-checkpoints 1 --log-every 1 --sample-tokens 0
       --no-tensorboard --no-progress)
declare -A VARIANTS=(
  [residual]="--connection residual"
  [mudd]="--connection mudd"
  [mudd-prepost]="--connection mudd --set dense_norm=prepost"
  [mudd-cap10]="--connection mudd --set dense_cap=10"
)
for seed in 0 1; do
  for name in residual mudd mudd-prepost mudd-cap10; do
    out="$RUNS/$name/seed$seed"
    if [ -f "$out/checkpoints/step_000400/trainer_state.json" ]; then continue; fi
    # shellcheck disable=SC2086
    "$MUDD" train "${SHAPE[@]}" ${VARIANTS[$name]} --seed "$seed" --out "$out"
    mkdir -p "$DOCS/$name/seed$seed"
    cp "$out/metrics.jsonl" "$out/run.json" "$out/loss.png" "$DOCS/$name/seed$seed/"
  done
done
