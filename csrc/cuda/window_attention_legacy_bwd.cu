// Legacy window attention backward (CUDA C++): the configurations the fused backward
// (window_attention_bwd.cu) cannot fit in shared memory.
//
// Design: P is recomputed from the forward's lse (no N x N tensor is ever stored), with
// dS = P * (dP - delta), delta = rowsum(dO * O) from a small pre-pass. Two main kernels, each
// shaped like the forward (one CTA per (window, row block, head), 16 rows per warp, the column
// operands of the window resident in shared memory):
//   * dq kernel: rows = queries, columns = keys. S = Q K^T, dP = dO V^T, dQ = scale * dS K.
//     It also owns the bias gradients, because it visits every (query, key) pair exactly once:
//     dbias[h,q,k] += dS and drpb[idx(q,k),h] += dS.
//   * dkdv kernel: rows = keys, columns = queries. S^T = K Q^T, dP^T = V dO^T,
//     dV = P^T dO, dK = scale * dS^T Q.
// Computing S and dP twice (once per kernel) costs extra tensor-core work but no atomics on
// dq/dk/dv and no N x N scratch; window attention at d = 32 is memory-bound, so the recompute is
// cheap next to the bytes: q, k, v, dO read once per kernel (plus O once in the pre-pass), dq, dk,
// dv written once, straight into dqkv's (B,H,W,3C) layout.
// Bias gradients: fast mode accumulates drpb in a per-CTA shared table (shared-memory atomics)
// flushed with one global atomicAdd per entry, and dbias with global atomicAdd. Deterministic mode
// gives every warp its own table (lanes that hit one entry in the same step are summed in lane
// order after __match_any_sync), lets each CTA loop over a fixed set of windows, writes per-CTA
// partial sums, and reduces them in a fixed order in a last kernel; dbias partials per window
// slot are owned by exactly one thread per element. Same input, same device: same bits.
// Performance notes (not correctness): the deterministic dq kernel runs only min(nwin, kDetSlots)
// * nrb * nH CTAs that loop over windows (e.g. 192 CTAs for Swin-T stage 1 at B=128), and fast-mode
// dbias uses one global atomicAdd per (window, pair), all windows hitting the same (nH,N,N) entries.
#include "window_attention_legacy.cuh"

