// A CPU SIMT emulator for the CUDA kernels of csrc/cuda, so that the kernel sources themselves
// (not a re-implementation) run in CPU tests. Included by csrc/cuda/device_prims.cuh when
// MIXKERNELS_SIMT_EMU is defined; the .cu files are then compiled by g++ as C++.
//
// Model: CTAs of a launch run one after another. Every CUDA thread of a CTA is a green thread
// (ucontext) on the calling OS thread; a thread runs until it reaches a synchronization point
// (__syncthreads*, a warp collective such as a shuffle, ballot, match, mma or ldmatrix) or exits.
// The scheduler runs the ready threads in a shuffled order each round (seeded by EMU_SEED), so
// code that reads shared memory another thread wrote without a barrier in between gives wrong
// results under some orders. Warp collectives are resolved when every live lane of the warp has
// arrived: the PTX ISA definitions of mma.m16n8k16 / ldmatrix fragments are implemented here
// independently of the kernels (this file is the oracle for the fragment layouts). cp.async
// copies happen only at cp.async.wait_group (not at issue), so a read before the wait sees stale
// data. A warp collective reached by only part of a warp, or a deadlock, aborts with a message.
#pragma once
#ifndef MIXKERNELS_SIMT_EMU
#error "simt_emu.h is only for MIXKERNELS_SIMT_EMU builds"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>
#undef __shared__
#define __shared__ static  // CTAs run one at a time: a static is the CTA's shared variable

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __noinline__
#define __noinline__ __attribute__((noinline))
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

enum class St { Ready, Warp, Block, Done };
enum class Op {
  None, SyncWarp, Shfl, Ballot, Match, Mma, Ldsm, BlockSync
};

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Lane {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid{};
  int linear = 0, warp = 0, lane = 0;
  St st = St::Ready;
  Op op = Op::None;
  // collective inputs / outputs
  uint64_t in[12] = {};
  uint64_t out[8] = {};
  const void* ptr = nullptr;
  int iarg = 0, iarg2 = 0;
  // cp.async state
  std::vector<Copy> pending;
  std::vector<size_t> groups;  // end index (into pending) of each committed group, oldest first
};

struct State {
  std::vector<Lane> lanes;
  int nthreads = 0;
  uint3 block{}, grid{}, bidx{};
  std::vector<unsigned char> smem;
  std::function<void()> body;
  ucontext_t sched;
  Lane* cur = nullptr;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  int block_reduce_or = 0, block_reduce_count = 0;
  size_t stack_bytes = 256 * 1024;
  long long collectives = 0;
  long long launches = 0;  // kernel launches so far (tests: which path a launcher took)
};

inline State& S() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  State& s = S();
  if (s.cur)
    std::fprintf(stderr, "simt_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, s.bidx.x, s.bidx.y, s.bidx.z,
                 s.cur->tid.x, s.cur->tid.y, s.cur->tid.z);
  else
    std::fprintf(stderr, "simt_emu: %s\n", what);
  std::abort();
}

inline Lane& me() { return *S().cur; }

// Yield to the scheduler in state `st`; returns when the scheduler resumes this thread.
inline void yield(St st, Op op) {
  Lane& l = me();
  l.st = st;
  l.op = op;
  swapcontext(&l.ctx, &S().sched);
}

inline void warp_collective(Op op) {
  ++S().collectives;
  yield(St::Warp, op);
}

