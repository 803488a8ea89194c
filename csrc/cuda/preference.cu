// DPO-family and KTO losses with their local gradients in one launch (the CUDA twin of
// kernels/preference/triton_preference.py; the Python side is kernels/preference/cuda.py).
//
// One thread per row, grid-stride. Each row writes its loss, d loss / d input for the four
// (DPO) or two (KTO) log-prob inputs, and its detached rewards, so backward is a multiply in
// kernels/autograd.py and launches nothing. The formula is a runtime switch on a code that is
// the same for every thread (no divergence), in the order of dpo.py FORMULAS.
//
// Numerics: fp32 after the load. softplus(x) = max(x, 0) + log1p(exp(-|x|)) and a sigmoid
// built from exp(-|x|) never overflow, so log-ratios of +-80 and beyond stay finite and keep
// their small tails; s(x)(1 - s(x)) is computed as s(x) s(-x).
#include "reduce.cuh"
#include "registry.h"

namespace alignfuse {
namespace {

enum Formula : int {
  kSigmoid = 0, kHinge, kIpo, kExoPair, kNcaPair, kRobust, kBcoPair, kSppoHard, kApoZero,
  kApoDown, kDiscopop, kNumFormulas
};

__host__ __device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }
__host__ __device__ __forceinline__ float logsigmoid(float x) { return -softplus(-x); }
__host__ __device__ __forceinline__ float sigmoid(float x) {
  const float t = expf(-fabsf(x));
  return (x >= 0.f ? 1.f : t) / (1.f + t);
}

struct DPOParams {
  float beta, eps, tau, exo_log_eps, exo_log1m_eps;
  int formula;
  bool normalize;  // divide c and r by the completion lengths inside the loss
};

struct LossAndGrad {
  float loss, dc, dr;  // loss and its derivatives with respect to the log-ratios c and r
};

// The eleven formulas on the log-ratios c (chosen) and r (rejected); see dpo.py.
__host__ __device__ __forceinline__ LossAndGrad dpo_formula(float c, float r, float delta, const DPOParams& p) {
  const float beta = p.beta, eps = p.eps;
  const float z = beta * (c - r);
  LossAndGrad out{0.f, 0.f, 0.f};
  switch (p.formula) {
    case kSigmoid: {
      out.loss = -(1.f - eps) * logsigmoid(z) - eps * logsigmoid(-z);
      out.dc = beta * (-(1.f - eps) * sigmoid(-z) + eps * sigmoid(z));
      out.dr = -out.dc;
      break;
    }
    case kHinge: {  // relu'(0) = 0, as in torch
      out.loss = fmaxf(1.f - z, 0.f);
      out.dc = (1.f - z > 0.f) ? -beta : 0.f;
      out.dr = -out.dc;
      break;
    }
    case kIpo: {
      const float t = (c - r) - 0.5f / beta;
      out.loss = t * t;
      out.dc = 2.f * t;
      out.dr = -out.dc;
      break;
    }
    case kExoPair: {  // d/dz = p q (z - log(1-eps) + log eps), since ls(z) - ls(-z) = z
      const float pz = sigmoid(z), qz = sigmoid(-z);
      out.loss = pz * (logsigmoid(z) - p.exo_log1m_eps) + qz * (logsigmoid(-z) - p.exo_log_eps);
      out.dc = beta * pz * qz * (z - p.exo_log1m_eps + p.exo_log_eps);
      out.dr = -out.dc;
      break;
    }
    case kNcaPair: {
      const float a = beta * c, b = beta * r;
      out.loss = -logsigmoid(a) - 0.5f * logsigmoid(-a) - 0.5f * logsigmoid(-b);
      out.dc = beta * (-sigmoid(-a) + 0.5f * sigmoid(a));
      out.dr = beta * 0.5f * sigmoid(b);
      break;
    }
    case kRobust: {
      const float inv = 1.f / (1.f - 2.f * eps);
      out.loss = (-(1.f - eps) * logsigmoid(z) + eps * logsigmoid(-z)) * inv;
      out.dc = beta * (-(1.f - eps) * sigmoid(-z) - eps * sigmoid(z)) * inv;
      out.dr = -out.dc;
      break;
    }
    case kBcoPair: {  // delta is a constant
      const float a = beta * c - delta, b = beta * r - delta;
      out.loss = -logsigmoid(a) - logsigmoid(-b);
      out.dc = -beta * sigmoid(-a);
      out.dr = beta * sigmoid(b);
      break;
    }
    case kSppoHard: {
      const float tc = c - 0.5f / beta, tr = r + 0.5f / beta;
      out.loss = tc * tc + tr * tr;
      out.dc = 2.f * tc;
      out.dr = 2.f * tr;
      break;
    }
    case kApoZero: {
      const float sc = sigmoid(beta * c), sr = sigmoid(beta * r);
      out.loss = 1.f - sc + sr;
      out.dc = -beta * sc * sigmoid(-beta * c);
      out.dr = beta * sr * sigmoid(-beta * r);
      break;
    }
    case kApoDown: {
      const float sc = sigmoid(beta * c), sz = sigmoid(z);
      const float dz = -sz * sigmoid(-z);
      out.loss = sc + 1.f - sz;
      out.dc = beta * sc * sigmoid(-beta * c) + beta * dz;
      out.dr = -beta * dz;
      break;
    }
    default: {  // kDiscopop: -ls(z)(1-m) + exp(-z) m, m = s(z/tau); exp(-z) m = exp(-z + ls(z/tau))
      const float m = sigmoid(z / p.tau), one_m = sigmoid(-z / p.tau);
      const float lsz = logsigmoid(z);
      const float e = expf(-z + logsigmoid(z / p.tau));
      out.loss = -lsz * one_m + e;
      const float dz = -sigmoid(-z) * one_m - e + (e * one_m + lsz * m * one_m) / p.tau;
      out.dc = beta * dz;
      out.dr = -out.dc;
      break;
    }
  }
  return out;
}

template <typename T>
__global__ void dpo_kernel(const T* __restrict__ pc, const T* __restrict__ pr, const T* __restrict__ rc,
                           const T* __restrict__ rr, const float* __restrict__ len_c,
                           const float* __restrict__ len_r, const float* __restrict__ delta_ptr,
                           float* __restrict__ loss, float* __restrict__ g_pc, float* __restrict__ g_pr,
                           float* __restrict__ g_rc, float* __restrict__ g_rr, float* __restrict__ rew_c,
                           float* __restrict__ rew_r, int64_t S, DPOParams p) {
  const float delta = (p.formula == kBcoPair) ? delta_ptr[0] : 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < S; i += stride) {
    const float chosen = to_float(pc[i]) - to_float(rc[i]);
    const float rejected = to_float(pr[i]) - to_float(rr[i]);
    float c = chosen, r = rejected;
    if (p.normalize) {
      c = chosen / len_c[i];
      r = rejected / len_r[i];
    }
    LossAndGrad f = dpo_formula(c, r, delta, p);
    if (p.normalize) {  // chain rule through c = chosen / len
      f.dc /= len_c[i];
      f.dr /= len_r[i];
    }
    loss[i] = f.loss;
    g_pc[i] = f.dc;
    g_rc[i] = -f.dc;
    g_pr[i] = f.dr;
    g_rr[i] = -f.dr;
    rew_c[i] = p.beta * chosen;  // rewards: summed ratios, as TRL
    rew_r[i] = p.beta * rejected;
  }
}

