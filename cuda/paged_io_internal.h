// Internal to cuda/paged_io.cc and cuda/layerwise_io.cc: what the engine's
// copy threads and the layer-wise paths share of a CudaPagedIo. Not part of
// the API (no other file includes it).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "cc/common/status.h"
#include "cc/hash/chunk_hash.h"
#include "cuda/kv_copy.h"
#include "cuda/paged_io.h"

#define KVT_CUDA_RETURN(op, expr)                                  \
  do {                                                             \
    const cudaError_t kvt_e_ = (expr);                             \
    if (kvt_e_ != cudaSuccess) return CudaErrorStatus(op, kvt_e_); \
  } while (0)

namespace kvtier {

// The device layout, the CPU tier's registration and the idle staging
// lanes. Store's fill functions hold this, never the CudaPagedIo or the
// engine, so the last reference to an engine is never dropped on one of its
// own copy threads.
struct CudaPagedIo::Shared {
  explicit Shared(CudaKvLayout l) : cuda_layout(std::move(l)) {}
  ~Shared();

  // Device address of a byte inside the registered CPU tier region.
  StatusOr<std::byte*> DevicePointer(const std::byte* host) const;
  // An idle lane (or a new one) with room for `slots` slots and at least
  // `layer_events` per-layer events. Call with the layout's device current.
  StatusOr<std::unique_ptr<CudaLane>> TakeLane(size_t slots, size_t layer_events = 0);
  // Back to the idle list; the caller has synchronised the lane's stream
  // (or its last event has completed).
  void ReturnLane(std::unique_ptr<CudaLane> lane);

  // On an engine copy thread: waits (on the lane's own stream) for `ready`,
  // gathers one chunk into slab memory, and returns once the bytes are there.
  Status GatherChunk(const ChunkHash& c, std::span<const int64_t> slots, std::span<std::byte> dst,
                     CUevent_st* ready);

  CudaKvLayout cuda_layout;
  std::byte* region_host = nullptr;
  size_t region_bytes = 0;
  std::byte* region_device = nullptr;
  bool registered = false;
  std::mutex lanes_mu;
  std::vector<std::unique_ptr<CudaLane>> lanes;  // idle lanes
};

}  // namespace kvtier
