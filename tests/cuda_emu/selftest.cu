// Kernels that check the emulation itself (tests/test_cuda_emu.py); built into the emulated
// module only, never into alignfuse.kernels._cuda. Each is either right or wrong on purpose.
#include "reduce.cuh"
#include "registry.h"
#include "row_sweep.cuh"
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

// Each block adds one to what the block before it wrote (a read across blocks, wrong on
// purpose): the answer is 1, 2, 3, ... only when blocks run in grid order.
__global__ void block_chain_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x == 0 ? 0.f : out[blockIdx.x - 1]) + 1.f;
}

// Every block of a 3-D grid counts itself at its linear index (thread 0 only).
__global__ void block_ids_kernel(float* out) {
  if (threadIdx.x != 0) return;
  const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  out[b] += 1.f;
}

// row_sweep.cuh, one row per block: visits[row, j] counts sweep_row's visits of element j
// (NaN when the value it was handed is not x[j], i.e. a wrong index), and map_row copies the
// row into y (NaN where the index was wrong).
template <typename T, typename G>
__global__ void row_sweep_kernel(const T* x, int64_t V, int64_t x_stride, float* visits, G* y,
                                 int64_t y_stride) {
  const T* row = x + blockIdx.x * x_stride;
  float* seen = visits + blockIdx.x * V;
  sweep_row(row, V, [&](int64_t j, float v) { seen[j] += v == to_float(row[j]) ? 1.f : NAN; });
  map_row(row, y + blockIdx.x * y_stride, V, [&](int64_t j, float v) { return v == to_float(row[j]) ? v : NAN; });
}

// A packed load at `x + offset` elements, wrong on purpose when that is not 16-byte aligned.
__global__ void packed_load_kernel(const float* x, int64_t offset, float* out) {
  const Pack<float, 4>* p = reinterpret_cast<const Pack<float, 4>*>(x + offset);
  ALIGNFUSE_EXPECT_ALIGNED(p, sizeof(Pack<float, 4>));
  if (threadIdx.x == 0) out[0] = p->v[0];
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

void block_chain(std::uintptr_t out, int blocks) {
  ALIGNFUSE_LAUNCH(blocks, 32, nullptr, block_chain_kernel)(as_ptr<float>(out));
  check_launch("emu_selftest_block_chain");
}

void block_ids(std::uintptr_t out, unsigned x, unsigned y, unsigned z) {
  ALIGNFUSE_LAUNCH(dim3(x, y, z), 32, nullptr, block_ids_kernel)(as_ptr<float>(out));
  check_launch("emu_selftest_block_ids");
}

void row_sweep(std::uintptr_t x, int x_dtype, int64_t rows, int64_t V, int64_t x_stride, std::uintptr_t visits,
               std::uintptr_t y, int y_dtype, int64_t y_stride, int threads) {
  by_float_dtype(x_dtype, "emu_selftest_row_sweep: x", [&](auto x_tag) {
    using T = decltype(x_tag);
    by_float_dtype(y_dtype, "emu_selftest_row_sweep: y", [&](auto y_tag) {
      using G = decltype(y_tag);
      ALIGNFUSE_LAUNCH(static_cast<unsigned>(rows), threads, nullptr, row_sweep_kernel<T, G>)(
          as_ptr<const T>(x), V, x_stride, as_ptr<float>(visits), as_ptr<G>(y), y_stride);
    });
  });
  check_launch("emu_selftest_row_sweep");
}

void packed_load(std::uintptr_t x, int64_t offset, std::uintptr_t out) {
  ALIGNFUSE_LAUNCH(1, 32, nullptr, packed_load_kernel)(as_ptr<const float>(x), offset, as_ptr<float>(out));
  check_launch("emu_selftest_packed_load");
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
  m.def("emu_selftest_block_chain", &block_chain, "out (f32 [blocks], zeros), blocks");
  m.def("emu_selftest_block_ids", &block_ids, "out (f32 [x * y * z], zeros), x, y, z");
  m.def("emu_selftest_row_sweep", &row_sweep,
        "x, x_dtype, rows, V, x_stride, visits (f32 [rows, V], zeros), y, y_dtype, y_stride, threads");
  m.def("emu_selftest_packed_load", &packed_load, "x (f32), offset (elements), out (f32 [1])");
  m.def("emu_selftest_round_trip", &round_trip, "in, bf16_out, half_out (f32 [n]), n");
});

}  // namespace
}  // namespace alignfuse
