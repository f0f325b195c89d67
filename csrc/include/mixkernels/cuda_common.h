// Torch-free helpers shared by the CUDA kernels (csrc/cuda/*.cu). Kernels take raw pointers and
// a stream; launchers return the launch status so the thin torch bindings can raise on it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mixkernels::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Run `body` with `scalar_t` bound to the CUDA type of `t`.
#define MK_DISPATCH_DTYPE(t, ...)                                   \
  [&] {                                                             \
    switch (t) {                                                    \
      case ::mixkernels::cuda::DType::kFloat16: {                   \
        using scalar_t = __half;                                    \
        return __VA_ARGS__();                                       \
      }                                                             \
      case ::mixkernels::cuda::DType::kBFloat16: {                  \
        using scalar_t = __nv_bfloat16;                             \
        return __VA_ARGS__();                                       \
      }                                                             \
      default: {                                                    \
        using scalar_t = float;                                     \
        return __VA_ARGS__();                                       \
      }                                                             \
    }                                                               \
  }()

__host__ __device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Status of the last launch; call right after a <<<>>> launch.
inline cudaError_t launch_status() { return cudaGetLastError(); }

}  // namespace mixkernels::cuda
