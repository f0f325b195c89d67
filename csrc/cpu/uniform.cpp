// CPU kernels: UM-MAE uniform sampling (gather one unit of every 2x2 cell, fused secondary
// masking), its backward (scatter + deterministic mask-token reduction) and the inverse scatter.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "mixkernels/checks.h"
#include "mixkernels/cpu_common.h"

namespace mixkernels::cpu {
namespace {

// Geometry of x (B,H,W,C) <-> compact (B,H/2,W/2,C) with u x u units and (hc,wc) 2x2 cells.
struct UnitMap {
  int64_t H, W, u, hc, wc;
  // Compact row t = (b,Y,X) -> (cell index, full-grid row of unit 0 offset): source row for keep k.
  int64_t compact_cell(int64_t t) const {
    const int64_t h = H / 2, w = W / 2;
    const int64_t b = t / (h * w), Y = (t / w) % h, X = t % w;
    return (b * hc + Y / u) * wc + X / u;
  }
  int64_t compact_source(int64_t t, int k) const {
    const int64_t h = H / 2, w = W / 2;
    const int64_t b = t / (h * w), Y = (t / w) % h, X = t % w;
    const int64_t y = (2 * (Y / u) + (k >> 1)) * u + Y % u;
    const int64_t x = (2 * (X / u) + (k & 1)) * u + X % u;
    return (b * H + y) * W + x;
  }
  // Full row r = (b,y,x) -> its cell and position q (0..3) inside the cell, and its compact row.
  void full(int64_t r, int64_t& cell, int& q, int64_t& compact) const {
    const int64_t b = r / (H * W), y = (r / W) % H, x = r % W;
    const int64_t ci = y / (2 * u), cj = x / (2 * u);
    cell = (b * hc + ci) * wc + cj;
    q = static_cast<int>(((y / u) & 1) * 2 + ((x / u) & 1));
    compact = (b * (H / 2) + ci * u + y % u) * (W / 2) + cj * u + x % u;
  }
};

UnitMap unit_map(int64_t H, int64_t W, int64_t unit) { return {H, W, unit, H / (2 * unit), W / (2 * unit)}; }

// Kernel-level ops are also callable directly: check the geometry and the (B,hc,wc) cell tensors
// the raw-pointer loops index. `t` is x (full grid) or the compact image / its gradient.
UnitMap check_units(const char* op, const char* name, const at::Tensor& t, const at::Tensor& keep, int64_t unit,
                    bool compact, const c10::optional<at::Tensor>& secondary) {
  check_contiguous(op, name, t, 4, compact ? "(B,H/2,W/2,C)" : "(B,H,W,C)");
  const int64_t h = t.size(1), w = t.size(2);
  const int64_t H = compact ? checked_mul(h, 2, op) : h, W = compact ? checked_mul(w, 2, op) : w;
  // checked without forming 2*unit, which a huge unit would overflow
  const bool ok = unit > 0 && h % unit == 0 && w % unit == 0 &&
                  (compact || ((h / unit) % 2 == 0 && (w / unit) % 2 == 0));
  MK_CHECK_ARG(ok, op, "unit", c10::str("be positive with 2*unit dividing the grid (", H, ", ", W, ")"), unit);
  const int64_t hc = compact ? h / unit : h / unit / 2, wc = compact ? w / unit : w / unit / 2;
  check_dtype(op, "keep", keep, at::kByte);
  check_contiguous(op, "keep", keep, 3, "(B,H/2u,W/2u)");
  check_shape(op, "keep", keep, {t.size(0), hc, wc});
  if (secondary.has_value()) {
    check_dtype(op, "secondary", *secondary, at::kByte);
    check_contiguous(op, "secondary", *secondary, 3, "(B,H/2u,W/2u)");
    check_shape(op, "secondary", *secondary, keep.sizes());
  }
  return unit_map(H, W, unit);
}

// out[b,Y,X] = mask_token if secondary[cell] else x[kept unit of the cell].
at::Tensor uniform_sample(const at::Tensor& x, const at::Tensor& keep, int64_t unit,
                          const c10::optional<at::Tensor>& token, const c10::optional<at::Tensor>& secondary) {
  const UnitMap map = check_units("uniform_sample", "x", x, keep, unit, false, secondary);
  if (secondary.has_value()) {
    MK_CHECK_ARG(token.has_value(), "uniform_sample", "mask_token", "be given with secondary", "None");
    check_dtype("uniform_sample", "mask_token", *token, x.scalar_type());
    MK_CHECK_ARG(token->numel() == x.size(3) && token->is_contiguous(), "uniform_sample", "mask_token",
                 c10::str("be contiguous with C = ", x.size(3), " elements"), token->sizes());
  }
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  auto out = at::empty({B, H / 2, W / 2, C}, x.options());
  const uint8_t* k = keep.data_ptr<uint8_t>();
  const uint8_t* sec = secondary.has_value() ? secondary->data_ptr<uint8_t>() : nullptr;
  const int64_t row_bytes = C * x.element_size();
  const char* in = static_cast<const char*>(x.data_ptr());
  const char* tok = sec ? static_cast<const char*>(token->data_ptr()) : nullptr;
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, out.numel() / (C > 0 ? C : 1), row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cell = map.compact_cell(t);
      const char* src = (sec && sec[cell]) ? tok : in + map.compact_source(t, k[cell] & 3) * row_bytes;
      std::memcpy(o + t * row_bytes, src, row_bytes);
    }
  });
  return out;
}

