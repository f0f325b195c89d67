// Torch-free launchers of the fused reconstruction-loss kernels (csrc/cuda/losses.cu).
//
// Layouts (all contiguous): pred (2B,L,D) for MixMIM or (B,Lp,D) for the masked loss, with
// D = p*p*3 in MAE's (p, p, 3) order; imgs (B,3,H,W); mask uint8 (G,L) read at row
// b*mask_stride (0 when batch-shared); patch_idx int64 (B,Lp), -1 = row not counted.
// Losses and incoming gradients are float32; dpred has pred's dtype. pred and imgs may have
// different dtypes. Supports patch sizes up to kMaxLossPatch. Each returns the launch status.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "mixkernels/cuda_common.h"
#include "mixkernels/limits.h"

namespace mixkernels::cuda {

constexpr int kMaxLossPatch = static_cast<int>(limits::kCudaMaxLossPatch);  // the one definition: limits.h

// out (B,L): per-patch MSE of unmix = pred[b] if mask[b,l] else pred[2B-1-b], against the target.
cudaError_t mixmim_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t, const uint8_t* mask,
                            int64_t mask_stride, float* out, int64_t B, int64_t H, int64_t W, int p, bool norm_pix,
                            float eps, cudaStream_t stream);

// dpred (2B,L,D): the row each patch used gets grad*2(u-t)/D, the other candidate row zeros.
cudaError_t mixmim_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                            const uint8_t* mask, int64_t mask_stride, void* dpred, int64_t B, int64_t H, int64_t W,
                            int p, bool norm_pix, float eps, cudaStream_t stream);

// out (B,Lp): per-row MSE against target patch patch_idx[b,r] (0 where patch_idx < 0).
cudaError_t masked_recon_loss_fwd(const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                                  const int64_t* patch_idx, float* out, int64_t B, int64_t Lp, int64_t H, int64_t W,
                                  int p, bool norm_pix, float eps, cudaStream_t stream);

// dpred (B,Lp,D): grad*2(u-t)/D per counted row, zeros for rows with patch_idx < 0.
cudaError_t masked_recon_loss_bwd(const float* grad, const void* pred, DType pred_t, const void* imgs, DType imgs_t,
                                  const int64_t* patch_idx, void* dpred, int64_t B, int64_t Lp, int64_t H, int64_t W,
                                  int p, bool norm_pix, float eps, cudaStream_t stream);

}  // namespace mixkernels::cuda
