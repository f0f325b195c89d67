// Device primitives of the CUDA kernels: tensor-core MMA, ldmatrix, cp.async, fast exp2 / log2 /
// reciprocal, the launch macro. Every inline-PTX use of csrc/cuda goes through this header.
//
// Under MIXKERNELS_SIMT_EMU (CPU tests, tests/cuda_emu) the same functions come from a SIMT
// emulator that runs the unchanged kernel sources on the CPU; the PTX fragment layouts are
// implemented there independently (tests/cuda_emu/emu_runtime.cpp is the oracle).
#pragma once
#include <cstdint>
#include <type_traits>

#if defined(MIXKERNELS_SIMT_EMU)
#include "simt_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define MK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel<<<grid, block, smem, stream>>>(__VA_ARGS__), cudaGetLastError())
#endif

namespace mixkernels::cuda::prim {

#if !defined(MIXKERNELS_SIMT_EMU)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// D += A*B, mma.sync m16n8k16 with fp32 accumulators; T is __half or __nv_bfloat16.
// Fragments (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4g + t:
//   A (16x16 row, b16x2 regs): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                               a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]   (low half = lower col)
//   B (16x8 col):              b0 = B[k=2t..2t+1][n=g], b1 = B[k=2t+8..2t+9][n=g]
//   C/D (16x8 f32):            c[0], c[1] = D[g][2t], D[g][2t+1]; c[2], c[3] = D[g+8][2t], D[g+8][2t+1]
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(MIXKERNELS_SIMT_EMU)
  mma16816_emu(c, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// D += A*B, mma.sync m16n8k8 (a k8 step: e.g. P@V over 8 keys), fp32 accumulators; T is __half or
// __nv_bfloat16. Fragments (PTX ISA "Matrix Fragments for mma.m16n8k8", .f16/.bf16), lane = 4g + t:
//   A (16x8 row):  a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1]
//   B (8x8 col):   b0 = B[k=2t..2t+1][n=g]
//   C/D:           as m16n8k16
template <typename T>
__device__ __forceinline__ void mma1688(float (&c)[4], const uint32_t (&a)[2], uint32_t b0) {
#if defined(MIXKERNELS_SIMT_EMU)
  mma1688_emu(c, a, b0, std::is_same_v<T, __nv_bfloat16>);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
  } else {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
  }
#endif
}

// ldmatrix.sync.aligned.m8n8.x{2,4}[.trans].shared.b16. Lanes 8i..8i+7 give the (16-byte aligned)
// addresses of rows 0..7 of matrix i; lane 4g+t receives in r[i]: M_i[g][2t..2t+1] (plain) or
// M_i[2t][g], M_i[2t+1][g] (.trans), the first element in the low half.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#if defined(MIXKERNELS_SIMT_EMU)
  ldmatrix_emu(r, row, 4, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(MIXKERNELS_SIMT_EMU)
  ldmatrix_emu(r, row, 4, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* row) {
#if defined(MIXKERNELS_SIMT_EMU)
  ldmatrix_emu(r, row, 2, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], const void* row) {
#if defined(MIXKERNELS_SIMT_EMU)
  ldmatrix_emu(r, row, 2, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
#endif
}

// cp.async global -> shared, BYTES in {4, 8, 16} (16: .cg, bypassing L1; else .ca), then
// commit / wait: every group but the newest `Keep` has landed for this thread.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
#if defined(MIXKERNELS_SIMT_EMU)
  cp_async_emu(dst, src, BYTES);
#else
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(BYTES)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(MIXKERNELS_SIMT_EMU)
  cp_async_commit_emu();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int Keep>
__device__ __forceinline__ void cp_async_wait() {
#if defined(MIXKERNELS_SIMT_EMU)
  cp_async_wait_emu(Keep);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Keep) : "memory");
#endif
}

// Single-instruction special functions (MUFU): exp2f / log2f / 1.f/x compile to extra range
// checks around them. ex2(-inf) = 0, rcp(0) = +inf, lg2(0) = -inf; flush-to-zero on subnormals.
__device__ __forceinline__ float ex2(float x) {
#if defined(MIXKERNELS_SIMT_EMU)
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
__device__ __forceinline__ float lg2(float x) {
#if defined(MIXKERNELS_SIMT_EMU)
  return std::log2(x);
#else
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
__device__ __forceinline__ float rcp(float x) {
#if defined(MIXKERNELS_SIMT_EMU)
  return 1.f / x;
#else
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// a * b + c on two packed 16-bit floats (T = __half or __nv_bfloat16; fma.rn), bits in and out. E.g.
// w * 0 + acc from acc = +-0: a half is NaN iff that half of w is NaN or Inf (else +-0); w * w + acc from
// acc = +0: non-negative sums, a half Inf or NaN iff that half of some w was NaN, Inf or its square overflowed.
template <typename T>
__device__ __forceinline__ uint32_t fma_b16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(MIXKERNELS_SIMT_EMU)
  constexpr bool bf = std::is_same_v<T, __nv_bfloat16>;
  uint32_t r = 0;
  for (int k = 0; k < 2; ++k) {
    auto x = [&](uint32_t w) { return double(::emu::b16_to_float(static_cast<uint16_t>(w >> (16 * k)), bf)); };
    const double e = x(a) * x(b) + x(c);  // exact for b16 inputs (or Inf / NaN): one rounding below
    const float f = std::fabs(e) >= 0x1p128 ? float(e > 0 ? INFINITY : -INFINITY) : float(e);
    uint16_t h;
    if constexpr (bf) {
      const __nv_bfloat16 v = __float2bfloat16_rn(f);
      std::memcpy(&h, &v, 2);
    } else {
      const __half v = __float2half_rn(f);
      std::memcpy(&h, &v, 2);
    }
    r |= uint32_t(h) << (16 * k);
  }
  return r;
#else
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>)
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  else
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
#endif
}

// The float at byte OFF past the shared-memory pointer p, the offset in the load's immediate (a
// plain load of p + OFF may have OFF folded into p's own offsets first, costing an add). Read-only
// data: no ordering against other accesses.
template <int OFF>
__device__ __forceinline__ float lds_at(const void* p) {
#if defined(MIXKERNELS_SIMT_EMU)
  return *reinterpret_cast<const float*>(static_cast<const unsigned char*>(p) + OFF);
#else
  float v;
  asm("ld.shared.f32 %0, [%1+%2];" : "=f"(v) : "r"(smem_addr(p)), "n"(OFF));
  return v;
#endif
}

// 16 bytes of shared memory in one LDS.128 even if some words go unused (ptxas narrows a plain, even
// inline-asm, ld.shared.v4 to one LDS per word read; .volatile keeps it). Read-only, 16-byte aligned.
__device__ __forceinline__ int4 lds_v4(const void* p) {
#if defined(MIXKERNELS_SIMT_EMU)
  return *static_cast<const int4*>(p);
#else
  int4 v;
  asm("ld.volatile.shared.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem_addr(p)));
  return v;
#endif
}

// Fire-and-forget fp32 add to global memory (RED, relaxed: no fence).
__device__ __forceinline__ void red_add(float* p, float v) {
#if defined(MIXKERNELS_SIMT_EMU)
  *p += v;
#else
  asm volatile("red.relaxed.gpu.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(v) : "memory");
#endif
}

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// Single-launch reductions (the token backwards; the attention backward's fast-mode sums). The CTAs
// of a group store their partials, then each takes a ticket from the group's counter; the CTA that
// takes the last one reduces the group's partials (in an order the code fixes, whoever arrives last:
// the bits do not change) and sets the counter back to zero, so a counter is zero before and after
// every launch. Call from every thread of the CTA (barriers); the reducing CTA reads the others'
// partials through L2 (__ldcg).
__device__ __forceinline__ bool last_of_group(unsigned* counter, unsigned ctas) {
  __threadfence();  // release: this thread's partial stores reach L2 before its CTA's ticket
  __syncthreads();
  int last = 0;
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(counter, 1u) == ctas - 1;
    if (last) atomicExch(counter, 0u);  // every ticket of the launch is taken
  }
  // broadcast by the barrier itself: no static shared memory (the attention backward's dynamic
  // shared memory may fill the opt-in limit)
  const bool mine = __syncthreads_or(last) != 0;
  if (mine) __threadfence();  // acquire: the partials of the CTAs that took the earlier tickets
  return mine;
}

}  // namespace mixkernels::cuda::prim
