#!/usr/bin/env bash
# USEMA vs MONAI BasicUNet on demo_brain: 3 seeds each at the default budget, scored per held-out slice
# (z 95-114), then `usema compare`. Writes docs/results/demo_brain_compare.md.
#
#   bash benchmarks/demo_brain_compare.sh [usema|basicunet|compare|all]   (default all; WORK=/tmp/brain_cmp)
#
# Each method part is independent of the other, so they can run on different machines or days.
set -euo pipefail
WORK=${WORK:-/tmp/brain_cmp}
part=${1:-all}
mkdir -p "$WORK"
[ -d "$WORK/slab" ] || usema datasets export-demo brain --heldout-slices --output "$WORK/slab" > /dev/null

method() {  # $1 = model.name
  for seed in 0 1 2; do
    run="$WORK/$1_s$seed"
    if [ ! -f "$run/eval.json" ]; then
      start=$(date +%s)
      usema train demo_brain --set model.name="$1" --set train.seed="$seed" --output "$run" --overwrite > "$run.log" 2>&1
      echo "$1 seed $seed: trained in $(( $(date +%s) - start )) s" | tee -a "$WORK/times.txt"
      usema infer "$run" --input "$WORK/slab/imagesTs" --output "$run/pred" --overwrite --no-progress
      usema evaluate --pred "$run/pred" --truth "$WORK/slab/labelsTs" --recipe demo_brain \
        --output "$run/eval.json" --overwrite > /dev/null
    fi
  done
}

case "$part" in
  usema|basicunet) method "$part" ;;
  compare|all)
    [ "$part" = all ] && method usema && method basicunet
    usema compare --a "$WORK"/usema_s{0,1,2}/eval.json --b "$WORK"/basicunet_s{0,1,2}/eval.json \
      --names USEMA BasicUNet --metric dsc --output docs/results/demo_brain_compare.md --overwrite ;;
  *) echo "usage: $0 [usema|basicunet|compare|all]" >&2; exit 2 ;;
esac
