// Device templates shared by the token-op kernels (csrc/cuda/{mixing,windows,uniform}.cu):
// a row gather with the widest aligned vector access, and a deterministic column sum.
// Torch-free; included only by .cu files. Templates, so every translation unit may instantiate.
#pragma once
#include <cstdint>

#include "mixkernels/cuda_common.h"

namespace mixkernels::cuda::tokens {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(65535) * 16;  // grid-stride beyond this

// Row-source codes of the gather maps: >= 0 is a row of `in`.
constexpr int64_t kZeroRow = -1;  // write zeros
constexpr int64_t kFillRow = -2;  // copy the single `fill` row (e.g. the mask token)

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest access (16, 8, 4 or 2 bytes, at least the element size) dividing the row and every pointer.
inline int vector_bytes(int64_t row_bytes, int elem, const void* a, const void* b = nullptr,
                        const void* c = nullptr) {
  for (int w = 16; w > elem; w /= 2)
    if (row_bytes % w == 0 && aligned(a, w) && aligned(b, w) && aligned(c, w)) return w;
  return elem;
}

// Block shape for rows of `vpr` vectors: x over a row's vectors, y over rows.
inline dim3 row_block(int64_t vpr) {
  int tx = 1;
  while (tx < vpr && tx < 128) tx *= 2;
  return dim3(tx, kThreads / tx);
}

inline dim3 row_grid(int64_t rows, dim3 block) {
  int64_t g = ceil_div(rows, block.y);
  return dim3(static_cast<unsigned>(g < 1 ? 1 : (g > kMaxBlocks ? kMaxBlocks : g)));
}

// out[r] = in[map(r)] (or zeros / the fill row) for rows of `vpr` vectors of type V.
template <typename V, typename Map>
__global__ void gather_rows_kernel(const V* __restrict__ in, const V* __restrict__ fill, V* __restrict__ out,
                                   int64_t rows, int64_t vpr, Map map) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int64_t s = map(r);
    V* o = out + r * vpr;
    if (s >= 0) {
      const V* src = in + s * vpr;
      for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) o[v] = src[v];
    } else if (s == kFillRow) {
      for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) o[v] = fill[v];
    } else {
      const V zero{};
      for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) o[v] = zero;
    }
  }
}

template <typename V, typename Map>
cudaError_t launch_gather_v(const void* in, const void* fill, void* out, int64_t rows, int64_t row_bytes, Map map,
                            cudaStream_t stream) {
  const int64_t vpr = row_bytes / int64_t(sizeof(V));
  const dim3 block = row_block(vpr);
  gather_rows_kernel<V, Map><<<row_grid(rows, block), block, 0, stream>>>(
      static_cast<const V*>(in), static_cast<const V*>(fill), static_cast<V*>(out), rows, vpr, map);
  return launch_status();
}

// Byte-level row gather: dtype-agnostic (zero bits are +0 in every float format).
template <typename Map>
cudaError_t launch_gather(const void* in, const void* fill, void* out, int64_t rows, int64_t row_bytes, int elem,
                          Map map, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  switch (vector_bytes(row_bytes, elem, in, fill, out)) {
    case 16: return launch_gather_v<uint4>(in, fill, out, rows, row_bytes, map, stream);
    case 8: return launch_gather_v<uint2>(in, fill, out, rows, row_bytes, map, stream);
    case 4: return launch_gather_v<uint32_t>(in, fill, out, rows, row_bytes, map, stream);
    default: return launch_gather_v<uint16_t>(in, fill, out, rows, row_bytes, map, stream);
  }
}

// ---- Deterministic column sums: out[n] = sum over rows r with pred(r) of in[r*N + n].
// A block (32 columns x 8 row lanes) sums one fixed segment of rows; lanes are combined in a
// fixed order, segments are reduced again level by level. No atomics: the result does not depend
// on the grid or the device.
constexpr int kColX = 32, kColY = 8;
constexpr int64_t kSegRows = 256;

struct AllRows {
  __device__ bool operator()(int64_t) const { return true; }
};

template <typename T, typename Pred>
__global__ void column_partial_kernel(const T* __restrict__ in, int64_t R, int64_t N, int64_t seg, Pred pred,
                                      float* __restrict__ out) {
  __shared__ float lanes[kColY][kColX + 1];
  const int64_t c = int64_t(blockIdx.x) * kColX + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * seg;
  const int64_t r1 = r0 + seg < R ? r0 + seg : R;
  float acc = 0.f;
  if (c < N) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColY)
      if (pred(r)) acc += to_float(in[r * N + c]);
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float total = 0.f;
    for (int y = 0; y < kColY; ++y) total += lanes[y][threadIdx.x];
    out[int64_t(blockIdx.y) * N + c] = total;
  }
}

inline int64_t column_segment(int64_t R) {
  const int64_t min_seg = ceil_div(R, 65535);  // grid.y limit
  return min_seg > kSegRows ? min_seg : kSegRows;
}

// Floats of workspace column_sum needs for R rows of N columns.
inline int64_t column_sum_workspace(int64_t R, int64_t N) {
  if (R <= kSegRows) return 0;
  const int64_t S = ceil_div(R, column_segment(R));
  return S * N + column_sum_workspace(S, N);
}

template <typename T, typename Pred>
cudaError_t column_sum(const T* in, int64_t R, int64_t N, Pred pred, float* out, float* workspace,
                       cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const dim3 block(kColX, kColY);
  if (R <= kSegRows) {
    column_partial_kernel<T, Pred><<<dim3(ceil_div(N, kColX), 1), block, 0, stream>>>(in, R, N, kSegRows, pred, out);
    return launch_status();
  }
  const int64_t seg = column_segment(R), S = ceil_div(R, seg);
  column_partial_kernel<T, Pred><<<dim3(ceil_div(N, kColX), S), block, 0, stream>>>(in, R, N, seg, pred, workspace);
  cudaError_t err = launch_status();
  if (err != cudaSuccess) return err;
  return column_sum<float, AllRows>(workspace, S, N, AllRows{}, out, workspace + S * N, stream);
}

}  // namespace mixkernels::cuda::tokens
