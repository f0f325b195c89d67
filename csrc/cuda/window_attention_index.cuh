// Index math of the fused window-attention kernels: the window/pack geometry, the Swin shift
// regions and the relative-position table index. Plain __host__ __device__ code (no intrinsics):
// the launch plan on the host and the kernels on the device compute the same layout from it.
#pragma once
#include <cstddef>
#include <cstdint>

#include "device_prims.cuh"
#include "mixkernels/window_attention_cuda.h"

namespace mixkernels::cuda::wattn {

#define MK_HD __host__ __device__ __forceinline__

constexpr int kThreads = 256;  // threads per CTA of the fused kernels (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTiles = kThreads / 16;  // a pack holds at most 256 tokens = 16 row tiles
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

MK_HD int imin(int a, int b) { return a < b ? a : b; }
MK_HD int imax(int a, int b) { return a > b ? a : b; }
MK_HD int round16(int v) { return (v + 15) & ~15; }
MK_HD size_t align16(size_t v) { return (v + 15) & ~size_t(15); }

// Geometry of one call. A "pack" is P consecutive windows (of the rolled grid, row-major, batch
// outermost) processed by one CTA: their P*N tokens are the CTA's slots, padded to `cap`
// (a multiple of 16, at most 256). Windows past nwin in the last pack are padding.
struct Geo {
  int B, H, W, nH, d, wh, ww, sh, sw, rh, rw;
  int N, nWx, nW, nwin, T, C;
  int P, npacks, cap;
  int group_batch, coords_batch;
  bool group64, coords64;
  float scale;
  const void* qkv;
  const float* rpb;
  const float* attn_bias;
  const void* group;
  const void* coords;
  const float* logit_scale;  // cosine mode (window_attention_cosine.cuh), else null
};

// Windows per pack: the P with P * N <= 208 slots (13 row tiles: two CTAs' operands fit one SM's
// shared memory at head_dim 32) that wastes the fewest padded rows (ties: more windows).
constexpr int kPackSlots = 208;
MK_HD int pick_pack(int N, int nwin) {
  int best = 1;
  float best_fill = 0.f;
  for (int P = 1; P * N <= kPackSlots && P <= nwin; ++P) {
    const float fill = float(P * N) / float(round16(P * N));
    if (fill >= best_fill - 1e-6f) best = P, best_fill = fill;
  }
  return best;
}

inline Geo make_geo(const WindowAttentionParams& p, int P) {
  Geo g{};
  g.B = p.B; g.H = p.H; g.W = p.W; g.nH = p.nH; g.d = p.d;
  g.wh = p.wh; g.ww = p.ww; g.sh = p.sh; g.sw = p.sw; g.rh = p.rh; g.rw = p.rw;
  g.N = p.wh * p.ww;
  g.nWx = p.W / p.ww;
  g.nW = (p.H / p.wh) * g.nWx;
  g.nwin = p.B * g.nW;
  g.T = (2 * p.rh - 1) * (2 * p.rw - 1);
  g.C = p.nH * p.d;
  g.P = P;
  g.npacks = (g.nwin + P - 1) / P;
  g.cap = round16(P * g.N);
  g.group_batch = p.group_batch;
  g.coords_batch = p.coords_batch;
  g.group64 = p.group_int64;
  g.coords64 = p.coords_int64;
  g.scale = p.scale;
  g.qkv = p.qkv; g.rpb = p.rpb; g.attn_bias = p.attn_bias; g.group = p.group; g.coords = p.coords;
  g.logit_scale = p.logit_scale;
  return g;
}

// Swin shift region of a rolled-grid row (or column) y: [0,n-w) -> 0, [n-w,n-s) -> 1, [n-s,n) -> 2.
MK_HD int band(int y, int n, int w, int s) { return s == 0 ? 0 : (y < n - w ? 0 : (y < n - s ? 1 : 2)); }

// Token j (row-major in the window) of window `win`: its original grid position and shift region.
struct TokenPos {
  int b;       // image
  int pos;     // oy * W + ox at the original (un-rolled) position
  int region;  // 3 * row band + column band on the rolled grid (0 without shift)
  int ly, lx;  // window-local row / column
};

MK_HD TokenPos token_pos(const Geo& G, int win, int j) {
  TokenPos t;
  t.b = win / G.nW;
  const int wi = win - t.b * G.nW, wy = wi / G.nWx, wx = wi - wy * G.nWx;
  t.ly = j / G.ww;
  t.lx = j - t.ly * G.ww;
  const int y = wy * G.wh + t.ly, x = wx * G.ww + t.lx;  // rolled grid
  int oy = y + G.sh, ox = x + G.sw;                     // rolled (y, x) is original ((y+sh)%H, (x+sw)%W)
  if (oy >= G.H) oy -= G.H;
  if (ox >= G.W) ox -= G.W;
  t.pos = oy * G.W + ox;
  t.region = 3 * band(y, G.H, G.wh, G.sh) + band(x, G.W, G.ww, G.sw);
  return t;
}

// Relative-position table: pair (q, k) reads entry (dy + rh-1) * (2rw-1) + (dx + rw-1) with
// (dy, dx) = coords(q) - coords(k). With P(c) = cy * (2rw-1) + cx that is P(q) - P(k) + center.
MK_HD int table_pos(int cy, int cx, int rw) { return cy * (2 * rw - 1) + cx; }
MK_HD int table_center(int rh, int rw) { return (rh - 1) * (2 * rw - 1) + (rw - 1); }
// Whether a coordinate difference has a table entry (out of range: no bias, the pair still attends).
MK_HD bool in_range(int dy, int dx, int rh, int rw) {
  return static_cast<unsigned>(dy + rh - 1) < static_cast<unsigned>(2 * rh - 1) &&
         static_cast<unsigned>(dx + rw - 1) < static_cast<unsigned>(2 * rw - 1);
}

// Coordinates relative to the window's first token are kept as int32 when every token of the
// window has |dy|, |dx| < coord_limit (then table_pos and its differences cannot overflow);
// otherwise the window's coordinates are compressed exactly (see compress_gap).
MK_HD int64_t coord_limit(int rw) { return (int64_t(1) << 28) / (2 * int64_t(rw)); }
MK_HD uint64_t magnitude(int64_t v) { return v < 0 ? uint64_t(0) - uint64_t(v) : uint64_t(v); }

// Gap compression of one coordinate axis (values v of a window, any int64): the step from a
// distinct value to the next larger one becomes min(step, cap) with cap = 2R. Differences below
// R stay exact, differences of at least R stay at least R: the same pairs get the same table
// entries, and the compressed values are small. This is the per-value step.
MK_HD int compress_gap(int64_t v, int64_t next, bool has_next, int cap) {
  if (!has_next) return 0;
  const uint64_t step = uint64_t(next) - uint64_t(v);  // next > v: exact in unsigned arithmetic
  return step < uint64_t(cap) ? static_cast<int>(step) : cap;
}

// ---- Shared-memory layout of the fused kernels (the host plan and the kernels use the same).
// Per-slot arrays (cap entries), per-tile info, nbuf bias tables (T+1 floats: entry T is the zero
// that out-of-range pairs read), the backward's bias-gradient tables, then the operand region:
// nbuf buffers of `ops` row tiles (cap rows, pitch D + 16/es elements). The backward stages its
// outputs in 16 rows per warp: in its last operand tile (O, dead once delta is computed) when that
// has at least 128 rows, else after the operands. The prologue's scratch aliases the operands.
struct Layout {
  size_t tok, qi, ki, lidx, lrow, cxy, seg, nld, tiles, tab, dtab, ops, stage, total;
  size_t tab_stride, buf_stride, tile_bytes;
};

MK_HD size_t prologue_scratch_bytes() {
  // labels, coords y/x (int64); region, segment id, coords y/x, steps y/x, start, total, warp sums
  // (int); per-warp segment counts
  return size_t(kThreads) * (8 * 3 + 4 * 10) + size_t(kWarps) * kThreads * 4;
}

MK_HD Layout make_layout(const Geo& G, int es, int D, int ops, int nbuf, bool stage, size_t dtab_floats) {
  Layout L{};
  const size_t cap = size_t(G.cap);
  size_t o = 0;
  L.tok = o; o = align16(o + cap * 4);
  L.qi = o; o = align16(o + cap * 8);
  L.ki = o; o = align16(o + cap * 8);
  L.lidx = o; o = align16(o + cap * 4);
  L.lrow = o; o = align16(o + cap * 4);
  L.cxy = o; o = align16(o + cap * 8);
  L.seg = o; o = align16(o + cap * 8);
  // backward: {-lse log2 e, delta} per slot; cosine mode adds {inv |q|, inv |k|} per slot and one
  // logit-scale partial per warp
  L.nld = o; o = align16(o + (stage ? cap * 8 + (G.logit_scale ? cap * 8 + kWarps * 4 : 0) : 0));
  L.tiles = o; o = align16(o + 4 * (3 * kMaxTiles + 2 * kMaxTiles + kWarps + 1 + 4));
  L.tab = o;
  L.tab_stride = align16(size_t(G.T + 1) * 4);
  o += L.tab_stride * nbuf;
  L.dtab = o; o = align16(o + dtab_floats * 4);
  L.ops = o;
  L.tile_bytes = cap * size_t(D + 16 / es) * es;
  L.buf_stride = L.tile_bytes * ops;
  size_t opsz = L.buf_stride * nbuf;
  const size_t scratch = prologue_scratch_bytes();
  if (opsz < scratch) opsz = scratch;
  o += align16(opsz);
  L.stage = L.ops + L.tile_bytes * (ops - 1);
  if (stage && cap < size_t(kWarps) * 16) {
    L.stage = o;
    o += size_t(kWarps) * 16 * size_t(D + 16 / es) * es;
  }
  L.total = align16(o);
  return L;
}

}  // namespace mixkernels::cuda::wattn

