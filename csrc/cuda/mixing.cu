// CUDA kernels: MixMIM token mixing (mix_tokens) and the dual decoder's un-mixing (unmix_tokens),
// forward and backward. Pure gathers go through the byte-level row gather; kernels that add
// rows work on 16-byte packs of the element type when C and the pointers allow it, else on
// single elements. unmix backward reduces deterministically: per-(image chunk, position)
// float32 partials in pass 1, then fixed-order column sums (tokens_cuda_kernels.cuh).
#include "mixkernels/tokens_cuda.h"
#include "mixkernels/tokens_cuda_kernels.cuh"

namespace mixkernels::cuda {
namespace {
using tokens::Pack;

__device__ inline bool mask_at(const uint8_t* mask, bool shared, int64_t b, int64_t L, int64_t p) {
  return mask[(shared ? 0 : b) * L + p] != 0;
}

// out[i,p] = x[B-1-i,p] if mask[i,p] else x[i,p].
struct MixMap {
  const uint8_t* mask;
  int64_t B, L;
  bool shared;
  __device__ int64_t operator()(int64_t r) const {
    const int64_t i = r / L, p = r % L;
    return mask_at(mask, shared, i, L, p) ? (B - 1 - i) * L + p : r;
  }
};

// Row r = (i,p) of the (2B,L,C) output without pos_embed: the token row or x[i % B, p].
struct UnmixMap {
  const uint8_t* mask;
  int64_t B, L;
  bool shared;
  __device__ int64_t operator()(int64_t r) const {
    const int64_t i = r / L, p = r % L, b = i % B;
    const bool masked = mask_at(mask, shared, b, L, p);
    return ((i < B) == masked) ? tokens::kFillRow : b * L + p;
  }
};

// dx[j,p] = mask[B-1-j,p] * g[B-1-j,p] + (1 - mask[j,p]) * g[j,p].
template <typename T, int VEC>
__global__ void mix_backward_kernel(const T* __restrict__ g, const uint8_t* __restrict__ mask, T* __restrict__ dx,
                                    int64_t B, int64_t L, int64_t C, bool shared) {
  using P = Pack<T, VEC>;
  const int64_t vpr = C / VEC, rows = B * L, stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int64_t j = r / L, p = r % L, jp = B - 1 - j;
    const bool from_partner = mask_at(mask, shared, jp, L, p);
    const bool from_self = !mask_at(mask, shared, j, L, p);
    const P* a = reinterpret_cast<const P*>(g + (jp * L + p) * C);
    const P* s = reinterpret_cast<const P*>(g + r * C);
    P* d = reinterpret_cast<P*>(dx + r * C);
    for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) {
      P o;
      if (from_partner && from_self) {
        const P x = a[v], y = s[v];
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(to_float(x.v[e]) + to_float(y.v[e]));
      } else if (from_partner || from_self) {
        o = from_partner ? a[v] : s[v];
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(0.f);
      }
      d[v] = o;
    }
  }
}

// out[i,p] = (token or x[i % B,p]) + pos[p].
template <typename T, int VEC>
__global__ void unmix_pos_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, const T* __restrict__ token,
                                 const T* __restrict__ pos, T* __restrict__ out, int64_t B, int64_t L, int64_t C,
                                 bool shared) {
  using P = Pack<T, VEC>;
  const int64_t vpr = C / VEC, rows = 2 * B * L, stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int64_t i = r / L, p = r % L, b = i % B;
    const bool use_token = (i < B) == mask_at(mask, shared, b, L, p);
    const P* src = reinterpret_cast<const P*>(use_token ? token : x + (b * L + p) * C);
    const P* pe = reinterpret_cast<const P*>(pos + p * C);
    P* o = reinterpret_cast<P*>(out + r * C);
    for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) {
      const P s = src[v], q = pe[v];
      P res;
#pragma unroll
      for (int e = 0; e < VEC; ++e) res.v[e] = from_float<T>(to_float(s.v[e]) + to_float(q.v[e]));
      o[v] = res;
    }
  }
}

