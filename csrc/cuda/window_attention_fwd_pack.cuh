// Fused window attention forward: the per-pack and per-head staging helpers of window_attention_fwd.cuh
// (Q/K/V row loads, padding rows, the V check, the table entries a head reads, the one-window layout
// with segments aligned to tiles and each tile's walk).
#pragma once

#include "window_attention_common.cuh"

namespace mixkernels::cuda {
namespace wattn {

// The forward's per-head row map: two threads per slot, slots t / 2 and t / 2 + 128 of thread t (the 256
// a pack can hold), thread t taking 16-byte chunks t % 2 + 2j, j < CPR / 2, of each: a lane pair covers
// one 32-byte sector per instruction, and a thread's chunks of a row are 32 bytes apart (immediate
// offsets from one address per operand).
constexpr int kRowStep = kThreads / 2;

// Q, K, V rows of one head (the forward's per-head load): slot r <- token tok[r], 16-byte cp.async in
// the map above: unrolled, one token lookup and one global address per row and operand (was one per
// 16-byte chunk: a thread per chunk).
// PAD: slots with tok < 0 inside [0, nrows) (aligned one-window packs) are skipped.
template <typename T, int D, bool PAD>
__device__ __forceinline__ void load_qkv_async(T* dst, size_t tile_stride, const T* base, int C, const int* tok,
                                               int nrows) {
  using TL = Tile<T, D>;
  static_assert(TL::kCPR % 2 == 0, "two threads per row");
  const int half = threadIdx.x & 1, r0 = threadIdx.x >> 1;
  const uint4* src = reinterpret_cast<const uint4*>(base);
  const unsigned rs = unsigned(3 * C / TL::kE), oc = unsigned(C / TL::kE);
  const size_t ts = tile_stride / sizeof(T);
#pragma unroll
  for (int k = 0; k < kThreads / kRowStep; ++k) {
    const int r = r0 + k * kRowStep;
    const int t = r < nrows ? tok[r] : -1;
    if (PAD ? t >= 0 : r < nrows) {  // padding slots stay zero
      // 32-bit 16-byte offsets (the binding keeps qkv under 64 GB, i.e. 2^32 chunks): one
      // IMAD.WIDE.U32 per operand instead of 64-bit shifts and adds.
      const unsigned o = unsigned(t) * rs + unsigned(half);
      T* d = dst + r * TL::kLD + half * TL::kE;
#pragma unroll
      for (int op = 0; op < 3; ++op) {
        const uint4* s = src + (o + unsigned(op) * oc);
#pragma unroll
        for (int j = 0; j < TL::kCPR / 2; ++j) prim::cp_async<16>(d + op * ts + 2 * j * TL::kE, s + 2 * j);
      }
    }
  }
}

// Zero the padding rows (tok < 0) in [first, cap) of ntiles tiles tile_bytes apart (all operand
// tiles: their rows must be finite, probability 0 times them).
template <typename T, int D>
__device__ __forceinline__ void zero_padding(T* tile0, int ntiles, size_t tile_bytes, const int* tok, int first,
                                             int cap) {
  using TL = Tile<T, D>;
  const int part = threadIdx.x % TL::kCPR;
  for (int r = first + threadIdx.x / TL::kCPR; r < cap; r += kThreads / TL::kCPR) {
    if (tok[r] >= 0) continue;
    unsigned char* row = reinterpret_cast<unsigned char*>(tile0 + r * TL::kLD + part * TL::kE);
#pragma unroll 1
    for (int k = 0; k < ntiles; ++k) *reinterpret_cast<uint4*>(row + k * tile_bytes) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Whether V needs the exact path: some element of the chunks this thread loaded into rows [0, nrows) of a
// tile (the map of load_qkv_async) is NaN/Inf or, bf16, so large that the fixed-reference sums could
// overflow. fp16: x * 0 is NaN exactly for NaN/Inf (finite fp16 |v| < 2^16 and p <= 2^15 keep O finite);
// bf16: the sum of squares (non-negative: no cancellation) is Inf/NaN iff some x is, or |x| >~ 2^62
// (below that, |O| <= l max|v| <= 2^32 * 2^64 is finite). One packed FMA per two elements either way.
template <typename T, int D>
__device__ __forceinline__ bool v_unsafe(const T* src, int nrows) {
  using TL = Tile<T, D>;
  constexpr bool kBf = std::is_same<T, __nv_bfloat16>::value;
  const int half = threadIdx.x & 1, r0 = threadIdx.x >> 1;
  uint32_t acc = 0;
#pragma unroll
  for (int k = 0; k < kThreads / kRowStep; ++k) {
    const int r = r0 + k * kRowStep;
    if (r < nrows) {
#pragma unroll
      for (int j = 0; j < TL::kCPR / 2; ++j) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + r * TL::kLD + (half + 2 * j) * TL::kE);
        acc = prim::fma_b16x2<T>(v.x, kBf ? v.x : 0u, acc);
        acc = prim::fma_b16x2<T>(v.y, kBf ? v.y : 0u, acc);
        acc = prim::fma_b16x2<T>(v.z, kBf ? v.z : 0u, acc);
        acc = prim::fma_b16x2<T>(v.w, kBf ? v.w : 0u, acc);
      }
    }
  }
  if constexpr (kBf) {  // a half's exponent all ones: Inf or NaN
    const uint32_t e = acc & 0x7f807f80u;
    return (e & 0xffffu) == 0x7f80u || (e >> 16) == 0x7f80u;
  } else {
    return (acc & 0x7fff7fffu) != 0;  // +-0 unless some product was NaN
  }
}

// The head's whole table (BIAS 1), scaled to units of 1/scale on the way in: plain loads, four per
// thread in flight (T < 4 kThreads whenever the window fits a CTA: (2rh-1)(2rw-1) < 4 rh rw <= 4N), then
// the products stored; no cp.async and no second pass over shared memory. Published by a barrier.
// Loads past T read entry T - 1 instead (unpredicated, never stored).
__device__ __forceinline__ void load_table_scaled(float* tb, const float* rpb, int T, int nH, int h, float inv) {
#pragma unroll 1
  for (int e0 = threadIdx.x; e0 < T; e0 += 4 * kThreads) {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __ldg(rpb + unsigned(imin(e0 + k * kThreads, T - 1) * nH + h));
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (e0 + k * kThreads < T) tb[e0 + k * kThreads] = v[k] * inv;
  }
}

// The walk of a one-window pack's tile with key range [lo, hi) (uni: its rows are one segment's),
// stored over the tile's lo/hi/uni once per pack: {b0 + P, end - Q, P << 8 | Q} for the masked prefix
// [b0, b0 + P), unmasked middle and masked suffix [end - Q, end) of [b0, end) = [lo & ~15, round16(hi)).
// Tiles whose rows span segments: all masked. One-segment tiles: only the 16 keys at an end that is not
// 16-aligned need the mask; an end grows to 32 when that leaves the middle an even number of 16-key
// blocks (few 16-key blocks: their fixed cost is that of 32). A last 16 keys holding 1..8 of the
// segment's end in 8 instead (Q = 8, or 24: 16 + 8; the walk ends at round8(hi)): half its pairs, and
// an odd middle then takes an unmasked 16-key block rather than growing the end to 32.
// Walks stored in S.uni: P << 8 | Q (P < 2^16, Q < 256), plus align_segments' unit flags: the first and
// second tile of a pair (fwd_unit: two consecutive tiles of one segment walked together).
constexpr int kWalkP = 0xffff, kPairHead = 1 << 24, kPairTail = 1 << 25;

__device__ __forceinline__ int3 one_walk(int lo, int hi, bool uni) {
  const int b0 = lo & ~15;
  int end = round16(hi);
  int P = end - b0, Q = 0;
  if (uni) {
    const int L = round16(lo), R = imax(L, hi & ~15), u = (R - L) >> 4;
    const bool eight = unsigned((hi & 15) - 1) < 8u;  // the segment's last 16-key block holds 1..8 keys
    P = L - b0;
    Q = end - R;
    if (u & 1) {
      if (P) P += 16; else if (Q && !eight) Q += 16;
    } else if (P && Q) {
      if (u) P += 16, Q += 16; else P = 32, Q = 0;  // u = 0: head and tail are one 32-key block
    }
    if (eight && Q) Q -= 8, end -= 8;
  }
  return make_int3(b0 + P, end - Q, P << 8 | Q);
}

__device__ __forceinline__ void set_walk(const Pack& S, int t, int lo, int hi, bool uni) {
  const int3 w = one_walk(lo, hi, uni);
  S.lo[t] = w.x;
  S.hi[t] = w.y;
  S.uni[t] = w.z;
}

// One-window packs: move every segment to a slot that is a multiple of 16 (padding slots, tok = -1,
// between segments) when the pack still fits in cap slots. No 16-row tile then spans two segments:
// each tile walks only its own segment's keys, masked only in the last 16 (the padding). Packs of
// several windows, or whose rounded segments do not fit, stay as the prologue sorted them.
// All threads; after the prologue's tiles are published (a barrier), before the operand buffers are
// used (`scratch`: kWarps + kThreads ints of them). On return (before the caller's barrier) the slots,
// tiles' walks (one_walk; aligned: with the pair flags kPairHead / kPairTail) and info[0] (slots in use) /
// info[1] (tiles) hold the aligned layout, or the prologue's.
__device__ __forceinline__ void align_segments(const Geo& G, const Pack& S, int nvalid, int* scratch) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int2 seg = make_int2(0, 0);
  if (tid < nvalid) seg = S.seg[tid];
  const int size = seg.y - seg.x;
  const int pad = tid < nvalid && seg.x == tid ? round16(size) - size : 0;  // once per segment, at its head
  int incl = pad;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(kFull, incl, o);
    incl += lane >= o ? v : 0;
  }
  int* wsum = scratch;
  int* shift = scratch + kWarps;
  if (lane == 31) wsum[warp] = incl;
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int v = 0; v < kWarps; ++v) {
    const int w = wsum[v];
    before += v < warp ? w : 0;
    total += w;
  }
  if (G.P != 1 || nvalid + total > G.cap) {  // block-uniform: the prologue's layout stays
    if (tid < S.info[1]) set_walk(S, tid, S.lo[tid], S.hi[tid], S.uni[tid] != 0);
    return;
  }
  shift[tid] = before + incl - pad;  // read at segment heads: the padding of the segments before
  __syncthreads();
  int tok = -1, lidx = 0, lrow = 0, d = 0;
  int2 qi = make_int2(0, -1), ki = make_int2(0, -2), cxy = make_int2(0, 0);
  if (tid < nvalid) {
    d = shift[seg.x];
    tok = S.tok[tid], lidx = S.lidx[tid], lrow = S.lrow[tid];
    qi = S.qi[tid], ki = S.ki[tid], cxy = S.cxy[tid];
  }
  __syncthreads();  // every slot read
  if (tid < G.cap) {  // padding everywhere first (the prologue's padding entries)
    S.tok[tid] = -1;
    S.qi[tid] = make_int2(0, -1);
    S.ki[tid] = make_int2(0, -2);
    S.lidx[tid] = 0;
    S.lrow[tid] = 0;
    S.cxy[tid] = make_int2(0, 0);
    S.seg[tid] = make_int2(tid, tid + 1);
  }
  __syncthreads();
  if (tid < nvalid) {
    const int p = tid + d;
    S.tok[p] = tok;
    S.qi[p] = qi;
    S.ki[p] = ki;
    S.lidx[p] = lidx;
    S.lrow[p] = lrow;
    S.cxy[p] = cxy;
    S.seg[p] = make_int2(seg.x + d, seg.y + d);
  }
  __syncthreads();
  const int used = nvalid + total;
  if (tid < used / 16) {  // slot 16 * tid is a token of the tile's segment (segments start at tiles)
    const int2 sg = S.seg[16 * tid];
    set_walk(S, tid, sg.x, sg.y, true);  // padding rows join the segment's tile: never stored
    // the segment's tiles in pairs from its first; an odd last one stays single
    const int k = tid - sg.x / 16, n = round16(sg.y - sg.x) / 16;
    S.uni[tid] |= (k & 1) ? kPairTail : (k + 1 < n ? kPairHead : 0);
  }
  if (tid == 0) {
    S.info[0] = used;
    S.info[1] = used / 16;
  }
}


