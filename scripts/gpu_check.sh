#!/usr/bin/env bash
# GPU evidence in ONE call on a lent GPU machine (H200, 16 cores, no network; at most ~9.5 min),
# or the same flow on a CPU machine with GPU_CHECK_DRY=1 (tiny sizes, Triton interpreter, the
# compiled CPU kernels and reference peers), which CI runs so the script is proven before a GPU
# is at hand. From the repository root:
#
#   OUT=/some/dir bash scripts/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_DRY=1 OUT=$(mktemp -d) bash scripts/gpu_check.sh    # dry run (CI)
#   python -m mixkernels.bench.results import /some/dir           # back home: results + README table
#
# Steps in order of value, each with its own time limit (T_<STEP> seconds; the whole run stops
# starting work at T_TOTAL); nothing stops at the first failure; summary.json and report.md are
# rewritten after every step, so whatever a kill leaves is still a complete report.
#   versions         GPU, driver, python/torch/triton/numpy vs scripts/gpu_stack.txt, toolkit, commit
#   build            (background, from the start) _C + _C_cuda (MIXKERNELS_CUDA_ARCHS, default 90)
#   triton-tests     every op family at the headline shapes x bf16/fp16/fp32, Triton on the GPU (pytest -n)
#   bench-attention  MixMIM-B stages 1-4 + Swin window 7 shift: Triton vs SDPA-EFFICIENT and eager
#   bench-ops        token ops and losses: Triton vs eager
#   bench-model      MixMIM-B training step: fused vs official-style eager (img/s, peak memory)
#   bench-flex       compiled FlexAttention at the attention shapes (compiling takes most of it)
#   bench-compiled   MixMIM-B step under torch.compile
#   cuda-tests       once the build is done: headline CUDA cases + every CUDA test file
#   cuda-bench       CUDA backend at the headline shapes, eager and SDPA timed again beside it
#   cuda-sanitizer   kernel-level fuzzer on the CUDA kernels under compute-sanitizer memcheck
#   rest             the rest of the test suite with the time left
#   static           the static report's estimates beside the measured times (static.json)
# Files in $OUT (at most 8, none in subfolders): summary.json report.md log.txt build.log
# tests.jsonl bench.json plots.tar [static.json]. Exit status 0 when every step ran (failing tests
# are reported in summary.json, not by the exit status); 1 when the run itself broke.
# Knobs: PYTHON, CUDA_HOME, MIXKERNELS_CUDA_ARCHS, MAX_JOBS, GPU_CHECK_WORKERS (pytest -n),
# GPU_CHECK_COMMIT (recorded when .git is absent), GPU_CHECK_BUILD=fresh|reuse, T_TOTAL, T_<STEP>.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT/log.txt"
: > "$LOG"
: > "$OUT/tests.jsonl"
t0=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - t0 )); }

# ---- interpreter: the GPU machine has python3 only; take the first one that imports torch
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$c"); break; fi
  done
fi
if [ -z "$PY" ]; then
  say "no python3/python that imports torch on PATH"
  PY=$(command -v python3 || command -v python || echo python3)
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/scripts:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MIXKERNELS_RESULTS="$OUT/tests.jsonl"
export MIXKERNELS_JIT=0  # never compile an extension on first use here: the build step does it
# ---- the real CUDA toolkit (a wrapper nvcc on PATH would make torch guess a folder without headers)
CUDA_HOME=$("$PY" mixkernels/_buildcfg.py cuda-home 2>>"$LOG")
[ -n "$CUDA_HOME" ] && export CUDA_HOME

if [ "$DRY" = 1 ]; then
  T_TOTAL=${T_TOTAL:-420}; NW=${GPU_CHECK_WORKERS:-2}; BUILD_MODE=${GPU_CHECK_BUILD:-reuse}
  CUDA_K="cuda or (test_headline and cpu)"  # no GPU: the compiled CPU kernels stand in at the headline cases
  BENCH="--device cpu --quick --dtype fp32"; MK=mixkernels-cpu
  ATTN_CASES='^attention/'; CUDA_PROVIDERS=mixkernels-cpu,eager,sdpa
  REST=${GPU_CHECK_REST:-tests/test_dispatch.py}  # CI runs the whole suite in its own step
  : "${T_VERSIONS:=60}" "${T_BUILD:=600}" "${T_TRITON:=120}" "${T_BENCH_ATTENTION:=60}" "${T_BENCH_OPS:=60}"
  : "${T_BENCH_MODEL:=30}" "${T_BENCH_FLEX:=30}" "${T_BENCH_COMPILED:=30}" "${T_CUDA_WAIT:=300}" "${T_CUDA_TESTS:=60}"
  : "${T_CUDA_BENCH:=40}" "${T_STATIC:=60}" "${T_CUDA_SAN:=30}"
