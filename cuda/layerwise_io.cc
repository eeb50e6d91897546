#include "cuda/layerwise_io.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "cuda/paged_io_internal.h"

namespace kvtier {

// ---------------------------------------------------------------------------
// CudaLayerSignal

StatusOr<std::shared_ptr<CudaLayerSignal>> CudaLayerSignal::Create(int device, int num_layers,
                                                                   std::chrono::milliseconds timeout) {
  if (num_layers < 0) return InvalidArgument("num_layers must be >= 0");
  CudaDeviceGuard guard(device);
  KVT_RETURN_IF_ERROR(guard.status());
  std::shared_ptr<CudaLayerSignal> s(new CudaLayerSignal(device, num_layers, timeout));
  s->events_.reserve(static_cast<size_t>(num_layers));
  for (int i = 0; i < num_layers; ++i) {
    cudaEvent_t e = nullptr;
    KVT_CUDA_RETURN("cudaEventCreateWithFlags(layer)", cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    s->events_.push_back(e);  // destroyed by ~CudaLayerSignal, also on a later failure
  }
  return s;
}

CudaLayerSignal::~CudaLayerSignal() {
  // Safe with waits still pending on the GPU: CUDA releases an event once
  // the work it marks has completed.
  for (CUevent_st* e : events_) cudaEventDestroy(e);
}

Status CudaLayerSignal::RecordLocked(int layer, CudaStream stream) {
  if (recorded_[static_cast<size_t>(layer)]) return Status::Ok();
  KVT_CUDA_RETURN("cudaEventRecord(layer " + std::to_string(layer) + ")",
                  cudaEventRecord(events_[static_cast<size_t>(layer)], stream));
  recorded_[static_cast<size_t>(layer)] = true;
  return Status::Ok();
}

Status CudaLayerSignal::LayerReady(int layer, CudaStream stream) {
  if (layer < 0 || layer >= num_layers()) {
    return InvalidArgument("layer " + std::to_string(layer) + " is not one of the signal's " +
                           std::to_string(num_layers()) + " layers");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    CudaDeviceGuard guard(device_);
    KVT_RETURN_IF_ERROR(guard.status());
    KVT_RETURN_IF_ERROR(RecordLocked(layer, stream));
  }
  // After the record: a store that learns of the layer waits on this event.
  return host_.LayerReady(layer);
}

Status CudaLayerSignal::AllReady(CudaStream stream) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    CudaDeviceGuard guard(device_);
    KVT_RETURN_IF_ERROR(guard.status());
    for (int l = 0; l < num_layers(); ++l) KVT_RETURN_IF_ERROR(RecordLocked(l, stream));
  }
  host_.AllReady();
  return Status::Ok();
}

void CudaLayerSignal::Abort() { host_.Abort(); }

// ---------------------------------------------------------------------------
// CudaStoreLayerwise

namespace {

// On an engine copy thread: one chunk, layer by layer as the signal reports
// them, on a lane of its own; returns once the bytes are in slab memory.
Status GatherChunkLayerwise(CudaPagedIo::Shared& shared, const ChunkHash& c, std::span<const int64_t> slots,
                            std::span<std::byte> dst, const CudaLayerSignal& signal) {
  KVT_RETURN_IF_ERROR(CheckNoPadding(slots, c.begin));
  KVT_ASSIGN_OR_RETURN(std::byte * dev_dst, shared.DevicePointer(dst.data()));
  CudaDeviceGuard device(shared.cuda_layout.layout().device_index());
  KVT_RETURN_IF_ERROR(device.status());
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<CudaLane> lane, shared.TakeLane(slots.size()));
  std::memcpy(lane->host_slots, slots.data(), slots.size_bytes());
  const int layers = signal.num_layers();
  Status s = [&]() -> Status {
    KVT_CUDA_RETURN("cudaMemcpyAsync(slots)",
                    cudaMemcpyAsync(lane->dev_slots, lane->host_slots, slots.size_bytes(),
                                    cudaMemcpyHostToDevice, lane->stream));
    const ChunkCopy copy{lane->dev_slots, static_cast<int64_t>(slots.size()), dev_dst, dst.size()};
    std::vector<bool> taken(static_cast<size_t>(layers), false);
    for (int copied = 0; copied < layers; ++copied) {
      KVT_ASSIGN_OR_RETURN(int layer, signal.host().WaitAnyLayer(&taken));
      KVT_CUDA_RETURN("cudaStreamWaitEvent(layer)", cudaStreamWaitEvent(lane->stream, signal.event(layer), 0));
      KVT_RETURN_IF_ERROR(GatherCudaLayers(shared.cuda_layout, std::span<const ChunkCopy>(&copy, 1), layer,
                                           layer + 1, lane->stream));
    }
    KVT_CUDA_RETURN("cudaStreamSynchronize", cudaStreamSynchronize(lane->stream));
    return Status::Ok();
  }();
  if (!s.ok()) {
    // An aborted pass or a CUDA error: what was enqueued finishes before the
    // lane's buffers (and this chunk's slab memory) are reused.
    cudaStreamSynchronize(lane->stream);
    cudaGetLastError();
  }
  shared.ReturnLane(std::move(lane));
  return s;
}

}  // namespace

