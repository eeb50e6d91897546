// The Python-side paged KV layout, shared with the engine bindings (which
// gather/scatter through it on store_paged / retrieve_paged).
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <memory>
#include <string>

#include "cc/common/status.h"
#include "cc/datapath/kv_layout.h"

namespace kvtier::py {

// A layout plus the Python objects that own its memory. Immutable after
// construction; held by shared_ptr so a store in flight keeps it alive.
struct __attribute__((visibility("hidden"))) PyLayout {  // pybind11 objects are hidden too
  PagedKvLayout layout;
  pybind11::list owners;
  // A memoryview of each buffer-protocol owner: the export pins its memory
  // (a bytearray or numpy array cannot be resized or reallocated while it
  // is exported), so the layout's raw pointers stay valid. Torch tensors are
  // kept by `owners` alone.
  pybind11::list exports;
  // CUDA builds: the layout's device-side table (a CudaKvLayout), made on
  // the first module-level gather/scatter of a CUDA layout. GIL-guarded.
  std::shared_ptr<void> cuda_layout;
};

// A C-contiguous CPU byte range of a torch tensor or a Python buffer.
// For a buffer the export is held by `held` for as long as this lives, so
// the exporter cannot resize or free the memory while a copy runs without
// the GIL (bytearray and numpy raise BufferError instead). A torch tensor is
// kept alive by the caller's reference. Create and destroy with the GIL.
struct __attribute__((visibility("hidden"))) Bytes {
  std::byte* data = nullptr;
  size_t size = 0;
  std::string dtype;  // "int64" etc., for checks by the caller
  std::shared_ptr<pybind11::buffer_info> held;
};

// kInvalidArgument, naming `what`, for anything but a C-contiguous CPU
// tensor or buffer (a strided or reversed view is refused: its bytes are
// not the `size` bytes at `data`), or a read-only buffer when writable.
StatusOr<Bytes> BytesOf(const pybind11::handle& o, bool writable, const std::string& what);

}  // namespace kvtier::py
