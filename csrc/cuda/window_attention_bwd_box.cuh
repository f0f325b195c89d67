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
#include "window_attention_bwd_tiles.cuh"

namespace mixkernels::cuda::wattn {

struct BwdBox {
  int ey, ex, nx;
  int nb;     // entries: (2ey+1)(2ex+1)
  bool fits;  // nb <= the budget
  // box_entries' walk: this thread's first entry (threadIdx.x = r nx + c) as column c and full-table
  // index g; a step of kThreads entries adds sc columns and gstep to g, a column wrap adds wrap to g
  int c0, g0, sc, gstep, wrap;
};

// The box of half-widths ey, ex with box_entries' walk for this thread (block-uniform but for the walk).
__device__ __forceinline__ BwdBox box_of(const Geo& G, int ey, int ex, int tmax) {
  BwdBox x;
  x.ey = ey;
  x.ex = ex;
  x.nx = 2 * ex + 1;
  x.nb = (2 * ey + 1) * x.nx;
  x.fits = x.nb <= tmax;
  const int rw2 = 2 * G.rw - 1, first = (G.rh - 1 - ey) * rw2 + (G.rw - 1 - ex);  // full index of entry 0
  const int r0 = int(threadIdx.x) / x.nx, sr = kThreads / x.nx;
  x.c0 = int(threadIdx.x) - r0 * x.nx;
  x.g0 = first + r0 * rw2 + x.c0;
  x.sc = kThreads - sr * x.nx;
  x.gstep = sr * rw2 + x.sc;
  x.wrap = rw2 - x.nx;
  return x;
}

// After the barrier that publishes the pack's work lists (all threads): the box of the coordinates of
// the pack's cap slots (coord_box; padding slots hold (0, 0), which every window's own first token has
// too; scratch: the second half of S.items, the work lists take at most kMaxTiles entries), then, when
// it fits tmax entries, each slot's table offset rewritten to the box (S.qi[s].x = 4 Q(s), S.ki[s].x =
// -4 Q(s); the slot's own thread, read after the head loop's barriers). Block-uniform result.
__device__ __forceinline__ BwdBox pack_box(const Geo& G, const Pack& S, int tmax) {
  const bool has = threadIdx.x < G.cap;
  const int2 c = has ? S.cxy[threadIdx.x] : make_int2(0, 0);
  const int4 b = coord_box(S.items + kMaxTiles, c, has, G.rh, G.rw);  // {min y, min x, ey, ex}
  const BwdBox x = box_of(G, b.z, b.w, tmax);
  if (x.fits && has) {
    const int q = (c.x - b.x) * x.nx + (c.y - b.y);
    S.qi[threadIdx.x].x = 4 * q;
    S.ki[threadIdx.x].x = -4 * q;
  }
  return x;
}

// f(box entry, full-table entry) for this thread's share of the box: entries over the CTA's threads
// (the full-table index stepped along, no division per entry).
template <typename F>
__device__ __forceinline__ void box_entries(const BwdBox& x, F&& f) {
  int c = x.c0, g = x.g0;
#pragma unroll 1
  for (int e = threadIdx.x; e < x.nb; e += kThreads) {  // bwd box entries
    f(e, g);
    c += x.sc;
    g += x.gstep;
    if (c >= x.nx) c -= x.nx, g += x.wrap;
  }
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