// Pass 1 of unmix backward. Task t = (k, p): images [k*chunk, (k+1)*chunk) at position p.
// dx[b,p] = g[B+b,p] if mask else g[b,p]; tok_part/pos_part[(k*L+p)*C + c] = float32 sums over b.
template <typename T, int VEC>
__global__ void unmix_backward_kernel(const T* __restrict__ g, const uint8_t* __restrict__ mask, T* __restrict__ dx,
                                      float* __restrict__ tok_part, float* __restrict__ pos_part, int64_t B, int64_t L,
                                      int64_t C, bool shared, int64_t chunk, int64_t n_chunks) {
  using P = Pack<T, VEC>;
  const int64_t vpr = C / VEC, tasks = n_chunks * L, stride = int64_t(gridDim.x) * blockDim.y;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < tasks; t += stride) {
    const int64_t k = t / L, p = t % L, b0 = k * chunk, b1 = b0 + chunk < B ? b0 + chunk : B;
    for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) {
      float at[VEC], ap[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) at[e] = ap[e] = 0.f;
      for (int64_t b = b0; b < b1; ++b) {
        const bool masked = mask_at(mask, shared, b, L, p);
        const P g1 = reinterpret_cast<const P*>(g + (b * L + p) * C)[v];
        const P g2 = reinterpret_cast<const P*>(g + ((B + b) * L + p) * C)[v];
        reinterpret_cast<P*>(dx + (b * L + p) * C)[v] = masked ? g2 : g1;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float f1 = to_float(g1.v[e]), f2 = to_float(g2.v[e]);
          at[e] += masked ? f1 : f2;
          ap[e] += f1 + f2;
        }
      }
      const int64_t o = t * C + v * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (tok_part) tok_part[o + e] = at[e];
        if (pos_part) pos_part[o + e] = ap[e];
      }
    }
  }
}

// Image chunks of unmix backward: enough (chunk, position) tasks to fill a GPU, few partials.
inline int64_t unmix_chunk(int64_t B, int64_t L) {
  int64_t n = ceil_div(1024, L > 0 ? L : 1);
  n = n < B ? n : B;
  return ceil_div(B, n > 0 ? n : 1);
}

template <typename T, int VEC>
cudaError_t launch_mix_backward(const void* g, const uint8_t* mask, void* dx, int64_t B, int64_t L, int64_t C,
                                bool shared, cudaStream_t stream) {
  const dim3 block = tokens::row_block(C / VEC);
  mix_backward_kernel<T, VEC><<<tokens::row_grid(B * L, block), block, 0, stream>>>(
      static_cast<const T*>(g), mask, static_cast<T*>(dx), B, L, C, shared);
  return launch_status();
}

template <typename T, int VEC>
cudaError_t launch_unmix_pos(const void* x, const uint8_t* mask, const void* token, const void* pos, void* out,
                             int64_t B, int64_t L, int64_t C, bool shared, cudaStream_t stream) {
  const dim3 block = tokens::row_block(C / VEC);
  unmix_pos_kernel<T, VEC><<<tokens::row_grid(2 * B * L, block), block, 0, stream>>>(
      static_cast<const T*>(x), mask, static_cast<const T*>(token), static_cast<const T*>(pos), static_cast<T*>(out),
      B, L, C, shared);
  return launch_status();
}

template <typename T, int VEC>
cudaError_t launch_unmix_backward(const void* g, const uint8_t* mask, void* dx, float* tok_part, float* pos_part,
                                  int64_t B, int64_t L, int64_t C, bool shared, int64_t chunk, int64_t n_chunks,
                                  cudaStream_t stream) {
  const dim3 block = tokens::row_block(C / VEC);
  unmix_backward_kernel<T, VEC><<<tokens::row_grid(n_chunks * L, block), block, 0, stream>>>(
      static_cast<const T*>(g), mask, static_cast<T*>(dx), tok_part, pos_part, B, L, C, shared, chunk, n_chunks);
  return launch_status();
}

}  // namespace

cudaError_t mix_tokens(const void* x, const uint8_t* mask, void* out, int64_t B, int64_t L, int64_t C, int64_t G,
                       DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_gather(x, nullptr, out, B * L, C * es, es, MixMap{mask, B, L, G == 1}, stream);
}

