// Fused mask-aware window attention, backward (CUDA C++): one kernel.
//
// One CTA (8 warps) per (pack of windows, group of heads), like the forward, with the pack's tokens
// sorted by attention segment (window_attention_common.cuh). Per head, Q, K, V, dO and O rows and
// the forward's lse land in shared memory once (cp.async); delta = rowsum(dO * O) is computed
// there, and the warps then take the 16-row tiles, longest first, each in two passes:
//   * key pass: S^T = K Q^T and dP^T = V dO^T over the queries of the keys' segments;
//     P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta); dV = P^T dO, dK = scale dS^T Q.
//   * query pass: S = Q K^T, dP = dO V^T over the rows' keys; dQ = scale dS K, and the
//     relative-position bias gradient: dS added to the CTA's table of the head's entries.
// One-pass plan (when a cap x cap 16-bit dS^T matrix fits shared memory too, cosine mode excepted):
// the key passes of all tiles run first and also write dS^T (rounded as the dK product uses it) to
// that matrix and the bias gradient from the fp32 dS; after a barrier each query pass is dQ =
// scale dS K from ldmatrix'd dS blocks: S, dP and exp once per pair, one CTA per SM.
// Two-pass plan (the rest): S and dP computed twice (once per pass), no N x N scratch.
// Either way every output row is written once by one warp, with no atomics.
// Bytes: q, k, v, dO, O and lse read once, dq, dk, dv written once.
// Bias gradient: fast mode adds into shared tables per CTA and flushes each entry with one global RED
// per head: two-pass, one table (atomicAdd); one-pass, one table per lane & 3 interleaved with a bias
// copy, a block's adds tried as plain CASes back to back with warp-uniform retry rounds
// (table_add_batch) and the softmax scale folded into dS; deterministic mode gives every warp its own table (lanes that
// hit one entry in the same step are summed in lane order), sums the warps in order into a partial
// per (slot, head) while CTAs walk fixed pack sequences, and a last kernel adds the slots in order.
// Coords calls in fast mode take the one-pass plan with box-local tables (window_attention_bwd_box.cuh:
// a pack's box of table entries, loaded and flushed per head, or per CTA and head when persistent).
// Calls with attn_bias, float32, head_dim 128 or shapes that do not fit shared memory run the legacy
// kernels.
#include "window_attention_bwd_box.cuh"
#include "window_attention_bwd_items.cuh"
#include "window_attention_legacy.cuh"

