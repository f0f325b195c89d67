// Shared device code of the fused window-attention kernels (window_attention_fwd.cuh forward,
// window_attention_bwd.cu backward): warp-tile products on the tensor cores, the pack prologue
// that sorts a pack's tokens by attention segment, the per-warp work lists, row loads and stores.
//
// Segments. Two tokens of a pack may attend to each other only if they are in the same window,
// the same Swin shift region and carry the same group label. The prologue gives every token the
// index of the first token of its window with the same (region, label) -- its segment id, exact
// for int64 labels -- and stably sorts the pack's tokens by it (a counting sort). Every segment is
// then a contiguous slot range [lo, hi): a 16-row tile of queries only meets keys in the range of
// its rows' segments, key blocks outside it are never computed (their probabilities are exactly
// zero), and blocks inside one segment need no mask at all. MixMIM's two groups per window halve
// the pairs computed; packed 7x7 windows never meet each other's keys.
//
// Warp tiles use the mma.m16n8k16 accumulator layout (device_prims.cuh): lane = 4g + t holds, for
// n-tile j, c[j][0..1] = (row g, cols 8j+2t..8j+2t+1) and c[j][2..3] = (row g+8, same cols).
// fp16/bf16 only: float32 calls run the legacy kernels.
#pragma once
#include <climits>

#include "mixkernels/cuda_common.h"
#include "window_attention_index.cuh"

namespace mixkernels::cuda::wattn {

constexpr unsigned kFull = 0xffffffffu;

// Row pitch of a shared-memory tile: +16 bytes keeps rows 16-byte aligned and makes the eight
// rows an ldmatrix (or a fragment load) touches land in distinct bank groups.
template <typename T, int D>
struct Tile {
  static constexpr int kLD = D + 16 / int(sizeof(T));
  static constexpr int kCPR = D * int(sizeof(T)) / 16;  // 16-byte chunks per row
  static constexpr int kE = 16 / int(sizeof(T));        // elements per chunk
};

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFull, v, 1);
  return v + __shfl_xor_sync(kFull, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFull, v, 2));
}

// ---------------------------------------------------------------------------------------------
// Warp-tile products on the tensor cores. A: 16 rows x D held by the warp as mma A fragments.
// scores: s = A * B^T for 8*NT rows of B (pitch LD).
// accum: c += P * B for P (16 x 8*NT, accumulator layout) and 8*NT rows of B of length D.
template <typename T, int D>
struct AFrag {
  uint32_t a[D / 16][4];
  __device__ __forceinline__ void load(const T* rows, int lane) {
    constexpr int LD = Tile<T, D>::kLD;
    const int i = lane >> 3, r = (lane & 7) + 8 * (i & 1), c = 8 * (i >> 1);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) prim::ldsm_x4(a[kk], rows + r * LD + 16 * kk + c);
  }
};
// scores_add_rows: s[u] += A[u] * B^T for R row tiles (s holds a starting value, e.g. the bias); each B
// fragment is loaded once for all of them (the forward's pair units: R = 2).
template <typename T, int D, int NT, int R>
__device__ __forceinline__ void scores_add_rows(float (&s)[R][NT][4], const AFrag<T, D> (&A)[R], const T* B, int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  if constexpr (D == 16) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t r[2];  // matrices: B rows 8j.., cols 0-7 / 8-15 = b0 / b1
      prim::ldsm_x2(r, B + (8 * j + (lane & 7)) * LD + 8 * ((lane >> 3) & 1));
#pragma unroll
      for (int u = 0; u < R; ++u) prim::mma16816<T>(s[u][j], A[u].a[0], r[0], r[1]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int c = 0; c < D / 32; ++c) {
        uint32_t r[4];  // matrix i: B rows 8j.., cols 32c + 8i: (b0, b1) of k-steps 2c and 2c+1
        prim::ldsm_x4(r, B + (8 * j + (lane & 7)) * LD + 32 * c + 8 * (lane >> 3));
#pragma unroll
        for (int u = 0; u < R; ++u) {
          prim::mma16816<T>(s[u][j], A[u].a[2 * c], r[0], r[1]);
          prim::mma16816<T>(s[u][j], A[u].a[2 * c + 1], r[2], r[3]);
        }
      }
    }
  }
}

