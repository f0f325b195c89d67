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
// Calls with attn_bias, float32, head_dim 128 or shapes that do not fit shared memory run the legacy
// kernels.
#include "window_attention_bwd_tiles.cuh"
#include "window_attention_common.cuh"
#include "window_attention_cosine.cuh"
#include "window_attention_legacy.cuh"

namespace mixkernels::cuda {
namespace wattn {

constexpr int kDetSlots = 256;  // deterministic mode: CTAs (x head groups) walking fixed pack sequences

struct BwdArgs {
  Geo g;
  const void* dout;
  const void* out;
  const float* lse;
  void* dqkv;
  float* drpb;  // fast: (T, nH), zeroed; deterministic: partials [nslots][nH][T], zeroed; null: not needed
  float* dls;   // cosine mode: fast (nH) zeroed; deterministic: partials [nslots][nH], zeroed; null: not needed
  int hg, nhg, nslots;
};

struct HeadSmem {
  const unsigned char* smem;
  const Pack* S;
  const void* q;
  const void* k;
  const void* v;
  const void* dO;
  const float2* nld;  // {-lse * log2(e), delta} per slot
  unsigned char* eb;  // gradient table entry 0 (this warp's in deterministic mode, this lane & 3's one-pass)
  unsigned char* zp;  // its entry T (reads the bias table's zero; its gradient is never flushed)
  int bias_off;       // bias of an entry - its gradient, bytes
  float* scratch;  // deterministic: 32 floats of this warp
  const float2* qk_inv;  // cosine mode: {1/|q|, 1/|k|} per slot (normalize_rows' convention), else null
  float hs;              // cosine mode: the head's exp(min(logit_scale, log 100))
  void* ds;              // one-pass plan: dS^T (cap x cap, pitch dsp), else null
  int dsp;
};

// Key tile, query block qb: dK and dV rows. ONE (the one-pass plan): dS^T of the block also goes to
// the shared dS^T matrix at dsr / dsr8 (this lane's rows, see store_ds_frag; rounded to T as the dK
// product uses it: the query pass's dQ reads the same values), and the bias gradient (DRPB) takes the
// block's fp32 dS here.
template <typename T, int D, int BIAS, int NT, bool MASKED, bool DET, bool DRPB, bool ONE>
__device__ __forceinline__ void key_block(const Geo& G, const HeadSmem& M, const AFrag<T, D>& ka, const AFrag<T, D>& va,
                                          const KSide (&ks)[2], T* dsr, T* dsr8, int qb, float (&dk)[D / 8][4],
                                          float (&dv)[D / 8][4], int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const int t = lane & 3, rh2 = 2 * G.rh - 1, rw2 = 2 * G.rw - 1;
  const T* sq = static_cast<const T*>(M.q) + qb * LD;
  const T* sdo = static_cast<const T*>(M.dO) + qb * LD;
  float st[NT][4], dpt[NT][4];
  constexpr bool kBatch = ONE && DRPB && !DET;  // the block's bias-gradient adds after its pairs
  constexpr int kES = ONE && !DET ? 2 : 1;       // floats per table entry (bwd_tab_floats)
  unsigned char* bent[kBatch ? 4 * NT : 1];
  scores<T, D, NT>(st, ka, sq, lane);
  scores<T, D, NT>(dpt, va, sdo, lane);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int q0 = qb + 8 * j + 2 * t;
    const int4 qi = *reinterpret_cast<const int4*>(M.S->qi + q0);
    const float4 nd = *reinterpret_cast<const float4*>(M.nld + q0);
    int4 qc = make_int4(0, 0, 0, 0);
    if constexpr (BIAS == 2) qc = *reinterpret_cast<const int4*>(M.S->cxy + q0);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      QSide q;
      q.qo = kES * (e ? qi.z : qi.x);
      q.key = e ? qi.w : qi.y;
      q.c = e ? make_int2(qc.z + G.rh - 1, qc.w + G.rw - 1) : make_int2(qc.x + G.rh - 1, qc.y + G.rw - 1);
      q.nl = e ? nd.z : nd.x;
      q.delta = e ? nd.w : nd.y;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float p, ds;
        unsigned char* entry;
        pair_grad<BIAS, MASKED, true, ONE && !DET>(st[j][2 * rr + e], dpt[j][2 * rr + e], q, ks[rr], G.scale,
                                                   ONE ? G.scale : 1.f,
                                M.bias_off, M.zp, rh2, rw2, p, ds, entry);
        st[j][2 * rr + e] = ds;  // dS^T
        dpt[j][2 * rr + e] = p;  // P^T
        if constexpr (kBatch)
          bent[4 * j + 2 * e + rr] = entry;
        else if constexpr (ONE && DRPB)
          table_add<DET>(entry, ds, M.scratch, lane);
      }
    }
  }
  if constexpr (kBatch) {
    float bv[4 * NT];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) bv[4 * j + 2 * e + rr] = st[j][2 * rr + e];
    table_add_batch(bent, bv);
  }
  accum<T, D, NT>(dv, dpt, sdo, lane);
  if constexpr (ONE) {
    static_assert(NT == 2, "one 16 x 16 dS block per step");
    uint32_t a[4];
    pack_frag<T>(a, st);
    store_ds_frag<T>(dsr, dsr8, qb, a);
    accum_frag<T, D>(dk, a, sq, lane);
  } else {
    accum<T, D, NT>(dk, st, sq, lane);
  }
}

