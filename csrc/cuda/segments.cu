// Per-segment sums over packed tokens: one block per segment, grid-stride over its tokens,
// warp-shuffle then shared-memory reduction. Segments come from cu_seqlens, so there is no
// limit on the number of tokens and no atomics.
#include "reduce.cuh"
#include "registry.h"

namespace alignfuse {
namespace {

template <typename T>
__global__ void segment_sum_kernel(const T* __restrict__ values, const int32_t* __restrict__ cu,
                                   float* __restrict__ out) {
  const int64_t seg = blockIdx.x;
  const int64_t start = cu[seg], end = cu[seg + 1];
  float acc = 0.f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) acc += to_float(values[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[seg] = acc;
}

void segment_sum(std::uintptr_t values, int dtype, std::uintptr_t cu, std::uintptr_t out,
                 int64_t num_segments, std::uintptr_t stream) {
  if (num_segments == 0) return;
  constexpr int kThreads = 256;
  auto s = as_stream(stream);
  by_float_dtype(dtype, "segment_sum: values", [&](auto tag) {
    using T = decltype(tag);
    ALIGNFUSE_LAUNCH(num_segments, kThreads, s, segment_sum_kernel<T>)(
        as_ptr<const T>(values), as_ptr<const int32_t>(cu), as_ptr<float>(out));
  });
  check_launch("segment_sum");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("segment_sum", &segment_sum, "values_ptr, dtype_code, cu_seqlens_ptr (int32), out_ptr (float32), num_segments, stream");
});

}  // namespace
}  // namespace alignfuse