// One row tile as a set of one (the R-generic helpers' R = 1).
template <typename X>
__device__ __forceinline__ X (&one_of(X& x))[1] { return *reinterpret_cast<X(*)[1]>(&x); }
template <typename X>
__device__ __forceinline__ const X (&one_of(const X& x))[1] { return *reinterpret_cast<const X(*)[1]>(&x); }

template <typename T, int D, int NT>
__device__ __forceinline__ void scores_add(float (&s)[NT][4], const AFrag<T, D>& A, const T* B, int lane) {
  scores_add_rows<T, D, NT, 1>(one_of(s), one_of(A), B, lane);
}

template <typename T, int D, int NT>
__device__ __forceinline__ void scores(float (&s)[NT][4], const AFrag<T, D>& A, const T* B, int lane) {
#pragma unroll
  for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  scores_add<T, D, NT>(s, A, B, lane);
}

// c[u] += a[u] * B for R m16k16 A fragments (16 rows x 16 k each) and the 16 rows of B at `B` (length D,
// pitch Tile::kLD), each B fragment loaded once: accum's step for fragments already packed.
template <typename T, int D, int R>
__device__ __forceinline__ void accum_frag_rows(float (&c)[R][D / 8][4], const uint32_t (&a)[R][4], const T* B,
                                                int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const int i = lane >> 3;
  const T* rows = B + (8 * (i & 1) + (lane & 7)) * LD + 8 * (i >> 1);
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t r[4];
    prim::ldsm_x4_trans(r, rows + 16 * dp);
#pragma unroll
    for (int u = 0; u < R; ++u) {
      prim::mma16816<T>(c[u][2 * dp], a[u], r[0], r[1]);
      prim::mma16816<T>(c[u][2 * dp + 1], a[u], r[2], r[3]);
    }
  }
}

template <typename T, int D>
__device__ __forceinline__ void accum_frag(float (&c)[D / 8][4], const uint32_t (&a)[4], const T* B, int lane) {
  accum_frag_rows<T, D, 1>(one_of(c), one_of(a), B, lane);
}

// The A fragment of a 16 x 16 accumulator block p (two n-tiles, rounded to T), as accum packs it.
template <typename T>
__device__ __forceinline__ void pack_frag(uint32_t (&a)[4], const float (&p)[2][4]) {
  a[0] = pack2<T>(p[0][0], p[0][1]);
  a[1] = pack2<T>(p[0][2], p[0][3]);
  a[2] = pack2<T>(p[1][0], p[1][1]);
  a[3] = pack2<T>(p[1][2], p[1][3]);
}

// c[u] += a[u] * B for R m16k8 A fragments (16 rows x 8 k) and the 8 rows of B at `B` (length D, pitch
// Tile::kLD): m16n8k8 steps, one per 8 columns (an odd last n-tile of P, e.g. an 8-key block).
template <typename T, int D, int R>
__device__ __forceinline__ void accum_frag8_rows(float (&c)[R][D / 8][4], const uint32_t (&a)[R][2], const T* B,
                                                 int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  if constexpr (D == 16) {
    uint32_t r[2];  // matrix i: B rows 0-7, cols 8i..8i+7, transposed: b0 of n-tile i
    prim::ldsm_x2_trans(r, B + (lane & 7) * LD + 8 * ((lane >> 3) & 1));
#pragma unroll
    for (int u = 0; u < R; ++u) {
      prim::mma1688<T>(c[u][0], a[u], r[0]);
      prim::mma1688<T>(c[u][1], a[u], r[1]);
    }
  } else {
    const T* rows = B + (lane & 7) * LD + 8 * (lane >> 3);
#pragma unroll
    for (int q = 0; q < D / 32; ++q) {
      uint32_t r[4];  // matrix i: B rows 0-7, cols 32q + 8i.., transposed: b0 of n-tile 4q + i
      prim::ldsm_x4_trans(r, rows + 32 * q);
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int i = 0; i < 4; ++i) prim::mma1688<T>(c[u][4 * q + i], a[u], r[i]);
    }
  }
}

