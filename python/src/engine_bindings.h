// Shared between the engine bindings and the paged-KV bindings that extend
// _kvtier.Engine with store_paged / retrieve_paged.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>

#include "cc/engine/engine.h"

namespace kvtier::py {

struct PyLayout;

struct __attribute__((visibility("hidden"))) PyEngine {
  std::shared_ptr<Engine> engine;  // null once closed
  // CUDA data paths made for this engine, one per layout (a CudaPagedIo
  // behind void, so this header needs no CUDA). The PyLayout keeps the KV
  // tensors alive for as long as the data path may copy them. GIL-guarded.
  std::vector<std::pair<std::shared_ptr<PyLayout>, std::shared_ptr<void>>> cuda_io;

  // Collected without close(): finish the stores that read those tensors
  // before the members (cuda_io first) are destroyed.
  ~PyEngine() {
    if (engine != nullptr && !cuda_io.empty()) engine->Flush();
  }
};

// Drops the CUDA data paths (needs the GIL; the engine must be drained).
void DropCudaIo(PyEngine& e);

// Throws FailedPreconditionError when closed. Take the copy while holding
// the GIL; use it after releasing.
std::shared_ptr<Engine> EngineRef(PyEngine& e);

// Adds the paged-KV methods to the already registered _kvtier.Engine.
void RegisterPagedEngine(pybind11::module_& m);

}  // namespace kvtier::py
