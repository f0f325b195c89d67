#!/usr/bin/env bash
# The kernel-level fuzzer (tests/fuzz_kernels.py) on the CUDA kernels under compute-sanitizer.
# Needs a GPU, the built mixkernels._C_cuda and compute-sanitizer (CUDA toolkit). Meant as one
# step of scripts/gpu_check.sh, e.g. after the build:
#
#     FUZZ_BUDGET=60 bash scripts/fuzz_cuda_sanitizer.sh        # ~2-3 min with start-up
#
# Exit status: 0 clean (or skipped: no GPU / no compute-sanitizer, said on stdout; set
# REQUIRE_SANITIZER=1 to make that a failure), 1 a sanitizer error or a fuzz failure.
# Env: FUZZ_BUDGET (s, default 60), FUZZ_SEED (default random, printed), TOOLS (default
# "memcheck"; e.g. "memcheck initcheck" runs the fuzzer once per tool), FUZZ_OPS (regex of ops),
# OUT (folder for the logs; default build/fuzz_cuda).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/build/fuzz_cuda}
mkdir -p "$OUTDIR"
skip() {
  echo "fuzz_cuda_sanitizer: SKIPPED: $1"
  [ "${REQUIRE_SANITIZER:-0}" = 1 ] && exit 1
  exit 0
}

CS=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12.8 /opt/cuda; do
  [ -z "$CS" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && CS="$d/bin/compute-sanitizer"
done
[ -n "$CS" ] || skip "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || skip "no CUDA device"
"$PY" -c "import mixkernels._ext as e, sys; sys.exit(0 if e.cuda_error is None else (print(e.cuda_error) or 1))" \
  || skip "mixkernels._C_cuda not usable"

SEED=${FUZZ_SEED:-$(( (RANDOM << 15) | RANDOM ))}
BUDGET=${FUZZ_BUDGET:-60}
# Every tensor its own cudaMalloc: memcheck sees out-of-bounds accesses at the tensor's edge,
# not only at the edge of a caching-allocator block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in ${TOOLS:-memcheck}; do
  log="$OUTDIR/fuzz_cuda_$tool.log"
  echo "== compute-sanitizer --tool $tool: fuzz seed $SEED, budget $BUDGET s (log: $log)"
  t0=$(date +%s)
  "$CS" --tool "$tool" --error-exitcode 99 --target-processes all --print-limit 20 \
    "$PY" tests/fuzz_kernels.py --device cuda --budget "$BUDGET" --seed "$SEED" --verbose \
    ${FUZZ_OPS:+--ops "$FUZZ_OPS"} >"$log" 2>&1
  rc=$?
  grep -E "^fuzz:|^FAIL|^=========.*(ERROR SUMMARY|Invalid|error)" "$log" | tail -25
  echo "== $tool: exit $rc in $(( $(date +%s) - t0 )) s"
  if [ "$rc" != 0 ]; then
    status=1
    echo "== last case before the failure: $(grep -E '^seed [0-9]+ case [0-9]+:' "$log" | tail -1)"
    echo "== replay: compute-sanitizer --tool $tool $PY tests/fuzz_kernels.py --device cuda --seed $SEED --case N"
  fi
done
exit $status
