// CUDA kernels: UM-MAE uniform sampling with fused secondary masking, its backward and the
// inverse scatter. Sampling and scatter move rows with the row gather of tokens_kernels.cuh; the
// backward writes dx and sums the secondary rows (the mask token's gradient) in one pass over the
// full grid, and the last CTAs to finish sum the per-segment partials in a fixed order (one launch).
#include "mixkernels/tokens_cuda.h"
#include "tokens_kernels.cuh"

namespace mixkernels::cuda {
namespace {
using tokens::FastDiv;
using tokens::Pack;
using tokens::RowSrc;

// Full grid (H,W) of u x u units in (hc,wc) 2x2 cells; compact grid (H/2, W/2).
struct UnitGeom {
  int H, W, u, hc, wc;
  FastDiv dhw2, dw2, du, dHW, dW, d2u;
  UnitGeom(int64_t H_, int64_t W_, int64_t u_)
      : H(int(H_)), W(int(W_)), u(int(u_)), hc(int(H_ / (2 * u_))), wc(int(W_ / (2 * u_))),
        dhw2(unsigned((H_ / 2) * (W_ / 2))), dw2(unsigned(W_ / 2)), du(unsigned(u_)), dHW(unsigned(H_ * W_)),
        dW(unsigned(W_)), d2u(unsigned(2 * u_)) {}
  // Compact row t = (b, Y, X): its cell and (Y, X).
  __device__ int compact_cell(unsigned t, unsigned& Y, unsigned& X) const {
    const unsigned b = dhw2.div(t), p = dhw2.mod(t, b);
    Y = dw2.div(p);
    X = dw2.mod(p, Y);
    return (int(b) * hc + int(du.div(Y))) * wc + int(du.div(X));
  }
};

// Compact row t reads the kept unit (keep & 3, row-major in the cell) at the same offset.
struct SampleMap {
  UnitGeom g;
  const uint8_t* keep;
  const uint8_t* secondary;
  __device__ RowSrc operator()(int t) const {
    unsigned Y, X;
    const int cell = g.compact_cell(unsigned(t), Y, X);
    if (secondary != nullptr && secondary[cell]) return {tokens::kFillRow, -1};
    const int k = keep[cell] & 3;
    const unsigned cy = g.du.div(Y), cx = g.du.div(X);
    const int y = (2 * int(cy) + (k >> 1)) * g.u + int(g.du.mod(Y, cy));
    const int x = (2 * int(cx) + (k & 1)) * g.u + int(g.du.mod(X, cx));
    const int b = int(g.dhw2.div(unsigned(t)));
    return {(b * g.H + y) * g.W + x, -1};
  }
};

// Full row r = (b,y,x) takes its compact row if it lies in its cell's kept unit (and the cell is
// not secondary), else zeros. A kept unit's map also names its cell (in .b: a gather without ADD
// ignores it).
struct ScatterMap {
  UnitGeom g;
  const uint8_t* keep;
  const uint8_t* secondary;
  __device__ RowSrc operator()(int r) const {
    const unsigned b = g.dHW.div(unsigned(r)), pos = g.dHW.mod(unsigned(r), b);
    const unsigned y = g.dW.div(pos), x = g.dW.mod(pos, y);
    const unsigned ci = g.d2u.div(y), cj = g.d2u.div(x);
    const int cell = (int(b) * g.hc + int(ci)) * g.wc + int(cj);
    const unsigned uy = g.du.div(y), ux = g.du.div(x);
    const int q = int(((uy & 1u) << 1) | (ux & 1u));
    if ((keep[cell] & 3) != q || (secondary != nullptr && secondary[cell])) return {tokens::kZeroRow, -1};
    return {(int(b) * (g.H / 2) + int(ci) * g.u + int(g.du.mod(y, uy))) * (g.W / 2) + int(cj) * g.u +
                int(g.du.mod(x, ux)),
            cell};
  }
};

// uniform_sample backward in one pass over the full grid: token r = (b,y,x) of dx takes its compact
// gradient row if it lies in its cell's kept unit and the cell is not secondary, else zeros; the kept
// unit of a secondary cell instead adds its compact row to the mask token's gradient. CTA = a fixed
// segment of `seg` tokens; thread (x: channel vector, y: token lane), so a thread's sum stays in
// one channel vector; lanes take UT tokens per iteration (loads first). The ty lanes are summed in
// a fixed order through shared memory: tok_part[segment][C] (deterministic, no atomics). The CTA is
// kThreads threads whatever tx is (whole warps): the threads past tx*ty only join the barriers.
struct UniformBwd {
  UnitGeom g;
  int64_t C;
  int rows, seg, tx;
};

constexpr int kUniformGroup = 16;  // segments per first-level group of the dtoken reduction

// out[c] = sum of rows [r0, r1) of the (rows, C) partials, each column by one thread, rows in order.
__device__ __forceinline__ void uniform_rows_sum(const float* part, int64_t C, int r0, int r1, float* out) {
  for (int64_t c = threadIdx.x; c < C; c += tokens::kThreads) {
    float t = 0.f;
    for (int r = r0; r < r1; ++r) t += __ldcg(part + r * C + c);
    out[c] = t;
  }
}

// dtoken from the segment partials in two fixed-order levels: group g sums its kUniformGroup segments
// into gpart[g], then the groups are summed in order. The last CTA of each group does its group, the
// last of those the total (tokens::last_of_group: one launch), or, with no tickets,
// uniform_reduce_kernel runs the same sums: the bits are the same either way.
template <typename T, int VEC, int UT>
__global__ void __launch_bounds__(tokens::kThreads, 3) uniform_backward_kernel(
    const T* __restrict__ grad, const uint8_t* __restrict__ keep, const uint8_t* __restrict__ secondary,
    T* __restrict__ dx, float* __restrict__ tok_part, float* __restrict__ gpart, float* __restrict__ dtoken,
    unsigned* __restrict__ tickets, const UniformBwd a) {
  using P = Pack<T, VEC>;
  __shared__ float red[tokens::kThreads * VEC];  // [y][x*VEC + e]
  const int tx = a.tx, ty = tokens::kThreads / tx, x = threadIdx.x % tx, y = threadIdx.x / tx;
  const int64_t cvec = a.C / VEC;
  const int r0 = blockIdx.x * a.seg, r1 = r0 + a.seg < a.rows ? r0 + a.seg : a.rows;
  const P* G = reinterpret_cast<const P*>(grad);
  P* D = reinterpret_cast<P*>(dx);
  const ScatterMap map{a.g, keep, nullptr};
  for (int64_t cv0 = 0; cv0 < cvec; cv0 += tx) {  // channel chunks (one unless C is above tx vectors)
    const int64_t cv = cv0 + x;
    const bool on = cv < cvec && y < ty;
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int r = r0 + y; r < r1 && y < ty; r += UT * ty) {
      int src[UT];
      bool sum[UT];
      P val[UT];
#pragma unroll
      for (int j = 0; j < UT; ++j) {
        const int rj = r + j * ty;
        const RowSrc m = rj < r1 ? map(rj) : RowSrc{tokens::kZeroRow, -1};  // a kept unit: (compact row, cell)
        src[j] = m.a;
        sum[j] = m.a >= 0 && secondary != nullptr && secondary[m.b] != 0;
      }
#pragma unroll
      for (int j = 0; j < UT; ++j) val[j] = on && src[j] >= 0 ? G[int64_t(src[j]) * cvec + cv] : P{};
#pragma unroll
      for (int j = 0; j < UT; ++j) {
        const int rj = r + j * ty;
        if (on && rj < r1) D[int64_t(rj) * cvec + cv] = sum[j] ? P{} : val[j];
        if (sum[j]) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += to_float(val[j].v[e]);
        }
      }
    }
    if (tok_part == nullptr) continue;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (y < ty) red[(y * tx + x) * VEC + e] = acc[e];
    __syncthreads();
    const int cols = tx * VEC;
    for (int c = threadIdx.x; c < cols; c += tokens::kThreads) {
      if (cv0 * VEC + c >= a.C) continue;
      float t = 0.f;
      for (int l = 0; l < ty; ++l) t += red[l * cols + c];
      tok_part[int64_t(blockIdx.x) * a.C + cv0 * VEC + c] = t;
    }
    __syncthreads();
  }
  if (tok_part == nullptr || tickets == nullptr) return;
  const int segs = int(gridDim.x), groups = (segs + kUniformGroup - 1) / kUniformGroup;
  const int grp = int(blockIdx.x) / kUniformGroup, s0 = grp * kUniformGroup;
  const int s1 = s0 + kUniformGroup < segs ? s0 + kUniformGroup : segs;
  if (!tokens::last_of_group(tickets + grp, unsigned(s1 - s0))) return;
  uniform_rows_sum(tok_part, a.C, s0, s1, gpart + int64_t(grp) * a.C);
  if (!tokens::last_of_group(tickets + groups, unsigned(groups))) return;
  uniform_rows_sum(gpart, a.C, 0, groups, dtoken);
}

