// Layer-wise transfer between the engine and paged KV on a CPU device.
//
// Why: a forward pass computes its layers in order. A prefix loaded whole
// before the pass, or stored whole after it, puts the whole copy on the
// critical path. Layer by layer, the load of layer l+1 runs while layer l
// computes, and the store of layer l starts as soon as its KV is written.
// The chunk buffer format is layer-major (cc/datapath/kv_layout.h), so a
// layer of a chunk is one contiguous slice of its slab memory: no staging.
//
// LayerSignal: which layers of one forward pass are final.
//   The pass's thread calls LayerReady(l) after layer l's KV is written, and
//   AllReady() once the pass is over (every layer is then final, also one
//   that never got a LayerReady: the order of calls does not matter, nor do
//   repeats). Abort() says the KV will never be final (the pass failed):
//   stores waiting on the signal give up. A wait also gives up at the
//   signal's deadline (measured from its creation), so a pass that ends
//   without AllReady never holds a copy thread longer than that.
//
// StoreLayerwise: Engine::Store whose fill copies each layer of a chunk into
//   slab memory once the signal says the layer is final, in the order the
//   layers become final. Ordering contract: the paged KV of layer l is read
//   only after LayerReady(l) or AllReady() returned on the pass's thread
//   (the signal's mutex orders them). A chunk whose layers do not all become
//   final (Abort, deadline) is not stored: its handle reports kUnavailable
//   (the message says which) and the catalogue never lists it. Otherwise exactly
//   Engine::Store (skipping cached chunks, skip_tokens, the handle). Padding
//   slots (< 0) in a stored chunk are kInvalidArgument, as for store_paged.
//   Cost: a waiting store occupies one of the engine's copy threads per
//   chunk it is filling, so other stores queue behind it until the pass
//   ends (bounded by the deadline).
//
// LayerwiseLoad: the cached prefixes of several requests, leased at Start
//   (Engine::AcquirePrefix: pinned in the CPU tier, promoted from disk on
//   the caller's thread), so each request's valid_tokens is known when Start
//   returns, then scattered into the paged KV layer by layer, layers in
//   order 0..L-1, on a thread of the load's own. WaitLayer(l) returns once
//   layer l of every request is in the paged KV (the copy happens-before the
//   return). The leases are dropped once the last layer is copied. Tokens
//   before a request's skip_tokens are never written.
//   Errors: Start checks every slot first (kInvalidArgument, nothing moves).
//   A request whose prefix cannot be acquired (Engine error) loads nothing
//   (valid_tokens == its skip_tokens) and its status says why; the others
//   load. A scatter that fails later (not expected: arguments were checked)
//   stops the load: WaitLayer of that layer and later ones returns the
//   error and the caller must treat every request's tokens beyond skip as
//   not loaded. When the system refuses a thread, Start copies every layer
//   itself before returning (slower, same result).
//   The destructor waits for the copy thread: the paged KV and the engine
//   must outlive the load (the load keeps the engine alive; the caller keeps
//   the KV tensors).
//
// Thread safety: LayerSignal's methods may be called from any thread. A
// LayerwiseLoad's methods may be called from any thread, WaitLayer
// concurrently.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "cc/common/status.h"
#include "cc/datapath/kv_layout.h"
#include "cc/engine/engine.h"

namespace kvtier {

class LayerSignal {
 public:
  LayerSignal(int num_layers, std::chrono::milliseconds timeout);

  int num_layers() const { return static_cast<int>(ready_.size()); }
  // kInvalidArgument for a layer outside [0, num_layers).
  Status LayerReady(int layer);
  void AllReady();
  void Abort();
  // True once AllReady or Abort was called.
  bool finished() const;

