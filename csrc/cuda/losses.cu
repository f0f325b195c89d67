// CUDA kernels: fused reconstruction losses (MixMIM dual reconstruction, MAE/UM-MAE masked).
//
// One CTA per patch (per pred row for the masked loss). The patch is split into "units" of V
// consecutive pixels of one patch row: a unit is V pixels x 3 channels, i.e. 3V contiguous pred
// values (MAE's (p, p, 3) order) and one V-vector per channel plane of the image, so both are
// read with vector loads when p, W and the pointers allow (V = 4), else V = 1. Each thread keeps
// its units' target and pred values in registers (MAXU units, 3V values each) through the block
// reductions (mean, unbiased variance, squared error), which run in a fixed order: results are
// deterministic and no atomics are used.
#include "device_prims.cuh"
#include "mixkernels/cuda_common.h"
#include "mixkernels/losses_cuda.h"

namespace mixkernels::cuda {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

enum class Op { kMixFwd, kMixBwd, kMaskFwd, kMaskBwd };

struct Params {
  const void* pred;
  const void* imgs;
  const uint8_t* mask;
  const int64_t* idx;
  const float* grad;
  float* out;
  void* dpred;
  int64_t B, L, Lp, H, W, mask_stride;
  int p, nw;
  float eps;
  bool norm_pix;
};

// Sum over the block, returned to every thread; warps are combined in a fixed order.
__device__ inline float block_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // smem may still be read by the previous reduction
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  const int warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) s += smem[w];
  return s;
}

// N contiguous values; aligned to N*sizeof(T) when N > 1 (checked by the launcher).
template <int N, typename T>
__device__ inline void load_n(const T* src, float* dst) {
  if constexpr (N == 1) {
    dst[0] = to_float(*src);
  } else {
    const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(src);
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = to_float(x.v[k]);
  }
}

template <int N, typename T>
__device__ inline void store_n(T* dst, const float* src) {
  if constexpr (N == 1) {
    *dst = from_float<T>(src[0]);
  } else {
    Vec<T, N> x;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = from_float<T>(src[k]);
    *reinterpret_cast<Vec<T, N>*>(dst) = x;
  }
}

// Pred offset of unit `un` inside its row: pixel (i, j0) -> value (i*p + j0)*3.
__device__ inline int64_t unit_offset(int un, int p, int upr, int V) {
  const int i = un / upr, j0 = (un - i * upr) * V;
  return (static_cast<int64_t>(i) * p + j0) * 3;
}

template <typename TP, int V, int MAXU>
__device__ inline void zero_row(TP* row, int p) {
  const int upr = p / V, units = p * p / V;
  float z[3 * V];
#pragma unroll
  for (int k = 0; k < 3 * V; ++k) z[k] = 0.f;
#pragma unroll
  for (int s = 0; s < MAXU; ++s) {
    const int un = threadIdx.x + s * blockDim.x;
    if (un < units) {
      TP* dst = row + unit_offset(un, p, upr, V);
#pragma unroll
      for (int q = 0; q < 3; ++q) store_n<V>(dst + q * V, z + q * V);
    }
  }
}

