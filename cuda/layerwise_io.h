// Layer-wise transfer between the engine and paged KV in GPU memory: the
// CUDA side of cc/engine/layerwise.h (same ordering contract), built on
// CudaPagedIo's registration of the CPU tier and its staging lanes.
//
// Why: a forward pass computes its layers in order on one stream. A prefix
// loaded whole before the pass puts the whole copy ahead of layer 0's
// kernels; a store after the pass starts only when the last layer is done.
// Layer by layer, the load of layer l+1 runs on a stream of its own while
// layer l computes, and the store of layer l starts on the GPU as soon as
// layer l's KV is written. No host thread ever waits for the GPU here.
//
// CudaLayerSignal: which layers of one forward pass are final, as CUDA
//   events. The pass's thread calls LayerReady(l, stream) after it enqueued
//   the kernels that write layer l's KV on `stream`: an event is recorded
//   there, then the layer is reported to the host-side LayerSignal, so a
//   store learns of the event only after it was recorded. AllReady(stream)
//   records the event of every layer not yet reported (the pass is over:
//   all its work is on the stream) and reports them all; Abort() says the KV
//   will never be final. A layer's event is recorded at most once; repeats
//   are no-ops. The deadline is the host LayerSignal's.
//
// CudaStoreLayerwise: CudaPagedIo::Store whose fill, on an engine copy
//   thread, takes each layer as the signal reports it, makes its lane's
//   stream wait for that layer's event, and enqueues the gather of that
//   layer of the chunk into slab memory; it synchronises its own stream
//   once every layer is enqueued, then the engine commits the chunk.
//   Ordering contract: the paged KV of layer l is read on the GPU only after
//   the work enqueued on the pass's stream before LayerReady(l) (or
//   AllReady) has run. A chunk whose layers do not all become final (Abort,
//   deadline) is not stored: its handle reports kUnavailable. Otherwise as
//   CudaPagedIo::Store (cached chunks skipped, padding refused, the handle).
//   Cost: one copy thread per chunk being filled, held until the pass has
//   reported its last layer (host time: the pass enqueues ahead of the GPU)
//   and the gathers are done; one kernel launch per layer and chunk.
//
// CudaLayerwiseLoad: the cached prefixes of several requests, leased at
//   Start (Engine::AcquirePrefix; each request's valid_tokens is known when
//   Start returns), then enqueued at once on a lane stream: the lane waits
//   for the work already on the caller's stream (the destination blocks may
//   still be read by earlier kernels), uploads the slots, and for l = 0..L-1
//   scatters layer l of every chunk and records layer l's event.
//   WaitLayer(l, stream) makes `stream` wait for that event (no host wait):
//   kernels enqueued on `stream` afterwards see layer l's KV. Layers land in
//   order, so waiting for layer l also covers layers < l. done() polls the
//   last layer's event, Wait() blocks on it; the leases and the lane are
//   released then, and the destructor waits, so chunk memory is never
//   evicted while a kernel may still read it. Tokens before a request's
//   skip_tokens are never written.
//   Errors: Start checks every request first (kInvalidArgument, nothing is
//   enqueued). A request whose prefix cannot be acquired loads nothing
//   (valid_tokens == its skip_tokens; request_status says why); the others
//   load. A CUDA failure while enqueueing drains what was enqueued and
//   fails Start; one the GPU reports later is returned by Wait().
//
// Thread safety: every method of both classes may be called from any thread.
// A CudaLayerwiseLoad keeps its CudaPagedIo (so the engine) alive; the caller
// keeps the paged KV allocated until the load is done.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "cc/common/status.h"
#include "cc/engine/layerwise.h"
#include "cuda/paged_io.h"

