// The fused LM-head losses' chunk kernel: a chunk of raw logits [C, V] -> each row's loss and
// statistics, and (optionally) d loss / d(raw logits). The CUDA twin of
// kernels/fused/triton_fused_loss.py; the host loop of cuBLAS GEMMs around it is
// kernels/fused/chunked.py, the Python side kernels/fused/cuda.py.
//
// One block per row, two sweeps over it:
// 1. statistics: the online softmax state of logprobs.cu (softmax_row.cuh) gives lse and
//    entropy, the target's logit gives logp (and label smoothing needs the row's logit sum);
// 2. the per-token loss and its derivatives with respect to logp and the entropy, the policy
//    loss's own per-token math (policy_token.cuh) or the cross-entropy, times the token's
//    aggregation weight w (known before the launch; 0: the token passes nothing);
// 3. (dz != nullptr) a second sweep writes d loss / d(raw logits) with logprobs.cu's
//    grad_logit, plus label smoothing's own term w eps (1[j=t] - 1/V).
// A softcap > 0 caps every logit first (softmax_row.cuh's soft_cap, Gemma-2) and chains the
// gradient through the cap.
// dz may be the logits buffer itself (same dtype): every element is read in sweep 1, and the
// target's logit before the block reductions, whose barriers order all reads before any
// write; in sweep 2 each element is read, then written, by the same thread (map_row). Both
// sweeps load 16 bytes at a time (row_sweep.cuh).
// stats [8, stride_stats] rows, by number (kernels/fused/chunk_loss.py): logp, entropy, loss,
// then for the policy loss pg, ratio, clipped, dual-clipped, kl.
#include "policy_token.cuh"
#include "reduce.cuh"
#include "registry.h"
#include "row_sweep.cuh"
#include "softmax_row.cuh"