// Query tile: dQ rows and the bias gradient. COS (cosine mode) also sums, per row, dS (z) and P * s
// (sbar, s = q'.k' the pair's cosine score): see query_item.
template <typename T, int D, int BIAS, bool DET, bool DRPB, bool COS, int NT, bool MASKED>
__device__ __forceinline__ void query_block(const Geo& G, const HeadSmem& M, const AFrag<T, D>& qa,
                                            const AFrag<T, D>& da, const QSide (&qs)[2], int kb,
                                            float (&dq)[D / 8][4], float (&z)[2], float (&sbar)[2], int lane) {
  constexpr int LD = Tile<T, D>::kLD;
  const int t = lane & 3, rh2 = 2 * G.rh - 1, rw2 = 2 * G.rw - 1;
  const T* sk = static_cast<const T*>(M.k) + kb * LD;
  float s[NT][4], dp[NT][4];
  scores<T, D, NT>(s, qa, sk, lane);
  scores<T, D, NT>(dp, da, static_cast<const T*>(M.v) + kb * LD, lane);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int k0 = kb + 8 * j + 2 * t;
    const int4 ki = *reinterpret_cast<const int4*>(M.S->ki + k0);
    int4 kc = make_int4(0, 0, 0, 0);
    if constexpr (BIAS == 2) kc = *reinterpret_cast<const int4*>(M.S->cxy + k0);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      KSide k;
      k.kb = e ? ki.z : ki.x;
      k.key = e ? ki.w : ki.y;
      k.c = e ? make_int2(kc.z, kc.w) : make_int2(kc.x, kc.y);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float p, ds;
        unsigned char* entry;
        pair_grad<BIAS, MASKED>(s[j][2 * rr + e], dp[j][2 * rr + e], qs[rr], k, G.scale, 1.f, M.bias_off, M.zp, rh2,
                                rw2, p, ds, entry);
        if constexpr (COS) {
          z[rr] += ds;
          sbar[rr] = fmaf(p, s[j][2 * rr + e], sbar[rr]);
        }
        s[j][2 * rr + e] = ds;
        if constexpr (DRPB)
          table_add<DET>(entry, ds, M.scratch, lane);
      }
    }
  }
  accum<T, D, NT>(dq, s, sk, lane);
}

