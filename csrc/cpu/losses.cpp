// CPU kernels: fused reconstruction losses (MixMIM dual reconstruction, MAE/UM-MAE masked, SimMIM L1).
//
// One task per patch: the target patch is read straight from the image (MAE patchify order
// (row, col, channel), no patchified copy), normalized with the per-patch mean and unbiased
// variance, and compared with the single pred row that predicts it. Each patch is reduced by
// one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "mixkernels/checks.h"
#include "mixkernels/cpu_common.h"
#include "mixkernels/simmim_checks.h"

namespace mixkernels::cpu {
namespace {

// Image geometry shared by the four kernels.
struct Patches {
  int64_t B, H, W, p, nw, L, D;
  Patches(const at::Tensor& imgs, int64_t patch) {
    B = imgs.size(0), H = imgs.size(2), W = imgs.size(3), p = patch;
    nw = W / p, L = (H / p) * nw, D = p * p * 3;
  }
};

// t[(i*p + j)*3 + c] = imgs[b, c, ph*p+i, pw*p+j], normalized per patch when norm_pix.
template <typename acc, typename TI>
void load_target(const TI* imgs, const Patches& g, int64_t b, int64_t patch, bool norm_pix, double eps, acc* t) {
  const int64_t p = g.p, HW = g.H * g.W;
  const int64_t y0 = (patch / g.nw) * p, x0 = (patch % g.nw) * p;
  const TI* img = imgs + b * 3 * HW;
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t c = 0; c < 3; ++c) {
      const TI* row = img + c * HW + (y0 + i) * g.W + x0;
      acc* dst = t + i * p * 3 + c;
      for (int64_t j = 0; j < p; ++j) dst[j * 3] = static_cast<acc>(row[j]);
    }
  }
  if (!norm_pix) return;
  // Sequential sums over up to 3072 values run in double (as cheap as float when scalar) so the
  // fp32 results match torch's pairwise sums; two passes keep precision for bright patches.
  double sum = 0;
  for (int64_t d = 0; d < g.D; ++d) sum += t[d];
  const acc mean = static_cast<acc>(sum / static_cast<double>(g.D));
  double ss = 0;
  for (int64_t d = 0; d < g.D; ++d) ss += static_cast<double>(t[d] - mean) * static_cast<double>(t[d] - mean);
  const double var = ss / static_cast<double>(g.D - 1);  // unbiased, as torch.var and the official code
  const acc den = static_cast<acc>(std::sqrt(var + eps));
  for (int64_t d = 0; d < g.D; ++d) t[d] = (t[d] - mean) / den;
}

template <typename acc, typename TP>
acc patch_mse(const TP* u, const acc* t, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc e = static_cast<acc>(u[d]) - t[d];
    s += static_cast<double>(e) * static_cast<double>(e);
  }
  return static_cast<acc>(s / static_cast<double>(D));
}

// du = g * 2 (u - t) / D, written in pred's dtype.
template <typename acc, typename TP>
void patch_grad(TP* du, const TP* u, const acc* t, acc g, int64_t D) {
  const acc k = g * static_cast<acc>(2) / static_cast<acc>(D);
  for (int64_t d = 0; d < D; ++d) du[d] = static_cast<TP>(k * (static_cast<acc>(u[d]) - t[d]));
}

// Patches per task: about 64 KiB of target per task.
inline int64_t patch_grain(int64_t D) { return row_grain(D * 4); }

// Run `body.template operator()<TP, TI, acc>()` for pred dtype x imgs dtype (acc: double if either is double).
template <typename Body>
void dispatch2(const at::Tensor& pred, const at::Tensor& imgs, Body&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mixkernels_losses", [&] {
    using TP = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "mixkernels_losses", [&] {
      using TI = scalar_t;
      constexpr bool wide = std::is_same_v<TP, double> || std::is_same_v<TI, double>;
      using acc = std::conditional_t<wide, double, float>;
      body.template operator()<TP, TI, acc>();
    });
  });
}

