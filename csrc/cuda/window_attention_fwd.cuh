// Fused mask-aware window attention, forward (CUDA C++): the kernels and their launch per (dtype,
// head_dim), launch_forward, instantiated one (dtype, head_dim) per translation unit
// (window_attention_fwd_<dtype>_d<D>.cu) so that a build compiles them in parallel; the host
// plan and the dispatch are window_attention.cu's.
//
//
// One CTA (8 warps) per (pack of windows, group of heads), head-group fastest so that the CTAs
// reading one token row run together; coords calls: per range of (pack, head) items, several packs
// (items_per_cta). The CTA sorts its pack's tokens by attention segment once
// (window_attention_common.cuh; or copies the layout of its pack position, built once per call by the
// plan kernel when it is batch-shared: window_attention_fwd_pack.cuh), then loops over its heads: Q, K, V rows of the next head stream
// in with cp.async (two buffers when they fit) while the warps work on the current one; coords calls
// load only the table entries the pack's coordinate box can reach, into box-local tables
// (window_attention_box.cuh: two CTAs per SM at UM-MAE, and no range test per pair; packs whose box
// exceeds the plan's budget run the exact path on the whole table). Warps take the 16-row query tiles
// round-robin, and each walks only the key blocks of its rows'
// segments: 32 keys per step (16 at the end), scores on the tensor cores, bias from the head's
// table slice in shared memory at one add per pair, a mask compare only in blocks that straddle
// a segment boundary, online softmax in fp32 with the max in natural units and exp2 folded into
// one FFMA, P rounded to the input type for P@V. One-window packs (window 14) sum against a fixed
// per-row reference instead (fwd_unit: a probe of the segment's first keys; the online walk again
// for a unit (one or two tiles) whose check fails). O leaves through the warp's own Q rows with
// 16-byte stores, plus the fp32 lse for the backward. Every input byte is read once.
//
// NaN/Inf: scores, biases and masks follow the reference as they are (masked pairs are -inf by
// select). Only non-finite V can reach a row through a *masked* key (0 * Inf = NaN in the
// reference's P @ V); a head whose V holds any (or, bf16, |v| >~ 2^62, which p <= 2^32 of a fixed
// reference could overflow) is recomputed exactly, one row per thread.
// A row whose allowed keys are all -inf gives NaN (l = 0), as the reference does.
#pragma once

#include "window_attention_box.cuh"
#include "window_attention_common.cuh"
#include "window_attention_cosine.cuh"
#include "window_attention_fwd_pack.cuh"

namespace mixkernels::cuda {
namespace wattn {

struct FwdArgs {
  Geo g;
  Layout L;  // computed once on the host
  void* out;
  float* lse;
  float inv_scale;  // 1 / scale: biases are kept in units of 1/scale (they start the score accumulators)
  int ipc, nbuf;  // items (pack, head) per CTA (a contiguous range, pack-major), operand buffers
  int tmax;       // coords calls: entries of the box tables (the layout's tables), window_attention_box.cuh
  const int4* plan;  // PLAN: the pack positions' plans (wattn_fwd_plan_kernel), L.tab bytes each
  int ppi;           // PLAN: packs per image (positions)
};

// Bias of the pair in units of 1/scale: the table slice in shared memory holds entries times
// 1/scale (scale_table); attn_bias is scaled here. Coords calls read box tables (pack_box) whose
// out-of-range entries hold 0: one entry per pair and no range test, as with the plain table.
template <int BIAS, bool ABIAS>
__device__ __forceinline__ float bias_scaled(const RowInfo& r, int2 k, int kl, const unsigned char* smem, float inv) {
  float b = 0.f;
  if constexpr (BIAS != 0) b = *reinterpret_cast<const float*>(smem + (r.rq + k.x));
  if constexpr (ABIAS) b = fmaf(__ldg(r.ab + kl), inv, b);
  return b;
}

// Scores of the block's 8*NT keys at kb in units of 1/scale for R row tiles (the forward's pair units:
// R = 2, one segment's; each key's info and K fragment loaded once for both): the bias (kept that way in
// shared memory) starts the accumulators, the tensor cores add q.k (the scale is applied once, in the
// exponent's FFMA); kseg: the keys' {-4P, segment} for the mask.
template <typename T, int D, int BIAS, bool ABIAS, int NT, int R>
__device__ __forceinline__ void block_scores(const Geo& G, const Pack& S, const AFrag<T, D> (&qa)[R],
                                             const RowInfo (&ri)[R][2], const T* sk, int kb,
                                             const unsigned char* smem, float inv, float (&s)[R][NT][4],
                                             int2 (&kseg)[NT][2], int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int k0 = kb + 8 * j + 2 * t;
    const int4 kk = prim::lds_v4(S.ki + k0);  // keys k0, k0+1: {-4P, segment}, one LDS.128
    int2 kl = make_int2(0, 0);
    if constexpr (ABIAS) kl = *reinterpret_cast<const int2*>(S.lidx + k0);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int2 ke = e ? make_int2(kk.z, kk.w) : make_int2(kk.x, kk.y);
      kseg[j][e] = ke;
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
          s[u][j][2 * rr + e] = bias_scaled<BIAS, ABIAS>(ri[u][rr], ke, e ? kl.y : kl.x, smem, inv);
    }
  }
  scores_add_rows<T, D, NT, R>(s, qa, sk + kb * LD, lane);
}

