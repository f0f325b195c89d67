// Torch-side helpers for the thin CUDA bindings (csrc/cuda/*_binding.cpp): dtype mapping,
// current stream, device guard and launch-status checks. Only the bindings include torch.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

#include "mixkernels/cuda_common.h"

namespace mixkernels::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "mixkernels CUDA kernels support float32/float16/bfloat16, got ", t.scalar_type());
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Zeroed scratch that kernels leave zeroed again (the single-launch reductions' ticket counters, the
// attention backward's fast-mode sums): at least n 32-bit words on `like`'s device, one buffer per
// (device, stream, use), kept for the process (calls on a stream run in order, and every launch leaves
// them zero); a larger one (zeroed on `stream`: ordered) replaces it when a call needs more. None while
// the stream is being captured into a CUDA graph (a replay could run next to an eager call on the same
// stream): captured calls then take their zeroing paths (a second launch, a memset), same bits.
enum class StreamZeros { kTokenTickets, kAttentionSums };

inline int32_t* stream_zeros(const at::Tensor& like, cudaStream_t stream, int64_t n, StreamZeros use) {
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone) return nullptr;
  static std::mutex mu;
  static auto* buffers = new std::map<std::tuple<int, cudaStream_t, StreamZeros>, at::Tensor>();  // never freed
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = (*buffers)[{like.get_device(), stream, use}];
  if (!t.defined() || t.numel() < n) t = at::zeros({n}, like.options().dtype(at::kInt));
  return t.data_ptr<int32_t>();
}

#define MK_CHECK_LAUNCH(expr)                                                                  \
  do {                                                                                         \
    cudaError_t mk_err_ = (expr);                                                              \
    TORCH_CHECK(mk_err_ == cudaSuccess, "mixkernels CUDA launch failed: ", cudaGetErrorString(mk_err_)); \
  } while (0)

}  // namespace mixkernels::cuda
