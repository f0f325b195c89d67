// CPU kernels: fused mask-aware (shifted) window attention, forward and backward.
//
// The roll, window partition, head split, relative-position bias gather, shift and group
// masks and the reverse layout are all index arithmetic: a task gathers one window's q/k/v
// rows of one head straight from the (B,H,W,3C) qkv tensor into thread-local buffers (in the
// acc dtype), computes that window's N x N scores in scratch, and scatters its rows back to
// the token positions. Nothing of size N x N per window is ever kept beyond one task.
//
// Forward tasks are (window, head) pairs. Backward recomputes P = exp(S - lse) (flash
// style), delta = rowsum(dO*O), dS = P*(dP - delta); every (window, head) writes a disjoint
// slice of dqkv, so there are no races. Bias gradients are reduced deterministically: the
// windows are cut into a fixed number of chunks that depends on the problem size only (never
// on the thread count), each (chunk, head) task sums its windows in order into its own
// partial, and the partials are summed in chunk order. The CPU result is therefore
// bit-identical across runs and thread counts; the `deterministic` flag changes nothing here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "mixkernels/cpu_common.h"

namespace mixkernels::cpu {
namespace {

// Problem geometry plus the optional per-position inputs (indexed at original positions).
struct Geom {
  int64_t B, H, W, C, nH, d, wh, ww, sh, sw, nWw, nW, N, rh, rw, T;
  const int32_t* group = nullptr;
  const int32_t* coords = nullptr;
  int64_t group_bstride = 0, coords_bstride = 0;  // 0 when batch-shared (G == 1)
  bool has_rpb = false;
  int64_t windows() const { return B * nW; }
};

Geom make_geom(const at::Tensor& qkv, int64_t nH, int64_t wh, int64_t ww, int64_t sh, int64_t sw,
               const c10::optional<at::Tensor>& rpb, const c10::optional<at::Tensor>& attn_bias,
               const c10::optional<at::Tensor>& group, const c10::optional<at::Tensor>& coords, int64_t rh,
               int64_t rw) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.is_contiguous(), "window_attention: qkv must be a contiguous (B,H,W,3C) tensor");
  TORCH_CHECK(nH > 0 && wh > 0 && ww > 0 && rh > 0 && rw > 0, "window_attention: sizes must be positive");
  Geom g;
  g.B = qkv.size(0), g.H = qkv.size(1), g.W = qkv.size(2);
  const int64_t C3 = qkv.size(3);
  TORCH_CHECK(C3 % (3 * nH) == 0, "window_attention: qkv last dim ", C3, " is not 3*num_heads*head_dim");
  TORCH_CHECK(g.H % wh == 0 && g.W % ww == 0, "window_attention: window must divide the token grid");
  TORCH_CHECK(sh >= 0 && sw >= 0 && sh < wh && sw < ww, "window_attention: shift must be in [0, window)");
  g.C = C3 / 3, g.nH = nH, g.d = g.C / nH, g.wh = wh, g.ww = ww, g.sh = sh, g.sw = sw;
  g.nWw = g.W / ww, g.nW = (g.H / wh) * g.nWw, g.N = wh * ww, g.rh = rh, g.rw = rw;
  g.T = (2 * rh - 1) * (2 * rw - 1);
  const auto acc = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rpb.has_value()) {
    TORCH_CHECK(rpb->scalar_type() == acc && rpb->is_contiguous() && rpb->dim() == 2 && rpb->size(0) == g.T &&
                    rpb->size(1) == nH,
                "window_attention: rpb must be a contiguous (", g.T, ",", nH, ") tensor of dtype ", acc);
    g.has_rpb = true;
  }
  if (attn_bias.has_value()) {
    TORCH_CHECK(attn_bias->scalar_type() == acc && attn_bias->is_contiguous() && attn_bias->dim() == 3 &&
                    attn_bias->size(0) == nH && attn_bias->size(1) == g.N && attn_bias->size(2) == g.N,
                "window_attention: attn_bias must be a contiguous (nH,N,N) tensor of dtype ", acc);
  }
  if (group.has_value()) {
    TORCH_CHECK(group->scalar_type() == at::kInt && group->is_contiguous() && group->dim() == 3 &&
                    (group->size(0) == 1 || group->size(0) == g.B) && group->size(1) == g.H && group->size(2) == g.W,
                "window_attention: group must be a contiguous int32 (G,H,W) tensor, G in {1,B}");
    g.group = group->data_ptr<int32_t>();
    g.group_bstride = group->size(0) == 1 ? 0 : g.H * g.W;
  }
  if (coords.has_value()) {
    TORCH_CHECK(coords->scalar_type() == at::kInt && coords->is_contiguous() && coords->dim() == 4 &&
                    (coords->size(0) == 1 || coords->size(0) == g.B) && coords->size(1) == g.H &&
                    coords->size(2) == g.W && coords->size(3) == 2,
                "window_attention: coords must be a contiguous int32 (G,H,W,2) tensor, G in {1,B}");
    g.coords = coords->data_ptr<int32_t>();
    g.coords_bstride = coords->size(0) == 1 ? 0 : g.H * g.W;
  } else {
    TORCH_CHECK(rh == wh && rw == ww, "window_attention: without coords, (rh, rw) must equal the window");
  }
  return g;
}

