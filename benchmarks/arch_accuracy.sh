#!/usr/bin/env bash
# demo_brain's best validation Dice at the default budget for USEMA layouts, over seeds, one thread per run
# (a run's Dice is deterministic for a given thread count), two runs at a time on a 2-core machine. Variants:
#   current | residual_stem | conv_decoder | residual_stem_conv_decoder (the options of the current layout)
#   former_tiny (the 2D tiny preset's widths until usema 0.3.2: 16…256 instead of 16…128)
#   usema02 (nn.InstanceNorm) | usema02_concat (0.2 with 0.1's concatenation + 1x1 fusion)
#   usema01 (usema 0.1 itself, from git commit c8d0f98)
# The table in docs/benchmarks.md ("Accuracy of the layout choices") comes from the lines this prints.
#   WORK=/tmp/arch_acc SEEDS="0 1 2 3 4" bash benchmarks/arch_accuracy.sh [variant ...]
set -euo pipefail
WORK=${WORK:-/tmp/arch_acc}
SEEDS=${SEEDS:-0 1 2}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"

run() {  # run CORE VARIANT SEED
  local core=$1 variant=$2 seed=$3 out="$WORK/$2_s$3"
  local train=(train demo_brain --set "train.seed=$seed" --output "$out" --overwrite --threads 1)
  local py=(python "$HERE/arch_accuracy.py")
  case $variant in
    current) taskset -c "$core" usema "${train[@]}" ;;
    residual_stem) taskset -c "$core" usema "${train[@]}" --set model.overrides.stem=residual ;;
    former_tiny) taskset -c "$core" usema "${train[@]}" --set 'model.overrides.features=[16,32,64,128,256,256]' ;;
    conv_decoder) taskset -c "$core" usema "${train[@]}" --set model.overrides.decoder_block=conv ;;
    residual_stem_conv_decoder) taskset -c "$core" usema "${train[@]}" --set model.overrides.stem=residual \
      --set model.overrides.decoder_block=conv ;;
    usema02) taskset -c "$core" "${py[@]}" --undo instance_norm -- "${train[@]}" ;;
    usema02_concat) taskset -c "$core" "${py[@]}" --undo instance_norm concat_fusion -- "${train[@]}" ;;
    usema01)
      [ -d "$WORK/usema01_src/usema" ] || { mkdir -p "$WORK/usema01_src"
        git -C "$HERE/.." archive c8d0f98 usema | tar -x -C "$WORK/usema01_src"; }
      # from $WORK, so that the working tree's usema does not shadow 0.1's; 0.1 has no --threads: the core pins it
      (cd "$WORK" && PYTHONPATH="$WORK/usema01_src" taskset -c "$core" python -m usema train demo_brain \
        --set "train.seed=$seed" --output "$out" --overwrite) ;;
    *) echo "unknown variant $variant" >&2; return 2 ;;
  esac > "$out.log" 2>&1
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(current residual_stem conv_decoder residual_stem_conv_decoder usema01)
jobs=()
for variant in "${variants[@]}"; do
  for seed in $SEEDS; do jobs+=("$variant $seed"); done
done
for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  run 0 ${jobs[i]} &
  if ((i + 1 < ${#jobs[@]})); then run 1 ${jobs[i + 1]} & fi
  wait
done
# the held-out slab as 20 one-slice cases, each z-scored on its own by `usema infer` (not with its volume's
# statistics, as in training and validation): how much a layout depends on consistent intensity normalisation
[ -d "$WORK/slab" ] || usema datasets export-demo brain --heldout-slices --output "$WORK/slab" > /dev/null
for run_dir in "$WORK"/*_s*/; do
  run_dir=${run_dir%/}
  best=$(python -c "import csv,sys; print(max(float(r['mean_dice']) for r in csv.DictReader(open(sys.argv[1]))))" \
    "$run_dir/metrics.csv")
  slab=-
  if [ -f "$run_dir/checkpoints/best.pt" ] && [[ $(basename "$run_dir") != usema01_* && $(basename "$run_dir") != usema02_concat_* ]]; then  # (their layouts are not buildable)
    usema infer "$run_dir" --input "$WORK/slab/imagesTs" --output "$run_dir/pred" --overwrite --no-progress > /dev/null
    usema evaluate --pred "$run_dir/pred" --truth "$WORK/slab/labelsTs" --recipe demo_brain \
      --output "$run_dir/eval.json" > /dev/null
    slab=$(python -c "import json,sys; c=json.load(open(sys.argv[1]))['per_class']; \
print(round(sum(v['dsc'] for v in c.values()) / len(c), 4))" "$run_dir/eval.json")
  fi
  echo "$(basename "$run_dir") best-validation-dice $best per-slice-slab-dice $slab"
done | sort
