// Self-registration for the _cuda module: each .cu file in csrc/cuda/ defines
//   static alignfuse::CudaRegistrar reg([](pybind11::module_& m) { m.def(...); });
// so kernels of different op families live in their own files with no shared list to edit.
//
// Conventions of every entry point (see kernels/*/cuda.py for the Python side):
// - tensors arrive as raw device pointers (uintptr_t from tensor.data_ptr()), with sizes and
//   strides as plain integers, and the stream as a raw cudaStream_t handle
//   (torch.cuda.current_stream().cuda_stream). The module never links libtorch, so it does
//   not depend on the torch ABI.
// - dtype codes: see DType below; the Python side checks dtypes and contiguity.
// - errors from the launch are raised as Python RuntimeError by check_launch().
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

// Every kernel launch is written ALIGNFUSE_LAUNCH(grid, block, stream, kernel<T>)(args...), the
// launch kernel<T><<<grid, block, 0, stream>>>(args...). tests/cuda_emu defines it first, to run
// the same kernels and launchers on the host (the kernel comes last: its template arguments
// hold commas).
#ifndef ALIGNFUSE_LAUNCH
#define ALIGNFUSE_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace alignfuse {

struct CudaRegistrar {
  using Fn = void (*)(pybind11::module_&);
  static std::vector<Fn>& all();
  explicit CudaRegistrar(Fn fn) { all().push_back(fn); }
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt32 = 4, kInt64 = 5 };

// Calls launch(T{}) with T the C++ type of a floating dtype code: float, __half or
// __nv_bfloat16. `what` names the op and its argument ("logprobs_forward: logits") for the error.
template <typename Launch>
void by_float_dtype(int dtype, const char* what, Launch&& launch) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(what) + " must be float32, float16 or bfloat16");
  }
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

}  // namespace alignfuse
