// The fused backward's work items (window_attention_bwd.cu): the kernel's arguments and per-head shared
// pointers, the key pass of a 16-row tile (dK, dV; one-pass plan: dS^T and the bias gradient too),
// the two-pass query pass (dQ, bias gradient) and the one-pass query pass (dQ from dS^T).
#pragma once
#include "window_attention_bwd_tiles.cuh"
#include "window_attention_common.cuh"
#include "window_attention_cosine.cuh"

namespace mixkernels::cuda::wattn {
constexpr int kDetSlots = 256;  // deterministic mode: CTAs (x head groups) walking fixed pack sequences

struct BwdArgs {
  Geo g;
  const void* dout;
  const void* out;
  const float* lse;
  void* dqkv;
  float* drpb;  // fast: (T, nH) sums, zeroed; deterministic: partials [nslots][nH][T] (the kernel zeroes
                // its own); null: not needed
  float* dls;   // cosine mode: fast (nH) sums, zeroed; deterministic: partials [nslots][nH] (zeroed by
                // the kernel); null: not needed
  int hg, nhg, nslots;
  int tmax;  // coords box plan: the box tables' entries (window_attention_bwd_box.cuh), else 0
  int pers;  // coords box plan: 1 = persistent box tables over the CTA's packs (box_load / box_flush)
  // fast mode with the caller's persistent sums (WindowAttentionBwdBuffers::sums): drpb / dls point
  // into them, and the last CTA to finish (ticket) copies them to drpb_out / dls_out and zeroes them
  unsigned* ticket = nullptr;
  float* drpb_out = nullptr;
  float* dls_out = nullptr;
};

struct HeadSmem {
  const unsigned char* smem;
  const Pack* S;
  const void* q;
  const void* k;
  const void* v;
  const void* dO;
  const float2* nld;  // {-lse * log2(e), delta} per slot
  unsigned char* eb;  // gradient table's center entry (this warp's table in deterministic mode, this lane & 3's
                      // one-pass; coords box plan: the box's center, window_attention_bwd_box.cuh)
  unsigned char* zp;  // its zero entry T (reads the bias table's zero; its gradient is never flushed)
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
    ks[rr].kp = opaque_smem(M.eb + kES * S.ki[slot].x, lane);
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
    qs[rr].qp = M.eb + qi.x;  // two-pass: one float per entry
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

}  // namespace mixkernels::cuda::wattn
