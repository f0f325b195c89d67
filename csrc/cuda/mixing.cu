// CUDA kernels: MixMIM token mixing (mix_tokens) and the dual decoder's un-mixing (unmix_tokens),
// forward and backward. Every op that moves whole rows (mix, mix backward, unmix with or without
// pos_embed) is the row gather of tokens_kernels.cuh (one map per row, exact copies, fp32 adds).
// unmix backward reduces deterministically in one launch: one CTA per (position, row slice, image
// chunk) sums its images in a fixed order (dpos complete when there is one chunk), then the last CTA
// of each slice group sums the per-position partials in a fixed order into dtoken (and dpos).
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

// Unmix backward in one launch. CTA = (position p, slice of tx vectors of the row, image chunk k);
// thread (x: vector of the slice, y: image lane). A lane walks its chunk's images y, y+ty, ... two per
// iteration (four independent 16 B loads in flight): dx[b,p] = g[B+b,p] if mask else g[b,p], and
// float32 sums tok += mask ? g[b,p] : g[B+b,p], pos += g[b,p] + g[B+b,p]. The ty lanes are then summed
// in a fixed order through shared memory, so every partial is one CTA's (no atomics on data):
// tok_part[(k*L + p)*C + c] and pos_part[(k*L + p)*C + c] (dpos itself when there is one chunk).
// The partials of a slice group (slices s = g mod groups) are then reduced by the group's last CTA
// to finish (tokens::last_of_group: a ticket counter that the last CTA sets back to zero), or, with
// no tickets, by a second launch running the same reduction code: the result bits depend on neither.
struct UnmixBwd {
  int B, L, slices, chunk, chunks, groups;
  int64_t C;
  bool shared;
};

struct UnmixOut {
  float *tok_part, *pos_part;  // partials (pos_part == dpos with one chunk)
  float *dtoken, *dpos;        // nullptr when not needed
  unsigned* tickets;           // `groups` zeroed counters, or nullptr (two launches)
};

// dtoken and (several chunks) dpos on the columns of slice s, from the partials: fixed-order sums
// (row lanes of the CTA in order, then the lanes in order; chunks in order). cols = tx*VEC <= 64
// (a slice is at most 128 B of a row), so the 256 threads give 256/cols >= 4 row lanes per column.
template <int VEC>
__device__ void unmix_reduce_slice(const UnmixOut& o, const UnmixBwd& a, int s, float* red) {
  const int threads = tokens::kThreads, tid = threadIdx.y * blockDim.x + threadIdx.x, cols = blockDim.x * VEC;
  const int64_t c0 = int64_t(s) * cols;
  const int width = a.C - c0 < cols ? int(a.C - c0) : cols;
  if (o.dtoken != nullptr) {
    const int lanes = threads / cols, c = tid % cols, lane = tid / cols;
    const int64_t R = int64_t(a.chunks) * a.L;
    float acc = 0.f;
    if (c < width)
      for (int64_t r = lane; r < R; r += lanes) acc += __ldcg(o.tok_part + r * a.C + c0 + c);
    red[tid] = acc;  // [lane][c]
    __syncthreads();
    if (tid < width) {
      float t = 0.f;
      for (int l = 0; l < lanes; ++l) t += red[l * cols + tid];
      o.dtoken[c0 + tid] = t;
    }
    __syncthreads();
  }
  if (o.dpos != nullptr && a.chunks > 1) {
    for (int j = tid; j < a.L * cols; j += threads) {
      const int p = j / cols, c = j - p * cols;
      if (c >= width) continue;
      float t = 0.f;
      for (int k = 0; k < a.chunks; ++k) t += __ldcg(o.pos_part + (int64_t(k) * a.L + p) * a.C + c0 + c);
      o.dpos[int64_t(p) * a.C + c0 + c] = t;
    }
  }
}

