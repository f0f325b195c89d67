// CUDA kernels: Swin roll + window partition and window merge + reverse roll, one pass each.
// Both are row gathers (each output row computes its source row), copied with the widest
// aligned vector access; see tokens_cuda_kernels.cuh.
#include "mixkernels/tokens_cuda.h"
#include "mixkernels/tokens_cuda_kernels.cuh"

namespace mixkernels::cuda {
namespace {

// Windows row r = (window, n) reads token ((wi*wh + n/ww + sh) % H, (wj*ww + n%ww + sw) % W).
struct PartitionMap {
  int64_t H, W, wh, ww, sh, sw;
  __device__ int64_t operator()(int64_t r) const {
    const int64_t N = wh * ww, nWw = W / ww, nW = (H / wh) * nWw;
    const int64_t win = r / N, n = r % N, b = win / nW, w = win % nW;
    const int64_t y = ((w / nWw) * wh + n / ww + sh) % H;
    const int64_t x = ((w % nWw) * ww + n % ww + sw) % W;
    return (b * H + y) * W + x;
  }
};

// Token (b,y,x) sits at (y-sh, x-sw) mod (H,W) on the rolled grid.
struct MergeMap {
  int64_t H, W, wh, ww, sh, sw;
  __device__ int64_t operator()(int64_t t) const {
    const int64_t nWw = W / ww, nW = (H / wh) * nWw;
    const int64_t b = t / (H * W), y = (t / W) % H, x = t % W;
    const int64_t yr = (y - sh + H) % H, xr = (x - sw + W) % W;
    const int64_t win = b * nW + (yr / wh) * nWw + xr / ww;
    return win * (wh * ww) + (yr % wh) * ww + xr % ww;
  }
};

}  // namespace

cudaError_t window_partition(const void* x, void* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t wh,
                             int64_t ww, int64_t sh, int64_t sw, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_gather(x, nullptr, out, B * H * W, C * es, es, PartitionMap{H, W, wh, ww, sh, sw}, stream);
}

cudaError_t window_merge(const void* windows, void* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t wh,
                         int64_t ww, int64_t sh, int64_t sw, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_gather(windows, nullptr, out, B * H * W, C * es, es, MergeMap{H, W, wh, ww, sh, sw}, stream);
}

}  // namespace mixkernels::cuda
