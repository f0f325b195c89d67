#!/usr/bin/env bash
# ASan + UBSan run of the CPU extension: builds mixkernels._C with MIXKERNELS_SANITIZE=1 into
# build/sanitize/ (the normal in-place build is left alone), then runs the CPU-kernel tests and
# the kernel-level fuzzer against it. Any sanitizer report fails the run (UBSan reports are
# fatal: -fno-sanitize-recover; ASan halts on the first error).
#
#   bash scripts/sanitize_cpu.sh            # CI: tests + 60 s of fuzzing
#   FUZZ_BUDGET=300 bash scripts/sanitize_cpu.sh -k window_attention   # extra args go to pytest
#
# What is suppressed, and why:
#   detect_leaks=0             Python, torch and Triton keep allocations alive until exit on
#                              purpose (interned objects, caches); LeakSanitizer would report them,
#                              not leaks in our kernels (whose buffers are all RAII-owned).
#   allocator_may_return_null  tests ask for impossible sizes on purpose; torch must see a null
#                              and raise its "can't allocate memory" error instead of ASan aborting.
#   Triton tests are deselected: the interpreter is pure Python (nothing to sanitize) and slow.
# Python and torch are not instrumented: the ASan runtime is LD_PRELOADed so that it intercepts
# malloc/free for the whole process before anything else loads.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python}
OUTDIR=${SANITIZE_DIR:-$ROOT/build/sanitize}
FUZZ_BUDGET=${FUZZ_BUDGET:-60}
t0=$(date +%s)

echo "== sanitize: build (-fsanitize=address,undefined) into $OUTDIR"
info=mixkernels/_build_info.py
saved=""
if [ -f "$info" ]; then saved=$(mktemp); cp "$info" "$saved"; fi  # setup.py rewrites it: keep the real build's
MIXKERNELS_SANITIZE=1 MIXKERNELS_SKIP_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --build-lib "$OUTDIR/lib" --build-temp "$OUTDIR/temp" >"$OUTDIR.build.log" 2>&1 \
  || { tail -40 "$OUTDIR.build.log"; exit 1; }
if [ -n "$saved" ]; then cp "$saved" "$info"; rm -f "$saved"; fi
so=$(ls "$OUTDIR"/lib/mixkernels/_C*.so)
syms=$(nm -D "$so")  # (not `nm | grep -q`: with pipefail, grep closing the pipe early fails nm)
grep -q __asan_init <<<"$syms" || { echo "sanitize: $so is not instrumented"; exit 1; }

# A copy of the package and the tests with the instrumented module in place of the normal one.
tree="$OUTDIR/tree"
rm -rf "$tree"
mkdir -p "$tree"
cp -r mixkernels tests pyproject.toml "$tree/"
find "$tree/mixkernels" -name '*.so' -delete
cp "$so" "$tree/mixkernels/"
echo "== sanitize: build done in $(( $(date +%s) - t0 )) s"

ASAN_RT=$(${CXX:-c++} -print-file-name=libasan.so)
STDCXX=$(${CXX:-c++} -print-file-name=libstdc++.so)
[ -f "$ASAN_RT" ] || { echo "sanitize: ASan runtime not found ($ASAN_RT)"; exit 1; }
# libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor must find the real
# one when it starts, or the first C++ exception (any TORCH_CHECK) aborts in the interceptor.
export LD_PRELOAD="$ASAN_RT:$STDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
# Reports go to files: pytest captures the output of a test that dies, and the fuzzer and other
# subprocesses inherit these settings. Any report file fails the run, even if pytest passed.
logs="$OUTDIR/reports"
rm -rf "$logs"
mkdir -p "$logs"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:log_path=$logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan"
export MIXKERNELS_REQUIRE_EXT=1 MIXKERNELS_FUZZ_BUDGET="$FUZZ_BUDGET" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cd "$tree"
"$PY" -c "import mixkernels, mixkernels._ext as e; assert e.cpu_error is None, e.cpu_error; print('sanitize: instrumented _C loaded')"

t1=$(date +%s)
echo "== sanitize: CPU-kernel tests and ${FUZZ_BUDGET} s of fuzzing under ASan/UBSan"
rc=0
"$PY" -m pytest -q -p no:cacheprovider -k "not triton and not interp" \
  tests/test_window_attention_cpu.py tests/test_token_ops.py tests/test_losses.py tests/test_bad_inputs.py \
  tests/test_opcheck.py tests/test_edge_inputs.py tests/test_fuzz_kernels.py "$@" || rc=$?
reports=$(find "$logs" -type f | sort)
if [ -n "$reports" ]; then
  for f in $reports; do echo "== sanitizer report $f"; head -60 "$f"; done
  echo "== sanitize: FAILED: $(echo "$reports" | wc -l) sanitizer report(s)"
  exit 1
fi
[ "$rc" = 0 ] || { echo "== sanitize: FAILED: pytest exit status $rc"; exit "$rc"; }
echo "== sanitize: no reports; tests passed in $(( $(date +%s) - t1 )) s (total $(( $(date +%s) - t0 )) s)"
