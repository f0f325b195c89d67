#!/usr/bin/env bash
# Create (or reuse) the project virtualenv with the pinned CPU toolchain and install mixkernels
# editable with its compiled extensions. Idempotent; sourced by run_tests.sh and run_bench.sh.
#   MIXKERNELS_VENV  virtualenv path (default: <repo>/.venv)
#   MAX_JOBS         parallel compile jobs (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXKERNELS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: nothing later may replace it with a CUDA build.
echo "torch==2.13.0" > "$VENV/constraints.txt"
python -m pip install -q -c "$VENV/constraints.txt" -r "$ROOT/scripts/requirements-dev.txt"
# --no-build-isolation: build against the torch above, not one fetched into an isolated env.
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
# MIXKERNELS_JIT=0: check the install-time build itself (a first-use build would hide its failure).
MIXKERNELS_JIT=0 python -c "import torch, mixkernels._ext as e; assert e.cpu_error is None, e.cpu_error; print('mixkernels built against torch', torch.__version__)"