// Swin's shift bands of the rolled grid: [0,n-w) -> 0, [n-w,n-s) -> 1, [n-s,n) -> 2.
inline int band(int64_t p, int64_t n, int64_t w, int64_t s) { return (s == 0 || p < n - w) ? 0 : (p < n - s ? 1 : 2); }

// Relative-position table row of a coordinate difference.
inline int32_t table_row(const Geom& g, int64_t dy, int64_t dx) {
  return static_cast<int32_t>((dy + g.rh - 1) * (2 * g.rw - 1) + (dx + g.rw - 1));
}

// What every head of one window shares: the original token of each window row, and per
// score either -1 (masked: shift region or group differs) or the bias table row (0 without rpb).
struct Window {
  int64_t id = -1;
  std::vector<int64_t> tok;
  std::vector<int32_t> idx, reg, grp, cy, cx;

  void build(const Geom& g, int64_t win) {
    if (win == id) return;
    id = win;
    const int64_t N = g.N, HW = g.H * g.W;
    tok.resize(N), idx.resize(N * N), reg.resize(N), grp.resize(N), cy.resize(N), cx.resize(N);
    const int64_t b = win / g.nW, w = win % g.nW;
    const int64_t y0 = (w / g.nWw) * g.wh, x0 = (w % g.nWw) * g.ww;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t yr = y0 + n / g.ww, xr = x0 + n % g.ww;  // rolled grid
      const int64_t pos = ((yr + g.sh) % g.H) * g.W + (xr + g.sw) % g.W;  // original grid
      tok[n] = b * HW + pos;
      reg[n] = band(yr, g.H, g.wh, g.sh) * 3 + band(xr, g.W, g.ww, g.sw);
      grp[n] = g.group ? g.group[b * g.group_bstride + pos] : 0;
      if (g.coords) {
        const int32_t* c = g.coords + (b * g.coords_bstride + pos) * 2;
        cy[n] = c[0], cx[n] = c[1];
      } else {
        cy[n] = static_cast<int32_t>(n / g.ww), cx[n] = static_cast<int32_t>(n % g.ww);
      }
    }
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        int32_t v = -1;
        if (reg[i] == reg[j] && grp[i] == grp[j]) {
          v = 0;
          if (g.has_rpb) {
            const int64_t dy = cy[i] - cy[j], dx = cx[i] - cx[j];
            TORCH_CHECK(std::abs(dy) < g.rh && std::abs(dx) < g.rw, "window_attention: coords difference (", dy,
                        ", ", dx, ") outside coord_range (", g.rh, ", ", g.rw, ")");
            v = table_row(g, dy, dx);
          }
        }
        idx[i * N + j] = v;
      }
    }
  }
};

