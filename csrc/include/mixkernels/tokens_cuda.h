// Launchers of the CUDA token-op kernels (csrc/cuda/{mixing,windows,uniform}.cu). Torch-free:
// device pointers to contiguous tensors in the layouts of csrc/ops.cpp, sizes in elements, a
// stream; each returns the launch status. Reduced gradients are float32: fixed per-CTA partials in a
// caller-allocated float workspace, then a fixed-order reduce of them (the same bits either way) by
// the last CTA to finish, one launch in all, when the caller passes `tickets`, else by a second launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "mixkernels/cuda_common.h"

namespace mixkernels::cuda {

// `tickets` of the single-launch backward reductions: nullptr (two launches), or kTokenTickets
// unsigned counters that are zero on entry (every launch leaves them zero) and that no call running
// at the same time uses (e.g. one buffer per stream: calls on a stream run one after another).
constexpr int64_t kTokenTickets = 256;

// ---- mixing: x (B,L,C); mask uint8 (G,L), G in {1,B}.
cudaError_t mix_tokens(const void* x, const uint8_t* mask, void* out, int64_t B, int64_t L, int64_t C, int64_t G,
                       DType dtype, cudaStream_t stream);
cudaError_t mix_tokens_backward(const void* grad, const uint8_t* mask, void* dx, int64_t B, int64_t L, int64_t C,
                                int64_t G, DType dtype, cudaStream_t stream);
// token (C,), pos (L,C) or nullptr; out (2B,L,C).
cudaError_t unmix_tokens(const void* x, const uint8_t* mask, const void* token, const void* pos, void* out, int64_t B,
                         int64_t L, int64_t C, int64_t G, DType dtype, cudaStream_t stream);
// grad (2B,L,C) -> dx (B,L,C); dtoken (C,) / dpos (L,C) float32, each nullptr when not needed.
int64_t unmix_tokens_backward_workspace(int64_t B, int64_t L, int64_t C, bool need_token, bool need_pos);
cudaError_t unmix_tokens_backward(const void* grad, const uint8_t* mask, void* dx, float* dtoken, float* dpos,
                                  float* workspace, int64_t B, int64_t L, int64_t C, int64_t G, DType dtype,
                                  cudaStream_t stream, unsigned* tickets = nullptr);

// ---- windows: x (B,H,W,C) <-> windows (B*nW, wh*ww, C), roll by (-sh,-sw) folded in.
cudaError_t window_partition(const void* x, void* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t wh,
                             int64_t ww, int64_t sh, int64_t sw, DType dtype, cudaStream_t stream);
cudaError_t window_merge(const void* windows, void* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t wh,
                         int64_t ww, int64_t sh, int64_t sw, DType dtype, cudaStream_t stream);

// ---- uniform: x (B,H,W,C) full grid; compact (B,H/2,W/2,C); keep / secondary uint8 (B,H/2u,W/2u).
// secondary and token are nullptr without secondary masking. keep is read as keep & 3.
cudaError_t uniform_sample(const void* x, const uint8_t* keep, const uint8_t* secondary, const void* token, void* out,
                           int64_t B, int64_t H, int64_t W, int64_t C, int64_t unit, DType dtype, cudaStream_t stream);
int64_t uniform_sample_backward_workspace(int64_t B, int64_t H, int64_t W, int64_t C, bool need_token);
// grad (B,H/2,W/2,C) -> dx (B,H,W,C); dtoken (C,) float32 or nullptr (needs secondary).
cudaError_t uniform_sample_backward(const void* grad, const uint8_t* keep, const uint8_t* secondary, void* dx,
                                    float* dtoken, float* workspace, int64_t B, int64_t H, int64_t W, int64_t C,
                                    int64_t unit, DType dtype, cudaStream_t stream, unsigned* tickets = nullptr);
cudaError_t uniform_scatter(const void* compact, const uint8_t* keep, void* out, int64_t B, int64_t H, int64_t W,
                            int64_t C, int64_t unit, DType dtype, cudaStream_t stream);

}  // namespace mixkernels::cuda
