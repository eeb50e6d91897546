// _kvtier: the native half of the kvtier Python package.
#include <pybind11/pybind11.h>

#include "python/src/bindings.h"

namespace kvtier::py {
void RegisterTransport(pybind11::module_& m);  // transport_bindings.cc
}  // namespace kvtier::py

PYBIND11_MODULE(_kvtier, m) {
  m.doc() = "kvtier native engine (C++20). Use the `kvtier` package, not this module directly.";
  kvtier::py::RegisterStatus(m);
  kvtier::py::RegisterDatapath(m);
  kvtier::py::RegisterEngine(m);
  kvtier::py::RegisterCatalogue(m);
  kvtier::py::RegisterLayerwise(m);
  kvtier::py::RegisterTransport(m);
}