// c[u] += P[u] * B for R row tiles: P[u] (16 x 8*NT, accumulator layout) and 8*NT rows of B of length D.
template <typename T, int D, int NT, int R>
__device__ __forceinline__ void accum_rows(float (&c)[R][D / 8][4], const float (&p)[R][NT][4], const T* B, int lane) {
  constexpr int LD = Tile<T, D>::kLD;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {  // two accumulator n-tiles are one m16k16 A fragment
    uint32_t a[R][4];
#pragma unroll
    for (int u = 0; u < R; ++u) pack_frag<T>(a[u], *reinterpret_cast<const float(*)[2][4]>(p[u] + 2 * kk));
    accum_frag_rows<T, D, R>(c, a, B + 16 * kk * LD, lane);
  }
  if constexpr (NT & 1) {  // an odd last n-tile: one m16k8 A fragment
    uint32_t a[R][2];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      a[u][0] = pack2<T>(p[u][NT - 1][0], p[u][NT - 1][1]);
      a[u][1] = pack2<T>(p[u][NT - 1][2], p[u][NT - 1][3]);
    }
    accum_frag8_rows<T, D, R>(c, a, B + 8 * (NT - 1) * LD, lane);
  }
}

template <typename T, int D, int NT>
__device__ __forceinline__ void accum(float (&c)[D / 8][4], const float (&p)[NT][4], const T* B, int lane) {
  accum_rows<T, D, NT, 1>(one_of(c), one_of(p), B, lane);
}

// ---------------------------------------------------------------------------------------------
// Per-slot and per-tile state of a pack in shared memory (Layout in window_attention_index.cuh).
//   tok:  global token index b*H*W + position (-1: padding slot)
//   qi:   query role {4 * table position, segment id (-1: padding)}
//   ki:   key role   {-4 * table position, segment id (-2: padding)}; a pair attends iff the ids
//         are equal, so a padding slot never meets anything, not even itself
//   lidx: window-local token index (attn_bias); window of a slot = slot / N
//   lrow: lse index of the slot at head 0: (window * nH) * N + lidx (add h * N)
//   cxy:  coordinates (window-relative or compressed; coords calls only)
//   seg:  {lo, hi} slot range of the slot's segment
// Tiles: lo/hi key range and `uni` (16 valid rows of one segment) per 16-row tile; the warp work
// lists `items` (wbeg[w]..wbeg[w+1]); info[0] = valid slots, info[1] = tiles.
struct Pack {
  int* tok;
  int2* qi;
  int2* ki;
  int* lidx;
  int* lrow;
  int2* cxy;
  int2* seg;
  int* lo;
  int* hi;
  int* uni;
  int* items;
  int* wbeg;
  int* info;
  __device__ Pack(unsigned char* smem, const Layout& L)
      : tok(reinterpret_cast<int*>(smem + L.tok)),
        qi(reinterpret_cast<int2*>(smem + L.qi)),
        ki(reinterpret_cast<int2*>(smem + L.ki)),
        lidx(reinterpret_cast<int*>(smem + L.lidx)),
        lrow(reinterpret_cast<int*>(smem + L.lrow)),
        cxy(reinterpret_cast<int2*>(smem + L.cxy)),
        seg(reinterpret_cast<int2*>(smem + L.seg)),
        lo(reinterpret_cast<int*>(smem + L.tiles)),
        hi(lo + kMaxTiles),
        uni(hi + kMaxTiles),
        items(uni + kMaxTiles),
        wbeg(items + 2 * kMaxTiles),
        info(wbeg + kWarps + 1) {}
};

__device__ __forceinline__ int64_t load_int(const void* base, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(base)[i] : int64_t(static_cast<const int32_t*>(base)[i]);
}