namespace mixkernels::cuda::wattn::legacy {

// One column chunk of the dq / dkdv kernels: rows [c0, c0 + kcn) of the two column operands (c1, c2:
// global bases, row stride ld1 / C3 via tok) into shared memory. In cosine mode the rows are
// normalized where they land: c1's x c1_mul, and with the first chunk the CTA's resident row operand
// (`rows` rows, x rows_mul, keeping 1/|row| in s_inv). Ends with the chunk visible to the CTA.
template <typename T, int D>
__device__ inline void load_column_chunk(const Geo& G, const int* tok, int c0, int kcn, T* s_c1, const T* c1, T* s_c2,
                                         const T* c2, int64_t ld2, T* s_rows, int rows, float rows_mul, float c1_mul,
                                         float* s_inv) {
  constexpr int LD = Tile<T, D>::kLD;
  const int64_t C3 = 3 * static_cast<int64_t>(G.C);  // c1 is always a slice of qkv
  load_rows<T, D>(s_c1, c1, C3, tok, c0, kcn, G.N);
  load_rows<T, D>(s_c2, c2, ld2, tok, c0, kcn, G.N);
  __syncthreads();
  if (G.logit_scale) {
    if (c0 == 0) normalize_rows<T, D, LD>(s_rows, rows, rows_mul, s_inv, 1);
    normalize_rows<T, D, LD>(s_c1, kcn, c1_mul, nullptr, 0);
    __syncthreads();
  }
}

// delta[win,h,n] = sum_d dO * O for the token at window position n (one thread per token, head).
template <typename T, int D>
__global__ void wattn_delta_kernel(const Geo G, const T* __restrict__ dout, const T* __restrict__ out,
                                   float* __restrict__ delta) {
  constexpr int E = 16 / int(sizeof(T));
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t HW = static_cast<int64_t>(G.H) * G.W;
  if (i >= G.B * HW * G.nH) return;
  const int h = static_cast<int>(i % G.nH);
  const int64_t tok = i / G.nH;
  const int b = static_cast<int>(tok / HW), pos = static_cast<int>(tok % HW);
  int y = pos / G.W - G.sh, x = pos % G.W - G.sw;  // position on the rolled grid
  if (y < 0) y += G.H;
  if (x < 0) x += G.W;
  const int win = b * G.nW + (y / G.wh) * G.nWx + x / G.ww;
  const int n = (y % G.wh) * G.ww + x % G.ww;
  const uint4* a = reinterpret_cast<const uint4*>(dout + tok * G.C + h * D);
  const uint4* c = reinterpret_cast<const uint4*>(out + tok * G.C + h * D);
  TabAcc<T> s = 0;  // double for float32 inputs: delta feeds dS = P (dP - delta), a difference
#pragma unroll
  for (int v = 0; v < D / E; ++v) {
    alignas(16) T av[E];
    alignas(16) T cv[E];
    *reinterpret_cast<uint4*>(av) = __ldg(a + v);
    *reinterpret_cast<uint4*>(cv) = __ldg(c + v);
#pragma unroll
    for (int e = 0; e < E; ++e) s += TabAcc<T>(to_float(av[e])) * to_float(cv[e]);
  }
  delta[(static_cast<int64_t>(win) * G.nH + h) * G.N + n] = float(s);
}

// Add v to table[idx] for every lane with idx >= 0. Fast: shared-memory atomics. Deterministic:
// all 32 lanes must call; lanes with equal idx are summed in lane order by the lowest one, then
// the distinct leaders update distinct entries of the warp's private table.
template <bool DET, typename Acc>
__device__ __forceinline__ void table_add(Acc* tab, Acc* scratch, int idx, float v, int lane) {
  if constexpr (DET) {
    const unsigned grp = __match_any_sync(0xffffffffu, idx);
    scratch[lane] = v;
    __syncwarp();
    if (idx >= 0 && lane == __ffs(grp) - 1) {
      Acc sum = 0;
      for (unsigned m = grp; m; m &= m - 1) sum += scratch[__ffs(m) - 1];
      tab[idx] += sum;
    }
    __syncwarp();
  } else {
    if (idx >= 0 && v != 0.f) atomicAdd(tab + idx, Acc(v));
  }
}

// dQ and the bias gradients. CTA (window slot, row block, head); the CTA handles windows
// slot, slot + nslots, ... (one window each in fast mode). Fast mode: drpb_dst (T,nH) and
// dbias_dst (nH,N,N) are zeroed outputs. Deterministic: drpb_dst is the partial buffer
// [nslots*nrb][nH][T] (fully written), dbias_dst the zeroed partials [nslots][nH][N][N].
template <typename T, int D, bool DET>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    wattn_bwd_dq_kernel(const Geo G, const T* __restrict__ qkv, const T* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dqkv,
                        float* drpb_dst, float* dbias_dst, float* dls_dst, float scale, int nrb, int kc, int ncols,
                        int cap, int nslots) {
  constexpr int LD = Tile<T, D>::kLD;
  MK_DYNAMIC_SMEM(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nwarps = blockDim.x >> 5;
  const int rb = blockIdx.x % nrb, slot = blockIdx.x / nrb, h = blockIdx.y;
  const int N = G.N, row0 = rb * nwarps * 16, wrow0 = row0 + warp * 16;
  const int64_t C3 = 3 * static_cast<int64_t>(G.C);
  const bool want_drpb = drpb_dst != nullptr, want_dbias = dbias_dst != nullptr;

  T* s_q = reinterpret_cast<T*>(smem_raw);  // later the dq staging
  T* s_do = s_q + nwarps * 16 * LD;
  T* s_k = s_do + nwarps * 16 * LD;
  T* s_v = s_k + kc * LD;
  TokSmem ts(reinterpret_cast<int*>(s_v + kc * LD), cap);
  using Acc = TabAcc<T>;
  Acc* s_tab = reinterpret_cast<Acc*>(ts.end(cap));  // fast: T; det: nwarps*T + nwarps*32
  Acc* tab = DET ? s_tab + warp * G.T : s_tab;
  Acc* scratch = s_tab + nwarps * G.T + warp * 32;
  if (want_drpb)
    for (int i = threadIdx.x; i < (DET ? nwarps : 1) * G.T; i += blockDim.x) s_tab[i] = 0;
  // cosine mode, after the tables: 1/|q| of the row block's rows, then one logit-scale sum per warp
  float* s_inv = reinterpret_cast<float*>(s_tab + (want_drpb ? (DET ? nwarps * (G.T + 32) : G.T) : 0));
  float* s_wdls = s_inv + nwarps * 16;
  const float hs = G.logit_scale ? head_scale(G.logit_scale, h) : 0.f;
  float dls = 0.f;

  const bool active = wrow0 < N;
  const int q0 = wrow0 + g, q1 = q0 + 8;
  for (int win = slot; win < G.nwin; win += nslots) {
    __syncthreads();  // previous window (or table init) done
    load_tokens(G, win, ts);
    __syncthreads();
    load_rows<T, D>(s_q, qkv + h * D, C3, ts.tok, row0, nwarps * 16, N);
    load_rows<T, D>(s_do, dout + h * D, G.C, ts.tok, row0, nwarps * 16, N);
    const int64_t rowbase = (static_cast<int64_t>(win) * G.nH + h) * N;
    const float lse0 = q0 < N ? lse[rowbase + q0] : 0.f, lse1 = q1 < N ? lse[rowbase + q1] : 0.f;
    const float dl0 = q0 < N ? delta[rowbase + q0] : 0.f, dl1 = q1 < N ? delta[rowbase + q1] : 0.f;
    float* dbias_h = want_dbias ? dbias_dst + (static_cast<int64_t>(DET ? slot : 0) * G.nH + h) * N * N : nullptr;
    float dq[D / 8][4], z[2] = {0.f, 0.f}, sbar[2] = {0.f, 0.f};  // z, sbar: cosine mode (see the fused query_item)
#pragma unroll
    for (int dj = 0; dj < D / 8; ++dj) dq[dj][0] = dq[dj][1] = dq[dj][2] = dq[dj][3] = 0.f;

    for (int c0 = 0; c0 < ncols; c0 += kc) {
      if (c0 > 0) __syncthreads();
      const int kcn = imin(kc, ncols - c0);
      // keys and values of the chunk; cosine: q (resident, x the head's logit scale, 1/|q| kept), k
      load_column_chunk<T, D>(G, ts.tok, c0, kcn, s_k, qkv + G.C + h * D, s_v, qkv + 2 * G.C + h * D, C3, s_q,
                              nwarps * 16, hs, 1.f, s_inv);
      if (!active) continue;
      for (int kb = 0; kb < kcn; kb += kKB) {
        float s[kNT][4], dp[kNT][4];
        mm_nt<T, D, kNT>(s, s_q + warp * 16 * LD, s_k + kb * LD, lane);
        mm_nt<T, D, kNT>(dp, s_do + warp * 16 * LD, s_v + kb * LD, lane);
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int q = e < 2 ? q0 : q1, k = c0 + kb + j * 8 + 2 * t + (e & 1);
            const PairBias pb = pair_bias(G, ts, h, q, k);
            const float p = pb.ok ? prob<T>(logit(s[j][e], pb.bias, G.scale) - (e < 2 ? lse0 : lse1)) : 0.f;
            const float ds = p * (dp[j][e] - (e < 2 ? dl0 : dl1));
            z[e >> 1] += ds;
            sbar[e >> 1] = fmaf(p, s[j][e], sbar[e >> 1]);
            s[j][e] = ds;
            if (want_dbias && pb.ok) {
              float* dst = dbias_h + static_cast<int64_t>(q) * N + k;
              if constexpr (DET) *dst += ds;  // this thread owns (slot, h, q, k)
              else if (ds != 0.f) atomicAdd(dst, ds);
            }
            if (want_drpb) table_add<DET, Acc>(tab, scratch, pb.ok ? pb.idx : -1, ds, lane);
          }
        }
        mm_nn<T, D, kNT>(dq, s, s_k + kb * LD, lane);
      }
    }
    if (active && G.logit_scale)  // cosine: the gradient of q' = s_h q / |q| back to q
      dls += cosine_grad_rows<T, D, LD>(dq, s_q + warp * 16 * LD, s_inv[warp * 16 + g], s_inv[warp * 16 + g + 8], hs,
                                        q0 < N, q1 < N, lane, quad_sum(z[0]) * quad_sum(sbar[0]),
                                        quad_sum(z[1]) * quad_sum(sbar[1]));
    if (active) store_rows_warp<T, D>(dq, scale, s_q + warp * 16 * LD, dqkv + h * D, C3, ts.tok, wrow0, N, lane);
  }
  if (dls_dst) {  // the logit-scale gradient of this CTA's rows: warps in order
    dls = cos_warp_sum(dls);
    if (lane == 0) s_wdls[warp] = dls;
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.f;
      for (int w = 0; w < nwarps; ++w) sum += s_wdls[w];
      if constexpr (DET) dls_dst[static_cast<int64_t>(slot * nrb + rb) * G.nH + h] = sum;  // fully written
      else atomicAdd(dls_dst + h, sum);
    }
  }
  if (!want_drpb) return;
  __syncthreads();
  if constexpr (DET) {
    float* part = drpb_dst + (static_cast<int64_t>(slot * nrb + rb) * G.nH + h) * G.T;
    for (int i = threadIdx.x; i < G.T; i += blockDim.x) {
      Acc sum = 0;
      for (int w = 0; w < nwarps; ++w) sum += s_tab[w * G.T + i];
      part[i] = float(sum);
    }
  } else {
    for (int i = threadIdx.x; i < G.T; i += blockDim.x)
      if (s_tab[i] != 0) atomicAdd(drpb_dst + static_cast<int64_t>(i) * G.nH + h, float(s_tab[i]));
  }
}

