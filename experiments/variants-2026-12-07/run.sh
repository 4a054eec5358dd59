#!/usr/bin/env bash
# This round's pretraining runs: mpma and reclf, 3 seeds each, with the local loss's groups of
# 16 (the default) and with every pair of the batch (--local-group-size 0), the flags of the
# downstream study's runs; one torch thread each, two at a time. Then the downstream
# evaluation (experiments/downstream-2026-12-06/run.sh) and this round's tables.
#   VARIANT_RUNS=/work/runs-variants bash experiments/variants-2026-12-07/run.sh  (RUNS: the downstream study's runs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VARIANT_RUNS=${VARIANT_RUNS:-/work/runs-variants}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VARIANT_RUNS
train() {  # row seed [flags]
  local row=$1 seed=$2; shift 2
  [ -f "$VARIANT_RUNS/$row/seed$seed/final.json" ] && return
  python -m mcr.train --out-dir "$VARIANT_RUNS/$row/seed$seed" --seed "$seed" --max-minutes 0 --eval-every 0 \
    --no-pictures --overwrite "$@" > "$VARIANT_RUNS/$row-seed$seed.log" 2>&1
}
export -f train
for seed in 0 1 2; do
  echo "mpma $seed --variant mpma"; echo "reclf $seed --variant reclf"
  echo "mpma-every-pair $seed --variant mpma --local-group-size 0"
  echo "reclf-every-pair $seed --variant reclf --local-group-size 0"
done | xargs -P 2 -L 1 bash -c 'train "$@"' _
for row in mpma reclf mpma-every-pair reclf-every-pair; do
  for seed in 0 1 2; do cp "$VARIANT_RUNS/$row/seed$seed/final.json" "$here/raw/$row-seed$seed-final.json"; done
done
VARIANT_RUNS=$VARIANT_RUNS bash "$here/../downstream-2026-12-06/run.sh"
python "$here/table.py" > "$here/table.md"