StatusOr<std::shared_ptr<StoreHandle>> CudaStoreLayerwise(CudaPagedIo& io, std::span<const int32_t> tokens,
                                                          std::span<const int64_t> slots, size_t skip_tokens,
                                                          std::shared_ptr<const CudaLayerSignal> signal,
                                                          const KeyExtras* extras) {
  const PagedKvLayout& lay = io.layout();
  if (signal == nullptr) return InvalidArgument("layer-wise store without a signal");
  if (signal->num_layers() != lay.num_layers()) {
    return InvalidArgument("layer-wise store: the signal has " + std::to_string(signal->num_layers()) +
                           " layers, the layout " + std::to_string(lay.num_layers()));
  }
  if (signal->device() != lay.device_index()) {
    return InvalidArgument("layer-wise store: the signal's events are on device " + std::to_string(signal->device()) +
                           ", the layout on device " + std::to_string(lay.device_index()));
  }
  if (slots.size() != tokens.size()) {
    return InvalidArgument("slot_mapping has " + std::to_string(slots.size()) + " entries for " +
                           std::to_string(tokens.size()) + " tokens; it needs one slot per token");
  }
  KVT_RETURN_IF_ERROR(CheckSlots(lay, slots));
  auto owned = std::make_shared<const std::vector<int64_t>>(slots.begin(), slots.end());
  auto chunk_bytes = [lay](uint32_t n) { return lay.ChunkBytes(n); };
  // Holds Shared, not the CudaPagedIo (see CudaPagedIo::Shared).
  auto fill = [shared = io.shared_, owned, signal](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    std::span<const int64_t> s(owned->data() + c.begin, c.num_tokens);
    return GatherChunkLayerwise(*shared, c, s, dst, *signal);
  };
  return io.engine_->Store(tokens, skip_tokens, lay.layout_id(), chunk_bytes, std::move(fill), extras);
}

// ---------------------------------------------------------------------------
// CudaLayerwiseLoad