// dK and dV. CTA (window, row block of keys, head); the window's queries, dO, lse and delta are
// the column operands.
template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    wattn_bwd_dkdv_kernel(const Geo G, const T* __restrict__ qkv, const T* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dqkv,
                          float scale, int nrb, int kc, int ncols, int cap) {
  constexpr int LD = Tile<T, D>::kLD;
  MK_DYNAMIC_SMEM(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nwarps = blockDim.x >> 5;
  const int rb = blockIdx.x % nrb, win = blockIdx.x / nrb, h = blockIdx.y;
  const int N = G.N, row0 = rb * nwarps * 16, wrow0 = row0 + warp * 16;
  const int64_t C3 = 3 * static_cast<int64_t>(G.C);

  T* s_k = reinterpret_cast<T*>(smem_raw);  // later the dk staging
  T* s_v = s_k + nwarps * 16 * LD;          // later the dv staging
  T* s_q = s_v + nwarps * 16 * LD;
  T* s_do = s_q + kc * LD;
  TokSmem ts(reinterpret_cast<int*>(s_do + kc * LD), cap);
  float* s_lse = reinterpret_cast<float*>(ts.end(cap));
  float* s_dl = s_lse + cap;
  float* s_inv = s_dl + cap;  // cosine mode: 1/|k| of the row block's keys
  const float hs = G.logit_scale ? head_scale(G.logit_scale, h) : 0.f;

  load_tokens(G, win, ts);
  const int64_t rowbase = (static_cast<int64_t>(win) * G.nH + h) * N;
  for (int n = threadIdx.x; n < cap; n += blockDim.x) {
    s_lse[n] = n < N ? lse[rowbase + n] : 0.f;
    s_dl[n] = n < N ? delta[rowbase + n] : 0.f;
  }
  __syncthreads();
  load_rows<T, D>(s_k, qkv + G.C + h * D, C3, ts.tok, row0, nwarps * 16, N);
  load_rows<T, D>(s_v, qkv + 2 * G.C + h * D, C3, ts.tok, row0, nwarps * 16, N);

  const bool active = wrow0 < N;
  const int k0 = wrow0 + g, k1 = k0 + 8;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dj][e] = dv[dj][e] = 0.f;

  for (int c0 = 0; c0 < ncols; c0 += kc) {
    if (c0 > 0) __syncthreads();
    const int kcn = imin(kc, ncols - c0);
    // queries and dO of the chunk; cosine: k (resident, 1/|k| kept), q (x the head's logit scale)
    load_column_chunk<T, D>(G, ts.tok, c0, kcn, s_q, qkv + h * D, s_do, dout + h * D, G.C, s_k, nwarps * 16, 1.f, hs,
                            s_inv);
    if (!active) continue;
    for (int qb = 0; qb < kcn; qb += kKB) {
      float st[kNT][4], dpt[kNT][4];
      mm_nt<T, D, kNT>(st, s_k + warp * 16 * LD, s_q + qb * LD, lane);
      mm_nt<T, D, kNT>(dpt, s_v + warp * 16 * LD, s_do + qb * LD, lane);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k = e < 2 ? k0 : k1, q = c0 + qb + j * 8 + 2 * t + (e & 1);
          const PairBias pb = pair_bias(G, ts, h, q, k);
          const float p = pb.ok ? prob<T>(logit(st[j][e], pb.bias, G.scale) - s_lse[q]) : 0.f;
          st[j][e] = p * (dpt[j][e] - s_dl[q]);  // dS^T
          dpt[j][e] = p;                         // P^T
        }
      }
      mm_nn<T, D, kNT>(dv, dpt, s_do + qb * LD, lane);
      mm_nn<T, D, kNT>(dk, st, s_q + qb * LD, lane);
    }
  }
  if (!active) return;
  if (G.logit_scale)  // cosine: the gradient of k' = k / |k| back to k
    cosine_grad_rows<T, D, LD>(dk, s_k + warp * 16 * LD, s_inv[warp * 16 + g], s_inv[warp * 16 + g + 8], 1.f, false,
                               false, lane);
  store_rows_warp<T, D>(dk, scale, s_k + warp * 16 * LD, dqkv + G.C + h * D, C3, ts.tok, wrow0, N, lane);
  store_rows_warp<T, D>(dv, 1.f, s_v + warp * 16 * LD, dqkv + 2 * G.C + h * D, C3, ts.tok, wrow0, N, lane);
}

