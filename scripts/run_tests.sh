#!/usr/bin/env bash
# The README's test command: set up the environment, build, and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k window_attention`). Tests run in
# MIXKERNELS_TEST_JOBS pytest-xdist workers (default 2: CI's two cores; 0 runs them in this process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
export MIXKERNELS_REQUIRE_EXT=1
python -m pytest tests -q -ra -n "${MIXKERNELS_TEST_JOBS:-2}" "$@"