// The rows' fixed reference for a walk without a running max: their largest score (units of 1/scale)
// over the 8 keys at kb (a probe: the first keys of a one-window pack tile's segment), masked; -inf
// where none is allowed there.
template <typename T, int D, int BIAS, bool ABIAS, int R>
__device__ __forceinline__ void fwd_probe(const Geo& G, const Pack& S, const AFrag<T, D> (&qa)[R],
                                          const RowInfo (&ri)[R][2], const T* sk, int kb,
                                          const unsigned char* smem, float inv, float (&m)[R][2], int lane) {
  float s[R][1][4];
  int2 kseg[1][2];
  block_scores<T, D, BIAS, ABIAS, 1, R>(G, S, qa, ri, sk, kb, smem, inv, s, kseg, lane);
#pragma unroll
  for (int u = 0; u < R; ++u)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int e = 0; e < 2; ++e) mx = fmaxf(mx, ri[u][rr].key == kseg[0][e].y ? s[u][0][2 * rr + e] : -INFINITY);
      m[u][rr] = quad_max(mx);
    }
}

// One key block for R row tiles. FIRST: the tiles' first block (m = -inf, l = 0, O = 0: nothing to
// rescale). FIXED: against a fixed per-row reference (m holds the exponent base -ref * scale * log2 e):
// no row max, no rescale.
template <typename T, int D, int BIAS, bool ABIAS, int NT, bool MASKED, bool FIRST, bool FIXED, int R>
__device__ __forceinline__ void fwd_block(const Geo& G, const Pack& S, const AFrag<T, D> (&qa)[R],
                                          const RowInfo (&ri)[R][2], const T* sk, const T* sv, int kb,
                                          const unsigned char* smem, float inv, float (&m)[R][2], float (&l)[R][2],
                                          float (&o)[R][D / 8][4], int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const float c = G.scale * kLog2e;  // logits are s * scale; exp2 units
  float s[R][NT][4];
  int2 kseg[NT][2];
  block_scores<T, D, BIAS, ABIAS, NT, R>(G, S, qa, ri, sk, kb, smem, inv, s, kseg, lane);
  if constexpr (FIXED) {
#pragma unroll
    for (int u = 0; u < R; ++u)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[u][j][e];
          if constexpr (MASKED) x = ri[u][e >> 1].key == kseg[j][e & 1].y ? x : -INFINITY;
          const float p = prim::ex2(fmaf(x, c, m[u][e >> 1]));
          l[u][e >> 1] += p;
          s[u][j][e] = p;
        }
  } else {
    float nb[R][2];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      bool moved = false;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float x = s[u][j][2 * rr + e];
            if constexpr (MASKED) x = ri[u][rr].key == kseg[j][e].y ? x : -INFINITY;
            s[u][j][2 * rr + e] = x;
            mx[rr] = fmaxf(mx[rr], x);  // scale > 0 (launcher): the same order as the logits
          }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float mn = fmaxf(m[u][rr], quad_max(mx[rr]));
        moved |= mn != m[u][rr];
        // A row with nothing allowed so far keeps base 0 so that exp(-inf - base) = 0, not NaN.
        nb[u][rr] = -(mn == -INFINITY ? 0.f : mn) * c;
        mx[rr] = mn;
      }
      // Rescale O and l only when some row's max moved (after the first blocks it rarely does).
      if (!FIRST && __any_sync(kFull, moved)) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const float alpha = prim::ex2(fmaf(m[u][rr], c, nb[u][rr]));
          l[u][rr] *= alpha;
#pragma unroll
          for (int dj = 0; dj < D / 8; ++dj) {
            o[u][dj][2 * rr] *= alpha;
            o[u][dj][2 * rr + 1] *= alpha;
          }
        }
      }
      m[u][0] = mx[0];
      m[u][1] = mx[1];
    }
#pragma unroll
    for (int u = 0; u < R; ++u)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = prim::ex2(fmaf(s[u][j][e], c, nb[u][e >> 1]));
          l[u][e >> 1] += p;
          s[u][j][e] = p;
        }
  }
  accum_rows<T, D, NT, R>(o, s, sv + kb * LD, lane);
}

// A warp's 16 x D O tile (rows g times mul0, rows g+8 times mul1) through its staging rows (pitch LD) to
// the global rows of tok[g], tok[g+8] (stride C elements): lane (g, t) stores 16-byte chunks t, t+4, ..
// of its own two rows, those with `stored` (the tile's rows told apart from padding once, at its start).
template <typename T, int D>
__device__ __forceinline__ void store_tile(const float (&o)[D / 8][4], float mul0, float mul1, T* stage, T* out, int C,
                                           const int* tok, const bool (&stored)[2], int lane) {
  using TL = Tile<T, D>;
  stage_rows_warp<T, D>(o, mul0, mul1, stage, lane);
  const int g = lane >> 2, t = lane & 3;
  uint4* dst = reinterpret_cast<uint4*>(out);
  const unsigned rs = unsigned(C / TL::kE);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (!stored[rr]) continue;
    const int r = g + 8 * rr;
    const unsigned row = unsigned(tok[r]) * rs;  // 32-bit 16-byte offsets, as the loads
#pragma unroll
    for (int k = 0; k < (TL::kCPR + 3) / 4; ++k) {
      const int c = t + 4 * k;
      if (TL::kCPR % 4 == 0 || c < TL::kCPR)
        dst[row + unsigned(c)] = *reinterpret_cast<const uint4*>(stage + r * TL::kLD + c * TL::kE);
    }
  }
  __syncwarp();
}