// The same two levels without tickets (one CTA; a column's sums stay with one thread).
__global__ void __launch_bounds__(tokens::kThreads) uniform_reduce_kernel(const float* __restrict__ tok_part,
                                                                        float* __restrict__ gpart,
                                                                        float* __restrict__ dtoken, int64_t C,
                                                                        int segs) {
  const int groups = (segs + kUniformGroup - 1) / kUniformGroup;
  for (int g = 0; g < groups; ++g) {
    const int r0 = g * kUniformGroup, r1 = r0 + kUniformGroup < segs ? r0 + kUniformGroup : segs;
    uniform_rows_sum(tok_part, C, r0, r1, gpart + int64_t(g) * C);
  }
  uniform_rows_sum(gpart, C, 0, groups, dtoken);
}

constexpr int kUniformUT = 4;      // tokens per lane per iteration
constexpr int kUniformSegs = 256;  // segments (partials of the dtoken reduction)
static_assert((kUniformSegs + kUniformGroup - 1) / kUniformGroup + 1 <= kTokenTickets, "a ticket per group + total");

// Channel vectors of a CTA row (tx; ty = kThreads / tx token lanes): the whole row when it has at
// most kThreads vectors.
inline int uniform_tx(int64_t cvec) { return static_cast<int>(cvec < tokens::kThreads ? cvec : tokens::kThreads); }