else
  T_TOTAL=${T_TOTAL:-550}; NW=${GPU_CHECK_WORKERS:-8}; BUILD_MODE=${GPU_CHECK_BUILD:-fresh}
  BENCH="--device cuda --dtype bf16"; MK=mixkernels-triton
  ATTN_CASES='^attention/(mixmim-s[1-4]|swin-s1-shift)/'; CUDA_PROVIDERS=mixkernels-cuda,eager,sdpa; CUDA_K=cuda
  REST=${GPU_CHECK_REST:-tests --ignore=tests/test_gpu_headline.py --ignore=tests/test_window_attention_cuda.py --ignore=tests/test_triton_aot.py}
  : "${T_VERSIONS:=40}" "${T_BUILD:=330}" "${T_TRITON:=110}" "${T_BENCH_ATTENTION:=60}" "${T_BENCH_OPS:=45}"
  : "${T_BENCH_MODEL:=45}" "${T_BENCH_FLEX:=60}" "${T_BENCH_COMPILED:=75}" "${T_CUDA_WAIT:=120}" "${T_CUDA_TESTS:=75}"
  : "${T_CUDA_BENCH:=35}" "${T_STATIC:=40}" "${T_CUDA_SAN:=100}"
  export MIXKERNELS_CUDA_ARCHS=${MIXKERNELS_CUDA_ARCHS:-90}
fi
RESERVE=12  # seconds kept for the final summary
XDIST=""
"$PY" -c "import xdist" >/dev/null 2>&1 && [ "$NW" -gt 1 ] && XDIST="-n $NW"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p pytest_results --tb=short -rfE)
[ -n "$XDIST" ] && PYTEST+=($XDIST)
if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT-dirty"
else
  COMMIT=${GPU_CHECK_COMMIT:-unknown}  # the GPU machine gets a copy of the tree without .git
fi
STATIC_JSON=""; STATIC_NOTE=""

