// Scheduler and warp-collective resolution of the SIMT emulator (simt_emu.h), and the few CUDA
// runtime API functions the launchers call, answering as an sm_90 device (132 SMs, 227 KB opt-in
// shared memory per block).
#include "simt_emu.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>

namespace emu {
namespace {

uint64_t next_rand() {
  uint64_t& x = S().rng;  // xorshift64*
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  return x * 0x2545F4914F6CDD1Dull;
}

void trampoline() {
  State& s = S();
  s.body();
  Lane& l = *s.cur;
  if (!l.pending.empty()) fail("thread exited with cp.async copies never waited for");
  l.st = St::Done;
  l.op = Op::None;
  swapcontext(&l.ctx, &s.sched);
  fail("a finished thread was resumed");
}

// A warp is resolvable when every live lane waits on a warp collective; returns its lane range.
bool warp_ready(State& s, int w, int& first, int& last) {
  first = w * 32;
  last = std::min(first + 32, s.nthreads);
  bool any = false;
  for (int i = first; i < last; ++i) {
    const Lane& l = s.lanes[i];
    if (l.st == St::Done) continue;
    if (l.st != St::Warp) return false;
    any = true;
  }
  return any;
}

}  // namespace

void resolve_warp(int w) {
  State& s = S();
  int first, last;
  if (!warp_ready(s, w, first, last)) return;
  Lane* L[32] = {};
  Op op = Op::None;
  for (int i = first; i < last; ++i) {
    Lane& l = s.lanes[i];
    if (l.st == St::Done) continue;
    L[i - first] = &l;
    if (op == Op::None) op = l.op;
    if (l.op != op) { s.cur = &l; fail("lanes of a warp wait on different collectives (divergent warp)"); }
  }
  const int n = last - first;
  auto need_full = [&](const char* what) {
    for (int i = 0; i < 32; ++i)
      if (i >= n || L[i] == nullptr) { s.cur = L[0] ? L[0] : &s.lanes[first]; fail(what); }
  };
  switch (op) {
    case Op::SyncWarp:
      break;
    case Op::Shfl: {
      need_full("shuffle with inactive or exited lanes");
      uint64_t v[32];
      for (int i = 0; i < 32; ++i) {
        if (static_cast<uint32_t>(L[i]->in[1]) != 0xffffffffu) fail("shuffle with a partial mask");
        v[i] = L[i]->in[0];
      }
      for (int i = 0; i < 32; ++i) {
        const int arg = L[i]->iarg, mode = L[i]->iarg2;
        int src = mode == 0 ? (arg & 31) : mode == 1 ? (i ^ arg) : mode == 2 ? i - arg : i + arg;
        if (src < 0 || src > 31) src = i;  // up/down past the edge keep their own value
        L[i]->out[0] = v[src];
      }
      break;
    }
    case Op::Ballot: {
      need_full("ballot with inactive or exited lanes");
      uint32_t m = 0;
      for (int i = 0; i < 32; ++i) m |= static_cast<uint32_t>(L[i]->in[0] != 0) << i;
      for (int i = 0; i < 32; ++i) L[i]->out[0] = m;
      break;
    }
    case Op::Match: {
      need_full("match with inactive or exited lanes");
      for (int i = 0; i < 32; ++i) {
        uint32_t m = 0;
        for (int j = 0; j < 32; ++j) m |= static_cast<uint32_t>(L[j]->in[0] == L[i]->in[0]) << j;
        L[i]->out[0] = m;
      }
      break;
    }
    case Op::Mma: {
      need_full("mma with inactive or exited lanes");
      // PTX ISA, mma.m16n8k16 (.f16/.bf16 inputs, .f32 accumulators), lane = 4*g + t:
      //   A: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
      //   B: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
      //   C/D: c0,c1 = D[g][2t..2t+1], c2,c3 = D[g+8][2t..2t+1]     (lower half = lower index)
      //   m16n8k8 (iarg2 = 8): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1]; b0 = B[2t..2t+1][g]; C/D as k16
      const bool bf = L[0]->iarg != 0;
      const int K = L[0]->iarg2;
      for (int ln = 1; ln < 32; ++ln)
        if ((L[ln]->iarg != 0) != bf || L[ln]->iarg2 != K) fail("mma lanes disagree on shape or type");
      if (K != 16 && K != 8) fail("mma shape: k16 or k8");
      float A[16][16] = {}, B[16][8] = {}, C[16][8];
      auto lo = [&](uint64_t w) { return b16_to_float(static_cast<uint16_t>(w & 0xffff), bf); };
      auto hi = [&](uint64_t w) { return b16_to_float(static_cast<uint16_t>((w >> 16) & 0xffff), bf); };
      for (int ln = 0; ln < 32; ++ln) {
        const int g = ln >> 2, t = ln & 3;
        const Lane& l = *L[ln];
        A[g][2 * t] = lo(l.in[0]), A[g][2 * t + 1] = hi(l.in[0]);
        A[g + 8][2 * t] = lo(l.in[1]), A[g + 8][2 * t + 1] = hi(l.in[1]);
        B[2 * t][g] = lo(l.in[4]), B[2 * t + 1][g] = hi(l.in[4]);
        if (K == 16) {
          A[g][2 * t + 8] = lo(l.in[2]), A[g][2 * t + 9] = hi(l.in[2]);
          A[g + 8][2 * t + 8] = lo(l.in[3]), A[g + 8][2 * t + 9] = hi(l.in[3]);
          B[2 * t + 8][g] = lo(l.in[5]), B[2 * t + 9][g] = hi(l.in[5]);
        }
        C[g][2 * t] = unbits<float>(l.in[6]), C[g][2 * t + 1] = unbits<float>(l.in[7]);
        C[g + 8][2 * t] = unbits<float>(l.in[8]), C[g + 8][2 * t + 1] = unbits<float>(l.in[9]);
      }
      float D[16][8];
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 8; ++c) {
          float acc = C[r][c];
          for (int k = 0; k < K; ++k) acc += A[r][k] * B[k][c];  // products of b16 values are exact in fp32
          D[r][c] = acc;
        }
      for (int ln = 0; ln < 32; ++ln) {
        const int g = ln >> 2, t = ln & 3;
        Lane& l = *L[ln];
        l.out[0] = bits(D[g][2 * t]), l.out[1] = bits(D[g][2 * t + 1]);
        l.out[2] = bits(D[g + 8][2 * t]), l.out[3] = bits(D[g + 8][2 * t + 1]);
      }
      break;
    }
    case Op::Ldsm: {
      need_full("ldmatrix with inactive or exited lanes");
      // PTX ISA, ldmatrix.m8n8.x{1,2,4}.b16: lanes 8i..8i+7 give the row addresses of matrix i.
      // Without .trans lane 4g+t receives M_i[g][2t], M_i[g][2t+1] in register i; with .trans
      // M_i[2t][g], M_i[2t+1][g] (lower half = first element).
      const int num = L[0]->iarg;
      const bool trans = L[0]->iarg2 != 0;
      for (int ln = 1; ln < 32; ++ln)
        if (L[ln]->iarg != num || (L[ln]->iarg2 != 0) != trans) fail("ldmatrix lanes disagree on shape");
      uint16_t M[4][8][8];
      for (int i = 0; i < num; ++i)
        for (int r = 0; r < 8; ++r) std::memcpy(M[i][r], L[8 * i + r]->ptr, 16);
      for (int ln = 0; ln < 32; ++ln) {
        const int g = ln >> 2, t = ln & 3;
        for (int i = 0; i < num; ++i) {
          const uint16_t e0 = trans ? M[i][2 * t][g] : M[i][g][2 * t];
          const uint16_t e1 = trans ? M[i][2 * t + 1][g] : M[i][g][2 * t + 1];
          L[ln]->out[i] = uint32_t(e0) | (uint32_t(e1) << 16);
        }
      }
      break;
    }
    default:
      fail("unknown warp collective");
  }
  for (int i = 0; i < n; ++i)
    if (L[i]) L[i]->st = St::Ready;
}