// Segment ids of tokens [0, count) (windows of N consecutive tokens): the index of the first token
// of the window with the same (label, region). Exact at the labels' full width. Block-wide loop.
__device__ inline void segment_ids(const int64_t* lab, const int* reg, int* kid, int count, int N) {
  for (int n = threadIdx.x; n < count; n += blockDim.x) {
    int k = n;
    for (int m = n / N * N; m < n; ++m)
      if (lab[m] == lab[n] && reg[m] == reg[n]) {
        k = m;
        break;
      }
    kid[n] = k;
  }
}

// segment_ids for the pack prologue, without a serial scan per token: token n = threadIdx.x (all threads
// call; `label`, `region` are its own, lab/reg published by a barrier; padding tokens: any id). Inside a warp __match_any_sync
// finds the lanes of the same (window, label, region); the first of them (the warp's leader of that
// key) is listed, in token order, in `list` (ids of the list entries in `at`, counts per warp in
// `cnt`). Only leaders scan, and only the earlier leaders of their window (one entry per key and warp:
// MixMIM's two labels find theirs within the first warp's few entries); the rest of the key's lanes
// take the result by shuffle. Same ids as segment_ids.
__device__ __forceinline__ int pack_segment_id(const int64_t* lab, const int* reg, int64_t label, int region, int n,
                                               bool valid, int N, int* list, int* at, int* cnt) {
  const int lane = n & 31, warp = n >> 5, win = n / N;
  const unsigned same = __match_any_sync(kFull, label) & __match_any_sync(kFull, region) &
                        __match_any_sync(kFull, win);
  const int first = __ffs(static_cast<int>(same)) - 1;
  const unsigned leaders = __ballot_sync(kFull, lane == first);
  if (lane == 0) cnt[warp] = __popc(leaders);
  __syncthreads();
  int idx = __popc(leaders & prim::lanemask_lt(lane));
#pragma unroll
  for (int v = 0; v < kWarps; ++v) idx += v < warp ? cnt[v] : 0;
  if (lane == first) list[idx] = n, at[n] = idx;
  __syncthreads();
  int k = n;
  if (lane == first && valid) {  // the window's first token leads: at[win * N] is the window's first entry
    for (int i = at[win * N]; i < idx; ++i) {
      const int m = list[i];
      if (lab[m] == label && reg[m] == region) {
        k = m;
        break;
      }
    }
  }
  return __shfl_sync(kFull, k, first);
}

// int32 coordinates of tokens [0, count) from int64 ones (windows of N tokens): relative to the
// window's first token when the window spans less than coord_limit, else gap-compressed
// (compress_gap): either way the same pairs get the same table entries. gy/gx: scratch.
// Block-wide, all threads must call; the caller synchronizes before reading cy/cx.
__device__ inline void window_coords(const int64_t* vy, const int64_t* vx, int* cy, int* cx, int* gy, int* gx,
                                     int count, int N, int rh, int rw) {
  const uint64_t lim = uint64_t(coord_limit(rw > rh ? rw : rh));
  auto absdiff = [](int64_t a, int64_t b) { return a >= b ? uint64_t(a) - uint64_t(b) : uint64_t(b) - uint64_t(a); };
  bool far = false;
  for (int n = threadIdx.x; n < count; n += blockDim.x) {
    const int b = n / N * N;
    const uint64_t dy = absdiff(vy[n], vy[b]), dx = absdiff(vx[n], vx[b]);
    far = far || dy >= lim || dx >= lim;
    cy[n] = vy[n] >= vy[b] ? int(dy) : -int(dy);  // meaningful unless some token is far
    cx[n] = vx[n] >= vx[b] ? int(dx) : -int(dx);
  }
  if (!__syncthreads_or(far)) return;
  for (int n = threadIdx.x; n < count; n += blockDim.x) {
    const int b = n / N * N;
    bool fy = true, fx = true, hy = false, hx = false;
    int64_t ny = 0, nx = 0;
    for (int m = b; m < b + N; ++m) {
      fy = fy && !(m < n && vy[m] == vy[n]);
      fx = fx && !(m < n && vx[m] == vx[n]);
      if (vy[m] > vy[n] && (!hy || vy[m] < ny)) ny = vy[m], hy = true;
      if (vx[m] > vx[n] && (!hx || vx[m] < nx)) nx = vx[m], hx = true;
    }
    gy[n] = fy ? compress_gap(vy[n], ny, hy, 2 * rh) : 0;  // steps counted once per distinct value
    gx[n] = fx ? compress_gap(vx[n], nx, hx, 2 * rw) : 0;
  }
  __syncthreads();
  for (int n = threadIdx.x; n < count; n += blockDim.x) {
    const int b = n / N * N;
    int y = 0, x = 0;
    for (int m = b; m < b + N; ++m) {
      y += vy[m] < vy[n] ? gy[m] : 0;
      x += vx[m] < vx[n] ? gx[m] : 0;
    }
    cy[n] = y;
    cx[n] = x;
  }
}

