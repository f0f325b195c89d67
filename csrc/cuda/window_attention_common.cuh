// Shared pieces of the fused window-attention kernels (window_attention.cu, window_attention_bwd.cu):
// warp-level 16 x (8*NT) tile products in the mma.sync m16n8k16 accumulator layout, the token
// geometry of a window (roll + partition by index arithmetic) and the per-pair bias/mask.
//
// Accumulator layout (PTX m16n8k16 f32 C/D): lane = 4*g + t holds, for n-tile j,
//   c[j][0], c[j][1] = (row g,   cols 8j+2t, 8j+2t+1),   c[j][2], c[j][3] = (row g+8, same cols).
// fp16/bf16 use the tensor cores; float32 runs the same layout with FMAs (exact fp32 products, so
// float32 results match a float32 reference instead of tf32's ~1e-3).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "mixkernels/cuda_common.h"
#include "mixkernels/window_attention_cuda.h"

namespace mixkernels::cuda::wattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
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

// ---------------------------------------------------------------------------------------------
// Tensor-core primitives.
__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4g + t:
//   A (16x16 row, f16x2 regs): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                               a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]   (low half = lower col)
//   B (16x8 col, f16x2 regs):  b0 = B[k=2t..2t+1][n=g], b1 = B[k=2t+8..2t+9][n=g]
//   C/D (16x8 f32):            c[0], c[1] = D[g][2t], D[g][2t+1]; c[2], c[3] = D[g+8][2t], D[g+8][2t+1]
// Checked against a per-lane CPU emulation of these definitions (and of ldmatrix below) for every
// caller in the forward and backward kernels, fp16 and the fp32 FMA path, with column chunks.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two 8x8 b16 matrices, transposed: lanes 0..15 give the addresses of rows k0..k0+15 of a
// row-major [k][n] tile (16-byte aligned); b0/b1 come out in the m16n8k16 B-fragment layout.
// ldmatrix: lanes 8m..8m+7 address the 8 rows of matrix m (lanes 16..31 unused for .x2); with .trans
// lane 4g+t receives M_m[2t][g], M_m[2t+1][g] in register m, i.e. b0 = B[k0+2t..+1][n0+g] and
// b1 = B[k0+8+2t..+1][n0+g]: exactly the B fragment above.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& b0, uint32_t& b1, const void* row_ptr) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
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

// Sum over the 4 lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// ---------------------------------------------------------------------------------------------
// Window geometry, per-token info in shared memory, and the bias/mask of a (query, key) pair.
struct Geo {
  int B, H, W, nH, d, wh, ww, sh, sw, rh, rw, N, nWx, nW, nwin, T, C;
  int group_batch, coords_batch;
  float c1;  // scale * log2(e)
  const float* rpb;
  const float* attn_bias;
  const int* group;
  const int* coords;
};

inline Geo make_geo(const WindowAttentionParams& p) {
  Geo g{};
  g.B = p.B; g.H = p.H; g.W = p.W; g.nH = p.nH; g.d = p.d;
  g.wh = p.wh; g.ww = p.ww; g.sh = p.sh; g.sw = p.sw; g.rh = p.rh; g.rw = p.rw;
  g.N = p.wh * p.ww; g.nWx = p.W / p.ww; g.nW = (p.H / p.wh) * g.nWx; g.nwin = p.B * g.nW;
  g.T = (2 * p.rh - 1) * (2 * p.rw - 1); g.C = p.nH * p.d;
  g.group_batch = p.group_batch; g.coords_batch = p.coords_batch;
  g.c1 = p.scale * kLog2e;
  g.rpb = p.rpb; g.attn_bias = p.attn_bias; g.group = p.group; g.coords = p.coords;
  return g;
}

// Token info of one window, 5 int arrays of `cap` entries in shared memory.
struct TokSmem {
  int* tok;  // token index b*H*W + oy*W + ox (original position)
  int* reg;  // Swin shift region on the rolled grid (0 without shift)
  int* grp;  // group label (0 without group)
  int* cy;   // coordinates for the rpb lookup
  int* cx;
  __device__ TokSmem(int* base, int cap)
      : tok(base), reg(base + cap), grp(base + 2 * cap), cy(base + 3 * cap), cx(base + 4 * cap) {}
};

__device__ __forceinline__ int band(int y, int n, int w, int s) { return s == 0 ? 0 : (y < n - w ? 0 : (y < n - s ? 1 : 2)); }

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
    ts.grp[n] = G.group ? __ldg(G.group + (G.group_batch == 1 ? 0 : b) * G.H * G.W + pos) : 0;
    if (G.coords) {
      const int* c = G.coords + 2 * ((G.coords_batch == 1 ? 0 : b) * G.H * G.W + pos);
      ts.cy[n] = __ldg(c);
      ts.cx[n] = __ldg(c + 1);
    } else {
      ts.cy[n] = ly;
      ts.cx[n] = lx;
    }
  }
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

// Logit in log2 units; every kernel uses this one expression so backward recomputes forward's P.
__device__ __forceinline__ float logit2(float s, float bias, float c1) { return fmaf(s, c1, bias * kLog2e); }

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

// Opt-in shared memory per block of the current device. MIXKERNELS_WATTN_SMEM_LIMIT (bytes) can
// only lower it: the tests use it to force the column-chunked path and fewer warps per CTA, which
// real shapes reach only on small-smem devices (e.g. N=256, d=128 on A100).
inline int smem_limit() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || v <= 0)
    v = 48 * 1024;
  if (const char* env = std::getenv("MIXKERNELS_WATTN_SMEM_LIMIT")) {
    const long cap = std::strtol(env, nullptr, 10);
    if (cap > 0 && cap < v) v = static_cast<int>(cap);
  }
  return v;
}

// row_ops / col_ops: tiles of row / column operands; fixed: bytes independent of the warps;
// per_warp: extra bytes per warp. Prefers the most warps per CTA (fewest row blocks), then the
// largest column chunk kc (kc == ncols: K/V resident, no chunk loop).
inline Plan make_plan(int N, int D, int es, int row_ops, int col_ops, size_t fixed, size_t per_warp, int limit) {
  Plan p;
  const int ntiles = (N + 15) / 16;
  p.ncols = (N + kKB - 1) / kKB * kKB;
  p.cap = p.ncols;
  const size_t ld_bytes = static_cast<size_t>(D + 16 / es) * es;
  fixed += static_cast<size_t>(5) * p.cap * sizeof(int);
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

template <typename Kernel>
inline cudaError_t prepare_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// Run `body.template operator()<D>()` for the supported head dims.
template <typename F>
inline cudaError_t dispatch_head_dim(int d, F&& body) {
  switch (d) {
    case 16: return body(std::integral_constant<int, 16>{});
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    case 128: return body(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mixkernels::cuda::wattn
