// CUDA kernels: UM-MAE uniform sampling with fused secondary masking, its backward and the
// inverse scatter. All three move rows with the row gather of tokens_kernels.cuh; the mask token's
// gradient is a deterministic column sum over the secondary rows of the compact gradient.
#include "mixkernels/tokens_cuda.h"
#include "tokens_kernels.cuh"

namespace mixkernels::cuda {
namespace {
using tokens::FastDiv;
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
// not secondary), else zeros.
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
            -1};
  }
};

struct SecondaryRow {
  UnitGeom g;
  const uint8_t* secondary;
  __device__ bool operator()(int64_t t) const {
    unsigned Y, X;
    return secondary[g.compact_cell(unsigned(t), Y, X)] != 0;
  }
};

}  // namespace

cudaError_t uniform_sample(const void* x, const uint8_t* keep, const uint8_t* secondary, const void* token, void* out,
                           int64_t B, int64_t H, int64_t W, int64_t C, int64_t unit, DType dtype,
                           cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_rows<false>(x, secondary ? token : nullptr, nullptr, out, B * (H / 2) * (W / 2), C * es, dtype,
                                    SampleMap{UnitGeom(H, W, unit), keep, secondary}, stream);
}

int64_t uniform_sample_backward_workspace(int64_t B, int64_t H, int64_t W, int64_t C, bool need_token) {
  return need_token ? tokens::column_sum_workspace(B * (H / 2) * (W / 2), C) : 0;
}

cudaError_t uniform_sample_backward(const void* grad, const uint8_t* keep, const uint8_t* secondary, void* dx,
                                    float* dtoken, float* workspace, int64_t B, int64_t H, int64_t W, int64_t C,
                                    int64_t unit, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  const UnitGeom geom(H, W, unit);
  cudaError_t err = tokens::launch_rows<false>(grad, nullptr, nullptr, dx, B * H * W, C * es, dtype,
                                               ScatterMap{geom, keep, secondary}, stream);
  if (err != cudaSuccess || dtoken == nullptr) return err;
  if (secondary == nullptr) return cudaMemsetAsync(dtoken, 0, C * sizeof(float), stream);
  const int64_t rows = B * (H / 2) * (W / 2);
  return MK_DISPATCH_DTYPE(dtype, [&] {
    return tokens::column_sum(static_cast<const scalar_t*>(grad), rows, C, SecondaryRow{geom, secondary}, dtoken,
                              workspace, stream);
  });
}

cudaError_t uniform_scatter(const void* compact, const uint8_t* keep, void* out, int64_t B, int64_t H, int64_t W,
                            int64_t C, int64_t unit, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_rows<false>(compact, nullptr, nullptr, out, B * H * W, C * es, dtype,
                                    ScatterMap{UnitGeom(H, W, unit), keep, nullptr}, stream);
}

}  // namespace mixkernels::cuda
