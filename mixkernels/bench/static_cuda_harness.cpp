// Capture harness of the static report: calls the torch-free CUDA launchers (csrc/include/mixkernels/
// *_cuda.h) at real geometry, linked against static_cuda_stub.cpp, so the launch plans (grid, block,
// dynamic shared memory, kernel arguments) come from our own host code, not from a Python copy of it.
// Buffers are fake, 4 KB-aligned device addresses: nothing is ever dereferenced on the host.
//
// stdin, one call per line (dtype: 0 fp32, 1 fp16, 2 bf16; flags 0/1):
//   wattn_fwd  B H W nH d wh ww sh sw rh rw dtype rpb bias group coords group_batch coords_batch
//   wattn_bwd  <the same 18 fields> need_drpb need_dbias deterministic
//   mix_fwd | mix_bwd  B L C G dtype
//   unmix_fwd  B L C G dtype has_pos          unmix_bwd  B L C G dtype need_token need_pos
//   partition | merge  B H W C wh ww sh sw dtype
//   usample  B H W C unit dtype has_sec        usample_bwd  B H W C unit dtype has_sec need_token
//   uscatter B H W C unit dtype
//   mixmim_loss_fwd | mixmim_loss_bwd  pred_dtype imgs_dtype B H W p norm_pix mask_stride
//   masked_loss_fwd | masked_loss_bwd  pred_dtype imgs_dtype B Lp H W p norm_pix
// stdout: "CALL <line>", the stub's LAUNCH/MEMSET lines, "END <line> <cudaError_t>".
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "mixkernels/losses_cuda.h"
#include "mixkernels/tokens_cuda.h"
#include "mixkernels/window_attention_cuda.h"

using namespace mixkernels::cuda;

