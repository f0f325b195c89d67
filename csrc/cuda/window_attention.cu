// Fused mask-aware window attention, forward (CUDA C++): the host side. plan_forward picks the
// layout (windows per pack, items per CTA, operand buffers, coords box budget, pack plans) and
// window_attention_forward launches the pack plans' kernel and then launch_forward<T, D>, whose
// kernels (window_attention_fwd.cuh) compile in their own translation units, one per (dtype,
// head_dim): window_attention_fwd_<dtype>_d<D>.cu.
#include <climits>
#include <cstdlib>

#include "window_attention_fwd.cuh"
#include "window_attention_legacy.cuh"

namespace mixkernels::cuda {
namespace wattn {

int smem_limit() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || v <= 0) v = 48 * 1024;
  if (const char* env = std::getenv("MIXKERNELS_WATTN_SMEM_LIMIT")) {
    const long cap = std::strtol(env, nullptr, 10);
    if (cap > 0 && cap < v) v = static_cast<int>(cap);
  }
  return v;
}

int sm_count() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return v > 0 ? v : 132;
}

int smem_per_sm() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
    return 0;
  return v > 0 ? v : 0;
}

// Launch plan: windows per pack, items per CTA, buffers, coords box budget; ok == false: use the
// legacy kernels.
struct FwdPlan {
  Geo g;
  Layout L;
  int ipc = 1, nctas = 0, nbuf = 1, tmax = 0;
  bool ok = false;
  int ppi = 0;  // > 0: pack plans apply (packs per image = plan positions), see window_attention_fwd_pack.cuh
};

