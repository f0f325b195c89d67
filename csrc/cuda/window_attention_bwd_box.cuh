// The fused backward's coords box (window_attention_bwd.cu, fast mode, one-pass plan): per pack, the
// relative-position table entries its pairs can reach (every pair's coordinate difference lies in
// the box of the pack's coordinates; UM-MAE, coord_range 64: 33 x 33 of 127 x 127) are kept
// box-local in shared memory, the bias slice and the four {gradient, bias} tables alike, so the
// tables take (2ey+1)(2ex+1) entries instead of T and each head loads and flushes only those.
// A pair's box entry is Q(q) - Q(k) + center with Q(c) = (cy - min y) nx + (cx - min x), nx = 2ex + 1,
// center = ey nx + ex (ey = min(rh-1, the pack's y span), ex likewise); out-of-range differences
// (|dy| > rh-1 or |dx| > rw-1, edge rule 3) still take the zero entry (pair_grad's test is unchanged),
// and in-range ones have |dy| <= ey, |dx| <= ex. Packs whose box exceeds the plan's budget (tmax
// entries; coordinates spread wider than the budget) run the two-pass code on the whole table.
#pragma once
#include "window_attention_box.cuh"
#include "window_attention_bwd_tiles.cuh"

namespace mixkernels::cuda::wattn {

// The box helpers (CoordBox, box_of, pack_box, box_entries) are shared with the forward
// (window_attention_box.cuh); the backward's box is capped at the table's half-widths.
using BwdBox = CoordBox;

__device__ __forceinline__ BwdBox pack_box(const Geo& G, const Pack& S, int tmax) {
  return pack_box(G, S, tmax, G.rh - 1, G.rw - 1);
}

// Box fallback only (a pack whose box exceeds the budget): n floats of shared memory to zero.
__device__ __forceinline__ void zero_floats(float* p, int n) {
#pragma unroll 1
  for (int e = threadIdx.x; e < n; e += kThreads) p[e] = 0.f;  // bwd box fallback zeroing
}

// Persistent box tables (plan: several packs per CTA, A.pers): for each of the CTA's n heads the box's
// bias (pb, cp.async) and its gradient summed over the CTA's packs (pg, zeroed), tmax floats per head,
// loaded when a pack's box differs from the one they hold and flushed (one RED per entry and head) when
// it changes, before a whole-table fallback pack and after the CTA's last pack: the (T, nH) table is
// read and added to once per CTA instead of once per pack. Entry e of every box belongs to thread
// e % kThreads (box_entries), so loads, sums and flushes of one entry never cross threads.
__device__ __forceinline__ void box_load(const BwdBox& x, const float* rpb, int nH, int tmax, float* pb, float* pg,
                                         int h0, int n) {
#pragma unroll 1
  for (int i = 0; i < n; ++i) {  // bwd box loads
    float* b = pb + i * tmax;
    float* g = pg + i * tmax;
    const int h = h0 + i;
    box_entries(x, [&](int e, int gi) {
      prim::cp_async<4>(b + e, rpb + unsigned(gi * nH + h));
      g[e] = 0.f;
    });
  }
  prim::cp_async_commit();
}

// pg (times inv_dsc) into drpb (T, nH) for n heads from h0 (the RED skipped for an exact 0 sum).
__device__ __forceinline__ void box_flush(const BwdBox& x, float* drpb, int nH, int tmax, const float* pg,
                                          float inv_dsc, int h0, int n) {
  const unsigned row_bytes = static_cast<unsigned>(nH) * unsigned(sizeof(float));
#pragma unroll 1
  for (int i = 0; i < n; ++i) {  // bwd box flushes
    const float* g = pg + i * tmax;
    unsigned char* const dst = reinterpret_cast<unsigned char*>(drpb + h0 + i);
    box_entries(x, [&](int e, int gi) {
      const float v = g[e];
      if (v != 0.f) prim::red_add(reinterpret_cast<float*>(dst + size_t(unsigned(gi)) * row_bytes), v * inv_dsc);
    });
  }
}

}  // namespace mixkernels::cuda::wattn
