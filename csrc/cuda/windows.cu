// CUDA kernels: Swin roll + window partition and window merge + reverse roll, one pass each.
// Both are row gathers (each output row computes its source row once, 32-bit fast division),
// copied with the widest aligned vector access; see tokens_kernels.cuh.
#include "mixkernels/tokens_cuda.h"
#include "tokens_kernels.cuh"

namespace mixkernels::cuda {
namespace {
using tokens::FastDiv;
using tokens::RowSrc;

struct WinGeom {
  int H, W, wh, ww, sh, sw, nWx, nW, N;
  FastDiv dN, dnW, dnWx, dww, dHW, dW, dwh;
  WinGeom(int64_t H_, int64_t W_, int64_t wh_, int64_t ww_, int64_t sh_, int64_t sw_)
      : H(int(H_)), W(int(W_)), wh(int(wh_)), ww(int(ww_)), sh(int(sh_)), sw(int(sw_)), nWx(int(W_ / ww_)),
        nW(int((H_ / wh_) * (W_ / ww_))), N(int(wh_ * ww_)), dN(unsigned(N)), dnW(unsigned(nW)), dnWx(unsigned(nWx)),
        dww(unsigned(ww)), dHW(unsigned(H * W)), dW(unsigned(W)), dwh(unsigned(wh)) {}
};

// Windows row r = (window, n) reads token ((wy*wh + n/ww + sh) % H, (wx*ww + n%ww + sw) % W).
struct PartitionMap {
  WinGeom g;
  __device__ RowSrc operator()(int r) const {
    const unsigned win = g.dN.div(r), n = g.dN.mod(r, win);
    const unsigned b = g.dnW.div(win), w = g.dnW.mod(win, b);
    const unsigned wy = g.dnWx.div(w), wx = g.dnWx.mod(w, wy);
    const unsigned ly = g.dww.div(n), lx = g.dww.mod(n, ly);
    int y = int(wy) * g.wh + int(ly) + g.sh, x = int(wx) * g.ww + int(lx) + g.sw;
    if (y >= g.H) y -= g.H;
    if (x >= g.W) x -= g.W;
    return {(int(b) * g.H + y) * g.W + x, -1};
  }
};

// Token (b,y,x) sits at (y-sh, x-sw) mod (H,W) on the rolled grid.
struct MergeMap {
  WinGeom g;
  __device__ RowSrc operator()(int t) const {
    const unsigned b = g.dHW.div(t), pos = g.dHW.mod(t, b);
    const unsigned y = g.dW.div(pos), x = g.dW.mod(pos, y);
    int yr = int(y) - g.sh, xr = int(x) - g.sw;
    if (yr < 0) yr += g.H;
    if (xr < 0) xr += g.W;
    const unsigned wy = g.dwh.div(unsigned(yr)), wx = g.dww.div(unsigned(xr));
    const int win = int(b) * g.nW + int(wy) * g.nWx + int(wx);
    return {win * g.N + int(g.dwh.mod(unsigned(yr), wy)) * g.ww + int(g.dww.mod(unsigned(xr), wx)), -1};
  }
};

}  // namespace

cudaError_t window_partition(const void* x, void* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t wh,
                             int64_t ww, int64_t sh, int64_t sw, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_rows<false>(x, nullptr, nullptr, out, B * H * W, C * es, dtype,
                                    PartitionMap{WinGeom(H, W, wh, ww, sh, sw)}, stream);
}

cudaError_t window_merge(const void* windows, void* out, int64_t B, int64_t H, int64_t W, int64_t C, int64_t wh,
                         int64_t ww, int64_t sh, int64_t sw, DType dtype, cudaStream_t stream) {
  const int es = element_size(dtype);
  return tokens::launch_rows<false>(windows, nullptr, nullptr, out, B * H * W, C * es, dtype,
                                    MergeMap{WinGeom(H, W, wh, ww, sh, sw)}, stream);
}

}  // namespace mixkernels::cuda
