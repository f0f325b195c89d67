// CUDA kernels: MixMIM token mixing (mix_tokens) and the dual decoder's un-mixing (unmix_tokens),
// forward and backward. Every op that moves whole rows (mix, mix backward, unmix with or without
// pos_embed) is the row gather of tokens_kernels.cuh (one map per row, exact copies, fp32 adds).
// unmix backward reduces deterministically: per-(image chunk, position) float32 partials in pass 1,
// then fixed-order column sums (tokens_kernels.cuh).
#include "mixkernels/tokens_cuda.h"
#include "tokens_kernels.cuh"

namespace mixkernels::cuda {
namespace {
using tokens::FastDiv;
using tokens::Pack;
using tokens::RowSrc;

struct MaskGeom {
  const uint8_t* mask;
  int B, L;
  bool shared;
  FastDiv dL;
  MaskGeom(const uint8_t* m, int64_t B_, int64_t L_, bool s) : mask(m), B(int(B_)), L(int(L_)), shared(s), dL(unsigned(L_)) {}
  __device__ bool at(int b, int p) const { return mask[(shared ? 0 : b) * L + p] != 0; }
};

// out[i,p] = x[B-1-i,p] if mask[i,p] else x[i,p].
struct MixMap {
  MaskGeom g;
  __device__ RowSrc operator()(int r) const {
    const int i = int(g.dL.div(unsigned(r))), p = r - i * g.L;
    return {g.at(i, p) ? (g.B - 1 - i) * g.L + p : r, -1};
  }
};

// dx[j,p] = mask[B-1-j,p] * g[B-1-j,p] + (1 - mask[j,p]) * g[j,p].
struct MixBackwardMap {
  MaskGeom g;
  __device__ RowSrc operator()(int r) const {
    const int j = int(g.dL.div(unsigned(r))), p = r - j * g.L, jp = g.B - 1 - j;
    return {g.at(jp, p) ? jp * g.L + p : tokens::kZeroRow, g.at(j, p) ? -1 : r};
  }
};

// Row r = (i,p) of the (2B,L,C) output: the mask token or x[i % B, p] (+ pos[p] when `pos`).
struct UnmixMap {
  MaskGeom g;
  bool pos;
  __device__ RowSrc operator()(int r) const {
    const int i = int(g.dL.div(unsigned(r))), p = r - i * g.L, b = i < g.B ? i : i - g.B;
    return {((i < g.B) == g.at(b, p)) ? tokens::kFillRow : b * g.L + p, pos ? p : -1};
  }
};

// Pass 1 of unmix backward. Task t = (k, p): images [k*chunk, (k+1)*chunk) at position p.
// dx[b,p] = g[B+b,p] if mask else g[b,p]; tok_part/pos_part[(k*L+p)*C + c] = float32 sums over b.
// Block: x over a row's VEC-vectors, y over tasks; row pointers advance by L*C per image.
template <typename T, int VEC>
__global__ void unmix_backward_kernel(const T* __restrict__ g, const uint8_t* __restrict__ mask, T* __restrict__ dx,
                                      float* __restrict__ tok_part, float* __restrict__ pos_part, int64_t B, int64_t L,
                                      int64_t C, bool shared, int64_t chunk, int64_t n_chunks) {
  using P = Pack<T, VEC>;
  const int64_t vpr = C / VEC, tasks = n_chunks * L, stride = int64_t(gridDim.x) * blockDim.y, LC = L * C;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < tasks; t += stride) {
    const int64_t k = t / L, p = t - k * L, b0 = k * chunk, b1 = b0 + chunk < B ? b0 + chunk : B;
    for (int64_t v = threadIdx.x; v < vpr; v += blockDim.x) {
      float at[VEC], ap[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) at[e] = ap[e] = 0.f;
      const P* g1p = reinterpret_cast<const P*>(g + (b0 * L + p) * C) + v;
      const P* g2p = reinterpret_cast<const P*>(g + ((B + b0) * L + p) * C) + v;
      P* dp = reinterpret_cast<P*>(dx + (b0 * L + p) * C) + v;
      const uint8_t* mp = mask + (shared ? 0 : b0) * L + p;
#pragma unroll 2
      for (int64_t b = b0; b < b1; ++b) {
        const bool masked = *mp != 0;
        const P g1 = *g1p, g2 = *g2p;
        *dp = masked ? g2 : g1;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float f1 = to_float(g1.v[e]), f2 = to_float(g2.v[e]);
          at[e] += masked ? f1 : f2;
          ap[e] += f1 + f2;
        }
        g1p += LC / VEC;
        g2p += LC / VEC;
        dp += LC / VEC;
        mp += shared ? 0 : L;
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

// Block shape for rows of `vpr` vectors: x over a row's vectors, y over tasks; grid-stride.
inline dim3 unmix_block(int64_t vpr) {
  int tx = 1;
  while (tx < vpr && tx < 128) tx *= 2;
  return dim3(tx, tokens::kThreads / tx);
}
inline dim3 unmix_grid(int64_t tasks, dim3 block) {
  const int64_t g = ceil_div(tasks, block.y);
  return dim3(static_cast<unsigned>(g < 1 ? 1 : (g > tokens::kMaxBlocks ? tokens::kMaxBlocks : g)));
}

// Image chunks of unmix backward: enough (chunk, position) tasks to fill a GPU, few partials.
inline int64_t unmix_chunk(int64_t B, int64_t L) {
  int64_t n = ceil_div(1024, L > 0 ? L : 1);
  n = n < B ? n : B;
  return ceil_div(B, n > 0 ? n : 1);
}

template <typename T, int VEC>
cudaError_t launch_unmix_backward(const void* g, const uint8_t* mask, void* dx, float* tok_part, float* pos_part,
                                  int64_t B, int64_t L, int64_t C, bool shared, int64_t chunk, int64_t n_chunks,
                                  cudaStream_t stream) {
  const dim3 block = unmix_block(C / VEC);
  auto k = unmix_backward_kernel<T, VEC>;
  return MK_LAUNCH(k, unmix_grid(n_chunks * L, block), block, 0, stream, static_cast<const T*>(g), mask,
                   static_cast<T*>(dx), tok_part, pos_part, B, L, C, shared, chunk, n_chunks);
}

}  // namespace

cudaError_t mix_tokens(const void* x, const uint8_t* mask, void* out, int64_t B, int64_t L, int64_t C, int64_t G,
                       DType dtype, cudaStream_t stream) {
  return tokens::launch_rows<false>(x, nullptr, nullptr, out, B * L, C * element_size(dtype), dtype,
                                    MixMap{MaskGeom(mask, B, L, G == 1)}, stream);
}

cudaError_t mix_tokens_backward(const void* grad, const uint8_t* mask, void* dx, int64_t B, int64_t L, int64_t C,
                                int64_t G, DType dtype, cudaStream_t stream) {
  return tokens::launch_rows<true>(grad, nullptr, grad, dx, B * L, C * element_size(dtype), dtype,
                                   MixBackwardMap{MaskGeom(mask, B, L, G == 1)}, stream);
}

cudaError_t unmix_tokens(const void* x, const uint8_t* mask, const void* token, const void* pos, void* out, int64_t B,
                         int64_t L, int64_t C, int64_t G, DType dtype, cudaStream_t stream) {
  const UnmixMap map{MaskGeom(mask, B, L, G == 1), pos != nullptr};
  const int64_t rb = C * element_size(dtype);
  if (pos == nullptr) return tokens::launch_rows<false>(x, token, nullptr, out, 2 * B * L, rb, dtype, map, stream);
  return tokens::launch_rows<true>(x, token, pos, out, 2 * B * L, rb, dtype, map, stream);
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
