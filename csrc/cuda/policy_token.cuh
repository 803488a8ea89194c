// The per-token math of the clipped policy loss and of the KL estimators, shared by the policy
// loss kernels (policy.cu) and the fused LM-head loss kernel (fused.cu). The twin of
// kernels/policy/triton_token_loss.py. __host__ __device__ so that tests run it on the host
// (tests/test_policy_loss.py).
#pragma once
#include <cuda_runtime.h>

#include <cmath>

namespace alignfuse {

enum KLEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };

// max, min and clamp with NaN in, NaN out, as torch.maximum / torch.clamp: fmaxf and fminf return
// the other operand, which turns a NaN input into a clamp bound (a finite, wrong loss).
__host__ __device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
__host__ __device__ __forceinline__ float min_nan(float a, float b) { return (a < b || a != a) ? a : b; }
__host__ __device__ __forceinline__ float clamp_nan(float x, float lo, float hi) {
  return min_nan(max_nan(x, lo), hi);
}

struct KL {
  float value, grad;  // the estimate and d estimate / d (logp - ref_logp)
};

// Per-token KL from d = logp - ref_logp (kl.py): k3 clamps -d to [-20, 20] and the result to
// [-10, 10] like verl's low_var_kl, with zero gradient where a clamp is active.
__host__ __device__ __forceinline__ KL kl_token(float d, int estimator) {
  switch (estimator) {
    case kK1: return {d, 1.f};
    case kK2: return {0.5f * d * d, d};
    case kK3: {
      const float x = clamp_nan(-d, -20.f, 20.f);
      const float ex = expf(x);
      const float raw = ex - x - 1.f;
      const bool inside = (-d >= -20.f) && (-d <= 20.f) && (raw >= -10.f) && (raw <= 10.f);
      return {clamp_nan(raw, -10.f, 10.f), inside ? 1.f - ex : 0.f};
    }
    default: return {fabsf(d), d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f)};
  }
}

struct PolicyParams {
  float clip_low, clip_high, dual_clip, kl_coef, log_ratio_min, log_ratio_max;
  int use_dual_clip, has_ref, kl_estimator;
};

struct TokenLoss {
  float loss, grad, pg, ratio, kl;
  bool clipped, dual_clipped;
};

// The per-token math of policy_loss.py (the twin of triton_token_loss.policy_token_loss).
// log_ratio: logp - old_logp (token level) or the sequence's mean (GSPO); its derivative with
// respect to logp is 1 in both cases. ref_log_ratio: logp - ref_logp.
__host__ __device__ __forceinline__ TokenLoss policy_token_loss(float log_ratio, float adv,
                                                                float ref_log_ratio, const PolicyParams& p) {
  TokenLoss out;
  const float clamped = clamp_nan(log_ratio, p.log_ratio_min, p.log_ratio_max);
  const float ratio = expf(clamped);
  const bool in_range = (log_ratio >= p.log_ratio_min) && (log_ratio <= p.log_ratio_max);
  const float unclipped = -adv * ratio;
  const float clipped_loss = -adv * clamp_nan(ratio, 1.f - p.clip_low, 1.f + p.clip_high);
  out.clipped = clipped_loss > unclipped;
  float pg = max_nan(unclipped, clipped_loss);
  // where the clipped term wins, the ratio is outside the clip range: no gradient
  float grad = (out.clipped || !in_range) ? 0.f : -adv * ratio;
  out.dual_clipped = false;
  if (p.use_dual_clip) {
    const float bound = -adv * p.dual_clip;
    out.dual_clipped = (adv < 0.f) && (pg > bound);
    if (out.dual_clipped) {
      pg = bound;
      grad = 0.f;
    }
  }
  out.pg = pg;
  out.loss = pg;
  out.kl = 0.f;
  if (p.has_ref) {
    const KL kl = kl_token(ref_log_ratio, p.kl_estimator);
    out.kl = kl.value;
    out.loss = pg + p.kl_coef * kl.value;
    grad += p.kl_coef * kl.grad;
  }
  out.grad = grad;
  out.ratio = ratio;
  return out;
}

}  // namespace alignfuse
