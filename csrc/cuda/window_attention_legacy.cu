// Legacy window attention forward (CUDA C++): the configurations the fused kernels
// (window_attention.cu) cannot fit in shared memory. Dense: every pair of the window, masked pairs
// at probability 0, so NaN/Inf spread exactly as in the reference.
//
// Design: one CTA per (window, row block of <= 128 query rows, head); 16 query rows per warp.
// A Swin window has N <= 256 tokens, so the window's K and V tiles (N x d) fit in shared
// memory and are read from global memory once per row block (once per window for N <= 128, e.g.
// MixMIM stage 4; twice for N = 196). Q rows are gathered straight from qkv's (B,H,W,3C) layout:
// the roll and the partition are index arithmetic on the token index (rolled (y,x) is original
// ((y+sh)%H, (x+sw)%W)), so no partitioned copy exists. Each 16-byte load/store moves a piece of
// one token's head slice (d*2 >= 32 bytes contiguous per token and head).
// Scores come from mma.sync m16n8k16 (fp16/bf16; fp32 uses FMAs in the same fragment layout),
// biases (relative-position table looked up by the tokens' coordinates, dense attn_bias) and masks
// (shift regions, group labels; masked = -inf, exact probability 0) are evaluated per pair from
// per-token info in shared memory, softmax is online in fp32 in natural units (float32 inputs:
// expf; 16-bit: exp2); P is rounded to the input type for P@V on the tensor cores (as flash-attn does).
// Memory traffic per (window, head): q, k, v read once (k, v once per row block), o written once
// through shared memory in 16-byte rows, plus the fp32 lse (N floats) for the backward.
// If a configuration does not fit shared memory whole, K/V are streamed in column chunks.
#include "window_attention_legacy.cuh"