// dst[n*d + k] = mul * src[tok[n]*3C + off + k] (rows) or dst[k*N + n] = ... (transposed).
template <typename scalar_t, typename acc>
void load_rows(const Geom& g, const scalar_t* src, const Window& w, int64_t off, acc mul, acc* dst) {
  for (int64_t n = 0; n < g.N; ++n) {
    const scalar_t* s = src + w.tok[n] * 3 * g.C + off;
    for (int64_t k = 0; k < g.d; ++k) dst[n * g.d + k] = mul * static_cast<acc>(s[k]);
  }
}

template <typename scalar_t, typename acc>
void load_cols(const Geom& g, const scalar_t* src, const Window& w, int64_t off, acc* dst) {
  for (int64_t n = 0; n < g.N; ++n) {
    const scalar_t* s = src + w.tok[n] * 3 * g.C + off;
    for (int64_t k = 0; k < g.d; ++k) dst[k * g.N + n] = static_cast<acc>(s[k]);
  }
}

// S = q @ kT + rpb[idx] + attn_bias, masked scores -inf. q (N,d) pre-scaled, kT (d,N).
template <typename acc>
void scores(const Geom& g, const Window& w, const acc* q, const acc* kT, const acc* rpb_h, const acc* ab_h, acc* S) {
  const int64_t N = g.N, d = g.d;
  constexpr acc ninf = -std::numeric_limits<acc>::infinity();
  for (int64_t i = 0; i < N; ++i) {
    acc* s = S + i * N;
    std::fill(s, s + N, acc(0));
    for (int64_t k = 0; k < d; ++k) {
      const acc a = q[i * d + k];
      const acc* kr = kT + k * N;
      for (int64_t j = 0; j < N; ++j) s[j] += a * kr[j];
    }
    const int32_t* ix = w.idx.data() + i * N;
    if (rpb_h) {
      for (int64_t j = 0; j < N; ++j) s[j] = ix[j] < 0 ? s[j] : s[j] + rpb_h[ix[j]];
    }
    if (ab_h) {
      const acc* ab = ab_h + i * N;
      for (int64_t j = 0; j < N; ++j) s[j] += ab[j];
    }
    for (int64_t j = 0; j < N; ++j) s[j] = ix[j] < 0 ? ninf : s[j];
  }
}

// rpb (T,nH) -> (nH,T) so a head's table is contiguous.
at::Tensor rpb_by_head(const c10::optional<at::Tensor>& rpb) {
  return rpb.has_value() ? rpb->t().contiguous() : at::Tensor();
}

