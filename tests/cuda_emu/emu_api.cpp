// C entry points of the emulated CUDA launchers for the CPU tests (tests/cuda_emu.py loads this
// library with ctypes). They forward to the torch-free launchers of csrc/cuda unchanged; tensors
// are CPU memory standing in for device memory.
#include <cstdint>
#include <vector>

#include "mixkernels/losses_cuda.h"
#include "mixkernels/simmim_loss_cuda.h"
#include "mixkernels/tokens_cuda.h"
#include "mixkernels/window_attention_cuda.h"
#include "simt_emu.h"

using namespace mixkernels::cuda;

extern "C" {

struct EmuWattn {
  int32_t B, H, W, nH, d, wh, ww, sh, sw, rh, rw, dtype;
  float scale;
  const void* qkv;
  const float* rpb;
  const float* attn_bias;
  const void* group;
  const void* coords;
  int32_t group_batch, coords_batch, group_int64, coords_int64;
  const float* logit_scale;  // cosine mode (null: off)
};

static WindowAttentionParams params(const EmuWattn& e) {
  WindowAttentionParams p;
  p.B = e.B; p.H = e.H; p.W = e.W; p.nH = e.nH; p.d = e.d;
  p.wh = e.wh; p.ww = e.ww; p.sh = e.sh; p.sw = e.sw; p.rh = e.rh; p.rw = e.rw;
  p.scale = e.scale;
  p.dtype = static_cast<DType>(e.dtype);
  p.qkv = e.qkv; p.rpb = e.rpb; p.attn_bias = e.attn_bias; p.group = e.group; p.coords = e.coords;
  p.group_batch = e.group_batch; p.coords_batch = e.coords_batch;
  p.group_int64 = e.group_int64 != 0; p.coords_int64 = e.coords_int64 != 0;
  p.logit_scale = e.logit_scale;
  return p;
}

void emu_seed(uint64_t seed) { emu::S().rng = seed ? seed : 0x9E3779B97F4A7C15ull; }
long long emu_collectives() { return emu::S().collectives; }

int emu_wattn_fits(const EmuWattn* e, int backward, int need_drpb, int det) {
  return window_attention_fits(params(*e), backward != 0, need_drpb != 0, det != 0);
}

long long emu_launches() { return emu::S().launches; }

int64_t emu_wattn_fwd_workspace(const EmuWattn* e) {
  return static_cast<int64_t>(window_attention_fwd_workspace_bytes(params(*e)));
}

// plan: give the launcher the workspace of the pack plans (as the binding does); 0: none (every CTA
// runs the pack prologue).
int emu_wattn_forward(const EmuWattn* e, void* out, float* lse, int plan) {
  const WindowAttentionParams p = params(*e);
  const size_t bytes = plan ? window_attention_fwd_workspace_bytes(p) : 0;
  std::vector<int4> ws(bytes / 16 + 1, make_int4(-7, -7, -7, -7));  // poison: the plan kernel writes it all
  return static_cast<int>(window_attention_forward(p, out, lse, nullptr, bytes ? ws.data() : nullptr));
}

int64_t emu_wattn_bwd_workspace(const EmuWattn* e, int need_drpb, int need_dbias, int det) {
  return static_cast<int64_t>(window_attention_bwd_workspace_bytes(params(*e), need_drpb, need_dbias, det));
}

int64_t emu_wattn_bwd_sums_floats(const EmuWattn* e) { return window_attention_bwd_sums_floats(params(*e)); }

// sums: the fast mode's zeroed persistent sums (WindowAttentionBwdBuffers::sums), or null (memsets).
int emu_wattn_backward(const EmuWattn* e, const void* dout, const void* out, const float* lse, void* dqkv, float* drpb,
                       float* dbias, void* workspace, int need_drpb, int need_dbias, int det, float* sums) {
  WindowAttentionBwdBuffers b;
  b.dout = dout; b.out = out; b.lse = lse; b.dqkv = dqkv; b.drpb = drpb; b.dbias = dbias; b.workspace = workspace;
  b.need_drpb = need_drpb != 0; b.need_dbias = need_dbias != 0; b.deterministic = det != 0; b.sums = sums;
  return static_cast<int>(window_attention_backward(params(*e), b, nullptr));
}

// Cosine mode: also the raw (nH,) logit-scale gradient sums (no clamp mask), when dls is given.
int emu_wattn_backward_cos(const EmuWattn* e, const void* dout, const void* out, const float* lse, void* dqkv,
                           float* drpb, float* dbias, float* dls, void* workspace, int need_drpb, int need_dbias,
                           int det, float* sums) {
  WindowAttentionBwdBuffers b;
  b.dout = dout; b.out = out; b.lse = lse; b.dqkv = dqkv; b.drpb = drpb; b.dbias = dbias; b.workspace = workspace;
  b.need_drpb = need_drpb != 0; b.need_dbias = need_dbias != 0; b.deterministic = det != 0; b.dlogit_scale = dls;
  b.sums = sums;
  return static_cast<int>(window_attention_backward(params(*e), b, nullptr));
}

}  // extern "C"