template <typename T, int VEC>
cudaError_t launch_uniform_backward(const void* grad, const uint8_t* keep, const uint8_t* secondary, void* dx,
                                    float* tok_part, float* gpart, float* dtoken, unsigned* tickets,
                                    const UniformBwd& a, int segs, cudaStream_t stream) {
  auto k = uniform_backward_kernel<T, VEC, kUniformUT>;
  cudaError_t err = MK_LAUNCH(k, dim3(unsigned(segs)), dim3(tokens::kThreads), 0, stream, static_cast<const T*>(grad),
                              keep, secondary, static_cast<T*>(dx), tok_part, gpart, dtoken, tickets, a);
  if (err != cudaSuccess || tok_part == nullptr || tickets != nullptr) return err;
  return MK_LAUNCH(uniform_reduce_kernel, dim3(1), dim3(tokens::kThreads), 0, stream, tok_part, gpart, dtoken, a.C,
                   segs);
}

}  // namespace

cudaError_t uniform_sample(const void* x, const uint8_t* keep, const uint8_t* secondary, const void* token, void* out,
                           int64_t B, int64_t H, int64_t W, int64_t C, int64_t unit, DType dtype,
                           cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_rows<false>(x, secondary ? token : nullptr, nullptr, out, B * (H / 2) * (W / 2), C * es, dtype,
                                    SampleMap{UnitGeom(H, W, unit), keep, secondary}, stream);
}

// Segments of the B*H*W tokens: at most kUniformSegs, each a whole number of lane iterations.
inline int uniform_segments(int64_t rows, int ty) {
  const int64_t per = int64_t(ty) * kUniformUT, n = ceil_div(rows, per);
  return static_cast<int>(n < kUniformSegs ? n : kUniformSegs);
}

// [segment partials (S, C)] [group partials (ceil(S / kUniformGroup), C)]
int64_t uniform_sample_backward_workspace(int64_t B, int64_t H, int64_t W, int64_t C, bool need_token) {
  if (!need_token || B * H * W == 0 || C == 0) return 0;
  // the most segments any access width can give (the fewest token lanes: one)
  const int64_t S = uniform_segments(B * H * W, 1);
  return (S + ceil_div(S, int64_t(kUniformGroup))) * C;
}

cudaError_t uniform_sample_backward(const void* grad, const uint8_t* keep, const uint8_t* secondary, void* dx,
                                    float* dtoken, float* workspace, int64_t B, int64_t H, int64_t W, int64_t C,
                                    int64_t unit, DType dtype, cudaStream_t stream, unsigned* tickets) {
  const int64_t rows = B * H * W;
  if (rows == 0 || C == 0) return dtoken ? cudaMemsetAsync(dtoken, 0, C * sizeof(float), stream) : cudaSuccess;
  if (rows >= (int64_t(1) << 31) - 4096) return cudaErrorInvalidValue;  // 32-bit token indices (+ a lane step)
  const int es = element_size(dtype);
  const int vec = tokens::vector_bytes(C * es, es, grad, dx) == 16 ? 16 / es : 1;
  const int tx = uniform_tx(C / vec);
  const int segs = uniform_segments(rows, tokens::kThreads / tx);
  const UniformBwd a{UnitGeom(H, W, unit), C, int(rows), int(ceil_div(rows, segs)), tx};
  float* part = dtoken != nullptr && secondary != nullptr ? workspace : nullptr;
  float* gpart = part != nullptr ? part + int64_t(segs) * C : nullptr;
  cudaError_t err = MK_DISPATCH_DTYPE(dtype, [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    return vec > 1 ? launch_uniform_backward<scalar_t, V>(grad, keep, secondary, dx, part, gpart, dtoken, tickets, a,
                                                          segs, stream)
                   : launch_uniform_backward<scalar_t, 1>(grad, keep, secondary, dx, part, gpart, dtoken, tickets, a,
                                                          segs, stream);
  });
  if (err != cudaSuccess || dtoken == nullptr || secondary != nullptr) return err;
  return cudaMemsetAsync(dtoken, 0, C * sizeof(float), stream);  // no secondary cells: nothing to sum
}

cudaError_t uniform_scatter(const void* compact, const uint8_t* keep, void* out, int64_t B, int64_t H, int64_t W,
                            int64_t C, int64_t unit, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_rows<false>(compact, nullptr, nullptr, out, B * H * W, C * es, dtype,
                                    ScatterMap{UnitGeom(H, W, unit), keep, nullptr}, stream);
}

}  // namespace mixkernels::cuda
