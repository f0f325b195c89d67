// Torch-side helpers for the thin CUDA bindings (csrc/cuda/*_binding.cpp): dtype mapping,
// current stream, device guard and launch-status checks. Only the bindings include torch.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

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

#define MK_CHECK_LAUNCH(expr)                                                                  \
  do {                                                                                         \
    cudaError_t mk_err_ = (expr);                                                              \
    TORCH_CHECK(mk_err_ == cudaSuccess, "mixkernels CUDA launch failed: ", cudaGetErrorString(mk_err_)); \
  } while (0)

}  // namespace mixkernels::cuda
