// The coords box of a pack (forward and backward, coords calls): the relative-position table entries
// its pairs can reach, kept box-local in shared memory. Every pair of a pack has both coordinates in
// the box of the pack's coordinates, so its difference lies in [-ey, ey] x [-ex, ex]; the box table
// takes (2ey+1)(2ex+1) entries instead of T (UM-MAE, coord_range 64: 33 x 33 of 127 x 127) and a head
// loads only those. A pair's box entry is Q(q) - Q(k) + center with Q(c) = (cy - min y) nx + (cx - min x),
// nx = 2ex + 1, center = ey nx + ex.
//   Backward (window_attention_bwd_box.cuh): ey = min(rh-1, the pack's y span), ex likewise; out-of-range
//   differences (edge rule 3) still take the table's zero entry (pair_grad's range test).
//   Forward (window_attention_fwd.cuh): ey, ex the uncapped spans; box entries whose difference is out of
//   the table's range hold 0 (rule 3), so a pair reads its entry with no range test at all.
// Packs whose box exceeds the plan's budget (tmax entries) run a whole-table fallback.
#pragma once
#include <climits>
#include <type_traits>

#include "window_attention_common.cuh"

namespace mixkernels::cuda::wattn {

struct CoordBox {
  int ey, ex, nx;
  int nb;     // entries: (2ey+1)(2ex+1) (meaningful when fits)
  bool fits;  // nb <= the budget
  // box_entries' walk: this thread's first entry (threadIdx.x = r nx + c) as column c and full-table
  // index g; a step of kThreads entries adds sc columns and gstep to g, a column wrap adds wrap to g
  int c0, g0, sc, gstep, wrap;
};

// The box of half-widths ey, ex (each <= tmax) with box_entries' walk for this thread (block-uniform
// but for the walk). g is linear in the box position: for entries outside the table's range (forward,
// uncapped boxes) it is no table index (box_entries' column says which are in range).
__device__ __forceinline__ CoordBox box_of(const Geo& G, int ey, int ex, int tmax) {
  CoordBox x;
  x.ey = ey;
  x.ex = ex;
  x.nx = 2 * ex + 1;
  const int64_t nb = int64_t(2 * ey + 1) * x.nx;  // ey, ex <= tmax: no int overflow in the factors
  x.fits = nb <= tmax;
  x.nb = x.fits ? int(nb) : 0;
  const int rw2 = 2 * G.rw - 1, first = (G.rh - 1 - ey) * rw2 + (G.rw - 1 - ex);  // full index of entry 0
  const int r0 = int(threadIdx.x) / x.nx, sr = kThreads / x.nx;
  x.c0 = int(threadIdx.x) - r0 * x.nx;
  x.g0 = first + r0 * rw2 + x.c0;
  x.sc = kThreads - sr * x.nx;
  x.gstep = sr * rw2 + x.sc;
  x.wrap = rw2 - x.nx;
  return x;
}

// After the barrier that publishes the pack's slots (all threads): the box of the coordinates of the
// pack's cap slots (coord_box; padding slots hold (0, 0), which every window's own first token has
// too; scratch: the second half of S.items, the work lists take at most kMaxTiles entries), the spans
// capped at cy / cx (backward: rh-1, rw-1; forward: tmax, where any larger span cannot fit), then, when
// it fits tmax entries, each slot's table offset rewritten to the box (S.qi[s].x = 4 Q(s), S.ki[s].x =
// -4 Q(s); the slot's own thread: read only after a later barrier). Block-uniform result.
__device__ __forceinline__ CoordBox pack_box(const Geo& G, const Pack& S, int tmax, int cy, int cx) {
  const bool has = threadIdx.x < G.cap;
  const int2 c = has ? S.cxy[threadIdx.x] : make_int2(0, 0);
  const int4 b = coord_box(S.items + kMaxTiles, c, has, cy + 1, cx + 1);  // {min y, min x, ey, ex}
  const CoordBox x = box_of(G, b.z, b.w, tmax);
  if (x.fits && has) {
    const int q = (c.x - b.x) * x.nx + (c.y - b.y);
    S.qi[threadIdx.x].x = 4 * q;
    S.ki[threadIdx.x].x = -4 * q;
  }
  return x;
}

// f(box entry, full-table entry) -- or f(entry, full-table entry, box column) -- for this thread's
// share of the box: entries over the CTA's threads (the full-table index stepped along, no division
// per entry).
template <typename F>
__device__ __forceinline__ void box_entries(const CoordBox& x, F&& f) {
  int c = x.c0, g = x.g0;
#pragma unroll 1
  for (int e = threadIdx.x; e < x.nb; e += kThreads) {  // bwd box entries
    if constexpr (std::is_invocable_v<F, int, int, int>)
      f(e, g, c);
    else
      f(e, g);
    c += x.sc;
    g += x.gstep;
    if (c >= x.nx) c -= x.nx, g += x.wrap;
  }
}

}  // namespace mixkernels::cuda::wattn
