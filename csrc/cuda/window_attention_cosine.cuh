// SwinV2 cosine attention in the window-attention kernels (fused and legacy): the pieces both use.
//
// q and k are L2-normalized once per row where they land in shared memory (F.normalize:
// x / max(||x||, eps), fp32 sums), q also times the head's exp(min(logit_scale, log 100)), so the
// score loops run unchanged with scale 1. The backward keeps 1/max(||x||, eps) per row (negated
// when ||x|| < eps: there clamp_min stops the gradient through the norm) and maps the gradient of
// the normalized rows back in the epilogue of each output row, where the warp holds it in the mma
// accumulator layout: dx = inv * (mul dx' - (x'/mul) <x', dx'>). The per-row dots <q', dq'> summed
// over a head are its logit-scale gradient before the clamp (the binding applies the clamp mask).
#pragma once
#include "mixkernels/cuda_common.h"

namespace mixkernels::cuda::wattn {

constexpr float kCosineEps = 1e-12f;                 // F.normalize's default
constexpr float kLogitScaleMax = 4.605170185988092f;  // log(100), SwinV2's clamp

// exp(min(logit_scale[h], log 100)); a NaN logit scale stays NaN (as torch.clamp).
__device__ __forceinline__ float head_scale(const float* logit_scale, int h) {
  const float ls = logit_scale[h];
  return expf(ls > kLogitScaleMax ? kLogitScaleMax : ls);
}

// Rows [0, nrows) of a shared tile (pitch LD, row length D) normalized in place, times `mul`;
// inv[r * inv_stride] = 1/max(||x_r||, eps), negative when ||x_r|| < eps (optional). All threads.
template <typename T, int D, int LD>
__device__ inline void normalize_rows(T* tile, int nrows, float mul, float* inv, int inv_stride) {
  for (int r = threadIdx.x; r < nrows; r += blockDim.x) {
    T* x = tile + r * LD;
    float ss = 0.f;
#pragma unroll 8
    for (int e = 0; e < D; ++e) ss = fmaf(to_float(x[e]), to_float(x[e]), ss);
    const float n = sqrtf(ss);
    const float iv = 1.f / fmaxf(n, kCosineEps);
    const float m = mul * iv;
#pragma unroll 8
    for (int e = 0; e < D; ++e) x[e] = from_float<T>(to_float(x[e]) * m);
    if (inv != nullptr) inv[r * inv_stride] = n >= kCosineEps ? iv : -iv;
  }
}

__device__ __forceinline__ float cos_quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The warp's 16 x D gradient w.r.t. normalized rows x' (rows g, g+8 of `rows`, pitch LD) in the
// accumulator layout, mapped to the gradient w.r.t. the raw rows in place (inv0/inv1: the rows'
// entries of normalize_rows; mul: its factor). Returns this lane's share of the sum of
// <x', dx'> - corr over the rows that count (count0/count1); summed over the warp, the rows' total.
template <typename T, int D, int LD>
__device__ __forceinline__ float cosine_grad_rows(float (&c)[D / 8][4], const T* rows, float inv0, float inv1,
                                                  float mul, bool count0, bool count1, int lane, float corr0 = 0.f,
                                                  float corr1 = 0.f) {
  const int g = lane >> 2, t = lane & 3;
  const T* x0 = rows + g * LD;
  const T* x1 = rows + (g + 8) * LD;
  float d0 = 0.f, d1 = 0.f;
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) {
    const int col = dj * 8 + 2 * t;
    d0 = fmaf(to_float(x0[col]), c[dj][0], fmaf(to_float(x0[col + 1]), c[dj][1], d0));
    d1 = fmaf(to_float(x1[col]), c[dj][2], fmaf(to_float(x1[col + 1]), c[dj][3], d1));
  }
  d0 = cos_quad_sum(d0);
  d1 = cos_quad_sum(d1);
  const float rmul = 1.f / mul;
  // through the norm: inv * (mul c - x'/mul * dot); below eps: inv * mul * c
  const float a0 = fabsf(inv0) * mul, a1 = fabsf(inv1) * mul;
  const float b0 = inv0 > 0.f ? fabsf(inv0) * rmul * d0 : 0.f, b1 = inv1 > 0.f ? fabsf(inv1) * rmul * d1 : 0.f;
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) {
    const int col = dj * 8 + 2 * t;
    c[dj][0] = fmaf(a0, c[dj][0], -b0 * to_float(x0[col]));
    c[dj][1] = fmaf(a0, c[dj][1], -b0 * to_float(x0[col + 1]));
    c[dj][2] = fmaf(a1, c[dj][2], -b1 * to_float(x1[col]));
    c[dj][3] = fmaf(a1, c[dj][3], -b1 * to_float(x1[col + 1]));
  }
  return t == 0 ? (count0 ? d0 - corr0 : 0.f) + (count1 ? d1 - corr1 : 0.f) : 0.f;
}

__device__ __forceinline__ float cos_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace mixkernels::cuda::wattn
