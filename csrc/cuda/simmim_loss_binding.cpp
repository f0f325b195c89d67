// Thin CUDA bindings of SimMIM's masked L1 loss: checks, allocation, stream, launch.
#include <torch/library.h>

#include "mixkernels/checks.h"
#include "mixkernels/simmim_checks.h"
#include "mixkernels/simmim_loss_cuda.h"
#include "mixkernels/torch_cuda.h"

namespace mixkernels::cuda {
namespace {

void check(const char* op, const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t p) {
  MK_CHECK_ARG(pred.is_cuda() && imgs.device() == pred.device() && mask.device() == pred.device(), op,
               "pred, imgs and mask", "be on one CUDA device", c10::str(pred.device(), ", ", imgs.device(), ", ",
                                                                       mask.device()));
  check_simmim(op, pred, imgs, mask, p);
  dtype_of(pred);
  dtype_of(imgs);
}

int64_t mask_stride(const at::Tensor& mask) { return mask.size(0) == 1 ? 0 : mask.size(1); }

at::Tensor simmim_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t p) {
  check("simmim_loss", pred, imgs, mask, p);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0), C = pred.size(1), H = pred.size(2), W = pred.size(3);
  auto out = at::empty({B, (H / p) * (W / p)}, pred.options().dtype(at::kFloat));
  MK_CHECK_LAUNCH(simmim_loss_fwd(pred.data_ptr(), dtype_of(pred), imgs.data_ptr(), dtype_of(imgs),
                                  mask.data_ptr<uint8_t>(), mask_stride(mask), out.data_ptr<float>(), B, C, H, W,
                                  static_cast<int>(p), current_stream()));
  return out;
}

at::Tensor simmim_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                const at::Tensor& mask, int64_t p) {
  constexpr const char* op = "simmim_loss_backward";
  check(op, pred, imgs, mask, p);
  const int64_t B = pred.size(0), C = pred.size(1), H = pred.size(2), W = pred.size(3);
  check_dtype(op, "grad", grad, at::kFloat);
  MK_CHECK_ARG(grad.device() == pred.device() && grad.is_contiguous() && grad.numel() == B * (H / p) * (W / p), op,
               "grad", c10::str("be contiguous (B, L) on pred's device with ", B * (H / p) * (W / p), " elements"),
               grad.sizes());
  c10::cuda::CUDAGuard guard(pred.device());
  auto dpred = at::empty_like(pred);
  MK_CHECK_LAUNCH(simmim_loss_bwd(grad.data_ptr<float>(), pred.data_ptr(), dtype_of(pred), imgs.data_ptr(),
                                  dtype_of(imgs), mask.data_ptr<uint8_t>(), mask_stride(mask), dpred.data_ptr(), B, C,
                                  H, W, static_cast<int>(p), current_stream()));
  return dpred;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CUDA, m) {
  m.impl("simmim_loss", &simmim_loss);
  m.impl("simmim_loss_backward", &simmim_loss_backward);
}

}  // namespace mixkernels::cuda
