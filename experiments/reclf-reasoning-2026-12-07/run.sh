#!/usr/bin/env bash
# This round's pretraining runs: reclf with SRM and IRM reasoning over the matchings
# (--reasoning-over matchings), in our masked form and in the abstract's contrastive-only
# setting (--unmasked-tuning 1), 3 seeds each, the flags of the downstream study's runs; one
# torch thread each, two at a time. Then the downstream evaluation
# (experiments/downstream-2026-12-06/run.sh, which finds them under $VARIANT_RUNS), the step
# costs and this round's table.
#   VARIANT_RUNS=/work/runs-variants bash experiments/reclf-reasoning-2026-12-07/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VARIANT_RUNS=${VARIANT_RUNS:-/work/runs-variants}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VARIANT_RUNS
train() {  # row seed [flags]
  local row=$1 seed=$2; shift 2
  [ -f "$VARIANT_RUNS/$row/seed$seed/final.json" ] && return
  python -m mcr.train --out-dir "$VARIANT_RUNS/$row/seed$seed" --seed "$seed" --max-minutes 0 --eval-every 0 \
    --no-pictures --overwrite --variant reclf "$@" > "$VARIANT_RUNS/$row-seed$seed.log" 2>&1
}
export -f train
for seed in 0 1 2; do
  echo "reclf-matchings $seed --reasoning-over matchings"
  echo "reclf-matchings-unmasked $seed --reasoning-over matchings --unmasked-tuning 1"
done | xargs -P 2 -L 1 bash -c 'train "$@"' _
for row in reclf-matchings reclf-matchings-unmasked; do
  for seed in 0 1 2; do cp "$VARIANT_RUNS/$row/seed$seed/final.json" "$here/raw/$row-seed$seed-final.json"; done
done
VARIANT_RUNS=$VARIANT_RUNS bash "$here/../downstream-2026-12-06/run.sh"
python "$here/costs.py" 1 8 > "$here/costs-1thread.json"
python "$here/table.py" > "$here/table.md"
