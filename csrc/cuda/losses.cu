// CUDA kernels: fused reconstruction losses (MixMIM dual reconstruction, MAE/UM-MAE masked).
//
// One CTA per patch (per pred row for the masked loss). The patch is split into "units" of V
// consecutive pixels of one patch row: a unit is V pixels x 3 channels, i.e. 3V contiguous pred
// values (MAE's (p, p, 3) order) and one V-vector per channel plane of the image. V = 8 when p, W
// and the pointers allow (16-byte loads: one per 8 16-bit values, two per 8 floats; MixMIM-B p32
// and UM-MAE p16), else V = 4, else V = 1 (four units per thread). Each thread keeps its units'
// target and pred values in registers through the CTA sums (mean, unbiased variance, squared
// error). A CTA sum is a warp butterfly, one shared slot per warp and per sum (no barrier between
// sums), and every thread adding the 8 slots (absent warps' slots hold 0) in a fixed tree: results
// are deterministic and no atomics are used; a one-warp CTA (p16 at V = 8) needs no shared memory.
// Index math is 32-bit (fast division by host-computed magic numbers); only the CTA's base offsets
// are 64-bit. Instructions (sm_90 SASS, MixMIM-B p32, bf16 pred / fp32 images): ~6 per value
// (convert, sum, centre, variance, error) for 24 values per thread, plus the CTA's index map and
// three sums: 44 thread-instructions per 16 B moved; the model is memory-bound below ~120.
#include "device_prims.cuh"
#include "mixkernels/cuda_common.h"
#include "mixkernels/losses_cuda.h"
#include "tokens_kernels.cuh"

