// alignfuse.kernels._cuda: the compiled CUDA kernels, one op family per .cu file.
#include "registry.h"

#ifndef ALIGNFUSE_CUDA_ARCHS
#define ALIGNFUSE_CUDA_ARCHS "unknown"
#endif

namespace alignfuse {
std::vector<CudaRegistrar::Fn>& CudaRegistrar::all() {
  static std::vector<Fn> fns;
  return fns;
}
}  // namespace alignfuse

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "alignfuse CUDA kernels (raw pointers + stream; independent of the torch ABI)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["archs"] = ALIGNFUSE_CUDA_ARCHS;
    info["cuda_runtime"] = CUDART_VERSION;
    return info;
  });
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error on CPU-only machines
      return 0;
    }
    return n;
  });
  for (auto& fn : alignfuse::CudaRegistrar::all()) fn(m);
}
