// The Python-side paged KV layout, shared with the engine bindings (which
// gather/scatter through it on store_paged / retrieve_paged).
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "cc/datapath/kv_layout.h"

namespace kvtier::py {

// A layout plus the Python objects that own its memory. Immutable after
// construction; held by shared_ptr so a store in flight keeps it alive.
struct __attribute__((visibility("hidden"))) PyLayout {  // pybind11 objects are hidden too
  PagedKvLayout layout;
  pybind11::list owners;
  // CUDA builds: the layout's device-side table (a CudaKvLayout), made on
  // the first module-level gather/scatter of a CUDA layout. GIL-guarded.
  std::shared_ptr<void> cuda_layout;
};

}  // namespace kvtier::py
