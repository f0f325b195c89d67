// CUDA kernels: UM-MAE uniform sampling with fused secondary masking, its backward and the
// inverse scatter. All three move rows with the byte-level row gather; the mask token's
// gradient is a deterministic column sum over the secondary rows of the compact gradient.
#include "mixkernels/tokens_cuda.h"
#include "mixkernels/tokens_cuda_kernels.cuh"

namespace mixkernels::cuda {
namespace {

// Full grid (H,W) of u x u units in (hc,wc) 2x2 cells; compact grid (H/2, W/2).
struct UnitGeom {
  int64_t H, W, u;
  __device__ int64_t hc() const { return H / (2 * u); }
  __device__ int64_t wc() const { return W / (2 * u); }
  // Cell of compact row t = (b,Y,X).
  __device__ int64_t compact_cell(int64_t t) const {
    const int64_t h = H / 2, w = W / 2, b = t / (h * w), Y = (t / w) % h, X = t % w;
    return (b * hc() + Y / u) * wc() + X / u;
  }
};

// Compact row t reads the kept unit (keep & 3, row-major in the cell) at the same offset.
struct SampleMap {
  UnitGeom g;
  const uint8_t* keep;
  const uint8_t* secondary;
  __device__ int64_t operator()(int64_t t) const {
    const int64_t h = g.H / 2, w = g.W / 2, u = g.u;
    const int64_t b = t / (h * w), Y = (t / w) % h, X = t % w;
    const int64_t cell = (b * g.hc() + Y / u) * g.wc() + X / u;
    if (secondary != nullptr && secondary[cell]) return tokens::kFillRow;
    const int k = keep[cell] & 3;
    const int64_t y = (2 * (Y / u) + (k >> 1)) * u + Y % u;
    const int64_t x = (2 * (X / u) + (k & 1)) * u + X % u;
    return (b * g.H + y) * g.W + x;
  }
};

// Full row r = (b,y,x) takes its compact row if it lies in its cell's kept unit (and the cell is
// not secondary), else zeros.
struct ScatterMap {
  UnitGeom g;
  const uint8_t* keep;
  const uint8_t* secondary;
  __device__ int64_t operator()(int64_t r) const {
    const int64_t H = g.H, W = g.W, u = g.u;
    const int64_t b = r / (H * W), y = (r / W) % H, x = r % W;
    const int64_t ci = y / (2 * u), cj = x / (2 * u), cell = (b * g.hc() + ci) * g.wc() + cj;
    const int q = int(((y / u) & 1) * 2 + ((x / u) & 1));
    if ((keep[cell] & 3) != q || (secondary != nullptr && secondary[cell])) return tokens::kZeroRow;
    return (b * (H / 2) + ci * u + y % u) * (W / 2) + cj * u + x % u;
  }
};

struct SecondaryRow {
  UnitGeom g;
  const uint8_t* secondary;
  __device__ bool operator()(int64_t t) const { return secondary[g.compact_cell(t)] != 0; }
};

}  // namespace

cudaError_t uniform_sample(const void* x, const uint8_t* keep, const uint8_t* secondary, const void* token, void* out,
                           int64_t B, int64_t H, int64_t W, int64_t C, int64_t unit, DType dtype,
                           cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_gather(x, secondary ? token : nullptr, out, B * (H / 2) * (W / 2), C * es, es,
                               SampleMap{{H, W, unit}, keep, secondary}, stream);
}

int64_t uniform_sample_backward_workspace(int64_t B, int64_t H, int64_t W, int64_t C, bool need_token) {
  return need_token ? tokens::column_sum_workspace(B * (H / 2) * (W / 2), C) : 0;
}

cudaError_t uniform_sample_backward(const void* grad, const uint8_t* keep, const uint8_t* secondary, void* dx,
                                    float* dtoken, float* workspace, int64_t B, int64_t H, int64_t W, int64_t C,
                                    int64_t unit, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  const UnitGeom geom{H, W, unit};
  cudaError_t err =
      tokens::launch_gather(grad, nullptr, dx, B * H * W, C * es, es, ScatterMap{geom, keep, secondary}, stream);
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
  return tokens::launch_gather(compact, nullptr, out, B * H * W, C * es, es, ScatterMap{{H, W, unit}, keep, nullptr},
                               stream);
}

}  // namespace mixkernels::cuda
