// Thin CUDA bindings of the fused reconstruction losses: checks, allocation, stream, launch.
#include <torch/library.h>

#include "mixkernels/losses_cuda.h"
#include "mixkernels/torch_cuda.h"

namespace mixkernels::cuda {
namespace {

void check_common(const char* op, const at::Tensor& pred, const at::Tensor& imgs, int64_t p) {
  TORCH_CHECK(pred.is_cuda() && imgs.device() == pred.device(), op, ": pred and imgs must be on the same CUDA device");
  TORCH_CHECK(pred.dim() == 3 && imgs.dim() == 4 && imgs.size(1) == 3, op, ": pred must be 3-D and imgs (B,3,H,W)");
  TORCH_CHECK(pred.is_contiguous() && imgs.is_contiguous(), op, ": pred and imgs must be contiguous");
  TORCH_CHECK(p >= 1 && p <= kMaxLossPatch, op, ": the CUDA kernels support patch_size 1..", kMaxLossPatch, ", got ", p,
              " (use backend='triton')");
  TORCH_CHECK(imgs.size(2) % p == 0 && imgs.size(3) % p == 0, op, ": image size not divisible by patch_size ", p);
  TORCH_CHECK(pred.size(2) == p * p * 3, op, ": pred's last dim must be patch_size**2 * 3 = ", p * p * 3);
  dtype_of(pred);
  dtype_of(imgs);
}

void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& pred, int64_t B, int64_t L) {
  TORCH_CHECK(mask.device() == pred.device() && mask.scalar_type() == at::kByte && mask.is_contiguous() &&
                  mask.dim() == 2 && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == L,
              op, ": mask must be contiguous uint8 (1 or B, L) on pred's device");
}

void check_idx(const char* op, const at::Tensor& idx, const at::Tensor& pred) {
  TORCH_CHECK(idx.device() == pred.device() && idx.scalar_type() == at::kLong && idx.is_contiguous() &&
                  idx.numel() == pred.size(0) * pred.size(1),
              op, ": patch_idx must be contiguous int64 (B, Lp) on pred's device");
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& pred, int64_t n) {
  TORCH_CHECK(grad.device() == pred.device() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.numel() == n,
              op, ": grad must be contiguous float32 with ", n, " elements");
}

int64_t num_patches(const at::Tensor& imgs, int64_t p) { return (imgs.size(2) / p) * (imgs.size(3) / p); }

at::Tensor mixmim_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t p,
                       bool norm_pix, double eps) {
  check_common("mixmim_loss", pred, imgs, p);
  const int64_t B = imgs.size(0), L = num_patches(imgs, p);
  TORCH_CHECK(pred.size(0) == 2 * B && pred.size(1) == L, "mixmim_loss: pred must be (2B, L, D)");
  check_mask("mixmim_loss", mask, pred, B, L);
  c10::cuda::CUDAGuard guard(pred.device());
  auto out = at::empty({B, L}, pred.options().dtype(at::kFloat));
  MK_CHECK_LAUNCH(mixmim_loss_fwd(pred.data_ptr(), dtype_of(pred), imgs.data_ptr(), dtype_of(imgs),
                                  mask.data_ptr<uint8_t>(), mask.size(0) == 1 ? 0 : L, out.data_ptr<float>(), B,
                                  imgs.size(2), imgs.size(3), static_cast<int>(p), norm_pix, static_cast<float>(eps),
                                  current_stream()));
  return out;
}

at::Tensor mixmim_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                const at::Tensor& mask, int64_t p, bool norm_pix, double eps) {
  check_common("mixmim_loss_backward", pred, imgs, p);
  const int64_t B = imgs.size(0), L = num_patches(imgs, p);
  TORCH_CHECK(pred.size(0) == 2 * B && pred.size(1) == L, "mixmim_loss_backward: pred must be (2B, L, D)");
  check_mask("mixmim_loss_backward", mask, pred, B, L);
  check_grad("mixmim_loss_backward", grad, pred, B * L);
  c10::cuda::CUDAGuard guard(pred.device());
  auto dpred = at::empty_like(pred);
  MK_CHECK_LAUNCH(mixmim_loss_bwd(grad.data_ptr<float>(), pred.data_ptr(), dtype_of(pred), imgs.data_ptr(),
                                  dtype_of(imgs), mask.data_ptr<uint8_t>(), mask.size(0) == 1 ? 0 : L, dpred.data_ptr(),
                                  B, imgs.size(2), imgs.size(3), static_cast<int>(p), norm_pix, static_cast<float>(eps),
                                  current_stream()));
  return dpred;
}

at::Tensor masked_recon_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& patch_idx, int64_t p,
                             bool norm_pix, double eps) {
  check_common("masked_recon_loss", pred, imgs, p);
  TORCH_CHECK(pred.size(0) == imgs.size(0), "masked_recon_loss: pred must be (B, Lp, D)");
  check_idx("masked_recon_loss", patch_idx, pred);
  const int64_t B = pred.size(0), Lp = pred.size(1);
  c10::cuda::CUDAGuard guard(pred.device());
  auto out = at::empty({B, Lp}, pred.options().dtype(at::kFloat));
  MK_CHECK_LAUNCH(masked_recon_loss_fwd(pred.data_ptr(), dtype_of(pred), imgs.data_ptr(), dtype_of(imgs),
                                        patch_idx.data_ptr<int64_t>(), out.data_ptr<float>(), B, Lp, imgs.size(2),
                                        imgs.size(3), static_cast<int>(p), norm_pix, static_cast<float>(eps),
                                        current_stream()));
  return out;
}

at::Tensor masked_recon_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                      const at::Tensor& patch_idx, int64_t p, bool norm_pix, double eps) {
  check_common("masked_recon_loss_backward", pred, imgs, p);
  TORCH_CHECK(pred.size(0) == imgs.size(0), "masked_recon_loss_backward: pred must be (B, Lp, D)");
  check_idx("masked_recon_loss_backward", patch_idx, pred);
  const int64_t B = pred.size(0), Lp = pred.size(1);
  check_grad("masked_recon_loss_backward", grad, pred, B * Lp);
  c10::cuda::CUDAGuard guard(pred.device());
  auto dpred = at::empty_like(pred);
  MK_CHECK_LAUNCH(masked_recon_loss_bwd(grad.data_ptr<float>(), pred.data_ptr(), dtype_of(pred), imgs.data_ptr(),
                                        dtype_of(imgs), patch_idx.data_ptr<int64_t>(), dpred.data_ptr(), B, Lp,
                                        imgs.size(2), imgs.size(3), static_cast<int>(p), norm_pix,
                                        static_cast<float>(eps), current_stream()));
  return dpred;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CUDA, m) {
  m.impl("mixmim_loss", &mixmim_loss);
  m.impl("mixmim_loss_backward", &mixmim_loss_backward);
  m.impl("masked_recon_loss", &masked_recon_loss);
  m.impl("masked_recon_loss_backward", &masked_recon_loss_backward);
}

}  // namespace mixkernels::cuda
