// The legacy window-attention kernels (window_attention_legacy*.cu): one CTA per (window, row
// block of <= 128 query rows, head), the window's K/V resident or streamed in column chunks, bias
// and mask evaluated per pair. They run the configurations the fused kernels cannot fit in shared
// memory (float32 with large windows and head dims, small-smem devices, MIXKERNELS_WATTN_SMEM_LIMIT).
// Shared pieces: warp-level 16 x (8*NT) tile products in the mma.sync m16n8k16 accumulator layout,
// the token geometry of a window and the per-pair bias/mask.
//
// Accumulator layout (PTX m16n8k16 f32 C/D): lane = 4*g + t holds, for n-tile j,
//   c[j][0], c[j][1] = (row g,   cols 8j+2t, 8j+2t+1),   c[j][2], c[j][3] = (row g+8, same cols).
// fp16/bf16 use the tensor cores; float32 runs the same layout with FMAs (exact fp32 products, so
// float32 results match a float32 reference instead of tf32's ~1e-3).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "mixkernels/cuda_common.h"
#include "mixkernels/window_attention_cuda.h"
#include "window_attention_common.cuh"
#include "window_attention_cosine.cuh"

namespace mixkernels::cuda::wattn::legacy {

constexpr int kKB = 32;          // columns per inner block (4 n-tiles of 8)
constexpr int kNT = kKB / 8;
constexpr int kMaxWarps = 8;     // 16 rows per warp, up to 128 rows per CTA
constexpr int kDetSlots = 64;    // deterministic backward: window slots (CTAs loop over windows)

// Row pitch of a shared-memory tile: +16 bytes keeps 16-byte row alignment and spreads the
// 32-bit fragment loads of the 8 rows a warp touches over all 32 banks.
template <typename T, int D> struct Tile {
  static constexpr int kPad = 16 / int(sizeof(T));
  static constexpr int kLD = D + kPad;
  static constexpr int kVecPerRow = D * int(sizeof(T)) / 16;  // 16-byte vectors per row
};

using prim::mma16816;
__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& b0, uint32_t& b1, const void* row_ptr) {
  uint32_t r[2];
  prim::ldsm_x2_trans(r, row_ptr);
  b0 = r[0];
  b1 = r[1];
}

// c = A * B^T for a warp: A = 16 rows (pitch LD) of length D, B = 8*NT rows (pitch LD) of length D.
template <typename T, int D, int NT>
__device__ __forceinline__ void mm_nt(float (&c)[NT][4], const T* A, const T* B, int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
  if constexpr (std::is_same_v<T, float>) {
    const float* a0p = A + g * LD;
    const float* a1p = A + (g + 8) * LD;
#pragma unroll 4
    for (int kk = 0; kk < D; kk += 4) {
      const float4 a0 = *reinterpret_cast<const float4*>(a0p + kk);
      const float4 a1 = *reinterpret_cast<const float4*>(a1p + kk);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 b = *reinterpret_cast<const float4*>(B + (j * 8 + 2 * t + e) * LD + kk);
          c[j][e] = fmaf(a0.x, b.x, fmaf(a0.y, b.y, fmaf(a0.z, b.z, fmaf(a0.w, b.w, c[j][e]))));
          c[j][2 + e] = fmaf(a1.x, b.x, fmaf(a1.y, b.y, fmaf(a1.z, b.z, fmaf(a1.w, b.w, c[j][2 + e]))));
        }
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      a[0] = ld_u32(A + g * LD + kk * 16 + 2 * t);
      a[1] = ld_u32(A + (g + 8) * LD + kk * 16 + 2 * t);
      a[2] = ld_u32(A + g * LD + kk * 16 + 2 * t + 8);
      a[3] = ld_u32(A + (g + 8) * LD + kk * 16 + 2 * t + 8);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const T* brow = B + (j * 8 + g) * LD + kk * 16 + 2 * t;
        mma16816<T>(c[j], a, ld_u32(brow), ld_u32(brow + 8));
      }
    }
  }
}

