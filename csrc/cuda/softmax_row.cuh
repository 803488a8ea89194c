// Per-row softmax math shared by the logits kernels (logprobs.cu) and the fused LM-head loss
// kernel (fused.cu): the online softmax state of a strided share of a row, and the gradient
// of one logit. The per-element math is __host__ __device__ so that tests run it on the host
// (tests/test_logprobs.py builds a host harness with nvcc; no GPU needed).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

namespace alignfuse {

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Online softmax state of one thread (or, after merging, of the whole row).
struct SoftmaxState {
  float m = -FLT_MAX;  // running max (finite: no inf - inf)
  float s = 0.f;       // sum exp(z - m)
  float b = 0.f;       // sum exp(z - m) (z - m)

  __host__ __device__ __forceinline__ void add(float z) {
    if (z == -INFINITY) return;  // a masked logit: p = 0, and -inf would poison m and b
    if (s == 0.f) {  // first element
      m = z;
      s = 1.f;
      b = 0.f;
    } else if (z > m) {
      const float alpha = expf(m - z);
      b = alpha * (b + s * (m - z));
      s = alpha * s + 1.f;
      m = z;
    } else {
      const float e = expf(z - m);
      s += e;
      b += e * (z - m);
    }
  }

  // This state's (s, b) relative to the row max M >= m; (0, 0) for a thread with no elements.
  // A NaN logit leaves s (and m) NaN, which must reach the row's sums: `s != 0`, not `s > 0`.
  __host__ __device__ __forceinline__ void rescaled(float M, float& s_out, float& b_out) const {
    s_out = b_out = 0.f;
    if (s != 0.f) {
      const float alpha = expf(m - M);
      s_out = alpha * s;
      b_out = alpha * (b + s * (m - M));
    }
  }
};

// Gemma-2's final logit soft-capping: cap * tanh(raw / cap); cap <= 0 means none.
__host__ __device__ __forceinline__ float soft_cap(float raw, float cap) {
  return cap > 0.f ? cap * tanhf(raw / cap) : raw;
}

// d soft_cap / d raw = 1 - tanh^2, from the capped value (1 without a cap).
__host__ __device__ __forceinline__ float soft_cap_slope(float capped, float cap) {
  if (cap <= 0.f) return 1.f;
  const float t = capped / cap;
  return 1.f - t * t;
}

// d loss / d(raw logit) of one element: z = raw / T, log p = z - lse,
// dz = g_logp (1[target] - p) - g_entropy p (log p + entropy), times 1/T.
__host__ __device__ __forceinline__ float grad_logit(float z, float lse, float entropy, float g_logp,
                                                     float g_entropy, bool is_target, float inv_temp) {
  const float log_p = z - lse;
  const float p = expf(log_p);
  // p = 0 (a masked -inf logit) contributes nothing, even though log p = -inf.
  float dz = p > 0.f ? -p * (g_logp + g_entropy * (log_p + entropy)) : 0.f;
  if (is_target) dz += g_logp;
  return dz * inv_temp;
}

}  // namespace alignfuse