namespace mixkernels::cuda {
namespace wattn {

// Two CTAs per SM (two-pass plan) cap the kernel at 128 registers. At d = 32 nvcc 13.0 fits that on
// sm_90 (128, no spill) but not on sm_80 (a few bytes spilled, with a table bias or not, since the
// plain/masked walk loops), so on sm_80 the two-pass kernels run one CTA per SM. __launch_bounds__
// only matters in the device pass.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define MK_WATTN_BWD_TAB_TWO_CTAS false
#else
#define MK_WATTN_BWD_TAB_TWO_CTAS true
#endif

// The heads of one pack (all threads; after the pack's work lists are published): operands, delta,
// the tiles' passes, the bias-gradient flush. L: the layout this pack runs in (the coords box plan:
// the box layout, or the whole-table two-pass layout for a pack whose box exceeds the budget). ONE:
// one pass; BOX: box-local tables (bx; the slots' table offsets already box-local).
template <typename T, int D, int BIAS, bool DET, bool COS, bool ONE, bool BOX>
__device__ __forceinline__ void pack_heads(const BwdArgs& A, unsigned char* smem, const Layout& L, const Pack& S,
                                           const BwdBox& bx, int slot, int h0, int nh) {
  static_assert(!BOX || (ONE && BIAS == 2 && !DET), "box tables: coords, fast mode, one pass");
  using TL = Tile<T, D>;
  constexpr bool kTab = BIAS != 0;
  const Geo& G = A.g;
  constexpr bool kIL = ONE && !DET;  // interleaved {bias, gradient} tables (bwd_tab_floats)
  constexpr int kTabs = DET ? kWarps : ONE ? 4 : 1, kES = kIL ? 2 : 1;  // gradient tables, floats per entry
  const int tabT = BOX ? A.tmax : G.T;  // entries of this layout's tables (the zero entry at tabT)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool drpb = kTab && A.drpb != nullptr;
  T* op[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) op[i] = reinterpret_cast<T*>(smem + L.ops + i * L.tile_bytes);  // q k v dO O
  float* tab = reinterpret_cast<float*>(smem + L.tab);
  float* dtab = reinterpret_cast<float*>(smem + L.dtab);
  const int tab_stride_f = kES * (tabT + 1);
  // box plan, persistent tables (A.pers): head i's box bias and gradient sum after the kTabs tables
  float* const pb = dtab + kTabs * tab_stride_f;
  float* const pg = pb + A.hg * A.tmax;
  (void)pb, (void)pg;
  T* stage = reinterpret_cast<T*>(smem + L.stage) + warp * 16 * TL::kLD;
  float2* nld = reinterpret_cast<float2*>(smem + L.nld);
  float* nl_raw = reinterpret_cast<float*>(smem + L.nld);  // lse lands here first (slot s at 2s)

  HeadSmem M;
  M.smem = smem;
  M.S = &S;
  M.q = op[0]; M.k = op[1]; M.v = op[2]; M.dO = op[3];
  M.nld = nld;
  {
    const int ent = static_cast<int>(L.dtab) + 4 * tab_stride_f * (DET ? warp : ONE ? lane & 3 : 0);
    const int center = BOX ? bx.ey * bx.nx + bx.ex : table_center(G.rh, G.rw);
    M.eb = smem + ent + kES * 4 * center;
    M.zp = smem + ent + kES * 4 * tabT;
    M.bias_off = kIL ? 4 : static_cast<int>(L.tab) - ent;
  }
  M.scratch = dtab + kWarps * tab_stride_f + 32 * warp;
  float2* qk_inv = COS ? nld + G.cap : nullptr;  // cosine mode (make_layout reserves it)
  float* wdls = COS ? reinterpret_cast<float*>(qk_inv + G.cap) : nullptr;  // one per warp
  M.qk_inv = qk_inv;
  M.hs = 0.f;
  M.ds = ONE ? smem + L.total : nullptr;  // after the two-pass layout (plan_backward adds ds_bytes)
  M.dsp = ds_pitch(G.cap);

  // Pack-wide values read after the caller's barrier and broadcast from lane 0: warp-uniform loops
  // for the compiler too (plain shuffles inside them, no divergence-safe fallbacks).
  const int nvalid = __shfl_sync(kFull, S.info[0], 0);
  const int it0 = __shfl_sync(kFull, S.wbeg[warp], 0), it1 = __shfl_sync(kFull, S.wbeg[warp + 1], 0);
  for (int i = 0; i < 5; ++i) zero_rows<T, D>(op[i], nvalid, G.cap);
  if (threadIdx.x < G.cap) nld[threadIdx.x] = make_float2(0.f, 0.f);
  if (!BOX && threadIdx.x == 0) tab[G.T] = 0.f;  // box: the zero entry's bias copies stay 0 in dtab
  for (int i = 0; i < nh; ++i) {
    const int h = h0 + i;
    load_head_rows<T, D>(op[0], L.tile_bytes, static_cast<const T*>(G.qkv) + h * D, 3 * G.C, G.C,
                         static_cast<const T*>(A.dout) + h * D, static_cast<const T*>(A.out) + h * D, G.C, S.tok,
                         nvalid);
    if constexpr (BOX) {
      if (!A.pers)
        box_entries(bx, [&](int e, int g) { prim::cp_async<4>(tab + e, G.rpb + unsigned(g * G.nH + h)); });  // bwd box per-pack load
    } else if constexpr (kTab)
      load_head_table(tab, G.rpb, G.T, G.nH, h);
    if (threadIdx.x < nvalid) prim::cp_async<4>(nl_raw + 2 * threadIdx.x, A.lse + S.lrow[threadIdx.x] + h * G.N);
    prim::cp_async_commit();
    prim::cp_async_wait<0>();
    __syncthreads();
    if constexpr (BOX) {  // the box's bias entries into the interleaved tables
      const float* const src = A.pers ? pb + i * A.tmax : tab;
      box_entries(bx, [&](int e, int) {
        const float b = src[e];
#pragma unroll
        for (int w = 0; w < kTabs; ++w) dtab[w * tab_stride_f + 2 * e + 1] = b;
      });
    } else if constexpr (kTab && kIL) {  // the bias entries (the zero at T too) into the interleaved tables
#pragma unroll 1
      for (int e = threadIdx.x; e <= G.T; e += kThreads) {
        const float b = tab[e];
#pragma unroll
        for (int w = 0; w < kTabs; ++w) dtab[w * tab_stride_f + 2 * e + 1] = b;
      }
    }
    head_delta<T, D>(op[3], op[4], nl_raw, nld, nvalid, ONE ? -G.scale : -1.f);
    if constexpr (COS) {  // normalize q (times s_h) and k in place, once per row, keeping 1/|x|
      M.hs = head_scale(G.logit_scale, h);
      normalize_rows<T, D, TL::kLD>(op[0], nvalid, M.hs, &qk_inv[0].x, 2);
      normalize_rows<T, D, TL::kLD>(op[1], nvalid, 1.f, &qk_inv[0].y, 2);
    }
    __syncthreads();  // nld (and the normalized rows) ready; O is dead (its rows become the staging area)
    // Each item is one 16-row tile: its key pass (dK, dV) then its query pass (dQ, bias gradient).
    // Two copies of the loop (with / without the bias gradient) instead of a test per item, on
    // their own source lines (the static report would read same-line copies of different sizes as
    // unrolled copies sharing one trip count).
    // ONE: all key passes (dS^T to shared memory), a barrier, then all query passes.
    float dls = 0.f;
    if constexpr (ONE) {
      if (drpb) {
        for (int it = it0; it < it1; ++it)
          key_item<T, D, BIAS, COS, DET, true, true>(A, M, __shfl_sync(kFull, S.items[it], 0), h, stage, lane);
      } else {
        for (int it = it0; it < it1; ++it)
          key_item<T, D, BIAS, COS, DET, false, true>(A, M, __shfl_sync(kFull, S.items[it], 0), h, stage, lane);
      }
      __syncthreads();  // every dS^T block of the head written
      for (int it = it0; it < it1; ++it)
        query_item_ds<T, D>(A, M, __shfl_sync(kFull, S.items[it], 0), h, stage, lane);
    } else {
      auto tiles = [&](auto drpb_c) {
        float acc = 0.f;
        for (int it = it0; it < it1; ++it) {
          const int tile = __shfl_sync(kFull, S.items[it], 0);
          key_item<T, D, BIAS, COS>(A, M, tile, h, stage, lane);
          acc += query_item<T, D, BIAS, DET, decltype(drpb_c)::value, COS>(A, M, tile, h, stage, lane);
        }
        return acc;
      };
      dls = drpb ? tiles(std::true_type{}) : tiles(std::false_type{});
    }
    if (COS && A.dls) {  // the head's logit-scale gradient: warps in order (deterministic either way in the CTA)
      dls = cos_warp_sum(dls);
      if (lane == 0) wdls[warp] = dls;
    }
    __syncthreads();  // all items done: flush the bias gradient, free the operands
    if (COS && A.dls && threadIdx.x == 0) {
      float sum = 0.f;
      for (int w = 0; w < kWarps; ++w) sum += wdls[w];
      if constexpr (DET) A.dls[int64_t(slot) * G.nH + h] += sum;  // this CTA owns (slot, h)
      else atomicAdd(A.dls + h, sum);
    }
    if (drpb) {
      const float inv_dsc = ONE ? 1.f / G.scale : 1.f;  // the tables hold dS times dsc (pair_grad)
      // Entry e's global address as one 32 x 32 + 64-bit multiply-add in bytes (e >= 0): the signed
      // int64_t(e) * nH + h was a full 64-bit multiply and a shift, 7 instructions per entry, and the
      // flush runs T / 256 entries per thread and head (~63 at a 16K-entry coords table).
      unsigned char* const drpb_h = reinterpret_cast<unsigned char*>(A.drpb + h);
      const unsigned row_bytes = static_cast<unsigned>(G.nH) * unsigned(sizeof(float));
      // fast mode: entry e of the kTabs tables (gradient at kES e) summed and zeroed
      auto take = [&](int e) {
        const int gi = kES * e;  // the gradient of entry e (interleaved: its bias after it)
        float sum = dtab[gi];
        dtab[gi] = 0.f;
#pragma unroll
        for (int w = 1; w < kTabs; ++w) {
          sum += dtab[w * tab_stride_f + gi];
          dtab[w * tab_stride_f + gi] = 0.f;
        }
        return sum;
      };
      auto flush = [&](int e, int g) {  // one RED per entry
        const float sum = take(e);
        if (sum != 0.f)
          prim::red_add(reinterpret_cast<float*>(drpb_h + size_t(unsigned(g)) * row_bytes), sum * inv_dsc);
      };
      (void)flush;  // (deterministic mode: unused)
      if constexpr (BOX) {
        if (A.pers) {  // into the head's persistent sum (box_flush adds it to drpb)
          float* const gs = pg + i * A.tmax;
          box_entries(bx, [&](int e, int) { gs[e] += take(e); });  // bwd box fold
        } else {
          box_entries(bx, flush);  // bwd box per-pack flush
        }
      } else {
#pragma unroll 1
        for (int e = threadIdx.x; e < G.T; e += kThreads) {
          if constexpr (DET) {
            float sum = 0.f;
            for (int w = 0; w < kWarps; ++w) {
              sum += dtab[w * tab_stride_f + e];
              dtab[w * tab_stride_f + e] = 0.f;
            }
            A.drpb[(int64_t(slot) * G.nH + h) * G.T + e] += sum * inv_dsc;  // this CTA owns (slot, h)
          } else {
            flush(e, e);
          }
        }
      }
    }
  }
}

// Fast mode with the caller's persistent sums: every CTA's adds are in (a fence, then its ticket); the
// last CTA copies the sums to the outputs and zeroes them for the next call, so no memset runs before
// the kernel. The bits are those of the adds, as with a zeroed output.
__device__ __forceinline__ void finish_sums(const BwdArgs& A) {
  if (!prim::last_of_group(A.ticket, gridDim.x)) return;
  const int n = A.drpb != nullptr ? A.g.T * A.g.nH : 0, m = A.dls != nullptr ? A.g.nH : 0;
#pragma unroll 1
  for (int e = threadIdx.x; e < n; e += kThreads) {  // bwd sums out
    A.drpb_out[e] = __ldcg(A.drpb + e);
    A.drpb[e] = 0.f;
  }
#pragma unroll 1
  for (int e = threadIdx.x; e < m; e += kThreads) {  // bwd dls sums out
    A.dls_out[e] = __ldcg(A.dls + e);
    A.dls[e] = 0.f;
  }
}

// ONE: the one-pass plan (S and dP once per pair, dS^T kept in shared memory: one CTA per SM).
// Coords calls in fast mode (ONE, BIAS 2, !DET) run the box plan: box-local tables of A.tmax entries
// per pack, and the whole-table two-pass code for a pack whose box exceeds them.
template <typename T, int D, int BIAS, bool DET, bool COS, bool ONE>
__global__ void __launch_bounds__(kThreads, !ONE && D <= 32 && !DET && BIAS != 2 &&
                                                    MK_WATTN_BWD_TAB_TWO_CTAS ? 2 : 1)
    wattn_bwd_kernel(const BwdArgs A) {
  static_assert(!(ONE && COS), "cosine mode sums P s per query row: the two-pass plan");
  constexpr bool kBox = ONE && BIAS == 2 && !DET;
  constexpr bool kTab = BIAS != 0;
  const Geo& G = A.g;
  MK_DYNAMIC_SMEM(smem);
  Geo gb = G;  // the box plan's layout: tables of tmax entries
  if (kBox) gb.T = A.tmax;
  const size_t pfl = kBox && A.pers ? size_t(2) * A.hg * A.tmax : 0;  // persistent box tables (plan_backward)
  const Layout L = make_layout(gb, int(sizeof(T)), D, 5, 1, true, !kTab ? 0 : bwd_tab_floats(gb.T, DET, ONE) + pfl);
  const Pack S(smem, L);
  const int slot = blockIdx.x / A.nhg, h0 = (blockIdx.x - slot * A.nhg) * A.hg, nh = imin(A.hg, G.nH - h0);
  const bool drpb = kTab && A.drpb != nullptr;
  float* dtab = reinterpret_cast<float*>(smem + L.dtab);
  const int ntab = !kTab ? 0 : static_cast<int>(bwd_tab_floats(gb.T, DET, ONE)) - (DET ? kWarps * 32 : 0);

  if (drpb)  // zero once; the flush after each head zeroes what it read
    for (int e = threadIdx.x; e < ntab; e += kThreads) dtab[e] = 0.f;
  if constexpr (DET) {  // this CTA's own partials (slot, heads h0 .. h0+nh-1), zeroed before its first add
    float* const part = drpb ? A.drpb + (int64_t(slot) * G.nH + h0) * G.T : nullptr;
#pragma unroll 1
    for (int e = threadIdx.x; drpb && e < nh * G.T; e += kThreads) part[e] = 0.f;  // bwd det partials zeroing
    if (COS && A.dls && threadIdx.x < nh) A.dls[int64_t(slot) * G.nH + h0 + threadIdx.x] = 0.f;
  }
  // box plan, persistent tables (A.pers): each head's box bias and gradient sum after the kernel's
  // tables (pack_heads), for the box of half-widths pey, pex (pey < 0: none loaded)
  float* const pb = dtab + ntab;
  float* const pg = pb + A.hg * A.tmax;
  const float inv_sc = 1.f / G.scale;  // the box tables hold dS times the scale (pair_grad)
  int pey = -1, pex = 0;
  (void)pb, (void)pg, (void)inv_sc, (void)pey, (void)pex;
  for (int pack = slot; pack < G.npacks; pack += A.nslots) {
    __syncthreads();  // the previous pack is done with every shared array
    prologue<BIAS == 2>(G, pack, S, smem + L.ops);
    __syncthreads();  // tile ranges ready
    assign_tiles(S);
    __syncthreads();
    if constexpr (kBox) {
      const BwdBox bx = pack_box(G, S, A.tmax);
      if (bx.fits) {
        if (A.pers && (bx.ey != pey || bx.ex != pex)) {  // another box: flush the held one, load this one
          if (drpb && pey >= 0)
            box_flush(box_of(G, pey, pex, A.tmax), A.drpb, G.nH, A.tmax, pg, inv_sc, h0, nh);  // bwd box change
          box_load(bx, G.rpb, G.nH, A.tmax, pb, pg, h0, nh);
          pey = bx.ey;
          pex = bx.ex;
        }
        pack_heads<T, D, BIAS, DET, COS, true, true>(A, smem, L, S, bx, slot, h0, nh);
      } else {  // the whole table, two passes, in the two-pass layout (its tables zeroed first and after)
        if (drpb && pey >= 0) {  // the layout overwrites the persistent tables: flushed first
          box_flush(box_of(G, pey, pex, A.tmax), A.drpb, G.nH, A.tmax, pg, inv_sc, h0, nh);  // bwd box change
          __syncthreads();
        }
        pey = -1;
        const Layout Lf = make_layout(G, int(sizeof(T)), D, 5, 1, true, bwd_tab_floats(G.T, false, false));
        if (drpb) zero_floats(reinterpret_cast<float*>(smem + Lf.dtab), G.T + 1);
        pack_heads<T, D, BIAS, DET, COS, false, false>(A, smem, Lf, S, bx, slot, h0, nh);  // bwd box fallback
        __syncthreads();
        if (drpb) zero_floats(dtab, ntab);
      }
    } else {
      pack_heads<T, D, BIAS, DET, COS, ONE, false>(A, smem, L, S, BwdBox{}, slot, h0, nh);
    }
  }
  if (kBox && drpb && pey >= 0)  // the CTA's last box (entries of this thread's own: no barrier)
    box_flush(box_of(G, pey, pex, A.tmax), A.drpb, G.nH, A.tmax, pg, inv_sc, h0, nh);  // bwd box last flush
  if (!DET && A.ticket != nullptr) finish_sums(A);
}

struct BwdPlan {
  Geo g;
  Layout L;
  size_t smem = 0;  // L.total, plus the dS^T matrix in the one-pass plan
  int hg = 1, nhg = 1, nslots = 0;
  int tmax = 0;  // the coords box plan's table entries (0: not that plan)
  bool ok = false, one = false;
  bool pers = false;  // the coords box plan's persistent tables (box_load / box_flush), nslots < npacks
};

// Heads per CTA: the divisor of nH with the least (waves x work per CTA), a CTA's work counted as
// hg heads plus ~0.75 head of per-pack work (prologue, work lists: the static report's SASS counts
// at window 7). Fewer, longer CTAs when the grid would end in a short wave (MixMIM-B stage 4: 4 heads
// x 256 CTAs in one wave instead of 2 x 512 in two).
inline int bwd_heads_per_cta(int packs, int nH, int slots) {
  int best = 1;
  int64_t best_t = INT64_MAX;
  for (int hg = 1; hg <= nH; ++hg) {
    if (nH % hg != 0) continue;
    const int64_t waves = (int64_t(packs) * (nH / hg) + slots - 1) / slots, t = waves * (4 * hg + 3);
    if (t < best_t) best = hg, best_t = t;
  }
  return best;
}

// Coords box plan with persistent tables: packs per CTA, each CTA walking them with one box load and
// flush per head (window_attention_bwd_box.cuh). The most, up to 8, whose busiest SM (waves x packs
// per CTA, one CTA per SM) runs no more packs than with one pack per CTA (UM-MAE-T stage 1: 683 packs,
// 6 per CTA, 114 CTAs; one pack per CTA takes 6 waves of 132).
inline int box_packs_per_cta(int packs, int nhg, int slots) {
  auto busiest = [&](int k) {
    const int64_t ctas = int64_t((packs + k - 1) / k) * nhg;
    return (ctas + slots - 1) / slots * k;
  };
  int best = 1;
  for (int k = 2; k <= 8; ++k)
    if (busiest(k) <= busiest(1)) best = k;
  return best;
}

BwdPlan plan_backward(const WindowAttentionParams& p, bool need_drpb, bool need_dbias, bool det) {
  BwdPlan f;
  const int N = p.wh * p.ww, nwin = p.B * (p.H / p.wh) * (p.W / p.ww);
  (void)need_drpb;
  // head_dim 128 keeps dK, dV and the K, V fragments of a 16-row tile in more than 255 registers
  if (p.dtype == DType::kFloat32 || p.d > 64 || p.attn_bias != nullptr || need_dbias || N > kThreads || nwin == 0)
    return f;
  f.g = make_geo(p, pick_pack(N, nwin));
  const int es = element_size(p.dtype);
  auto layout = [&](bool one) {
    return make_layout(f.g, es, p.d, 5, 1, true, p.rpb == nullptr ? 0 : bwd_tab_floats(f.g.T, det, one));
  };
  const size_t limit = static_cast<size_t>(smem_limit());
  // One pass (S, dP and exp once per pair) when the dS^T matrix fits too: one CTA per SM. Cosine mode
  // needs per-row sums of P s in the query pass: two passes. The one-pass plan keeps dS times the
  // scale (pair_grad), exact only for a scale that neither underflows nor overflows it (and is not 0:
  // the bias gradient divides it out); other scales (NaN too) take two passes.
  const float as = p.scale < 0.f ? -p.scale : p.scale;
  const bool one_ok = p.logit_scale == nullptr && as >= 0x1p-20f && as <= 0x1p20f;
  // Coords calls in fast mode: the box plan (window_attention_bwd_box.cuh), one pass with box-local
  // tables of the most entries tmax <= T that fit next to dS^T; packs whose box is larger run the
  // whole-table two-pass layout in the same shared memory (so it must fit too, unless tmax = T).
  // With several packs per CTA (box_packs_per_cta) the CTA's hg heads keep their box bias and gradient
  // sum over its packs (2 hg t floats more) when that still fits the box of uniform-sampled windows
  // (coordinates spanning 2w: UM-MAE), else one pack per CTA as before.
  if (one_ok && !det && p.rpb != nullptr && p.coords != nullptr) {
    const size_t ds = ds_bytes(f.g.cap, es), full = layout(false).total;
    auto box_layout = [&](int t, int ph) {
      Geo gb = f.g;
      gb.T = t;
      return make_layout(gb, es, p.d, 5, 1, true, bwd_tab_floats(t, false, true) + size_t(2) * ph * t);
    };
    auto box_tmax = [&](int ph) {  // the largest t in [1, T] with box_layout(t, ph).total + ds <= limit, else 0
      int lo = 0, hi = f.g.T;
      while (lo < hi) {
        const int mid = hi - (hi - lo) / 2;
        if (box_layout(mid, ph).total + ds <= limit) lo = mid;
        else hi = mid - 1;
      }
      return lo >= 1 && (lo == f.g.T || full <= limit) ? lo : 0;
    };
    const int lo = box_tmax(0);
    if (lo >= 1) {
      f.one = true;
      f.tmax = lo;
      f.nslots = f.g.npacks;
      f.hg = bwd_heads_per_cta(f.nslots, p.nH, sm_count());
      const int nhg = (p.nH + f.hg - 1) / f.hg, k = box_packs_per_cta(f.g.npacks, nhg, sm_count());
      const int want = imin(f.g.T, (2 * imin(f.g.rh - 1, 2 * p.wh) + 1) * (2 * imin(f.g.rw - 1, 2 * p.ww) + 1));
      const int lp = k > 1 ? box_tmax(f.hg) : 0;
      if (lp >= want) {
        f.pers = true;
        f.tmax = lp;
        f.nslots = (f.g.npacks + k - 1) / k;
      }
      f.L = box_layout(f.tmax, f.pers ? f.hg : 0);
      f.smem = f.L.total + ds;
      if (f.tmax < f.g.T && full > f.smem) f.smem = full;
    }
  }
  if (f.tmax == 0) {
    f.L = layout(true);
    f.one = one_ok && f.L.total + ds_bytes(f.g.cap, es) <= limit;
    if (!f.one) f.L = layout(false);
    f.smem = f.L.total + (f.one ? ds_bytes(f.g.cap, es) : 0);
    f.nslots = det ? imin(f.g.npacks, kDetSlots) : f.g.npacks;
    f.hg = bwd_heads_per_cta(f.nslots, p.nH, (f.one ? 1 : 2) * sm_count());
  }
  if (f.smem > limit) return f;
  f.nhg = (p.nH + f.hg - 1) / f.hg;
  f.ok = true;
  return f;
}

}  // namespace wattn

size_t window_attention_bwd_workspace_bytes(const WindowAttentionParams& p, bool need_drpb, bool need_dbias,
                                            bool deterministic) {
  const wattn::BwdPlan f = wattn::plan_backward(p, need_drpb, need_dbias, deterministic);
  if (!f.ok) return wattn::legacy::bwd_workspace_bytes(p, need_drpb, need_dbias, deterministic);
  if (!deterministic) return 0;
  // partials: drpb [nslots][nH][T], then (cosine mode) the logit scale's [nslots][nH]
  return size_t(f.nslots) * p.nH * ((need_drpb ? f.g.T : 0) + (p.logit_scale ? 1 : 0)) * sizeof(float);
}

int64_t window_attention_bwd_sums_floats(const WindowAttentionParams& p) {
  return 4 + int64_t(2 * p.rh - 1) * (2 * p.rw - 1) * p.nH + p.nH;  // ticket (16 B), drpb (T,nH), dls (nH)
}

bool window_attention_fits(const WindowAttentionParams& p, bool backward, bool need_drpb, bool deterministic) {
  if (!backward) return wattn::fused_forward_fits(p) || wattn::legacy::fits(p, false, false, false);
  return wattn::plan_backward(p, need_drpb, false, deterministic).ok || wattn::legacy::fits(p, true, need_drpb, deterministic);
}

cudaError_t window_attention_backward(const WindowAttentionParams& p, const WindowAttentionBwdBuffers& b,
                                      cudaStream_t stream) {
  using namespace wattn;
  const BwdPlan f = plan_backward(p, b.need_drpb, b.need_dbias, b.deterministic);
  if (!f.ok) return legacy::backward(p, b, stream);
  cudaError_t err = cudaSuccess;
  if (p.B == 0 || p.nH == 0) {  // empty sums are zero
    if (b.need_drpb && (err = cudaMemsetAsync(b.drpb, 0, size_t(f.g.T) * p.nH * sizeof(float), stream)) != cudaSuccess)
      return err;
    return b.dlogit_scale ? cudaMemsetAsync(b.dlogit_scale, 0, size_t(p.nH) * sizeof(float), stream) : cudaSuccess;
  }
  // Fast mode adds into zeroed sums: the caller's persistent ones (b.sums: copied out and zeroed again by
  // the last CTA) or the outputs themselves after a memset. Deterministic mode: partials in the workspace,
  // each CTA zeroing its own, then summed in order into the outputs (sum_parts).
  const bool own = !b.deterministic && b.sums != nullptr;
  float* drpb_dst = nullptr;
  if (b.need_drpb) {
    drpb_dst = b.deterministic ? static_cast<float*>(b.workspace) : own ? b.sums + 4 : b.drpb;
    if (!b.deterministic && !own &&
        (err = cudaMemsetAsync(drpb_dst, 0, size_t(f.g.T) * p.nH * sizeof(float), stream)) != cudaSuccess)
      return err;
  }
  float* dls_dst = nullptr;  // cosine mode: (nH) sums, or deterministic partials after drpb's
  if (b.dlogit_scale) {
    float* parts = static_cast<float*>(b.workspace) + (b.need_drpb ? size_t(f.nslots) * f.g.T * p.nH : 0);
    dls_dst = b.deterministic ? parts : own ? b.sums + 4 + size_t(f.g.T) * p.nH : b.dlogit_scale;
    if (!b.deterministic && !own && (err = cudaMemsetAsync(dls_dst, 0, size_t(p.nH) * sizeof(float), stream)) != cudaSuccess)
      return err;
  }
  BwdArgs a{f.g, b.dout, b.out, b.lse, b.dqkv, drpb_dst, dls_dst, f.hg, f.nhg, f.nslots, f.tmax, f.pers ? 1 : 0};
  if (own && (drpb_dst != nullptr || dls_dst != nullptr)) {
    a.ticket = reinterpret_cast<unsigned*>(b.sums);
    a.drpb_out = b.drpb;
    a.dls_out = b.dlogit_scale;
  }
  const dim3 grid(static_cast<unsigned>(f.nslots * f.nhg));
  auto body = [&](auto dc) -> cudaError_t {
    constexpr int D = decltype(dc)::value;
    return dispatch_b16(p.dtype, [&](auto tc) -> cudaError_t {
      using T = typename decltype(tc)::type;
      return dispatch_bias(p, [&](auto bias, auto) -> cudaError_t {
        constexpr int BIAS = decltype(bias)::value;
        auto kernel = p.logit_scale ? (b.deterministic ? wattn_bwd_kernel<T, D, BIAS, true, true, false>
                                                       : wattn_bwd_kernel<T, D, BIAS, false, true, false>)
                      : f.one       ? (b.deterministic ? wattn_bwd_kernel<T, D, BIAS, true, false, true>
                                                       : wattn_bwd_kernel<T, D, BIAS, false, false, true>)
                                    : (b.deterministic ? wattn_bwd_kernel<T, D, BIAS, true, false, false>
                                                       : wattn_bwd_kernel<T, D, BIAS, false, false, false>);
        cudaError_t e = prepare_smem(kernel, f.smem);
        if (e != cudaSuccess) return e;
        return MK_LAUNCH(kernel, grid, dim3(kThreads), f.smem, stream, a);
      });
    });
  };
  switch (p.d) {
    case 16: err = body(std::integral_constant<int, 16>{}); break;
    case 32: err = body(std::integral_constant<int, 32>{}); break;
    default: err = body(std::integral_constant<int, 64>{}); break;  // plan_backward: d <= 64
  }
  if (err != cudaSuccess || !b.deterministic) return err;
  if (b.dlogit_scale && (err = legacy::sum_parts(dls_dst, b.dlogit_scale, f.nslots, p.nH, 0, p.nH, stream)) != cudaSuccess)
    return err;
  if (!b.need_drpb) return cudaSuccess;
  return legacy::sum_parts(drpb_dst, b.drpb, f.nslots, int64_t(f.g.T) * p.nH, f.g.T, p.nH, stream);
}

}  // namespace mixkernels::cuda