// Rows per reduction chunk: fixed, so the partial sums (and the result) do not depend on threads.
constexpr int64_t kChunkRows = 512;

// dx = scatter of the non-secondary compact rows (zeros elsewhere); dtoken = sum of the secondary rows.
std::tuple<at::Tensor, at::Tensor> uniform_sample_backward(const at::Tensor& g, const at::Tensor& keep, int64_t unit,
                                                           const c10::optional<at::Tensor>& secondary,
                                                           bool need_token) {
  const UnitMap map = check_units("uniform_sample_backward", "grad", g, keep, unit, true, secondary);
  const int64_t B = g.size(0), H = 2 * g.size(1), W = 2 * g.size(2), C = g.size(3);
  auto dx = at::empty({B, H, W, C}, g.options());
  auto acc_opts = g.options().dtype(g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const uint8_t* k = keep.data_ptr<uint8_t>();
  const uint8_t* sec = secondary.has_value() ? secondary->data_ptr<uint8_t>() : nullptr;
  const bool want_tok = need_token && sec != nullptr;
  const int64_t rows = B * H * W;
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  at::Tensor partial = want_tok ? at::zeros({chunks, C}, acc_opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "uniform_sample_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    acc* part = want_tok ? partial.data_ptr<acc>() : nullptr;
    if (dx.numel() == 0) return;  // (empty tensors' pointers may be null)
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        acc* pt = part ? part + ch * C : nullptr;
        const int64_t end = std::min(rows, (ch + 1) * kChunkRows);
        for (int64_t r = ch * kChunkRows; r < end; ++r) {
          int64_t cell, compact;
          int q;
          map.full(r, cell, q, compact);
          scalar_t* d = dp + r * C;
          const bool kept = (k[cell] & 3) == q;
          const bool masked = sec && sec[cell];
          if (kept && !masked) {
            std::memcpy(d, gp + compact * C, C * sizeof(scalar_t));
            continue;
          }
          std::memset(d, 0, C * sizeof(scalar_t));
          if (kept && pt) {
            const scalar_t* s = gp + compact * C;
            for (int64_t c = 0; c < C; ++c) pt[c] += acc(s[c]);
          }
        }
      }
    });
  });
  at::Tensor dtoken;
  if (want_tok) {
    dtoken = at::zeros({C}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "uniform_token_reduce", [&] {
      const scalar_t* p = partial.data_ptr<scalar_t>();
      scalar_t* d = dtoken.data_ptr<scalar_t>();
      for (int64_t ch = 0; ch < chunks; ++ch)  // fixed order
        for (int64_t c = 0; c < C; ++c) d[c] += p[ch * C + c];
    });
  } else if (need_token) {
    dtoken = at::zeros({C}, acc_opts);  // no secondary masking: the token never reaches the output
  } else {
    dtoken = at::empty({0}, acc_opts);
  }
  return {dx, dtoken};
}

// out (B,2h,2w,C): the compact rows back at their kept units, zeros elsewhere.
at::Tensor uniform_scatter(const at::Tensor& compact, const at::Tensor& keep, int64_t unit) {
  const UnitMap map = check_units("uniform_scatter", "compact", compact, keep, unit, true, c10::nullopt);
  const int64_t B = compact.size(0), H = 2 * compact.size(1), W = 2 * compact.size(2), C = compact.size(3);
  auto out = at::empty({B, H, W, C}, compact.options());
  const uint8_t* k = keep.data_ptr<uint8_t>();
  gather_rows(static_cast<char*>(out.data_ptr()), static_cast<const char*>(compact.data_ptr()), B * H * W,
              C * compact.element_size(), [&](int64_t r) -> int64_t {
                int64_t cell, src;
                int q;
                map.full(r, cell, q, src);
                return (k[cell] & 3) == q ? src : -1;
              });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CPU, m) {
  m.impl("uniform_sample", &uniform_sample);
  m.impl("uniform_sample_backward", &uniform_sample_backward);
  m.impl("uniform_scatter", &uniform_scatter);
}

}  // namespace mixkernels::cpu
