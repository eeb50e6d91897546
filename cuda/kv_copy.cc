#include "cuda/kv_copy.h"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <string>
#include <vector>

#include "cuda/kv_copy_kernels.h"

namespace kvtier {
namespace {

using cuda_internal::KernelBatch;
using cuda_internal::KernelChunk;
using cuda_internal::KernelLayout;


int AlignmentOf(uint64_t v) {
  int a = 16;
  while (a > 1 && v % static_cast<uint64_t>(a) != 0) a /= 2;
  return a;
}

KernelLayout ToKernel(const CudaKvLayout& cl) {
  const PagedKvLayout& l = cl.layout();
  const int64_t es = l.elem_size();
  KernelLayout k;
  k.k_base = cl.device_bases();
  k.v_offset = l.v_offset() * es;
  k.block_stride = l.block_stride() * es;
  k.token_stride = l.token_stride() * es;
  k.head_stride = l.head_stride() * es;
  k.block_size = l.block_size();
  k.num_slots = l.num_slots();
  k.head_bytes = l.head_size() * es;
  k.num_layers = l.num_layers();
  k.planes = l.has_v() ? 2 : 1;
  k.heads = static_cast<int32_t>(l.num_heads());
  return k;
}

Status Copy(const CudaKvLayout& cl, std::span<const ChunkCopy> chunks, int layer_begin, int layer_end,
            CudaStream stream, int* bad_slot, bool gather) {
  const PagedKvLayout& l = cl.layout();
  const char* op = gather ? "gather_cuda" : "scatter_cuda";
  if (l.device() != DeviceType::kCuda) {
    return FailedPrecondition(std::string(op) + ": layout (" + l.DebugString() +
                              ") is not on a CUDA device; use GatherCpu/ScatterCpu");
  }
  if (layer_begin < 0 || layer_begin > layer_end || layer_end > l.num_layers()) {
    return InvalidArgument(std::string(op) + ": layer range [" + std::to_string(layer_begin) + ", " +
                           std::to_string(layer_end) + ") is not within the layout's " +
                           std::to_string(l.num_layers()) + " layers");
  }
  int align = cl.paged_alignment();
  for (size_t i = 0; i < chunks.size(); ++i) {
    const ChunkCopy& c = chunks[i];
    // Built only for an error: no allocation per chunk on the hot path.
    auto where = [&] { return std::string(op) + ": chunk " + std::to_string(i) + ": "; };
    if (c.num_tokens < 0) return InvalidArgument(where() + "negative num_tokens");
    if (c.num_tokens == 0) continue;
    if (c.slots == nullptr) return InvalidArgument(where() + "null slot mapping");
    if (c.chunk == nullptr) return InvalidArgument(where() + "null chunk buffer");
    const size_t want = l.ChunkBytes(c.num_tokens);
    if (c.chunk_bytes != want) {
      return InvalidArgument(where() + "chunk buffer is " + std::to_string(c.chunk_bytes) +
                             " bytes but " + std::to_string(c.num_tokens) + " tokens need " +
                             std::to_string(want));
    }
    const int a = AlignmentOf(reinterpret_cast<uintptr_t>(c.chunk));
    if (a < align) align = a;
  }
  if (layer_begin == layer_end) return Status::Ok();  // checked above; nothing to copy
  KernelLayout kl = ToKernel(cl);
  kl.layer_begin = layer_begin;
  kl.layer_count = layer_end - layer_begin;
  KernelBatch batch;
  auto flush = [&]() -> Status {
    if (batch.count == 0) return Status::Ok();
    const int e = cuda_internal::LaunchKvCopy(kl, batch, align, gather, bad_slot, stream);
    batch.count = 0;
    batch.max_rows = 0;
    if (e != cudaSuccess) return CudaErrorStatus(op, e);
    return Status::Ok();
  };
  const int64_t rows_per_token = static_cast<int64_t>(kl.layer_count) * kl.planes;
  for (const ChunkCopy& c : chunks) {
    if (c.num_tokens == 0) continue;
    KernelChunk& k = batch.chunks[batch.count++];
    k.slots = c.slots;
    k.num_tokens = c.num_tokens;
    k.chunk = reinterpret_cast<uintptr_t>(c.chunk);
    if (rows_per_token * c.num_tokens > batch.max_rows) batch.max_rows = rows_per_token * c.num_tokens;
    if (batch.count == cuda_internal::kMaxChunksPerLaunch) KVT_RETURN_IF_ERROR(flush());
  }
  return flush();
}

}  // namespace

// Whether the calling thread has a current CUDA context, asked of the
// driver (cuCtxGetCurrent) that cudart has already loaded. -1: unknown.
static int ThreadHasContext() {
  using GetCurrent = int (*)(void**);
  static const GetCurrent get = [] {
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    return h != nullptr ? reinterpret_cast<GetCurrent>(dlsym(h, "cuCtxGetCurrent")) : nullptr;
  }();
  if (get == nullptr) return -1;
  void* ctx = nullptr;
  if (get(&ctx) != 0) return -1;
  return ctx != nullptr ? 1 : 0;
}

CudaDeviceGuard::CudaDeviceGuard(int device) : device_(device) {
  // Restore only a device the thread was really using: on a thread with no
  // context yet, cudaGetDevice says 0, and setting 0 back would create a
  // context on GPU 0 (hundreds of MiB) for a layout on another GPU.
  if (ThreadHasContext() == 1 && cudaGetDevice(&previous_) != cudaSuccess) {
    previous_ = -1;
    cudaGetLastError();
  }
  if (previous_ != device) {
    const cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      status_ = CudaErrorStatus("cudaSetDevice", e);
      cudaGetLastError();
    }
  }
}