// Walk the 16-key (or query) blocks of a tile's range; blocks inside one segment skip the mask.
// (16 columns per step: S and dP of 32 would not leave registers for the rest.) Two loops: the plain
// blocks [p0, p1) (a tile of 16 valid rows of one segment: the blocks inside that segment), then the
// masked ones, [lo & ~15, p0) and [p1, end); `plain` reaches the body as a constant (no branch per block).
template <typename F>
__device__ __forceinline__ void walk_blocks(const Pack& S, int tile, F&& body) {
  // Bounds broadcast from lane 0: warp-uniform for the compiler too (no divergence-safe shuffles).
  const int lo = __shfl_sync(kFull, S.lo[tile], 0), hi = __shfl_sync(kFull, S.hi[tile], 0), end = round16(hi);
  const bool uni = __shfl_sync(kFull, S.uni[tile], 0) != 0;
  int p0 = round16(lo), p1 = hi & ~15;
  if (!uni || p0 >= p1) p0 = p1 = end;
  constexpr std::integral_constant<int, 2> nt{};
  for (int b = p0; b < p1; b += 16) body(b, nt, std::true_type{});  // bwd plain blocks
  for (int b = (lo & ~15) == p0 ? p1 : lo & ~15; b < end; b = b + 16 == p0 ? p1 : b + 16)  // bwd masked blocks
    body(b, nt, std::false_type{});
}

template <typename T, int D, int BIAS, bool COS, bool DET = false, bool DRPB = false, bool ONE = false>
__device__ __forceinline__ void key_item(const BwdArgs& A, const HeadSmem& M, int tile, int h, T* stage, int lane) {
  using TL = Tile<T, D>;
  constexpr int kES = ONE && !DET ? 2 : 1;  // floats per table entry (bwd_tab_floats)
  const Geo& G = A.g;
  const Pack& S = *M.S;
  const int g = lane >> 2, r0 = 16 * tile;
  AFrag<T, D> ka, va;
  ka.load(static_cast<const T*>(M.k) + r0 * TL::kLD, lane);
  va.load(static_cast<const T*>(M.v) + r0 * TL::kLD, lane);
  KSide ks[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int slot = r0 + g + 8 * rr;
    ks[rr].kp = opaque_smem(M.eb + kES * (4 * table_center(G.rh, G.rw) + S.ki[slot].x), lane);
    ks[rr].key = S.ki[slot].y;
    ks[rr].c = S.cxy[slot];
  }
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dj][e] = dv[dj][e] = 0.f;
  T* dsr = ONE ? static_cast<T*>(M.ds) + (r0 + g) * M.dsp + 2 * (lane & 3) : nullptr;  // this lane's dS^T rows
  T* dsr8 = ONE ? dsr + 8 * M.dsp : nullptr;
  walk_blocks(S, tile, [&](int qb, auto nt, auto plain) {
    key_block<T, D, BIAS, decltype(nt)::value, !decltype(plain)::value, DET, DRPB, ONE>(G, M, ka, va, ks, dsr, dsr8,
                                                                                          qb, dk, dv, lane);
  });
  T* dqkv = static_cast<T*>(A.dqkv);
  if constexpr (COS)  // the gradient of k' = k / |k| back to k
    cosine_grad_rows<T, D, TL::kLD>(dk, static_cast<const T*>(M.k) + r0 * TL::kLD, M.qk_inv[r0 + g].y,
                                    M.qk_inv[r0 + g + 8].y, 1.f, false, false, lane);
  store_rows_bwd<T, D>(dk, ONE ? 1.f : G.scale, stage, dqkv + G.C + h * D, 3 * G.C, S.tok, r0, S.info[0], lane);
  store_rows_bwd<T, D>(dv, 1.f, stage, dqkv + 2 * G.C + h * D, 3 * G.C, S.tok, r0, S.info[0], lane);
}

