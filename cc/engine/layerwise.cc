#include "cc/engine/layerwise.h"

#include <algorithm>
#include <string>
#include <utility>

#include "cc/common/thread_guard.h"
#include "cc/datapath/cpu_copy.h"

namespace kvtier {

// ---------------------------------------------------------------------------
// LayerSignal

LayerSignal::LayerSignal(int num_layers, std::chrono::milliseconds timeout)
    : ready_(static_cast<size_t>(std::max(num_layers, 0)), false),
      deadline_(std::chrono::steady_clock::now() + timeout) {}

Status LayerSignal::LayerReady(int layer) {
  if (layer < 0 || layer >= num_layers()) {
    return InvalidArgument("layer " + std::to_string(layer) + " is not one of the signal's " +
                           std::to_string(num_layers()) + " layers");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready_[static_cast<size_t>(layer)] = true;
  }
  cv_.notify_all();
  return Status::Ok();
}

void LayerSignal::AllReady() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    all_ = true;
  }
  cv_.notify_all();
}

void LayerSignal::Abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
  }
  cv_.notify_all();
}

bool LayerSignal::finished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return all_ || aborted_;
}

Status LayerSignal::WaitLayer(int layer) const {
  if (layer < 0 || layer >= num_layers()) {
    return InvalidArgument("layer " + std::to_string(layer) + " is not one of the signal's " +
                           std::to_string(num_layers()) + " layers");
  }
  std::vector<bool> taken(ready_.size(), true);
  taken[static_cast<size_t>(layer)] = false;
  StatusOr<int> got = WaitAnyLayer(&taken);
  return got.ok() ? Status::Ok() : got.status();
}

StatusOr<int> LayerSignal::WaitAnyLayer(std::vector<bool>* taken) const {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // Aborted wins over ready: the pass that failed may have written part
    // of a layer it reported, and nothing of it is stored.
    if (aborted_) return Unavailable("layer-wise store: the forward pass was aborted");
    for (size_t l = 0; l < ready_.size(); ++l) {
      if (!(*taken)[l] && (all_ || ready_[l])) {
        (*taken)[l] = true;
        return static_cast<int>(l);
      }
    }
    if (std::chrono::steady_clock::now() >= deadline_) {
      return Unavailable("layer-wise store: the forward pass did not finish its layers in time");
    }
    cv_.wait_until(lock, deadline_);
  }
}

// ---------------------------------------------------------------------------
// StoreLayerwise

StatusOr<std::shared_ptr<StoreHandle>> StoreLayerwise(Engine& engine, const PagedKvLayout& layout,
                                                      std::span<const int32_t> tokens,
                                                      std::span<const int64_t> slots, size_t skip_tokens,
                                                      std::shared_ptr<const LayerSignal> signal,
                                                      const KeyExtras* extras) {
  if (signal == nullptr) return InvalidArgument("layer-wise store without a signal");
  if (signal->num_layers() != layout.num_layers()) {
    return InvalidArgument("layer-wise store: the signal has " + std::to_string(signal->num_layers()) +
                           " layers, the layout " + std::to_string(layout.num_layers()));
  }
  if (slots.size() != tokens.size()) {
    return InvalidArgument("slot_mapping has " + std::to_string(slots.size()) + " entries for " +
                           std::to_string(tokens.size()) + " tokens; it needs one slot per token");
  }
  if (layout.device() != DeviceType::kCpu) {
    return FailedPrecondition("layer-wise store: layout (" + layout.DebugString() + ") is not on the CPU");
  }
  KVT_RETURN_IF_ERROR(CheckSlots(layout, slots));
  // The fill runs on the engine's copy threads after this call returned:
  // it owns copies of everything it reads but the paged KV.
  auto owned = std::make_shared<const std::vector<int64_t>>(slots.begin(), slots.end());
  const PagedKvLayout lay = layout;
  auto chunk_bytes = [lay](uint32_t n) { return lay.ChunkBytes(n); };
  auto fill = [lay, owned, signal](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    std::span<const int64_t> s(owned->data() + c.begin, c.num_tokens);
    KVT_RETURN_IF_ERROR(CheckNoPadding(s, c.begin));
    std::vector<bool> taken(static_cast<size_t>(lay.num_layers()), false);
    for (int copied = 0; copied < lay.num_layers(); ++copied) {
      KVT_ASSIGN_OR_RETURN(int layer, signal->WaitAnyLayer(&taken));
      KVT_RETURN_IF_ERROR(GatherCpuLayers(lay, s, dst, layer, layer + 1, 1));
    }
    return Status::Ok();
  };
  return engine.Store(tokens, skip_tokens, lay.layout_id(), chunk_bytes, std::move(fill), extras);
}

// ---------------------------------------------------------------------------
// LayerwiseLoad

