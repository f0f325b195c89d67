// CPU kernels: MixMIM token mixing (mix_tokens) and the dual decoder's un-mixing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "mixkernels/checks.h"
#include "mixkernels/cpu_common.h"

namespace mixkernels::cpu {
namespace {

// Kernel-level ops are also callable directly: check what the raw-pointer loops rely on.
void check_rows(const char* op, const char* name, const at::Tensor& x, const at::Tensor& mask, int64_t B) {
  check_contiguous(op, name, x, 3, "(B,L,C)");
  check_dtype(op, "mask", mask, at::kByte);
  check_contiguous(op, "mask", mask, 2, "(G,L)");
  MK_CHECK_ARG((mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == x.size(1), op, "mask",
               c10::str("have shape (1 or ", B, ", ", x.size(1), ")"), mask.sizes());
}

// out[i,p] = x[B-1-i,p] if mask[i,p] else x[i,p]: a pure row gather.
at::Tensor mix_tokens(const at::Tensor& x, const at::Tensor& mask) {
  check_rows("mix_tokens", "x", x, mask, x.dim() == 3 ? x.size(0) : 0);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const int64_t G = mask.size(0);
  auto out = at::empty_like(x);
  const uint8_t* m = mask.data_ptr<uint8_t>();
  gather_rows(static_cast<char*>(out.data_ptr()), static_cast<const char*>(x.data_ptr()), B * L,
              C * x.element_size(), [&](int64_t r) {
                const int64_t i = r / L, p = r % L;
                const bool take = m[(G == 1 ? 0 : i) * L + p];
                return (take ? (B - 1 - i) : i) * L + p;
              });
  return out;
}

// dx[j,p] = mask[B-1-j,p]*g[B-1-j,p] + (1-mask[j,p])*g[j,p]: a gather from at most two rows.
at::Tensor mix_tokens_backward(const at::Tensor& g, const at::Tensor& mask) {
  check_rows("mix_tokens_backward", "grad", g, mask, g.dim() == 3 ? g.size(0) : 0);
  const int64_t B = g.size(0), L = g.size(1), C = g.size(2);
  const int64_t G = mask.size(0);
  auto dx = at::empty_like(g);
  const uint8_t* m = mask.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mix_tokens_backward", [&] {
    if (dx.numel() == 0) return;  // (empty tensors' pointers may be null)
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, row_grain(C * g.element_size()), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t j = r / L, p = r % L, jp = B - 1 - j;
        const bool from_partner = m[(G == 1 ? 0 : jp) * L + p];
        const bool from_self = !m[(G == 1 ? 0 : j) * L + p];
        scalar_t* d = dp + r * C;
        const scalar_t* a = gp + (jp * L + p) * C;
        const scalar_t* s = gp + r * C;
        if (from_partner && from_self) {
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(acc_t<scalar_t>(a[c]) + acc_t<scalar_t>(s[c]));
        } else if (from_partner || from_self) {
          std::memcpy(d, from_partner ? a : s, C * sizeof(scalar_t));
        } else {
          std::memset(d, 0, C * sizeof(scalar_t));
        }
      }
    });
  });
  return dx;
}

