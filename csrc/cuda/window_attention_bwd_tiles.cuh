// Backward-only helpers of the fused window-attention backward (window_attention_bwd.cu): the
// per-head operand loads, delta = rowsum(dO * O), the shared dS^T matrix of the one-pass plan, and a
// pair's p and dS with its bias-gradient add (pair_grad, table_add, table_add_batch).
// Row loops here are `#pragma unroll 1` on purpose: their trip counts are data-dependent and small
// (3-4 per thread), unrolling only adds peeled copies (code and, for the static report, requests
// counted once per copy) while the cp.async issue already overlaps without it.
#pragma once
#include "window_attention_common.cuh"

namespace mixkernels::cuda::wattn {

// Q, K, V (from qkv), dO and O rows of one head into the five consecutive tiles at dst (tile i at
// dst + i * tile_stride bytes), 16-byte cp.async: one token lookup per row for all five operands.
// qkv/dout/out point at the head's first element; strides in elements; c_off = C (K's offset in qkv).
template <typename T, int D>
__device__ __forceinline__ void load_head_rows(T* dst, size_t tile_stride, const T* qkv, int qkv_stride, int c_off,
                                               const T* dout, const T* out, int o_stride, const int* tok, int nrows) {
  using TL = Tile<T, D>;
  constexpr int kStep = kThreads / TL::kCPR;
  const int part = threadIdx.x % TL::kCPR;
  const uint4* a = reinterpret_cast<const uint4*>(qkv) + part;
  const uint4* b = reinterpret_cast<const uint4*>(dout) + part;
  const uint4* c = reinterpret_cast<const uint4*>(out) + part;
  const unsigned ra = unsigned(qkv_stride / TL::kE), rb = unsigned(o_stride / TL::kE), ck = unsigned(c_off / TL::kE);
  const size_t ts = tile_stride / sizeof(T);
  T* d = dst + (threadIdx.x / TL::kCPR) * TL::kLD + part * TL::kE;
#pragma unroll 1
  for (int r = threadIdx.x / TL::kCPR; r < nrows; r += kStep, d += kStep * TL::kLD) {  // bwd head rows
    const unsigned t = unsigned(tok[r]);
    const uint4* row = a + t * ra;
    prim::cp_async<16>(d, row);
    prim::cp_async<16>(d + ts, row + ck);
    prim::cp_async<16>(d + 2 * ts, row + 2 * ck);
    prim::cp_async<16>(d + 3 * ts, b + t * rb);
    prim::cp_async<16>(d + 4 * ts, c + t * rb);
  }
}

// The head's slice of the relative-position table (T entries of column h of the (T, nH) table),
// load_table_async without the unrolled copies.
__device__ __forceinline__ void load_head_table(float* tab, const float* rpb, int T, int nH, int h) {
#pragma unroll 1
  for (int i = threadIdx.x; i < T; i += kThreads) prim::cp_async<4>(tab + i, rpb + unsigned(i * nH + h));
}

// The warps' work lists of the pack's tiles (all threads, after a barrier that follows the prologue;
// the caller synchronizes before reading them). Tiles ranked by cost (key blocks, then index), each
// rank computed by its own thread of warp 0; rank k goes to warp k % 8 in even rounds of 8 and
// 7 - k % 8 in odd ones (snake order: a round's longest tiles meet the next round's shortest), and to
// position k / 8 of that warp's list (longest first). Warp w's list starts at the closed-form count
// of the tiles of warps before it. Replaces assign_items' serial thread-0 lists in the backward.
__device__ inline void assign_tiles(const Pack& S) {
  const int ntiles = S.info[1], t = threadIdx.x;
  if (t < ntiles) {
    const int c = tile_blocks(S, t);
    int r = 0;
    for (int u = 0; u < ntiles; ++u) {  // bwd tile ranks
      const int cu = tile_blocks(S, u);
      r += cu > c || (cu == c && u < t);
    }
    const int round = r / kWarps, w = (round & 1) ? kWarps - 1 - r % kWarps : r % kWarps;
    const int full = ntiles / kWarps, rem = ntiles % kWarps;
    const int before = full * w + ((full & 1) ? imax(0, w - (kWarps - rem)) : imin(w, rem));
    S.items[before + round] = t;
  }
  if (t <= kWarps) {
    const int full = ntiles / kWarps, rem = ntiles % kWarps;
    S.wbeg[t] = full * t + ((full & 1) ? imax(0, t - (kWarps - rem)) : imin(t, rem));
  }
}

// Two b16 values of a 32-bit word as floats (bf16: the bits shifted into place, exact).
template <typename T>
__device__ __forceinline__ float2 b16x2_to_float2(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  } else {
    const T* h = reinterpret_cast<const T*>(&w);
    return make_float2(to_float(h[0]), to_float(h[1]));
  }
}

