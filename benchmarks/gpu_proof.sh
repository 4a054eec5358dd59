#!/usr/bin/env bash
# One command, one GPU: install, the GPU test subset, then every benchmark; logs, results and
# the environment under benchmarks/results/gpu_proof-<date>/ (the benchmarks also write their
# own results/<name>-<device>-<date>.{json,csv}). Tests and benchmarks share an 8-minute budget:
# each step stops at its own time limit or at the budget's end, and the next one still runs.
#
#   benchmarks/gpu_proof.sh              # on the GPU machine (torch + triton installed, no network)
#   benchmarks/gpu_proof.sh --dry-run    # anywhere: list the steps, check every script exists, compiles
#                                        # and takes the step's arguments (benchmarks/parse_only.py)
#   benchmarks/gpu_proof.sh --no-install # skip `pip install --no-build-isolation --no-deps -e ./kernels -e .`
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mcr / mcr_kernels, whatever is installed

DRY_RUN=0
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_proof.sh: unknown argument $arg (expected --dry-run, --no-install)" >&2; exit 2 ;;
  esac
done

BUDGET_S=480
KERNEL_TESTS="tests/kernels/test_attention.py tests/kernels/test_attention_offsets.py tests/kernels/test_mba.py tests/kernels/test_patch_drop.py"
for optional in tests/kernels/test_local_matching.py tests/kernels/test_linear_cross_entropy.py tests/kernels/test_gelu_mlp.py tests/kernels/test_layer_norm_linear.py; do
  [[ -f $optional ]] && KERNEL_TESTS="$KERNEL_TESTS $optional"
done

# name | time limit (s) | command. Optional benchmarks run when their script exists.
STEPS=(
  "tests|100|python -m pytest -q -x -p no:cacheprovider $KERNEL_TESTS"
  "patch_drop|50|python benchmarks/bench_patch_drop.py"
  "attention|130|python benchmarks/bench_attention.py"
  "mba_infonce|100|python benchmarks/bench_mba_infonce.py"
  "train_step|70|python benchmarks/bench_train_step.py --shapes paper:64"
)
for optional in local_matching linear_cross_entropy gelu_mlp layer_norm_linear; do
  [[ -f benchmarks/bench_$optional.py ]] && STEPS+=("$optional|40|python benchmarks/bench_$optional.py")
done

if [[ $DRY_RUN == 1 ]]; then
  status=0
  [[ $INSTALL == 1 ]] && echo "install: pip install --no-build-isolation --no-deps -e ./kernels -e .   (MAX_JOBS=\$(nproc))"
  for step in "${STEPS[@]}"; do
    IFS="|" read -r name limit cmd <<< "$step"
    echo "$name (<= ${limit} s): $cmd"
    if [[ $name == tests ]]; then
      for f in $KERNEL_TESTS; do
        [[ -f $f ]] || { echo "  MISSING $f"; status=1; }
      done
      python -m pytest --collect-only -q -p no:cacheprovider $KERNEL_TESTS > /dev/null \
        || { echo "  tests do not collect"; status=1; }
    else
      read -r _ script args <<< "$cmd"
      if [[ ! -f $script ]]; then echo "  MISSING $script"; status=1; continue; fi
      python -m py_compile "$script" || { echo "  $script does not compile"; status=1; }
      # shellcheck disable=SC2086  # the step's arguments, word-split as the run splits them
      python benchmarks/parse_only.py "$script" $args > /dev/null \
        || { echo "  $script does not take: $args"; status=1; }
    fi
  done
  echo "dry run: $([[ $status == 0 ]] && echo "every step's script exists and parses" || echo FAILED)"
  exit $status
fi

OUT="benchmarks/results/gpu_proof-$(date -u +%Y-%m-%d)"
mkdir -p "$OUT"
{
  echo "date: $(date -u --iso-8601=seconds)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn not installed"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [[ $INSTALL == 1 ]]; then
  start=$SECONDS
  MAX_JOBS=$(nproc) pip install --no-build-isolation --no-deps -e ./kernels -e . > "$OUT/install.log" 2>&1
  echo "install: rc $? in $((SECONDS - start)) s (log $OUT/install.log)" | tee -a "$OUT/summary.txt"
fi

begin=$SECONDS
for step in "${STEPS[@]}"; do
  IFS="|" read -r name limit cmd <<< "$step"
  left=$((BUDGET_S - (SECONDS - begin)))
  if (( left < 10 )); then
    echo "$name: not run (8-minute budget spent)" | tee -a "$OUT/summary.txt"
    continue
  fi
  (( limit > left )) && limit=$left
  start=$SECONDS
  timeout "$limit" $cmd > "$OUT/$name.log" 2>&1
  rc=$?
  outcome=$([[ $rc == 0 ]] && echo ok || ([[ $rc == 124 ]] && echo "TIMED OUT" || echo "FAILED rc $rc"))
  echo "$name: $outcome in $((SECONDS - start)) s (limit $limit s, log $OUT/$name.log)" | tee -a "$OUT/summary.txt"
done
echo "total $((SECONDS - begin)) s for tests and benchmarks; results in benchmarks/results/" | tee -a "$OUT/summary.txt"