// out[i] = sum over parts in order. transpose_T > 0: out is (T,nH) and parts are [.][nH][T].
__global__ void wattn_sum_parts_kernel(const float* __restrict__ part, float* __restrict__ out, int nparts,
                                       int64_t M, int transpose_T, int nH) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const int64_t src = transpose_T > 0 ? (i % nH) * transpose_T + i / nH : i;
  float s = 0.f;
  for (int p = 0; p < nparts; ++p) s += part[static_cast<int64_t>(p) * M + src];
  out[i] = s;
}

cudaError_t sum_parts(const float* part, float* out, int nparts, int64_t M, int transpose_T, int nH, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  return MK_LAUNCH(wattn_sum_parts_kernel, dim3(static_cast<unsigned>(ceil_div(M, 256))), dim3(256), 0, stream, part,
                   out, nparts, M, transpose_T, nH);
}

struct BwdLayout {
  Plan dq, dkdv;
  int nslots = 0;
  size_t delta_off = 0, drpb_off = 0, dbias_off = 0, dls_off = 0, total_floats = 0;
};

inline size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

BwdLayout bwd_layout(const WindowAttentionParams& p, bool need_drpb, bool need_dbias, bool det) {
  const Geo G = make_geo(p);
  const int es = element_size(p.dtype), limit = smem_limit();
  const int cap = (G.N + kKB - 1) / kKB * kKB;
  BwdLayout L;
  const size_t acc = es == 4 ? sizeof(double) : sizeof(float);  // TabAcc
  const size_t tabf = need_drpb && !det ? static_cast<size_t>(G.T) * acc : 0;
  const size_t tabw = need_drpb && det ? (static_cast<size_t>(G.T) + 32) * acc : 0;
  const size_t cosw = p.logit_scale ? 17 * 4 : 0;  // cosine: 1/|x| of a warp's 16 rows (+ its logit-scale sum)
  L.dq = make_plan(G.N, p.d, es, 2, 2, tabf, tabw + cosw, limit);
  L.dkdv = make_plan(G.N, p.d, es, 2, 2, static_cast<size_t>(2) * cap * 4, cosw, limit);
  L.nslots = det ? std::min(G.nwin, kDetSlots) : G.nwin;
  size_t off = round_up(static_cast<size_t>(G.nwin) * G.nH * G.N, 64);
  L.drpb_off = off;
  if (det && need_drpb && L.dq.ok) off += round_up(static_cast<size_t>(L.nslots) * L.dq.nrb * G.nH * G.T, 64);
  L.dbias_off = off;
  if (det && need_dbias) off += round_up(static_cast<size_t>(L.nslots) * G.nH * G.N * G.N, 64);
  L.dls_off = off;  // cosine mode, deterministic: logit-scale partials [nslots * nrb][nH]
  if (det && p.logit_scale && L.dq.ok) off += round_up(static_cast<size_t>(L.nslots) * L.dq.nrb * G.nH, 64);
  L.total_floats = off;
  return L;
}