namespace kvtier {

class CudaLayerSignal {
 public:
  // Events are made on `device` (the layout's). kInvalidArgument for
  // num_layers < 0; kIoError when CUDA cannot make the events.
  static StatusOr<std::shared_ptr<CudaLayerSignal>> Create(int device, int num_layers,
                                                           std::chrono::milliseconds timeout);
  ~CudaLayerSignal();
  CudaLayerSignal(const CudaLayerSignal&) = delete;
  CudaLayerSignal& operator=(const CudaLayerSignal&) = delete;

  int num_layers() const { return host_.num_layers(); }
  int device() const { return device_; }
  // kInvalidArgument for a layer outside [0, num_layers); kIoError when the
  // event cannot be recorded (the layer is then not reported: stores wait
  // for AllReady or give up at the deadline). `stream` nullptr: the legacy
  // default stream.
  Status LayerReady(int layer, CudaStream stream);
  Status AllReady(CudaStream stream);
  void Abort();
  bool finished() const { return host_.finished(); }

  // The host side: which layers have been recorded.
  const LayerSignal& host() const { return host_; }
  // Layer's event; valid to wait on once host() has reported the layer.
  CUevent_st* event(int layer) const { return events_[static_cast<size_t>(layer)]; }

 private:
  CudaLayerSignal(int device, int num_layers, std::chrono::milliseconds timeout)
      : device_(device), host_(num_layers, timeout), recorded_(static_cast<size_t>(num_layers), false) {}
  // Records layer's event on stream once; call with mu_ held.
  Status RecordLocked(int layer, CudaStream stream);

  const int device_;
  LayerSignal host_;
  std::vector<CUevent_st*> events_;  // one per layer, made in Create
  std::mutex mu_;
  std::vector<bool> recorded_;  // guarded by mu_
};

StatusOr<std::shared_ptr<StoreHandle>> CudaStoreLayerwise(CudaPagedIo& io, std::span<const int32_t> tokens,
                                                          std::span<const int64_t> slots, size_t skip_tokens,
                                                          std::shared_ptr<const CudaLayerSignal> signal,
                                                          const KeyExtras* extras = nullptr);

class CudaLayerwiseLoad {
 public:
  // `stream`: where the forward pass runs (nullptr: the legacy default stream).
  static StatusOr<std::unique_ptr<CudaLayerwiseLoad>> Start(std::shared_ptr<CudaPagedIo> io,
                                                            std::vector<LayerwiseRequest> requests,
                                                            CudaStream stream);
  ~CudaLayerwiseLoad();
  CudaLayerwiseLoad(const CudaLayerwiseLoad&) = delete;
  CudaLayerwiseLoad& operator=(const CudaLayerwiseLoad&) = delete;

  size_t num_requests() const { return valid_.size(); }
  size_t valid_tokens(size_t i) const { return valid_[i]; }
  const Status& request_status(size_t i) const { return request_status_[i]; }
  size_t chunks() const { return chunks_; }
  int num_layers() const { return num_layers_; }
  CudaStream stream() const { return stream_; }

  // Makes `stream` wait until layer `layer` of every request is in the paged
  // KV. kInvalidArgument for a layer outside [0, num_layers); kIoError when
  // CUDA refuses the wait. After done() the layer is there: OK, nothing
  // enqueued.
  Status WaitLayer(int layer, CudaStream stream);
  // True once every layer has been copied (or the copy failed: Wait says).
  bool done();
  // Blocks until every layer has been copied; kIoError if CUDA reports a
  // failure.
  Status Wait();

 private:
  CudaLayerwiseLoad() = default;
  Status Finish(bool block);

  std::shared_ptr<CudaPagedIo> io_;
  int num_layers_ = 0;
  CudaStream stream_ = nullptr;
  std::vector<size_t> valid_;
  std::vector<Status> request_status_;
  std::vector<Engine::PrefixLeases> leases_;
  size_t chunks_ = 0;
  std::mutex mu_;
  std::unique_ptr<CudaLane> lane_;  // guarded by mu_: returned when finished
  bool finished_ = true;            // guarded by mu_
  Status status_;                   // guarded by mu_
};

}  // namespace kvtier