namespace {
uintptr_t next_addr = uintptr_t(1) << 44;
template <typename T = void>
T* fake(uint64_t bytes) {
  const uintptr_t a = next_addr;
  next_addr += (bytes + 4095) / 4096 * 4096 + 4096;
  return reinterpret_cast<T*>(a);
}
DType dt(int v) { return static_cast<DType>(v); }

int run(const std::string& op, std::istringstream& in) {
  if (op == "wattn_fwd" || op == "wattn_bwd") {
    WindowAttentionParams p;
    int dtype, rpb, bias, group, coords;
    in >> p.B >> p.H >> p.W >> p.nH >> p.d >> p.wh >> p.ww >> p.sh >> p.sw >> p.rh >> p.rw >> dtype >> rpb >> bias >>
        group >> coords >> p.group_batch >> p.coords_batch;
    p.dtype = dt(dtype);
    p.scale = 1.f;
    const int64_t es = element_size(p.dtype), C = int64_t(p.nH) * p.d, tok = int64_t(p.B) * p.H * p.W;
    const int64_t N = int64_t(p.wh) * p.ww, T = int64_t(2 * p.rh - 1) * (2 * p.rw - 1);
    p.qkv = fake(tok * 3 * C * es);
    if (rpb) p.rpb = fake<float>(T * p.nH * 4);
    if (bias) p.attn_bias = fake<float>(int64_t(p.nH) * N * N * 4);
    if (group) p.group = fake<int>(int64_t(p.group_batch) * p.H * p.W * 4);
    if (coords) p.coords = fake<int>(int64_t(p.coords_batch) * p.H * p.W * 8);
    float* lse = fake<float>(tok * p.nH * 4);
    if (op == "wattn_fwd") {  // with the binding's workspace (the pack plans, when they apply)
      const size_t ws = window_attention_fwd_workspace_bytes(p);
      return window_attention_forward(p, fake(tok * C * es), lse, nullptr, ws ? fake(ws) : nullptr);
    }
    WindowAttentionBwdBuffers b;
    int nd, nb, det;
    in >> nd >> nb >> det;
    b.need_drpb = nd, b.need_dbias = nb, b.deterministic = det;
    b.dout = fake(tok * C * es);
    b.out = fake(tok * C * es);
    b.lse = lse;
    b.dqkv = fake(tok * 3 * C * es);
    if (nd) b.drpb = fake<float>(T * p.nH * 4);
    if (nb) b.dbias = fake<float>(int64_t(p.nH) * N * N * 4);
    b.workspace = fake(window_attention_bwd_workspace_bytes(p, b.need_drpb, b.need_dbias, b.deterministic));
    if (nd && !det) b.sums = fake<float>(window_attention_bwd_sums_floats(p) * 4);  // the binding's per-stream sums
    return window_attention_backward(p, b, nullptr);
  }
  if (op == "mix_fwd" || op == "mix_bwd" || op == "unmix_fwd" || op == "unmix_bwd") {
    int64_t B, L, C, G;
    int dtype;
    in >> B >> L >> C >> G >> dtype;
    const int64_t es = element_size(dt(dtype)), n = B * L * C * es;
    const uint8_t* mask = fake<uint8_t>(G * L);
    if (op == "mix_fwd") return mix_tokens(fake(n), mask, fake(n), B, L, C, G, dt(dtype), nullptr);
    if (op == "mix_bwd") return mix_tokens_backward(fake(n), mask, fake(n), B, L, C, G, dt(dtype), nullptr);
    if (op == "unmix_fwd") {
      int has_pos;
      in >> has_pos;
      return unmix_tokens(fake(n), mask, fake(C * es), has_pos ? fake(L * C * es) : nullptr, fake(2 * n), B, L, C, G,
                          dt(dtype), nullptr);
    }
    int nt, np;
    in >> nt >> np;
    const int64_t ws = unmix_tokens_backward_workspace(B, L, C, nt, np);
    return unmix_tokens_backward(fake(2 * n), mask, fake(n), nt ? fake<float>(C * 4) : nullptr,
                                 np ? fake<float>(L * C * 4) : nullptr, fake<float>(ws * 4), B, L, C, G, dt(dtype),
                                 nullptr, fake<unsigned>(kTokenTickets * 4));  // the binding's per-stream tickets
  }
  if (op == "partition" || op == "merge") {
    int64_t B, H, W, C, wh, ww, sh, sw;
    int dtype;
    in >> B >> H >> W >> C >> wh >> ww >> sh >> sw >> dtype;
    const int64_t n = B * H * W * C * element_size(dt(dtype));
    if (op == "partition") return window_partition(fake(n), fake(n), B, H, W, C, wh, ww, sh, sw, dt(dtype), nullptr);
    return window_merge(fake(n), fake(n), B, H, W, C, wh, ww, sh, sw, dt(dtype), nullptr);
  }
  if (op == "usample" || op == "usample_bwd" || op == "uscatter") {
    int64_t B, H, W, C, u;
    int dtype;
    in >> B >> H >> W >> C >> u >> dtype;
    const int64_t es = element_size(dt(dtype)), n = B * H * W * C * es, cells = B * (H / (2 * u)) * (W / (2 * u));
    const uint8_t* keep = fake<uint8_t>(cells);
    if (op == "uscatter") return uniform_scatter(fake(n / 4), keep, fake(n), B, H, W, C, u, dt(dtype), nullptr);
    int has_sec;
    in >> has_sec;
    const uint8_t* sec = has_sec ? fake<uint8_t>(cells) : nullptr;
    if (op == "usample")
      return uniform_sample(fake(n), keep, sec, has_sec ? fake(C * es) : nullptr, fake(n / 4), B, H, W, C, u,
                            dt(dtype), nullptr);
    int nt;
    in >> nt;
    const int64_t ws = uniform_sample_backward_workspace(B, H, W, C, nt && has_sec);
    return uniform_sample_backward(fake(n / 4), keep, sec, fake(n), (nt && has_sec) ? fake<float>(C * 4) : nullptr,
                                   fake<float>(ws * 4), B, H, W, C, u, dt(dtype), nullptr,
                                   fake<unsigned>(kTokenTickets * 4));
  }
  if (op == "mixmim_loss_fwd" || op == "mixmim_loss_bwd" || op == "masked_loss_fwd" || op == "masked_loss_bwd") {
    int pt, it, p, norm;
    int64_t B, Lp = 0, H, W, mstride = 0;
    in >> pt >> it >> B;
    if (op.rfind("masked", 0) == 0) in >> Lp;
    in >> H >> W >> p >> norm;
    if (op.rfind("mixmim", 0) == 0) in >> mstride;
    const int64_t L = (H / p) * (W / p), D = int64_t(p) * p * 3, pes = element_size(dt(pt));
    const void* imgs = fake(B * 3 * H * W * element_size(dt(it)));
    if (op == "mixmim_loss_fwd")
      return mixmim_loss_fwd(fake(2 * B * L * D * pes), dt(pt), imgs, dt(it), fake<uint8_t>(B * L), mstride,
                             fake<float>(B * L * 4), B, H, W, p, norm, 1e-6f, nullptr);
    if (op == "mixmim_loss_bwd")
      return mixmim_loss_bwd(fake<float>(B * L * 4), fake(2 * B * L * D * pes), dt(pt), imgs, dt(it),
                             fake<uint8_t>(B * L), mstride, fake(2 * B * L * D * pes), B, H, W, p, norm, 1e-6f,
                             nullptr);
    const int64_t* idx = fake<int64_t>(B * Lp * 8);
    if (op == "masked_loss_fwd")
      return masked_recon_loss_fwd(fake(B * Lp * D * pes), dt(pt), imgs, dt(it), idx, fake<float>(B * Lp * 4), B, Lp,
                                   H, W, p, norm, 1e-6f, nullptr);
    return masked_recon_loss_bwd(fake<float>(B * Lp * 4), fake(B * Lp * D * pes), dt(pt), imgs, dt(it), idx,
                                 fake(B * Lp * D * pes), B, Lp, H, W, p, norm, 1e-6f, nullptr);
  }
  std::printf("UNKNOWN %s\n", op.c_str());
  return -1;
}
}  // namespace

int main() {
  std::string line;
  int n = 0;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream in(line);
    std::string op;
    in >> op;
    std::printf("CALL %d %s\n", n, op.c_str());
    const int rc = run(op, in);
    std::printf("END %d %d\n", n, rc);
    std::fflush(stdout);
    ++n;
  }
  return 0;
}
