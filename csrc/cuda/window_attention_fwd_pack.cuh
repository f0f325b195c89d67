// Fused window attention forward: the per-pack and per-head staging helpers of window_attention.cu
// (Q/K/V row loads, padding rows, the V check, the table entries a head reads, the one-window layout
// with segments aligned to tiles and each tile's walk).
#pragma once

#include "window_attention_common.cuh"

namespace mixkernels::cuda {
namespace wattn {

// Q, K, V rows of one head (the forward's per-head load): slot r <- token tok[r], 16-byte cp.async.
// Thread t moves chunk t % CPR of rows t / CPR + k * (kThreads / CPR), k < CPR: unrolled, since CPR
// steps cover the 256 slots a pack can hold (no loop, one token lookup per row for the three).
// PAD: slots with tok < 0 inside [0, nrows) (aligned one-window packs) are skipped.
template <typename T, int D, bool PAD>
__device__ __forceinline__ void load_qkv_async(T* dst, size_t tile_stride, const T* base, int C, const int* tok,
                                               int nrows) {
  using TL = Tile<T, D>;
  constexpr int kStep = kThreads / TL::kCPR;
  const int part = threadIdx.x % TL::kCPR, r0 = threadIdx.x / TL::kCPR;
  const uint4* src = reinterpret_cast<const uint4*>(base);
  const unsigned rs = unsigned(3 * C / TL::kE), oc = unsigned(C / TL::kE);
  const size_t ts = tile_stride / sizeof(T);
#pragma unroll
  for (int k = 0; k < TL::kCPR; ++k) {
    const int r = r0 + k * kStep;
    const int t = r < nrows ? tok[r] : -1;
    if (PAD ? t >= 0 : r < nrows) {  // padding slots stay zero
      // 32-bit 16-byte offsets (the binding keeps qkv under 64 GB, i.e. 2^32 chunks): one
      // IMAD.WIDE.U32 per operand instead of 64-bit shifts and adds.
      const unsigned o = unsigned(t) * rs + unsigned(part);
      T* d = dst + r * TL::kLD + part * TL::kE;
      prim::cp_async<16>(d, src + o);
      prim::cp_async<16>(d + ts, src + (o + oc));
      prim::cp_async<16>(d + 2 * ts, src + (o + 2 * oc));
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

// Whether any element of the chunks this thread loaded into rows [0, nrows) of a tile (the map of
// load_qkv_async) is NaN/Inf: x * 0 is NaN exactly for those, one packed FMA per two elements.
template <typename T, int D>
__device__ __forceinline__ bool v_nonfinite(const T* src, int nrows) {
  using TL = Tile<T, D>;
  constexpr int kStep = kThreads / TL::kCPR;
  const int part = threadIdx.x % TL::kCPR, r0 = threadIdx.x / TL::kCPR;
  uint32_t acc = 0;
#pragma unroll
  for (int k = 0; k < TL::kCPR; ++k) {
    const int r = r0 + k * kStep;
    if (r < nrows) {
      const uint4 v = *reinterpret_cast<const uint4*>(src + r * TL::kLD + part * TL::kE);
      acc = prim::fma0_b16x2<T>(v.x, acc);
      acc = prim::fma0_b16x2<T>(v.y, acc);
      acc = prim::fma0_b16x2<T>(v.z, acc);
      acc = prim::fma0_b16x2<T>(v.w, acc);
    }
  }
  return (acc & 0x7fff7fffu) != 0;  // +-0 unless some product was NaN
}

// The table entries a head of the pack reads (BIAS 1: all T), f(i) for each of this thread's. The same
// map loads (cp.async) and then scales (1/scale) an entry. Coords calls: box_entries (window_attention_box.cuh).
template <int BIAS, typename F>
__device__ __forceinline__ void table_entries(const Geo& G, F&& f) {
  if constexpr (BIAS == 1) {
#pragma unroll 1
    for (int i = threadIdx.x; i < G.T; i += kThreads) f(i);
  }
}

// The walk of a one-window pack's tile with key range [lo, hi) (uni: its rows are one segment's),
// stored over the tile's lo/hi/uni once per pack: {b0 + P, end - Q, P << 8 | Q} for the masked prefix
// [b0, b0 + P), unmasked middle and masked suffix [end - Q, end) of [b0, end) = [lo & ~15, round16(hi)).
// Tiles whose rows span segments: all masked. One-segment tiles: only the 16 keys at an end that is not
// 16-aligned need the mask; an end grows to 32 when that leaves the middle an even number of 16-key
// blocks (few 16-key blocks: their fixed cost is that of 32).
__device__ __forceinline__ int3 one_walk(int lo, int hi, bool uni) {
  const int b0 = lo & ~15, end = round16(hi);
  int P = end - b0, Q = 0;
  if (uni) {
    const int L = round16(lo), R = imax(L, hi & ~15), u = (R - L) >> 4;
    P = L - b0;
    Q = end - R;
    if (u & 1) {
      if (P) P += 16; else if (Q) Q += 16;
    } else if (P && Q) {
      if (u) P += 16, Q += 16; else P = 32, Q = 0;  // u = 0: head and tail are one 32-key block
    }
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
// tiles' walks (one_walk) and info[0] (slots in use) / info[1] (tiles) hold the aligned layout, or the
// prologue's.
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