CudaDeviceGuard::~CudaDeviceGuard() {
  if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
}

Status CudaErrorStatus(const std::string& op, int error) {
  const auto e = static_cast<cudaError_t>(error);
  return IoError(op + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

bool CudaRuntimeAvailable() {
  // Function-local static: initialised once, thread-safe by the language.
  static const bool available = [] {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error so later calls start clean
      return false;
    }
    return n > 0;
  }();
  return available;
}

StatusOr<CudaKvLayout> CudaKvLayout::Create(const PagedKvLayout& layout) {
  if (layout.device() != DeviceType::kCuda) {
    return FailedPrecondition("CudaKvLayout: layout (" + layout.DebugString() +
                              ") is not on a CUDA device");
  }
  if (!CudaRuntimeAvailable()) {
    return FailedPrecondition("CudaKvLayout: no usable CUDA device in this process");
  }
  CudaKvLayout out(layout);
  const int64_t es = layout.elem_size();
  int align = 16;
  auto fold = [&](uint64_t v) {
    const int a = AlignmentOf(v);
    if (a < align) align = a;
  };
  fold(static_cast<uint64_t>(layout.v_offset() * es));
  fold(static_cast<uint64_t>(layout.block_stride() * es));
  fold(static_cast<uint64_t>(layout.token_stride() * es));
  fold(static_cast<uint64_t>(layout.head_stride() * es));
  fold(static_cast<uint64_t>(layout.head_size() * es));
  std::vector<uintptr_t> bases(static_cast<size_t>(layout.num_layers()));
  for (int i = 0; i < layout.num_layers(); ++i) {
    bases[static_cast<size_t>(i)] = reinterpret_cast<uintptr_t>(layout.k_base(i));
    fold(bases[static_cast<size_t>(i)]);
  }
  out.paged_alignment_ = align;
  CudaDeviceGuard device(layout.device_index());
  KVT_RETURN_IF_ERROR(device.status());
  cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&out.device_bases_), bases.size() * sizeof(uintptr_t));
  if (e != cudaSuccess) return CudaErrorStatus("cudaMalloc(layer table)", e);
  // Synchronous on purpose: registration time, once per KV cache.
  e = cudaMemcpy(out.device_bases_, bases.data(), bases.size() * sizeof(uintptr_t),
                 cudaMemcpyHostToDevice);
  if (e != cudaSuccess) return CudaErrorStatus("cudaMemcpy(layer table)", e);
  return out;
}

CudaKvLayout::CudaKvLayout(CudaKvLayout&& o) noexcept
    : layout_(o.layout_), device_bases_(o.device_bases_), paged_alignment_(o.paged_alignment_) {
  o.device_bases_ = nullptr;
}

CudaKvLayout& CudaKvLayout::operator=(CudaKvLayout&& o) noexcept {
  if (this != &o) {
    if (device_bases_ != nullptr) cudaFree(device_bases_);
    layout_ = o.layout_;
    device_bases_ = o.device_bases_;
    paged_alignment_ = o.paged_alignment_;
    o.device_bases_ = nullptr;
  }
  return *this;
}

CudaKvLayout::~CudaKvLayout() {
  // cudaFree synchronises the device; destruction is a teardown-time event.
  if (device_bases_ != nullptr) cudaFree(device_bases_);
}

Status GatherCuda(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks, CudaStream stream,
                  int* bad_slot) {
  return Copy(layout, chunks, 0, layout.layout().num_layers(), stream, bad_slot, /*gather=*/true);
}

Status ScatterCuda(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks,
                   CudaStream stream, int* bad_slot) {
  return Copy(layout, chunks, 0, layout.layout().num_layers(), stream, bad_slot, /*gather=*/false);
}

Status GatherCudaLayers(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks, int layer_begin,
                        int layer_end, CudaStream stream, int* bad_slot) {
  return Copy(layout, chunks, layer_begin, layer_end, stream, bad_slot, /*gather=*/true);
}

Status ScatterCudaLayers(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks, int layer_begin,
                         int layer_end, CudaStream stream, int* bad_slot) {
  return Copy(layout, chunks, layer_begin, layer_end, stream, bad_slot, /*gather=*/false);
}

}  // namespace kvtier
