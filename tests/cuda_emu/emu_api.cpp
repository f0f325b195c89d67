// C entry points of the emulated CUDA launchers for the CPU tests (tests/cuda_emu.py loads this
// library with ctypes). They forward to the torch-free launchers of csrc/cuda unchanged; tensors
// are CPU memory standing in for device memory.
#include <cstdint>

#include "mixkernels/losses_cuda.h"
#include "mixkernels/tokens_cuda.h"
#include "mixkernels/window_attention_cuda.h"
#include "simt_emu.h"

using namespace mixkernels::cuda;

extern "C" {

struct EmuWattn {
  int32_t B, H, W, nH, d, wh, ww, sh, sw, rh, rw, dtype;
  float scale;
  const void* qkv;
  const float* rpb;
  const float* attn_bias;
  const void* group;
  const void* coords;
  int32_t group_batch, coords_batch, group_int64, coords_int64;
};

static WindowAttentionParams params(const EmuWattn& e) {
  WindowAttentionParams p;
  p.B = e.B; p.H = e.H; p.W = e.W; p.nH = e.nH; p.d = e.d;
  p.wh = e.wh; p.ww = e.ww; p.sh = e.sh; p.sw = e.sw; p.rh = e.rh; p.rw = e.rw;
  p.scale = e.scale;
  p.dtype = static_cast<DType>(e.dtype);
  p.qkv = e.qkv; p.rpb = e.rpb; p.attn_bias = e.attn_bias; p.group = e.group; p.coords = e.coords;
  p.group_batch = e.group_batch; p.coords_batch = e.coords_batch;
  p.group_int64 = e.group_int64 != 0; p.coords_int64 = e.coords_int64 != 0;
  return p;
}

void emu_seed(uint64_t seed) { emu::S().rng = seed ? seed : 0x9E3779B97F4A7C15ull; }
long long emu_collectives() { return emu::S().collectives; }

int emu_wattn_fits(const EmuWattn* e, int backward, int need_drpb, int det) {
  return window_attention_fits(params(*e), backward != 0, need_drpb != 0, det != 0);
}

int emu_wattn_forward(const EmuWattn* e, void* out, float* lse) {
  return static_cast<int>(window_attention_forward(params(*e), out, lse, nullptr));
}

int64_t emu_wattn_bwd_workspace(const EmuWattn* e, int need_drpb, int need_dbias, int det) {
  return static_cast<int64_t>(window_attention_bwd_workspace_bytes(params(*e), need_drpb, need_dbias, det));
}

int emu_wattn_backward(const EmuWattn* e, const void* dout, const void* out, const float* lse, void* dqkv, float* drpb,
                       float* dbias, void* workspace, int need_drpb, int need_dbias, int det) {
  WindowAttentionBwdBuffers b;
  b.dout = dout; b.out = out; b.lse = lse; b.dqkv = dqkv; b.drpb = drpb; b.dbias = dbias; b.workspace = workspace;
  b.need_drpb = need_drpb != 0; b.need_dbias = need_dbias != 0; b.deterministic = det != 0;
  return static_cast<int>(window_attention_backward(params(*e), b, nullptr));
}

}  // extern "C"