template <typename T, int D>
cudaError_t launch_bwd(const WindowAttentionParams& p, const WindowAttentionBwdBuffers& b, const BwdLayout& L,
                       cudaStream_t stream) {
  const Geo G = make_geo(p);
  float* ws = static_cast<float*>(b.workspace);
  float* delta = ws + L.delta_off;
  const bool det = b.deterministic;
  float* drpb_dst = b.need_drpb ? (det ? ws + L.drpb_off : b.drpb) : nullptr;
  float* dbias_dst = b.need_dbias ? (det ? ws + L.dbias_off : b.dbias) : nullptr;
  float* dls_dst = b.dlogit_scale ? (det ? ws + L.dls_off : b.dlogit_scale) : nullptr;
  const auto* qkv = static_cast<const T*>(p.qkv);
  const auto* dout = static_cast<const T*>(b.dout);
  auto* dqkv = static_cast<T*>(b.dqkv);
  cudaError_t err;

  const int64_t nthreads = static_cast<int64_t>(G.B) * G.H * G.W * G.nH;
  auto delta_kernel = wattn_delta_kernel<T, D>;
  err = MK_LAUNCH(delta_kernel, dim3(static_cast<unsigned>(ceil_div(nthreads, 256))), dim3(256), 0, stream, G, dout,
                  static_cast<const T*>(b.out), delta);
  if (err != cudaSuccess) return err;

  auto dq_kernel = det ? wattn_bwd_dq_kernel<T, D, true> : wattn_bwd_dq_kernel<T, D, false>;
  if ((err = prepare_smem(dq_kernel, L.dq.smem)) != cudaSuccess) return err;
  err = MK_LAUNCH(dq_kernel, dim3(static_cast<unsigned>(L.nslots) * L.dq.nrb, G.nH), dim3(L.dq.nwarps * 32), L.dq.smem,
                  stream, G, qkv, dout, b.lse, static_cast<const float*>(delta), dqkv, drpb_dst, dbias_dst, dls_dst,
                  p.scale, L.dq.nrb, L.dq.kc, L.dq.ncols, L.dq.cap, L.nslots);
  if (err != cudaSuccess) return err;

  auto dkdv_kernel = wattn_bwd_dkdv_kernel<T, D>;
  if ((err = prepare_smem(dkdv_kernel, L.dkdv.smem)) != cudaSuccess) return err;
  return MK_LAUNCH(dkdv_kernel, dim3(static_cast<unsigned>(G.nwin) * L.dkdv.nrb, G.nH), dim3(L.dkdv.nwarps * 32),
                   L.dkdv.smem, stream, G, qkv, dout, b.lse, static_cast<const float*>(delta), dqkv, p.scale, L.dkdv.nrb,
                   L.dkdv.kc, L.dkdv.ncols, L.dkdv.cap);
}