// out[i,p] = (token where row i takes the mask token, else x[i mod B,p]) + pos[p].
at::Tensor unmix_tokens(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& token,
                        const c10::optional<at::Tensor>& pos) {
  check_rows("unmix_tokens", "x", x, mask, x.dim() == 3 ? x.size(0) : 0);
  check_dtype("unmix_tokens", "mask_token", token, x.scalar_type());
  MK_CHECK_ARG(token.numel() == x.size(2) && token.is_contiguous(), "unmix_tokens", "mask_token",
               c10::str("be contiguous with C = ", x.size(2), " elements"), token.sizes());
  if (pos.has_value()) {
    check_dtype("unmix_tokens", "pos_embed", *pos, x.scalar_type());
    MK_CHECK_ARG(pos->numel() == x.size(1) * x.size(2) && pos->is_contiguous(), "unmix_tokens", "pos_embed",
                 c10::str("be contiguous (L,C) = (", x.size(1), ", ", x.size(2), ")"), pos->sizes());
  }
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const int64_t G = mask.size(0);
  auto out = at::empty({2 * B, L, C}, x.options());
  const uint8_t* m = mask.data_ptr<uint8_t>();
  const bool has_pos = pos.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unmix_tokens", [&] {
    if (out.numel() == 0) return;  // (empty tensors' pointers may be null)
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = token.data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, 2 * B * L, row_grain(C * x.element_size()), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r / L, p = r % L, b = i % B;
        const bool masked = m[(G == 1 ? 0 : b) * L + p];
        const bool use_token = (i < B) ? masked : !masked;
        const scalar_t* src = use_token ? tp : xp + (b * L + p) * C;
        scalar_t* d = op + r * C;
        if (has_pos) {
          const scalar_t* pe = pp + p * C;
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(acc(src[c]) + acc(pe[c]));
        } else {
          std::memcpy(d, src, C * sizeof(scalar_t));
        }
      }
    });
  });
  return out;
}

// dx[b,p] = g[b,p] if !mask else g[B+b,p]; dtoken sums the complementary rows; dpos sums all 2B rows.
// Reductions go per position p (fixed order over b), then over p: deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unmix_tokens_backward(const at::Tensor& g, const at::Tensor& mask,
                                                                     bool need_token, bool need_pos) {
  MK_CHECK_ARG(g.dim() == 3 && g.size(0) % 2 == 0, "unmix_tokens_backward", "grad", "be (2B,L,C)", g.sizes());
  check_rows("unmix_tokens_backward", "grad", g, mask, g.size(0) / 2);
  const int64_t B = g.size(0) / 2, L = g.size(1), C = g.size(2);
  const int64_t G = mask.size(0);
  auto dx = at::empty({B, L, C}, g.options());
  // Reductions accumulate (and return) in float32, or float64 for float64 gradients.
  auto f32 = g.options().dtype(g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor tok_part = need_token ? at::zeros({L, C}, f32) : at::Tensor();
  at::Tensor dpos = need_pos ? at::zeros({L, C}, f32) : at::empty({0}, f32);
  const uint8_t* m = mask.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "unmix_tokens_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    acc* tk = need_token ? tok_part.data_ptr<acc>() : nullptr;
    acc* pe = need_pos ? dpos.data_ptr<acc>() : nullptr;
    if (dx.numel() == 0) return;  // nothing to scatter or sum (the partials stay 0)
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t b = 0; b < B; ++b) {
          const bool masked = m[(G == 1 ? 0 : b) * L + p];
          const scalar_t* g1 = gp + (b * L + p) * C;        // first half row
          const scalar_t* g2 = gp + ((B + b) * L + p) * C;  // second half row
          std::memcpy(dp + (b * L + p) * C, masked ? g2 : g1, C * sizeof(scalar_t));
          if (tk) {
            const scalar_t* t = masked ? g1 : g2;
            for (int64_t c = 0; c < C; ++c) tk[p * C + c] += acc(t[c]);
          }
          if (pe) {
            for (int64_t c = 0; c < C; ++c) pe[p * C + c] += acc(g1[c]) + acc(g2[c]);
          }
        }
      }
    });
  });
  at::Tensor dtoken = need_token ? tok_part.sum(0) : at::empty({0}, f32);
  return {dx, dtoken, dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CPU, m) {
  m.impl("mix_tokens", &mix_tokens);
  m.impl("mix_tokens_backward", &mix_tokens_backward);
  m.impl("unmix_tokens", &unmix_tokens);
  m.impl("unmix_tokens_backward", &unmix_tokens_backward);
}

}  // namespace mixkernels::cpu
