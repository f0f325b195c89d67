// Kernel limits: the one C++ definition of each. Their Python twin is mixkernels/ops/limits.py
// (the dispatch predicates read it); mixkernels_C::limits(name) exposes these values and
// tests/test_registry.py checks that the two agree. CUDA bindings and kernels take their
// limits from here too.
#pragma once
#include <cstdint>

namespace mixkernels::limits {

// Head dims of the CUDA (and Triton) window attention kernels.
inline constexpr int64_t kHeadDims[] = {16, 32, 64, 128};
// Tokens per window (wh*ww) of the CUDA (and Triton) window attention kernels.
inline constexpr int64_t kMaxWindowTokens = 256;
// Largest patch_size of the CUDA reconstruction-loss kernels.
inline constexpr int64_t kCudaMaxLossPatch = 32;

constexpr bool supported_head_dim(int64_t d) {
  for (int64_t h : kHeadDims) {
    if (h == d) return true;
  }
  return false;
}

}  // namespace mixkernels::limits