// nld[r] = {-lse[r] * log2(e), ndsc * rowsum(dO[r] * O[r])} for rows [0, nvalid), one thread per row
// (nvalid <= cap <= kThreads); lse of row r at nl_raw[2r] (it may alias nld: the row's own thread
// reads it first). 16-byte reads at the tiles' 16-byte-padded pitch: a quarter warp's eight rows hit
// distinct bank groups.
template <typename T, int D>
__device__ __forceinline__ void head_delta(const T* dO, const T* O, const float* nl_raw, float2* nld, int nvalid,
                                           float ndsc) {
  using TL = Tile<T, D>;
  const int r = threadIdx.x;
  if (r >= nvalid) return;
  float acc = 0.f;
#pragma unroll
  for (int part = 0; part < TL::kCPR; ++part) {
    const uint4 a = *reinterpret_cast<const uint4*>(dO + r * TL::kLD + part * TL::kE);
    const uint4 b = *reinterpret_cast<const uint4*>(O + r * TL::kLD + part * TL::kE);
    const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = b16x2_to_float2<T>(aw[e]), y = b16x2_to_float2<T>(bw[e]);
      acc = fmaf(x.y, y.y, fmaf(x.x, y.x, acc));
    }
  }
  nld[r] = make_float2(-nl_raw[2 * r] * kLog2e, acc * ndsc);
}

// store_rows_warp (window_attention_common.cuh) with the copy loop bounded by the tile's valid rows
// instead of a test per chunk: the last tile of a pack (196 = 12 x 16 + 4 rows at window 14) issues
// one 16-byte store step instead of two, and the static report counts the bytes really stored.
template <typename T, int D>
__device__ __forceinline__ void store_rows_bwd(const float (&c)[D / 8][4], float mul, T* stage, T* base, int stride,
                                               const int* tok, int row0, int nvalid, int lane) {
  using TL = Tile<T, D>;
  const int rows = imin(16, nvalid - row0);
  stage_rows_warp<T, D>(c, mul, mul, stage, lane);
  uint4* dst = reinterpret_cast<uint4*>(base);
  const unsigned rs = unsigned(stride / TL::kE);
#pragma unroll 1
  for (int i = lane; i < rows * TL::kCPR; i += 32) {  // bwd valid rows of the tile
    const int r = i / TL::kCPR, part = i - r * TL::kCPR;
    dst[unsigned(tok[row0 + r]) * rs + part] = *reinterpret_cast<const uint4*>(stage + r * TL::kLD + part * TL::kE);
  }
  __syncwarp();
}

// ---- dS^T in shared memory (the one-pass plan: S and dP computed once, in the key pass).
// cap x cap 16-bit values, row = key slot, column = query slot, pitch cap + 8 elements: a row is
// cap/2 + 4 words, an odd multiple of 4 (cap is a multiple of 16), so the 8 rows x 4 words of a
// fragment store and the 8 rows x 16 bytes of an ldmatrix hit 32 distinct banks.
MK_HD int ds_pitch(int cap) { return cap + 8; }
MK_HD size_t ds_bytes(int cap, int es) { return size_t(cap) * size_t(ds_pitch(cap)) * size_t(es); }

