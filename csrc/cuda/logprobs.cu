// Log-probs of target tokens (and entropy) from logits [N, V]: one block per row.
//
// Forward: each thread streams its share of the row once (16-byte loads, row_sweep.cuh), keeping an online
// softmax state (max m, s = sum exp(z - m), b = sum exp(z - m) (z - m)); the block then
// merges the thread states (block max, rescale, block sums). Entropy is log s - b / s,
// relative to the max, so logits of magnitude 1e4 do not cancel in fp32.
// Backward: grad_z_j = g_logp (1[j=t] - p_j) - g_entropy p_j (log p_j + entropy), times
// 1/T, from the saved lse and entropy; one more pass over the row. A softcap > 0 caps each
// logit first (cap tanh(raw / cap), Gemma-2) and chains the gradient through it.
// The grid is one block per row in grid.x (up to 2^31 - 1 rows); no atomics.
#include "reduce.cuh"
#include "registry.h"
#include "row_sweep.cuh"
#include "softmax_row.cuh"

namespace alignfuse {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                                        int64_t V, int64_t row_stride, float inv_temp, float softcap,
                                        int64_t ignore_index, float* __restrict__ logp,
                                        float* __restrict__ lse, float* __restrict__ entropy) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  SoftmaxState st;
  sweep_row(x, V, [&](int64_t, float v) { st.add(soft_cap(v, softcap) * inv_temp); });

  // Merge the thread states: rescale each to the row max, then sum.
  const float M = block_max(st.m);
  float s, b;
  st.rescaled(M, s, b);
  s = block_sum(s);
  b = block_sum(b);

  if (threadIdx.x == 0) {
    const float log_s = logf(s);
    const float row_lse = M + log_s;
    const int64_t t = targets[row];
    const bool valid = t != ignore_index && t >= 0 && t < V;
    lse[row] = row_lse;
    logp[row] = valid ? soft_cap(to_float(x[t]), softcap) * inv_temp - row_lse : 0.f;
    if (entropy != nullptr) entropy[row] = valid ? log_s - b / s : 0.f;
  }
}

// The gradient may be written in another dtype than the logits are read in (G != T): the
// LM-head path (kernels/logprobs/linear_chunked.py) reads fp32 logits and writes the bf16
// gradient its GEMMs take. Rows pass no gradient where the caller's g_* are 0 (ignored
// tokens): the kernel itself needs no ignore_index, and a target outside [0, V) matches no
// column (the LM-head path shifts targets into a vocabulary block this way). grad may be the
// logits buffer itself (G == T, row_stride == V): each element is read, then written, by
// the same thread (map_row), hence no __restrict__ on those two.
template <typename T, typename G>
__global__ void logprobs_backward_kernel(const T* logits, const int64_t* __restrict__ targets,
                                         int64_t V, int64_t row_stride, float inv_temp, float softcap,
                                         const float* __restrict__ lse, const float* __restrict__ entropy,
                                         const float* __restrict__ g_logp, const float* __restrict__ g_entropy,
                                         G* grad) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  G* g = grad + row * V;
  const int64_t t = targets[row];
  const float gl = g_logp[row];
  const float ge = (g_entropy != nullptr) ? g_entropy[row] : 0.f;
  const float H = (entropy != nullptr) ? entropy[row] : 0.f;
  const float row_lse = lse[row];
  map_row(x, g, V, [&](int64_t j, float v) {
    const float z = soft_cap(v, softcap);
    return grad_logit(z * inv_temp, row_lse, H, gl, ge, j == t, inv_temp) * soft_cap_slope(z, softcap);
  });
}

template <typename T>
void launch_forward(std::uintptr_t logits, std::uintptr_t targets, int64_t N, int64_t V, int64_t row_stride,
                    float inv_temp, float softcap, int64_t ignore_index, std::uintptr_t logp, std::uintptr_t lse,
                    std::uintptr_t entropy, cudaStream_t s) {
  ALIGNFUSE_LAUNCH(static_cast<unsigned>(N), kThreads, s, logprobs_forward_kernel<T>)(
      as_ptr<const T>(logits), as_ptr<const int64_t>(targets), V, row_stride, inv_temp, softcap, ignore_index,
      as_ptr<float>(logp), as_ptr<float>(lse), as_ptr<float>(entropy));
}