template <typename scalar_t>
void forward_impl(const Geom& g, const at::Tensor& qkv, const at::Tensor& rpbT, const c10::optional<at::Tensor>& ab,
                  double scale_d, at::Tensor& out, at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const int64_t N = g.N, d = g.d, nH = g.nH, C = g.C;
  const scalar_t* qp = qkv.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc* lp = lse.data_ptr<acc>();
  const acc* rp = rpbT.defined() ? rpbT.data_ptr<acc>() : nullptr;
  const acc* abp = ab.has_value() ? ab->data_ptr<acc>() : nullptr;
  const acc scale = static_cast<acc>(scale_d);
  at::parallel_for(0, g.windows() * nH, 1, [&](int64_t begin, int64_t end) {
    Window w;
    std::vector<acc> buf(3 * N * d + N * N + d);
    acc *q = buf.data(), *kT = q + N * d, *v = kT + N * d, *S = v + N * d, *o = S + N * N;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t win = t / nH, h = t % nH;
      w.build(g, win);
      load_rows(g, qp, w, h * d, scale, q);
      load_cols(g, qp, w, C + h * d, kT);
      load_rows(g, qp, w, 2 * C + h * d, acc(1), v);
      scores(g, w, q, kT, rp ? rp + h * g.T : nullptr, abp ? abp + h * N * N : nullptr, S);
      acc* l = lp + t * N;  // lse (B*nW, nH, N): t == win*nH + h
      for (int64_t i = 0; i < N; ++i) {
        acc* s = S + i * N;
        acc m = s[0];
        for (int64_t j = 1; j < N; ++j) m = std::max(m, s[j]);
        acc sum = 0;
        for (int64_t j = 0; j < N; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        l[i] = m + std::log(sum);
        const acc inv = acc(1) / sum;
        std::fill(o, o + d, acc(0));
        for (int64_t j = 0; j < N; ++j) {
          const acc p = s[j] * inv;
          if (p == acc(0)) continue;  // masked (or underflowed) pair
          const acc* vr = v + j * d;
          for (int64_t k = 0; k < d; ++k) o[k] += p * vr[k];
        }
        scalar_t* dst = op + w.tok[i] * C + h * d;
        for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<scalar_t>(o[k]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> window_attention(const at::Tensor& qkv, int64_t num_heads, int64_t wh, int64_t ww,
                                                    int64_t sh, int64_t sw, const c10::optional<at::Tensor>& rpb,
                                                    const c10::optional<at::Tensor>& attn_bias,
                                                    const c10::optional<at::Tensor>& group,
                                                    const c10::optional<at::Tensor>& coords, int64_t rh, int64_t rw,
                                                    double scale) {
  const Geom g = make_geom(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw);
  const auto acc = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({g.B, g.H, g.W, g.C}, qkv.options());
  auto lse = at::empty({g.windows(), g.nH, g.N}, qkv.options().dtype(acc));
  const at::Tensor rpbT = rpb_by_head(rpb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention", [&] {
    forward_impl<scalar_t>(g, qkv, rpbT, attn_bias, scale, out, lse);
  });
  return {out, lse};
}

// ---- backward ----

// Windows per reduction chunk: a fixed function of the problem (never of the thread count),
// with the partial buffers capped at ~64 MiB.
int64_t num_chunks(const Geom& g, int64_t per_chunk_bytes) {
  constexpr int64_t kMaxChunks = 64, kCapBytes = int64_t(64) << 20;
  if (per_chunk_bytes == 0) return g.windows();  // nothing to reduce: one window per chunk
  int64_t k = std::min<int64_t>(g.windows(), kMaxChunks);
  k = std::min<int64_t>(k, std::max<int64_t>(1, kCapBytes / per_chunk_bytes));
  return std::max<int64_t>(k, 1);
}

template <typename scalar_t>
void backward_impl(const Geom& g, const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& rpbT, const c10::optional<at::Tensor>& ab, double scale_d,
                   bool need_drpb, bool need_dbias, at::Tensor& dqkv, at::Tensor& drpb, at::Tensor& dbias) {
  using acc = acc_t<scalar_t>;
  const int64_t N = g.N, d = g.d, nH = g.nH, C = g.C, NN = N * N, T = g.T;
  const auto acc_opts = qkv.options().dtype(c10::CppTypeToScalarType<acc>::value);
  // dS summed over windows per head (dbias, and drpb when the table row is window-independent),
  // or scattered per window into the table (drpb with coords).
  const bool want_nn = need_dbias || (need_drpb && !g.coords);
  const bool want_tab = need_drpb && g.coords;
  const int64_t K = num_chunks(g, nH * ((want_nn ? NN : 0) + (want_tab ? T : 0)) * int64_t(sizeof(acc)));
  at::Tensor part_nn = want_nn ? at::zeros({K, nH, NN}, acc_opts) : at::Tensor();
  at::Tensor part_tab = want_tab ? at::zeros({K, nH, T}, acc_opts) : at::Tensor();

  const scalar_t* qp = qkv.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* gp = dout.data_ptr<scalar_t>();
  const acc* lp = lse.data_ptr<acc>();
  scalar_t* dp = dqkv.data_ptr<scalar_t>();
  const acc* rp = rpbT.defined() ? rpbT.data_ptr<acc>() : nullptr;
  const acc* abp = ab.has_value() ? ab->data_ptr<acc>() : nullptr;
  acc* pnn = want_nn ? part_nn.data_ptr<acc>() : nullptr;
  acc* ptab = want_tab ? part_tab.data_ptr<acc>() : nullptr;
  const acc scale = static_cast<acc>(scale_d);
  const int64_t nWin = g.windows();

  at::parallel_for(0, K * nH, 1, [&](int64_t begin, int64_t end) {
    Window w;
    std::vector<acc> buf(8 * N * d + NN + 2 * N);
    acc *q = buf.data(), *k = q + N * d, *kT = k + N * d, *vT = kT + N * d, *dO = vT + N * d;
    acc *dq = dO + N * d, *dk = dq + N * d, *dv = dk + N * d, *S = dv + N * d;
    acc *prow = S + NN, *delta = prow + N;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / nH, h = t % nH;
      acc* my_nn = pnn ? pnn + (c * nH + h) * NN : nullptr;
      acc* my_tab = ptab ? ptab + (c * nH + h) * T : nullptr;
      for (int64_t win = c * nWin / K; win < (c + 1) * nWin / K; ++win) {
        w.build(g, win);
        load_rows(g, qp, w, h * d, scale, q);
        load_rows(g, qp, w, C + h * d, acc(1), k);
        load_cols(g, qp, w, C + h * d, kT);
        load_cols(g, qp, w, 2 * C + h * d, vT);
        for (int64_t n = 0; n < N; ++n) {  // dO and delta = rowsum(dO * O), both in (B,H,W,C)
          const scalar_t* gs = gp + w.tok[n] * C + h * d;
          const scalar_t* os = op + w.tok[n] * C + h * d;
          acc s = 0;
          for (int64_t e = 0; e < d; ++e) {
            dO[n * d + e] = static_cast<acc>(gs[e]);
            s += dO[n * d + e] * static_cast<acc>(os[e]);
          }
          delta[n] = s;
        }
        scores(g, w, q, kT, rp ? rp + h * T : nullptr, abp ? abp + h * NN : nullptr, S);
        std::fill(dk, dk + N * d, acc(0));
        std::fill(dv, dv + N * d, acc(0));
        const acc* l = lp + (win * nH + h) * N;
        for (int64_t i = 0; i < N; ++i) {
          acc* s = S + i * N;  // scores in, dS out
          const acc* gi = dO + i * d;
          const acc* qi = q + i * d;
          for (int64_t j = 0; j < N; ++j) prow[j] = std::exp(s[j] - l[i]);
          std::fill(s, s + N, acc(0));  // dP = dO_i @ vT
          for (int64_t e = 0; e < d; ++e) {
            const acc a = gi[e];
            const acc* vr = vT + e * N;
            for (int64_t j = 0; j < N; ++j) s[j] += a * vr[j];
          }
          for (int64_t j = 0; j < N; ++j) s[j] = prow[j] * (s[j] - delta[i]);
          acc* dqi = dq + i * d;
          std::fill(dqi, dqi + d, acc(0));
          for (int64_t j = 0; j < N; ++j) {
            const acc p = prow[j], ds = s[j];
            if (p == acc(0)) continue;  // masked: dS is 0 too
            acc* dvj = dv + j * d;
            acc* dkj = dk + j * d;
            const acc* kj = k + j * d;
            for (int64_t e = 0; e < d; ++e) {
              dvj[e] += p * gi[e];
              dkj[e] += ds * qi[e];
              dqi[e] += ds * kj[e];
            }
          }
          for (int64_t e = 0; e < d; ++e) dqi[e] *= scale;
        }
        if (my_nn) {
          for (int64_t e = 0; e < NN; ++e) my_nn[e] += S[e];
        }
        if (my_tab) {
          for (int64_t e = 0; e < NN; ++e) {
            if (w.idx[e] >= 0) my_tab[w.idx[e]] += S[e];
          }
        }
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* dst = dp + w.tok[n] * 3 * C + h * d;
          for (int64_t e = 0; e < d; ++e) {
            dst[e] = static_cast<scalar_t>(dq[n * d + e]);
            dst[C + e] = static_cast<scalar_t>(dk[n * d + e]);
            dst[2 * C + e] = static_cast<scalar_t>(dv[n * d + e]);
          }
        }
      }
    }
  });

  // Second level: partials summed in chunk order (deterministic for any thread count).
  if (want_nn) {
    at::Tensor nn = need_dbias ? dbias : at::empty({nH, N, N}, acc_opts);
    acc* dst = nn.data_ptr<acc>();
    at::parallel_for(0, nH * NN, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        acc s = 0;
        for (int64_t c = 0; c < K; ++c) s += pnn[c * nH * NN + e];
        dst[e] = s;
      }
    });
    if (need_drpb) {  // no coords: table row of (i, j) is the window-local relative position
      acc* tab = drpb.data_ptr<acc>();  // (T, nH)
      std::fill(tab, tab + T * nH, acc(0));
      at::parallel_for(0, nH, 1, [&](int64_t begin, int64_t end) {
        for (int64_t h = begin; h < end; ++h) {
          for (int64_t i = 0; i < N; ++i) {
            for (int64_t j = 0; j < N; ++j) {
              const int64_t row = table_row(g, i / g.ww - j / g.ww, i % g.ww - j % g.ww);
              tab[row * nH + h] += dst[h * NN + i * N + j];
            }
          }
        }
      });
    }
  }
  if (want_tab) {
    acc* tab = drpb.data_ptr<acc>();  // (T, nH)
    at::parallel_for(0, T * nH, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t row = e / nH, h = e % nH;
        acc s = 0;
        for (int64_t c = 0; c < K; ++c) s += ptab[(c * nH + h) * T + row];
        tab[e] = s;
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    int64_t wh, int64_t ww, int64_t sh, int64_t sw, const c10::optional<at::Tensor>& rpb,
    const c10::optional<at::Tensor>& attn_bias, const c10::optional<at::Tensor>& group,
    const c10::optional<at::Tensor>& coords, int64_t rh, int64_t rw, double scale, bool need_drpb, bool need_dbias,
    bool /*deterministic: the CPU reduction is always deterministic*/) {
  const Geom g = make_geom(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw);
  const auto acc = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dout.scalar_type() == qkv.scalar_type() && out.scalar_type() == qkv.scalar_type(),
              "window_attention_backward: dout and out must have qkv's dtype");
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && dout.sizes() == out.sizes() && out.dim() == 4 &&
                  out.size(0) == g.B && out.size(1) == g.H && out.size(2) == g.W && out.size(3) == g.C,
              "window_attention_backward: dout and out must be contiguous (B,H,W,C)");
  TORCH_CHECK(lse.scalar_type() == acc && lse.is_contiguous() && lse.numel() == g.windows() * g.nH * g.N,
              "window_attention_backward: lse must be a contiguous (B*nW,nH,N) tensor of dtype ", acc);
  TORCH_CHECK(!need_drpb || rpb.has_value(), "window_attention_backward: need_drpb without rpb");
  TORCH_CHECK(!need_dbias || attn_bias.has_value(), "window_attention_backward: need_dbias without attn_bias");
  auto dqkv = at::empty_like(qkv);
  auto drpb = need_drpb ? at::empty_like(*rpb) : at::empty({0}, qkv.options().dtype(acc));
  auto dbias = need_dbias ? at::empty_like(*attn_bias) : at::empty({0}, qkv.options().dtype(acc));
  const at::Tensor rpbT = rpb_by_head(rpb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_backward", [&] {
    backward_impl<scalar_t>(g, dout, qkv, out, lse, rpbT, attn_bias, scale, need_drpb, need_dbias, dqkv, drpb, dbias);
  });
  return {dqkv, drpb, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CPU, m) {
  m.impl("window_attention", &window_attention);
  m.impl("window_attention_backward", &window_attention_backward);
}

}  // namespace mixkernels::cpu
