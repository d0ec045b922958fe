#!/usr/bin/env bash
# 5-fold `usema cv` on the 16 nuclei tiles at demo_nuclei's default budget, then the held-out columns 384-511
# segmented by the 5-fold ensemble and by each fold alone, all scored with `usema evaluate`.
#
#   WORK=/tmp/nuclei_cv bash benchmarks/nuclei_cv.sh       (prints the scores; wall times in $WORK/times.txt)
set -euo pipefail
WORK=${WORK:-/tmp/nuclei_cv}
RECIPE=$(pwd)/benchmarks/nuclei_tiles.yaml
mkdir -p "$WORK" && cd "$WORK"
[ -d Dataset801_NucleiTiles ] || usema datasets export-demo nuclei --tiles 4 --output Dataset801_NucleiTiles > /dev/null
start=$(date +%s)
usema cv "$RECIPE" --output cv_tiles | tee cv.log
echo "usema cv: $(( $(date +%s) - start )) s" | tee -a times.txt
held=Dataset801_NucleiTiles/imagesTs
usema infer cv_tiles --input $held --output held/ens_pp --overwrite --no-progress
for k in 0 1 2 3 4; do
  usema infer cv_tiles/fold_$k/checkpoints/last.pt --input $held --output held/fold_$k --overwrite --no-progress
done
for x in ens_pp fold_0 fold_1 fold_2 fold_3 fold_4; do
  usema evaluate --pred held/$x --truth Dataset801_NucleiTiles/labelsTs --recipe "$RECIPE" --output held/$x.json \
    --overwrite | tail -1 | sed "s/^/$x: /"
done