// Returns this lane's share of the tile's logit-scale gradient (COS; 0 otherwise): sum over rows of
// <q', dq'> - z sbar = sum_j P (dP - delta)(s - sbar), which does not depend on delta: with delta
// from the rounded O, sum_j dS = z is not 0, and z sbar (logits up to ~116) would leak into the sum.
template <typename T, int D, int BIAS, bool DET, bool DRPB, bool COS>
__device__ __forceinline__ float query_item(const BwdArgs& A, const HeadSmem& M, int tile, int h, T* stage, int lane) {
  using TL = Tile<T, D>;
  const Geo& G = A.g;
  const Pack& S = *M.S;
  const int g = lane >> 2, r0 = 16 * tile;
  AFrag<T, D> qa, da;
  qa.load(static_cast<const T*>(M.q) + r0 * TL::kLD, lane);
  da.load(static_cast<const T*>(M.dO) + r0 * TL::kLD, lane);
  QSide qs[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int slot = r0 + g + 8 * rr;
    const int2 qi = S.qi[slot], c = S.cxy[slot];
    const float2 nd = M.nld[slot];
    qs[rr].qp = M.eb + 4 * table_center(G.rh, G.rw) + qi.x;  // two-pass: one float per entry
    qs[rr].key = qi.y;
    qs[rr].c = make_int2(c.x + G.rh - 1, c.y + G.rw - 1);
    qs[rr].nl = nd.x;
    qs[rr].delta = nd.y;
  }
  float dq[D / 8][4], z[2] = {0.f, 0.f}, sbar[2] = {0.f, 0.f};
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) dq[dj][0] = dq[dj][1] = dq[dj][2] = dq[dj][3] = 0.f;
  walk_blocks(S, tile, [&](int kb, auto nt, auto plain) {
    query_block<T, D, BIAS, DET, DRPB, COS, decltype(nt)::value, !decltype(plain)::value>(G, M, qa, da, qs, kb, dq, z,
                                                                                          sbar, lane);
  });
  float dls = 0.f;
  if constexpr (COS) {  // the gradient of q' = s_h q / |q| back to q
    const int nvalid = S.info[0];
    dls = cosine_grad_rows<T, D, TL::kLD>(dq, static_cast<const T*>(M.q) + r0 * TL::kLD, M.qk_inv[r0 + g].x,
                                          M.qk_inv[r0 + g + 8].x, M.hs, r0 + g < nvalid, r0 + g + 8 < nvalid, lane,
                                          quad_sum(z[0]) * quad_sum(sbar[0]), quad_sum(z[1]) * quad_sum(sbar[1]));
  }
  store_rows_bwd<T, D>(dq, G.scale, stage, static_cast<T*>(A.dqkv) + h * D, 3 * G.C, S.tok, r0, S.info[0], lane);
  return dls;
}

// One-pass plan, query tile: dQ = scale dS K from the dS^T blocks the key pass wrote (the tile
// ranges are symmetric: a (query tile, key block) pair is walked here iff the key tile's pass
// walked that query block, both being "some segment meets both tiles").
template <typename T, int D>
__device__ __forceinline__ void query_item_ds(const BwdArgs& A, const HeadSmem& M, int tile, int h, T* stage,
                                              int lane) {
  using TL = Tile<T, D>;
  const Geo& G = A.g;
  const Pack& S = *M.S;
  const int r0 = 16 * tile;
  const T* ds = static_cast<const T*>(M.ds);
  float dq[D / 8][4];
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) dq[dj][0] = dq[dj][1] = dq[dj][2] = dq[dj][3] = 0.f;
  // walk_blocks' range, not unrolled: nvcc unrolls this short body 4x, and the static report would
  // count each trip of the rule as four blocks
  const int lo = __shfl_sync(kFull, S.lo[tile], 0), end = round16(__shfl_sync(kFull, S.hi[tile], 0));
#pragma unroll 1
  for (int b = lo & ~15; b < end; b += 16) {
    uint32_t a[4];
    load_ds_frag<T>(a, ds, M.dsp, r0, b, lane);
    accum_frag<T, D>(dq, a, static_cast<const T*>(M.k) + b * TL::kLD, lane);
  }
  store_rows_bwd<T, D>(dq, 1.f, stage, static_cast<T*>(A.dqkv) + h * D, 3 * G.C, S.tok, r0, S.info[0], lane);
}

// Two CTAs per SM (two-pass plan) cap the kernel at 128 registers. At d = 32 nvcc 13.0 fits that on
// sm_90 (128, no spill) but not on sm_80 (a few bytes spilled, with a table bias or not, since the
// plain/masked walk loops), so on sm_80 the two-pass kernels run one CTA per SM. __launch_bounds__
// only matters in the device pass.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define MK_WATTN_BWD_TAB_TWO_CTAS false
#else
#define MK_WATTN_BWD_TAB_TWO_CTAS true
#endif