at::ScalarType acc_type(const at::Tensor& pred, const at::Tensor& imgs) {
  return (pred.scalar_type() == at::kDouble || imgs.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

void check_inputs(const char* op, const at::Tensor& pred, const at::Tensor& imgs, int64_t p) {
  check_contiguous(op, "pred", pred, 3, "(B',L,p*p*3)");
  check_contiguous(op, "imgs", imgs, 4, "(B,3,H,W)");
  MK_CHECK_ARG(imgs.size(1) == 3, op, "imgs", "have 3 channels", imgs.sizes());
  MK_CHECK_ARG(p > 0 && imgs.size(2) % p == 0 && imgs.size(3) % p == 0, op, "patch_size",
               c10::str("be positive and divide the image size (", imgs.size(2), ", ", imgs.size(3), ")"), p);
  const int64_t d = checked_mul(checked_mul(p, p, op), 3, op);  // a huge patch_size must not wrap
  MK_CHECK_ARG(pred.size(2) == d, op, "pred's last dim", c10::str("be patch_size**2 * 3 = ", d), pred.size(2));
}

// The accumulation-dtype (B, rows) gradient of a loss backward.
void check_grad(const char* op, const at::Tensor& grad, at::ScalarType acc, int64_t numel) {
  check_dtype(op, "grad", grad, acc);
  MK_CHECK_ARG(grad.is_contiguous() && grad.numel() == numel, op, "grad",
               c10::str("be contiguous with ", numel, " elements (B, L)"), grad.sizes());
}

// Image b's prediction of patch l is row b of the first half where m[b,l], else row 2B-1-b (the flipped second half).
inline int64_t mixmim_src(const uint8_t* m, int64_t G, int64_t B, int64_t L, int64_t b, int64_t l) {
  return m[(G == 1 ? 0 : b) * L + l] ? b : 2 * B - 1 - b;
}

void check_mixmim(const char* op, const at::Tensor& pred, const at::Tensor& mask, const Patches& g) {
  MK_CHECK_ARG(pred.size(0) == 2 * g.B && pred.size(1) == g.L, op, "pred",
               c10::str("have shape (2B, L, D) = (", 2 * g.B, ", ", g.L, ", ", pred.size(2), ")"), pred.sizes());
  check_dtype(op, "mask", mask, at::kByte);
  check_contiguous(op, "mask", mask, 2, "(G,L)");
  MK_CHECK_ARG((mask.size(0) == 1 || mask.size(0) == g.B) && mask.size(1) == g.L, op, "mask",
               c10::str("have shape (1 or ", g.B, ", ", g.L, ")"), mask.sizes());
}

void check_patch_idx(const char* op, const at::Tensor& pred, const at::Tensor& patch_idx, const Patches& g) {
  MK_CHECK_ARG(pred.size(0) == g.B, op, "pred", c10::str("have imgs' batch ", g.B, " rows"), pred.sizes());
  check_dtype(op, "patch_idx", patch_idx, at::kLong);
  MK_CHECK_ARG(patch_idx.is_contiguous() && patch_idx.numel() == g.B * pred.size(1), op, "patch_idx",
               c10::str("be contiguous (B, Lp) = (", g.B, ", ", pred.size(1), ")"), patch_idx.sizes());
}

at::Tensor mixmim_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t p,
                       bool norm_pix, double eps) {
  check_inputs("mixmim_loss", pred, imgs, p);
  const Patches g(imgs, p);
  check_mixmim("mixmim_loss", pred, mask, g);
  const int64_t G = mask.size(0);
  auto out = at::empty({g.B, g.L}, pred.options().dtype(acc_type(pred, imgs)));
  const uint8_t* m = mask.data_ptr<uint8_t>();
  dispatch2(pred, imgs, [&]<typename TP, typename TI, typename acc>() {
    const TP* pp = pred.data_ptr<TP>();
    const TI* ip = imgs.data_ptr<TI>();
    acc* op = out.data_ptr<acc>();
    at::parallel_for(0, g.B * g.L, patch_grain(g.D), [&](int64_t begin, int64_t end) {
      std::vector<acc> t(g.D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.L, l = r % g.L;
        load_target(ip, g, b, l, norm_pix, eps, t.data());
        op[r] = patch_mse(pp + (mixmim_src(m, G, g.B, g.L, b, l) * g.L + l) * g.D, t.data(), g.D);
      }
    });
  });
  return out;
}

// Every pred row feeds exactly one patch loss: the task of patch (b,l) writes both candidate
// rows, the gradient into the one that was used and zeros into the other.
at::Tensor mixmim_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                const at::Tensor& mask, int64_t p, bool norm_pix, double eps) {
  check_inputs("mixmim_loss_backward", pred, imgs, p);
  const Patches g(imgs, p);
  check_mixmim("mixmim_loss_backward", pred, mask, g);
  check_grad("mixmim_loss_backward", grad, acc_type(pred, imgs), g.B * g.L);
  const int64_t G = mask.size(0);
  auto dpred = at::empty_like(pred);
  const uint8_t* m = mask.data_ptr<uint8_t>();
  dispatch2(pred, imgs, [&]<typename TP, typename TI, typename acc>() {
    const TP* pp = pred.data_ptr<TP>();
    const TI* ip = imgs.data_ptr<TI>();
    const acc* gp = grad.data_ptr<acc>();
    TP* dp = dpred.data_ptr<TP>();
    at::parallel_for(0, g.B * g.L, patch_grain(g.D), [&](int64_t begin, int64_t end) {
      std::vector<acc> t(g.D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.L, l = r % g.L;
        const int64_t src = mixmim_src(m, G, g.B, g.L, b, l);
        const int64_t other = src == b ? 2 * g.B - 1 - b : b;
        load_target(ip, g, b, l, norm_pix, eps, t.data());
        const int64_t so = (src * g.L + l) * g.D;
        patch_grad(dp + so, pp + so, t.data(), gp[r], g.D);
        std::fill_n(dp + (other * g.L + l) * g.D, g.D, static_cast<TP>(0));
      }
    });
  });
  return dpred;
}