// A 16-row query tile's rows: Q fragments, row info, and which rows are stored (the rest: padding,
// never checked or stored). ONE: one-window packs (align_segments' layout: padding slots between
// segments). No __syncwarp here: store_tile ended the warp's previous tile with one, and qa.load's
// ldmatrix is .aligned (a converged warp) anyway.
template <typename T, int D, int BIAS, bool ABIAS, bool ONE>
__device__ __forceinline__ void tile_rows(const Geo& G, const Pack& S, int tile, int h, const T* sq, int cen_byte,
                                          AFrag<T, D>& qa, RowInfo (&ri)[2], bool (&stored)[2], int lane) {
  const int g = lane >> 2, r0 = 16 * tile, rows = S.info[0];  // slots in use (padding: tok < 0)
  qa.load(sq + r0 * Tile<T, D>::kLD, lane);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int q = r0 + g + 8 * rr;
    ri[rr] = row_info<BIAS, ABIAS>(G, S, q, cen_byte, h);
    stored[rr] = q < rows && (!ONE || S.tok[q] >= 0);
  }
}

// A tile's epilogue: the fp32 lse and the O rows (o / l) through the warp's staging rows (the tile's Q
// rows in sq), for the stored rows.
template <typename T, int D>
__device__ __forceinline__ void fwd_finish(const FwdArgs& A, const Pack& S, int tile, int h, T* sq, const float (&m)[2],
                                           const float (&l)[2], const float (&o)[D / 8][4], const bool (&stored)[2],
                                           int lane) {
  const Geo& G = A.g;
  const int g = lane >> 2, r0 = 16 * tile;
  float lse[2], inv[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    // l = 0 only when every allowed key is -inf: 0 * rcp(0) = NaN, lse = -inf (the reference's).
    inv[rr] = prim::rcp(l[rr]);
    lse[rr] = (m[rr] == -INFINITY ? 0.f : m[rr]) * G.scale + prim::lg2(l[rr]) * kLn2;
  }
  if ((lane & 3) < 2) {  // every lane of a quad holds both rows' lse: lane t = 0 stores row g, t = 1 row g + 8
    const bool r8 = (lane & 1) != 0;
    if (r8 ? stored[1] : stored[0]) A.lse[S.lrow[r0 + g + (r8 ? 8 : 0)] + h * G.N] = r8 ? lse[1] : lse[0];
  }
  store_tile<T, D>(o, inv[0], inv[1], sq + r0 * Tile<T, D>::kLD, static_cast<T*>(A.out) + h * D, G.C, S.tok + r0,
                   stored, lane);
}

// One 16-row query tile of head h in a pack of several windows (tiles span windows: mostly masked
// blocks): O rows and lse. One walk, the block kind chosen per block: blocks of 32 keys, then one of
// 16 at the end; a block inside one segment needs no mask.
template <typename T, int D, int BIAS, bool ABIAS>
__device__ __forceinline__ void fwd_tile(const FwdArgs& A, const Pack& S, int tile, int h, T* sq, const T* sk,
                                         const T* sv, int cen_byte, const unsigned char* smem, int lane) {
  const Geo& G = A.g;
  AFrag<T, D> qa[1];
  RowInfo ri[1][2];
  bool stored[2];
  tile_rows<T, D, BIAS, ABIAS, false>(G, S, tile, h, sq, cen_byte, qa[0], ri[0], stored, lane);
  // Bounds broadcast from lane 0: warp-uniform for the compiler too (no divergence-safe shuffles).
  const int lo = __shfl_sync(kFull, S.lo[tile], 0), hi = __shfl_sync(kFull, S.hi[tile], 0);
  const bool uni = __shfl_sync(kFull, S.uni[tile], 0) != 0;
  float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
  float o[1][D / 8][4];
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) o[0][dj][0] = o[0][dj][1] = o[0][dj][2] = o[0][dj][3] = 0.f;
  const int end = round16(hi);
  auto step = [&](auto nt, auto first, int kb) {
    constexpr int NT = decltype(nt)::value;
    constexpr bool F = decltype(first)::value;
    if (uni && kb >= lo && kb + 8 * NT <= hi)
      fwd_block<T, D, BIAS, ABIAS, NT, false, F, false, 1>(G, S, qa, ri, sk, sv, kb, smem, A.inv_scale, m, l, o, lane);
    else
      fwd_block<T, D, BIAS, ABIAS, NT, true, F, false, 1>(G, S, qa, ri, sk, sv, kb, smem, A.inv_scale, m, l, o, lane);
  };
  using Four = std::integral_constant<int, 4>;
  using Two = std::integral_constant<int, 2>;
  // The first block is peeled (no rescale); a 16-key block can only be the last.
  int kb = lo & ~15;  // < end: every tile has a key
  if (kb + 32 <= end)
    step(Four{}, std::true_type{}, kb);
  else
    step(Two{}, std::true_type{}, kb);
  for (kb += 32; kb < end; kb += 32) {
    if (kb + 32 <= end)
      step(Four{}, std::false_type{}, kb);
    else
      step(Two{}, std::false_type{}, kb);
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) l[0][rr] = quad_sum(l[0][rr]);
  fwd_finish<T, D>(A, S, tile, h, sq, m[0], l[0], o[0], stored, lane);
}

