// Thin torch binding of the CUDA window attention (kernels: window_attention*.cu). Schemas and
// layouts: csrc/ops.cpp. Allocates outputs on the caller's device and launches on the current
// stream; no host synchronization (CUDA-graph safe).
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "mixkernels/checks.h"
#include "mixkernels/limits.h"
#include "mixkernels/torch_cuda.h"
#include "mixkernels/window_attention_cuda.h"

namespace mixkernels::cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The kernels use 16-byte vector accesses; a view with an odd storage offset gets a fresh copy.
at::Tensor aligned16(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

void check_aux(const OptTensor& t, const at::Tensor& qkv, const char* name, at::ScalarType dtype,
               at::ScalarType alt = at::ScalarType::Undefined) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == qkv.device(), "window_attention: ", name, " must be on ", qkv.device(), ", got ",
              t->device());
  TORCH_CHECK(t->scalar_type() == dtype || t->scalar_type() == alt, "window_attention: ", name, " must be ", dtype,
              (alt == at::ScalarType::Undefined ? "" : " or int64"), ", got ", t->scalar_type());
}

struct Prepared {
  WindowAttentionParams p;
  at::Tensor qkv, rpb, attn_bias, group, coords, logit_scale;  // keep the (possibly copied) tensors alive
};

// Cosine mode (SwinV2): logit_scale float32 (nH,) on qkv's device; the kernels take scale 1.
void set_logit_scale(Prepared& r, const at::Tensor& ls, const char* op) {
  TORCH_CHECK(ls.device() == r.qkv.device() && ls.scalar_type() == at::kFloat && ls.dim() == 1 && ls.size(0) == r.p.nH,
              op, ": logit_scale must be float32 (", r.p.nH, ",) on qkv's device, got ", ls.sizes(), " ",
              ls.scalar_type());
  r.logit_scale = ls.contiguous();
  r.p.logit_scale = r.logit_scale.data_ptr<float>();
}