// ONE: the one-pass plan (S and dP once per pair, dS^T kept in shared memory: one CTA per SM).
template <typename T, int D, int BIAS, bool DET, bool COS, bool ONE>
__global__ void __launch_bounds__(kThreads, !ONE && D <= 32 && !DET && BIAS != 2 &&
                                                    MK_WATTN_BWD_TAB_TWO_CTAS ? 2 : 1)
    wattn_bwd_kernel(const BwdArgs A) {
  static_assert(!(ONE && COS), "cosine mode sums P s per query row: the two-pass plan");
  using TL = Tile<T, D>;
  constexpr bool kTab = BIAS != 0;
  const Geo& G = A.g;
  MK_DYNAMIC_SMEM(smem);
  const size_t tabf = !kTab ? 0 : bwd_tab_floats(G.T, DET, ONE);
  constexpr bool kIL = ONE && !DET;  // interleaved {bias, gradient} tables (bwd_tab_floats)
  constexpr int kTabs = DET ? kWarps : ONE ? 4 : 1, kES = kIL ? 2 : 1;  // gradient tables, floats per entry
  const Layout L = make_layout(G, int(sizeof(T)), D, 5, 1, true, tabf);
  const Pack S(smem, L);
  const int slot = blockIdx.x / A.nhg, h0 = (blockIdx.x - slot * A.nhg) * A.hg, nh = imin(A.hg, G.nH - h0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool drpb = kTab && A.drpb != nullptr;
  T* op[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) op[i] = reinterpret_cast<T*>(smem + L.ops + i * L.tile_bytes);  // q k v dO O
  float* tab = reinterpret_cast<float*>(smem + L.tab);
  float* dtab = reinterpret_cast<float*>(smem + L.dtab);
  const int tab_stride_f = kES * (G.T + 1);
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
    M.eb = smem + ent;
    M.zp = M.eb + kES * 4 * G.T;
    M.bias_off = kIL ? 4 : static_cast<int>(L.tab) - ent;
  }
  M.scratch = dtab + kWarps * tab_stride_f + 32 * warp;
  float2* qk_inv = COS ? nld + G.cap : nullptr;  // cosine mode (make_layout reserves it)
  float* wdls = COS ? reinterpret_cast<float*>(qk_inv + G.cap) : nullptr;  // one per warp
  M.qk_inv = qk_inv;
  M.hs = 0.f;
  M.ds = ONE ? smem + L.total : nullptr;  // after the two-pass layout (plan_backward adds ds_bytes)
  M.dsp = ds_pitch(G.cap);

  if (drpb)  // zero once; the flush after each head zeroes what it read
    for (int e = threadIdx.x; e < kTabs * tab_stride_f; e += kThreads) dtab[e] = 0.f;
  for (int pack = slot; pack < G.npacks; pack += A.nslots) {
    __syncthreads();  // the previous pack is done with every shared array
    prologue<BIAS == 2>(G, pack, S, smem + L.ops);
    __syncthreads();  // tile ranges ready
    assign_tiles(S);
    __syncthreads();
    // Pack-wide values read right after the barrier and broadcast from lane 0: warp-uniform loops for
    // the compiler too (plain shuffles inside them, no divergence-safe fallbacks).
    const int nvalid = __shfl_sync(kFull, S.info[0], 0);
    const int it0 = __shfl_sync(kFull, S.wbeg[warp], 0), it1 = __shfl_sync(kFull, S.wbeg[warp + 1], 0);
    for (int i = 0; i < 5; ++i) zero_rows<T, D>(op[i], nvalid, G.cap);
    if (threadIdx.x < G.cap) nld[threadIdx.x] = make_float2(0.f, 0.f);
    if (threadIdx.x == 0) tab[G.T] = 0.f;
    for (int i = 0; i < nh; ++i) {
      const int h = h0 + i;
      load_head_rows<T, D>(op[0], L.tile_bytes, static_cast<const T*>(G.qkv) + h * D, 3 * G.C, G.C,
                           static_cast<const T*>(A.dout) + h * D, static_cast<const T*>(A.out) + h * D, G.C, S.tok,
                           nvalid);
      if constexpr (kTab) load_head_table(tab, G.rpb, G.T, G.nH, h);
      if (threadIdx.x < nvalid) prim::cp_async<4>(nl_raw + 2 * threadIdx.x, A.lse + S.lrow[threadIdx.x] + h * G.N);
      prim::cp_async_commit();
      prim::cp_async_wait<0>();
      __syncthreads();
      if constexpr (kTab && kIL) {  // the bias entries (the zero at T too) into the interleaved tables
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
            const int gi = kES * e;  // the gradient of entry e (interleaved: its bias after it)
            float sum = dtab[gi];
            dtab[gi] = 0.f;
#pragma unroll
            for (int w = 1; w < kTabs; ++w) {
              sum += dtab[w * tab_stride_f + gi];
              dtab[w * tab_stride_f + gi] = 0.f;
            }
            if (sum != 0.f)
              prim::red_add(reinterpret_cast<float*>(drpb_h + size_t(unsigned(e)) * row_bytes), sum * inv_dsc);
          }
        }
      }
    }
  }
}

