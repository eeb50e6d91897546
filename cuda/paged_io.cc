#include "cuda/paged_io.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#include "cuda/paged_io_internal.h"

namespace kvtier {
namespace {

// Process-wide registrations of host regions: several CudaPagedIo objects
// (one per KV layout) share one engine's CPU tier region.
struct Registration {
  size_t users = 0;
  size_t bytes = 0;
  std::byte* device = nullptr;
};
// Never destroyed: a CudaPagedIo held by another static (or by Python at
// interpreter exit) may unregister after this translation unit's statics
// would have been torn down.
std::mutex& RegistryMu() {
  static auto* mu = new std::mutex;
  return *mu;
}
std::map<std::byte*, Registration>& Registry() {
  static auto* r = new std::map<std::byte*, Registration>;
  return *r;
}

StatusOr<std::byte*> RegisterRegion(std::byte* host, size_t bytes) {
  std::lock_guard<std::mutex> lock(RegistryMu());
  Registration& r = Registry()[host];
  if (r.users == 0) {
    cudaError_t e = cudaHostRegister(host, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (e != cudaSuccess) {
      Registry().erase(host);
      cudaGetLastError();
      return CudaErrorStatus("cudaHostRegister(CPU tier, " + std::to_string(bytes) + " bytes)", e);
    }
    void* dev = nullptr;
    e = cudaHostGetDevicePointer(&dev, host, 0);
    if (e != cudaSuccess) {
      cudaHostUnregister(host);
      Registry().erase(host);
      return CudaErrorStatus("cudaHostGetDevicePointer(CPU tier)", e);
    }
    r.bytes = bytes;
    r.device = static_cast<std::byte*>(dev);
  } else if (r.bytes != bytes) {
    return Internal("CPU tier region registered twice with different sizes");
  }
  ++r.users;
  return r.device;
}

void UnregisterRegion(std::byte* host) {
  std::lock_guard<std::mutex> lock(RegistryMu());
  auto it = Registry().find(host);
  if (it == Registry().end()) return;
  if (--it->second.users == 0) {
    cudaHostUnregister(host);
    Registry().erase(it);
  }
}

Status CheckTokensAndSlots(const PagedKvLayout& layout, std::span<const int32_t> tokens,
                           std::span<const int64_t> slots) {
  if (slots.size() != tokens.size()) {
    return InvalidArgument("slot_mapping has " + std::to_string(slots.size()) + " entries for " +
                           std::to_string(tokens.size()) + " tokens; it needs one slot per token");
  }
  return CheckSlots(layout, slots);
}

}  // namespace

CudaLane::~CudaLane() {
  for (CUevent_st* e : layer_events) cudaEventDestroy(e);
  if (host_slots != nullptr) cudaFreeHost(host_slots);
  if (dev_slots != nullptr) cudaFree(dev_slots);
  if (event != nullptr) cudaEventDestroy(event);
  if (stream != nullptr) cudaStreamDestroy(stream);
}

// ---------------------------------------------------------------------------
// CudaPagedIo::Shared

CudaPagedIo::Shared::~Shared() {
  {
    std::lock_guard<std::mutex> lock(lanes_mu);
    lanes.clear();
  }
  if (registered) UnregisterRegion(region_host);
}

StatusOr<std::byte*> CudaPagedIo::Shared::DevicePointer(const std::byte* host) const {
  if (host < region_host || host >= region_host + region_bytes) {
    return Internal("CudaPagedIo: buffer is outside the registered CPU tier region");
  }
  return region_device + (host - region_host);
}

StatusOr<std::unique_ptr<CudaLane>> CudaPagedIo::Shared::TakeLane(size_t slots, size_t layer_events) {
  std::unique_ptr<CudaLane> lane;
  {
    std::lock_guard<std::mutex> lock(lanes_mu);
    if (!lanes.empty()) {
      lane = std::move(lanes.back());
      lanes.pop_back();
    }
  }
  if (lane == nullptr) {
    lane = std::make_unique<CudaLane>();
    KVT_CUDA_RETURN("cudaStreamCreateWithFlags",
                    cudaStreamCreateWithFlags(&lane->stream, cudaStreamNonBlocking));
    KVT_CUDA_RETURN("cudaEventCreateWithFlags",
                    cudaEventCreateWithFlags(&lane->event, cudaEventDisableTiming));
  }
  if (lane->capacity < slots) {
    // Grows in powers of two (>= 4096 slots): after warm-up no allocation.
    size_t cap = std::max<size_t>(4096, lane->capacity);
    while (cap < slots) cap *= 2;
    if (lane->host_slots != nullptr) cudaFreeHost(lane->host_slots);
    if (lane->dev_slots != nullptr) cudaFree(lane->dev_slots);
    lane->host_slots = nullptr;
    lane->dev_slots = nullptr;
    lane->capacity = 0;
    KVT_CUDA_RETURN("cudaMallocHost(slots)",
                    cudaMallocHost(&lane->host_slots, cap * sizeof(int64_t)));
    KVT_CUDA_RETURN("cudaMalloc(slots)", cudaMalloc(&lane->dev_slots, cap * sizeof(int64_t)));
    lane->capacity = cap;
  }
  // A lane that fails part-way here keeps the events it made: destroyed
  // with it (~CudaLane), reused if it is returned.
  while (lane->layer_events.size() < layer_events) {
    cudaEvent_t e = nullptr;
    KVT_CUDA_RETURN("cudaEventCreateWithFlags(layer)", cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    lane->layer_events.push_back(e);
  }
  return lane;
}

void CudaPagedIo::Shared::ReturnLane(std::unique_ptr<CudaLane> lane) {
  if (lane == nullptr) return;
  std::lock_guard<std::mutex> lock(lanes_mu);
  lanes.push_back(std::move(lane));
}

Status CudaPagedIo::Shared::GatherChunk(const ChunkHash& c, std::span<const int64_t> slots,
                                        std::span<std::byte> dst, CUevent_st* ready) {
  KVT_RETURN_IF_ERROR(CheckNoPadding(slots, c.begin));
  KVT_ASSIGN_OR_RETURN(std::byte * dev_dst, DevicePointer(dst.data()));
  CudaDeviceGuard device(cuda_layout.layout().device_index());
  KVT_RETURN_IF_ERROR(device.status());
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<CudaLane> lane, TakeLane(slots.size()));
  std::memcpy(lane->host_slots, slots.data(), slots.size_bytes());
  Status s = [&]() -> Status {
    KVT_CUDA_RETURN("cudaStreamWaitEvent", cudaStreamWaitEvent(lane->stream, ready, 0));
    KVT_CUDA_RETURN("cudaMemcpyAsync(slots)",
                    cudaMemcpyAsync(lane->dev_slots, lane->host_slots, slots.size_bytes(),
                                    cudaMemcpyHostToDevice, lane->stream));
    const ChunkCopy copy{lane->dev_slots, static_cast<int64_t>(slots.size()), dev_dst, dst.size()};
    KVT_RETURN_IF_ERROR(GatherCuda(cuda_layout, std::span<const ChunkCopy>(&copy, 1), lane->stream));
    KVT_CUDA_RETURN("cudaStreamSynchronize", cudaStreamSynchronize(lane->stream));
    return Status::Ok();
  }();
  if (!s.ok()) {
    // Whatever was enqueued must finish before the lane's buffers are reused.
    cudaStreamSynchronize(lane->stream);
    cudaGetLastError();
  }
  ReturnLane(std::move(lane));
  return s;
}

// ---------------------------------------------------------------------------
// CudaPagedIo

StatusOr<std::shared_ptr<CudaPagedIo>> CudaPagedIo::Create(std::shared_ptr<Engine> engine,
                                                           const PagedKvLayout& layout) {
  if (engine == nullptr) return InvalidArgument("CudaPagedIo: null engine");
  CpuTier* tier = engine->cpu_tier();
  if (tier == nullptr) {
    return FailedPrecondition("CudaPagedIo: the engine has no CPU tier yet (SetChunkBytes first)");
  }
  if (layout.ChunkBytes(engine->chunk_tokens()) > tier->options().chunk_bytes) {
    return InvalidArgument("CudaPagedIo: a chunk of " + std::to_string(engine->chunk_tokens()) +
                           " tokens in this layout is " +
                           std::to_string(layout.ChunkBytes(engine->chunk_tokens())) +
                           " bytes, more than the CPU tier's chunk size " +
                           std::to_string(tier->options().chunk_bytes));
  }
  KVT_ASSIGN_OR_RETURN(CudaKvLayout cl, CudaKvLayout::Create(layout));
  auto shared = std::make_shared<Shared>(std::move(cl));
  std::span<std::byte> mem = tier->memory();
  CudaDeviceGuard device(layout.device_index());
  KVT_RETURN_IF_ERROR(device.status());
  KVT_ASSIGN_OR_RETURN(shared->region_device, RegisterRegion(mem.data(), mem.size()));
  shared->region_host = mem.data();
  shared->region_bytes = mem.size();
  shared->registered = true;
  return std::shared_ptr<CudaPagedIo>(new CudaPagedIo(std::move(engine), std::move(shared)));
}

CudaPagedIo::~CudaPagedIo() = default;

const PagedKvLayout& CudaPagedIo::layout() const { return shared_->cuda_layout.layout(); }

StatusOr<std::byte*> CudaPagedIo::DevicePointer(const std::byte* host) const {
  return shared_->DevicePointer(host);
}

StatusOr<std::shared_ptr<StoreHandle>> CudaPagedIo::Store(std::span<const int32_t> tokens,
                                                          std::span<const int64_t> slots,
                                                          size_t skip_tokens, CudaStream stream,
                                                          const KeyExtras* extras) {
  const PagedKvLayout& lay = layout();
  KVT_RETURN_IF_ERROR(CheckTokensAndSlots(lay, tokens, slots));
  KVT_RETURN_IF_ERROR(ValidateKeyExtras(extras));  // before an event is recorded
  CudaDeviceGuard device(lay.device_index());
  KVT_RETURN_IF_ERROR(device.status());
  // The KV is final once the caller's stream reaches this point.
  cudaEvent_t ready = nullptr;
  KVT_CUDA_RETURN("cudaEventCreateWithFlags", cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  std::shared_ptr<CUevent_st> ready_ref(ready, [](CUevent_st* e) { cudaEventDestroy(e); });
  KVT_CUDA_RETURN("cudaEventRecord", cudaEventRecord(ready, stream));
  auto slot_copy = std::make_shared<std::vector<int64_t>>(slots.begin(), slots.end());
  auto chunk_bytes = [lay](uint32_t n) { return lay.ChunkBytes(n); };
  // Holds Shared, not this object: see Shared's comment.
  auto fill = [shared = shared_, slot_copy, ready_ref](const ChunkHash& c, std::span<std::byte> dst) -> Status {
    std::span<const int64_t> s(slot_copy->data() + c.begin, c.num_tokens);
    return shared->GatherChunk(c, s, dst, ready_ref.get());
  };
  return engine_->Store(tokens, skip_tokens, lay.layout_id(), chunk_bytes, std::move(fill), extras);
}

StatusOr<std::unique_ptr<CudaLoad>> CudaPagedIo::Retrieve(std::span<const int32_t> tokens,
                                                          std::span<const int64_t> slots,
                                                          size_t skip_tokens, CudaStream stream,
                                                          const KeyExtras* extras) {
  const PagedKvLayout& lay = layout();
  KVT_RETURN_IF_ERROR(CheckTokensAndSlots(lay, tokens, slots));
  std::unique_ptr<CudaLoad> load(new CudaLoad());
  load->io_ = shared_from_this();
  KVT_ASSIGN_OR_RETURN(load->prefix_, engine_->AcquirePrefix(tokens, skip_tokens, lay.layout_id(), extras));
  load->valid_tokens_ = load->prefix_.valid_tokens;
  load->chunks_ = load->prefix_.chunks.size();
  if (load->chunks_ == 0) return load;  // nothing to copy, nothing in flight

  CudaDeviceGuard device(lay.device_index());
  KVT_RETURN_IF_ERROR(device.status());
  KVT_ASSIGN_OR_RETURN(load->lane_, shared_->TakeLane(slots.size()));
  CudaLane& lane = *load->lane_;
  // Tokens the destination already holds are never written.
  const size_t skip = std::min(skip_tokens, slots.size());
  std::fill(lane.host_slots, lane.host_slots + skip, int64_t{-1});
  std::copy(slots.begin() + static_cast<ptrdiff_t>(skip), slots.end(), lane.host_slots + skip);

  std::vector<ChunkCopy> copies;
  copies.reserve(load->chunks_);
  for (size_t i = 0; i < load->chunks_; ++i) {
    const ChunkHash& c = load->prefix_.chunks[i];
    std::span<const std::byte> src = load->prefix_.leases[i].data();
    KVT_ASSIGN_OR_RETURN(std::byte * dev_src, shared_->DevicePointer(src.data()));
    copies.push_back(ChunkCopy{lane.dev_slots + c.begin, c.num_tokens, dev_src, src.size()});
  }
  Status s = [&]() -> Status {
    KVT_CUDA_RETURN("cudaMemcpyAsync(slots)",
                    cudaMemcpyAsync(lane.dev_slots, lane.host_slots, slots.size_bytes(),
                                    cudaMemcpyHostToDevice, stream));
    KVT_RETURN_IF_ERROR(ScatterCuda(shared_->cuda_layout, copies, stream));
    KVT_CUDA_RETURN("cudaEventRecord", cudaEventRecord(lane.event, stream));
    return Status::Ok();
  }();
  if (!s.ok()) {
    // Error path only: let whatever was enqueued drain before the leases go.
    cudaStreamSynchronize(stream);
    cudaGetLastError();
    shared_->ReturnLane(std::move(load->lane_));
    return s;
  }
  load->event_ = lane.event;
  load->finished_ = false;
  return load;
}

// ---------------------------------------------------------------------------
// CudaLoad

Status CudaLoad::Finish(bool block) {
  CUevent_st* event = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return status_;
    event = lane_->event;
  }
  // The CUDA call runs unlocked: a done() poll never waits behind another
  // thread's Wait().
  const cudaError_t e = block ? cudaEventSynchronize(event) : cudaEventQuery(event);
  if (e == cudaErrorNotReady) return Unavailable("load still in flight");
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return status_;  // another thread finished it meanwhile
  if (e != cudaSuccess) status_ = CudaErrorStatus(block ? "cudaEventSynchronize" : "cudaEventQuery", e);
  finished_ = true;
  prefix_.leases.clear();  // the kernels are done with the chunks
  io_->shared_->ReturnLane(std::move(lane_));
  return status_;
}

bool CudaLoad::done() { return Finish(/*block=*/false).code() != StatusCode::kUnavailable; }

Status CudaLoad::Wait() { return Finish(/*block=*/true); }

CudaLoad::~CudaLoad() { (void)Wait(); }

}  // namespace kvtier