Prepared prepare(const at::Tensor& qkv_in, int64_t num_heads, int64_t wh, int64_t ww, int64_t sh, int64_t sw,
                 const OptTensor& rpb, const OptTensor& attn_bias, const OptTensor& group, const OptTensor& coords,
                 int64_t rh, int64_t rw, double scale) {
  TORCH_CHECK(qkv_in.is_cuda() && qkv_in.dim() == 4, "window_attention: qkv must be a 4-D CUDA tensor (B,H,W,3C)");
  TORCH_CHECK(num_heads > 0 && qkv_in.size(3) % (3 * num_heads) == 0, "window_attention: qkv's last dim ",
              qkv_in.size(3), " is not 3*num_heads*head_dim for num_heads=", num_heads);
  const int64_t B = qkv_in.size(0), H = qkv_in.size(1), W = qkv_in.size(2), d = qkv_in.size(3) / (3 * num_heads);
  TORCH_CHECK(wh > 0 && ww > 0 && H % wh == 0 && W % ww == 0, "window_attention: window (", wh, ",", ww,
              ") must divide the grid (", H, ",", W, ")");
  TORCH_CHECK(sh >= 0 && sw >= 0 && sh < wh && sw < ww, "window_attention: shift (", sh, ",", sw,
              ") must be in [0, window)");
  MK_CHECK_ARG(limits::supported_head_dim(d), "window_attention", "head_dim", "be 16/32/64/128 on CUDA", d);
  MK_CHECK_ARG(wh * ww <= limits::kMaxWindowTokens, "window_attention", "window_size",
               c10::str("have at most ", limits::kMaxWindowTokens, " tokens on CUDA"), wh * ww);
  TORCH_CHECK(rh > 0 && rw > 0, "window_attention: coord range must be positive, got (", rh, ",", rw, ")");
  TORCH_CHECK(B * H * W * num_heads < (int64_t(1) << 31),
              "window_attention: too many (token, head) pairs for 32-bit indices, got ", B * H * W * num_heads);
  TORCH_CHECK(qkv_in.numel() * qkv_in.element_size() < (int64_t(1) << 36),
              "window_attention: qkv larger than 64 GB (the kernels use 32-bit 16-byte offsets)");
  const int64_t N = wh * ww, T = (2 * rh - 1) * (2 * rw - 1);
  check_aux(rpb, qkv_in, "rpb", at::kFloat);
  check_aux(attn_bias, qkv_in, "attn_bias", at::kFloat);
  check_aux(group, qkv_in, "group", at::kInt, at::kLong);  // compared at full width (int64 labels stay exact)
  check_aux(coords, qkv_in, "coords", at::kInt, at::kLong);
  if (rpb) TORCH_CHECK(rpb->dim() == 2 && rpb->size(0) == T && rpb->size(1) == num_heads,
                       "window_attention: rpb must be (", T, ",", num_heads, "), got ", rpb->sizes());
  if (attn_bias) TORCH_CHECK(attn_bias->dim() == 3 && attn_bias->size(0) == num_heads && attn_bias->size(1) == N &&
                             attn_bias->size(2) == N, "window_attention: attn_bias must be (", num_heads, ",", N, ",",
                             N, "), got ", attn_bias->sizes());
  if (group) TORCH_CHECK(group->dim() == 3 && (group->size(0) == 1 || group->size(0) == B) &&
                         group->size(1) == H && group->size(2) == W,
                         "window_attention: group must be (1 or B,H,W), got ", group->sizes());
  if (coords) TORCH_CHECK(coords->dim() == 4 && (coords->size(0) == 1 || coords->size(0) == B) &&
                          coords->size(1) == H && coords->size(2) == W && coords->size(3) == 2,
                          "window_attention: coords must be (1 or B,H,W,2), got ", coords->sizes());

  Prepared r;
  r.qkv = aligned16(qkv_in);
  WindowAttentionParams& p = r.p;
  p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.W = static_cast<int>(W);
  p.nH = static_cast<int>(num_heads); p.d = static_cast<int>(d);
  p.wh = static_cast<int>(wh); p.ww = static_cast<int>(ww); p.sh = static_cast<int>(sh); p.sw = static_cast<int>(sw);
  p.rh = static_cast<int>(rh); p.rw = static_cast<int>(rw);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype_of(r.qkv);
  p.qkv = r.qkv.data_ptr();
  if (rpb) { r.rpb = rpb->contiguous(); p.rpb = r.rpb.data_ptr<float>(); }
  if (attn_bias) { r.attn_bias = attn_bias->contiguous(); p.attn_bias = r.attn_bias.data_ptr<float>(); }
  if (group) {
    r.group = group->contiguous();
    p.group = r.group.data_ptr();
    p.group_int64 = r.group.scalar_type() == at::kLong;
    p.group_batch = static_cast<int>(r.group.size(0));
  }
  if (coords) {
    r.coords = coords->contiguous();
    p.coords = r.coords.data_ptr();
    p.coords_int64 = r.coords.scalar_type() == at::kLong;
    p.coords_batch = static_cast<int>(r.coords.size(0));
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor> forward_impl(Prepared& r) {
  const auto& p = r.p;
  TORCH_CHECK(window_attention_fits(p, false, false, false),
              "window_attention: this configuration does not fit the device's shared memory");
  const int64_t nW = (p.H / p.wh) * (p.W / p.ww);
  auto out = at::empty({p.B, p.H, p.W, p.nH * p.d}, r.qkv.options());
  auto lse = at::empty({p.B * nW, p.nH, p.wh * p.ww}, r.qkv.options().dtype(at::kFloat));
  // the pack plans (batch-shared layouts): a stream-ordered allocation, valid under graph capture
  const size_t ws_bytes = window_attention_fwd_workspace_bytes(p);
  const at::Tensor ws = ws_bytes ? at::empty({static_cast<int64_t>(ws_bytes)}, r.qkv.options().dtype(at::kByte))
                                 : at::Tensor();
  MK_CHECK_LAUNCH(window_attention_forward(p, out.data_ptr(), lse.data_ptr<float>(), current_stream(),
                                           ws_bytes ? ws.data_ptr() : nullptr));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& qkv, int64_t num_heads, int64_t wh, int64_t ww,
                                              int64_t sh, int64_t sw, const OptTensor& rpb, const OptTensor& attn_bias,
                                              const OptTensor& group, const OptTensor& coords, int64_t rh, int64_t rw,
                                              double scale) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  Prepared r = prepare(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale);
  return forward_impl(r);
}

std::tuple<at::Tensor, at::Tensor> forward_cosine_op(const at::Tensor& qkv, int64_t num_heads, int64_t wh, int64_t ww,
                                                     int64_t sh, int64_t sw, const OptTensor& rpb,
                                                     const OptTensor& attn_bias, const OptTensor& group,
                                                     const OptTensor& coords, int64_t rh, int64_t rw,
                                                     const at::Tensor& logit_scale) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  Prepared r = prepare(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, 1.0);
  set_logit_scale(r, logit_scale, "window_attention_cosine");
  return forward_impl(r);
}