void run_cta(const std::function<void()>& body, uint3 grid, uint3 block, uint3 bidx, size_t smem_bytes) {
  State& s = S();
  s.grid = grid;
  s.block = block;
  s.bidx = bidx;
  s.body = body;
  s.nthreads = static_cast<int>(block.x * block.y * block.z);
  // Shared memory starts as garbage (NaN bit patterns), as nothing guarantees zeros on a GPU.
  s.smem.assign(std::max<size_t>(smem_bytes, 16), 0xff);
  if (s.lanes.size() < static_cast<size_t>(s.nthreads)) s.lanes.resize(s.nthreads);
  for (int i = 0; i < s.nthreads; ++i) {
    Lane& l = s.lanes[i];
    if (!l.stack) l.stack = static_cast<char*>(std::malloc(s.stack_bytes));
    l.linear = i;
    l.warp = i / 32;
    l.lane = i % 32;
    l.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                  static_cast<unsigned>(i / (block.x * block.y))};
    l.st = St::Ready;
    l.op = Op::None;
    l.pending.clear();
    l.groups.clear();
    getcontext(&l.ctx);
    l.ctx.uc_stack.ss_sp = l.stack;
    l.ctx.uc_stack.ss_size = s.stack_bytes;
    l.ctx.uc_link = nullptr;
    makecontext(&l.ctx, trampoline, 0);
  }
  std::vector<int> order(s.nthreads);
  std::iota(order.begin(), order.end(), 0);
  const int nwarps = (s.nthreads + 31) / 32;
  for (;;) {
    // Shuffle the order each round (Fisher-Yates).
    for (int i = s.nthreads - 1; i > 0; --i) std::swap(order[i], order[next_rand() % (i + 1)]);
    bool ran = false;
    for (int i : order) {
      Lane& l = s.lanes[i];
      if (l.st != St::Ready) continue;
      s.cur = &l;
      swapcontext(&s.sched, &l.ctx);
      s.cur = nullptr;
      ran = true;
      if (l.st == St::Warp) resolve_warp(l.warp);
    }
    for (int w = 0; w < nwarps; ++w) resolve_warp(w);  // warps whose other lanes exited meanwhile
    if (ran) continue;
    int done = 0, at_block = 0, red_or = 0, red_count = 0;
    for (int i = 0; i < s.nthreads; ++i) {
      const Lane& l = s.lanes[i];
      done += l.st == St::Done;
      if (l.st == St::Block) {
        ++at_block;
        red_or |= l.iarg;
        red_count += l.iarg;
      }
    }
    if (done == s.nthreads) break;
    if (done + at_block == s.nthreads) {  // barrier: exited threads count as arrived
      s.block_reduce_or = red_or;
      s.block_reduce_count = red_count;
      for (int i = 0; i < s.nthreads; ++i)
        if (s.lanes[i].st == St::Block) s.lanes[i].st = St::Ready;
      continue;
    }
    for (int i = 0; i < s.nthreads; ++i)
      if (s.lanes[i].st == St::Warp) { s.cur = &s.lanes[i]; break; }
    fail("deadlock: threads wait at a warp collective that part of the warp never reaches, or at __syncthreads "
         "while others wait in a warp collective");
  }
  s.cur = nullptr;
}

}  // namespace emu

// ---- CUDA runtime API: what the launchers call.
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 * 1024; break;
    case cudaDevAttrMultiProcessorCount: {  // MIXKERNELS_EMU_SMS: fewer SMs, so tests reach multi-head CTAs
      const char* e = std::getenv("MIXKERNELS_EMU_SMS");
      *v = e && std::atoi(e) > 0 ? std::atoi(e) : 132;
      break;
    }
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 228 * 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = 2048; break;
    default: *v = 0; return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
}