namespace mixkernels::cuda {
namespace {

using tokens::FastDiv;

constexpr int kMaxThreads = 256;  // p = 32: 1024 one-pixel units, 4 per thread
constexpr int kMaxWarps = kMaxThreads / 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct alignas(16) Slots {
  float v[3][kMaxWarps];
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
  int64_t W, HW;    // image row and plane strides (elements)
  FastDiv per_img;  // CTAs per image: L (MixMIM) or Lp (masked)
  FastDiv nw;       // patches per image row
  FastDiv upr;      // units per patch row (p / V)
  int64_t mask_stride;  // L, or 0 for a batch-shared mask (launcher: 0..L, so b * stride fits 32 bits)
  int B, L, p, units, warps;
  float eps, d, inv_d, inv_d1;  // D = 3p^2 (as a float), 1/D and 1/(D-1)
  bool norm_pix;
};

// K = the elements of one vector access: V values, at most 16 bytes.
template <int V, typename T>
constexpr int piece() {
  return V * static_cast<int>(sizeof(T)) <= 16 ? V : 16 / static_cast<int>(sizeof(T));
}

// V contiguous values in vector pieces of K elements (aligned to K*sizeof(T): checked by the launcher).
template <int V, typename T>
__device__ __forceinline__ void load_v(const T* src, float* dst) {
  constexpr int K = piece<V, T>();
#pragma unroll
  for (int k0 = 0; k0 < V; k0 += K) {
    if constexpr (K == 1) {
      dst[k0] = to_float(src[k0]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // a bf16 pair -> two floats: SHL + LOP
      const Vec<uint32_t, K / 2> x = *reinterpret_cast<const Vec<uint32_t, K / 2>*>(src + k0);
#pragma unroll
      for (int k = 0; k < K / 2; ++k) {
        dst[k0 + 2 * k] = __uint_as_float(x.v[k] << 16);
        dst[k0 + 2 * k + 1] = __uint_as_float(x.v[k] & 0xffff0000u);
      }
    } else {
      const Vec<T, K> x = *reinterpret_cast<const Vec<T, K>*>(src + k0);
#pragma unroll
      for (int k = 0; k < K; ++k) dst[k0 + k] = to_float(x.v[k]);
    }
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_v(T* dst, const float* src) {
  constexpr int K = piece<V, T>();
#pragma unroll
  for (int k0 = 0; k0 < V; k0 += K) {
    if constexpr (K == 1) {
      dst[k0] = from_float<T>(src[k0]);
    } else {
      Vec<T, K> x;
#pragma unroll
      for (int k = 0; k < K; ++k) x.v[k] = from_float<T>(src[k0 + k]);
      *reinterpret_cast<Vec<T, K>*>(dst + k0) = x;
    }
  }
}

// Sum over the CTA, returned to every thread. `slots` (kMaxWarps floats, 16-byte aligned) belong
// to this sum alone (so no barrier guards their reuse); slots of absent warps hold 0.
__device__ __forceinline__ float cta_sum(float v, float* slots, int warps) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (warps == 1) return v;
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = v;
  __syncthreads();
  const Vec<float, 4> a = reinterpret_cast<const Vec<float, 4>*>(slots)[0];
  const Vec<float, 4> c = reinterpret_cast<const Vec<float, 4>*>(slots)[1];
  static_assert(kMaxWarps == 8, "the tree adds 8 slots");
  return ((a.v[0] + a.v[1]) + (a.v[2] + a.v[3])) + ((c.v[0] + c.v[1]) + (c.v[2] + c.v[3]));
}

// 1/sqrt(x), one MUFU.RSQ (relative error ~2^-22; rsqrt(0) = +inf). The emulator: IEEE 1/sqrt.
__device__ __forceinline__ float rsqrt_approx(float x) {
#if defined(MIXKERNELS_SIMT_EMU)
  return 1.f / std::sqrt(x);
#else
  return rsqrtf(x);
#endif
}

// Pred offset of unit `un` inside its row: pixel (i, j0) -> value (i*p + j0)*3 (< 3 * 32^2).
__device__ __forceinline__ unsigned unit_offset(unsigned un, const Params& prm, int V) {
  const unsigned i = prm.upr.div(un), j0 = (un - i * prm.upr.d) * V;
  return (i * prm.p + j0) * 3;
}

template <typename TP, int V, int U>
__device__ __forceinline__ void zero_row(TP* row, const Params& prm) {
  float z[V];
#pragma unroll
  for (int k = 0; k < V; ++k) z[k] = 0.f;
#pragma unroll
  for (int s = 0; s < U; ++s) {
    const unsigned un = threadIdx.x + s * blockDim.x;
    if (un < static_cast<unsigned>(prm.units)) {
      TP* dst = row + unit_offset(un, prm, V);
#pragma unroll
      for (int q = 0; q < 3; ++q) store_v<V>(dst + q * V, z);
    }
  }
}

template <typename TP, typename TI, int V, int U, Op OP>
__global__ void __launch_bounds__(kMaxThreads, 1) loss_kernel(const Params prm) {
  __shared__ Slots sh;  // one slot set per CTA sum
  float(&slots)[3][kMaxWarps] = sh.v;
  constexpr bool kMix = OP == Op::kMixFwd || OP == Op::kMixBwd;
  constexpr bool kFwd = OP == Op::kMixFwd || OP == Op::kMaskFwd;
  const unsigned tid = threadIdx.x;
  if (tid >= static_cast<unsigned>(prm.warps) && tid < kMaxWarps) slots[0][tid] = slots[1][tid] = slots[2][tid] = 0.f;
  const unsigned cta = blockIdx.x;
  const unsigned b = prm.per_img.div(cta);
  const unsigned D = 3u * prm.p * prm.p;
  unsigned patch;
  int64_t row, other = 0;
  if constexpr (kMix) {
    // Image b's prediction of patch l: row b of the first half where mask[b,l], else row
    // 2B-1-b (the flipped second half). That row is the only one read; the backward also
    // owns the other candidate row, which gets zeros (every pred row feeds one patch loss).
    // 2B*L <= 2 * 0x7fffffff CTAs: the row index fits 32 bits unsigned.
    patch = cta - b * prm.per_img.d;
    const bool m = prm.mask[b * static_cast<unsigned>(prm.mask_stride) + patch] != 0;
    const unsigned mine = b * prm.L + patch, flip = (2u * prm.B - 1u - b) * prm.L + patch;
    row = static_cast<int64_t>(m ? mine : flip) * D;
    other = static_cast<int64_t>(m ? flip : mine) * D;
  } else {
    row = static_cast<int64_t>(cta) * D;
    const int64_t pi = prm.idx[cta];
    if (pi < 0) {  // not counted: loss 0, gradient 0 (the whole CTA leaves)
      if constexpr (kFwd) {
        if (tid == 0) prm.out[cta] = 0.f;
      } else {
        zero_row<TP, V, U>(static_cast<TP*>(prm.dpred) + row, prm);
      }
      return;
    }
    patch = static_cast<unsigned>(pi);  // < L <= 0x7fffffff (launcher)
  }
  const unsigned py = prm.nw.div(patch), px = patch - py * prm.nw.d;
  const TI* img = static_cast<const TI*>(prm.imgs) + static_cast<int64_t>(b) * (3 * prm.HW) +
                  static_cast<int64_t>(py) * prm.p * prm.W + static_cast<int64_t>(px) * prm.p;
  const TP* u_row = static_cast<const TP*>(prm.pred) + row;

  float t[U][3 * V], u[U][3 * V];  // set and read only where act[s]
  bool act[U];
#pragma unroll
  for (int s = 0; s < U; ++s) {
    const unsigned un = tid + s * blockDim.x;
    act[s] = un < static_cast<unsigned>(prm.units);
    if (act[s]) {
      const unsigned i = prm.upr.div(un), j0 = (un - i * prm.upr.d) * V;
      const TP* src = u_row + (i * prm.p + j0) * 3;
#pragma unroll
      for (int q = 0; q < 3; ++q) load_v<V>(src + q * V, u[s] + q * V);
      const TI* pix = img + static_cast<int64_t>(i) * prm.W + j0;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        float x[V];
        load_v<V>(pix + c * prm.HW, x);
#pragma unroll
        for (int v = 0; v < V; ++v) t[s][v * 3 + c] = x[v];
      }
    }
  }
  float inv = 1.f;  // without norm_pix the target is the pixel itself: u - t*1
  if (prm.norm_pix) {  // per-patch mean and unbiased variance, two passes over the registers
    float s1[3] = {0.f, 0.f, 0.f};  // per channel: three short chains
#pragma unroll
    for (int s = 0; s < U; ++s) {
      if (act[s]) {
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) s1[k % 3] += t[s][k];
      }
    }
    // A division, as the reference's mean: a constant patch gets exactly its value (target 0).
    const float mean = cta_sum((s1[0] + s1[1]) + s1[2], slots[0], prm.warps) / prm.d;
    float s2[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < U; ++s) {
      if (act[s]) {
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) {
          t[s][k] -= mean;
          s2[k % 3] += t[s][k] * t[s][k];
        }
      }
    }
    const float var = cta_sum((s2[0] + s2[1]) + s2[2], slots[1], prm.warps) * prm.inv_d1;
    inv = rsqrt_approx(var + prm.eps);  // 0 -> inf: a constant patch with eps = 0 gives 0 * inf = NaN
  }
  if constexpr (kFwd) {
    float e[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < U; ++s) {
      if (act[s]) {
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) {
          const float d = fmaf(-t[s][k], inv, u[s][k]);
          e[k % 3] += d * d;
        }
      }
    }
    const float tot = cta_sum((e[0] + e[1]) + e[2], slots[2], prm.warps);
    if (tid == 0) prm.out[cta] = tot * prm.inv_d;
  } else {
    const float gk = prm.grad[cta] * 2.f * prm.inv_d;
    TP* d_row = static_cast<TP*>(prm.dpred) + row;
#pragma unroll
    for (int s = 0; s < U; ++s) {
      const unsigned un = tid + s * blockDim.x;
      if (act[s]) {
        float du[3 * V];
#pragma unroll
        for (int k = 0; k < 3 * V; ++k) du[k] = gk * fmaf(-t[s][k], inv, u[s][k]);
        TP* dst = d_row + unit_offset(un, prm, V);
#pragma unroll
        for (int q = 0; q < 3; ++q) store_v<V>(dst + q * V, du + q * V);
      }
    }
    if constexpr (kMix) zero_row<TP, V, U>(static_cast<TP*>(prm.dpred) + other, prm);
  }
}

