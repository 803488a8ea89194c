// Policy-gradient losses: the fused clipped policy loss (PPO / dual clip / GSPO + KL), the
// clipped value loss and the per-token KL penalty. The CUDA twin of
// kernels/policy/triton_policy_loss.py, triton_value_loss.py and triton_kl.py; the Python
// side is kernels/policy/cuda.py.
//
// Loss kernels: one block per sequence (cu_seqlens segments), threads stride over its tokens.
// Per token they write the final gradient d loss / d input (already times the aggregation
// weight w_s of the sequence), so autograd's backward is a multiply; per sequence they write
// the partial sums of the aggregation and of the metrics (block reductions, no atomics).
// GSPO first reduces the sequence's mean log-ratio, then runs the main loop.
//
// Numerics: fp32 after the load; the log-ratio is clamped before exp (+-80 cannot overflow);
// masked tokens are selected out (never multiplied: padding may hold inf/NaN).
// The per-token math (kl_token, policy_token_loss) is in policy_token.cuh, shared with fused.cu.
#include "policy_token.cuh"
#include "reduce.cuh"
#include "registry.h"

namespace alignfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kNumPartials = 8;  // loss, pg, count, clipped, dual_clipped, -log_ratio, kl, ratio

template <typename T>
__global__ void policy_loss_kernel(const T* __restrict__ logp, const T* __restrict__ old_logp,
                                   const T* __restrict__ adv, const T* __restrict__ ref_logp,
                                   const float* __restrict__ mask, const int32_t* __restrict__ cu,
                                   const float* __restrict__ weights, float* __restrict__ grad,
                                   float* __restrict__ partials, float* __restrict__ ratio_max_out,
                                   PolicyParams p, int adv_per_seq, int sequence_level) {
  const int64_t seq = blockIdx.x;
  const int64_t start = cu[seq], end = cu[seq + 1];
  const float weight = weights[seq];
  float seq_log_ratio = 0.f;
  if (sequence_level) {
    float lr = 0.f, n = 0.f;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      if (mask[i] > 0.f) {
        lr += to_float(logp[i]) - to_float(old_logp[i]);
        n += 1.f;
      }
    }
    lr = block_sum(lr);
    n = block_sum(n);
    seq_log_ratio = lr / fmaxf(n, 1.f);
  }
  const float seq_adv = adv_per_seq ? to_float(adv[seq]) : 0.f;
  float acc[kNumPartials] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float ratio_max = 0.f;  // ratios are > 0
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    if (!(mask[i] > 0.f)) {
      grad[i] = 0.f;
      continue;
    }
    const float lp = to_float(logp[i]);
    const float token_lr = lp - to_float(old_logp[i]);
    const float a = adv_per_seq ? seq_adv : to_float(adv[i]);
    const float ref_lr = p.has_ref ? lp - to_float(ref_logp[i]) : 0.f;
    const TokenLoss t = policy_token_loss(sequence_level ? seq_log_ratio : token_lr, a, ref_lr, p);
    grad[i] = t.grad * weight;
    acc[0] += t.loss;
    acc[1] += t.pg;
    acc[2] += 1.f;
    acc[3] += t.clipped ? 1.f : 0.f;
    acc[4] += t.dual_clipped ? 1.f : 0.f;
    acc[5] -= token_lr;
    acc[6] += t.kl;
    acc[7] += t.ratio;
    ratio_max = max_nan(ratio_max, t.ratio);
  }
#pragma unroll
  for (int k = 0; k < kNumPartials; ++k) {
    const float total = block_sum(acc[k]);
    if (threadIdx.x == 0) partials[seq * kNumPartials + k] = total;
  }
  // block_max (fmaxf) drops NaN, but torch's ratio_max is NaN when a valid token's ratio is
  const float nan_ratios = block_sum(ratio_max != ratio_max ? 1.f : 0.f);
  ratio_max = block_max(ratio_max);
  if (threadIdx.x == 0) ratio_max_out[seq] = nan_ratios > 0.f ? NAN : ratio_max;
}

template <typename T>
__global__ void value_loss_kernel(const T* __restrict__ values, const T* __restrict__ old_values,
                                  const T* __restrict__ returns, const float* __restrict__ mask,
                                  const int32_t* __restrict__ cu, const float* __restrict__ weights,
                                  float* __restrict__ grad, float* __restrict__ partials, float clip,
                                  int use_clip) {
  const int64_t seq = blockIdx.x;
  const int64_t start = cu[seq], end = cu[seq + 1];
  const float weight = weights[seq];
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // loss, count, clipped, value sum
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    if (!(mask[i] > 0.f)) {
      grad[i] = 0.f;
      continue;
    }
    const float v = to_float(values[i]);
    const float ret = to_float(returns[i]);
    const float err = v - ret;
    float loss = err * err;
    float g = err;  // d (0.5 err^2) / dv: the 0.5 of the value loss is folded in
    if (use_clip) {
      const float old = to_float(old_values[i]);
      const float clipped_err = clamp_nan(v, old - clip, old + clip) - ret;
      const float clipped_loss = clipped_err * clipped_err;
      if (clipped_loss > loss) {  // only when v is outside the clip range: no gradient
        g = 0.f;
        acc[2] += 1.f;
      }
      loss = max_nan(loss, clipped_loss);  // a NaN in either term is a NaN loss, as in torch
    }
    grad[i] = g * weight;
    acc[0] += loss;
    acc[1] += 1.f;
    acc[3] += v;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float total = block_sum(acc[k]);
    if (threadIdx.x == 0) partials[seq * 4 + k] = total;
  }
}