namespace mixkernels::cuda::wattn::legacy {

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    wattn_fwd_kernel(const Geo G, const T* __restrict__ qkv, T* __restrict__ out, float* __restrict__ lse, int nrb,
                     int kc, int ncols, int cap) {
  constexpr int LD = Tile<T, D>::kLD;
  MK_DYNAMIC_SMEM(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nwarps = blockDim.x >> 5;
  const int rb = blockIdx.x % nrb, win = blockIdx.x / nrb, h = blockIdx.y;
  const int N = G.N, row0 = rb * nwarps * 16, wrow0 = row0 + warp * 16;
  const int64_t C3 = 3 * static_cast<int64_t>(G.C);

  T* s_q = reinterpret_cast<T*>(smem_raw);  // nwarps*16 rows; later the output staging
  T* s_k = s_q + nwarps * 16 * LD;
  T* s_v = s_k + kc * LD;
  TokSmem ts(reinterpret_cast<int*>(s_v + kc * LD), cap);

  load_tokens(G, win, ts);
  __syncthreads();
  load_rows<T, D>(s_q, qkv + h * D, C3, ts.tok, row0, nwarps * 16, N);

  const bool active = wrow0 < N;  // warp-uniform
  const int q0 = wrow0 + g, q1 = q0 + 8;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float o[D / 8][4];
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) o[dj][0] = o[dj][1] = o[dj][2] = o[dj][3] = 0.f;

  for (int c0 = 0; c0 < ncols; c0 += kc) {
    if (c0 > 0) __syncthreads();  // everyone is done with the previous chunk
    const int kcn = imin(kc, ncols - c0);
    load_rows<T, D>(s_k, qkv + G.C + h * D, C3, ts.tok, c0, kcn, N);
    load_rows<T, D>(s_v, qkv + 2 * G.C + h * D, C3, ts.tok, c0, kcn, N);
    __syncthreads();
    if (G.logit_scale) {  // cosine mode: q' = s_h q / |q|, k' = k / |k|, once per row where it lands
      if (c0 == 0) normalize_rows<T, D, LD>(s_q, nwarps * 16, head_scale(G.logit_scale, h), nullptr, 0);
      normalize_rows<T, D, LD>(s_k, kcn, 1.f, nullptr, 0);
      __syncthreads();
    }
    if (!active) continue;
    for (int kb = 0; kb < kcn; kb += kKB) {
      float s[kNT][4];
      mm_nt<T, D, kNT>(s, s_q + warp * 16 * LD, s_k + kb * LD, lane);
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int q = e < 2 ? q0 : q1, k = c0 + kb + j * 8 + 2 * t + (e & 1);
          const PairBias pb = pair_bias(G, ts, h, q, k);
          s[j][e] = pb.ok ? logit(s[j][e], pb.bias, G.scale) : -INFINITY;
        }
        mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
      }
      mx0 = fmaxf(m0, quad_max(mx0));
      mx1 = fmaxf(m1, quad_max(mx1));
      // A row with nothing allowed so far keeps base 0 so that exp2(-inf - base) = 0, not NaN.
      const float b0 = mx0 == -INFINITY ? 0.f : mx0, b1 = mx1 == -INFINITY ? 0.f : mx1;
      const float a0 = prob<T>(m0 - b0), a1 = prob<T>(m1 - b1);
      m0 = mx0;
      m1 = mx1;
      l0 *= a0;
      l1 *= a1;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        o[dj][0] *= a0; o[dj][1] *= a0; o[dj][2] *= a1; o[dj][3] *= a1;
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        s[j][0] = prob<T>(s[j][0] - b0);
        s[j][1] = prob<T>(s[j][1] - b0);
        s[j][2] = prob<T>(s[j][2] - b1);
        s[j][3] = prob<T>(s[j][3] - b1);
        l0 += s[j][0] + s[j][1];
        l1 += s[j][2] + s[j][3];
      }
      mm_nn<T, D, kNT>(o, s, s_v + kb * LD, lane);
    }
  }
  if (!active) return;  // no barrier follows
  l0 = quad_sum(l0);
  l1 = quad_sum(l1);
  // l = 0 only when every allowed key is -inf (rpb/attn_bias): 0 * rcp(0) = NaN, as the reference;
  // padded rows are never stored.
  const float inv0 = prim::rcp(l0), inv1 = prim::rcp(l1);
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) {
    o[dj][0] *= inv0; o[dj][1] *= inv0; o[dj][2] *= inv1; o[dj][3] *= inv1;
  }
  if (t == 0) {
    float* lrow = lse + (static_cast<int64_t>(win) * G.nH + h) * N;
    if (q0 < N) lrow[q0] = m0 + logf(l0);
    if (q1 < N) lrow[q1] = m1 + logf(l1);
  }
  store_rows_warp<T, D>(o, 1.f, s_q + warp * 16 * LD, out + h * D, G.C, ts.tok, wrow0, N, lane);
}

cudaError_t forward(const WindowAttentionParams& p, void* out, float* lse, cudaStream_t stream) {
  const Geo G = make_geo(p);
  if (G.nwin == 0 || p.nH == 0) return cudaSuccess;
  const int es = element_size(p.dtype);
  const Plan plan = make_plan(G.N, p.d, es, 1, 2, 0, 0, smem_limit());
  if (!plan.ok) return cudaErrorInvalidValue;
  return dispatch_head_dim(p.d, [&](auto dc) -> cudaError_t {
    constexpr int D = decltype(dc)::value;
    return MK_DISPATCH_DTYPE(p.dtype, [&]() -> cudaError_t {
      auto kernel = wattn_fwd_kernel<scalar_t, D>;
      cudaError_t err = prepare_smem(kernel, plan.smem);
      if (err != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>(G.nwin) * plan.nrb, p.nH);
      return MK_LAUNCH(kernel, grid, dim3(plan.nwarps * 32), plan.smem, stream, G,
                       static_cast<const scalar_t*>(p.qkv), static_cast<scalar_t*>(out), lse, plan.nrb, plan.kc,
                       plan.ncols, plan.cap);
    });
  });
}

}  // namespace mixkernels::cuda::wattn::legacy
