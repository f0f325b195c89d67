#!/usr/bin/env bash
# CI: the ways a user installs mixkernels, each in a fresh venv that has only torch (+ numpy),
# each followed by scripts/smoke_ops.py (every public op on CPU tensors, on the compiled CPU
# kernels, which info must name as the automatic choice), each timed:
#   A. pip install <clone>                          default build isolation: no torch in the build env,
#                                                   so the kernels compile on first use (the smoke test's
#                                                   first call) into a fresh cache; a second process loads
#                                                   them from the cache without compiling
#   B. pip install --no-build-isolation <clone>     the same venv: setup.py compiles _C at install time
#   C. python -m build --no-isolation --wheel       the wheel, installed into a second fresh venv
# B and C compile in the same in-tree build folder of the clone, so C's compile is an incremental
# (no-op) ninja run: C proves the wheel's packaging and a fresh install, B the install-time build.
# The clone is the checkout's tracked + untracked-but-not-ignored files (no in-place .so, no build/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CLONE="$TMP/clone"
PYBASE=${PYTHON:-python3}
TORCH=${MIXKERNELS_CI_TORCH:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS=${MAX_JOBS:-2}
t0=$(date +%s)
ts=$t0
lap() { local now; now=$(date +%s); echo "== install paths: $1: $(( now - ts )) s"; ts=$now; }
quiet_pip() { "$@" 2>&1 | grep -v -E "^WARNING: Location|^\s*$" || true; }
smoke() { (cd "$TMP" && "$1/bin/python" "$ROOT/scripts/smoke_ops.py" "$2"); }
fresh_venv() {
  deactivate 2>/dev/null || true
  "$PYBASE" -m venv "$1"
  quiet_pip "$1/bin/python" -m pip install -q "$TORCH" numpy
}

mkdir -p "$CLONE"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$CLONE" -xf -
fresh_venv "$TMP/venv"
V="$TMP/venv/bin"
lap "fresh venv with $TORCH + numpy"

# A: default build isolation
quiet_pip "$V/pip" install -q "$CLONE"
"$V/python" -c "import mixkernels._buildcfg as c; assert c.source_root(), 'sources not installed'"
lap "A: pip install <clone> (build isolation)"
export MIXKERNELS_CACHE_DIR="$TMP/cache"
smoke "$TMP/venv" "first use"
lap "A: first use (compiles the CPU kernels) + smoke"
smoke "$TMP/venv" cache
(cd "$TMP" && "$V/python" -m mixkernels.info | sed -n '/^build:/,/^$/p')
lap "A: second process (loads the cache) + smoke"
unset MIXKERNELS_CACHE_DIR

# B: build at install time, against the venv's torch
quiet_pip "$V/pip" install -q setuptools wheel
quiet_pip "$V/pip" install -q --no-build-isolation --force-reinstall --no-deps "$CLONE"
lap "B: pip install --no-build-isolation <clone>"
MIXKERNELS_JIT=0 smoke "$TMP/venv" install
lap "B: smoke"

# C: a wheel, installed into a second fresh venv
quiet_pip "$V/pip" install -q build
(cd "$CLONE" && MIXKERNELS_REQUIRE_BUILD=1 "$V/python" -m build --no-isolation --wheel --outdir "$TMP/dist" > "$TMP/wheel.log" 2>&1) \
  || { tail -n 40 "$TMP/wheel.log"; exit 1; }
WHEEL=$(ls "$TMP"/dist/mixkernels-*.whl)
"$V/python" - "$WHEEL" <<'PY'
import os, re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
so = [n for n in names if re.match(r"mixkernels/_C[.].*so$", n)]
src = [n for n in names if n.startswith("mixkernels/_csrc/")]
print(f"wheel {os.path.basename(sys.argv[1])} ({os.path.getsize(sys.argv[1]) >> 10} KiB): {so}, {len(src)} source files")
assert so and "mixkernels/_csrc/flags.txt" in src, "the wheel lacks the compiled _C or the sources"
PY
lap "C: python -m build --no-isolation --wheel"
fresh_venv "$TMP/venv2"
quiet_pip "$TMP/venv2/bin/pip" install -q "$WHEEL"
MIXKERNELS_JIT=0 smoke "$TMP/venv2" install
lap "C: fresh venv + wheel + smoke"
echo "== install paths passed in $(( $(date +%s) - t0 )) s"
