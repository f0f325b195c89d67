// Argument checks of the SimMIM loss kernel-level ops, shared by the CPU kernels and the CUDA
// binding: pred, imgs contiguous (B,C,H,W) of one shape, patch_size dividing (H, W), mask uint8
// (G, L) with G in {1, B}, L = (H/p)*(W/p).
#pragma once
#include <ATen/core/Tensor.h>

#include "mixkernels/checks.h"

namespace mixkernels {

inline void check_simmim(const char* op, const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask,
                         int64_t p) {
  check_contiguous(op, "pred", pred, 4, "(B,C,H,W)");
  check_contiguous(op, "imgs", imgs, 4, "(B,C,H,W)");
  check_shape(op, "imgs", imgs, pred.sizes());
  MK_CHECK_ARG(p > 0 && imgs.size(2) % p == 0 && imgs.size(3) % p == 0, op, "patch_size",
               c10::str("be positive and divide the image size (", imgs.size(2), ", ", imgs.size(3), ")"), p);
  const int64_t B = imgs.size(0), L = (imgs.size(2) / p) * (imgs.size(3) / p);
  check_dtype(op, "mask", mask, at::kByte);
  check_contiguous(op, "mask", mask, 2, "(G,L)");
  MK_CHECK_ARG((mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == L, op, "mask",
               c10::str("have shape (1 or ", B, ", ", L, ")"), mask.sizes());
}

}  // namespace mixkernels
