// Device templates shared by the token-op kernels (mixing.cu, windows.cu, uniform.cu):
// a row gather with the widest aligned vector access, and the ticket of the single-launch
// deterministic reductions.
// Torch-free; included only by .cu files. Templates, so every translation unit may instantiate.
#pragma once
#include <cstdint>

#include "mixkernels/cuda_common.h"
#include "device_prims.cuh"

namespace mixkernels::cuda::tokens {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(65535) * 16;  // grid-stride beyond this

// Row-source codes of the row maps: >= 0 is a row of the input.
constexpr int kZeroRow = -1;  // write zeros
constexpr int kFillRow = -2;  // copy the single `fill` row (e.g. the mask token)

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest access (16, 8, 4 or 2 bytes, at least the element size) dividing the row and every pointer.
inline int vector_bytes(int64_t row_bytes, int elem, const void* a, const void* b = nullptr,
                        const void* c = nullptr, const void* d = nullptr) {
  for (int w = 16; w > elem; w /= 2)
    if (row_bytes % w == 0 && aligned(a, w) && aligned(b, w) && aligned(c, w) && aligned(d, w)) return w;
  return elem;
}

// n / d and n % d for 0 <= n < 2^31 and a divisor fixed at launch: multiply-high and shift instead
// of a division (Granlund-Montgomery with a 33-bit magic: q = (umulhi(n, mul) + n) >> shift).
struct FastDiv {
  unsigned d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(unsigned div) : d(div) {
    while (shift < 32 && (1ull << shift) < div) ++shift;
    mul = static_cast<unsigned>(((1ull << 32) * ((1ull << shift) - div)) / div + 1);
  }
  __host__ __device__ __forceinline__ unsigned div(unsigned n) const {
#if defined(__CUDA_ARCH__)
    const unsigned hi = __umulhi(n, mul);
#else
    const unsigned hi = static_cast<unsigned>((uint64_t(n) * mul) >> 32);
#endif
    return (hi + n) >> shift;
  }
  __host__ __device__ __forceinline__ unsigned mod(unsigned n, unsigned q) const { return n - q * d; }
};

// One row's sources: out = (a >= 0 ? A[a] : a == kFillRow ? fill : 0) + (b >= 0 ? Bsrc[b] : 0);
// with a single source the row is copied exactly.
struct RowSrc {
  int a, b;
};

// Vectors per warp step per lane: the rows a step covers must fit in 32 lanes (one map each).
inline int gather_unroll(int64_t vpr) { return vpr >= 5 ? 4 : vpr >= 3 ? 2 : 1; }

// out[r] = sources of map(r), rows of `vpr` vectors V (the add in element type T when ADD).
// Every warp walks steps of 32*U vectors of the flattened (row, vector) space: lane i computes the
// map of the step's i-th row once, the lanes then fetch their U vectors (independent loads first,
// stores after) with the map shuffled from its lane. Row / column of a vector come from 32-bit
// fast division of its offset within the step; the step's first row advances by a host-computed
// quotient and remainder (no division in the loop). Grid: a few CTAs per SM, grid-stride.
struct Walk {
  int rows, vpr;
  FastDiv vdiv;     // by vpr
  int dq, dr;       // (all warps * 32 * U) = dq * vpr + dr
};

template <typename V, typename T, int U, bool ADD, typename Map>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(const V* __restrict__ A, const V* __restrict__ fill,
                                                             const V* __restrict__ Bsrc, V* __restrict__ out,
                                                             const Walk w, Map map) {
  constexpr int E = sizeof(V) / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t step0 = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int64_t first = step0 * 32 * U;
  int r0 = static_cast<int>(first / w.vpr);  // the step's first row and the offset in it
  int rem = static_cast<int>(first - int64_t(r0) * w.vpr);
  while (r0 < w.rows) {
    const int rm = r0 + lane;
    const RowSrc mine = rm < w.rows ? map(rm) : RowSrc{kZeroRow, -1};
    // Sources first (null: nothing to read), then every load, then every store: the U (2U with
    // ADD) loads of a step are independent and issue back to back, predicated, not branched (one
    // basic block: 2-4 KB in flight per warp; the old branchy loads kept 512 B).
    const V* pa[U];
    const V* pb[U];
    int64_t dst[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const unsigned local = unsigned(rem + k * 32 + lane);
      const unsigned rr = w.vdiv.div(local);  // < 32 rows into the step (gather_unroll)
      const int v = static_cast<int>(w.vdiv.mod(local, rr)), r = r0 + static_cast<int>(rr);
      const int a = __shfl_sync(0xffffffffu, mine.a, static_cast<int>(rr));
      const int b = ADD ? __shfl_sync(0xffffffffu, mine.b, static_cast<int>(rr)) : -1;
      const bool live = r < w.rows;
      dst[k] = live ? int64_t(r) * w.vpr + v : -1;
      pa[k] = !live ? nullptr : a >= 0 ? A + (int64_t(a) * w.vpr + v) : a == kFillRow ? fill + v : nullptr;
      pb[k] = ADD && live && b >= 0 ? Bsrc + (int64_t(b) * w.vpr + v) : nullptr;
    }
    V va[U], vb[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      va[k] = pa[k] != nullptr ? *pa[k] : V{};
      vb[k] = ADD && pb[k] != nullptr ? *pb[k] : V{};
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (dst[k] < 0) continue;
      if constexpr (ADD) {
        if (pa[k] != nullptr && pb[k] != nullptr) {
          const Pack<T, E> x = *reinterpret_cast<const Pack<T, E>*>(&va[k]);
          const Pack<T, E> y = *reinterpret_cast<const Pack<T, E>*>(&vb[k]);
          Pack<T, E> o;
#pragma unroll
          for (int i = 0; i < E; ++i) o.v[i] = from_float<T>(to_float(x.v[i]) + to_float(y.v[i]));
          out[dst[k]] = *reinterpret_cast<const V*>(&o);
        } else {
          out[dst[k]] = pb[k] != nullptr ? vb[k] : va[k];  // one source: an exact copy
        }
      } else {
        out[dst[k]] = va[k];
      }
    }
    r0 += w.dq;
    rem += w.dr;
    if (rem >= w.vpr) {
      rem -= w.vpr;
      ++r0;
    }
  }
}

// CTAs for `total` vectors in steps of 32*U per warp: enough to fill every SM (8 CTAs of 256
// threads each), never more than the work.
inline unsigned gather_grid(int64_t total, int U) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t steps = ceil_div(total, int64_t(32) * U), need = ceil_div(steps, kThreads / 32);
  const int64_t cap = int64_t(sms > 0 ? sms : 132) * 8;
  return static_cast<unsigned>(need < 1 ? 1 : need < cap ? need : cap);
}

