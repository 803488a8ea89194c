// Advantage estimators: group-relative advantages and masked GAE (the CUDA twins of
// kernels/advantages/triton_group.py and triton_gae.py; the Python side is
// kernels/advantages/cuda.py).
//
// group_advantages: one block per group of contiguous rewards; mean, Bessel std and the
// all-equal test are block reductions; "rank" counts, for each reward, the smaller and equal
// rewards of its group (average ranks for ties), O(G^2) per group with G a few hundred at most.
// gae: one thread per sequence walks it backwards (the recursion is sequential in time; a
// batch has many sequences, so threads are many).
#include "reduce.cuh"
#include "registry.h"

namespace alignfuse {
namespace {

enum Estimator : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kRank = 3 };
enum Scale : int { kGroup = 0, kBatch = 1, kNone = 2 };

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ float group_value(const T* r, int64_t i, int64_t base, int64_t group_size, int estimator) {
  const float x = to_float(r[i]);
  // the difference to the group's first reward (group.py's _centered: every estimator is
  // shift-invariant, and the difference of two floats that sit on an offset is exact)
  if (estimator != kRank) return x - to_float(r[base]);
  float less = 0.f, equal = 0.f;
  for (int64_t j = base; j < base + group_size; ++j) {
    const float y = to_float(r[j]);
    less += (y < x) ? 1.f : 0.f;
    equal += (y == x) ? 1.f : 0.f;
  }
  return less + (equal + 1.f) * 0.5f;
}

template <typename T>
__global__ void group_advantages_kernel(const T* __restrict__ rewards, float* __restrict__ out, int64_t group_size,
                                        float eps, float batch_denominator, int estimator, int scale) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * group_size;
  const float n = static_cast<float>(group_size);
  float sum = 0.f, lo = FLT_MAX, hi = -FLT_MAX;
  for (int64_t i = base + threadIdx.x; i < base + group_size; i += blockDim.x) {
    const float x = group_value(rewards, i, base, group_size, estimator);
    sum += x;
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  const float mean = block_sum(sum) / n;
  // all-equal groups (and groups of one) get exactly 0, whatever the rounding of the mean
  const bool constant = block_max(hi) == -block_max(-lo);
  float sq = 0.f;
  for (int64_t i = base + threadIdx.x; i < base + group_size; i += blockDim.x) {
    const float c = group_value(rewards, i, base, group_size, estimator) - mean;
    sq += c * c;
  }
  const float std = sqrtf(block_sum(sq) / fmaxf(n - 1.f, 1.f));
  float factor = 1.f;  // advantage = factor * (x - mean)
  if (estimator == kRloo) {
    factor = n / fmaxf(n - 1.f, 1.f);  // r - mean of the others = G/(G-1) (r - mean)
  } else if (estimator != kDrGrpo) {
    if (scale == kGroup) factor = 1.f / (std + eps);
    if (scale == kBatch) factor = 1.f / batch_denominator;
  }
  for (int64_t i = base + threadIdx.x; i < base + group_size; i += blockDim.x) {
    const float c = group_value(rewards, i, base, group_size, estimator) - mean;
    out[i] = constant ? 0.f : c * factor;
  }
}

__host__ __device__ __forceinline__ float load_float(float x) { return x; }
__host__ __device__ __forceinline__ float load_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float load_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// GAE over the tokens [start, end) of one sequence, backwards (__host__ __device__: the tests
// run it on the host). Masked tokens take no part; their outputs are 0.
template <typename T>
__host__ __device__ void gae_sequence(const T* rewards, const T* values, const float* mask, int64_t start,
                                      int64_t end, float gamma, float lam, float* adv, float* ret) {
  float next_value = 0.f, next_adv = 0.f;
  for (int64_t t = end - 1; t >= start; --t) {
    if (!(mask[t] > 0.f)) {
      adv[t] = 0.f;
      ret[t] = 0.f;
      continue;
    }
    const float v = load_float(values[t]);
    const float delta = load_float(rewards[t]) + gamma * next_value - v;
    next_adv = delta + gamma * lam * next_adv;
    next_value = v;
    adv[t] = next_adv;
    ret[t] = next_adv + v;
  }
}

template <typename T>
__global__ void gae_kernel(const T* __restrict__ rewards, const T* __restrict__ values, const float* __restrict__ mask,
                           const int32_t* __restrict__ cu, float* __restrict__ adv, float* __restrict__ ret,
                           int64_t num_seqs, float gamma, float lam) {
  const int64_t seq = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (seq >= num_seqs) return;
  gae_sequence(rewards, values, mask, cu[seq], cu[seq + 1], gamma, lam, adv, ret);
}

void group_advantages(std::uintptr_t rewards, int dtype, std::uintptr_t out, int64_t num_groups, int64_t group_size,
                      float eps, float batch_denominator, int estimator, int scale, std::uintptr_t stream) {
  if (num_groups == 0) return;
  by_float_dtype(dtype, "group_advantages: rewards", [&](auto tag) {
    using T = decltype(tag);
    ALIGNFUSE_LAUNCH(num_groups, kThreads, as_stream(stream), group_advantages_kernel<T>)(
        as_ptr<const T>(rewards), as_ptr<float>(out), group_size, eps, batch_denominator, estimator, scale);
  });
  check_launch("group_advantages");
}

void gae(std::uintptr_t rewards, std::uintptr_t values, int dtype, std::uintptr_t mask, std::uintptr_t cu,
         std::uintptr_t adv, std::uintptr_t ret, int64_t num_seqs, float gamma, float lam, std::uintptr_t stream) {
  if (num_seqs == 0) return;
  const int64_t blocks = (num_seqs + kThreads - 1) / kThreads;
  by_float_dtype(dtype, "gae: rewards and values", [&](auto tag) {
    using T = decltype(tag);
    ALIGNFUSE_LAUNCH(blocks, kThreads, as_stream(stream), gae_kernel<T>)(
        as_ptr<const T>(rewards), as_ptr<const T>(values), as_ptr<const float>(mask), as_ptr<const int32_t>(cu),
        as_ptr<float>(adv), as_ptr<float>(ret), num_seqs, gamma, lam);
  });
  check_launch("gae");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("group_advantages", &group_advantages,
        "rewards, dtype, out (f32 [S]), num_groups, group_size, eps, batch_denominator, estimator, scale, stream");
  m.def("gae", &gae, "rewards, values, dtype, mask (f32 [N]), cu (i32), adv (f32 [N]), ret (f32 [N]), num_seqs, "
                     "gamma, lam, stream");
});

}  // namespace
}  // namespace alignfuse
