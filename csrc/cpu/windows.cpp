// CPU kernels: Swin roll + window partition and window merge + reverse roll, one pass each.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "mixkernels/checks.h"
#include "mixkernels/cpu_common.h"

namespace mixkernels::cpu {
namespace {

// Kernel-level ops are also callable directly: reject geometry that would divide by zero or
// index out of bounds instead of crashing the process.
void check_geometry(const char* op, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  MK_CHECK_ARG(H > 0 && W > 0 && wh > 0 && ww > 0 && H % wh == 0 && W % ww == 0, op, "window (wh, ww)",
               c10::str("tile a non-empty grid (", H, ", ", W, ")"), c10::str("(", wh, ", ", ww, ")"));
  MK_CHECK_ARG(sh >= 0 && sw >= 0 && sh < wh && sw < ww, op, "shift (sh, sw)", c10::str("be in [0, (", wh, ", ", ww, "))"),
               c10::str("(", sh, ", ", sw, ")"));
  checked_mul(H, W, op);  // H*W (hence nW and N) fits in int64
}

// Window row (window w of image b, row i) holds tokens (y, (x0 + j + sw) % W), j < ww, of grid
// row y = (y0 + i + sh) % H: at most two contiguous runs of the token grid (the shift wraps at
// W). Copying runs instead of single tokens keeps the index arithmetic (integer divisions) out
// of the per-token path: this was what made the unshifted partition slower than eager's copy.
struct WindowRows {
  int64_t H, W, wh, ww, sh, sw, nWw, nW;
  // Copies window row `wr` (b, w, i) between the windows tensor and the grid, `row` = C*element bytes.
  template <bool kToWindows>
  void copy(char* win, char* grid, int64_t wr, int64_t row) const {
    const int64_t i = wr % wh, w = (wr / wh) % nW, b = wr / (wh * nW);
    const int64_t y = ((w / nWw) * wh + i + sh) % H, x = ((w % nWw) * ww + sw) % W;
    char* g = grid + ((b * H + y) * W + x) * row;
    char* o = win + wr * ww * row;
    const int64_t first = std::min(ww, W - x);  // tokens before the wrap
    if (kToWindows) {
      std::memcpy(o, g, first * row);
      if (first < ww) std::memcpy(o + first * row, g - x * row, (ww - first) * row);
    } else {
      std::memcpy(g, o, first * row);
      if (first < ww) std::memcpy(g - x * row, o + first * row, (ww - first) * row);
    }
  }
};

template <bool kToWindows>
void copy_windows(char* win, char* grid, const WindowRows& m, int64_t B, int64_t row) {
  if (row == 0) return;  // C == 0: nothing to move (and memcpy must not see the null data pointers)
  at::parallel_for(0, B * m.nW * m.wh, row_grain(m.ww * row), [&](int64_t begin, int64_t end) {
    for (int64_t wr = begin; wr < end; ++wr) m.copy<kToWindows>(win, grid, wr, row);
  });
}

at::Tensor window_partition(const at::Tensor& x, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  check_contiguous("window_partition", "x", x, 4, "(B,H,W,C)");
  check_geometry("window_partition", x.size(1), x.size(2), wh, ww, sh, sw);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const WindowRows m{H, W, wh, ww, sh, sw, W / ww, (H / wh) * (W / ww)};
  auto out = at::empty({B * m.nW, wh * ww, C}, x.options());
  copy_windows<true>(static_cast<char*>(out.data_ptr()), static_cast<char*>(x.data_ptr()), m, B, C * x.element_size());
  return out;
}

// The inverse permutation: every grid token is written exactly once (windows tile the grid).
at::Tensor window_merge(const at::Tensor& windows, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh,
                        int64_t sw) {
  check_geometry("window_merge", H, W, wh, ww, sh, sw);
  check_contiguous("window_merge", "windows", windows, 3, "(B*nW, wh*ww, C)");
  MK_CHECK_ARG(windows.size(1) == wh * ww && windows.size(0) % ((H / wh) * (W / ww)) == 0, "window_merge", "windows",
               c10::str("have shape (B*", (H / wh) * (W / ww), ", ", wh * ww, ", C)"), windows.sizes());
  const int64_t C = windows.size(2);
  const WindowRows m{H, W, wh, ww, sh, sw, W / ww, (H / wh) * (W / ww)};
  const int64_t B = windows.size(0) / m.nW;
  auto out = at::empty({B, H, W, C}, windows.options());
  copy_windows<false>(static_cast<char*>(windows.data_ptr()), static_cast<char*>(out.data_ptr()), m, B,
                      C * windows.element_size());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CPU, m) {
  m.impl("window_partition", &window_partition);
  m.impl("window_merge", &window_merge);
}

}  // namespace mixkernels::cpu