template <typename V, typename T, bool ADD, typename Map>
cudaError_t launch_gather_v(const void* a, const void* fill, const void* b, void* out, int64_t rows, int64_t row_bytes,
                            Map map, cudaStream_t stream) {
  const int64_t vpr = row_bytes / int64_t(sizeof(V));
  const int U = gather_unroll(vpr);
  const dim3 grid(gather_grid(rows * vpr, U)), block(kThreads);
  const auto* A = static_cast<const V*>(a);
  const auto* F = static_cast<const V*>(fill);
  const auto* Bs = static_cast<const V*>(b);
  auto* O = static_cast<V*>(out);
  const int64_t adv = int64_t(grid.x) * (kThreads / 32) * 32 * U;  // vectors all warps cover per step
  const Walk w{static_cast<int>(rows), static_cast<int>(vpr), FastDiv(static_cast<unsigned>(vpr)),
               static_cast<int>(adv / vpr), static_cast<int>(adv % vpr)};
  if (U == 4) {
    auto k = gather_rows_kernel<V, T, 4, ADD, Map>;
    return MK_LAUNCH(k, grid, block, 0, stream, A, F, Bs, O, w, map);
  }
  if (U == 2) {
    auto k = gather_rows_kernel<V, T, 2, ADD, Map>;
    return MK_LAUNCH(k, grid, block, 0, stream, A, F, Bs, O, w, map);
  }
  auto k = gather_rows_kernel<V, T, 1, ADD, Map>;
  return MK_LAUNCH(k, grid, block, 0, stream, A, F, Bs, O, w, map);
}

// out[r] = A[map(r).a] (or the fill row, or zeros) [+ Bsrc[map(r).b]] for `rows` rows of
// `row_bytes`. Pure gathers (ADD false) are byte copies (zero bits are +0 in every float format);
// with ADD the rows are summed in `dtype` (float32 arithmetic, rounded once).
template <bool ADD, typename Map>
cudaError_t launch_rows(const void* a, const void* fill, const void* b, void* out, int64_t rows, int64_t row_bytes,
                        DType dtype, Map map, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  if (rows >= (int64_t(1) << 31)) return cudaErrorInvalidValue;  // 32-bit row maps
  const int es = element_size(dtype);
  const int w = vector_bytes(row_bytes, ADD ? es : 2, a, fill, b, out);
  if constexpr (!ADD) {  // byte copies: one instantiation per access width, whatever the dtype
    switch (w) {
      case 16: return launch_gather_v<uint4, uint16_t, false>(a, fill, b, out, rows, row_bytes, map, stream);
      case 8: return launch_gather_v<uint2, uint16_t, false>(a, fill, b, out, rows, row_bytes, map, stream);
      case 4: return launch_gather_v<uint32_t, uint16_t, false>(a, fill, b, out, rows, row_bytes, map, stream);
      default: return launch_gather_v<uint16_t, uint16_t, false>(a, fill, b, out, rows, row_bytes, map, stream);
    }
  } else {
    return MK_DISPATCH_DTYPE(dtype, [&]() -> cudaError_t {
      using T = scalar_t;
      if (w == 16) return launch_gather_v<uint4, T, true>(a, fill, b, out, rows, row_bytes, map, stream);
      if (w == 8) return launch_gather_v<uint2, T, true>(a, fill, b, out, rows, row_bytes, map, stream);
      if (w == 4 && sizeof(T) <= 4) return launch_gather_v<uint32_t, T, true>(a, fill, b, out, rows, row_bytes, map, stream);
      return launch_gather_v<T, T, true>(a, fill, b, out, rows, row_bytes, map, stream);
    });
  }
}

// ---- Single-launch reductions: prim::last_of_group (device_prims.cuh).
using prim::last_of_group;

}  // namespace mixkernels::cuda::tokens
