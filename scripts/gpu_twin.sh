#!/usr/bin/env bash
# The GPU machine's software stack, checked on a CPU machine (CI runs this on every change):
#   1. a venv with scripts/gpu_stack.txt (torch 2.11.0+cu130, triton 3.6.0, numpy 2.5, ...),
#      Python 3.12 when there is one (the GPU machine's), else python3
#   2. builds _C and _C_cuda with setup.py against that torch (the real CUDA toolkit is found
#      even when `nvcc` on PATH is a wrapper), in a staged copy of the tree
#   3. checks that every kernel-level op (mixkernels_C::*) has a CPU and a CUDA kernel registered
#      and that `python -m mixkernels.info` names the toolkit
#   4. AOT-compiles every Triton kernel with that Triton (tests/test_triton_aot.py), and runs the
#      static report on the Triton window attention with it (every loop counted)
#   5. runs the Triton-interpreter tests with that Triton and numpy (token ops, losses, headline
#      cases, window attention: a failure fails the run; TWIN_STRICT_ATTENTION=0 only reports it)
# Each step prints its time. Knobs: MIXKERNELS_TWIN_VENV (default build/gpu-twin/venv, reused
# when present), TWIN_ARCHS (default 90; CI compile-checks sm_80 with CMake), MAX_JOBS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TWIN="$ROOT/build/gpu-twin"
VENV=${MIXKERNELS_TWIN_VENV:-$TWIN/venv}
STAGE="$TWIN/src"
t0=$(date +%s)
ts=$t0
lap() { local now; now=$(date +%s); echo "== twin: $1: $(( now - ts )) s (total $(( now - t0 )) s)"; ts=$now; }

if [ ! -x "$VENV/bin/python" ]; then
  PYBASE=""
  for c in python3.12 "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3.12 python3; do
    if [ -n "$c" ] && "$c" -c "import venv" >/dev/null 2>&1; then PYBASE=$c; break; fi
  done
  echo "== twin: creating $VENV with $PYBASE ($("$PYBASE" --version 2>&1))"
  "$PYBASE" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip warns about every local index folder that lacks a package: keep the log readable.
"$PY" -m pip install -q -r scripts/gpu_stack.txt 2>&1 | grep -v "^WARNING: Location" || true
"$PY" - <<'PY'
import torch, triton, numpy
print(f"twin stack: python {__import__('platform').python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
assert torch.version.cuda, "the twin needs the CUDA build of torch (scripts/gpu_stack.txt)"
PY
lap "venv + scripts/gpu_stack.txt"

# A staged copy, so the .so files built for this torch never land in the checkout (whose
# in-place extension belongs to the development venv).
mkdir -p "$STAGE"
tar -C "$ROOT" --exclude=./build --exclude=./.venv --exclude=./.git --exclude='*.so' --exclude=__pycache__ \
  --exclude=./bench_out -cf - . | tar -C "$STAGE" -xf -
cd "$STAGE"
MIXKERNELS_CUDA_ARCHS=${TWIN_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-2} MIXKERNELS_REQUIRE_BUILD=1 \
  "$PY" setup.py build_ext --inplace > "$TWIN/build.log" 2>&1 || { tail -n 60 "$TWIN/build.log"; exit 1; }
grep -i -E "warning ?:" "$TWIN/build.log" | head -n 20 || true  # compiler warnings, spills (-Xptxas=-warn-spills)
lap "build _C + _C_cuda (sm_${TWIN_ARCHS:-90})"

"$PY" - <<'PY'
import torch
from mixkernels import _ext

assert _ext.cpu_error is None, _ext.cpu_error
assert _ext.cuda_error is None, _ext.cuda_error
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mixkernels_C::"))
# Device-independent ops (e.g. mixkernels_C::limits, a plain C++ function) have one composite kernel.
kernels = [o for o in ops if not has(o, "CompositeImplicitAutograd")]
missing = {k: [o for o in kernels if not has(o, k)] for k in ("CPU", "CUDA")}
print(f"twin: {len(kernels)} kernel-level ops (+{len(ops) - len(kernels)} device-independent); without a CPU kernel: {missing['CPU'] or 'none'}; "
      f"without a CUDA kernel: {missing['CUDA'] or 'none'}")
assert len(kernels) >= 15 and not missing["CPU"] and not missing["CUDA"], missing
PY
"$PY" -m mixkernels.info > "$TWIN/info.txt"
sed -n '/^build:/,/^$/p' "$TWIN/info.txt"
grep -q "CUDA toolkit: /" "$TWIN/info.txt" || { echo "info does not name the CUDA toolkit"; exit 1; }
lap "kernel registrations + info"

"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_aot.py
lap "Triton AOT compile (tests/test_triton_aot.py)"

# The static report under this Triton (its line info has no inlining call sites: Rule.inside tells
# the inlined loop copies apart): every loop of the Triton window attention counted, estimates printed
"$PY" -m mixkernels.bench --static --backend triton --dtype bf16 --shapes mixmim-b-s1,mixmim-b-s4 \
  --ops window_attention_fwd,window_attention_bwd --out "$TWIN/static" --cache "$TWIN/static-cache" > "$TWIN/static.log" 2>&1 \
  || { tail -n 30 "$TWIN/static.log"; exit 1; }
"$PY" - "$TWIN/static/static.json" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))["records"]
for r in recs:
    head = f"twin static: {r['kernel']} {r['shape']} {r['dtype']}:"
    if r.get("error"):
        print(head, "FAILED", r["error"][-600:])
    else:
        print(head, f"{r['est_us']:.1f} us, {100 * r['est_fraction_of_floor']:.1f}% of the floor, "
              f"{r['instructions_per_element']:.1f} instr/elem")
bad = [(r["kernel"], r["shape"], r["unmatched_loops"]) for r in recs if r["unmatched_loops"] or r.get("error")]
assert len(recs) == 4 and not bad, bad
PY
lap "static report, Triton window attention (every loop matched)"

"$PY" -m pytest -q -p no:cacheprovider -n 2 tests/test_token_ops.py tests/test_losses.py tests/test_gpu_headline.py \
  -k "triton and not window_attention"
lap "Triton interpreter tests (token ops, losses, headline) with this Triton + numpy"
set +e
"$PY" -m pytest -q -p no:cacheprovider -n 2 tests/test_window_attention.py tests/test_gpu_headline.py \
  -k "triton and window_attention" > "$TWIN/attention_interp.log" 2>&1
arc=$?
set -e
tail -n 3 "$TWIN/attention_interp.log"
lap "Triton interpreter tests (window attention)"
if [ $arc -ne 0 ]; then
  echo "twin: window attention under Triton $("$PY" -c 'import triton; print(triton.__version__)')'s interpreter: failures" \
       "(see $TWIN/attention_interp.log)"
  [ "${TWIN_STRICT_ATTENTION:-1}" = 1 ] && exit 1
fi
echo "== twin: passed in $(( $(date +%s) - t0 )) s"
