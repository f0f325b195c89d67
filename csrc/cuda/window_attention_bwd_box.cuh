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
#include <climits>

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

// Before the barrier that publishes the pack's work lists: thread 0 resets the box scratch (the
// second half of S.items: the work lists take at most kMaxTiles entries).
__device__ __forceinline__ void box_reset(const Pack& S) {
  int* b = S.items + kMaxTiles;
  if (threadIdx.x == 0) b[0] = b[2] = INT_MAX, b[1] = b[3] = INT_MIN;
}

// After that barrier (all threads): the box of the coordinates of the pack's cap slots (padding slots
// hold (0, 0), which every window's own first token has too), then, when it fits tmax entries, each
// slot's table offset rewritten to the box (S.qi[s].x = 4 Q(s), S.ki[s].x = -4 Q(s); the slot's own
// thread, read after the head loop's barriers). Block-uniform result; one barrier inside.
__device__ __forceinline__ BwdBox pack_box(const Geo& G, const Pack& S, int tmax) {
  int* b = S.items + kMaxTiles;
  int2 c = make_int2(0, 0);
  if (threadIdx.x < G.cap) {
    c = S.cxy[threadIdx.x];
    atomicMin(b, c.x);
    atomicMax(b + 1, c.x);
    atomicMin(b + 2, c.y);
    atomicMax(b + 3, c.y);
  }
  __syncthreads();
  const int y0 = b[0], x0 = b[2];
  BwdBox x;
  // spans as unsigned differences (exact for any ints, max >= min), capped at the table's half-widths
  const unsigned sy = unsigned(b[1]) - unsigned(y0), sx = unsigned(b[3]) - unsigned(x0);
  x.ey = sy < unsigned(G.rh - 1) ? int(sy) : G.rh - 1;
  x.ex = sx < unsigned(G.rw - 1) ? int(sx) : G.rw - 1;
  x.nx = 2 * x.ex + 1;
  x.nb = (2 * x.ey + 1) * x.nx;
  x.fits = x.nb <= tmax;
  const int rw2 = 2 * G.rw - 1, first = (G.rh - 1 - x.ey) * rw2 + (G.rw - 1 - x.ex);  // full index of entry 0
  const int r0 = int(threadIdx.x) / x.nx, sr = kThreads / x.nx;
  x.c0 = int(threadIdx.x) - r0 * x.nx;
  x.g0 = first + r0 * rw2 + x.c0;
  x.sc = kThreads - sr * x.nx;
  x.gstep = sr * rw2 + x.sc;
  x.wrap = rw2 - x.nx;
  if (x.fits && threadIdx.x < G.cap) {
    const int q = (c.x - y0) * x.nx + (c.y - x0);
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

}  // namespace mixkernels::cuda::wattn
