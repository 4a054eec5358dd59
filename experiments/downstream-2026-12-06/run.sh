#!/usr/bin/env bash
# Zero-shot and linear probe of every finished pretraining run under $RUNS (and the
# random-init floor of each seed), one torch thread each; then the table.
#   RUNS=/work/runs-downstream VARIANT_RUNS=/work/runs-variants bash experiments/downstream-2026-12-06/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
RUNS=${RUNS:-/work/runs-downstream}
VARIANT_RUNS=${VARIANT_RUNS:-/work/runs-variants}  # mpma and reclf (experiments/variants-2026-12-07, reclf-reasoning-2026-12-07)
CACHE=${CACHE:-/tmp/mcr-downstream-cache}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$here/raw"
evaluate() {  # name checkpoint [extra flags]
  local name=$1 checkpoint=$2; shift 2
  for task in zero-shot linear-probe; do
    out="$here/raw/$name-${task}.json"
    [ -f "$out" ] && continue
    python -m mcr.evaluate --checkpoint "$checkpoint" --task "$task" --split test --size 2000 --per-class 100 \
      --probe-train-size 5000 --cache-dir "$CACHE" --output "$out" "$@" > "$here/raw/$name-${task}.log" 2>&1
  done
}
for variant in default dual-stream-at-time abm dual-stream; do
  for seed in 0 1 2; do
    run="$RUNS/$variant/seed$seed"
    [ -f "$run/final.json" ] || continue
    evaluate "$variant-seed$seed" "$run"
    if [ "$variant" = default ]; then evaluate "random-init-seed$seed" "$run" --random-init "$seed"; fi
  done
done
for variant in mpma reclf mpma-every-pair reclf-every-pair reclf-matchings reclf-matchings-unmasked; do
  for seed in 0 1 2; do
    run="$VARIANT_RUNS/$variant/seed$seed"
    [ -f "$run/final.json" ] && evaluate "$variant-seed$seed" "$run"
  done
done
python "$here/table.py" "$here/raw" > "$here/table.md"
