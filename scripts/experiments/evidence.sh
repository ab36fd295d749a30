#!/usr/bin/env bash
# The evidence runs of docs/results.md, fixed before any of them ran. Every connection at its best peak LR
# from the sweep (docs/results/lr-sweep/choice.json), with the recipe and model defaults a user gets
# (`cpu` recipe, the `tiny` family's options), on the bundled corpus:
#   main   residual, ddformer, mudd, attnres, hc; 6 layers, dim 192, 3 heads (5.8 M parameters);
#          seeds 0-4; 500 steps of 16 x 256 tokens (2.05 M tokens, 1.5 epochs of the training split);
#          validation on 400 windows of 256 tokens (the whole validation split) every 50 steps
#   long   the same compare, plus residual trained 1000 steps (same seeds): the curve the compute
#          multiplier is read on
#   depth  residual and mudd at the same parameter budget 3x deeper: 18 layers, dim 112, 2 heads (5.84 M
#          parameters against 5.80 M), otherwise as main, each at its 6-layer best LR
#   tfmpp  Transformer++ itself (the `tfm++-tiny` body: constant FFN width, no q/k norm) at the main shape with a
#          residual stream, at residual's LR; added after main's results were known (docs/results/evidence/README.md)
#   tfmpp-long  the tfmpp compare, plus its residual trained 1000 steps (same seeds): the multiplier against
#          Transformer++ itself; added after tfmpp's results were known
# Parts run in that order; each is a resumable `mudd compare` folder, and a fresh machine restores the finished
# runs from docs/results/evidence/<part> (where the small result files are copied after each part).
#   bash scripts/experiments/evidence.sh [MUDD_BIN] [RUNS_DIR] [PARTS]      (PARTS default "main long depth tfmpp tfmpp-long")
set -euo pipefail
. "$(dirname "$0")/common.sh"
MUDD=${1:-.venv/bin/mudd}
RUNS=${2:-runs/evidence}
PARTS=${3:-main long depth tfmpp tfmpp-long}
DOCS=docs/results/evidence
CHOICE=docs/results/lr-sweep/choice.json
lr_for() {  # --lr-for flags for the given connections, from the sweep's choice
  python3 -c "import json, sys; c = json.load(open('$CHOICE')); print(' '.join(f'--lr-for {n}={c[n]}' for n in sys.argv[1:]))" "$@"
}
COMMON=(--seeds 5 --steps 500 --batch-size 16 --seq-len 256 --eval-every 50 --eval-windows 400 --no-progress)
MAIN_SIZE=(--set n_layer=6 --set dim=192 --set n_head=3)
MAIN_SHAPE=(--preset tiny "${MAIN_SIZE[@]}")
DEPTH_SHAPE=(--preset tiny --set n_layer=18 --set dim=112 --set n_head=2)
MAIN_CONNECTIONS=residual,ddformer,mudd,attnres,hc

run_part() {  # run_part NAME FOLDER ARGS...: restore, run, copy the small files to docs
  local name=$1 folder=$2; shift 2
  local out="$RUNS/$folder"
  restore_compare "$out" "$DOCS/$folder"
  echo "== $name: $out" && "$MUDD" compare "$@" --out "$out"
  keep_compare "$out" "$DOCS/$folder"
}

for part in $PARTS; do
  case $part in
    main) run_part main main "${MAIN_SHAPE[@]}" --connections "$MAIN_CONNECTIONS" "${COMMON[@]}" \
              $(lr_for residual ddformer mudd attnres hc) ;;
    long) run_part long main "${MAIN_SHAPE[@]}" --connections "$MAIN_CONNECTIONS" "${COMMON[@]}" \
              $(lr_for residual ddformer mudd attnres hc) --baseline-steps 1000 ;;
    depth) run_part depth depth "${DEPTH_SHAPE[@]}" --connections residual,mudd "${COMMON[@]}" \
              $(lr_for residual mudd) ;;
    tfmpp) run_part tfmpp tfmpp --preset tfm++-tiny "${MAIN_SIZE[@]}" --connections residual "${COMMON[@]}" \
              $(lr_for residual) ;;
    tfmpp-long) run_part tfmpp-long tfmpp --preset tfm++-tiny "${MAIN_SIZE[@]}" --connections residual \
              "${COMMON[@]}" $(lr_for residual) --baseline-steps 1000 ;;
    *) echo "unknown part $part (main, long, depth, tfmpp, tfmpp-long)" >&2; exit 2 ;;
  esac
done