  // Blocks until layer is final (OK), or kUnavailable once the signal is
  // aborted or its deadline has passed (the message says which).
  Status WaitLayer(int layer) const;
  // Blocks until some layer not yet in *taken is final; marks it taken and
  // returns it, or an error as WaitLayer. *taken has num_layers entries.
  StatusOr<int> WaitAnyLayer(std::vector<bool>* taken) const;

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::vector<bool> ready_;  // guarded by mu_
  bool all_ = false;         // guarded by mu_
  bool aborted_ = false;     // guarded by mu_
  const std::chrono::steady_clock::time_point deadline_;
};

StatusOr<std::shared_ptr<StoreHandle>> StoreLayerwise(Engine& engine, const PagedKvLayout& layout,
                                                      std::span<const int32_t> tokens,
                                                      std::span<const int64_t> slots, size_t skip_tokens,
                                                      std::shared_ptr<const LayerSignal> signal,
                                                      const KeyExtras* extras = nullptr);

struct LayerwiseRequest {
  std::vector<int32_t> tokens;
  std::vector<int64_t> slots;  // one per token
  size_t skip_tokens = 0;
  std::optional<KeyExtras> extras;
};

// The start of a layer-wise load, shared with its CUDA counterpart
// (cuda/layerwise_io.h). CheckLayerwiseRequests checks every request before
// anything is leased (kInvalidArgument naming the request: slots per token,
// extras, slot range) and sets the slots of tokens before skip_tokens to -1
// (never written). AcquireLayerwisePrefixes then leases each request's
// cached prefix; a request whose prefix cannot be acquired loads nothing
// (valid == its skip_tokens, capped at its length; status says why).
Status CheckLayerwiseRequests(const PagedKvLayout& layout, std::vector<LayerwiseRequest>* requests);

struct LayerwisePrefixes {
  std::vector<size_t> valid;          // per request
  std::vector<Status> status;         // per request
  std::vector<Engine::PrefixLeases> leases;  // per request
  size_t chunks = 0;                  // leased, over every request
};
LayerwisePrefixes AcquireLayerwisePrefixes(Engine& engine, uint64_t layout_id,
                                           const std::vector<LayerwiseRequest>& requests);

class LayerwiseLoad {
 public:
  // test_before_layer (tests only): called on the copy thread before each
  // layer is copied, so a test can hold the copy between layers.
  static StatusOr<std::unique_ptr<LayerwiseLoad>> Start(std::shared_ptr<Engine> engine, const PagedKvLayout& layout,
                                                        std::vector<LayerwiseRequest> requests,
                                                        std::function<void(int layer)> test_before_layer = nullptr);
  ~LayerwiseLoad();
  LayerwiseLoad(const LayerwiseLoad&) = delete;
  LayerwiseLoad& operator=(const LayerwiseLoad&) = delete;

  size_t num_requests() const { return requests_.size(); }
  // Leading tokens of request i whose KV is valid in the paged KV once every
  // layer is loaded (as Engine::Retrieve returns).
  size_t valid_tokens(size_t i) const { return valid_[i]; }
  // Why request i loaded nothing, when its prefix could not be acquired.
  const Status& request_status(size_t i) const { return request_status_[i]; }
  size_t chunks() const;

  // kInvalidArgument for a layer outside [0, num_layers).
  Status WaitLayer(int layer);
  // Every layer (then the leases are gone).
  Status Wait();
  bool done() const;

 private:
  LayerwiseLoad(std::shared_ptr<Engine> engine, const PagedKvLayout& layout);
  void CopyLayers();

  const std::shared_ptr<Engine> engine_;
  const PagedKvLayout layout_;
  std::vector<LayerwiseRequest> requests_;
  std::vector<size_t> valid_;
  std::vector<Status> request_status_;
  std::vector<Engine::PrefixLeases> leases_;  // dropped by the copy thread when done
  size_t chunks_ = 0;
  std::function<void(int)> test_before_layer_;

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  int layers_done_ = 0;  // guarded by mu_
  Status error_;         // guarded by mu_; set once, stops the copy
  bool finished_ = false;  // guarded by mu_: every layer copied or error_ set
  std::thread thread_;
};

}  // namespace kvtier
