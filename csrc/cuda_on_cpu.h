// cuda_on_cpu.h: the CPU run of the CUDA source. cuda_kernels.cuh includes this header in place
// of <cuda_runtime.h> when IVON_CUDA_ON_CPU is defined; the test build (tests/cuda_on_cpu_build.py)
// compiles the .cu files themselves as host C++ with it, under AddressSanitizer and
// UndefinedBehaviorSanitizer, and the kernel suite runs the result against the reference.
//
// Note [the CUDA source on the CPU]: no GPU has run our CUDA kernels for months, so CI runs their
// source on the CPU. This header supplies the little of CUDA the kernels use: the qualifiers
// (empty), the thread indices, the vector types, the device queries of the launch configuration
// and the launch itself (IVON_LAUNCH, see Note [launches] in cuda_kernels.cuh). A launch runs
// every block and, in each, every thread, one after another, each to the end of its grid-stride
// loop. That is faithful for the results because the kernels share nothing between threads: no
// shared memory, no __syncthreads, no atomics, and each thread reads and writes only its own
// quads. A kernel that did share would need a real scheduler here: this header defines none of
// __shared__, __syncthreads or the atomics on purpose, so such a kernel does not compile. What the CPU run proves and what only a GPU can is in docs/DESIGN.md
// ("The CUDA source on the CPU"); in short: indexing, the vector / scalar / tail paths, the
// grid-stride loop and every instance's math are checked here, bounds and alignment by the
// sanitizers (float4 and uint2 carry CUDA's alignment, so UBSan reports a misaligned vector
// access as the GPU would fault on it); the memory model, real faults and speed need a GPU.
//
// Knobs for the tests (extern "C" in cuda_on_cpu.cpp): the SM count, which picks the grid (the
// kernels launch min(blocks needed, 8 per SM) blocks), and a dry-run mode in which launches are
// recorded but not run, so that the dispatchers themselves list every instance they can launch.
#pragma once

#if !defined(IVON_CUDA_ON_CPU) || defined(__CUDACC__)
#error "cuda_on_cpu.h is the host stand-in for the CUDA runtime: only for IVON_CUDA_ON_CPU builds"
#endif

#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace ivon_fast {
struct OpArgs;

namespace cuda_on_cpu {

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// the thread's coordinates, set by the launch before each thread runs; inline variables, so that
// every .cu file of the build shares them
inline dim3 blockIdx, blockDim, gridDim, threadIdx;

}  // namespace cuda_on_cpu
}  // namespace ivon_fast

using ivon_fast::cuda_on_cpu::blockDim;
using ivon_fast::cuda_on_cpu::blockIdx;
using ivon_fast::cuda_on_cpu::gridDim;
using ivon_fast::cuda_on_cpu::threadIdx;

// CUDA's vector types with CUDA's alignment: a float4 access must be 16-byte aligned on the GPU,
// and with alignas UBSan (-fsanitize=alignment) reports any access that is not
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }

// ---- the runtime API the host side of the kernels calls ----
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace ivon_fast {
namespace cuda_on_cpu {

// Each SM count the tests choose is an emulated device of its own (the ordinal is its place in
// sm_counts): the host code may cache a device's SM count, as it may on a GPU, and a test that
// switches the count switches the device rather than invalidating that cache.
constexpr int kMaxDevices = 64;
inline int sm_counts[kMaxDevices] = {1};  // device 0: one SM (the default: see cuda_on_cpu.cpp)
inline int num_devices = 1;
inline int current_device = 0;
inline cudaError_t last_error = cudaSuccess;
inline bool dry_run = false;  // record launches without running them

// the bookkeeping of a launch (cuda_on_cpu.cpp): which instance ran (or, dry, could), and
// `described`, the launch's shape (describe_launch below)
void record_launch(const char* instance, const char* described);

// What the tests want to know of a launch: whether the vector path is on and whether the grid
// is one block, many, or fewer threads than the quads of that path (its grid-stride loop wraps).
const char* describe_shape(bool vector, int64_t quads, unsigned int grid, unsigned int block);

// The kernels take one argument, a Launch (cuda_kernels.cuh), whose quads say which loops run
// (Note [the quads of a launch]): described as "vector" when it has quads for the vector loop
// (the bounds-checked loop may run its partial first and last quads too), else "scalar". Another
// signature is described as "?", which the coverage test reports.
template <typename L>
auto describe_launch(const L& l, unsigned int grid, unsigned int block)
    -> decltype(l.quads.vec_n, l.quads.n_scalar, static_cast<const char*>(nullptr)) {
  const bool vector = l.quads.vec_n > 0;
  return describe_shape(vector, vector ? l.quads.vec_n : l.quads.n_scalar, grid, block);
}
template <typename... Args>
const char* describe_launch(const Args&...) {
  return "?";
}

// "... [with auto Kernel = ns::update_kernel<float, true, ...>]": GCC's name of the instance
template <auto Kernel>
const char* instance_name() {
  return __PRETTY_FUNCTION__;
}

// IVON_LAUNCH(grid, block, stream, kernel)(args...): checks the configuration as CUDA does (an
// invalid one is the launch's error, and nothing runs), records the launch, then runs the grid
template <auto Kernel>
struct Launch {
  long long grid, block;
  cudaStream_t stream;  // ignored: a launch has run when IVON_LAUNCH returns, as if synchronized

  template <typename... Args>
  void operator()(const Args&... args) const {
    if (grid < 1 || grid > 0x7fffffffLL || block < 1 || block > 1024) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const unsigned int g = unsigned(grid), b = unsigned(block);
    record_launch(instance_name<Kernel>(), describe_launch(args..., g, b));
    if (dry_run) return;
    gridDim = dim3{g, 1, 1};
    blockDim = dim3{b, 1, 1};
    for (unsigned int i = 0; i < g; ++i) {
      for (unsigned int t = 0; t < b; ++t) {
        blockIdx = dim3{i, 0, 0};
        threadIdx = dim3{t, 0, 0};
        Kernel(args...);
      }
    }
  }
};

}  // namespace cuda_on_cpu
}  // namespace ivon_fast

#define IVON_LAUNCH(grid, block, stream, ...)                                 \
  ::ivon_fast::cuda_on_cpu::Launch<&__VA_ARGS__> {                            \
    static_cast<long long>(grid), static_cast<long long>(block),              \
        static_cast<cudaStream_t>(stream)                                     \
  }

inline cudaError_t cudaGetDevice(int* device) {
  *device = ivon_fast::cuda_on_cpu::current_device;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  *value = attr == cudaDevAttrMultiProcessorCount && device >= 0 &&
                   device < ivon_fast::cuda_on_cpu::num_devices
               ? ivon_fast::cuda_on_cpu::sm_counts[device]
               : 0;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ivon_fast::cuda_on_cpu::last_error;
  ivon_fast::cuda_on_cpu::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration argument";
}