// Build the pack's slots and tiles (all threads; ends with a barrier). `scratch` (at least
// prologue_scratch_bytes()) may alias the operand buffers. COORDS: rpb indexed by `coords`.
template <bool COORDS>
__device__ void prologue(const Geo& G, int pack, const Pack& S, unsigned char* scratch) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t* lab = reinterpret_cast<int64_t*>(scratch);
  int64_t* vy = lab + kThreads;
  int64_t* vx = vy + kThreads;
  int* reg = reinterpret_cast<int*>(vx + kThreads);
  int* kidv = reg + kThreads;
  int* cyv = kidv + kThreads;
  int* cxv = cyv + kThreads;
  int* gy = cxv + kThreads;
  int* gx = gy + kThreads;
  int* start = gx + kThreads;
  int* total = start + kThreads;
  int* wsum = total + kThreads;
  int* wcnt = wsum + kThreads;  // [kWarps][kThreads]: tokens of each segment id per warp
  for (int i = tid; i < kWarps * kThreads; i += kThreads) wcnt[i] = 0;

  const int nvalid = imin(G.P, G.nwin - pack * G.P) * G.N;
  const int n = tid;  // token n of the pack, window-major (kThreads >= cap)
  const bool valid = n < nvalid;
  const int j = valid ? n % G.N : 0;
  int tok = -1, region = 0;
  int64_t label = 0, y = 0, x = 0;
  if (valid) {
    const TokenPos tp = token_pos(G, pack * G.P + n / G.N, j);
    tok = tp.b * G.H * G.W + tp.pos;
    region = tp.region;
    if (G.group) label = load_int(G.group, G.group64, int64_t(G.group_batch == 1 ? 0 : tp.b) * G.H * G.W + tp.pos);
    if constexpr (COORDS) {
      const int64_t i2 = 2 * (int64_t(G.coords_batch == 1 ? 0 : tp.b) * G.H * G.W + tp.pos);
      y = load_int(G.coords, G.coords64, i2);
      x = load_int(G.coords, G.coords64, i2 + 1);
    } else {
      y = tp.ly;
      x = tp.lx;
    }
  }
  lab[n] = label;
  reg[n] = region;
  vy[n] = y;
  vx[n] = x;
  cyv[n] = int(y);
  cxv[n] = int(x);
  __syncthreads();
  if constexpr (COORDS) window_coords(vy, vx, cyv, cxv, gy, gx, nvalid, G.N, G.rh, G.rw);
  const int sid = pack_segment_id(lab, reg, label, region, n, valid, G.N, start, kidv, wsum);
  const int kid = valid ? sid : n;  // padding: a segment of its own
  __syncthreads();
  const int P = table_pos(cyv[n], cxv[n], G.rw);

  // Stable counting sort by segment id: rank within the warp, counts of earlier warps, bin starts.
  const unsigned same = __match_any_sync(kFull, kid);
  const int rank = __popc(same & prim::lanemask_lt(lane));
  if (lane == __ffs(static_cast<int>(same)) - 1) wcnt[warp * kThreads + kid] = __popc(same);
  __syncthreads();
  int tot = 0, before = 0;
  for (int v = 0; v < kWarps; ++v) {
    tot += wcnt[v * kThreads + tid];
    before += v < warp ? wcnt[v * kThreads + kid] : 0;
  }
  int incl = tot;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(kFull, incl, o);
    incl += lane >= o ? v : 0;
  }
  if (lane == 31) wsum[warp] = incl;
  __syncthreads();
  int excl = incl - tot;
  for (int v = 0; v < warp; ++v) excl += wsum[v];
  start[tid] = excl;
  total[tid] = tot;
  __syncthreads();
  const int lo = start[kid], pos = lo + before + rank;
  if (pos < G.cap) {  // padding tokens keep pos == n
    S.tok[pos] = tok;
    S.qi[pos] = make_int2(4 * P, valid ? kid : -1);
    S.ki[pos] = make_int2(-4 * P, valid ? kid : -2);
    S.lidx[pos] = j;
    S.lrow[pos] = valid ? (pack * G.P + n / G.N) * G.nH * G.N + j : 0;
    S.cxy[pos] = make_int2(cyv[n], cxv[n]);
    S.seg[pos] = make_int2(lo, lo + total[kid]);
  }
  __syncthreads();
  if (tid == 0) {
    const int ntiles = (nvalid + 15) / 16;
    S.info[0] = nvalid;
    S.info[1] = ntiles;
    for (int t = 0; t < ntiles; ++t) {
      const int first = 16 * t, last = imin(first + 15, nvalid - 1);
      S.lo[t] = S.seg[first].x;
      S.hi[t] = S.seg[last].y;
      S.uni[t] = last == first + 15 && S.seg[first].x == S.seg[last].x;
    }
  }
}