struct BwdPlan {
  Geo g;
  Layout L;
  size_t smem = 0;  // L.total, plus the dS^T matrix in the one-pass plan
  int hg = 1, nhg = 1, nslots = 0;
  bool ok = false, one = false;
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
  f.L = layout(true);
  f.one = p.logit_scale == nullptr && as >= 0x1p-20f && as <= 0x1p20f && f.L.total + ds_bytes(f.g.cap, es) <= limit;
  if (!f.one) f.L = layout(false);
  f.smem = f.L.total + (f.one ? ds_bytes(f.g.cap, es) : 0);
  if (f.smem > limit) return f;
  f.nslots = det ? imin(f.g.npacks, kDetSlots) : f.g.npacks;
  f.hg = bwd_heads_per_cta(f.nslots, p.nH, (f.one ? 1 : 2) * sm_count());
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

bool window_attention_fits(const WindowAttentionParams& p, bool backward, bool need_drpb, bool deterministic) {
  if (!backward) return wattn::fused_forward_fits(p) || wattn::legacy::fits(p, false, false, false);
  return wattn::plan_backward(p, need_drpb, false, deterministic).ok || wattn::legacy::fits(p, true, need_drpb, deterministic);
}

cudaError_t window_attention_backward(const WindowAttentionParams& p, const WindowAttentionBwdBuffers& b,
                                      cudaStream_t stream) {
  using namespace wattn;
  const BwdPlan f = plan_backward(p, b.need_drpb, b.need_dbias, b.deterministic);
  if (!f.ok) return legacy::backward(p, b, stream);
  const size_t drpb_bytes = size_t(f.g.T) * p.nH * sizeof(float);
  float* drpb_dst = nullptr;
  cudaError_t err = cudaSuccess;
  if (b.need_drpb) {
    drpb_dst = b.deterministic ? static_cast<float*>(b.workspace) : b.drpb;
    const size_t n = b.deterministic ? size_t(f.nslots) * drpb_bytes : drpb_bytes;
    if ((err = cudaMemsetAsync(drpb_dst, 0, n, stream)) != cudaSuccess) return err;
  }
  float* dls_dst = nullptr;  // cosine mode: (nH) sums, or deterministic partials after drpb's
  if (b.dlogit_scale) {
    float* parts = static_cast<float*>(b.workspace) + (b.need_drpb ? size_t(f.nslots) * f.g.T * p.nH : 0);
    dls_dst = b.deterministic ? parts : b.dlogit_scale;
    const size_t n = size_t(b.deterministic ? f.nslots : 1) * p.nH * sizeof(float);
    if ((err = cudaMemsetAsync(dls_dst, 0, n, stream)) != cudaSuccess) return err;
  }
  if (p.B == 0 || p.nH == 0) return cudaSuccess;
  BwdArgs a{f.g, b.dout, b.out, b.lse, b.dqkv, drpb_dst, dls_dst, f.hg, f.nhg, f.nslots};
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