// A unit of a one-window pack (align_segments' layout): the R consecutive 16-row tiles from `tile`, all
// of one segment (R = 2: a pair, sharing its walk, each key block's key info and K/V fragments, and the
// loop steps; R = 1: a segment's odd last tile, or any tile where pairs are off), head h: O rows and lse.
// EIGHT: 8-key tail blocks (one_walk's Q = 8, 24) in their own loop; else the masked 16-key loop takes
// them at end - 8 (keys past end: padding or other segments' slots, masked, below cap): the cosine
// kernels, where the extra loop spills a few registers.
template <typename T, int D, int BIAS, bool ABIAS, bool EIGHT, int R>
__device__ __forceinline__ void fwd_unit(const FwdArgs& A, const Pack& S, int tile, int h, T* sq, const T* sk,
                                         const T* sv, int cen_byte, const unsigned char* smem, int lane) {
  const Geo& G = A.g;
  AFrag<T, D> qa[R];
  RowInfo ri[R][2];
  bool stored[R][2];
#pragma unroll
  for (int u = 0; u < R; ++u) tile_rows<T, D, BIAS, ABIAS, true>(G, S, tile + u, h, sq, cen_byte, qa[u], ri[u], stored[u], lane);
  // The unit's walk (one_walk, computed once per pack; the same for every tile of a segment), broadcast
  // from lane 0: warp-uniform for the compiler too.
  const int lo = __shfl_sync(kFull, S.lo[tile], 0), hi = __shfl_sync(kFull, S.hi[tile], 0);
  const int un = __shfl_sync(kFull, S.uni[tile], 0);
  float m[R][2], l[R][2], o[R][D / 8][4], nb[R][2];
  auto reset = [&]() {
#pragma unroll
    for (int u = 0; u < R; ++u) {
      m[u][0] = m[u][1] = -INFINITY;
      l[u][0] = l[u][1] = 0.f;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) o[u][dj][0] = o[u][dj][1] = o[u][dj][2] = o[u][dj][3] = 0.f;
    }
  };
  reset();
  using Eight = std::integral_constant<int, 8>;
  using Four = std::integral_constant<int, 4>;
  using Two = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  // The walk (one_walk): a masked prefix [b0, b0 + P), the unmasked middle [lo, hi) = [b0 + P, end - Q)
  // and a masked suffix [end - Q, end) (Q: 32, 16, 16 + 8 or 8), each block kind in its own loop (block
  // order is free in the sums). FIXED: against the probe's reference, else online (max and rescale).
  const int P = (un >> 8) & kWalkP, Q = un & 255, b0 = lo - P, end = hi + Q;
  auto walk = [&](auto fixed) {
    constexpr bool F = decltype(fixed)::value;
    auto block = [&](auto nt, auto masked, int kb) {
      fwd_block<T, D, BIAS, ABIAS, decltype(nt)::value, decltype(masked)::value, false, F, R>(
          G, S, qa, ri, sk, sv, kb, smem, A.inv_scale, F ? nb : m, l, o, lane);
    };
    // Masked 32-key blocks: the prefix's, then a 32-key suffix.
    const int pm = P >> 5, nm32 = pm + (Q == 32);
#pragma unroll 1
    for (int i = 0; i < nm32; ++i) block(Four{}, std::true_type{}, i < pm ? b0 + 32 * i : end - 32);
    // Masked 16-key blocks: what is left of the prefix, then a 16-key suffix (Q = 16 or 24; !EIGHT: 16-key
    // blocks from end - Q on, the last at end - 8).
    constexpr bool E8 = EIGHT && F;  // the online walk (a fallback) never has the 8-key loop
    const int p16 = (P >> 4) & 1, nm16 = p16 + ((Q >> 4) & 1) + (E8 ? 0 : (Q >> 3) & 1);
#pragma unroll 1
    for (int i = 0; i < nm16; ++i)
      block(Two{}, std::true_type{}, i == 0 && (P & 16) ? b0 + P - 16 : E8 ? end - Q : end - Q + 16 * (i - p16));
    // A masked 8-key suffix (Q = 8 or 24): a segment's last 1..8 keys. The online walk takes them in a
    // masked 16-key block at end - 8 instead (keys past end: padding or other segments' slots, masked,
    // below cap = a multiple of 16): one block kind less keeps its registers down.
    const int nm8 = E8 ? (Q >> 3) & 1 : 0;
#pragma unroll 1
    for (int i = 0; i < nm8; ++i) {
      if constexpr (F)
        block(One{}, std::true_type{}, end - 8);
      else
        block(Two{}, std::true_type{}, end - 8);
    }
    // The unmasked middle in 64-key blocks (one max update, rescale vote and loop step per 64 keys
    // online), then at most one block of 32 and one of 16.
    const int m1 = hi;
    int kb = lo;
#pragma unroll 1
    for (; kb + 64 <= m1; kb += 64) block(Eight{}, std::false_type{}, kb);
#pragma unroll 1
    for (; kb + 32 <= m1; kb += 32) block(Four{}, std::false_type{}, kb);  // 0 or 1 time
#pragma unroll 1
    for (; kb < m1; kb += 16) block(Two{}, std::false_type{}, kb);  // 0 or 1 time
#pragma unroll
    for (int u = 0; u < R; ++u)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) l[u][rr] = quad_sum(l[u][rr]);
  };
  // Softmax against a fixed reference per row: the largest score over the segment's first 8 keys
  // (fwd_probe), p = exp2(s c - ref c) summed with no running max and no rescale. Kept when every
  // stored row's sum of p lies in [LMIN, LMAX]: p <= LMAX stays within the input type (fp16: 2^15),
  // and O = sum p v stays finite for the V that reach here (v_unsafe: fp16 finite, bf16 |v| < 2^64).
  // Otherwise (a key far above the probe's, NaN/Inf, a row with no allowed probe key) the unit walks
  // again online (p <= 1), as before.
  constexpr bool kHalf = std::is_same<T, __half>::value;
  constexpr float kLmin = kHalf ? 0.5f : 0x1p-32f, kLmax = kHalf ? 0x1p15f : 0x1p32f;
  const float c = G.scale * kLog2e;
  // Pass 0 against the probe's reference; pass 1, the online walk, only after some stored row failed
  // (a loop, not an if, so that the static rules count the passes that run: 1 at the model's inputs).
  // The walk's call lines name the unit kind for the static rules (static_rules.py, via).
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 0) {
      fwd_probe<T, D, BIAS, ABIAS, R>(G, S, qa, ri, sk, b0, smem, A.inv_scale, m, lane);
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) nb[u][rr] = -(m[u][rr] == -INFINITY ? 0.f : m[u][rr]) * c;
      if constexpr (R == 2)
        walk(std::true_type{});  // fixed reference, pair units
      else
        walk(std::true_type{});  // fixed reference, single units
      // (O needs no check: v_unsafe sent V that p <= LMAX could overflow to fwd_exact, and a NaN p
      // is a NaN l.)
      bool bad = false;
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) bad |= stored[u][rr] && !(l[u][rr] >= kLmin && l[u][rr] <= kLmax);
      if (!__any_sync(kFull, bad)) break;
    } else {
      reset();
      walk(std::false_type{});  // online fallback walk
    }
  }
