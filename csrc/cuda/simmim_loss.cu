// CUDA kernels: SimMIM's masked L1 loss on full-resolution predictions (forward and backward).
//
// A block owns one band of p image rows (b, ph) and QB = max(1, 128/p) patches along it: thread
// t walks columns t, t+128, ... of the band (one column when p <= 128), so every channel row
// is read as one coalesced run of QB*p values. Unmasked patches are never read (the mask
// selects; NaN/Inf there do not propagate). Forward: each thread sums |pred - imgs| over its
// columns, channels and rows; the patch sums are then taken by one thread per patch over its
// threads in order (deterministic, no atomics). Backward writes every element of the band.
#include "device_prims.cuh"
#include "mixkernels/cuda_common.h"
#include "mixkernels/simmim_loss_cuda.h"

namespace mixkernels::cuda {
namespace {

constexpr int kThreads = 128;

struct Band {
  int64_t B, C, H, W, nh, nw;
  int p, qb;  // patch size, patches per block
};

__host__ __device__ inline int patches_per_block(int p) { return p >= kThreads ? 1 : kThreads / p; }

template <typename TP, typename TI>
__global__ void __launch_bounds__(kThreads) simmim_fwd_kernel(const TP* __restrict__ pred, const TI* __restrict__ imgs,
                                                              const uint8_t* __restrict__ mask, int64_t mask_stride,
                                                              float* __restrict__ out, Band g) {
  __shared__ float colsum[kThreads];
  const int64_t band = blockIdx.x;  // b * nh + ph
  const int64_t b = band / g.nh, ph = band % g.nh;
  const int64_t pw0 = static_cast<int64_t>(blockIdx.y) * g.qb;
  const int cols = g.qb * g.p;
  const int t = threadIdx.x;
  const uint8_t* m = mask + b * mask_stride + ph * g.nw;
  float s = 0.f;
  for (int col = t; col < cols; col += kThreads) {
    const int64_t pw = pw0 + col / g.p;
    if (pw >= g.nw || !m[pw]) continue;
    const int64_t x = pw0 * g.p + col;
    // Walk the column by pointer, rows unrolled by 4 (SimMIM's loss patch is p = 4: one patch's rows
    // in flight). Left to itself ptxas unrolled deeper and spilled 20-48 B on sm_80 (CUDA 13.0).
    const int64_t plane = g.H * g.W;
    const TP* pp = pred + (b * g.C * g.H + ph * g.p) * g.W + x;
    const TI* ip = imgs + (b * g.C * g.H + ph * g.p) * g.W + x;
    for (int64_t c = 0; c < g.C; ++c, pp += plane, ip += plane) {
      const TP* pr = pp;
      const TI* ir = ip;
#pragma unroll 4
      for (int i = 0; i < g.p; ++i, pr += g.W, ir += g.W) s += fabsf(to_float(*pr) - to_float(*ir));
    }
  }
  colsum[t] = s;
  __syncthreads();
  if (t < g.qb && pw0 + t < g.nw) {
    const int lo = t * g.p, hi = lo + g.p < kThreads ? lo + g.p : kThreads;
    float tot = 0.f;
    for (int k = lo; k < hi; ++k) tot += colsum[k];
    out[band * g.nw + pw0 + t] = tot / static_cast<float>(g.C * g.p * g.p);
  }
}

template <typename TP, typename TI>
__global__ void __launch_bounds__(kThreads) simmim_bwd_kernel(const float* __restrict__ grad,
                                                              const TP* __restrict__ pred, const TI* __restrict__ imgs,
                                                              const uint8_t* __restrict__ mask, int64_t mask_stride,
                                                              TP* __restrict__ dpred, Band g) {
  const int64_t band = blockIdx.x;
  const int64_t b = band / g.nh, ph = band % g.nh;
  const int64_t pw0 = static_cast<int64_t>(blockIdx.y) * g.qb;
  const int cols = g.qb * g.p;
  const uint8_t* m = mask + b * mask_stride + ph * g.nw;
  const float inv = 1.f / static_cast<float>(g.C * g.p * g.p);
  for (int col = threadIdx.x; col < cols; col += kThreads) {
    const int64_t pw = pw0 + col / g.p;
    if (pw >= g.nw) break;
    const bool live = m[pw] != 0;
    const float k = live ? grad[band * g.nw + pw] * inv : 0.f;
    const int64_t x = pw0 * g.p + col;
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t base = ((b * g.C + c) * g.H + ph * g.p) * g.W + x;
      for (int i = 0; i < g.p; ++i) {
        float d = 0.f;
        if (live) {
          const float e = to_float(pred[base + i * g.W]) - to_float(imgs[base + i * g.W]);
          d = k * static_cast<float>((e > 0.f) - (e < 0.f));
        }
        dpred[base + i * g.W] = from_float<TP>(d);
      }
    }
  }
}

Band make_band(int64_t B, int64_t C, int64_t H, int64_t W, int p) {
  return Band{B, C, H, W, H / p, W / p, p, patches_per_block(p)};
}

dim3 grid_of(const Band& g) { return dim3(static_cast<unsigned>(g.B * g.nh), static_cast<unsigned>(ceil_div(g.nw, g.qb))); }

}  // namespace

cudaError_t simmim_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t, const uint8_t* mask,
                            int64_t mask_stride, float* out, int64_t B, int64_t C, int64_t H, int64_t W, int p,
                            cudaStream_t stream) {
  const Band g = make_band(B, C, H, W, p);
  if (g.B * g.nh * g.nw == 0) return cudaSuccess;
  return MK_DISPATCH_DTYPE(pred_t, [&]() -> cudaError_t {
    using TP = scalar_t;
    return MK_DISPATCH_DTYPE(imgs_t, [&]() -> cudaError_t {
      auto k = simmim_fwd_kernel<TP, scalar_t>;
      return MK_LAUNCH(k, grid_of(g), dim3(kThreads), 0, stream,
                       static_cast<const TP*>(pred), static_cast<const scalar_t*>(imgs), mask, mask_stride, out, g);
    });
  });
}

cudaError_t simmim_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                            const uint8_t* mask, int64_t mask_stride, void* dpred, int64_t B, int64_t C, int64_t H,
                            int64_t W, int p, cudaStream_t stream) {
  const Band g = make_band(B, C, H, W, p);
  if (g.B * g.nh * g.nw == 0 || C == 0) return cudaSuccess;
  return MK_DISPATCH_DTYPE(pred_t, [&]() -> cudaError_t {
    using TP = scalar_t;
    return MK_DISPATCH_DTYPE(imgs_t, [&]() -> cudaError_t {
      auto k = simmim_bwd_kernel<TP, scalar_t>;
      return MK_LAUNCH(k, grid_of(g), dim3(kThreads), 0, stream, grad,
                       static_cast<const TP*>(pred), static_cast<const scalar_t*>(imgs), mask, mask_stride,
                       static_cast<TP*>(dpred), g);
    });
  });
}

}  // namespace mixkernels::cuda