template <typename TP, typename TI, int V, int MAXU, Op OP>
__global__ void __launch_bounds__(kMaxThreads) loss_kernel(const Params prm) {
  __shared__ float smem[kMaxThreads / 32];
  constexpr bool kMix = OP == Op::kMixFwd || OP == Op::kMixBwd;
  constexpr bool kFwd = OP == Op::kMixFwd || OP == Op::kMaskFwd;
  const int p = prm.p, upr = p / V, units = p * p / V;
  const int64_t D = 3LL * p * p;
  const int64_t cta = blockIdx.x;
  int64_t b, patch, row, other = 0;
  if constexpr (kMix) {
    // Image b's prediction of patch l: row b of the first half where mask[b,l], else row
    // 2B-1-b (the flipped second half). That row is the only one read; the backward also
    // owns the other candidate row, which gets zeros (every pred row feeds one patch loss).
    b = cta / prm.L;
    patch = cta - b * prm.L;
    const bool m = prm.mask[b * prm.mask_stride + patch] != 0;
    row = (m ? b : 2 * prm.B - 1 - b) * prm.L + patch;
    other = (m ? 2 * prm.B - 1 - b : b) * prm.L + patch;
  } else {
    b = cta / prm.Lp;
    row = cta;
    patch = prm.idx[cta];
    if (patch < 0) {  // not counted: loss 0, gradient 0
      if constexpr (kFwd) {
        if (threadIdx.x == 0) prm.out[cta] = 0.f;
      } else {
        zero_row<TP, V, MAXU>(static_cast<TP*>(prm.dpred) + row * D, p);
      }
      return;
    }
  }
  const int64_t HW = prm.H * prm.W;
  const TI* img = static_cast<const TI*>(prm.imgs) + b * 3 * HW + (patch / prm.nw) * p * prm.W + (patch % prm.nw) * p;
  const TP* u_row = static_cast<const TP*>(prm.pred) + row * D;

  float t[MAXU][3 * V], u[MAXU][3 * V];
  bool act[MAXU];
  float s1 = 0.f;
#pragma unroll
  for (int s = 0; s < MAXU; ++s) {
    const int un = threadIdx.x + s * blockDim.x;
    act[s] = un < units;
#pragma unroll
    for (int k = 0; k < 3 * V; ++k) t[s][k] = u[s][k] = 0.f;
    if (act[s]) {
      const int i = un / upr, j0 = (un - i * upr) * V;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        float x[V];
        load_n<V>(img + c * HW + static_cast<int64_t>(i) * prm.W + j0, x);
#pragma unroll
        for (int v = 0; v < V; ++v) t[s][v * 3 + c] = x[v];
      }
      const TP* src = u_row + unit_offset(un, p, upr, V);
#pragma unroll
      for (int q = 0; q < 3; ++q) load_n<V>(src + q * V, u[s] + q * V);
#pragma unroll
      for (int k = 0; k < 3 * V; ++k) s1 += t[s][k];
    }
  }
  if (prm.norm_pix) {  // per-patch mean and unbiased variance, two passes over the registers
    const float mean = block_sum(s1, smem) / static_cast<float>(D);
    float s2 = 0.f;
#pragma unroll
    for (int s = 0; s < MAXU; ++s) {
      if (act[s]) {
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) {
          t[s][k] -= mean;
          s2 += t[s][k] * t[s][k];
        }
      }
    }
    const float var = block_sum(s2, smem) / static_cast<float>(D - 1);
    const float inv = 1.f / sqrtf(var + prm.eps);
#pragma unroll
    for (int s = 0; s < MAXU; ++s) {
#pragma unroll
      for (int k = 0; k < 3 * V; ++k) t[s][k] *= inv;
    }
  }
  if constexpr (kFwd) {
    float e = 0.f;
#pragma unroll
    for (int s = 0; s < MAXU; ++s) {
      if (act[s]) {
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) {
          const float d = u[s][k] - t[s][k];
          e += d * d;
        }
      }
    }
    const float tot = block_sum(e, smem);
    if (threadIdx.x == 0) prm.out[cta] = tot / static_cast<float>(D);
  } else {
    const float gk = prm.grad[cta] * 2.f / static_cast<float>(D);
    TP* d_row = static_cast<TP*>(prm.dpred) + row * D;
#pragma unroll
    for (int s = 0; s < MAXU; ++s) {
      const int un = threadIdx.x + s * blockDim.x;
      if (act[s]) {
        float du[3 * V];
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) du[k] = gk * (u[s][k] - t[s][k]);
        TP* dst = d_row + unit_offset(un, p, upr, V);
#pragma unroll
        for (int q = 0; q < 3; ++q) store_n<V>(dst + q * V, du + q * V);
      }
    }
    if constexpr (kMix) zero_row<TP, V, MAXU>(static_cast<TP*>(prm.dpred) + other * D, p);
  }
}