__host__ __device__ inline bool unmix_needs_reduce(const UnmixOut& o, int chunks) {
  return o.dtoken != nullptr || (o.dpos != nullptr && chunks > 1);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(tokens::kThreads) unmix_backward_kernel(const T* __restrict__ g,
                                                                         const uint8_t* __restrict__ mask,
                                                                         T* __restrict__ dx, const UnmixOut o,
                                                                         const UnmixBwd a) {
  using P = Pack<T, VEC>;
  __shared__ float red[2][tokens::kThreads * VEC];  // [tok|pos][y][x*VEC + e]
  const int tx = blockDim.x, ty = blockDim.y, x = threadIdx.x, y = threadIdx.y;
  const int p = blockIdx.x / a.slices, s = blockIdx.x - p * a.slices;
  const int64_t vpr = a.C / VEC, v = int64_t(s) * tx + x;
  const int b0 = blockIdx.y * a.chunk, b1 = b0 + a.chunk < a.B ? b0 + a.chunk : a.B;
  float at[VEC], ap[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) at[e] = ap[e] = 0.f;
  if (v < vpr) {
    const int64_t img = int64_t(a.L) * vpr;  // vectors per image
    const P* g1 = reinterpret_cast<const P*>(g) + int64_t(p) * vpr + v;
    const P* g2 = g1 + int64_t(a.B) * img;
    P* d = reinterpret_cast<P*>(dx) + int64_t(p) * vpr + v;
    for (int b = b0 + y; b < b1; b += 2 * ty) {
      const bool two = b + ty < b1;  // the second image of the pair
      const int64_t o0 = int64_t(b) * img, o1 = o0 + int64_t(ty) * img;
      const bool m0 = mask[(a.shared ? 0 : int64_t(b) * a.L) + p] != 0;
      const bool m1 = two && mask[(a.shared ? 0 : int64_t(b + ty) * a.L) + p] != 0;
      const P x0 = g1[o0], y0 = g2[o0];
      const P x1 = two ? g1[o1] : P{}, y1 = two ? g2[o1] : P{};
      d[o0] = m0 ? y0 : x0;
      if (two) d[o1] = m1 ? y1 : x1;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float f0 = to_float(x0.v[e]), h0 = to_float(y0.v[e]), f1 = to_float(x1.v[e]), h1 = to_float(y1.v[e]);
        at[e] += (m0 ? f0 : h0) + (m1 ? f1 : h1);
        ap[e] += (f0 + h0) + (f1 + h1);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    red[0][(y * tx + x) * VEC + e] = at[e];
    red[1][(y * tx + x) * VEC + e] = ap[e];
  }
  __syncthreads();
  const int cols = tx * VEC, tid = y * tx + x;
  const int64_t out_row = (int64_t(blockIdx.y) * a.L + p) * a.C + int64_t(s) * cols;
  for (int j = tid; j < 2 * cols; j += tx * ty) {
    const int q = j >= cols, c = j - q * cols;
    if (int64_t(s) * cols + c >= a.C) continue;
    float* out = q ? o.pos_part : o.tok_part;
    if (out == nullptr) continue;
    float sum = 0.f;
    for (int l = 0; l < ty; ++l) sum += red[q][l * cols + c];
    out[out_row + c] = sum;
  }
  if (o.tickets == nullptr || !unmix_needs_reduce(o, a.chunks)) return;
  const int grp = s % a.groups;  // its CTAs: the group's slices x L positions x chunks
  const unsigned ctas = unsigned(((a.slices - 1 - grp) / a.groups + 1) * a.L * a.chunks);
  if (!tokens::last_of_group(o.tickets + grp, ctas)) return;
  for (int s2 = grp; s2 < a.slices; s2 += a.groups) unmix_reduce_slice<VEC>(o, a, s2, red[0]);
}

// The reduction without tickets: CTA = slice group, the same block shape and code as above.
template <int VEC>
__global__ void __launch_bounds__(tokens::kThreads) unmix_reduce_kernel(const UnmixOut o, const UnmixBwd a) {
  __shared__ float red[tokens::kThreads];
  for (int s2 = blockIdx.x; s2 < a.slices; s2 += a.groups) unmix_reduce_slice<VEC>(o, a, s2, red);
}

// Block (tx vectors of a row, ty image lanes): tx covers 128 B of a row (or the whole row if
// shorter), so a warp reads whole 128 B lines.
inline dim3 unmix_block(int64_t vpr, int vec_bytes) {
  int tx = 1;
  while (tx < vpr && tx * vec_bytes < 128) tx *= 2;
  return dim3(tx, tokens::kThreads / tx);
}

// Image chunks: enough CTAs for a large GPU (264: two per SM of an H100/H200), else one chunk (dpos
// written directly). A fixed target, not the device's SM count: the summation order, hence the
// result bits, is the same on every GPU.
inline int64_t unmix_chunks(int64_t B, int64_t L, int64_t slices, int ty) {
  const int64_t want = ceil_div(264, L * slices), most = ceil_div(B, ty);
  const int64_t n = want < most ? want : most;
  return n > 1 ? ceil_div(B, ceil_div(B, n)) : 1;
}

struct UnmixPlan {
  dim3 block;
  int64_t slices, chunks, chunk, groups;
};

inline UnmixPlan unmix_plan(int64_t B, int64_t L, int64_t C, int vec, int es) {
  UnmixPlan u;
  u.block = unmix_block(C / vec, vec * es);
  u.slices = ceil_div(C / vec, u.block.x);
  u.chunks = unmix_chunks(B, L, u.slices, int(u.block.y));
  u.chunk = ceil_div(B, u.chunks);
  u.groups = u.slices < kTokenTickets ? u.slices : kTokenTickets;
  return u;
}

template <typename T, int VEC>
cudaError_t launch_unmix_backward(const void* g, const uint8_t* mask, void* dx, const UnmixOut& o, int64_t B,
                                  int64_t L, int64_t C, bool shared, const UnmixPlan& u, cudaStream_t stream) {
  const int64_t ctas = L * u.slices;
  if (ctas >= (int64_t(1) << 31) || 2 * B * L >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const UnmixBwd a{int(B), int(L), int(u.slices), int(u.chunk), int(u.chunks), int(u.groups), C, shared};
  auto k = unmix_backward_kernel<T, VEC>;
  cudaError_t err = MK_LAUNCH(k, dim3(unsigned(ctas), unsigned(u.chunks)), u.block, 0, stream,
                              static_cast<const T*>(g), mask, static_cast<T*>(dx), o, a);
  if (err != cudaSuccess || o.tickets != nullptr || !unmix_needs_reduce(o, a.chunks)) return err;
  auto r = unmix_reduce_kernel<VEC>;
  return MK_LAUNCH(r, dim3(unsigned(u.groups)), u.block, 0, stream, o, a);
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

// Workspace of one plan: [tok partials (n*L, C)] [pos partials (n, L*C), only with n > 1 chunks].
inline int64_t unmix_workspace(const UnmixPlan& u, int64_t L, int64_t C, bool need_token, bool need_pos) {
  const int64_t n = u.chunks;
  return (need_token ? n * L * C : 0) + (need_pos && n > 1 ? n * L * C : 0);
}

// The plan depends on the element size and the access width (pointer alignment), which the caller
// does not pass: the largest of the four.
int64_t unmix_tokens_backward_workspace(int64_t B, int64_t L, int64_t C, bool need_token, bool need_pos) {
  if (B == 0 || L == 0 || C == 0) return 0;
  int64_t most = 0;
  for (int es : {2, 4})
    for (int vec : {1, 16 / es}) {
      if (C % vec) continue;
      const int64_t w = unmix_workspace(unmix_plan(B, L, C, vec, es), L, C, need_token, need_pos);
      most = w > most ? w : most;
    }
  return most;
}

cudaError_t unmix_tokens_backward(const void* grad, const uint8_t* mask, void* dx, float* dtoken, float* dpos,
                                  float* workspace, int64_t B, int64_t L, int64_t C, int64_t G, DType dtype,
                                  cudaStream_t stream, unsigned* tickets) {
  if (B == 0 || L == 0 || C == 0) {  // empty sums are zero
    cudaError_t e = dtoken ? cudaMemsetAsync(dtoken, 0, C * sizeof(float), stream) : cudaSuccess;
    if (e == cudaSuccess && dpos) e = cudaMemsetAsync(dpos, 0, L * C * sizeof(float), stream);
    return e;
  }
  const int es = element_size(dtype);
  const int vec = tokens::vector_bytes(C * es, es, grad, dx) == 16 ? 16 / es : 1;
  const UnmixPlan u = unmix_plan(B, L, C, vec, es);
  const int64_t n = u.chunks;
  UnmixOut o{dtoken ? workspace : nullptr, nullptr, dtoken, dpos, tickets};
  if (dpos) o.pos_part = n > 1 ? workspace + (dtoken ? n * L * C : 0) : dpos;
  return MK_DISPATCH_DTYPE(dtype, [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    return vec > 1 ? launch_unmix_backward<scalar_t, V>(grad, mask, dx, o, B, L, C, G == 1, u, stream)
                   : launch_unmix_backward<scalar_t, 1>(grad, mask, dx, o, B, L, C, G == 1, u, stream);
  });
}

}  // namespace mixkernels::cuda