#pragma unroll
  for (int u = 0; u < R; ++u) fwd_finish<T, D>(A, S, tile + u, h, sq, m[u], l[u], o[u], stored[u], lane);
}

// The n-th (from 0) set bit of a warp-uniform mask of tiles (n < popc(mask)): the tile of that unit.
__device__ __forceinline__ int nth_tile(unsigned mask, int n, int lane) {
  const bool hit = (mask >> lane & 1u) && __popc(mask & ((1u << lane) - 1u)) == n;
  return __ffs(__ballot_sync(kFull, hit)) - 1;
}

// The exact path for a head whose V holds NaN/Inf (or huge bf16 values: v_unsafe): every row over all
// keys of its window, masked keys with probability 0 (so 0 * NaN = NaN reaches the output as in the
// reference). Slow; rare.
// Also the whole-table fallback of a coords pack whose box exceeds the plan's tmax entries (glob: the
// bias read from the (T, nH) table in global memory, the slots' full-table positions kept, rule 3's
// range test per pair); otherwise the bias comes from the head's table in shared memory (cen_byte).
template <typename T, int D, int BIAS, bool ABIAS>
__device__ void fwd_exact(const FwdArgs& A, const Pack& S, int h, const T* sq, const T* sk,
                                       const T* sv, int cen_byte, const unsigned char* smem, bool glob) {
  constexpr int LD = Tile<T, D>::kLD;
  const Geo& G = A.g;
  const int rows = S.info[0], rh2 = 2 * G.rh - 1, rw2 = 2 * G.rw - 1;
  for (int q = threadIdx.x; q < rows; q += kThreads) {
    if (S.tok[q] < 0) continue;  // padding slot (aligned one-window packs)
    const RowInfo r = row_info<BIAS, ABIAS>(G, S, q, cen_byte, h);
    const int2 qc = S.cxy[q];
    // The keys of the row's window: N slots, or all slots in use of a one-window pack (padding keys
    // never match a segment: probability 0).
    const int wb = G.P == 1 ? 0 : q / G.N * G.N, we = G.P == 1 ? rows : wb + G.N;
    auto logit = [&](int k) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s = fmaf(to_float(sq[q * LD + d]), to_float(sk[k * LD + d]), s);
      const int2 kk = S.ki[k];
      float b;
      if (BIAS == 2 && glob) {  // coordinate differences (int32, window_coords) in the table's range
        const int2 kc = S.cxy[k];
        const int dy = qc.x - kc.x + G.rh - 1, dx = qc.y - kc.y + G.rw - 1;
        const bool in = unsigned(dy) < unsigned(rh2) && unsigned(dx) < unsigned(rw2);
        b = in ? __ldg(G.rpb + (int64_t(dy) * rw2 + dx) * G.nH + h) * A.inv_scale : 0.f;
        if constexpr (ABIAS) b = fmaf(__ldg(r.ab + S.lidx[k]), A.inv_scale, b);
      } else {
        b = bias_scaled<BIAS, ABIAS>(r, kk, S.lidx[k], smem, A.inv_scale);
      }
      const float x = (s + b) * G.scale;
      return r.key == kk.y ? x : -INFINITY;
    };
    float m = -INFINITY;
    for (int k = wb; k < we; ++k) m = fmaxf(m, logit(k));
    const float nb = -(m == -INFINITY ? 0.f : m) * kLog2e;
    float l = 0.f;
    for (int k = wb; k < we; ++k) l += prim::ex2(fmaf(logit(k), kLog2e, nb));
    const float inv = prim::rcp(l);
    T* orow = static_cast<T*>(A.out) + int64_t(S.tok[q]) * G.C + h * D;
    for (int dc = 0; dc < D; dc += 8) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = wb; k < we; ++k) {
        const float p = prim::ex2(fmaf(logit(k), kLog2e, nb));
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(p, to_float(sv[k * LD + dc + e]), acc[e]);
      }
      for (int e = 0; e < 8; ++e) orow[dc + e] = from_float<T>(acc[e] * inv);
    }
    A.lse[S.lrow[q] + h * G.N] = -nb * kLn2 + prim::lg2(l) * kLn2;
  }
}

