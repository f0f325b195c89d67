// CUDA bindings of the token ops (mixing, windows, uniform): allocate outputs, call the
// torch-free launchers of csrc/cuda/{mixing,windows,uniform}.cu on the current stream, check.
#include <torch/library.h>

#include "mixkernels/tokens_cuda.h"
#include "mixkernels/torch_cuda.h"

namespace mixkernels::cuda {
namespace {

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "mixkernels CUDA token op: ", name, " must be a contiguous CUDA tensor");
}

// Side inputs are read through raw pointers with x's geometry: check device, size and dtype, so a
// direct kernel-op call cannot read out of bounds, on another device, or reinterpret bytes.
void check_side(const at::Tensor& t, const at::Tensor& x, int64_t numel, const char* name) {
  check_input(t, name);
  TORCH_CHECK(t.device() == x.device() && t.numel() == numel, "mixkernels CUDA token op: ", name, " must have ", numel,
              " elements on ", x.device(), ", got ", t.numel(), " on ", t.device());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& x, int64_t numel, const char* name) {
  check_side(t, x, numel, name);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mixkernels CUDA token op: ", name, " must be ", x.scalar_type(),
              ", got ", t.scalar_type());
}

const uint8_t* u8(const at::Tensor& t, const at::Tensor& x, int64_t numel, const char* name) {
  check_side(t, x, numel, name);
  TORCH_CHECK(t.scalar_type() == at::kByte, "mixkernels CUDA token op: ", name, " must be uint8, got ", t.scalar_type());
  return t.data_ptr<uint8_t>();
}

// Mask (G,L) with G in {1,B}; returns G.
int64_t mask_groups(const at::Tensor& mask, int64_t B, int64_t L) {
  TORCH_CHECK(mask.dim() == 2 && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(1) == L,
              "mixkernels CUDA token op: mask must be (1 or ", B, ", ", L, "), got ", mask.sizes());
  return mask.size(0);
}

// keep / secondary cells (B, H/2u, W/2u) of a (B,H,W) token grid.
int64_t uniform_cells(int64_t B, int64_t H, int64_t W, int64_t unit) {
  TORCH_CHECK(unit >= 1 && H % (2 * unit) == 0 && W % (2 * unit) == 0, "mixkernels CUDA uniform op: 2*unit = ",
              2 * unit, " must divide the token grid ", H, "x", W);
  return B * (H / (2 * unit)) * (W / (2 * unit));
}

// The tickets of the single-launch reductions (tokens_cuda.h): the stream's zeroed counters, or none
// while it is being captured into a CUDA graph (two launches then).
unsigned* stream_tickets(const at::Tensor& like, cudaStream_t stream) {
  return reinterpret_cast<unsigned*>(stream_zeros(like, stream, kTokenTickets, StreamZeros::kTokenTickets));
}

at::Tensor acc_like(const at::Tensor& t, at::IntArrayRef shape) { return at::empty(shape, t.options().dtype(at::kFloat)); }

at::Tensor mix_tokens_op(const at::Tensor& x, const at::Tensor& mask) {
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 3, "mixkernels CUDA mix_tokens: x must be (B, L, C)");
  const int64_t G = mask_groups(mask, x.size(0), x.size(1));
  const uint8_t* m = u8(mask, x, mask.numel(), "mask");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  MK_CHECK_LAUNCH(cuda::mix_tokens(x.data_ptr(), m, out.data_ptr(), x.size(0), x.size(1), x.size(2), G, dtype_of(x),
                                   current_stream()));
  return out;
}

at::Tensor mix_tokens_backward_op(const at::Tensor& grad, const at::Tensor& mask) {
  check_input(grad, "grad");
  TORCH_CHECK(grad.dim() == 3, "mixkernels CUDA mix_tokens_backward: grad must be (B, L, C)");
  const int64_t G = mask_groups(mask, grad.size(0), grad.size(1));
  const uint8_t* m = u8(mask, grad, mask.numel(), "mask");
  const c10::cuda::CUDAGuard guard(grad.device());
  auto dx = at::empty_like(grad);
  MK_CHECK_LAUNCH(cuda::mix_tokens_backward(grad.data_ptr(), m, dx.data_ptr(), grad.size(0), grad.size(1), grad.size(2),
                                            G, dtype_of(grad), current_stream()));
  return dx;
}

