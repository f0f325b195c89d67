#!/usr/bin/env bash
# CI's CUDA compile check: the standalone CMake build of every CUDA kernel (sm_80 + sm_90, warnings
# are errors) and of the CPU kernels and CUDA bindings against the torch headers of the active venv.
# Flags come from csrc/flags.txt, as for setup.py. MK_CMAKE_ARCHS picks the archs (default "80;90"; CI
# passes 80: its sm_90 compile check is scripts/static_gate.sh's build, with the same flags).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=$(command -v python || command -v python3)
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${MK_CMAKE_ARCHS:-80;90}" \
  -DPython3_EXECUTABLE="$PY"
cmake --build build/cmake -j"${MAX_JOBS:-2}"