// The forward kernels launched two CTAs per SM (so at most 128 registers): head_dim <= 32 without
// attn_bias, packs of several windows. The one-window kernels run one CTA (8 warps, up to 255
// registers): the coords ones spill at 128, and the rpb ones (MixMIM stage 1) keep the 8-key tail loop
// that 128 registers could not hold (static, sm_90: 220.5 -> 214.5 us at mixmim-b-s1; the model charges
// nothing for 8 resident warps instead of 16).
constexpr bool fwd_two_ctas(int D, int BIAS, bool ABIAS, bool ONE) { return D <= 32 && !ABIAS && !ONE; }

// The items [it0, it1) of pack `pack` (all threads; after the previous pack's last barrier, which freed
// every shared array): prologue (PLAN: the pack position's plan, A.plan; window_attention_fwd_pack.cuh),
// coords box, then its heads. COS: cosine mode (G.logit_scale set), a template flag so that other
// launches carry no trace of it (the runtime test stays inside: with a compile-time branch the kernel
// spilled at 128 registers on sm_80).
template <typename T, int D, int BIAS, bool ABIAS, bool ONE, bool PLAN, bool COS>
__device__ __forceinline__ void fwd_pack(const FwdArgs& A, unsigned char* smem, const Pack& S, int pack, int it0,
                                         int it1) {
  using TL = Tile<T, D>;
  const Geo& G = A.g;
  const Layout& L = A.L;
  // fwd_unit's 8-key tail loop: only in the kernels with 255 registers (every one-window kernel), not
  // cosine, sm_90. In the cosine kernels and below sm_90 it spills a few registers (ptxas' allocation);
  // the masked 16-key loop takes those tails instead (at end - 8: same pairs, twice the computed ones).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  constexpr bool kEight = false;
#else
  constexpr bool kEight = !COS && !fwd_two_ctas(D, BIAS, ABIAS, ONE);
#endif
  // fwd_unit's pair units (two tiles of one segment walked together): head_dim <= 32 without attn_bias
  // (with it, or larger heads, a pair's state spills at 255 registers).
  constexpr bool kPairs = D <= 32 && !ABIAS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // 32-bit shared-memory offsets (the layout's fields are size_t)
  const unsigned ops = unsigned(L.ops), bstride = unsigned(L.buf_stride), tbytes = unsigned(L.tile_bytes);
  const unsigned tab0 = unsigned(L.tab), tstride = unsigned(L.tab_stride);
  auto buf = [&](int b, int op) { return reinterpret_cast<T*>(smem + (ops + b * bstride + op * tbytes)); };
  auto tab = [&](int b) { return reinterpret_cast<float*>(smem + (tab0 + b * tstride)); };
  // (the previous pack's last barrier freed every shared array)
  const int h0 = imax(it0 - pack * G.nH, 0), nh = imin(it1 - pack * G.nH, G.nH) - h0;
  if constexpr (PLAN) {  // image img's pack at position pos: tokens from img * H*W, lse rows from img * nW*nH*N
    const int img = pack / A.ppi, pos = pack - img * A.ppi;
    load_plan(smem, L, S, G.cap, A.plan + size_t(pos) * (L.tab / 16), img * G.H * G.W, img * G.nW * G.nH * G.N);
  } else {
    prologue<BIAS == 2>(G, pack, S, smem + L.ops);
    __syncthreads();  // slots and tiles ready; the prologue's scratch is dead
    if constexpr (ONE) {
      align_segments(G, S, imin(G.P, G.nwin - pack * G.P) * G.N, reinterpret_cast<int*>(smem + L.ops));
      __syncthreads();
    }
  }
  // Tiles go round-robin to the warps (the forward's tiles cost about the same; no work lists).
  // Coords: the pack's box tables (window_attention_box.cuh), spans uncapped (out-of-range entries 0);
  // a box over tmax entries (a wider coordinate spread) runs fwd_exact on the (T, nH) table instead.
  CoordBox bx{};
  bool boxed = true;
  int center = table_center(G.rh, G.rw);
  if constexpr (BIAS == 2) {
    bx = pack_box(G, S, A.tmax, A.tmax, A.tmax);  // the slots' offsets box-local (read after a barrier)
    boxed = bx.fits;
    center = bx.ey * bx.nx + bx.ex;
  }
  // Pack-wide values read right after the barrier (warps converged) and broadcast from lane 0: the
  // compiler then sees warp-uniform loops and emits plain shuffles inside them.
  const int nvalid = __shfl_sync(kFull, S.info[0], 0), ntiles = __shfl_sync(kFull, S.info[1], 0);
  // One-window packs with pairs: fwd_unit's units as masks of their first tiles (ntiles <= kMaxTiles <= 32),
  // align_segments' pairs and the single tiles.
  unsigned heads = 0u, singles = 0u;
  if constexpr (ONE && kPairs) {
    const int un = lane < ntiles ? S.uni[lane] : 0;
    heads = __ballot_sync(kFull, (un & kPairHead) != 0);
    singles = __ballot_sync(kFull, lane < ntiles && !(un & (kPairHead | kPairTail)));
  }
  const int npairs = __popc(heads), nunits = npairs + __popc(singles);
  zero_padding<T, D>(buf(0, 0), 3 * A.nbuf, L.tile_bytes, S.tok, ONE ? 0 : nvalid, G.cap);  // aligned: gaps too
  const T* qkv = static_cast<const T*>(G.qkv);
  const int rw2 = 2 * G.rw - 1;
  auto issue = [&](int h, int b) {
    load_qkv_async<T, D, ONE>(buf(b, 0), L.tile_bytes, qkv + h * D, G.C, S.tok, nvalid);
    if constexpr (BIAS == 1) {
      load_table_scaled(tab(b), G.rpb, G.T, G.nH, h, A.inv_scale);
    } else if constexpr (BIAS == 2) {  // box entries: in the table's range (column and row) or 0 (rule 3)
      float* tb = tab(b);
      if (boxed)
        box_entries(bx, [&](int e, int g, int c) {  // fwd box load
          if (unsigned(c - bx.ex + G.rw - 1) < unsigned(rw2) && unsigned(g) < unsigned(G.T))
            prim::cp_async<4>(tb + e, G.rpb + unsigned(g * G.nH + h));
          else
            tb[e] = 0.f;
        });
    }
    prim::cp_async_commit();
  };
  issue(h0, 0);
  for (int i = 0; i < nh; ++i) {
    // Head j = i + nbuf - 1 is loaded now: the next head (two buffers; its buffer's last reader
    // finished at the previous barrier) or this one (one buffer; head 0 was loaded above).
    const int h = h0 + i, b = i & (A.nbuf - 1), j = i + A.nbuf - 1;
    if (j > 0 && j < nh) issue(h0 + j, j & (A.nbuf - 1));
    if (j > i && j < nh)
      prim::cp_async_wait<1>();
    else
      prim::cp_async_wait<0>();
    const int cen_byte = static_cast<int>(tab0 + b * tstride) + 4 * center;
    if constexpr (BIAS == 2) {  // this thread's entries landed: to units of 1/scale (published by the barrier below)
      float* tb = tab(b);
      if (boxed) box_entries(bx, [&](int e, int) { tb[e] *= A.inv_scale; });  // fwd box scale
    }
    if (COS && G.logit_scale) {  // cosine: q' = s_h q/|q|, k' = k/|k| per row (the barrier below orders it)
      __syncthreads();
      normalize_rows<T, D, TL::kLD>(buf(b, 0), nvalid, head_scale(G.logit_scale, h), nullptr, 0);
      normalize_rows<T, D, TL::kLD>(buf(b, 1), nvalid, 1.f, nullptr, 0);
    }
    if (!__syncthreads_or(v_unsafe<T, D>(buf(b, 2), nvalid)) && boxed) {
      if constexpr (ONE && kPairs) {
        // Pair units first, then single ones, in one round-robin over the warps (two loops: the static
        // rules count each).
        int u = warp;
#pragma unroll 1
        for (; u < npairs; u += kWarps)
          fwd_unit<T, D, BIAS, ABIAS, kEight, 2>(A, S, nth_tile(heads, u, lane), h, buf(b, 0), buf(b, 1), buf(b, 2),
                                                 cen_byte, smem, lane);
#pragma unroll 1
        for (; u < nunits; u += kWarps)
          fwd_unit<T, D, BIAS, ABIAS, kEight, 1>(A, S, nth_tile(singles, u - npairs, lane), h, buf(b, 0), buf(b, 1),
                                                 buf(b, 2), cen_byte, smem, lane);
      } else if constexpr (ONE) {  // every tile a single unit
        for (int t = warp; t < ntiles; t += kWarps)
          fwd_unit<T, D, BIAS, ABIAS, kEight, 1>(A, S, t, h, buf(b, 0), buf(b, 1), buf(b, 2), cen_byte, smem, lane);
      } else {
        for (int t = warp; t < ntiles; t += kWarps)
          fwd_tile<T, D, BIAS, ABIAS>(A, S, t, h, buf(b, 0), buf(b, 1), buf(b, 2), cen_byte, smem, lane);
      }
    } else {
      fwd_exact<T, D, BIAS, ABIAS>(A, S, h, buf(b, 0), buf(b, 1), buf(b, 2), cen_byte, smem, !boxed);
    }
    __syncthreads();  // buffer b is free again
  }
}

