// Helpers shared by the CPU kernels: row-copy loops and float accumulation types.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace mixkernels::cpu {

// Rows of one image/window are copied whole; this grain keeps a task around 64 KiB.
inline int64_t row_grain(int64_t row_bytes) {
  int64_t g = (64 * 1024) / (row_bytes > 0 ? row_bytes : 1);
  return g < 1 ? 1 : g;
}

// out[r] = in[src(r)] for every row r (src < 0 writes zeros). Rows are `row_bytes` long.
template <typename SrcFn>
void gather_rows(char* out, const char* in, int64_t rows, int64_t row_bytes, SrcFn src) {
  if (row_bytes == 0) return;  // empty rows: the pointers of empty tensors may be null (memcpy(null) is UB)
  at::parallel_for(0, rows, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t s = src(r);
      if (s >= 0) {
        std::memcpy(out + r * row_bytes, in + s * row_bytes, row_bytes);
      } else {
        std::memset(out + r * row_bytes, 0, row_bytes);
      }
    }
  });
}

// a * b for sizes that come from callers of the kernel-level ops: a clear error instead of a
// signed overflow (undefined behaviour, and a wrong allocation size).
inline int64_t checked_mul(int64_t a, int64_t b, const char* op) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), op, ": size overflow (", a, " x ", b, ")");
  return r;
}

template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

}  // namespace mixkernels::cpu