at::Tensor unmix_tokens_op(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& token,
                        const c10::optional<at::Tensor>& pos) {
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 3, "mixkernels CUDA unmix_tokens: x must be (B, L, C)");
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  check_same_dtype(token, x, C, "mask_token");
  if (pos.has_value()) check_same_dtype(*pos, x, L * C, "pos_embed");
  const int64_t G = mask_groups(mask, B, L);
  const uint8_t* m = u8(mask, x, mask.numel(), "mask");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({2 * B, L, C}, x.options());
  MK_CHECK_LAUNCH(cuda::unmix_tokens(x.data_ptr(), m, token.data_ptr(), pos.has_value() ? pos->data_ptr() : nullptr,
                                     out.data_ptr(), B, L, C, G, dtype_of(x), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unmix_tokens_backward_op(const at::Tensor& grad, const at::Tensor& mask,
                                                                     bool need_token, bool need_pos) {
  check_input(grad, "grad");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) % 2 == 0, "mixkernels CUDA unmix_tokens_backward: grad must be (2B, L, C)");
  const int64_t B = grad.size(0) / 2, L = grad.size(1), C = grad.size(2);
  const int64_t G = mask_groups(mask, B, L);
  const uint8_t* m = u8(mask, grad, mask.numel(), "mask");
  const c10::cuda::CUDAGuard guard(grad.device());
  auto dx = at::empty({B, L, C}, grad.options());
  auto dtoken = need_token ? acc_like(grad, {C}) : acc_like(grad, {0});
  auto dpos = need_pos ? acc_like(grad, {L, C}) : acc_like(grad, {0});
  auto ws = acc_like(grad, {cuda::unmix_tokens_backward_workspace(B, L, C, need_token, need_pos)});
  MK_CHECK_LAUNCH(cuda::unmix_tokens_backward(grad.data_ptr(), m, dx.data_ptr(),
                                              need_token ? dtoken.data_ptr<float>() : nullptr,
                                              need_pos ? dpos.data_ptr<float>() : nullptr, ws.data_ptr<float>(), B, L,
                                              C, G, dtype_of(grad), current_stream(),
                                              stream_tickets(grad, current_stream())));
  return {dx, dtoken, dpos};
}

// Window geometry guard: an empty token grid has no windows, and window_merge divides by nW.
void check_windows(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  TORCH_CHECK(H > 0 && W > 0 && wh > 0 && ww > 0 && H % wh == 0 && W % ww == 0 && sh >= 0 && sw >= 0 && sh < wh &&
                  sw < ww,
              "mixkernels CUDA window op: window ", wh, "x", ww, " (shift ", sh, ",", sw, ") must tile a non-empty ", H,
              "x", W, " grid");
}

at::Tensor window_partition_op(const at::Tensor& x, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  check_input(x, "x");
  check_windows(x.size(1), x.size(2), wh, ww, sh, sw);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  auto out = at::empty({B * (H / wh) * (W / ww), wh * ww, C}, x.options());
  MK_CHECK_LAUNCH(cuda::window_partition(x.data_ptr(), out.data_ptr(), B, H, W, C, wh, ww, sh, sw, dtype_of(x),
                                         current_stream()));
  return out;
}

at::Tensor window_merge_op(const at::Tensor& windows, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh,
                        int64_t sw) {
  check_input(windows, "windows");
  check_windows(H, W, wh, ww, sh, sw);
  TORCH_CHECK(windows.dim() == 3 && windows.size(1) == wh * ww && windows.size(0) % ((H / wh) * (W / ww)) == 0,
              "mixkernels CUDA window_merge: windows must be (B*nW, wh*ww, C)");
  const c10::cuda::CUDAGuard guard(windows.device());
  const int64_t C = windows.size(2), B = windows.size(0) / ((H / wh) * (W / ww));
  auto out = at::empty({B, H, W, C}, windows.options());
  MK_CHECK_LAUNCH(cuda::window_merge(windows.data_ptr(), out.data_ptr(), B, H, W, C, wh, ww, sh, sw,
                                     dtype_of(windows), current_stream()));
  return out;
}

