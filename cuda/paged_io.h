// CudaPagedIo: the engine's store and retrieve for paged KV that lives in GPU
// memory. The GPU half of what python/src/paged_engine_bindings.cc does with
// the CPU reference, usable from C++ servers with no Python.
//
// Data path
//   The engine's CPU tier memory (one MemoryRegion) is registered with CUDA
//   once (cudaHostRegister, mapped + portable), so the kernels of kv_copy.h
//   write gathered chunks straight into slab memory and read chunks to
//   scatter straight out of it: one copy each way, no staging buffer.
//
// Store (asynchronous; never blocks the caller)
//   Store() records an event on the caller's stream (the KV is final once
//   the work queued there so far has run) and hands the chunks to the
//   engine's copy threads. Each copy thread takes a lane (its own stream,
//   pinned + device slot buffers), makes its stream wait for that event,
//   uploads the chunk's slots, gathers into the chunk's write lease, and
//   synchronises its own stream before the engine commits the chunk. The
//   caller's stream and thread never wait.
//
// Retrieve (asynchronous on the caller's stream)
//   Retrieve() leases the cached prefix (Engine::AcquirePrefix: the chunks
//   are pinned in the CPU tier), uploads the slot mapping on the caller's
//   stream, scatters every chunk (64 chunks per launch) on that stream and
//   records an event. Work queued on the stream afterwards (the forward
//   pass) sees the KV. The returned CudaLoad holds the leases until the
//   event has completed: done() polls it, Wait() blocks on it, and the
//   destructor waits, so chunk memory is never evicted or reused while a
//   kernel may still read it.
//
// Contract
// - Slots are host memory (the connector computes them from block ids) and
//   are checked on the host (CheckSlots) before anything is enqueued:
//   out-of-range slots are kInvalidArgument and nothing is copied. slot < 0
//   is padding: skipped on retrieve, refused on store (only computed tokens
//   are stored). Tokens before skip_tokens are never written on retrieve.
// - The paged KV must stay allocated and, for a store, unmodified until its
//   StoreHandle is done; for a retrieve, until the caller's stream has passed
//   the CudaLoad's event (or Wait() returned).
// - Errors: kFailedPrecondition when no CUDA device is usable, the layout is
//   not on a CUDA device or the engine has no CPU tier yet; kInvalidArgument
//   for token/slot mismatches and bad slots; kIoError for CUDA runtime
//   failures (the message names the call and the CUDA error).
// - The calling thread's current CUDA device is the same on return (the
//   layout's device is made current only inside the calls).
// - Registration is reference counted per region (several layouts of one
//   engine share it) and undone when the last CudaPagedIo goes.
// - Thread safety: Store and Retrieve may be called from any thread, also
//   concurrently. A CudaPagedIo keeps its engine alive (shared_ptr); a
//   CudaLoad keeps its CudaPagedIo alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "cc/common/status.h"
#include "cc/datapath/kv_layout.h"
#include "cc/engine/engine.h"
#include "cuda/kv_copy.h"

struct CUevent_st;

namespace kvtier {

class CudaPagedIo;
class CudaLayerSignal;

// Slot staging for one copy in flight: a stream and an event of its own, a
// pinned host buffer and a device buffer (grown on demand, then reused), and
// for layer-wise loads one event per layer (made on first use, then reused).
struct CudaLane {
  CudaStream stream = nullptr;
  CUevent_st* event = nullptr;
  std::vector<CUevent_st*> layer_events;
  int64_t* host_slots = nullptr;
  int64_t* dev_slots = nullptr;
  size_t capacity = 0;  // slots
  CudaLane() = default;
  CudaLane(const CudaLane&) = delete;
  CudaLane& operator=(const CudaLane&) = delete;
  ~CudaLane();
};

// One retrieve in flight. Destruction waits for completion.
class CudaLoad {
 public:
  ~CudaLoad();
  CudaLoad(const CudaLoad&) = delete;
  CudaLoad& operator=(const CudaLoad&) = delete;

  // Leading tokens valid at the destination once the copy is complete.
  size_t valid_tokens() const { return valid_tokens_; }
  size_t chunks() const { return chunks_; }
  // The event recorded after the last copy, for cudaStreamWaitEvent on
  // another stream; nullptr when nothing was enqueued. Valid only until
  // done() or Wait() has returned (the event is then reused).
  CUevent_st* event() const { return event_; }
  // True once the copy has completed (the leases are then released). A
  // failed copy is done too: Wait() says how it ended.
  bool done();
  // Blocks until the copy has completed; kIoError if CUDA reports a failure.
  Status Wait();

 private:
  friend class CudaPagedIo;
  CudaLoad() = default;
  Status Finish(bool block);

  std::shared_ptr<CudaPagedIo> io_;  // keeps the engine (and its CPU tier) alive for the leases
  std::unique_ptr<CudaLane> lane_;
  CUevent_st* event_ = nullptr;
  Engine::PrefixLeases prefix_;
  size_t valid_tokens_ = 0;
  size_t chunks_ = 0;
  std::mutex mu_;
  bool finished_ = true;  // guarded by mu_
  Status status_;         // guarded by mu_
};

class CudaPagedIo : public std::enable_shared_from_this<CudaPagedIo> {
 public:
  static StatusOr<std::shared_ptr<CudaPagedIo>> Create(std::shared_ptr<Engine> engine,
                                                       const PagedKvLayout& layout);
  ~CudaPagedIo();
  CudaPagedIo(const CudaPagedIo&) = delete;
  CudaPagedIo& operator=(const CudaPagedIo&) = delete;

  const PagedKvLayout& layout() const;

  // Files the uncached chunks of tokens (those ending after skip_tokens).
  // slots[i] is token i's slot in the paged KV; `stream` is where the KV
  // was produced (nullptr: the legacy default stream). extras: the request's
  // identity beyond token ids, as in Engine (nullptr: none).
  StatusOr<std::shared_ptr<StoreHandle>> Store(std::span<const int32_t> tokens,
                                               std::span<const int64_t> slots, size_t skip_tokens,
                                               CudaStream stream, const KeyExtras* extras = nullptr);

  // Enqueues the load of the cached prefix beyond skip_tokens on `stream`.
  StatusOr<std::unique_ptr<CudaLoad>> Retrieve(std::span<const int32_t> tokens,
                                               std::span<const int64_t> slots, size_t skip_tokens,
                                               CudaStream stream, const KeyExtras* extras = nullptr);

  // Device address of a byte inside the registered CPU tier region.
  StatusOr<std::byte*> DevicePointer(const std::byte* host) const;

  // What the engine's copy threads use: the device layout, the registration
  // and the staging lanes (cuda/paged_io_internal.h). Store's fill functions
  // hold this, never the CudaPagedIo or the engine, so the last reference to
  // an engine is never dropped on one of its own threads.
  struct Shared;

 private:
  friend class CudaLoad;
  // Layer-wise transfer (cuda/layerwise_io.h) uses the same lanes.
  friend class CudaLayerwiseLoad;
  friend StatusOr<std::shared_ptr<StoreHandle>> CudaStoreLayerwise(CudaPagedIo&, std::span<const int32_t>,
                                                                   std::span<const int64_t>, size_t,
                                                                   std::shared_ptr<const CudaLayerSignal>,
                                                                   const KeyExtras*);
  CudaPagedIo(std::shared_ptr<Engine> engine, std::shared_ptr<Shared> shared)
      : engine_(std::move(engine)), shared_(std::move(shared)) {}

  std::shared_ptr<Engine> engine_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace kvtier