// ---- Host side of the launch plans.
namespace mixkernels::cuda::wattn {

// Opt-in shared memory per block of the current device. MIXKERNELS_WATTN_SMEM_LIMIT (bytes) can
// only lower it: tests use it to force the legacy kernels' column-chunked paths.
int smem_limit();
int sm_count();

template <typename Kernel>
inline cudaError_t prepare_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// Run `body(std::integral_constant<int, D>{})` for the supported head dims.
template <typename F>
inline cudaError_t dispatch_head_dim(int d, F&& body) {
  switch (d) {
    case 16: return body(std::integral_constant<int, 16>{});
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    case 128: return body(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Run `body(TypeTag<T>{})` for the 16-bit types (the fused kernels); float32 is not dispatched.
template <typename F>
inline cudaError_t dispatch_b16(DType t, F&& body) {
  if (t == DType::kFloat16) return body(TypeTag<__half>{});
  if (t == DType::kBFloat16) return body(TypeTag<__nv_bfloat16>{});
  return cudaErrorInvalidValue;
}

// Forward heads per CTA: the divisor of nH with the fewest CTAs per SM (slots = SMs) x (4 hg + 3)
// (a CTA's hg heads plus its pack prologue, ~3/4 of a head; the first on ties), among those that leave
// two CTAs on at least 3/4 of the SMs when any does (one CTA per SM halves the loads in flight: the
// static model then reads MixMIM-B stage 4 as memory-bound). Swin-T stage 4 (32 packs, 24 heads):
// 3 heads x 256 CTAs, was 4 x 192 (two on some SMs, one on the rest: 8 heads' work on the busiest).
inline int heads_per_cta(int packs, int nH, int slots) {
  int best = 1;
  int64_t best_t = -1;
  for (int pass = 0; pass < 2 && best_t < 0; ++pass) {
    for (int hg = 1; hg <= nH; ++hg) {
      const int64_t ctas = int64_t(packs) * (nH / hg);
      if (nH % hg != 0 || (pass == 0 && 2 * ctas < 3 * int64_t(slots))) continue;
      const int64_t t = (ctas + slots - 1) / slots * (4 * hg + 3);
      if (best_t < 0 || t < best_t) best = hg, best_t = t;
    }
  }
  return best;
}

// The most packs a range of ipc consecutive items (pack, head), pack-major with nH heads per pack, can
// touch: ranges start at multiples of ipc, i.e. at heads that are multiples of gcd(ipc, nH).
MK_HD int range_packs(int ipc, int nH) {
  int a = ipc, b = nH;
  while (b) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return (nH - a + ipc - 1) / nH + 1;
}

// Forward items per CTA for coords calls (the kernels that walk several packs, kWalk): CTA b runs the
// items [b ipc, (b+1) ipc) (wattn_fwd_kernel), a prologue per pack of its range and a head per item.
// The ipc with the fewest CTAs per SM (slots = SMs) x (8 ipc + 9 packs), packs the most a range touches:
// a coords pack's prologue (window coordinates, segment ids, sort, box) costs about 9/8 of a head there
// (static report, UM-MAE-T stage 1: ~1,500 and ~1,330 warp-instructions), unlike heads_per_cta's 3/4.
// heads_per_cta's filter (two CTAs on 3/4 of the SMs) is not applied: a coords CTA keeps a head's
// 3 x cap rows in flight at once (4,608 B per warp in the static model, enough for the HBM latency with
// one CTA per SM). UM-MAE-T stage 1 (683 packs of 3 windows, 3 heads): 129 CTAs of 16 items, 16 heads and
// at most 6 packs on the busiest SM (hg 3 ran 18 heads and 6 packs there; ranges of 4 or 8 items, two
// CTAs per SM, 16 heads and 8 packs). The kernel still fits two CTAs per SM (box tables).
inline int items_per_cta(int packs, int nH, int slots) {
  const int64_t items = int64_t(packs) * nH;
  int best = 1;
  int64_t best_t = -1;
  const int64_t top = (items + slots - 1) / slots;  // longer ranges leave SMs idle
  for (int ipc = 1; ipc <= top; ++ipc) {
    const int64_t ctas = (items + ipc - 1) / ipc;
    const int64_t t = (ctas + slots - 1) / slots * (8 * int64_t(ipc) + 9 * range_packs(ipc, nH));
    if (best_t < 0 || t < best_t) best = ipc, best_t = t;
  }
  return best;
}

// Whether the fused forward runs this call (else the legacy kernels do).
bool fused_forward_fits(const WindowAttentionParams& p);

// Bias variant: 0 none, 1 relative-position table, 2 table indexed by coords; `ab`: attn_bias.
template <typename F>
inline cudaError_t dispatch_bias(const WindowAttentionParams& p, F&& body) {
  const int mode = p.rpb == nullptr ? 0 : (p.coords != nullptr ? 2 : 1);
  auto with_ab = [&](auto m) -> cudaError_t {
    if (p.attn_bias) return body(m, std::true_type{});
    return body(m, std::false_type{});
  };
  switch (mode) {
    case 0: return with_ab(std::integral_constant<int, 0>{});
    case 1: return with_ab(std::integral_constant<int, 1>{});
    default: return with_ab(std::integral_constant<int, 2>{});
  }
}

}  // namespace mixkernels::cuda::wattn