inline bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <Op OP>
cudaError_t launch(const Params& prm, DType pt, DType it, int64_t ctas, cudaStream_t stream) {
  if (prm.p < 1 || prm.p > kMaxLossPatch || ctas > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (ctas == 0) return cudaSuccess;
  // Vector units of 4 pixels need whole units per patch row, image rows and planes that keep
  // 4-pixel alignment (W % 4), and aligned base pointers; otherwise one pixel per unit.
  const int ep = element_size(pt), ei = element_size(it);
  const bool vec = prm.p % 4 == 0 && prm.W % 4 == 0 && aligned(prm.pred, 4 * ep) && aligned(prm.imgs, 4 * ei) &&
                   (prm.dpred == nullptr || aligned(prm.dpred, 4 * ep));
  const int per_thread_units = vec ? 1 : 4;  // 12 target + 12 pred values per thread either way
  const int units = prm.p * prm.p / (vec ? 4 : 1);
  int threads = static_cast<int>(ceil_div(ceil_div(units, per_thread_units), 32) * 32);
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  const dim3 grid(static_cast<unsigned>(ctas));
  return MK_DISPATCH_DTYPE(pt, [&]() -> cudaError_t {
    using TP = scalar_t;
    return MK_DISPATCH_DTYPE(it, [&]() -> cudaError_t {
      using TI = scalar_t;
      auto k = vec ? loss_kernel<TP, TI, 4, 1, OP> : loss_kernel<TP, TI, 1, 4, OP>;
      return MK_LAUNCH(k, grid, dim3(threads), 0, stream, prm);
    });
  });
}

Params make_params(const void* pred, const void* imgs, int64_t B, int64_t H, int64_t W, int p, bool norm_pix, float eps) {
  Params prm{};
  prm.pred = pred;
  prm.imgs = imgs;
  prm.B = B;
  prm.H = H;
  prm.W = W;
  prm.p = p;
  prm.nw = p > 0 ? static_cast<int>(W / p) : 0;
  prm.L = p > 0 ? (H / p) * (W / p) : 0;
  prm.norm_pix = norm_pix;
  prm.eps = eps;
  return prm;
}

}  // namespace

cudaError_t mixmim_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t, const uint8_t* mask,
                            int64_t mask_stride, float* out, int64_t B, int64_t H, int64_t W, int p, bool norm_pix,
                            float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, B, H, W, p, norm_pix, eps);
  prm.mask = mask;
  prm.mask_stride = mask_stride;
  prm.out = out;
  return launch<Op::kMixFwd>(prm, pred_t, imgs_t, B * prm.L, stream);
}

cudaError_t mixmim_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                            const uint8_t* mask, int64_t mask_stride, void* dpred, int64_t B, int64_t H, int64_t W,
                            int p, bool norm_pix, float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, B, H, W, p, norm_pix, eps);
  prm.mask = mask;
  prm.mask_stride = mask_stride;
  prm.grad = grad;
  prm.dpred = dpred;
  return launch<Op::kMixBwd>(prm, pred_t, imgs_t, B * prm.L, stream);
}

cudaError_t masked_recon_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                                  const int64_t* patch_idx, float* out, int64_t B, int64_t Lp, int64_t H, int64_t W,
                                  int p, bool norm_pix, float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, B, H, W, p, norm_pix, eps);
  prm.idx = patch_idx;
  prm.Lp = Lp;
  prm.out = out;
  return launch<Op::kMaskFwd>(prm, pred_t, imgs_t, B * Lp, stream);
}

cudaError_t masked_recon_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                                  const int64_t* patch_idx, void* dpred, int64_t B, int64_t Lp, int64_t H, int64_t W,
                                  int p, bool norm_pix, float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, B, H, W, p, norm_pix, eps);
  prm.idx = patch_idx;
  prm.Lp = Lp;
  prm.grad = grad;
  prm.dpred = dpred;
  return launch<Op::kMaskBwd>(prm, pred_t, imgs_t, B * Lp, stream);
}

}  // namespace mixkernels::cuda
