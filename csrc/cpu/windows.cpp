// CPU kernels: Swin roll + window partition and window merge + reverse roll, one pass each.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "mixkernels/cpu_common.h"

namespace mixkernels::cpu {
namespace {

// Kernel-level ops are also callable directly: reject geometry that would divide by zero or
// index out of bounds instead of crashing the process.
void check_geometry(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  TORCH_CHECK(H > 0 && W > 0 && wh > 0 && ww > 0 && H % wh == 0 && W % ww == 0,
              "window_partition/merge: windows (", wh, ", ", ww, ") must tile a non-empty grid (", H, ", ", W, ")");
  TORCH_CHECK(sh >= 0 && sw >= 0 && sh < wh && sw < ww, "window_partition/merge: shift (", sh, ", ", sw,
              ") must be in [0, window)");
  checked_mul(H, W, "window_partition/merge");  // H*W (hence nW and N) fits in int64
}

// Row r of the windows tensor, (window, n), is token ((wi*wh + n/ww + sh) % H, (wj*ww + n%ww + sw) % W).
struct WindowMap {
  int64_t H, W, wh, ww, sh, sw, nWw, nW, N;
  int64_t token_of(int64_t r) const {
    const int64_t win = r / N, n = r % N;
    const int64_t b = win / nW, w = win % nW;
    const int64_t y = ((w / nWw) * wh + n / ww + sh) % H;
    const int64_t x = ((w % nWw) * ww + n % ww + sw) % W;
    return (b * H + y) * W + x;
  }
};

at::Tensor window_partition(const at::Tensor& x, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "window_partition: x must be a contiguous (B,H,W,C) tensor");
  check_geometry(x.size(1), x.size(2), wh, ww, sh, sw);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const WindowMap map{H, W, wh, ww, sh, sw, W / ww, (H / wh) * (W / ww), wh * ww};
  auto out = at::empty({B * map.nW, map.N, C}, x.options());
  gather_rows(static_cast<char*>(out.data_ptr()), static_cast<const char*>(x.data_ptr()), B * H * W,
              C * x.element_size(), [&](int64_t r) { return map.token_of(r); });
  return out;
}

at::Tensor window_merge(const at::Tensor& windows, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh,
                        int64_t sw) {
  check_geometry(H, W, wh, ww, sh, sw);
  TORCH_CHECK(windows.dim() == 3 && windows.is_contiguous() && windows.size(1) == wh * ww &&
                  windows.size(0) % ((H / wh) * (W / ww)) == 0,
              "window_merge: windows must be a contiguous (B*nW, wh*ww, C) tensor, got ", windows.sizes());
  const int64_t C = windows.size(2);
  const WindowMap map{H, W, wh, ww, sh, sw, W / ww, (H / wh) * (W / ww), wh * ww};
  const int64_t B = windows.size(0) / map.nW;
  auto out = at::empty({B, H, W, C}, windows.options());
  // Invert the map per output token: token (b,y,x) comes from window row r.
  const int64_t nWw = map.nWw;
  gather_rows(static_cast<char*>(out.data_ptr()), static_cast<const char*>(windows.data_ptr()), B * H * W,
              C * windows.element_size(), [&](int64_t t) {
                const int64_t b = t / (H * W), y = (t / W) % H, x = t % W;
                const int64_t yr = (y - sh + H) % H, xr = (x - sw + W) % W;  // position on the rolled grid
                const int64_t win = b * map.nW + (yr / wh) * nWw + xr / ww;
                return win * map.N + (yr % wh) * ww + xr % ww;
              });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CPU, m) {
  m.impl("window_partition", &window_partition);
  m.impl("window_merge", &window_merge);
}

}  // namespace mixkernels::cpu