// Coords calls: the box tables' entries (window_attention_box.cuh) for nbuf buffers. The most that
// keep two CTAs on an SM when that leaves room for the box of uniform-sampled windows ((4w+1)^2: a
// window of w compact tokens spans 2w positions; UM-MAE-T: 33 x 33, 1838 fit at cap 192, d 32), else
// the most that fit the limit (0: none).
int fwd_box_tmax(const Geo& g, int es, int d, int nbuf, int limit) {
  auto total = [&](int t) {
    Geo gb = g;
    gb.T = t;
    return make_layout(gb, es, d, 3, nbuf, false, 0).total;
  };
  auto most = [&](size_t cap) {  // the largest t in [1, 2^20] with total(t) <= cap, else 0
    int lo = 0, hi = 1 << 20;
    while (lo < hi) {
      const int mid = hi - (hi - lo) / 2;
      if (total(mid) <= cap) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  const int two = smem_per_sm() / 2 - 1024;  // per CTA, less the 1 KB the SM reserves per block
  const int want = (4 * g.wh + 1) * (4 * g.ww + 1);
  const int t2 = two > 0 ? most(static_cast<size_t>(imin(two, limit))) : 0;
  return t2 >= want ? t2 : most(static_cast<size_t>(limit));
}

FwdPlan plan_forward(const WindowAttentionParams& p) {
  FwdPlan f;
  const int es = element_size(p.dtype), N = p.wh * p.ww;
  const int nwin = p.B * (p.H / p.wh) * (p.W / p.ww);
  // scale > 0 keeps the max of s + bias/scale that of the logits; a normal scale keeps 1/scale finite.
  if (p.dtype == DType::kFloat32 || N > kThreads || nwin == 0 || !(p.scale >= 0x1p-60f && p.scale <= 0x1p60f))
    return f;
  f.g = make_geo(p, pick_pack(N, nwin));
  const int limit = smem_limit();
  const bool box = p.rpb != nullptr && p.coords != nullptr;  // dispatch_bias' mode 2
  // One-window coords kernels at head_dim 128 spill on sm_90 (ptxas, even at 255 registers): the
  // legacy kernels take those calls, and the dispatch below does not build them (kOneBuilt).
  if (box && f.g.P == 1 && p.d > 64) return f;
  // More items per CTA share the prologue; fewer fill the SMs evenly (items_per_cta; ranges over
  // several packs only for coords calls, the kernels that walk them: kWalk).
  f.ipc = box ? items_per_cta(f.g.npacks, p.nH, sm_count()) : heads_per_cta(f.g.npacks, p.nH, sm_count());
  if (const char* env = box ? std::getenv("MIXKERNELS_WATTN_FWD_IPC") : nullptr) {  // tests: ranges across packs
    const long v = std::strtol(env, nullptr, 10);
    if (v > 0 && v <= int64_t(f.g.npacks) * p.nH) f.ipc = static_cast<int>(v);
  }
  f.nctas = static_cast<int>((int64_t(f.g.npacks) * p.nH + f.ipc - 1) / f.ipc);
  for (int nbuf = f.ipc > 1 ? 2 : 1; nbuf >= 1; --nbuf) {
    Geo gb = f.g;
    if (box) {
      f.tmax = fwd_box_tmax(f.g, es, p.d, nbuf, limit);
      if (f.tmax < 1) continue;
      gb.T = f.tmax;  // the layout's tables: box tables
    }
    const Layout L = make_layout(gb, es, p.d, 3, nbuf, false, 0);
    if (L.total <= static_cast<size_t>(limit)) {
      f.L = L;
      f.nbuf = nbuf;
      f.ok = true;
      break;
    }
  }
  // Pack plans: the layout of a pack depends only on its position in the image when the labels and
  // coordinates are batch-shared and every image has whole packs (and some position has packs in
  // several images). Worth the extra launch (~3,000 warp-instructions per warp of the busiest SM's time
  // in the static model: 2 us launch + the plan kernel) when the busiest SM runs enough CTAs: a CTA's
  // prologue is ~950 per warp for one-window packs, ~660 for packs of several windows, i.e. at least 4
  // resp. 5 CTAs. MIXKERNELS_WATTN_PLAN=1 / 0: always / never where they apply (tests).
  const bool shared = (!p.group || p.group_batch == 1) && (!p.coords || p.coords_batch == 1);
  if (f.ok && shared && f.g.nW % f.g.P == 0 && p.B > 1) {
    const int sms = sm_count(), per_sm = (f.nctas + sms - 1) / sms;
    bool use = per_sm * (f.g.P == 1 ? 19 : 13) > 60;
    if (const char* env = std::getenv("MIXKERNELS_WATTN_PLAN"))
      use = env[0] == '1' ? true : env[0] == '0' ? false : use;
    if (use) f.ppi = f.g.nW / f.g.P;
  }
  return f;
}

bool fused_forward_fits(const WindowAttentionParams& p) { return plan_forward(p).ok; }

size_t plan_bytes(const FwdPlan& f) { return f.ppi > 0 ? size_t(f.ppi) * f.L.tab : 0; }

// The pack plans' kernel (window_attention_fwd_pack.cuh): one CTA per pack position.
cudaError_t launch_plan(const WindowAttentionParams& p, const FwdPlan& f, int4* workspace, cudaStream_t stream) {
  const bool box = p.rpb != nullptr && p.coords != nullptr;  // dispatch_bias' mode 2
  auto pk = box ? (f.g.P == 1 ? wattn_fwd_plan_kernel<true, true> : wattn_fwd_plan_kernel<true, false>)
                : (f.g.P == 1 ? wattn_fwd_plan_kernel<false, true> : wattn_fwd_plan_kernel<false, false>);
  const size_t psmem = plan_smem_bytes(f.L);
  const cudaError_t err = prepare_smem(pk, psmem);
  if (err != cudaSuccess) return err;
  return MK_LAUNCH(pk, dim3(static_cast<unsigned>(f.ppi)), dim3(kThreads), psmem, stream, f.g, f.L, workspace);
}

// The kernels: one translation unit per (dtype, head_dim), window_attention_fwd_<dtype>_d<D>.cu.
extern template MK_WATTN_FWD_INSTANCE(__half, 16);
extern template MK_WATTN_FWD_INSTANCE(__half, 32);
extern template MK_WATTN_FWD_INSTANCE(__half, 64);
extern template MK_WATTN_FWD_INSTANCE(__half, 128);
extern template MK_WATTN_FWD_INSTANCE(__nv_bfloat16, 16);
extern template MK_WATTN_FWD_INSTANCE(__nv_bfloat16, 32);
extern template MK_WATTN_FWD_INSTANCE(__nv_bfloat16, 64);
extern template MK_WATTN_FWD_INSTANCE(__nv_bfloat16, 128);

}  // namespace wattn

size_t window_attention_fwd_workspace_bytes(const WindowAttentionParams& p) {
  if (p.B == 0 || p.nH == 0) return 0;
  return wattn::plan_bytes(wattn::plan_forward(p));
}

cudaError_t window_attention_forward(const WindowAttentionParams& p, void* out, float* lse, cudaStream_t stream,
                                     void* workspace) {
  using namespace wattn;
  if (p.B == 0 || p.nH == 0) return cudaSuccess;
  const FwdPlan f = plan_forward(p);
  if (!f.ok) return legacy::forward(p, out, lse, stream);
  const bool use_plan = f.ppi > 0 && workspace != nullptr;  // no workspace: the in-kernel prologue
  FwdArgs a{f.g, f.L, out, lse, 1.f / p.scale, f.ipc, f.nbuf, f.tmax, static_cast<const int4*>(workspace), f.ppi};
  return dispatch_head_dim(p.d, [&](auto dc) -> cudaError_t {
    constexpr int D = decltype(dc)::value;
    return dispatch_b16(p.dtype, [&](auto tc) -> cudaError_t {
      if (use_plan) {
        const cudaError_t err = launch_plan(p, f, static_cast<int4*>(workspace), stream);
        if (err != cudaSuccess) return err;
      }
      return launch_forward<typename decltype(tc)::type, D>(p, a, f.nctas, f.L.total, use_plan, stream);
    });
  });
}

}  // namespace mixkernels::cuda
