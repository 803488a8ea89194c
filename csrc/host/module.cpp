// alignfuse.engine._host: host-side (CPU) hot paths of the engine, compiled C++.
//
// Each source file in csrc/host/ adds its functions through HostRegistrar (host_registry.h),
// so a new hot path is one new file and no shared list to edit.
#include "host_registry.h"

namespace alignfuse {
std::vector<HostRegistrar::Fn>& HostRegistrar::all() {
  static std::vector<Fn> fns;
  return fns;
}
}  // namespace alignfuse

PYBIND11_MODULE(_host, m) {
  m.doc() = "alignfuse host-side C++ hot paths (packing)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["compiler"] = __VERSION__;
    info["cplusplus"] = __cplusplus;
    return info;
  });
  for (auto& fn : alignfuse::HostRegistrar::all()) fn(m);
}