size_t bwd_workspace_bytes(const WindowAttentionParams& p, bool need_drpb, bool need_dbias, bool deterministic) {
  return bwd_layout(p, need_drpb, need_dbias, deterministic).total_floats * sizeof(float);
}

bool fits(const WindowAttentionParams& p, bool backward, bool need_drpb, bool deterministic) {
  const int es = element_size(p.dtype);
  if (!make_plan(p.wh * p.ww, p.d, es, 1, 2, 0, 0, smem_limit()).ok) return false;
  if (!backward) return true;
  const BwdLayout L = bwd_layout(p, need_drpb, false, deterministic);
  return L.dq.ok && L.dkdv.ok;
}

cudaError_t backward(const WindowAttentionParams& p, const WindowAttentionBwdBuffers& b, cudaStream_t stream) {
  const Geo G = make_geo(p);
  const BwdLayout L = bwd_layout(p, b.need_drpb, b.need_dbias, b.deterministic);
  if (!L.dq.ok || !L.dkdv.ok) return cudaErrorInvalidValue;
  const size_t drpb_bytes = static_cast<size_t>(G.T) * G.nH * sizeof(float);
  const size_t dbias_bytes = static_cast<size_t>(G.nH) * G.N * G.N * sizeof(float);
  cudaError_t err = cudaSuccess;
  float* ws = static_cast<float*>(b.workspace);
  if (b.dlogit_scale && (!b.deterministic || G.nwin == 0) &&
      (err = cudaMemsetAsync(b.dlogit_scale, 0, G.nH * sizeof(float), stream)) != cudaSuccess)
    return err;
  if (!b.deterministic || G.nwin == 0) {
    if (b.need_drpb && (err = cudaMemsetAsync(b.drpb, 0, drpb_bytes, stream)) != cudaSuccess) return err;
    if (b.need_dbias && (err = cudaMemsetAsync(b.dbias, 0, dbias_bytes, stream)) != cudaSuccess) return err;
  } else if (b.need_dbias) {
    err = cudaMemsetAsync(ws + L.dbias_off, 0, static_cast<size_t>(L.nslots) * dbias_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  if (G.nwin == 0 || G.nH == 0) return cudaSuccess;

  err = dispatch_head_dim(p.d, [&](auto dc) -> cudaError_t {
    constexpr int D = decltype(dc)::value;
    return MK_DISPATCH_DTYPE(p.dtype, [&]() -> cudaError_t { return launch_bwd<scalar_t, D>(p, b, L, stream); });
  });
  if (err != cudaSuccess || !b.deterministic) return err;
  if (b.need_drpb) {
    const int64_t M = static_cast<int64_t>(G.T) * G.nH;
    err = MK_LAUNCH(wattn_sum_parts_kernel, dim3(static_cast<unsigned>(ceil_div(M, 256))), dim3(256), 0, stream,
                    static_cast<const float*>(ws + L.drpb_off), b.drpb, L.nslots * L.dq.nrb, M, G.T, G.nH);
    if (err != cudaSuccess) return err;
  }
  if (b.dlogit_scale) {
    err = sum_parts(ws + L.dls_off, b.dlogit_scale, L.nslots * L.dq.nrb, G.nH, 0, G.nH, stream);
    if (err != cudaSuccess) return err;
  }
  if (b.need_dbias) {
    const int64_t M = static_cast<int64_t>(G.nH) * G.N * G.N;
    err = MK_LAUNCH(wattn_sum_parts_kernel, dim3(static_cast<unsigned>(ceil_div(M, 256))), dim3(256), 0, stream,
                    static_cast<const float*>(ws + L.dbias_off), b.dbias, L.nslots, M, 0, G.nH);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace mixkernels::cuda::wattn::legacy
