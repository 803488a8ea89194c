// A CUDA runtime for the host, so that tests run csrc/cuda/*.cu (kernels and launchers, as
// written) on CPU tensors without a GPU. tests/cuda_emu/build.py compiles those files with the
// host C++ compiler, with this folder's cuda_runtime.h, cuda_bf16.h and cuda_fp16.h in front
// of the real ones, into a module with the same functions as alignfuse.kernels._cuda.
//
// What is emulated (only what csrc/cuda uses; a new intrinsic fails the build here, loudly):
// - a launch (ALIGNFUSE_LAUNCH, registry.h) runs the grid's blocks one after the other; the
//   threads of a block are fibers on one OS thread, switched at __syncthreads and at warp
//   shuffles; blocks and threads run in an order that tests choose (forward, reverse or a
//   seeded shuffle), so a read of shared memory that misses a barrier, or a read of what
//   another block writes, gives a different answer per order;
// - a packed access (ALIGNFUSE_EXPECT_ALIGNED, row_sweep.cuh) must be aligned to its size, as
//   on the GPU;
// - __syncthreads must be reached by every thread of the block, a full-mask shuffle by every
//   lane of the warp: a barrier that some threads skip or exit before (undefined behaviour on
//   a GPU, a hang or a wrong answer there) is reported as a launch error;
// - launch configurations are checked as the CUDA runtime checks them (block of 1 to 1024
//   threads, grid.x up to 2^31 - 1, grid.y and grid.z up to 65535, no empty grid), and a bad
//   one is reported by cudaGetLastError;
// - __shared__ is `static`: one copy, shared by the threads of the running block;
// - __half and __nv_bfloat16 convert with round-to-nearest-even, as the device does.
// What is not: memory checking (a stray index reads host memory), timing, streams (a launch
// runs at once; which stream it names is recorded, for tests).
#pragma once

#include <math.h>

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

#define CUDART_VERSION 0  // build_info()["cuda_runtime"] == 0 names the emulation

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates: the scheduler sets them before it switches to a fiber.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef struct alignfuse_emu_stream* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDeviceCount(int* count);

void __syncthreads();

namespace alignfuse_emu {

// Lane `lane ^ lane_mask` of the caller's warp gets `bytes` from the caller, the caller gets
// them from that lane (all lanes of the warp must call it: `mask` must be full).
void warp_exchange(unsigned mask, const void* in, void* out, std::size_t bytes, int lane_mask);

void block_barrier();  // __syncthreads
// A packed access of `bytes` at `ptr` (row_sweep.cuh): one that is not aligned to its size,
// a launch error on the GPU (misaligned address), is reported as a launch error here too.
void expect_aligned(const void* ptr, std::size_t bytes);
const char* last_message();

// Runs body() as every thread of every block of the grid; errors go to cudaGetLastError.
// The stream is only recorded (emu_counts: a launch on another stream than the one tests
// expect, torch's current one, is counted).
void run_grid(dim3 grid, dim3 block, cudaStream_t stream, const std::function<void()>& body);

template <typename... P>
struct Launch {
  dim3 grid, block;
  cudaStream_t stream;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    run_grid(grid, block, stream, [&] { kernel(args...); });
  }
};

template <typename... P>
Launch<P...> launcher(dim3 grid, dim3 block, cudaStream_t stream, void (*kernel)(P...)) {
  return {grid, block, stream, kernel};
}

}  // namespace alignfuse_emu

#define ALIGNFUSE_EXPECT_ALIGNED(ptr, bytes) ::alignfuse_emu::expect_aligned((ptr), (bytes))

#define ALIGNFUSE_LAUNCH(grid, block, stream, ...) \
  ::alignfuse_emu::launcher((grid), (block), (stream), __VA_ARGS__)

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "__shfl_xor_sync: a value of at most 8 bytes");
  (void)width;
  T out;
  alignfuse_emu::warp_exchange(mask, &value, &out, sizeof(T), lane_mask);
  return out;
}

// ---- 16-bit floats: storage types with the device's conversions
struct __half {
  std::uint16_t bits = 0;
};
struct __nv_bfloat16 {
  std::uint16_t bits = 0;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // IEEE round-to-nearest-even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = static_cast<std::uint16_t>((u >> 16) | 0x40);  // stays a (quiet) NaN
  } else {
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest, ties to even
    b.bits = static_cast<std::uint16_t>(u >> 16);
  }
  return b;
}