at::Tensor masked_recon_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& patch_idx, int64_t p,
                             bool norm_pix, double eps) {
  check_inputs("masked_recon_loss", pred, imgs, p);
  const Patches g(imgs, p);
  const int64_t Lp = pred.size(1);
  check_patch_idx("masked_recon_loss", pred, patch_idx, g);
  auto out = at::empty({g.B, Lp}, pred.options().dtype(acc_type(pred, imgs)));
  const int64_t* idx = patch_idx.data_ptr<int64_t>();
  dispatch2(pred, imgs, [&]<typename TP, typename TI, typename acc>() {
    const TP* pp = pred.data_ptr<TP>();
    const TI* ip = imgs.data_ptr<TI>();
    acc* op = out.data_ptr<acc>();
    at::parallel_for(0, g.B * Lp, patch_grain(g.D), [&](int64_t begin, int64_t end) {
      std::vector<acc> t(g.D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t patch = idx[r];
        if (patch < 0) {
          op[r] = 0;
          continue;
        }
        MK_CHECK_ARG(patch < g.L, "masked_recon_loss", "patch_idx", c10::str("be < L = ", g.L), patch);
        load_target(ip, g, r / Lp, patch, norm_pix, eps, t.data());
        op[r] = patch_mse(pp + r * g.D, t.data(), g.D);
      }
    });
  });
  return out;
}

at::Tensor masked_recon_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                      const at::Tensor& patch_idx, int64_t p, bool norm_pix, double eps) {
  check_inputs("masked_recon_loss_backward", pred, imgs, p);
  const Patches g(imgs, p);
  const int64_t Lp = pred.size(1);
  check_patch_idx("masked_recon_loss_backward", pred, patch_idx, g);
  check_grad("masked_recon_loss_backward", grad, acc_type(pred, imgs), g.B * Lp);
  auto dpred = at::empty_like(pred);
  const int64_t* idx = patch_idx.data_ptr<int64_t>();
  dispatch2(pred, imgs, [&]<typename TP, typename TI, typename acc>() {
    const TP* pp = pred.data_ptr<TP>();
    const TI* ip = imgs.data_ptr<TI>();
    const acc* gp = grad.data_ptr<acc>();
    TP* dp = dpred.data_ptr<TP>();
    at::parallel_for(0, g.B * Lp, patch_grain(g.D), [&](int64_t begin, int64_t end) {
      std::vector<acc> t(g.D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t patch = idx[r];
        if (patch < 0) {
          std::fill_n(dp + r * g.D, g.D, static_cast<TP>(0));
          continue;
        }
        MK_CHECK_ARG(patch < g.L, "masked_recon_loss_backward", "patch_idx", c10::str("be < L = ", g.L), patch);
        load_target(ip, g, r / Lp, patch, norm_pix, eps, t.data());
        patch_grad(dp + r * g.D, pp + r * g.D, t.data(), gp[r], g.D);
      }
    });
  });
  return dpred;
}

// ---- SimMIM: masked L1 on full-resolution predictions ----
// pred, imgs (B,C,H,W) (dtypes may differ); mask uint8 (G, L) over patches of p px, L = (H/p)*(W/p).
// A task is one band of p image rows of one image, walked as runs of consecutive masked (or
// unmasked) patches: each channel row of a run is one contiguous, vectorizable loop, and
// unmasked runs are never read. Column sums over (channel, row) are taken in double, then each
// patch sums its p columns in order: a fixed order, whatever the thread count.