inline bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <Op OP>
cudaError_t launch(Params& prm, DType pt, DType it, int64_t B, int64_t per_img, int64_t H, int64_t W,
                   cudaStream_t stream) {
  const int p = prm.p;
  const int64_t L = p > 0 ? (H / p) * (W / p) : 0, ctas = B * per_img;
  // 32-bit index math: CTAs, patches and 2B*L pred rows (ctas bounds them for MixMIM).
  if (p < 1 || p > kMaxLossPatch || ctas > 0x7fffffffLL || L > 0x7fffffffLL || prm.mask_stride < 0 ||
      prm.mask_stride > L)
    return cudaErrorInvalidValue;
  if (ctas == 0) return cudaSuccess;
  // Units of V pixels need whole units per patch row (p % V), image rows and planes that keep the
  // alignment (W % V), and base pointers aligned to the vector pieces (V values, at most 16 B).
  const int ep = element_size(pt), ei = element_size(it);
  auto fits = [&](int v) {
    const int ap = v * ep < 16 ? v * ep : 16, ai = v * ei < 16 ? v * ei : 16;
    return p % v == 0 && W % v == 0 && aligned(prm.pred, ap) && aligned(prm.imgs, ai) &&
           (prm.dpred == nullptr || aligned(prm.dpred, ap));
  };
  const int V = fits(8) ? 8 : fits(4) ? 4 : 1, per_thread = V == 1 ? 4 : 1;
  const int D = 3 * p * p;
  prm.units = p * p / V;
  int threads = static_cast<int>(ceil_div(ceil_div(prm.units, per_thread), 32) * 32);
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  prm.warps = threads / 32;
  prm.B = static_cast<int>(B);
  prm.L = static_cast<int>(L);
  prm.W = W;
  prm.HW = H * W;
  prm.per_img = FastDiv(static_cast<unsigned>(per_img));
  prm.nw = FastDiv(static_cast<unsigned>(W >= p ? W / p : 1));  // no patch when W < p
  prm.upr = FastDiv(static_cast<unsigned>(p / V));
  prm.d = static_cast<float>(D);
  prm.inv_d = 1.f / prm.d;
  prm.inv_d1 = 1.f / static_cast<float>(D - 1);
  const dim3 grid(static_cast<unsigned>(ctas));
  return MK_DISPATCH_DTYPE(pt, [&]() -> cudaError_t {
    using TP = scalar_t;
    return MK_DISPATCH_DTYPE(it, [&]() -> cudaError_t {
      using TI = scalar_t;
      auto k = V == 8 ? loss_kernel<TP, TI, 8, 1, OP> : V == 4 ? loss_kernel<TP, TI, 4, 1, OP>
                                                               : loss_kernel<TP, TI, 1, 4, OP>;
      return MK_LAUNCH(k, grid, dim3(threads), 0, stream, prm);
    });
  });
}