// Store the fragment a of a 16 x 16 block (rows = keys, columns = queries q0..) into dS^T: `row` and
// `row8` point at this lane's first column (2t) of its rows g and g + 8 (set once per key tile):
// a[0] (row g, cols 2t..), a[1] (row g+8), a[2] (cols 8+2t..), a[3].
template <typename T>
__device__ __forceinline__ void store_ds_frag(T* row, T* row8, int q0, const uint32_t (&a)[4]) {
  *reinterpret_cast<uint32_t*>(row + q0) = a[0];
  *reinterpret_cast<uint32_t*>(row8 + q0) = a[1];
  *reinterpret_cast<uint32_t*>(row + q0 + 8) = a[2];
  *reinterpret_cast<uint32_t*>(row8 + q0 + 8) = a[3];
}

// The A fragment of the dS block (queries q0..q0+15, keys k0..k0+15) from dS^T: ldmatrix.trans of
// the four 8 x 8 blocks, matrix i = (keys k0 + 8 (i >> 1).., queries q0 + 8 (i & 1)..).
template <typename T>
__device__ __forceinline__ void load_ds_frag(uint32_t (&a)[4], const T* ds, int P, int q0, int k0, int lane) {
  const int i = lane >> 3;
  prim::ldsm_x4_trans(a, ds + (k0 + 8 * (i >> 1) + (lane & 7)) * P + q0 + 8 * (i & 1));
}

// ---- Pairs and the bias gradient (window_attention_bwd.cu's key and query blocks).

// Bias-gradient tables of T + 1 floats per CTA: deterministic mode one per warp (and 32 floats of
// scratch per warp after them); fast mode two-pass one. Fast mode one-pass: one per lane & 3 (the
// lanes of one step of the key pass that share t share the query, so hit distinct entries: no two
// lanes of a step meet on one entry, which in one shared table made most steps retry up to 3 times),
// each interleaved with a copy of the bias table ({gradient, bias} per entry: one address per pair
// for the bias load, the read and the CAS).
MK_HD size_t bwd_tab_floats(int T, bool det, bool one) {
  return det ? size_t(kWarps) * (T + 1 + 32) : size_t(one ? 8 : 1) * (T + 1);
}


// Query side and key side of a pair.
struct QSide {
  unsigned char* qp;  // query pass: the lane's gradient table + 4 * (center + P(query))
  int qo;             // key pass: 4 * P(query) x floats per entry
  int key;
  int2 c;  // coords + (rh-1, rw-1)
  float nl, delta;  // -lse * log2(e), -dsc * rowsum(dO * O) (dsc: see pair_grad)
};
struct KSide {
  int kb;             // query pass: -4 * P(key)
  unsigned char* kp;  // key pass: the lane's gradient table + (4 * (center - P(key))) x floats per entry
  int key;
  int2 c;
};

// The shared-memory pointer p as a value the compilers cannot take apart (an identity shuffle of its
// shared address): an address derived from it by one add stays one add, instead of the pair's offsets
// summed first and the base (uniform, the CTA's shared window) added per use: the shared CAS has no
// register + uniform addressing. Warp-uniform call sites only.
__device__ __forceinline__ unsigned char* opaque_smem(unsigned char* p, int lane) {
#if defined(MIXKERNELS_SIMT_EMU)
  (void)lane;
  return p;
#else
  const unsigned a = __shfl_sync(kFull, static_cast<unsigned>(__cvta_generic_to_shared(p)), lane);
  return static_cast<unsigned char*>(__cvta_shared_to_generic(a));
#endif
}