// Runs body(b, ph, m, runs) for each band (b, patch row ph): m points at the band's nw mask bytes,
// runs lists (first patch, end patch, masked) of maximal runs of equal mask values.
template <typename Body>
void simmim_bands(const at::Tensor& imgs, const at::Tensor& mask, int64_t p, Body&& body) {
  const int64_t B = imgs.size(0), C = imgs.size(1), W = imgs.size(3), nh = imgs.size(2) / p, nw = W / p;
  const int64_t G = mask.size(0);
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  at::parallel_for(0, B * nh, row_grain(C * p * W * 8), [&](int64_t begin, int64_t end) {
    std::vector<std::array<int64_t, 3>> runs;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / nh, ph = r % nh;
      const uint8_t* m = mp + ((G == 1 ? 0 : b) * nh + ph) * nw;
      runs.clear();
      for (int64_t pw = 0; pw < nw;) {
        int64_t e = pw + 1;
        while (e < nw && (m[e] != 0) == (m[pw] != 0)) ++e;
        runs.push_back({pw, e, m[pw] != 0});
        pw = e;
      }
      body(b, ph, m, runs);
    }
  });
}

at::Tensor simmim_loss(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t p) {
  check_simmim("simmim_loss", pred, imgs, mask, p);
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), nh = H / p, nw = W / p;
  auto out = at::empty({B, nh * nw}, pred.options().dtype(acc_type(pred, imgs)));
  dispatch2(pred, imgs, [&]<typename TP, typename TI, typename acc>() {
    const TP* pp = pred.data_ptr<TP>();
    const TI* ip = imgs.data_ptr<TI>();
    acc* op = out.data_ptr<acc>();
    const double inv = 1.0 / static_cast<double>(C * p * p);
    simmim_bands(imgs, mask, p, [&](int64_t b, int64_t ph, const uint8_t* m, const auto& runs) {
      std::vector<double> col(W, 0.0);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < p; ++i) {
          const int64_t row = ((b * C + c) * H + ph * p + i) * W;
          for (const auto& [x0, x1, live] : runs) {
            if (!live) continue;
            for (int64_t x = x0 * p; x < x1 * p; ++x) {
              col[x] += std::abs(static_cast<double>(static_cast<acc>(pp[row + x]) - static_cast<acc>(ip[row + x])));
            }
          }
        }
      }
      for (int64_t pw = 0; pw < nw; ++pw) {
        double s = 0;
        if (m[pw]) {
          for (int64_t j = 0; j < p; ++j) s += col[pw * p + j];
        }
        op[(b * nh + ph) * nw + pw] = static_cast<acc>(s * inv);
      }
    });
  });
  return out;
}

// dpred = sign(pred - imgs) * grad[patch] / (C*p*p) where the patch is masked, else 0 (sign(NaN) = 0, as torch).
at::Tensor simmim_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& imgs,
                                const at::Tensor& mask, int64_t p) {
  check_simmim("simmim_loss_backward", pred, imgs, mask, p);
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), nh = H / p, nw = W / p;
  check_grad("simmim_loss_backward", grad, acc_type(pred, imgs), B * nh * nw);
  auto dpred = at::empty_like(pred);
  dispatch2(pred, imgs, [&]<typename TP, typename TI, typename acc>() {
    const TP* pp = pred.data_ptr<TP>();
    const TI* ip = imgs.data_ptr<TI>();
    const acc* gp = grad.data_ptr<acc>();
    TP* dp = dpred.data_ptr<TP>();
    const acc inv = acc(1) / static_cast<acc>(C * p * p);
    simmim_bands(imgs, mask, p, [&](int64_t b, int64_t ph, const uint8_t*, const auto& runs) {
      std::vector<acc> k(W);  // per column: the patch's gradient scale
      for (int64_t x = 0; x < W; ++x) k[x] = gp[(b * nh + ph) * nw + x / p] * inv;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < p; ++i) {
          const int64_t row = ((b * C + c) * H + ph * p + i) * W;
          for (const auto& [x0, x1, live] : runs) {
            TP* d = dp + row;
            if (!live) {
              std::fill(d + x0 * p, d + x1 * p, static_cast<TP>(0));
              continue;
            }
            for (int64_t x = x0 * p; x < x1 * p; ++x) {
              const acc e = static_cast<acc>(pp[row + x]) - static_cast<acc>(ip[row + x]);
              d[x] = static_cast<TP>(k[x] * static_cast<acc>((e > 0) - (e < 0)));
            }
          }
        }
      }
    });
  });
  return dpred;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CPU, m) {
  m.impl("mixmim_loss", &mixmim_loss);
  m.impl("mixmim_loss_backward", &mixmim_loss_backward);
  m.impl("masked_recon_loss", &masked_recon_loss);
  m.impl("masked_recon_loss_backward", &masked_recon_loss_backward);
  m.impl("simmim_loss", &simmim_loss);
  m.impl("simmim_loss_backward", &simmim_loss_backward);
}

}  // namespace mixkernels::cpu