// Coords calls: {min y, min x, ey, ex} of the coordinates c (c.x = y, c.y = x) of the threads with
// `has` (a pack's slots), ey / ex the y / x spans capped at the table's half-widths rh-1 / rw-1: every
// pair's difference lies in [-ey, ey] x [-ex, ex] or out of the table's range. The spans are unsigned
// differences (exact for any ints, max >= min). All threads call (two barriers inside); box: 4 ints
// of free shared memory {min y, max y, min x, max x}. Block-uniform result (forward and backward).
__device__ __forceinline__ int4 coord_box(int* box, int2 c, bool has, int rh, int rw) {
  if (threadIdx.x == 0) box[0] = box[2] = INT_MAX, box[1] = box[3] = INT_MIN;
  __syncthreads();
  if (has) {
    atomicMin(box, c.x);
    atomicMax(box + 1, c.x);
    atomicMin(box + 2, c.y);
    atomicMax(box + 3, c.y);
  }
  __syncthreads();
  const unsigned sy = unsigned(box[1]) - unsigned(box[0]), sx = unsigned(box[3]) - unsigned(box[2]);
  return make_int4(box[0], box[2], sy < unsigned(rh - 1) ? int(sy) : rh - 1, sx < unsigned(rw - 1) ? int(sx) : rw - 1);
}

// Key blocks of 16 a tile visits, and the tile order / warp assignment (longest first, each to
// the least loaded warp: deterministic). Items 0..ntiles-1 are tiles; with `two` a second copy
// (items ntiles..2*ntiles-1, cost weight wb instead of wa) for the backward's second phase.
__device__ __forceinline__ int tile_blocks(const Pack& S, int t) { return (round16(S.hi[t]) - (S.lo[t] & ~15)) / 16; }