StatusOr<std::unique_ptr<CudaLayerwiseLoad>> CudaLayerwiseLoad::Start(std::shared_ptr<CudaPagedIo> io,
                                                                      std::vector<LayerwiseRequest> requests,
                                                                      CudaStream stream) {
  if (io == nullptr) return InvalidArgument("layer-wise load without a CudaPagedIo");
  const PagedKvLayout& lay = io->layout();
  KVT_RETURN_IF_ERROR(CheckLayerwiseRequests(lay, &requests));
  if (lay.num_layers() < 1) return InvalidArgument("layer-wise load: the layout has no layers");
  size_t total_slots = 0;
  for (const LayerwiseRequest& r : requests) total_slots += r.slots.size();
  std::unique_ptr<CudaLayerwiseLoad> load(new CudaLayerwiseLoad());
  load->io_ = io;
  load->num_layers_ = lay.num_layers();
  load->stream_ = stream;
  LayerwisePrefixes got = AcquireLayerwisePrefixes(*io->engine_, lay.layout_id(), requests);
  load->valid_ = std::move(got.valid);
  load->request_status_ = std::move(got.status);
  load->leases_ = std::move(got.leases);
  load->chunks_ = got.chunks;
  const size_t n = requests.size();
  if (load->chunks_ == 0) {
    load->leases_.clear();
    return load;  // nothing to copy, nothing in flight: done
  }

  CudaPagedIo::Shared& shared = *io->shared_;
  CudaDeviceGuard device(lay.device_index());
  KVT_RETURN_IF_ERROR(device.status());
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<CudaLane> lane,
                       shared.TakeLane(total_slots, static_cast<size_t>(load->num_layers_)));
  std::vector<ChunkCopy> copies;
  copies.reserve(load->chunks_);
  size_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    const LayerwiseRequest& r = requests[i];
    std::copy(r.slots.begin(), r.slots.end(), lane->host_slots + offset);
    const Engine::PrefixLeases& p = load->leases_[i];
    for (size_t c = 0; c < p.chunks.size(); ++c) {
      std::span<const std::byte> src = p.leases[c].data();
      StatusOr<std::byte*> dev_src = shared.DevicePointer(src.data());
      if (!dev_src.ok()) {
        shared.ReturnLane(std::move(lane));  // nothing enqueued on it yet
        return dev_src.status();
      }
      copies.push_back(ChunkCopy{lane->dev_slots + offset + p.chunks[c].begin, p.chunks[c].num_tokens, *dev_src,
                                 src.size()});
    }
    offset += r.slots.size();
  }
  Status s = [&]() -> Status {
    // The destination blocks may still be read by kernels already on the
    // caller's stream (a request that held them before): start after them.
    KVT_CUDA_RETURN("cudaEventRecord(start)", cudaEventRecord(lane->event, stream));
    KVT_CUDA_RETURN("cudaStreamWaitEvent(start)", cudaStreamWaitEvent(lane->stream, lane->event, 0));
    KVT_CUDA_RETURN("cudaMemcpyAsync(slots)",
                    cudaMemcpyAsync(lane->dev_slots, lane->host_slots, total_slots * sizeof(int64_t),
                                    cudaMemcpyHostToDevice, lane->stream));
    for (int l = 0; l < load->num_layers_; ++l) {
      KVT_RETURN_IF_ERROR(ScatterCudaLayers(shared.cuda_layout, copies, l, l + 1, lane->stream));
      KVT_CUDA_RETURN("cudaEventRecord(layer)",
                      cudaEventRecord(lane->layer_events[static_cast<size_t>(l)], lane->stream));
    }
    return Status::Ok();
  }();
  if (!s.ok()) {
    // Nothing of the load is visible to the caller: drain, then let go.
    cudaStreamSynchronize(lane->stream);
    cudaGetLastError();
    shared.ReturnLane(std::move(lane));
    return s;
  }
  std::lock_guard<std::mutex> lock(load->mu_);
  load->lane_ = std::move(lane);
  load->finished_ = false;
  return load;
}

Status CudaLayerwiseLoad::WaitLayer(int layer, CudaStream stream) {
  if (layer < 0 || layer >= num_layers_) {
    return InvalidArgument("layer " + std::to_string(layer) + " is not one of the layout's " +
                           std::to_string(num_layers_) + " layers");
  }
  // Under mu_: Finish cannot hand the lane (and its events) back meanwhile.
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return status_;  // the layer is in place (or the load failed)
  CudaDeviceGuard device(io_->layout().device_index());
  KVT_RETURN_IF_ERROR(device.status());
  KVT_CUDA_RETURN("cudaStreamWaitEvent(layer)",
                  cudaStreamWaitEvent(stream, lane_->layer_events[static_cast<size_t>(layer)], 0));
  return Status::Ok();
}

Status CudaLayerwiseLoad::Finish(bool block) {
  CUevent_st* last = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return status_;
    last = lane_->layer_events[static_cast<size_t>(num_layers_ - 1)];
  }
  // Unlocked: a done() poll or a WaitLayer never waits behind a Wait().
  const cudaError_t e = block ? cudaEventSynchronize(last) : cudaEventQuery(last);
  if (e == cudaErrorNotReady) return Unavailable("layer-wise load still in flight");
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return status_;  // another thread finished it meanwhile
  if (e != cudaSuccess) status_ = CudaErrorStatus(block ? "cudaEventSynchronize" : "cudaEventQuery", e);
  finished_ = true;
  leases_.clear();  // the kernels are done with the chunks
  io_->shared_->ReturnLane(std::move(lane_));
  return status_;
}

bool CudaLayerwiseLoad::done() { return Finish(/*block=*/false).code() != StatusCode::kUnavailable; }

Status CudaLayerwiseLoad::Wait() { return Finish(/*block=*/true); }

CudaLayerwiseLoad::~CudaLayerwiseLoad() { (void)Wait(); }

}  // namespace kvtier
