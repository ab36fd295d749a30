#!/usr/bin/env bash
# MUDD's training defaults on the CPU, decided before the evidence runs (docs/results). At MUDD's best peak
# LR from the sweep (docs/results/lr-sweep/choice.json), the sweep's shape (6 layers, dim 192, 250 steps of
# 16 x 256 tokens), seeds 0 and 1, four variants, each one change from today's default:
#   default       dense_norm none, no cap, generator LR x 1
#   gen-lr-0.25   --generator-lr-mult 0.25 (the speedrun's LR x 0.25 on the MUDD parameters)
#   prepost       --set dense_norm=prepost (the official 405M configuration)
#   cap10         --set dense_cap=10 (the authors' later tanh cap)
# Rule, fixed before the runs: the variant with the lowest mean final validation loss over the two seeds
# becomes the default if it beats `default` by at least 0.01; otherwise the default stays. Combinations are
# not tested. Resumable like lr_sweep.sh; result files go to docs/results/mudd-recipe/<variant>.
#   bash scripts/experiments/mudd_recipe_arm.sh [MUDD_BIN] [RUNS_DIR]
set -euo pipefail
. "$(dirname "$0")/common.sh"
MUDD=${1:-.venv/bin/mudd}
RUNS=${2:-runs/mudd-recipe}
DOCS=docs/results/mudd-recipe
LR=$(python3 -c "import json; print(json.load(open('docs/results/lr-sweep/choice.json'))['mudd'])")
declare -A FLAGS=([default]="" [gen-lr-0.25]="--generator-lr-mult 0.25" [prepost]="--set dense_norm=prepost"
                  [cap10]="--set dense_cap=10")
for variant in default gen-lr-0.25 prepost cap10; do
  out="$RUNS/$variant"
  restore_compare "$out" "$DOCS/$variant"
  # shellcheck disable=SC2086
  "$MUDD" compare --preset tiny --set n_layer=6 --set dim=192 --set n_head=3 --connections mudd --baseline mudd \
      --seeds 2 --steps 250 --batch-size 16 --seq-len 256 --lr "$LR" --eval-every 25 --eval-windows 64 \
      ${FLAGS[$variant]} --out "$out" --no-progress
  keep_compare "$out" "$DOCS/$variant"
done