// Thread 0 only; `scratch`: 3 * 2 * kMaxTiles ints of free shared memory.
__device__ inline void assign_items(const Pack& S, bool two, int wa, int wb, int* scratch) {
  if (threadIdx.x != 0) return;
  const int ntiles = S.info[1], nitems = two ? 2 * ntiles : ntiles;
  int* order = scratch;
  int* cost = order + 2 * kMaxTiles;
  int* owner = cost + 2 * kMaxTiles;
  for (int i = 0; i < nitems; ++i) {
    const int t = i < ntiles ? i : i - ntiles;
    cost[i] = (tile_blocks(S, t) + 1) * (i < ntiles ? wa : wb);
    int k = i;  // insertion sort by cost, descending (stable)
    while (k > 0 && cost[order[k - 1]] < cost[i]) {
      order[k] = order[k - 1];
      --k;
    }
    order[k] = i;
  }
  int load[kWarps];
#pragma unroll
  for (int v = 0; v < kWarps; ++v) load[v] = 0;
  for (int k = 0; k < nitems; ++k) {
    int best = 0, lb = load[0];
#pragma unroll
    for (int v = 1; v < kWarps; ++v)
      if (load[v] < lb) best = v, lb = load[v];
#pragma unroll
    for (int v = 0; v < kWarps; ++v) load[v] += v == best ? cost[order[k]] : 0;
    owner[order[k]] = best;
  }
  int fill = 0;
  for (int v = 0; v < kWarps; ++v) {
    S.wbeg[v] = fill;
    for (int k = 0; k < nitems; ++k)
      if (owner[order[k]] == v) S.items[fill++] = order[k];
  }
  S.wbeg[kWarps] = fill;
}

// ---------------------------------------------------------------------------------------------
// Rows. Thread t always moves the 16-byte chunk t % CPR of rows t / CPR, t / CPR + kThreads / CPR,
// ...: one token lookup serves the NOPS operands of a row (e.g. Q, K, V of one token).
// load_rows_async: tile i rows [0, nrows) <- global base + tok[r] * stride + off[i], cp.async.
// Offsets are 32-bit in 16-byte chunks (the launcher checks tensors stay below 64 GB).
template <typename T, int D, int NOPS>
__device__ __forceinline__ void load_rows_async(T* dst, size_t tile_stride, const T* base, int stride,
                                                const int (&off)[NOPS], const int* tok, int nrows) {
  using TL = Tile<T, D>;
  constexpr int kStep = kThreads / TL::kCPR;
  const int part = threadIdx.x % TL::kCPR;
  const uint4* src = reinterpret_cast<const uint4*>(base) + part;
  const unsigned rs = unsigned(stride / TL::kE);
  T* d = dst + (threadIdx.x / TL::kCPR) * TL::kLD + part * TL::kE;
  for (int r = threadIdx.x / TL::kCPR; r < nrows; r += kStep, d += kStep * TL::kLD) {
    const uint4* row = src + unsigned(tok[r]) * rs;
#pragma unroll
    for (int i = 0; i < NOPS; ++i) prim::cp_async<16>(d + i * tile_stride / sizeof(T), row + off[i] / TL::kE);
  }
}

