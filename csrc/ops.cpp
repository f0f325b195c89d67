// Kernel-level operator schemas for every backend compiled into mixkernels.
//
// The public ops (mixkernels::*) are Python custom ops that validate, choose a backend and
// own autograd; they call these kernel-level ops for the compiled backends (CPU here, CUDA in
// _C_cuda via TORCH_LIBRARY_IMPL) and Python launchers with the same signatures for Triton.
// Every input arrives contiguous and already validated; layouts are documented per block.
#include <torch/library.h>

#include <string>
#include <vector>

#include "mixkernels/checks.h"
#include "mixkernels/limits.h"

namespace {

// The kernel limits of mixkernels/limits.h by name (tests compare them with mixkernels/ops/limits.py).
std::vector<int64_t> limits(const std::string& name) {
  namespace L = mixkernels::limits;
  if (name == "head_dims") return {std::begin(L::kHeadDims), std::end(L::kHeadDims)};
  if (name == "max_window_tokens") return {L::kMaxWindowTokens};
  if (name == "cuda_max_loss_patch") return {L::kCudaMaxLossPatch};
  MK_CHECK_ARG(false, "limits", "name", "be one of head_dims, max_window_tokens, cuda_max_loss_patch", name);
  return {};
}

}  // namespace

TORCH_LIBRARY(mixkernels_C, m) {
  // ---- The kernel limits (mixkernels/limits.h) by name, for the Python twin's test. ----
  m.def("limits(str name) -> int[]", &limits);

  // ---- MixMIM mixing. x (B,L,C); mask uint8 (G,L), G in {1,B}. ----
  m.def("mix_tokens(Tensor x, Tensor mask) -> Tensor");
  m.def("mix_tokens_backward(Tensor grad, Tensor mask) -> Tensor");
  // unmix: mask_token (C,) and pos_embed (L,C) in x.dtype; out (2B,L,C).
  // backward -> (dx (B,L,C) grad.dtype, dtoken (C,), dpos (L,C) or empty). Reduced gradients here and
  // below are float32 (float64 for float64 inputs: the `acc` dtype).
  m.def("unmix_tokens(Tensor x, Tensor mask, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  m.def("unmix_tokens_backward(Tensor grad, Tensor mask, bool need_token, bool need_pos) -> (Tensor, Tensor, Tensor)");

  // ---- Swin roll + window partition / merge + reverse roll. x (B,H,W,C) <-> (B*nW,N,C). ----
  m.def("window_partition(Tensor x, int wh, int ww, int sh, int sw) -> Tensor");
  m.def("window_merge(Tensor windows, int H, int W, int wh, int ww, int sh, int sw) -> Tensor");

  // ---- UM-MAE uniform sampling. x (B,H,W,C); keep uint8 (B,H/2u,W/2u) in 0..3;
  // secondary uint8 (B,H/2u,W/2u); mask_token (C,) x.dtype. ----
  m.def("uniform_sample(Tensor x, Tensor keep, int unit, Tensor? mask_token, Tensor? secondary) -> Tensor");
  // -> (dx (B,H,W,C) grad.dtype, dtoken (C,) acc or empty)
  m.def("uniform_sample_backward(Tensor grad, Tensor keep, int unit, Tensor? secondary, bool need_token) -> (Tensor, Tensor)");
  m.def("uniform_scatter(Tensor compact, Tensor keep, int unit) -> Tensor");

  // ---- Window attention. qkv (B,H,W,3C) channels (3,nH,d); rpb acc ((2rh-1)*(2rw-1),nH);
  // attn_bias acc (nH,N,N); group int32/int64 (G,H,W); coords int32/int64 (G,H,W,2) (G in {1,B},
  // indexed at the original position, compared exactly at their width; coords differences outside
  // (rh, rw) add no bias). Without coords, rh=wh, rw=ww (window-local coords).
  // -> (out (B,H,W,C) qkv.dtype, lse acc (B*nW,nH,N), windows of the rolled grid, row-major).
  m.def("window_attention(Tensor qkv, int num_heads, int wh, int ww, int sh, int sw, Tensor? rpb, "
        "Tensor? attn_bias, Tensor? group, Tensor? coords, int rh, int rw, float scale) -> (Tensor, Tensor)");
  // -> (dqkv (B,H,W,3C) qkv.dtype, drpb acc like rpb or empty, dbias acc (nH,N,N) or empty).
  // Contract for ANY given out/lse (every backend): with the logits S = scale*q k^T + biases (-inf
  // at shift/group-masked pairs), P = exp(S - lse) and delta = rowsum(dout * out) per head row,
  // dS = P * (dout v^T - delta) (0 at masked pairs), dv = P^T dout, dq = scale dS k, dk = scale dS^T q;
  // with the forward's own out/lse this is the exact gradient (spec: tests/fuzz_kernels_spec.py).
  m.def("window_attention_backward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
        "int wh, int ww, int sh, int sw, Tensor? rpb, Tensor? attn_bias, Tensor? group, Tensor? coords, "
        "int rh, int rw, float scale, bool need_drpb, bool need_dbias, bool deterministic) -> (Tensor, Tensor, Tensor)");
  // SwinV2 cosine attention: the same layouts, logit_scale acc (nH,) in place of scale (logits
  // normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100)) + biases + masks).
  // backward -> (dqkv, drpb, dbias, dlogit_scale acc (nH,) or empty), the gradient at the forward's
  // own out/lse: with logits up to ~116 a kernel may recompute P and delta from the logits (CPU does).
  m.def("window_attention_cosine(Tensor qkv, int num_heads, int wh, int ww, int sh, int sw, Tensor? rpb, "
        "Tensor? attn_bias, Tensor? group, Tensor? coords, int rh, int rw, Tensor logit_scale) -> (Tensor, Tensor)");
  m.def("window_attention_cosine_backward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
        "int wh, int ww, int sh, int sw, Tensor? rpb, Tensor? attn_bias, Tensor? group, Tensor? coords, "
        "int rh, int rw, Tensor logit_scale, bool need_drpb, bool need_dbias, bool need_dlogit_scale, "
        "bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- Reconstruction losses. imgs (B,3,H,W); pred D = p*p*3, last dim (p,p,3).
  // mixmim: pred (2B,L,D), mask uint8 (G,L) -> per-patch loss acc (B,L).
  // masked: pred (B,Lp,D), patch_idx int64 (B,Lp): patch of each pred row, -1 = not counted
  //         -> per-row loss acc (B,Lp) (0 where patch_idx < 0).
  // backward: grad acc like the forward output -> dpred like pred. ----
  m.def("mixmim_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps) -> Tensor");
  m.def("mixmim_loss_backward(Tensor grad, Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, "
        "float eps) -> Tensor");
  m.def("masked_recon_loss(Tensor pred, Tensor imgs, Tensor patch_idx, int patch_size, bool norm_pix, float eps) -> Tensor");
  m.def("masked_recon_loss_backward(Tensor grad, Tensor pred, Tensor imgs, Tensor patch_idx, int patch_size, "
        "bool norm_pix, float eps) -> Tensor");
  // simmim: pred, imgs (B,C,H,W) full resolution; mask uint8 (G,L) over patch_size patches
  //         -> per-patch mean |pred - imgs| acc (B,L) (0 where unmasked); backward -> dpred like pred.
  m.def("simmim_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size) -> Tensor");
  m.def("simmim_loss_backward(Tensor grad, Tensor pred, Tensor imgs, Tensor mask, int patch_size) -> Tensor");
}

// Registering the schemas is all this module does at load time; CPU kernels register
// themselves from csrc/cpu/*.cpp. A tiny Python module makes `import mixkernels._C` work.
#include <Python.h>
static struct PyModuleDef mixkernels_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mixkernels_C_module); }