namespace alignfuse {
namespace {

constexpr int kThreads = 256;
enum LossKind : int { kPolicy = 0, kCrossEntropy = 1 };

struct ChunkParams {
  PolicyParams policy;
  float inv_temp, entropy_coef, smoothing;
  float softcap;  // <= 0: none; else the logits are softcap * tanh(raw / softcap)
  int loss_kind, sequence_level;
};

template <typename T, typename G>
__global__ void fused_chunk_kernel(const T* z, G* dz, const int64_t* __restrict__ targets,
                                   const float* __restrict__ weights, const float* __restrict__ old_logp,
                                   const float* __restrict__ adv, const float* __restrict__ ref_logp,
                                   const float* __restrict__ seq_log_ratio, float* __restrict__ stats,
                                   int64_t V, int64_t stride_z, int64_t stride_dz, int64_t stride_stats,
                                   ChunkParams cp) {
  const int64_t row = blockIdx.x;
  const T* x = z + row * stride_z;
  const float inv_temp = cp.inv_temp;
  const bool smoothing = cp.smoothing != 0.f;

  // sweep 1: row statistics
  SoftmaxState st;
  float zsum = 0.f;
  const float cap = cp.softcap;
  sweep_row(x, V, [&](int64_t, float raw) {
    const float v = soft_cap(raw, cap) * inv_temp;
    st.add(v);
    if (smoothing) zsum += v;
  });
  const int64_t t = targets[row];
  const bool in_vocab = t >= 0 && t < V;
  const float z_target = in_vocab ? soft_cap(to_float(x[t]), cap) * inv_temp : 0.f;  // before any write
  const float M = block_max(st.m);
  float s, b;
  st.rescaled(M, s, b);
  s = block_sum(s);
  b = block_sum(b);
  if (smoothing) zsum = block_sum(zsum);
  const float log_s = logf(s);
  const float lse = M + log_s;
  const float entropy = log_s - b / s;
  const float logp = z_target - lse;

  // the per-token loss and d loss / d logp, d loss / d entropy (every thread: scalar math)
  const float w = weights[row];
  const bool live = w != 0.f;
  float loss, g_logp, g_entropy = 0.f;
  TokenLoss tok{};
  if (cp.loss_kind == kPolicy) {
    const float ref_lr = cp.policy.has_ref ? logp - ref_logp[row] : 0.f;
    const float log_ratio = cp.sequence_level ? seq_log_ratio[row] : logp - old_logp[row];
    tok = policy_token_loss(log_ratio, adv[row], ref_lr, cp.policy);
    loss = tok.loss;
    if (cp.entropy_coef != 0.f) {
      loss -= cp.entropy_coef * entropy;
      g_entropy = live ? -cp.entropy_coef * w : 0.f;
    }
    g_logp = live ? tok.grad * w : 0.f;  // select, not multiply: a NaN passes nothing
  } else {
    loss = -logp;
    // (1 - eps) (-logp_t) + eps mean_j (-log p_j), with mean_j (-log p_j) = lse - mean_j z_j
    if (smoothing) loss = (1.f - cp.smoothing) * loss + cp.smoothing * (lse - zsum / static_cast<float>(V));
    g_logp = -w;
  }
  if (threadIdx.x == 0) {
    float* out = stats + row;
    out[0] = logp;
    out[stride_stats] = entropy;
    out[2 * stride_stats] = loss;
    if (cp.loss_kind == kPolicy) {
      out[3 * stride_stats] = tok.pg;
      out[4 * stride_stats] = tok.ratio;
      out[5 * stride_stats] = tok.clipped ? 1.f : 0.f;
      out[6 * stride_stats] = tok.dual_clipped ? 1.f : 0.f;
      out[7 * stride_stats] = tok.kl;
    }
  }

  // sweep 2: d loss / d(raw logits)
  if (dz == nullptr) return;
  G* g = dz + row * stride_dz;
  const float smooth_w = w * cp.smoothing;
  const float uniform = 1.f / static_cast<float>(V);
  map_row(x, g, V, [&](int64_t j, float raw) {
    const float z = soft_cap(raw, cap);
    float d = grad_logit(z * inv_temp, lse, entropy, g_logp, g_entropy, j == t, inv_temp);
    if (smoothing) d += smooth_w * ((j == t ? 1.f : 0.f) - uniform) * inv_temp;
    return d * soft_cap_slope(z, cap);
  });
}

// dz may be 0 (statistics only); then dz_dtype is not read. Per-token inputs are float32 [C]
// (old_logp, adv, ref_logp, seq_log_ratio may be 0 where the loss does not use them).
void fused_chunk_loss(std::uintptr_t z, int z_dtype, std::uintptr_t dz, int dz_dtype, std::uintptr_t targets,
                      std::uintptr_t weights, std::uintptr_t old_logp, std::uintptr_t adv, std::uintptr_t ref_logp,
                      std::uintptr_t seq_log_ratio, std::uintptr_t stats, int64_t C, int64_t V, int64_t stride_z,
                      int64_t stride_dz, int64_t stride_stats, double temperature, float clip_low, float clip_high,
                      float dual_clip, float kl_coef, float log_ratio_min, float log_ratio_max, int use_dual_clip,
                      int has_ref, int kl_estimator, int loss_kind, int sequence_level, float entropy_coef,
                      float label_smoothing, float softcap, std::uintptr_t stream) {
  if (C > 0x7fffffffLL) throw std::invalid_argument("fused_chunk_loss: more than 2^31 - 1 rows");
  if (V < 1) throw std::invalid_argument("fused_chunk_loss: V must be >= 1");
  if (loss_kind != kPolicy && loss_kind != kCrossEntropy)
    throw std::invalid_argument("fused_chunk_loss: loss_kind must be 0 (policy) or 1 (cross-entropy)");
  if (C == 0) return;
  ChunkParams cp;
  cp.policy = PolicyParams{clip_low, clip_high, dual_clip, kl_coef, log_ratio_min, log_ratio_max,
                           use_dual_clip, has_ref, kl_estimator};
  cp.inv_temp = static_cast<float>(1.0 / temperature);
  cp.entropy_coef = loss_kind == kPolicy ? entropy_coef : 0.f;
  cp.smoothing = loss_kind == kCrossEntropy ? label_smoothing : 0.f;
  cp.softcap = softcap;
  cp.loss_kind = loss_kind;
  cp.sequence_level = sequence_level;
  auto s = as_stream(stream);
  by_float_dtype(z_dtype, "fused_chunk_loss: logits", [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto grad_tag) {
      using G = decltype(grad_tag);
      ALIGNFUSE_LAUNCH(static_cast<unsigned>(C), kThreads, s, fused_chunk_kernel<T, G>)(
          as_ptr<const T>(z), as_ptr<G>(dz), as_ptr<const int64_t>(targets), as_ptr<const float>(weights),
          as_ptr<const float>(old_logp), as_ptr<const float>(adv), as_ptr<const float>(ref_logp),
          as_ptr<const float>(seq_log_ratio), as_ptr<float>(stats), V, stride_z, stride_dz, stride_stats, cp);
    };
    if (dz == 0) {
      launch(T{});
    } else {
      by_float_dtype(dz_dtype, "fused_chunk_loss: dz", launch);
    }
  });
  check_launch("fused_chunk_loss");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("fused_chunk_loss", &fused_chunk_loss,
        "z, z_dtype, dz (0: none), dz_dtype, targets (i64 [C]), weights (f32 [C]), old_logp, adv, ref_logp, "
        "seq_log_ratio (f32 [C] or 0), stats (f32 [8, stride_stats]), C, V, stride_z, stride_dz, stride_stats, "
        "temperature, clip_low, clip_high, dual_clip, kl_coef, log_ratio_min, log_ratio_max, use_dual_clip, "
        "has_ref, kl_estimator, loss_kind (0 policy, 1 cross-entropy), sequence_level, entropy_coef, "
        "label_smoothing, softcap (<= 0: none), stream");
});

}  // namespace
}  // namespace alignfuse