// ---------------------------------------------------------------------------------------------
// Pack plans. With a batch-shared layout (no group labels or batch-shared ones, no coords or
// batch-shared ones) and whole packs per image (windows per image % P == 0), pack p's slots and
// tiles are those of pack p % (packs per image) of image 0, with tok moved by image * H*W and lrow
// by image * nW*nH*N: the plan kernel builds each position's once (prologue, align_segments) and
// stores the pack arrays [0, L.tab) of shared memory as they are, image-relative; the forward copies
// its position's (load_plan) instead of running the prologue per CTA (coords: then its box, pack_box).

// Dynamic shared memory of the plan kernel: the pack arrays, then the prologue's scratch.
MK_HD size_t plan_smem_bytes(const Layout& L) { return L.tab + prologue_scratch_bytes(); }

// One CTA (kThreads) per pack position of image 0; plan: positions x L.tab / 16 chunks.
template <bool COORDS, bool ONE>
__global__ void __launch_bounds__(kThreads) wattn_fwd_plan_kernel(const Geo G, const Layout L, int4* plan) {
  MK_DYNAMIC_SMEM(smem);
  const Pack S(smem, L);
  const int pack = blockIdx.x;  // < packs per image: image 0's
  unsigned char* scratch = smem + L.tab;
  // the forward's own sequence (fwd_pack without a plan) up to its first use of the slots; the coords
  // box comes after, per pack, in fwd_pack (pack_box reads the slots' coordinates, stored here)
  prologue<COORDS>(G, pack, S, scratch);
  __syncthreads();
  if constexpr (ONE) {
    align_segments(G, S, imin(G.P, G.nwin - pack * G.P) * G.N, reinterpret_cast<int*>(scratch));
    __syncthreads();
  }
  const int n = int(L.tab / 16);
  const int4* src = reinterpret_cast<const int4*>(smem);
  int4* dst = plan + size_t(pack) * size_t(n);
  for (int c = threadIdx.x; c < n; c += kThreads) dst[c] = src[c];
}

// The forward's copy of its position's plan `src` (L.tab / 16 chunks) into shared memory by cp.async,
// then tok (padding -1 kept) plus tok0 and lrow plus lrow0: the image's first token and lse row. All
// threads; ends with a barrier (no cp.async left pending). Two plain loops: the static count and the
// issue slots see no per-chunk branch.
__device__ __forceinline__ void load_plan(unsigned char* smem, const Layout& L, const Pack& S, int cap,
                                          const int4* src, int tok0, int lrow0) {
  const int n = int(L.tab / 16);
  int4* dst = reinterpret_cast<int4*>(smem);
  for (int c = threadIdx.x; c < n; c += kThreads) prim::cp_async<16>(dst + c, src + c);
  prim::cp_async_commit();
  prim::cp_async_wait<0>();
  __syncthreads();
  if (threadIdx.x < cap) {  // kThreads >= cap: one slot per thread
    const int t = S.tok[threadIdx.x];
    S.tok[threadIdx.x] = t >= 0 ? t + tok0 : t;
    S.lrow[threadIdx.x] += lrow0;
  }
  __syncthreads();
}

}  // namespace wattn
}  // namespace mixkernels::cuda