// dqkv, drpb, dbias and (cosine mode, need_dls) the raw (nH,) logit-scale sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    Prepared& r, const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const OptTensor& rpb, const OptTensor& attn_bias, int64_t rh, int64_t rw, bool need_drpb, bool need_dbias,
    bool need_dls, bool deterministic) {
  const auto& p = r.p;
  const int64_t C = p.nH * p.d, N = p.wh * p.ww, nW = (p.H / p.wh) * (p.W / p.ww);
  for (const at::Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->device() == qkv.device() && t->scalar_type() == qkv.scalar_type() &&
                    t->sizes() == at::IntArrayRef({p.B, p.H, p.W, C}),
                "window_attention_backward: dout/out must be (B,H,W,C) in qkv's dtype on its device, got ",
                t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(lse.device() == qkv.device() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({p.B * nW, p.nH, N}),
              "window_attention_backward: lse must be float32 (B*nW,nH,N), got ", lse.sizes(), " ", lse.scalar_type());
  need_drpb = need_drpb && rpb.has_value();
  need_dbias = need_dbias && attn_bias.has_value();
  TORCH_CHECK(window_attention_fits(p, true, need_drpb, deterministic),
              "window_attention_backward: this configuration (rpb table of ", (2 * rh - 1) * (2 * rw - 1),
              " entries) does not fit the device's shared memory");
  const at::Tensor dout_c = aligned16(dout), out_c = aligned16(out), lse_c = lse.contiguous();
  const auto facc = r.qkv.options().dtype(at::kFloat);
  auto dqkv = at::empty(r.qkv.sizes(), r.qkv.options());
  auto drpb = need_drpb ? at::empty(r.rpb.sizes(), facc) : at::empty({0}, facc);
  auto dbias = need_dbias ? at::empty({p.nH, N, N}, facc) : at::empty({0}, facc);
  auto dls = at::zeros({need_dls ? p.nH : 0}, facc);
  const size_t ws_bytes = window_attention_bwd_workspace_bytes(p, need_drpb, need_dbias, deterministic);
  auto ws = at::empty({static_cast<int64_t>(ws_bytes) + 16}, r.qkv.options().dtype(at::kByte));

  WindowAttentionBwdBuffers b;
  b.dout = dout_c.data_ptr();
  b.out = out_c.data_ptr();
  b.lse = lse_c.data_ptr<float>();
  b.dqkv = dqkv.data_ptr();
  b.drpb = need_drpb ? drpb.data_ptr<float>() : nullptr;
  b.dbias = need_dbias ? dbias.data_ptr<float>() : nullptr;
  b.workspace = ws.data_ptr();
  b.need_drpb = need_drpb;
  b.need_dbias = need_dbias;
  b.deterministic = deterministic;
  b.dlogit_scale = need_dls ? dls.data_ptr<float>() : nullptr;
  if (!deterministic && (need_drpb || need_dls))  // the stream's zeroed sums: no memset (none while capturing)
    b.sums = reinterpret_cast<float*>(
        stream_zeros(qkv, current_stream(), window_attention_bwd_sums_floats(p), StreamZeros::kAttentionSums));
  MK_CHECK_LAUNCH(window_attention_backward(p, b, current_stream()));
  return {dqkv, drpb, dbias, dls};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    int64_t wh, int64_t ww, int64_t sh, int64_t sw, const OptTensor& rpb, const OptTensor& attn_bias,
    const OptTensor& group, const OptTensor& coords, int64_t rh, int64_t rw, double scale, bool need_drpb,
    bool need_dbias, bool deterministic) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  Prepared r = prepare(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale);
  auto [dqkv, drpb, dbias, dls] =
      backward_impl(r, dout, qkv, out, lse, rpb, attn_bias, rh, rw, need_drpb, need_dbias, false, deterministic);
  return {dqkv, drpb, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cosine_op(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    int64_t wh, int64_t ww, int64_t sh, int64_t sw, const OptTensor& rpb, const OptTensor& attn_bias,
    const OptTensor& group, const OptTensor& coords, int64_t rh, int64_t rw, const at::Tensor& logit_scale,
    bool need_drpb, bool need_dbias, bool need_dlogit_scale, bool deterministic) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  Prepared r = prepare(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, 1.0);
  set_logit_scale(r, logit_scale, "window_attention_cosine_backward");
  auto [dqkv, drpb, dbias, dls] = backward_impl(r, dout, qkv, out, lse, rpb, attn_bias, rh, rw, need_drpb, need_dbias,
                                                need_dlogit_scale, deterministic);
  if (need_dlogit_scale)  // torch.clamp's gradient: exactly 0 where the logit scale is clamped
    dls = at::where(at::le(r.logit_scale, std::log(100.0)), dls, at::zeros({}, dls.options()));
  return {dqkv, drpb, dbias, dls};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CUDA, m) {
  m.impl("window_attention", &forward_op);
  m.impl("window_attention_backward", &backward_op);
  m.impl("window_attention_cosine", &forward_cosine_op);
  m.impl("window_attention_cosine_backward", &backward_cosine_op);
}

}  // namespace mixkernels::cuda