// ONE: the launch's packs hold one window each (G.P == 1): segments aligned to tiles when they fit.
// CTA b runs the items (pack, head) = pack * nH + h in [b ipc, (b+1) ipc): each pack of its range once
// (prologue, coords box), then its heads there. Only coords calls walk several packs (kWalk; the plan's
// items_per_cta): the others run ipc = hg items dividing nH, one pack, and keep the registers of one
// (the one-window kernels sit at 128, two CTAs per SM). Coords kernels of one-window packs keep one
// CTA per SM (the launch bound of two spills them). The first pack is peeled off the pack loop: ptxas
// then issues its first head's Q/K/V rows as one batch (inside a loop it branches per row step, and the
// static model counts a third of the loads in flight).
// PLAN: the packs' slots and tiles come from their positions' plans (A.plan), not the prologue. COS:
// cosine mode (fwd_pack).
template <typename T, int D, int BIAS, bool ABIAS, bool ONE, bool PLAN, bool COS>
__global__ void __launch_bounds__(kThreads, fwd_two_ctas(D, BIAS, ABIAS, ONE) ? 2 : 1)
    wattn_fwd_kernel(const FwdArgs A) {
  constexpr bool kWalk = BIAS == 2;
  MK_DYNAMIC_SMEM(smem);
  const Pack S(smem, A.L);
  const int it0 = int(blockIdx.x) * A.ipc, it1 = imin(it0 + A.ipc, A.g.npacks * A.g.nH);
  int pack = it0 / A.g.nH;
  fwd_pack<T, D, BIAS, ABIAS, ONE, PLAN, COS>(A, smem, S, pack, it0, it1);
  if constexpr (kWalk) {
#pragma unroll 1
    for (++pack; pack * A.g.nH < it1; ++pack) fwd_pack<T, D, BIAS, ABIAS, ONE, PLAN, COS>(A, smem, S, pack, it0, it1);  // fwd packs
  }
}