cudaError_t mix_tokens_backward(const void* grad, const uint8_t* mask, void* dx, int64_t B, int64_t L, int64_t C,
                                int64_t G, DType dtype, cudaStream_t stream) {
  if (B * L == 0 || C == 0) return cudaSuccess;
  const int es = element_size(dtype);
  const bool vec = tokens::vector_bytes(C * es, es, grad, dx) == 16;
  return MK_DISPATCH_DTYPE(dtype, [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    return vec ? launch_mix_backward<scalar_t, V>(grad, mask, dx, B, L, C, G == 1, stream)
               : launch_mix_backward<scalar_t, 1>(grad, mask, dx, B, L, C, G == 1, stream);
  });
}

cudaError_t unmix_tokens(const void* x, const uint8_t* mask, const void* token, const void* pos, void* out, int64_t B,
                         int64_t L, int64_t C, int64_t G, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  if (pos == nullptr)
    return tokens::launch_gather(x, token, out, 2 * B * L, C * es, es, UnmixMap{mask, B, L, G == 1}, stream);
  if (B * L == 0 || C == 0) return cudaSuccess;
  const bool vec = tokens::vector_bytes(C * es, es, x, token, pos) == 16 && tokens::aligned(out, 16);
  return MK_DISPATCH_DTYPE(dtype, [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    return vec ? launch_unmix_pos<scalar_t, V>(x, mask, token, pos, out, B, L, C, G == 1, stream)
               : launch_unmix_pos<scalar_t, 1>(x, mask, token, pos, out, B, L, C, G == 1, stream);
  });
}

int64_t unmix_tokens_backward_workspace(int64_t B, int64_t L, int64_t C, bool need_token, bool need_pos) {
  if (B == 0 || L == 0 || C == 0) return 0;
  const int64_t n = ceil_div(B, unmix_chunk(B, L));
  const int64_t ws_tok = need_token ? tokens::column_sum_workspace(n * L, C) : 0;
  const int64_t ws_pos = need_pos ? tokens::column_sum_workspace(n, L * C) : 0;
  return (int64_t(need_token) + int64_t(need_pos)) * n * L * C + (ws_tok > ws_pos ? ws_tok : ws_pos);
}

cudaError_t unmix_tokens_backward(const void* grad, const uint8_t* mask, void* dx, float* dtoken, float* dpos,
                                  float* workspace, int64_t B, int64_t L, int64_t C, int64_t G, DType dtype,
                                  cudaStream_t stream) {
  if (B == 0 || L == 0 || C == 0) {  // empty sums are zero
    cudaError_t e = dtoken ? cudaMemsetAsync(dtoken, 0, C * sizeof(float), stream) : cudaSuccess;
    if (e == cudaSuccess && dpos) e = cudaMemsetAsync(dpos, 0, L * C * sizeof(float), stream);
    return e;
  }
  const int64_t chunk = unmix_chunk(B, L), n = ceil_div(B, chunk);
  float* tok_part = dtoken ? workspace : nullptr;
  float* pos_part = dpos ? workspace + (dtoken ? n * L * C : 0) : nullptr;
  float* scratch = workspace + (int64_t(dtoken != nullptr) + int64_t(dpos != nullptr)) * n * L * C;
  const int es = element_size(dtype);
  const bool vec = tokens::vector_bytes(C * es, es, grad, dx) == 16;
  cudaError_t err = MK_DISPATCH_DTYPE(dtype, [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    return vec ? launch_unmix_backward<scalar_t, V>(grad, mask, dx, tok_part, pos_part, B, L, C, G == 1, chunk, n, stream)
               : launch_unmix_backward<scalar_t, 1>(grad, mask, dx, tok_part, pos_part, B, L, C, G == 1, chunk, n, stream);
  });
  if (err == cudaSuccess && dtoken)
    err = tokens::column_sum(tok_part, n * L, C, tokens::AllRows{}, dtoken, scratch, stream);
  if (err == cudaSuccess && dpos) err = tokens::column_sum(pos_part, n, L * C, tokens::AllRows{}, dpos, scratch, stream);
  return err;
}

}  // namespace mixkernels::cuda
