// A recording stand-in for the CUDA runtime, linked instead of libcudart into the static report's
// capture harness (mixkernels/bench/static_cuda.py). No GPU: kernel launches are printed, not run.
//
// nvcc turns `kernel<<<grid, block, smem, stream>>>(args...)` into __cudaPushCallConfiguration +
// a host stub that pops the configuration and calls __cudaLaunchKernel with the argument addresses;
// __cudaRegisterFunction (at static init) maps each host stub to its device (mangled) name. Here
// every launch becomes one line on stdout:
//   LAUNCH <mangled name> <grid x y z> <block x y z> <dynamic smem> <args as hex, one per parameter>
// Parameter sizes come from the file named by MK_STATIC_PARAMS (lines "<name> <size> <size>...",
// read from the cubin's KPARAM_INFO by the Python side); without it no arguments are printed.
// Device queries answer as an H100/H200 (sm_90: 132 SMs, 227 KB opt-in shared memory per block).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {
struct Config {
  dim3 grid, block;
  size_t smem;
  void* stream;
};
std::vector<Config>& configs() {
  static std::vector<Config> v;
  return v;
}
std::map<const void*, std::string>& names() {
  static std::map<const void*, std::string> m;
  return m;
}
std::map<std::string, std::vector<int>>& param_sizes() {
  static std::map<std::string, std::vector<int>> m;
  static bool loaded = false;
  if (!loaded) {
    loaded = true;
    if (const char* path = std::getenv("MK_STATIC_PARAMS")) {
      std::ifstream f(path);
      std::string line;
      while (std::getline(f, line)) {
        std::istringstream is(line);
        std::string name;
        is >> name;
        int s;
        while (is >> s) m[name].push_back(s);
      }
    }
  }
  return m;
}
}  // namespace

extern "C" {

void** __cudaRegisterFatBinary(void* fatCubin) {
  static void* handle = nullptr;
  (void)fatCubin;
  return &handle;
}
void __cudaRegisterFatBinaryEnd(void** handle) { (void)handle; }
void __cudaUnregisterFatBinary(void** handle) { (void)handle; }
char __cudaInitModule(void** handle) {
  (void)handle;
  return 0;
}

void __cudaRegisterFunction(void** handle, const char* hostFun, char* deviceFun, const char* deviceName,
                            int thread_limit, uint3* tid, uint3* bid, dim3* bDim, dim3* gDim, int* wSize) {
  (void)handle; (void)deviceFun; (void)thread_limit; (void)tid; (void)bid; (void)bDim; (void)gDim; (void)wSize;
  names()[hostFun] = deviceName;
}

void __cudaRegisterVar(void** handle, char* hostVar, char* deviceAddress, const char* deviceName, int ext,
                       size_t size, int constant, int global) {
  (void)handle; (void)hostVar; (void)deviceAddress; (void)deviceName; (void)ext; (void)size; (void)constant;
  (void)global;
}

unsigned __cudaPushCallConfiguration(dim3 gridDim, dim3 blockDim, size_t sharedMem, struct CUstream_st* stream) {
  configs().push_back(Config{gridDim, blockDim, sharedMem, stream});
  return 0;
}

cudaError_t __cudaPopCallConfiguration(dim3* gridDim, dim3* blockDim, size_t* sharedMem, void* stream) {
  if (configs().empty()) return cudaErrorInvalidConfiguration;
  const Config c = configs().back();
  configs().pop_back();
  *gridDim = c.grid;
  *blockDim = c.block;
  *sharedMem = c.smem;
  *static_cast<void**>(stream) = c.stream;
  return cudaSuccess;
}

cudaError_t __cudaGetKernel(cudaKernel_t* kernel, const void* fun) {
  *kernel = reinterpret_cast<cudaKernel_t>(const_cast<void*>(fun));
  return cudaSuccess;
}

static cudaError_t record(const void* fun, dim3 g, dim3 b, void** args, size_t smem) {
  auto it = names().find(fun);
  const std::string name = it == names().end() ? std::string("?") : it->second;
  std::printf("LAUNCH %s %u %u %u %u %u %u %zu", name.c_str(), g.x, g.y, g.z, b.x, b.y, b.z, smem);
  auto ps = param_sizes().find(name);
  if (ps != param_sizes().end()) {
    for (size_t i = 0; i < ps->second.size(); ++i) {
      const unsigned char* p = static_cast<const unsigned char*>(args[i]);
      std::printf(" ");
      for (int k = ps->second[i] - 1; k >= 0; --k) std::printf("%02x", p[k]);  // little-endian -> hex number
    }
  }
  std::printf("\n");
  return cudaSuccess;
}

cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 g, dim3 b, void** args, size_t smem, cudaStream_t s) {
  (void)s;
  return record(reinterpret_cast<const void*>(kernel), g, b, args, smem);
}
cudaError_t __cudaLaunchKernel_ptsz(cudaKernel_t kernel, dim3 g, dim3 b, void** args, size_t smem, cudaStream_t s) {
  (void)s;
  return record(reinterpret_cast<const void*>(kernel), g, b, args, smem);
}
cudaError_t cudaLaunchKernel(const void* fun, dim3 g, dim3 b, void** args, size_t smem, cudaStream_t s) {
  (void)s;
  return record(fun, g, b, args, smem);
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) {
  (void)e;
  return "stub";
}
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) {
  (void)dev;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  (void)dev;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 232448; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 49152; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: *value = 0; break;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  (void)func; (void)attr; (void)value;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
  (void)p; (void)v; (void)s;
  std::printf("MEMSET %zu\n", n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
  (void)d; (void)s; (void)k; (void)st;
  std::printf("MEMCPY %zu\n", n);
  return cudaSuccess;
}

}  // extern "C"