// c += P * B for a warp: P is 16 x 8*NT in the accumulator layout (fp32, rounded to T for the
// tensor cores), B = 8*NT rows (pitch LD) of length D, c is 16 x D.
template <typename T, int D, int NT>
__device__ __forceinline__ void mm_nn(float (&c)[D / 8][4], const float (&p)[NT][4], const T* B, int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const int t = lane & 3;
  if constexpr (std::is_same_v<T, float>) {
    // P[g][k] lives in lane 4g + (k%8)/2 of the quad; broadcast it within the quad.
#pragma unroll
    for (int k = 0; k < NT * 8; ++k) {
      const int src = (lane & ~3) | ((k & 7) >> 1);
      const float p0 = __shfl_sync(0xffffffffu, p[k >> 3][k & 1], src);
      const float p1 = __shfl_sync(0xffffffffu, p[k >> 3][2 + (k & 1)], src);
      const float* brow = B + k * LD + 2 * t;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        const float2 b = *reinterpret_cast<const float2*>(brow + dj * 8);
        c[dj][0] = fmaf(p0, b.x, c[dj][0]);
        c[dj][1] = fmaf(p0, b.y, c[dj][1]);
        c[dj][2] = fmaf(p1, b.x, c[dj][2]);
        c[dj][3] = fmaf(p1, b.y, c[dj][3]);
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      // Two adjacent accumulator n-tiles form one m16k16 A fragment.
      uint32_t a[4];
      a[0] = pack2<T>(p[2 * kk][0], p[2 * kk][1]);
      a[1] = pack2<T>(p[2 * kk][2], p[2 * kk][3]);
      a[2] = pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
      a[3] = pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
      const T* rows = B + (kk * 16 + (lane & 15)) * LD;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        uint32_t b0, b1;
        ldmatrix_x2_trans(b0, b1, rows + dj * 8);
        mma16816<T>(c[dj], a, b0, b1);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Window geometry, per-token info in shared memory, and the bias/mask of a (query, key) pair.
struct Geo {
  int B, H, W, nH, d, wh, ww, sh, sw, rh, rw, N, nWx, nW, nwin, T, C;
  int group_batch, coords_batch;
  bool group64, coords64;
  float scale;
  const float* rpb;
  const float* attn_bias;
  const void* group;
  const void* coords;
  const float* logit_scale;  // cosine mode (window_attention_cosine.cuh), else null
};

inline Geo make_geo(const WindowAttentionParams& p) {
  Geo g{};
  g.B = p.B; g.H = p.H; g.W = p.W; g.nH = p.nH; g.d = p.d;
  g.wh = p.wh; g.ww = p.ww; g.sh = p.sh; g.sw = p.sw; g.rh = p.rh; g.rw = p.rw;
  g.N = p.wh * p.ww; g.nWx = p.W / p.ww; g.nW = (p.H / p.wh) * g.nWx; g.nwin = p.B * g.nW;
  g.T = (2 * p.rh - 1) * (2 * p.rw - 1); g.C = p.nH * p.d;
  g.group_batch = p.group_batch; g.coords_batch = p.coords_batch;
  g.group64 = p.group_int64; g.coords64 = p.coords_int64;
  g.scale = p.scale;
  g.rpb = p.rpb; g.attn_bias = p.attn_bias; g.group = p.group; g.coords = p.coords;
  g.logit_scale = p.logit_scale;
  return g;
}

// Token info of one window in shared memory: 5 int arrays of `cap` entries, then scratch for the
// exact segment ids and coordinates (3 int64 and 2 int arrays).
struct TokSmem {
  int* tok;  // token index b*H*W + oy*W + ox (original position)
  int* reg;  // Swin shift region on the rolled grid (0 without shift)
  int* grp;  // segment id: first token of the window with the same (label, region)
  int* cy;   // coordinates for the rpb lookup (window-relative or compressed, exact)
  int* cx;
  int64_t* lab;
  int64_t* vy;
  int64_t* vx;
  int* gy;
  int* gx;
  __device__ TokSmem(int* base, int cap)
      : tok(base), reg(base + cap), grp(base + 2 * cap), cy(base + 3 * cap), cx(base + 4 * cap),
        lab(reinterpret_cast<int64_t*>(base + 5 * cap)), vy(lab + cap), vx(vy + cap),
        gy(reinterpret_cast<int*>(vx + cap)), gx(gy + cap) {}
  __host__ __device__ static size_t bytes(int cap) { return size_t(cap) * (7 * 4 + 3 * 8); }
  __device__ int* end(int cap) const { return gx + cap; }
};

// Fill the token info of window `win` (all threads of the CTA; caller synchronizes).
__device__ inline void load_tokens(const Geo& G, int win, TokSmem ts) {
  const int b = win / G.nW, wi = win % G.nW;
  const int wy = wi / G.nWx, wx = wi % G.nWx;
  for (int n = threadIdx.x; n < G.N; n += blockDim.x) {
    const int ly = n / G.ww, lx = n % G.ww;
    const int y = wy * G.wh + ly, x = wx * G.ww + lx;  // rolled grid
    int oy = y + G.sh, ox = x + G.sw;                 // original grid
    if (oy >= G.H) oy -= G.H;
    if (ox >= G.W) ox -= G.W;
    const int pos = oy * G.W + ox;
    ts.tok[n] = b * G.H * G.W + pos;
    ts.reg[n] = 3 * band(y, G.H, G.wh, G.sh) + band(x, G.W, G.ww, G.sw);
    ts.lab[n] = G.group ? load_int(G.group, G.group64, int64_t(G.group_batch == 1 ? 0 : b) * G.H * G.W + pos) : 0;
    if (G.coords) {
      const int64_t c = 2 * (int64_t(G.coords_batch == 1 ? 0 : b) * G.H * G.W + pos);
      ts.vy[n] = load_int(G.coords, G.coords64, c);
      ts.vx[n] = load_int(G.coords, G.coords64, c + 1);
    } else {
      ts.cy[n] = ly;
      ts.cx[n] = lx;
    }
  }
  __syncthreads();
  if (G.coords) window_coords(ts.vy, ts.vx, ts.cy, ts.cx, ts.gy, ts.gx, G.N, G.N, G.rh, G.rw);
  segment_ids(ts.lab, ts.reg, ts.grp, G.N, G.N);
}

// Whether (query q, key k) may attend, its additive bias (natural units) and its rpb index
// (-1: no table entry). Out-of-range coordinate differences get no table bias.
struct PairBias {
  bool ok;
  int idx;
  float bias;
};

__device__ __forceinline__ PairBias pair_bias(const Geo& G, const TokSmem& ts, int h, int q, int k) {
  PairBias r{false, -1, 0.f};
  if (q >= G.N || k >= G.N) return r;
  if (ts.reg[q] != ts.reg[k] || ts.grp[q] != ts.grp[k]) return r;
  r.ok = true;
  if (G.rpb) {
    const int dy = ts.cy[q] - ts.cy[k], dx = ts.cx[q] - ts.cx[k];
    if (dy > -G.rh && dy < G.rh && dx > -G.rw && dx < G.rw) {
      r.idx = (dy + G.rh - 1) * (2 * G.rw - 1) + (dx + G.rw - 1);
      r.bias = __ldg(G.rpb + r.idx * G.nH + h);
    }
  }
  if (G.attn_bias) r.bias += __ldg(G.attn_bias + (static_cast<int64_t>(h) * G.N + q) * G.N + k);
  return r;
}

// Logit in natural units; every kernel uses this one expression so backward recomputes forward's P.
__device__ __forceinline__ float logit(float s, float bias, float scale) { return fmaf(s, scale, bias); }
// exp(x) for x <= 0 (a logit minus the row max or lse): float32 inputs take the accurate expf (this
// path's results are compared with a float32 reference), 16-bit inputs exp2 of x * log2(e).
template <typename T>
__device__ __forceinline__ float prob(float x) {
  if constexpr (std::is_same_v<T, float>) return expf(x);
  else return exp2f(x * kLog2e);
}
// Bias-gradient accumulators in shared memory: double for float32 inputs (sums of many terms).
template <typename T> using TabAcc = std::conditional_t<std::is_same_v<T, float>, double, float>;

// Copy `rows` rows of D elements from global (row r at base + tok[row0+r]*stride) into a
// shared tile (pitch LD), zero-filling rows at or past N. 16-byte vectors, whole CTA.
template <typename T, int D>
__device__ inline void load_rows(T* dst, const T* base, int64_t stride, const int* tok, int row0, int rows, int N) {
  constexpr int V = Tile<T, D>::kVecPerRow, LD = Tile<T, D>::kLD, E = 16 / int(sizeof(T));
  for (int i = threadIdx.x; i < rows * V; i += blockDim.x) {
    const int r = i / V, v = i % V, n = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (n < N) val = __ldg(reinterpret_cast<const uint4*>(base + static_cast<int64_t>(tok[n]) * stride) + v);
    *reinterpret_cast<uint4*>(dst + r * LD + v * E) = val;
  }
}

// Write a warp's 16 x D accumulator (times `mul`) through its own shared rows (pitch LD) to global
// rows base + tok[row0+r]*stride, rows at or past N skipped. 16-byte stores.
template <typename T, int D>
__device__ inline void store_rows_warp(const float (&c)[D / 8][4], float mul, T* stage, T* base, int64_t stride,
                                       const int* tok, int row0, int N, int lane) {
  constexpr int V = Tile<T, D>::kVecPerRow, LD = Tile<T, D>::kLD, E = 16 / int(sizeof(T));
  const int g = lane >> 2, t = lane & 3;
  __syncwarp();
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) {
    const int col = dj * 8 + 2 * t;
    stage[g * LD + col] = from_float<T>(c[dj][0] * mul);
    stage[g * LD + col + 1] = from_float<T>(c[dj][1] * mul);
    stage[(g + 8) * LD + col] = from_float<T>(c[dj][2] * mul);
    stage[(g + 8) * LD + col + 1] = from_float<T>(c[dj][3] * mul);
  }
  __syncwarp();
  for (int i = lane; i < 16 * V; i += 32) {
    const int r = i / V, v = i % V, n = row0 + r;
    if (n < N)
      reinterpret_cast<uint4*>(base + static_cast<int64_t>(tok[n]) * stride)[v] =
          *reinterpret_cast<const uint4*>(stage + r * LD + v * E);
  }
  __syncwarp();
}

// ---------------------------------------------------------------------------------------------
// Host-side launch planning: rows per CTA (warps x 16) and the column chunk held in shared memory.
struct Plan {
  int nwarps = 0, nrb = 0, kc = 0, ncols = 0, cap = 0;
  size_t smem = 0;
  bool ok = false;
};

// row_ops / col_ops: tiles of row / column operands; fixed: bytes independent of the warps;
// per_warp: extra bytes per warp. Prefers the most warps per CTA (fewest row blocks), then the
// largest column chunk kc (kc == ncols: K/V resident, no chunk loop).
inline Plan make_plan(int N, int D, int es, int row_ops, int col_ops, size_t fixed, size_t per_warp, int limit) {
  Plan p;
  const int ntiles = (N + 15) / 16;
  p.ncols = (N + kKB - 1) / kKB * kKB;
  p.cap = p.ncols;
  const size_t ld_bytes = static_cast<size_t>(D + 16 / es) * es;
  fixed += TokSmem::bytes(p.cap);
  for (int cap = kMaxWarps; cap >= 1; --cap) {
    const int nrb = (ntiles + cap - 1) / cap;
    const int nwarps = (ntiles + nrb - 1) / nrb;
    for (int kc = p.ncols; kc >= kKB; kc -= kKB) {
      const size_t smem = ld_bytes * (static_cast<size_t>(row_ops) * nwarps * 16 + static_cast<size_t>(col_ops) * kc) +
                          fixed + per_warp * nwarps;
      if (smem <= static_cast<size_t>(limit)) {
        p.nwarps = nwarps; p.nrb = nrb; p.kc = kc; p.smem = smem; p.ok = true;
        return p;
      }
    }
  }
  return p;
}

// Launchers (window_attention_legacy*.cu), same contracts as the public ones.
cudaError_t forward(const WindowAttentionParams& p, void* out, float* lse, cudaStream_t stream);
size_t bwd_workspace_bytes(const WindowAttentionParams& p, bool need_drpb, bool need_dbias, bool deterministic);
cudaError_t backward(const WindowAttentionParams& p, const WindowAttentionBwdBuffers& b, cudaStream_t stream);
bool fits(const WindowAttentionParams& p, bool backward, bool need_drpb, bool deterministic);
// out[i] = sum over nparts parts in order; transpose_T > 0: out is (T,nH), parts [.][nH][T].
cudaError_t sum_parts(const float* part, float* out, int nparts, int64_t M, int transpose_T, int nH, cudaStream_t stream);

}  // namespace mixkernels::cuda::wattn::legacy
