// Torch-free launchers of the fused mask-aware window attention (csrc/cuda/window_attention*.cu).
// Layouts (see csrc/ops.cpp): qkv (B,H,W,3C) channels (3,nH,d); out/dout (B,H,W,C) in qkv's dtype;
// lse float32 (B*nW,nH,N) over the windows of the rolled grid; rpb float32 (T,nH) with
// T=(2rh-1)*(2rw-1); attn_bias float32 (nH,N,N); group int32 or int64 (G,H,W); coords int32 or
// int64 (G,H,W,2), G in {1,B}, indexed at the token's original position and compared at their
// full width. All pointers contiguous, 16-byte aligned (qkv, out, dout, dqkv), on the current device.
#pragma once
#include <cstddef>

#include "mixkernels/cuda_common.h"

namespace mixkernels::cuda {

struct WindowAttentionParams {
  int B = 0, H = 0, W = 0;      // token grid
  int nH = 0, d = 0;            // heads, head dim (16, 32, 64 or 128)
  int wh = 0, ww = 0;           // window
  int sh = 0, sw = 0;           // cyclic shift (0 <= s < w)
  int rh = 0, rw = 0;           // relative-position range of the rpb table (= window without coords)
  float scale = 1.f;
  DType dtype = DType::kFloat32;
  const void* qkv = nullptr;
  const float* rpb = nullptr;        // optional
  const float* attn_bias = nullptr;  // optional
  const void* group = nullptr;       // optional, group_batch = G (1: shared by the batch)
  const void* coords = nullptr;      // optional, coords_batch = G
  int group_batch = 1, coords_batch = 1;
  bool group_int64 = false, coords_int64 = false;  // element type of group / coords (else int32)
  // SwinV2 cosine attention when set: float32 (nH,) logit scales; q, k are L2-normalized in the
  // kernels, q times exp(min(logit_scale, log 100)), and `scale` must be 1.
  const float* logit_scale = nullptr;
};

struct WindowAttentionBwdBuffers {
  const void* dout = nullptr;  // (B,H,W,C) qkv dtype
  const void* out = nullptr;   // forward output
  const float* lse = nullptr;  // forward lse
  void* dqkv = nullptr;        // (B,H,W,3C) qkv dtype, fully written
  float* drpb = nullptr;       // (T,nH) when need_drpb, fully written
  float* dbias = nullptr;      // (nH,N,N) when need_dbias, fully written
  float* dlogit_scale = nullptr;  // cosine mode, optional: (nH,) sum of <q', dq'> per head (no clamp mask)
  void* workspace = nullptr;   // window_attention_bwd_workspace_bytes(...) bytes, no init needed
  // Fast mode, optional: window_attention_bwd_sums_floats(p) zeroed floats that every call leaves zeroed
  // again (keep one buffer per stream): the kernel adds the drpb / dlogit_scale sums there and its last
  // CTA copies them out, so no memset runs first. Null: drpb and dlogit_scale are zeroed by memsets.
  float* sums = nullptr;
  bool need_drpb = false, need_dbias = false, deterministic = false;
};

// Floats of WindowAttentionBwdBuffers::sums: a ticket counter (padded to 16 B), drpb (T,nH), dlogit_scale (nH).
int64_t window_attention_bwd_sums_floats(const WindowAttentionParams& p);

// Bytes of the forward's optional workspace (16-byte aligned, no init needed) on the current device:
// the pack plans of a call whose windows' layout is batch-shared (0 when none applies).
size_t window_attention_fwd_workspace_bytes(const WindowAttentionParams& p);

// Forward: out (B,H,W,C) and lse (B*nW,nH,N). Returns the launch status; cudaErrorInvalidValue
// when the configuration does not fit the device (see window_attention_fits). With a workspace of
// window_attention_fwd_workspace_bytes(p) > 0 bytes a plan kernel lays out each pack position once
// (two launches); without one every CTA runs the pack prologue itself (same results, bit for bit).
cudaError_t window_attention_forward(const WindowAttentionParams& p, void* out, float* lse, cudaStream_t stream,
                                     void* workspace = nullptr);

// Scratch bytes the backward needs (delta + deterministic-mode partial sums, including the logit
// scale's in cosine mode) on the current device.
size_t window_attention_bwd_workspace_bytes(const WindowAttentionParams& p, bool need_drpb, bool need_dbias,
                                            bool deterministic);

// Backward: dqkv, and drpb / dbias when asked. Deterministic mode reduces the bias gradients
// through per-CTA partial sums in a fixed order (bit-identical runs); otherwise fp32 atomics.
cudaError_t window_attention_backward(const WindowAttentionParams& p, const WindowAttentionBwdBuffers& b,
                                      cudaStream_t stream);

// Whether the kernels' shared memory fits the current device for this call (a very large
// coords range makes the backward's per-warp rpb-gradient tables too big).
bool window_attention_fits(const WindowAttentionParams& p, bool backward, bool need_drpb, bool deterministic);

}  // namespace mixkernels::cuda
