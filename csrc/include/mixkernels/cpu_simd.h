// Small SIMD building blocks for the CPU kernels: GCC/Clang vector extensions (32-byte vectors,
// lowered to whatever the target has), a register-tiled small GEMM, a vectorized exp.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Vectors are passed between always_inline helpers only, so the psABI note does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mixkernels::cpu::simd {

// Every helper is always_inline so it is compiled with its caller's target: a kernel can
// instantiate its loops twice, for the build's baseline ISA and under MK_AVX2
// (target("avx2,fma")), and pick one at run time (window_attention.cpp does).
#define MK_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define MK_HAS_AVX2_PATH 1
#define MK_AVX2 __attribute__((target("avx2,fma")))
#else
#define MK_HAS_AVX2_PATH 0
#define MK_AVX2
#endif

// Vectors of `Bytes` bytes: 16 for the baseline build (SSE2 / NEON registers), 32 under MK_AVX2.
template <typename T, int Bytes> struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  typedef int32_t itype __attribute__((vector_size(Bytes)));  // float lanes only
  static constexpr int64_t W = Bytes / sizeof(T);              // lanes per vector
};
inline int64_t round_up(int64_t n, int64_t w) { return (n + w - 1) / w * w; }

template <int Bytes, typename T> MK_INLINE typename Vec<T, Bytes>::type vload(const T* p) {
  typename Vec<T, Bytes>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int Bytes, typename T> MK_INLINE void vstore(T* p, const typename Vec<T, Bytes>::type& v) {
  std::memcpy(p, &v, sizeof v);
}

// C[i, 0:n] = sum_kk A(i,kk) * B[kk, 0:n] for i < m, with A(i,kk) = A[i*sa + kk*sk] (so A or A^T),
// n a multiple of the vector width (buffers are padded). 4 x 2-vector register tiles.
template <int Bytes, typename T>
MK_INLINE void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t sa, int64_t sk, const T* B, int64_t ldb, T* C,
                    int64_t ldc) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int64_t W = Vec<T, Bytes>::W;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {
      V c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      const T* a = A + i * sa;
      for (int64_t kk = 0; kk < k; ++kk) {
        const V b0 = vload<Bytes>(B + kk * ldb + j), b1 = vload<Bytes>(B + kk * ldb + j + W);
        const T a0 = a[kk * sk], a1 = a[sa + kk * sk], a2 = a[2 * sa + kk * sk], a3 = a[3 * sa + kk * sk];
        c00 += a0 * b0, c01 += a0 * b1, c10 += a1 * b0, c11 += a1 * b1;
        c20 += a2 * b0, c21 += a2 * b1, c30 += a3 * b0, c31 += a3 * b1;
      }
      T* c = C + i * ldc + j;
      vstore<Bytes>(c, c00), vstore<Bytes>(c + W, c01), vstore<Bytes>(c + ldc, c10), vstore<Bytes>(c + ldc + W, c11);
      vstore<Bytes>(c + 2 * ldc, c20), vstore<Bytes>(c + 2 * ldc + W, c21);
      vstore<Bytes>(c + 3 * ldc, c30), vstore<Bytes>(c + 3 * ldc + W, c31);
    }
    for (; j < n; j += W) {
      V c0 = {}, c1 = {}, c2 = {}, c3 = {};
      const T* a = A + i * sa;
      for (int64_t kk = 0; kk < k; ++kk) {
        const V b = vload<Bytes>(B + kk * ldb + j);
        c0 += a[kk * sk] * b, c1 += a[sa + kk * sk] * b, c2 += a[2 * sa + kk * sk] * b, c3 += a[3 * sa + kk * sk] * b;
      }
      T* c = C + i * ldc + j;
      vstore<Bytes>(c, c0), vstore<Bytes>(c + ldc, c1), vstore<Bytes>(c + 2 * ldc, c2), vstore<Bytes>(c + 3 * ldc, c3);
    }
  }
  for (; i < m; ++i) {
    for (int64_t j = 0; j < n; j += W) {
      V c0 = {};
      for (int64_t kk = 0; kk < k; ++kk) c0 += A[i * sa + kk * sk] * vload<Bytes>(B + kk * ldb + j);
      vstore<Bytes>(C + i * ldc + j, c0);
    }
  }
}

// x[j] = exp(x[j] - sub) for j < n (multiple of the width); exp(-inf) is exactly 0.
// float: Cephes-style range reduction + degree-6 polynomial (~1 ulp), vectorized; double: libm.
template <int Bytes, typename T> MK_INLINE void exp_sub(T* x, int64_t n, T sub) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - sub);
  } else {
    using V = typename Vec<float, Bytes>::type;
    using VI = typename Vec<float, Bytes>::itype;
    for (int64_t j = 0; j < n; j += Vec<float, Bytes>::W) {
      V v = vload<Bytes>(x + j) - sub;
      const VI zero = v < -87.3f;  // below FLT_MIN's log (and -inf): result 0
      v = v < -87.3f ? V{} - 87.3f : v;
      v = v > 88.f ? V{} + 88.f : v;
      V fx = v * 1.44269504088896341f + 0.5f;
      V fl = __builtin_convertvector(__builtin_convertvector(fx, VI), V);
      fl = fl > fx ? fl - 1.f : fl;  // floor
      const V r = v - fl * 0.693359375f + fl * 2.12194440e-4f;
      V y = 1.9875691500e-4f * r + 1.3981999507e-3f;
      y = y * r + 8.3334519073e-3f;
      y = y * r + 4.1665795894e-2f;
      y = y * r + 1.6666665459e-1f;
      y = y * r + 5.0000001201e-1f;
      y = y * r * r + r + 1.f;
      const VI e = (__builtin_convertvector(fl, VI) + 127) << 23;
      V p2;
      std::memcpy(&p2, &e, sizeof p2);
      y = y * p2;
      vstore<Bytes>(x + j, zero ? V{} : y);
    }
  }
}

template <int Bytes, typename T> MK_INLINE T row_max(const T* x, int64_t n) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int64_t W = Vec<T, Bytes>::W;
  V m = vload<Bytes>(x);
  for (int64_t j = W; j < n; j += W) {
    const V v = vload<Bytes>(x + j);
    m = v > m ? v : m;
  }
  T r = m[0];
  for (int64_t l = 1; l < W; ++l) r = std::max(r, T(m[l]));
  return r;
}

template <int Bytes, typename T> MK_INLINE T row_sum(const T* x, int64_t n) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int64_t W = Vec<T, Bytes>::W;
  V s = {};
  for (int64_t j = 0; j < n; j += W) s += vload<Bytes>(x + j);
  T r = 0;
  for (int64_t l = 0; l < W; ++l) r += s[l];
  return r;
}

}  // namespace mixkernels::cpu::simd

#pragma GCC diagnostic pop
