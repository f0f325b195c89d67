// Torch-free launchers of SimMIM's masked L1 loss kernels (csrc/cuda/simmim_loss.cu).
//
// Layouts (all contiguous): pred and imgs (B,C,H,W), possibly of different dtypes; mask uint8
// (G, L) over patches of p px, L = (H/p)*(W/p), read at row b*mask_stride (0 when batch-shared).
// Per-patch losses and incoming gradients are float32 (B, L); dpred has pred's dtype.
// Any patch size. Each returns the launch status.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "mixkernels/cuda_common.h"

namespace mixkernels::cuda {

// out (B,L): mean |pred - imgs| over each masked patch's C*p*p values, 0 for unmasked patches (not read).
cudaError_t simmim_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t, const uint8_t* mask,
                            int64_t mask_stride, float* out, int64_t B, int64_t C, int64_t H, int64_t W, int p,
                            cudaStream_t stream);

// dpred (B,C,H,W): sign(pred - imgs) * grad[b,l] / (C*p*p) on masked patches (sign(NaN) = 0), zeros elsewhere.
cudaError_t simmim_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                            const uint8_t* mask, int64_t mask_stride, void* dpred, int64_t B, int64_t C, int64_t H,
                            int64_t W, int p, cudaStream_t stream);

}  // namespace mixkernels::cuda
