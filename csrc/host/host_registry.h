// Self-registration for the _host module: a file defines
//   static alignfuse::HostRegistrar reg([](pybind11::module_& m) { m.def(...); });
// and its functions appear in alignfuse.engine._host.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <vector>

namespace alignfuse {
struct HostRegistrar {
  using Fn = void (*)(pybind11::module_&);
  static std::vector<Fn>& all();
  explicit HostRegistrar(Fn fn) { all().push_back(fn); }
};
}  // namespace alignfuse