// ---- Token ops and losses: the launchers of csrc/include/mixkernels/{tokens,losses}_cuda.h.
extern "C" {
using I = int64_t;
using U8 = const uint8_t*;
int emu_mix_tokens(const void* x, U8 m, void* out, I B, I L, I C, I G, int dt) {
  return mix_tokens(x, m, out, B, L, C, G, DType(dt), nullptr);
}
int emu_mix_tokens_backward(const void* g, U8 m, void* dx, I B, I L, I C, I G, int dt) {
  return mix_tokens_backward(g, m, dx, B, L, C, G, DType(dt), nullptr);
}
int emu_unmix_tokens(const void* x, U8 m, const void* tok, const void* pos, void* out, I B, I L, I C, I G, int dt) {
  return unmix_tokens(x, m, tok, pos, out, B, L, C, G, DType(dt), nullptr);
}
I emu_token_tickets() { return kTokenTickets; }
I emu_unmix_tokens_backward_workspace(I B, I L, I C, int nt, int np) {
  return unmix_tokens_backward_workspace(B, L, C, nt != 0, np != 0);
}
int emu_unmix_tokens_backward(const void* g, U8 m, void* dx, float* dtok, float* dpos, float* ws, I B, I L, I C, I G,
                              int dt, unsigned* tickets) {
  return unmix_tokens_backward(g, m, dx, dtok, dpos, ws, B, L, C, G, DType(dt), nullptr, tickets);
}
int emu_window_partition(const void* x, void* out, I B, I H, I W, I C, I wh, I ww, I sh, I sw, int dt) {
  return window_partition(x, out, B, H, W, C, wh, ww, sh, sw, DType(dt), nullptr);
}
int emu_window_merge(const void* x, void* out, I B, I H, I W, I C, I wh, I ww, I sh, I sw, int dt) {
  return window_merge(x, out, B, H, W, C, wh, ww, sh, sw, DType(dt), nullptr);
}
int emu_uniform_sample(const void* x, U8 keep, U8 sec, const void* tok, void* out, I B, I H, I W, I C, I u, int dt) {
  return uniform_sample(x, keep, sec, tok, out, B, H, W, C, u, DType(dt), nullptr);
}
I emu_uniform_sample_backward_workspace(I B, I H, I W, I C, int nt) {
  return uniform_sample_backward_workspace(B, H, W, C, nt != 0);
}
int emu_uniform_sample_backward(const void* g, U8 keep, U8 sec, void* dx, float* dtok, float* ws, I B, I H, I W, I C,
                                I u, int dt, unsigned* tickets) {
  return uniform_sample_backward(g, keep, sec, dx, dtok, ws, B, H, W, C, u, DType(dt), nullptr, tickets);
}
int emu_uniform_scatter(const void* c, U8 keep, void* out, I B, I H, I W, I C, I u, int dt) {
  return uniform_scatter(c, keep, out, B, H, W, C, u, DType(dt), nullptr);
}
int emu_mixmim_loss_fwd(const void* pred, int pt, const void* imgs, int it, U8 m, I ms, float* out, I B, I H, I W,
                        int p, int norm, float eps) {
  return mixmim_loss_fwd(pred, DType(pt), imgs, DType(it), m, ms, out, B, H, W, p, norm != 0, eps, nullptr);
}
int emu_mixmim_loss_bwd(const float* g, const void* pred, int pt, const void* imgs, int it, U8 m, I ms, void* dpred, I B,
                        I H, I W, int p, int norm, float eps) {
  return mixmim_loss_bwd(g, pred, DType(pt), imgs, DType(it), m, ms, dpred, B, H, W, p, norm != 0, eps, nullptr);
}
int emu_masked_loss_fwd(const void* pred, int pt, const void* imgs, int it, const int64_t* idx, float* out, I B, I Lp,
                        I H, I W, int p, int norm, float eps) {
  return masked_recon_loss_fwd(pred, DType(pt), imgs, DType(it), idx, out, B, Lp, H, W, p, norm != 0, eps, nullptr);
}
int emu_masked_loss_bwd(const float* g, const void* pred, int pt, const void* imgs, int it, const int64_t* idx,
                        void* dpred, I B, I Lp, I H, I W, int p, int norm, float eps) {
  return masked_recon_loss_bwd(g, pred, DType(pt), imgs, DType(it), idx, dpred, B, Lp, H, W, p, norm != 0, eps,
                               nullptr);
}
int emu_simmim_loss_fwd(const void* pred, int pt, const void* imgs, int it, U8 m, I ms, float* out, I B, I C, I H,
                        I W, int p) {
  return simmim_loss_fwd(pred, DType(pt), imgs, DType(it), m, ms, out, B, C, H, W, p, nullptr);
}
int emu_simmim_loss_bwd(const float* g, const void* pred, int pt, const void* imgs, int it, U8 m, I ms, void* dpred,
                        I B, I C, I H, I W, int p) {
  return simmim_loss_bwd(g, pred, DType(pt), imgs, DType(it), m, ms, dpred, B, C, H, W, p, nullptr);
}
}  // extern "C"