// ---- value <-> bits
template <typename T>
inline uint64_t bits(T v) {
  static_assert(sizeof(T) <= 8, "collective value too wide");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T unbits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline float b16_to_float(uint16_t h, bool bf) {
  if (bf) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

void resolve_warp(int warp);  // emu_runtime.cpp
void run_cta(const std::function<void()>& body, uint3 grid, uint3 block, uint3 bidx, size_t smem_bytes);

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const uint3 g{grid.x, grid.y, grid.z}, b{block.x, block.y, block.z};
  if (b.x * b.y * b.z == 0 || b.x * b.y * b.z > 1024) return cudaErrorInvalidConfiguration;
  if (smem > 227 * 1024) return cudaErrorInvalidValue;
  auto tup = std::make_tuple(args...);
  ++S().launches;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x)
        run_cta([&]() { std::apply(kernel, tup); }, g, b, uint3{x, y, z}, smem);
  return cudaSuccess;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// CUDA built-in variables and intrinsics.
#define threadIdx (::emu::me().tid)
#define blockIdx (::emu::S().bidx)
#define blockDim (::emu::S().block)
#define gridDim (::emu::S().grid)
#define MK_DYNAMIC_SMEM(name) unsigned char* name = ::emu::S().smem.data()
#define MK_LAUNCH(kernel, grid, block, smem, stream, ...) ::emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)

inline void __syncthreads() { ::emu::yield(::emu::St::Block, ::emu::Op::BlockSync); }
inline int __syncthreads_or(int p) {
  ::emu::me().iarg = p != 0;
  ::emu::yield(::emu::St::Block, ::emu::Op::BlockSync);
  return ::emu::S().block_reduce_or;
}
inline int __syncthreads_count(int p) {
  ::emu::me().iarg = p != 0;
  ::emu::yield(::emu::St::Block, ::emu::Op::BlockSync);
  return ::emu::S().block_reduce_count;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::emu::me().iarg = static_cast<int>(mask);
  ::emu::warp_collective(::emu::Op::SyncWarp);
}

namespace emu {
// mode: 0 idx, 1 xor, 2 up, 3 down
template <typename T>
inline T shfl(unsigned mask, T v, int arg, int mode) {
  Lane& l = me();
  l.in[0] = bits(v);
  l.iarg = arg;
  l.iarg2 = mode;
  l.in[1] = mask;
  warp_collective(Op::Shfl);
  return unbits<T>(l.out[0]);
}
}  // namespace emu

template <typename T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { (void)w; return ::emu::shfl(m, v, src, 0); }
template <typename T> inline T __shfl_xor_sync(unsigned m, T v, int x, int w = 32) { (void)w; return ::emu::shfl(m, v, x, 1); }
template <typename T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { (void)w; return ::emu::shfl(m, v, int(d), 2); }
template <typename T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { (void)w; return ::emu::shfl(m, v, int(d), 3); }

inline unsigned __ballot_sync(unsigned mask, int p) {
  ::emu::Lane& l = ::emu::me();
  l.in[0] = p != 0;
  l.in[1] = mask;
  ::emu::warp_collective(::emu::Op::Ballot);
  return static_cast<unsigned>(l.out[0]);
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, p) == m; }
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  ::emu::Lane& l = ::emu::me();
  l.in[0] = ::emu::bits(v);
  l.in[1] = mask;
  ::emu::warp_collective(::emu::Op::Match);
  return static_cast<unsigned>(l.out[0]);
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() {}  // one memory: every store is visible once made
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int v) { return ::emu::unbits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(static_cast<uint32_t>(::emu::bits(v))); }
inline float __uint_as_float(unsigned v) { return ::emu::unbits<float>(v); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(::emu::bits(v)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }

// Threads run one at a time: plain read-modify-write is atomic.
template <typename T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <typename T> inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <typename T> inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <typename T> inline T atomicCAS(T* p, T c, T v) { T o = *p; if (o == c) *p = v; return o; }
template <typename T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }

// ---------------------------------------------------------------------------------------------
// The primitives of csrc/cuda/device_prims.cuh.
namespace mixkernels::cuda::prim {

inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p)); }

// D = A*B + C, m16n8k16, b16 inputs (bf = bfloat16), fp32 accumulate.
inline void mma16816_emu(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf) {
  ::emu::Lane& l = ::emu::me();
  for (int i = 0; i < 4; ++i) l.in[i] = a[i];
  l.in[4] = b0;
  l.in[5] = b1;
  for (int i = 0; i < 4; ++i) l.in[6 + i] = ::emu::bits(c[i]);
  l.iarg = bf;
  l.iarg2 = 16;
  ::emu::warp_collective(::emu::Op::Mma);
  for (int i = 0; i < 4; ++i) c[i] = ::emu::unbits<float>(l.out[i]);
}

// D = A*B + C, m16n8k8 (the k8 shape: iarg2 = 8), b16 inputs, fp32 accumulate.
inline void mma1688_emu(float (&c)[4], const uint32_t (&a)[2], uint32_t b0, bool bf) {
  ::emu::Lane& l = ::emu::me();
  l.in[0] = a[0];
  l.in[1] = a[1];
  l.in[4] = b0;
  for (int i = 0; i < 4; ++i) l.in[6 + i] = ::emu::bits(c[i]);
  l.iarg = bf;
  l.iarg2 = 8;
  ::emu::warp_collective(::emu::Op::Mma);
  for (int i = 0; i < 4; ++i) c[i] = ::emu::unbits<float>(l.out[i]);
}

// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16: r[i] is matrix i's fragment.
inline void ldmatrix_emu(uint32_t* r, const void* row, int num, bool trans) {
  ::emu::Lane& l = ::emu::me();
  l.ptr = row;
  l.iarg = num;
  l.iarg2 = trans;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) ::emu::fail("ldmatrix row address not 16-byte aligned");
  ::emu::warp_collective(::emu::Op::Ldsm);
  for (int i = 0; i < num; ++i) r[i] = static_cast<uint32_t>(l.out[i]);
}

inline void cp_async_emu(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    ::emu::fail("cp.async address not aligned to its size");
  ::emu::me().pending.push_back({dst, src, bytes});
}
inline void cp_async_commit_emu() { ::emu::me().groups.push_back(::emu::me().pending.size()); }
inline void cp_async_wait_emu(int keep) {
  ::emu::Lane& l = ::emu::me();
  const int ng = static_cast<int>(l.groups.size());
  if (ng <= keep) return;
  const size_t upto = l.groups[ng - keep - 1];  // copies of the older groups complete now
  for (size_t i = 0; i < upto; ++i) std::memcpy(l.pending[i].dst, l.pending[i].src, l.pending[i].bytes);
  l.pending.erase(l.pending.begin(), l.pending.begin() + static_cast<std::ptrdiff_t>(upto));
  l.groups.erase(l.groups.begin(), l.groups.begin() + (ng - keep));
  for (auto& g : l.groups) g -= upto;
}

}  // namespace mixkernels::cuda::prim
