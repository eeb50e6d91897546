// Shared between the engine bindings and the paged-KV bindings that extend
// _kvtier.Engine with store_paged / retrieve_paged.
#pragma once

#include <memory>

#include <pybind11/pybind11.h>

#include "cc/engine/engine.h"

namespace kvtier::py {

struct PyEngine {
  std::shared_ptr<Engine> engine;  // null once closed
};

// Throws FailedPreconditionError when closed. Take the copy while holding
// the GIL; use it after releasing.
std::shared_ptr<Engine> EngineRef(PyEngine& e);

// Adds the paged-KV methods to the already registered _kvtier.Engine.
void RegisterPagedEngine(pybind11::module_& m);

}  // namespace kvtier::py