struct KTOLossAndGrad {
  float loss, grad;  // loss and its derivative with respect to x = policy - ref
};

// KTO on the log-ratio x with reference point z0; see kto.py.
__host__ __device__ __forceinline__ KTOLossAndGrad kto_formula(float x, float z0, bool desirable, float beta,
                                                              float desirable_weight, float undesirable_weight) {
  const float a = beta * (x - z0);
  // 1 - s(a) = s(-a) and 1 - s(-a) = s(a): no cancellation
  const float s_pos = sigmoid(a), s_neg = sigmoid(-a);
  KTOLossAndGrad out;
  out.loss = desirable ? desirable_weight * s_neg : undesirable_weight * s_pos;
  out.grad = (desirable ? -desirable_weight : undesirable_weight) * beta * s_pos * s_neg;
  return out;
}

template <typename T>
__global__ void kto_kernel(const T* __restrict__ policy, const T* __restrict__ ref,
                           const uint8_t* __restrict__ desirable, const float* __restrict__ kl,
                           float* __restrict__ loss, float* __restrict__ g_policy,
                           float* __restrict__ g_ref, float* __restrict__ reward, int64_t S,
                           float beta, float desirable_weight, float undesirable_weight) {
  const float z0 = kl[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < S; i += stride) {
    const float x = to_float(policy[i]) - to_float(ref[i]);
    const KTOLossAndGrad f = kto_formula(x, z0, desirable[i] != 0, beta, desirable_weight, undesirable_weight);
    loss[i] = f.loss;
    g_policy[i] = f.grad;
    g_ref[i] = -f.grad;
    reward[i] = beta * x;
  }
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond this: no grid limit on S

inline unsigned blocks_for(int64_t S) {
  const int64_t blocks = (S + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T>
void launch_dpo(std::uintptr_t pc, std::uintptr_t pr, std::uintptr_t rc, std::uintptr_t rr,
                std::uintptr_t len_c, std::uintptr_t len_r, std::uintptr_t delta, std::uintptr_t loss,
                std::uintptr_t g_pc, std::uintptr_t g_pr, std::uintptr_t g_rc, std::uintptr_t g_rr,
                std::uintptr_t rew_c, std::uintptr_t rew_r, int64_t S, const DPOParams& p, cudaStream_t s) {
  ALIGNFUSE_LAUNCH(blocks_for(S), kThreads, s, dpo_kernel<T>)(
      as_ptr<const T>(pc), as_ptr<const T>(pr), as_ptr<const T>(rc), as_ptr<const T>(rr),
      as_ptr<const float>(len_c), as_ptr<const float>(len_r), as_ptr<const float>(delta),
      as_ptr<float>(loss), as_ptr<float>(g_pc), as_ptr<float>(g_pr), as_ptr<float>(g_rc),
      as_ptr<float>(g_rr), as_ptr<float>(rew_c), as_ptr<float>(rew_r), S, p);
}

void dpo_loss(std::uintptr_t pc, std::uintptr_t pr, std::uintptr_t rc, std::uintptr_t rr, int dtype,
              std::uintptr_t len_c, std::uintptr_t len_r, std::uintptr_t delta, std::uintptr_t loss,
              std::uintptr_t g_pc, std::uintptr_t g_pr, std::uintptr_t g_rc, std::uintptr_t g_rr,
              std::uintptr_t rew_c, std::uintptr_t rew_r, int64_t S, float beta, float eps, float tau,
              float exo_log_eps, float exo_log1m_eps, int formula, int normalize, std::uintptr_t stream) {
  if (formula < 0 || formula >= kNumFormulas) throw std::invalid_argument("dpo_loss: unknown formula code");
  if (S == 0) return;
  const DPOParams p{beta, eps, tau, exo_log_eps, exo_log1m_eps, formula, normalize != 0};
  auto s = as_stream(stream);
  by_float_dtype(dtype, "dpo_loss: log-probs", [&](auto tag) {
    using T = decltype(tag);
    launch_dpo<T>(pc, pr, rc, rr, len_c, len_r, delta, loss, g_pc, g_pr, g_rc, g_rr, rew_c, rew_r, S, p, s);
  });
  check_launch("dpo_loss");
}

template <typename T>
void launch_kto(std::uintptr_t policy, std::uintptr_t ref, std::uintptr_t desirable, std::uintptr_t kl,
                std::uintptr_t loss, std::uintptr_t g_policy, std::uintptr_t g_ref, std::uintptr_t reward,
                int64_t S, float beta, float wd, float wu, cudaStream_t s) {
  ALIGNFUSE_LAUNCH(blocks_for(S), kThreads, s, kto_kernel<T>)(
      as_ptr<const T>(policy), as_ptr<const T>(ref), as_ptr<const uint8_t>(desirable),
      as_ptr<const float>(kl), as_ptr<float>(loss), as_ptr<float>(g_policy), as_ptr<float>(g_ref),
      as_ptr<float>(reward), S, beta, wd, wu);
}

void kto_loss(std::uintptr_t policy, std::uintptr_t ref, int dtype, std::uintptr_t desirable,
              std::uintptr_t kl, std::uintptr_t loss, std::uintptr_t g_policy, std::uintptr_t g_ref,
              std::uintptr_t reward, int64_t S, float beta, float desirable_weight,
              float undesirable_weight, std::uintptr_t stream) {
  if (S == 0) return;
  auto s = as_stream(stream);
  by_float_dtype(dtype, "kto_loss: log-probs", [&](auto tag) {
    using T = decltype(tag);
    launch_kto<T>(policy, ref, desirable, kl, loss, g_policy, g_ref, reward, S, beta, desirable_weight,
                  undesirable_weight, s);
  });
  check_launch("kto_loss");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("dpo_loss", &dpo_loss,
        "pc, pr, rc, rr (one dtype), dtype_code, len_c, len_r (float32), delta (float32 [1]), "
        "loss, g_pc, g_pr, g_rc, g_rr, rew_c, rew_r (float32 [S]), S, beta, eps, tau, "
        "exo_log_eps, exo_log1m_eps, formula_code, normalize (0/1), stream");
  m.def("kto_loss", &kto_loss,
        "policy, ref (one dtype), dtype_code, desirable (uint8), kl (float32 [1]), loss, "
        "g_policy, g_ref, reward (float32 [S]), S, beta, desirable_weight, undesirable_weight, stream");
});

}  // namespace
}  // namespace alignfuse
