#!/usr/bin/env bash
# GPU check for a lent H100/H200 (no network). Run from the repository root:
#   OUT=/some/dir bash scripts/gpu_check.sh [all|tests|bench]
# A device call is capped at 10 minutes: use `tests` then `bench` in two back-to-back calls
# (the in-place build from the first is reused while the machine stays warm); `all` does both.
# Steps, each time-bounded so the whole script fits in ~9 minutes:
#   1. nvidia-smi and versions                          -> stdout and $OUT/env.txt
#   2. in-place build (sm_90)                           -> $OUT/build.log
#   3. python -m mixkernels.info                        -> $OUT/env.txt
#   4. full test suite on the GPU                       -> $OUT/tests.log, $OUT/junit.xml
#   5. python -m mixkernels.bench --suite all           -> $OUT/bench/{bench.json,bench.md,plots.tar,bench.log}
# At most 8 files come back from $OUT (2 levels deep): these are exactly 8.
# Exit status: non-zero if the build or the tests failed; the benchmark still runs whenever the
# build worked (its results are informative even with failing tests). Time limits (seconds) can be
# changed with T_BUILD, T_TESTS, T_BENCH.
set -u
PHASE=${1:-all}
case "$PHASE" in all|tests|bench) ;; *) echo "usage: gpu_check.sh [all|tests|bench]" >&2; exit 2 ;; esac
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MIXKERNELS_CUDA_ARCHS=${MIXKERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
T_BUILD=${T_BUILD:-210}
if [ "$PHASE" = all ]; then
  T_TESTS=${T_TESTS:-150}; T_BENCH=${T_BENCH:-170}
else  # one phase per call: each may use most of the call
  T_TESTS=${T_TESTS:-330}; T_BENCH=${T_BENCH:-330}
fi
PY=${PYTHON:-python}
rc=0
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }

step "nvidia-smi and versions"
{
  nvidia-smi || echo "nvidia-smi failed"
  $PY - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for m in ("triton", "timm", "ninja", "pybind11", "pytest", "pytest_benchmark"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__)
PY
  nvcc --version 2>/dev/null | tail -1 || echo "nvcc not on PATH"
  git log -1 --oneline 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

step "build in place (MIXKERNELS_CUDA_ARCHS=$MIXKERNELS_CUDA_ARCHS, limit ${T_BUILD}s) -> build.log"
timeout -k 10 "$T_BUILD" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
build_rc=$?
if [ $build_rc -ne 0 ]; then
  echo "build_ext --inplace failed (rc=$build_rc); trying pip install -e" | tee -a "$OUT/build.log"
  timeout -k 10 "$T_BUILD" $PY -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1
  build_rc=$?
fi
tail -n 5 "$OUT/build.log"
echo "build rc=$build_rc"
[ $build_rc -eq 0 ] || rc=1

step "python -m mixkernels.info"
timeout -k 5 60 $PY -m mixkernels.info 2>&1 | tee -a "$OUT/env.txt"

if [ "$PHASE" != bench ]; then
step "tests on the GPU (limit ${T_TESTS}s) -> tests.log, junit.xml"
timeout -k 10 "$T_TESTS" $PY -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/junit.xml" >"$OUT/tests.log" 2>&1
test_rc=$?
tail -n 15 "$OUT/tests.log"
echo "tests rc=$test_rc"
[ $test_rc -eq 0 ] || rc=1
fi

if [ "$PHASE" = tests ]; then
  :
elif [ $build_rc -eq 0 ]; then
  step "benchmark (limit ${T_BENCH}s) -> bench/"
  BT=$(mktemp -d)
  # --time-budget stops starting new cases in time for the reports; SIGTERM from timeout also
  # makes the CLI write what it has.
  timeout -k 20 "$T_BENCH" $PY -m mixkernels.bench --suite all --out "$BT" --time-budget $(( T_BENCH - 45 )) \
    >"$OUT/bench/bench.log" 2>&1
  echo "bench rc=$?"
  tail -n 60 "$OUT/bench/bench.log"
  for f in bench.json bench.md; do [ -f "$BT/$f" ] && cp "$BT/$f" "$OUT/bench/"; done
  (cd "$BT" && ls *.png >/dev/null 2>&1 && tar cf "$OUT/bench/plots.tar" *.png)
else
  step "benchmark skipped: the build failed"
fi

step "done: rc=$rc"
ls -la "$OUT" "$OUT/bench"
exit $rc
