// Kernels that check the emulation itself (tests/test_cuda_emu.py); built into the emulated
// module only, never into alignfuse.kernels._cuda. Each is either right or wrong on purpose.
#include "reduce.cuh"
#include "registry.h"
#include "softmax_row.cuh"

namespace alignfuse {
namespace {

// Thread 0 publishes a value in shared memory and every thread copies it out, with or
// without the barrier between: without it, the answer depends on the order threads run in.
__global__ void shared_broadcast_kernel(float* out, int with_barrier) {
  __shared__ float value;
  if (threadIdx.x == 0) value = static_cast<float>(blockIdx.x + 1);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.x == 0) value = 0.f;  // the next block starts from 0 again
}

// Block sums of `in` [blocks, threads]; threads at or past `active` return first, which
// leaves block_sum's barriers short of them (a bug the emulation must report).
__global__ void block_sum_kernel(const float* in, float* out, int active) {
  if (static_cast<int>(threadIdx.x) >= active) return;
  const float v = block_sum(in[blockIdx.x * blockDim.x + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Every lane's warp_max and warp_sum of its warp's values, [threads] each.
__global__ void warp_ops_kernel(const float* in, float* max_out, float* sum_out) {
  const float v = in[threadIdx.x];
  max_out[threadIdx.x] = warp_max(v);
  sum_out[threadIdx.x] = warp_sum(v);
}

// float -> bf16 -> float and float -> half -> float with the device conversions.
__global__ void round_trip_kernel(const float* in, float* bf16_out, float* half_out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    bf16_out[i] = to_float(from_float<__nv_bfloat16>(in[i]));
    half_out[i] = to_float(from_float<__half>(in[i]));
  }
}

void shared_broadcast(std::uintptr_t out, int blocks, int threads, int with_barrier) {
  ALIGNFUSE_LAUNCH(blocks, threads, nullptr, shared_broadcast_kernel)(as_ptr<float>(out), with_barrier);
  check_launch("emu_selftest_shared_broadcast");
}

void block_sums(std::uintptr_t in, std::uintptr_t out, int blocks, int threads, int active) {
  ALIGNFUSE_LAUNCH(blocks, threads, nullptr, block_sum_kernel)(as_ptr<const float>(in), as_ptr<float>(out), active);
  check_launch("emu_selftest_block_sums");
}

void warp_ops(std::uintptr_t in, std::uintptr_t max_out, std::uintptr_t sum_out, int threads) {
  ALIGNFUSE_LAUNCH(1, threads, nullptr, warp_ops_kernel)(as_ptr<const float>(in), as_ptr<float>(max_out),
                                                       as_ptr<float>(sum_out));
  check_launch("emu_selftest_warp_ops");
}

void round_trip(std::uintptr_t in, std::uintptr_t bf16_out, std::uintptr_t half_out, int64_t n) {
  ALIGNFUSE_LAUNCH(1, 128, nullptr, round_trip_kernel)(as_ptr<const float>(in), as_ptr<float>(bf16_out),
                                                     as_ptr<float>(half_out), n);
  check_launch("emu_selftest_round_trip");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("emu_selftest_shared_broadcast", &shared_broadcast, "out (f32 [blocks * threads]), blocks, threads, with_barrier");
  m.def("emu_selftest_block_sums", &block_sums, "in (f32 [blocks * threads]), out (f32 [blocks]), blocks, threads, active");
  m.def("emu_selftest_warp_ops", &warp_ops, "in, max_out, sum_out (f32 [threads]), threads");
  m.def("emu_selftest_round_trip", &round_trip, "in, bf16_out, half_out (f32 [n]), n");
});

}  // namespace
}  // namespace alignfuse