template <typename T, typename G>
void launch_backward(std::uintptr_t logits, std::uintptr_t targets, int64_t N, int64_t V, int64_t row_stride,
                     float inv_temp, float softcap, std::uintptr_t lse, std::uintptr_t entropy,
                     std::uintptr_t g_logp, std::uintptr_t g_entropy, std::uintptr_t grad, cudaStream_t s) {
  ALIGNFUSE_LAUNCH(static_cast<unsigned>(N), kThreads, s, logprobs_backward_kernel<T, G>)(
      as_ptr<const T>(logits), as_ptr<const int64_t>(targets), V, row_stride, inv_temp, softcap,
      as_ptr<const float>(lse), as_ptr<const float>(entropy), as_ptr<const float>(g_logp),
      as_ptr<const float>(g_entropy), as_ptr<G>(grad));
}

void check_sizes(const char* what, int64_t N, int64_t V) {
  if (N > 0x7fffffffLL) throw std::invalid_argument(std::string(what) + ": more than 2^31 - 1 rows");
  if (V < 1) throw std::invalid_argument(std::string(what) + ": V must be >= 1");
}

// entropy_ptr may be 0 (not wanted). targets are int64. softcap <= 0: no soft-capping.
void logprobs_forward(std::uintptr_t logits, int dtype, std::uintptr_t targets, int64_t N, int64_t V,
                      int64_t row_stride, double temperature, double softcap, int64_t ignore_index,
                      std::uintptr_t logp, std::uintptr_t lse, std::uintptr_t entropy, std::uintptr_t stream) {
  check_sizes("logprobs_forward", N, V);
  if (N == 0) return;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  auto s = as_stream(stream);
  by_float_dtype(dtype, "logprobs_forward: logits", [&](auto tag) {
    using T = decltype(tag);
    launch_forward<T>(logits, targets, N, V, row_stride, inv_temp, static_cast<float>(softcap), ignore_index,
                      logp, lse, entropy, s);
  });
  check_launch("logprobs_forward");
}

// entropy_ptr / g_entropy_ptr may be 0 (no entropy output). g_logp (and g_entropy) must be 0
// on ignored rows. grad is contiguous [N, V] in grad_dtype (float32, float16 or bfloat16,
// independently of the logits' dtype).
void logprobs_backward(std::uintptr_t logits, int dtype, std::uintptr_t targets, int64_t N, int64_t V,
                       int64_t row_stride, double temperature, double softcap, std::uintptr_t lse,
                       std::uintptr_t entropy, std::uintptr_t g_logp, std::uintptr_t g_entropy,
                       std::uintptr_t grad, int grad_dtype,
                       std::uintptr_t stream) {
  check_sizes("logprobs_backward", N, V);
  if (N == 0) return;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  auto s = as_stream(stream);
  by_float_dtype(dtype, "logprobs_backward: logits", [&](auto tag) {
    using T = decltype(tag);
    by_float_dtype(grad_dtype, "logprobs_backward: grad", [&](auto grad_tag) {
      using G = decltype(grad_tag);
      launch_backward<T, G>(logits, targets, N, V, row_stride, inv_temp, static_cast<float>(softcap), lse,
                            entropy, g_logp, g_entropy, grad, s);
    });
  });
  check_launch("logprobs_backward");
}

CudaRegistrar reg([](pybind11::module_& m) {
  m.def("logprobs_forward", &logprobs_forward,
        "logits_ptr, dtype_code, targets_ptr (int64), N, V, row_stride, temperature, softcap (<= 0: none), "
        "ignore_index, logp_ptr, lse_ptr, entropy_ptr (0: none) [all float32 N], stream");
  m.def("logprobs_backward", &logprobs_backward,
        "logits_ptr, dtype_code, targets_ptr (int64), N, V, row_stride, temperature, softcap (<= 0: none), "
        "lse_ptr, entropy_ptr (0: none), g_logp_ptr, g_entropy_ptr (0: none) [float32 N, 0 on "
        "ignored rows], grad_ptr (contiguous [N, V]), grad_dtype_code, stream");
});

}  // namespace
}  // namespace alignfuse