// Zero rows [r0, r1) of a tile: padding rows must hold finite values (probability 0 times them).
template <typename T, int D>
__device__ __forceinline__ void zero_rows(T* dst, int r0, int r1) {
  using TL = Tile<T, D>;
  for (int c = threadIdx.x; c < (r1 - r0) * TL::kCPR; c += kThreads) {
    const int r = r0 + c / TL::kCPR, part = c % TL::kCPR;
    *reinterpret_cast<uint4*>(dst + r * TL::kLD + part * TL::kE) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Whether any element of the chunks this thread loaded into rows [0, nrows) of a tile (the map of
// load_rows_async) is NaN/Inf: an all-ones exponent carries into the bit above it when 1 is added.
template <typename T, int D>
__device__ __forceinline__ bool rows_nonfinite(const T* src, int nrows) {
  using TL = Tile<T, D>;
  constexpr int kStep = kThreads / TL::kCPR;
  constexpr uint32_t M = std::is_same_v<T, __half> ? 0x7C007C00u : 0x7F807F80u;
  constexpr uint32_t ONE = std::is_same_v<T, __half> ? 0x04000400u : 0x00800080u;
  uint32_t acc = 0;
  const T* s = src + (threadIdx.x / TL::kCPR) * TL::kLD + (threadIdx.x % TL::kCPR) * TL::kE;
  for (int r = threadIdx.x / TL::kCPR; r < nrows; r += kStep, s += kStep * TL::kLD) {
    const uint4 v = *reinterpret_cast<const uint4*>(s);
    acc |= ((v.x & M) + ONE) | ((v.y & M) + ONE) | ((v.z & M) + ONE) | ((v.w & M) + ONE);
  }
  return (acc & 0x80008000u) != 0;
}

// A warp's 16 x D accumulator (rows g times mul, rows g+8 times mul8) into its staging rows (pitch LD).
template <typename T, int D>
__device__ __forceinline__ void stage_rows_warp(const float (&c)[D / 8][4], float mul, float mul8, T* stage, int lane) {
  using TL = Tile<T, D>;
  const int g = lane >> 2, t = lane & 3;
  __syncwarp();
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) {
    const int col = dj * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(stage + g * TL::kLD + col) = pack2<T>(c[dj][0] * mul, c[dj][1] * mul);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * TL::kLD + col) = pack2<T>(c[dj][2] * mul8, c[dj][3] * mul8);
  }
  __syncwarp();
}

// Write a warp's 16 x D accumulator (rows g times mul, rows g+8 times mul8) through its staging
// rows (pitch LD) to global rows base + tok[row0 + r] * stride for row0 + r < nvalid (and, PAD: the
// forward's aligned packs with padding slots inside, tok >= 0), 16-byte stores (32-bit chunk offsets).
template <typename T, int D, bool PAD = false>
__device__ __forceinline__ void store_rows_warp(const float (&c)[D / 8][4], float mul, float mul8, T* stage, T* base,
                                                int stride, const int* tok, int row0, int nvalid, int lane) {
  using TL = Tile<T, D>;
  stage_rows_warp<T, D>(c, mul, mul8, stage, lane);
  uint4* dst = reinterpret_cast<uint4*>(base);
  const unsigned rs = unsigned(stride / TL::kE);
#pragma unroll
  for (int i = lane; i < 16 * TL::kCPR; i += 32) {
    const int r = i / TL::kCPR, part = i - r * TL::kCPR;
    if (row0 + r < nvalid && (!PAD || tok[row0 + r] >= 0))
      dst[unsigned(tok[row0 + r]) * rs + part] = *reinterpret_cast<const uint4*>(stage + r * TL::kLD + part * TL::kE);
  }
  __syncwarp();
}

// The head's slice of the relative-position table (T entries of column h of the (T, nH) table).
__device__ __forceinline__ void load_table_async(float* tab, const float* rpb, int T, int nH, int h) {
  for (int i = threadIdx.x; i < T; i += kThreads) prim::cp_async<4>(tab + i, rpb + unsigned(i * nH + h));
}

// ---------------------------------------------------------------------------------------------
// Per-pair logits (natural units): x = s * scale + bias; masked pairs -> -inf (a select, as the
// reference's masked_fill: masked pairs never see the score, NaN or not).
// Row side of a pair, hoisted once per tile row.
struct RowInfo {
  int rq;    // byte offset of (table + center) + 4 * table position: + ki.x gives the entry's byte
  int key;   // segment id (-1 padding)
  const float* ab;  // attn_bias row (h, n_local, :)
};

// cen_byte: byte offset of the table's center entry (table_center, or a coords box's center).
template <int BIAS, bool ABIAS>
__device__ __forceinline__ RowInfo row_info(const Geo& G, const Pack& S, int slot, int cen_byte, int h) {
  RowInfo r;
  const int2 q = S.qi[slot];
  r.rq = cen_byte + q.x;
  r.key = q.y;
  r.ab = nullptr;
  if constexpr (ABIAS) r.ab = G.attn_bias + (int64_t(h) * G.N + S.lidx[slot]) * G.N;
  return r;
}

}  // namespace mixkernels::cuda::wattn