meta() {
  "$PY" - "$WORK/meta.json" "$DRY" "$COMMIT" "$T_TOTAL" "$STATIC_JSON" "$STATIC_NOTE" <<'PY'
import datetime, json, os, sys
path, dry, commit, total, static, note = sys.argv[1:]
old = json.load(open(path)) if os.path.exists(path) else {}
started = old.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
json.dump({"dry": dry == "1", "commit": commit, "t_total": int(total), "started": started,
           "static_json": static or None, "static_note": note or None}, open(path, "w"))
PY
}
record() {  # record NAME STATUS RC SECONDS LIMIT NOTE
  "$PY" -c 'import json, sys
n, st, rc, sec, lim, note = sys.argv[1:]
num = lambda v: int(v) if v.lstrip("-").isdigit() else None
print(json.dumps({"name": n, "status": st, "rc": num(rc), "seconds": num(sec), "limit_s": num(lim), "note": note}))' \
    "$@" >> "$WORK/steps.jsonl"
}
summarize() { "$PY" mixkernels/bench/results.py summarize "$WORK" "$OUT" >> "$LOG" 2>&1 || say "   (summary failed: see log.txt)"; }
left() { echo $(( T_TOTAL - $(elapsed) )); }
limit() {  # limit WANT: WANT seconds, or what is left before the final reserve
  local l=$(( $(left) - RESERVE ))
  [ "$1" -lt "$l" ] && l=$1
  [ "$l" -gt 0 ] && echo "$l" || echo 0
}
# step NAME WANT CMD...: CMD under a time limit (SIGINT first: pytest and the benchmark CLI then
# write what they have; KILL 15 s later), output appended to log.txt; recorded and summarized.
step() {
  local name=$1 lim; lim=$(limit "$2"); shift 2
  if [ "$lim" -lt 5 ]; then
    say "== [$(elapsed) s] $name: skipped (no time left)"; record "$name" skipped "" 0 "$lim" "no time left"; summarize
    return 0
  fi
  say "== [$(elapsed) s] $name (limit ${lim} s): $*"
  echo "---- $name: $*" >> "$LOG"
  local s rc dt st=ok
  s=$(date +%s)
  MIXKERNELS_RESULTS_STEP=$name timeout -s INT -k 15 "$lim" "$@" >> "$LOG" 2>&1
  rc=$?; dt=$(( $(date +%s) - s ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=timeout; elif [ $rc -ne 0 ]; then st=failed; fi
  say "   $name: $st (rc=$rc, ${dt} s)"
  record "$name" "$st" "$rc" "$dt" "$lim" "${STEP_NOTE:-}"
  STEP_NOTE=""
  summarize
}
meta

# ------------------------------------------------------------------------------ 1. versions
say "== gpu_check: $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU)' || echo GPU) | python $PY | OUT $OUT | T_TOTAL ${T_TOTAL}s | commit $COMMIT"
step versions "$T_VERSIONS" "$PY" scripts/gpu_env.py "$WORK/env.json" "$COMMIT"

# ------------------------------------------------------------------------------ 2. build (background)
BUILD_DIR="$ROOT/build/gpu_check"
build() {
  if [ "$BUILD_MODE" = reuse ] && "$PY" -c "import mixkernels._C" >/dev/null 2>&1; then
    echo "GPU_CHECK_BUILD=reuse: mixkernels._C already builds and loads for this torch; not recompiling"
    return 0
  fi
  echo "CUDA_HOME=${CUDA_HOME:-} MIXKERNELS_CUDA_ARCHS=${MIXKERNELS_CUDA_ARCHS:-default} MAX_JOBS=${MAX_JOBS:-8}"
  MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/tmp" || return $?
  local f n
  for f in "$BUILD_DIR"/lib/mixkernels/_C*.so; do  # atomic: running tests may be importing mixkernels
    [ -f "$f" ] || continue
    n=$(basename "$f"); cp "$f" "mixkernels/.$n.tmp" && mv -f "mixkernels/.$n.tmp" "mixkernels/$n" && echo "installed mixkernels/$n"
  done
  "$PY" -c "import mixkernels._ext as e; print('_C:', e.cpu_error or 'loaded'); print('_C_cuda:', e.cuda_error or 'loaded')"
}
export -f build 2>/dev/null
say "== [$(elapsed) s] build started in the background (limit ${T_BUILD} s) -> build.log"
( s=$(date +%s)
  BUILD_DIR=$BUILD_DIR BUILD_MODE=$BUILD_MODE PY=$PY timeout -k 10 "$T_BUILD" bash -c build > "$OUT/build.log" 2>&1
  echo "$? $(( $(date +%s) - s ))" > "$WORK/build.rc" ) &
BUILD_PID=$!
trap 'kill $BUILD_PID 2>/dev/null; [ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------------------ 3. Triton correctness
step triton-tests "$T_TRITON" "${PYTEST[@]}" tests/test_gpu_headline.py -k "triton"

# ------------------------------------------------------------------------------ 4. headline benchmarks
bench() {  # bench NAME WANT ARGS...: python -m mixkernels.bench into $WORK/bench-NAME
  local name=$1 want=$2 lim; shift 2
  lim=$(limit "$want")
  step "bench-$name" "$want" "$PY" -m mixkernels.bench $BENCH --out "$WORK/bench-$name" \
    --time-budget $(( lim > 20 ? lim - 15 : lim / 2 )) "$@"
}
bench attention "$T_BENCH_ATTENTION" --suite attention --cases "$ATTN_CASES" --providers "$MK,eager,sdpa" --no-compile
bench ops "$T_BENCH_OPS" --suite ops --providers "$MK,eager" --no-compile
bench model "$T_BENCH_MODEL" --suite model --providers mixkernels,eager --no-compile
bench flex "$T_BENCH_FLEX" --suite attention --cases "$ATTN_CASES" --providers flex
bench compiled "$T_BENCH_COMPILED" --suite model --providers compiled

# ------------------------------------------------------------------------------ 5. CUDA, once built
wait_build() {
  local lim; lim=$(limit "$T_CUDA_WAIT")
  local end=$(( $(date +%s) + lim ))
  while [ ! -f "$WORK/build.rc" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 2; done
}
say "== [$(elapsed) s] waiting for the build"
wait_build
if [ -f "$WORK/build.rc" ]; then
  read -r BRC BSEC < "$WORK/build.rc"
  BST=$([ "$BRC" = 0 ] && echo ok || { [ "$BRC" = 124 ] && echo timeout || echo failed; })
  record build "$BST" "$BRC" "$BSEC" "$T_BUILD" "$(tail -n 2 "$OUT/build.log" | tr '\n' ' ' | cut -c1-300)"
else
  BRC=none; record build timeout "" "$(elapsed)" "$T_BUILD" "still running when the CUDA steps were due"
fi
say "   build: rc=$BRC"; tail -n 3 "$OUT/build.log" | tee -a "$LOG"
summarize
if [ "$BRC" = 0 ]; then
  step info 30 "$PY" -m mixkernels.info
  step cuda-tests "$T_CUDA_TESTS" "${PYTEST[@]}" tests/test_gpu_headline.py tests/test_window_attention_cuda.py \
    tests/test_window_attention.py tests/test_token_ops.py tests/test_losses.py -k "$CUDA_K"
  bench cuda "$T_CUDA_BENCH" --suite attention,ops --cases "$ATTN_CASES|^ops/" --providers "$CUDA_PROVIDERS" --no-compile
  # the kernel-level fuzzer on the CUDA kernels under compute-sanitizer memcheck (says SKIPPED without a GPU)
  step cuda-sanitizer "$T_CUDA_SAN" env FUZZ_BUDGET=$(( T_CUDA_SAN / 2 )) OUT="$WORK/fuzz_cuda" PYTHON="$PY" \
    bash scripts/fuzz_cuda_sanitizer.sh
else
  for s in info cuda-tests bench-cuda cuda-sanitizer; do record "$s" skipped "" 0 0 "the build failed (build.log)"; done
  summarize
fi

# ------------------------------------------------------------------------------ 6. the rest of the suite
STATIC_WANT=0
if [ -f benchmarks/results/static/static.json ]; then
  STATIC_JSON="$ROOT/benchmarks/results/static/static.json"; STATIC_NOTE="committed static report (benchmarks/results/static/static.json)"
elif "$PY" -m mixkernels.bench --help 2>/dev/null | grep -q -- "--static"; then
  STATIC_WANT=$T_STATIC
else
  STATIC_NOTE="python -m mixkernels.bench --static is not in this checkout: no estimates to set beside the measured times"
fi
# shellcheck disable=SC2086
step rest $(( $(left) - RESERVE - STATIC_WANT )) "${PYTEST[@]}" $REST

# ------------------------------------------------------------------------------ 7. static estimates
if [ "$STATIC_WANT" -gt 0 ]; then
  step static "$STATIC_WANT" "$PY" -m mixkernels.bench --static --out "$WORK/static"
  if [ -f "$WORK/static/static.json" ]; then
    cp "$WORK/static/static.json" "$OUT/static.json"; STATIC_JSON="$OUT/static.json"; STATIC_NOTE="computed in this run"
  else
    STATIC_NOTE="python -m mixkernels.bench --static did not finish (log.txt)"
  fi
fi
meta
record done ok 0 "$(elapsed)" "$T_TOTAL" ""
summarize
say "== [$(elapsed) s] done: $OUT"
ls -la "$OUT" | tee -a "$LOG"
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t = s["tests"]
print(f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('error', 0)} errors, {t.get('skipped', 0)} skipped")
for fam, bks in s["matrix"].items():
    print(f"  {fam:<17}" + "  ".join(f"{b}: " + "/".join(c[:4] for c in cells.values()) for b, cells in bks.items()))
print("CUDA ops passing every CUDA test:", ", ".join(s["cuda_verified"]) or "none")
for r in s["headline"][:40]:
    sp = " ".join(f"{p} {v:.2f}x" for p, v in r["speedup"].items())
    print(f"  {r['suite']:<9} {r['case']:<28} {r['dtype']} {r['mode']:<7} {r['provider']:<17} {r['ms']:.4g} ms  {sp}")
for f in s["failures"][:15]:
    print("FAILED", f["nodeid"], "|", f["message"].splitlines()[-1][:200] if f["message"] else "")
PY
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le 8 ] || say "WARNING: $n files in $OUT (at most 8 come back)"
[ -f "$OUT/summary.json" ] || exit 1
# GPU_CHECK_STRICT=1 (CI's dry run): a step that failed fails the run. A step cut by its time
# limit only warns (a loaded machine is slow); what it did not do shows in summary.json.
grep '"status": "timeout"' "$WORK/steps.jsonl" | sed 's/^/WARNING: step ran out of time: /' | tee -a "$LOG"
if [ "${GPU_CHECK_STRICT:-0}" = 1 ] && grep -q '"status": "failed"' "$WORK/steps.jsonl"; then
  say "GPU_CHECK_STRICT=1: a step failed:"; grep '"status": "failed"' "$WORK/steps.jsonl" | tee -a "$LOG"
  exit 1
fi
exit 0