template <typename T>
__global__ void kl_penalty_kernel(const T* __restrict__ logp, const T* __restrict__ ref_logp,
                                  float* __restrict__ kl, float* __restrict__ grad, int64_t n,
                                  int estimator) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const KL k = kl_token(to_float(logp[i]) - to_float(ref_logp[i]), estimator);
    kl[i] = k.value;
    grad[i] = k.grad;
  }
}

void policy_loss(std::uintptr_t logp, std::uintptr_t old_logp, std::uintptr_t adv, std::uintptr_t ref_logp,
                 int dtype, std::uintptr_t mask, std::uintptr_t cu, std::uintptr_t weights,
                 std::uintptr_t grad, std::uintptr_t partials, std::uintptr_t ratio_max, int64_t num_seqs,
                 float clip_low, float clip_high, float dual_clip, float kl_coef, float log_ratio_min,
                 float log_ratio_max, int use_dual_clip, int has_ref, int kl_estimator, int adv_per_seq,
                 int sequence_level, std::uintptr_t stream) {
  if (num_seqs == 0) return;
  const PolicyParams p{clip_low, clip_high, dual_clip, kl_coef, log_ratio_min, log_ratio_max,
                       use_dual_clip, has_ref, kl_estimator};
  by_float_dtype(dtype, "policy_loss: log-probs", [&](auto tag) {
    using T = decltype(tag);
    ALIGNFUSE_LAUNCH(num_seqs, kThreads, as_stream(stream), policy_loss_kernel<T>)(
        as_ptr<const T>(logp), as_ptr<const T>(old_logp), as_ptr<const T>(adv), as_ptr<const T>(ref_logp),
        as_ptr<const float>(mask), as_ptr<const int32_t>(cu), as_ptr<const float>(weights), as_ptr<float>(grad),
        as_ptr<float>(partials), as_ptr<float>(ratio_max), p, adv_per_seq, sequence_level);
  });
  check_launch("policy_loss");
}

void value_loss(std::uintptr_t values, std::uintptr_t old_values, std::uintptr_t returns, int dtype,
                std::uintptr_t mask, std::uintptr_t cu, std::uintptr_t weights, std::uintptr_t grad,
                std::uintptr_t partials, int64_t num_seqs, float clip, int use_clip, std::uintptr_t stream) {
  if (num_seqs == 0) return;
  by_float_dtype(dtype, "value_loss: values", [&](auto tag) {
    using T = decltype(tag);
    ALIGNFUSE_LAUNCH(num_seqs, kThreads, as_stream(stream), value_loss_kernel<T>)(
        as_ptr<const T>(values), as_ptr<const T>(old_values), as_ptr<const T>(returns), as_ptr<const float>(mask),
        as_ptr<const int32_t>(cu), as_ptr<const float>(weights), as_ptr<float>(grad), as_ptr<float>(partials),
        clip, use_clip);
  });
  check_launch("value_loss");
}

void kl_penalty(std::uintptr_t logp, std::uintptr_t ref_logp, int dtype, std::uintptr_t kl, std::uintptr_t grad,
                int64_t n, int estimator, std::uintptr_t stream) {
  if (n == 0) return;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);  // grid-stride beyond
  by_float_dtype(dtype, "kl_penalty: log-probs", [&](auto tag) {
    using T = decltype(tag);
    ALIGNFUSE_LAUNCH(grid, kThreads, as_stream(stream), kl_penalty_kernel<T>)(
        as_ptr<const T>(logp), as_ptr<const T>(ref_logp), as_ptr<float>(kl), as_ptr<float>(grad), n, estimator);
  });
  check_launch("kl_penalty");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("policy_loss", &policy_loss,
        "logp, old_logp, adv, ref_logp, dtype, mask (f32), cu (i32), weights (f32 [S]), grad (f32 [N]), "
        "partials (f32 [S, 8]), ratio_max (f32 [S]), num_seqs, clip_low, clip_high, dual_clip, kl_coef, "
        "log_ratio_min, log_ratio_max, use_dual_clip, has_ref, kl_estimator, adv_per_seq, sequence_level, stream");
  m.def("value_loss", &value_loss,
        "values, old_values, returns, dtype, mask (f32), cu (i32), weights (f32 [S]), grad (f32 [N]), "
        "partials (f32 [S, 4]), num_seqs, clip, use_clip, stream");
  m.def("kl_penalty", &kl_penalty, "logp, ref_logp, dtype, kl (f32 [N]), grad (f32 [N]), n, estimator, stream");
});

}  // namespace
}  // namespace alignfuse
