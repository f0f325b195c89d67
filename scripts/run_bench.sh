#!/usr/bin/env bash
# The README's main job: set up the environment and run the benchmark suite on whatever device
# is present (CUDA when available, else the CPU mode). Extra arguments go to the CLI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m mixkernels.bench --out "${MIXKERNELS_BENCH_OUT:-$ROOT/bench_out}" "$@"