Status CheckLayerwiseRequests(const PagedKvLayout& layout, std::vector<LayerwiseRequest>* requests) {
  for (size_t i = 0; i < requests->size(); ++i) {
    LayerwiseRequest& r = (*requests)[i];
    if (r.slots.size() != r.tokens.size()) {
      return InvalidArgument("request " + std::to_string(i) + ": slot_mapping has " + std::to_string(r.slots.size()) +
                             " entries for " + std::to_string(r.tokens.size()) + " tokens");
    }
    if (r.extras) KVT_RETURN_IF_ERROR(ValidateKeyExtras(&*r.extras).Annotate("request " + std::to_string(i)));
    // Tokens the destination already holds are never written.
    std::fill(r.slots.begin(), r.slots.begin() + static_cast<std::ptrdiff_t>(std::min(r.skip_tokens, r.slots.size())),
              int64_t{-1});
    KVT_RETURN_IF_ERROR(CheckSlots(layout, r.slots).Annotate("request " + std::to_string(i)));
  }
  return Status::Ok();
}

LayerwisePrefixes AcquireLayerwisePrefixes(Engine& engine, uint64_t layout_id,
                                           const std::vector<LayerwiseRequest>& requests) {
  LayerwisePrefixes out;
  out.valid.resize(requests.size());
  out.status.resize(requests.size());
  out.leases.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const LayerwiseRequest& r = requests[i];
    StatusOr<Engine::PrefixLeases> got =
        engine.AcquirePrefix(r.tokens, r.skip_tokens, layout_id, r.extras ? &*r.extras : nullptr);
    if (!got.ok()) {
      out.status[i] = got.status();
      out.valid[i] = std::min(r.skip_tokens, r.tokens.size());
      continue;
    }
    out.valid[i] = got->valid_tokens;
    out.chunks += got->chunks.size();
    out.leases[i] = std::move(*got);
  }
  return out;
}

LayerwiseLoad::LayerwiseLoad(std::shared_ptr<Engine> engine, const PagedKvLayout& layout)
    : engine_(std::move(engine)), layout_(layout) {}

StatusOr<std::unique_ptr<LayerwiseLoad>> LayerwiseLoad::Start(std::shared_ptr<Engine> engine,
                                                              const PagedKvLayout& layout,
                                                              std::vector<LayerwiseRequest> requests,
                                                              std::function<void(int layer)> test_before_layer) {
  if (engine == nullptr) return InvalidArgument("layer-wise load without an engine");
  if (layout.device() != DeviceType::kCpu) {
    return FailedPrecondition("layer-wise load: layout (" + layout.DebugString() + ") is not on the CPU");
  }
  KVT_RETURN_IF_ERROR(CheckLayerwiseRequests(layout, &requests));
  std::unique_ptr<LayerwiseLoad> load(new LayerwiseLoad(std::move(engine), layout));
  load->requests_ = std::move(requests);
  load->test_before_layer_ = std::move(test_before_layer);
  LayerwisePrefixes got = AcquireLayerwisePrefixes(*load->engine_, layout.layout_id(), load->requests_);
  load->valid_ = std::move(got.valid);
  load->request_status_ = std::move(got.status);
  load->leases_ = std::move(got.leases);
  load->chunks_ = got.chunks;
  LayerwiseLoad* raw = load.get();
  Status started = StartThread(&load->thread_, [raw] { raw->CopyLayers(); });
  if (!started.ok()) raw->CopyLayers();  // same result, on this thread
  return load;
}

void LayerwiseLoad::CopyLayers() {
  Status error;
  int layer = 0;
  for (; layer < layout_.num_layers() && error.ok(); ++layer) {
    if (test_before_layer_) test_before_layer_(layer);
    for (size_t i = 0; i < requests_.size() && error.ok(); ++i) {
      const Engine::PrefixLeases& p = leases_[i];
      for (size_t c = 0; c < p.chunks.size() && error.ok(); ++c) {
        const ChunkHash& chunk = p.chunks[c];
        std::span<const int64_t> s(requests_[i].slots.data() + chunk.begin, chunk.num_tokens);
        error = ScatterCpuLayers(layout_, s, p.leases[c].data(), layer, layer + 1, 1);
      }
    }
    if (!error.ok()) break;
    {
      std::lock_guard<std::mutex> lock(mu_);
      layers_done_ = layer + 1;
    }
    cv_.notify_all();
  }
  leases_.clear();  // the chunks are free to go once nothing reads them
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error.ok()) error_ = error.Annotate("layer-wise load, layer " + std::to_string(layer));
    finished_ = true;
  }
  cv_.notify_all();
}

size_t LayerwiseLoad::chunks() const { return chunks_; }

Status LayerwiseLoad::WaitLayer(int layer) {
  if (layer < 0 || layer >= layout_.num_layers()) {
    return InvalidArgument("layer " + std::to_string(layer) + " is not one of the layout's " +
                           std::to_string(layout_.num_layers()) + " layers");
  }
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return layers_done_ > layer || finished_; });
  if (layers_done_ > layer) return Status::Ok();
  return error_;
}

Status LayerwiseLoad::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return finished_; });
  return error_;
}

bool LayerwiseLoad::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_;
}

LayerwiseLoad::~LayerwiseLoad() {
  if (thread_.joinable()) thread_.join();
}

}  // namespace kvtier