at::Tensor uniform_sample_op(const at::Tensor& x, const at::Tensor& keep, int64_t unit,
                          const c10::optional<at::Tensor>& token, const c10::optional<at::Tensor>& secondary) {
  check_input(x, "x");
  TORCH_CHECK(x.dim() == 4, "mixkernels CUDA uniform_sample: x must be (B, H, W, C)");
  TORCH_CHECK(!secondary.has_value() || token.has_value(), "uniform_sample: secondary needs mask_token");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), cells = uniform_cells(B, H, W, unit);
  if (token.has_value()) check_same_dtype(*token, x, C, "mask_token");
  const uint8_t* k = u8(keep, x, cells, "keep");
  const uint8_t* sec = secondary.has_value() ? u8(*secondary, x, cells, "secondary") : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({B, H / 2, W / 2, C}, x.options());
  MK_CHECK_LAUNCH(cuda::uniform_sample(x.data_ptr(), k, sec, token.has_value() ? token->data_ptr() : nullptr,
                                       out.data_ptr(), B, H, W, C, unit, dtype_of(x), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> uniform_sample_backward_op(const at::Tensor& grad, const at::Tensor& keep,
                                                           int64_t unit, const c10::optional<at::Tensor>& secondary,
                                                           bool need_token) {
  check_input(grad, "grad");
  TORCH_CHECK(grad.dim() == 4, "mixkernels CUDA uniform_sample_backward: grad must be (B, H/2, W/2, C)");
  const int64_t B = grad.size(0), H = 2 * grad.size(1), W = 2 * grad.size(2), C = grad.size(3);
  const int64_t cells = uniform_cells(B, H, W, unit);
  const uint8_t* k = u8(keep, grad, cells, "keep");
  const uint8_t* sec = secondary.has_value() ? u8(*secondary, grad, cells, "secondary") : nullptr;
  const c10::cuda::CUDAGuard guard(grad.device());
  auto dx = at::empty({B, H, W, C}, grad.options());
  auto dtoken = need_token ? acc_like(grad, {C}) : acc_like(grad, {0});
  auto ws = acc_like(grad, {cuda::uniform_sample_backward_workspace(B, H, W, C, need_token)});
  MK_CHECK_LAUNCH(cuda::uniform_sample_backward(grad.data_ptr(), k, sec, dx.data_ptr(),
                                                need_token ? dtoken.data_ptr<float>() : nullptr, ws.data_ptr<float>(),
                                                B, H, W, C, unit, dtype_of(grad), current_stream(),
                                                stream_tickets(grad, current_stream())));
  return {dx, dtoken};
}

at::Tensor uniform_scatter_op(const at::Tensor& compact, const at::Tensor& keep, int64_t unit) {
  check_input(compact, "compact");
  TORCH_CHECK(compact.dim() == 4, "mixkernels CUDA uniform_scatter: compact must be (B, H/2, W/2, C)");
  const int64_t B = compact.size(0), H = 2 * compact.size(1), W = 2 * compact.size(2), C = compact.size(3);
  const uint8_t* k = u8(keep, compact, uniform_cells(B, H, W, unit), "keep");
  const c10::cuda::CUDAGuard guard(compact.device());
  auto out = at::empty({B, H, W, C}, compact.options());
  MK_CHECK_LAUNCH(cuda::uniform_scatter(compact.data_ptr(), k, out.data_ptr(), B, H, W, C, unit,
                                        dtype_of(compact), current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels_C, CUDA, m) {
  m.impl("mix_tokens", &mix_tokens_op);
  m.impl("mix_tokens_backward", &mix_tokens_backward_op);
  m.impl("unmix_tokens", &unmix_tokens_op);
  m.impl("unmix_tokens_backward", &unmix_tokens_backward_op);
  m.impl("window_partition", &window_partition_op);
  m.impl("window_merge", &window_merge_op);
  m.impl("uniform_sample", &uniform_sample_op);
  m.impl("uniform_sample_backward", &uniform_sample_backward_op);
  m.impl("uniform_scatter", &uniform_scatter_op);
}

}  // namespace mixkernels::cuda