Params make_params(const void* pred, const void* imgs, int p, bool norm_pix, float eps) {
  Params prm{};
  prm.pred = pred;
  prm.imgs = imgs;
  prm.p = p;
  prm.norm_pix = norm_pix;
  prm.eps = eps;
  return prm;
}

}  // namespace

cudaError_t mixmim_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t, const uint8_t* mask,
                            int64_t mask_stride, float* out, int64_t B, int64_t H, int64_t W, int p, bool norm_pix,
                            float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, p, norm_pix, eps);
  prm.mask = mask;
  prm.mask_stride = mask_stride;
  prm.out = out;
  return launch<Op::kMixFwd>(prm, pred_t, imgs_t, B, p > 0 ? (H / p) * (W / p) : 0, H, W, stream);
}

cudaError_t mixmim_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                            const uint8_t* mask, int64_t mask_stride, void* dpred, int64_t B, int64_t H, int64_t W,
                            int p, bool norm_pix, float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, p, norm_pix, eps);
  prm.mask = mask;
  prm.mask_stride = mask_stride;
  prm.grad = grad;
  prm.dpred = dpred;
  return launch<Op::kMixBwd>(prm, pred_t, imgs_t, B, p > 0 ? (H / p) * (W / p) : 0, H, W, stream);
}

cudaError_t masked_recon_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                                  const int64_t* patch_idx, float* out, int64_t B, int64_t Lp, int64_t H, int64_t W,
                                  int p, bool norm_pix, float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, p, norm_pix, eps);
  prm.idx = patch_idx;
  prm.out = out;
  return launch<Op::kMaskFwd>(prm, pred_t, imgs_t, B, Lp, H, W, stream);
}

cudaError_t masked_recon_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                                  const int64_t* patch_idx, void* dpred, int64_t B, int64_t Lp, int64_t H, int64_t W,
                                  int p, bool norm_pix, float eps, cudaStream_t stream) {
  Params prm = make_params(pred, imgs, p, norm_pix, eps);
  prm.idx = patch_idx;
  prm.grad = grad;
  prm.dpred = dpred;
  return launch<Op::kMaskBwd>(prm, pred_t, imgs_t, B, Lp, H, W, stream);
}

}  // namespace mixkernels::cuda