// p and dS of a pair from its score s and dP, dS times dsc (the one-pass plan folds the softmax scale
// into dS there: dK = dS^T Q and dQ = dS K need no multiply per output, the bias gradient's flush
// divides it out; elsewhere dsc = 1, no multiply); `entry`: its bias-gradient entry (the bias at
// entry + bias_off bytes; zp: the zero entry T), the key pass's (KEY) key pointer + query offset or
// the query pass's query pointer + key offset: one add per pair (the one-pass plan's key pointers
// are opaque_smem, so the compilers cannot fold the pair's add back into the table base).
template <int BIAS, bool MASKED, bool KEY = false, bool IL = false>
__device__ __forceinline__ void pair_grad(float s, float dp, const QSide& q, const KSide& k, float scale,
                                          float dsc, int bias_off, unsigned char* zp, int rh2, int rw2, float& p,
                                          float& ds, unsigned char*& entry) {
  float b = 0.f;
  entry = zp;
  if constexpr (BIAS != 0) {
    if constexpr (BIAS == 2) {
      const bool in = static_cast<unsigned>(q.c.x - k.c.x) < static_cast<unsigned>(rh2) &&
                      static_cast<unsigned>(q.c.y - k.c.y) < static_cast<unsigned>(rw2);
      entry = in ? (KEY ? k.kp + q.qo : q.qp + k.kb) : zp;
    } else {
      entry = KEY ? k.kp + q.qo : q.qp + k.kb;
    }
    b = IL ? prim::lds_at<4>(entry) : *reinterpret_cast<const float*>(entry + bias_off);
  }
  float x = fmaf(s, scale, b);
  if constexpr (MASKED) x = q.key == k.key ? x : -INFINITY;
  p = prim::ex2(fmaf(x, kLog2e, q.nl));
  ds = p * fmaf(dp, dsc, q.delta);
  if constexpr (MASKED) ds = q.key == k.key ? ds : 0.f;  // masked_fill's gradient: exactly 0
}

// Add v to the table entry at byte `entry`. Fast: shared-memory atomic into the CTA's table (a CAS
// loop on sm_80/sm_90: there is no shared fp32 add; masked pairs add their exact 0 instead of a
// test and branch per pair).
// Deterministic: all 32 lanes call; lanes with equal entries are summed in lane order by the lowest
// one, which then updates the warp's own table (distinct leaders, distinct entries).
template <bool DET>
__device__ __forceinline__ void table_add(unsigned char* entry, float v, float* scratch, int lane) {
  if constexpr (DET) {  // (entries of one table: equal low 32 bits <=> equal pointers)
    const unsigned same = __match_any_sync(kFull, static_cast<unsigned>(reinterpret_cast<uintptr_t>(entry)));
    scratch[lane] = v;
    __syncwarp();
    if (lane == __ffs(static_cast<int>(same)) - 1) {
      float sum = 0.f;
      for (unsigned m = same; m; m &= m - 1) sum += scratch[__ffs(static_cast<int>(m)) - 1];
      *reinterpret_cast<float*>(entry) += sum;
    }
    __syncwarp();
  } else {
    atomicAdd(reinterpret_cast<float*>(entry), v);
  }
}

// Fast mode, the key pass's N pairs of one block: first tries of all N back to back (no branch and
// no reconvergence per pair, unlike atomicAdd's CAS loop), then warp-wide rounds retrying what did not
// land (lanes of one step hitting one entry, or another warp in between) until every add landed.
template <int N>
__device__ __forceinline__ void table_add_batch(unsigned char* const (&entry)[N], const float (&v)[N]) {
  unsigned o[N], r[N], miss = 0;  // try i landed iff r[i] == o[i]
#pragma unroll
  for (int i = 0; i < N; ++i) {
    unsigned* p = reinterpret_cast<unsigned*>(entry[i]);
    o[i] = *static_cast<volatile unsigned*>(p);
    r[i] = atomicCAS(p, o[i], __float_as_uint(__uint_as_float(o[i]) + v[i]));
    miss |= r[i] ^ o[i];
  }
#pragma unroll 1
  while (__any_sync(kFull, miss != 0)) {  // bwd drpb retry rounds
    miss = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (r[i] != o[i]) {
        unsigned* p = reinterpret_cast<unsigned*>(entry[i]);
        o[i] = *static_cast<volatile unsigned*>(p);
        r[i] = atomicCAS(p, o[i], __float_as_uint(__uint_as_float(o[i]) + v[i]));
      }
      miss |= r[i] ^ o[i];
    }
  }
}

}  // namespace mixkernels::cuda::wattn