// The fused forward's launch for one (T, D): the bias flags and the kernel variant (one-window packs,
// pack plan, cosine) picked at run time. window_attention.cu plans the call (grid, shared memory, the
// pack plans' kernel) and declares the instances extern; each window_attention_fwd_<dtype>_d<D>.cu
// instantiates one (MK_WATTN_FWD_INSTANCE).
template <typename T, int D>
cudaError_t launch_forward(const WindowAttentionParams& p, const FwdArgs& a, int nctas, size_t smem, bool use_plan,
                           cudaStream_t stream) {
  return dispatch_bias(p, [&](auto bias, auto ab) -> cudaError_t {
    constexpr int BIAS = decltype(bias)::value;
    constexpr bool AB = decltype(ab)::value;
    constexpr bool kOneBuilt = !(BIAS == 2 && D > 64);  // one-window kernels (plan_forward: legacy there)
    auto pick = [&](auto cos) {  // one kernel type: void(const FwdArgs)
      constexpr bool C = decltype(cos)::value;
      auto many = use_plan ? wattn_fwd_kernel<T, D, BIAS, AB, false, true, C>
                           : wattn_fwd_kernel<T, D, BIAS, AB, false, false, C>;
      if constexpr (kOneBuilt)
        return a.g.P == 1 ? (use_plan ? wattn_fwd_kernel<T, D, BIAS, AB, true, true, C>
                                      : wattn_fwd_kernel<T, D, BIAS, AB, true, false, C>)
                          : many;
      else
        return many;
    };
    auto kernel = p.logit_scale ? pick(std::true_type{}) : pick(std::false_type{});
    const cudaError_t err = prepare_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    return MK_LAUNCH(kernel, dim3(static_cast<unsigned>(nctas)), dim3(kThreads), smem, stream, a);
  });
}

// launch_forward<T, D>'s declaration, for `extern template` (window_attention.cu) and `template` (the
// instance files).
#define MK_WATTN_FWD_INSTANCE(T, D)                                                                      \
  cudaError_t launch_forward<T, D>(const WindowAttentionParams&, const FwdArgs&, int, size_t, bool, \
                                   cudaStream_t)

}  // namespace wattn
}  // namespace mixkernels::cuda
