// CUDA gather/scatter between an engine's paged KV (GPU memory) and chunk
// buffers (device memory or mapped pinned host memory). Same argument shape
// as the CPU reference (cc/datapath/cpu_copy.h), batched over chunks.
//
// Contract
// - Layering: kernel (kv_copy_kernels.cu) -> these host launchers (raw
//   pointers, a stream, Status) -> the binding layer. No torch here, and this
//   header needs no CUDA headers (streams are passed as CUstream_st*, which
//   is what cudaStream_t is).
// - GatherCuda / ScatterCuda only enqueue work on `stream` and return: no
//   host<->device synchronisation, no allocation on the hot path. Completion
//   is observed by the caller (cudaEventRecord on the same stream). The copy
//   semantics are the CPU reference's: chunk format of kv_layout.h, slot < 0
//   skips the token (chunk bytes / engine KV untouched), byte-exact for 1, 2
//   and 4-byte elements; 16-byte vector copies when every address and stride
//   is 16-byte aligned (else 8, 4, 2, 1).
// - Slots live in device-accessible memory, so the host cannot validate them
//   without a sync: a slot >= num_slots is skipped on the device and, when
//   `bad_slot` (device int, zeroed by the caller) is given, sets it to 1; the
//   caller reads it after completion. Everything the host can see (sizes,
//   null pointers, device, batch shape) is checked before launch:
//   kInvalidArgument. kFailedPrecondition: the layout is not on a CUDA device
//   or no CUDA device is usable. kIoError: the CUDA runtime failed (message
//   carries cudaGetErrorString).
// - The *Layers variants copy only layers [layer_begin, layer_end) of the
//   same whole-chunk buffers (layer-major, so one contiguous slice of each)
//   and touch no other byte, in the chunks or the paged KV: the GPU side of
//   GatherCpuLayers / ScatterCpuLayers, for layer-wise transfer. A range
//   outside [0, num_layers] or reversed is kInvalidArgument; an empty one
//   enqueues nothing.
// - Many chunks go in one launch (up to 64 per launch; larger batches take
//   several launches, still without a sync).
// - Thread safety: a CudaKvLayout is immutable after Create and may be used
//   from many threads and streams at once. Concurrent scatters to the same
//   slot race, as on the CPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "cc/common/status.h"
#include "cc/datapath/kv_layout.h"

struct CUstream_st;

namespace kvtier {

using CudaStream = CUstream_st*;

// kIoError naming the failed call and the CUDA error (`error` is a
// cudaError_t). The one place kvtier turns CUDA runtime errors into Status.
Status CudaErrorStatus(const std::string& op, int error);

// True when this process can use a CUDA device (driver present, at least one
// device). Cheap after the first call; never throws or aborts.
bool CudaRuntimeAvailable();

// Makes `device` the calling thread's current CUDA device for the guard's
// lifetime, then restores the previous one: callers (torch, a server's own
// threads) keep their own current device, and kvtier must not change it
// under them. A thread that had no CUDA context keeps `device` (restoring
// "device 0" there would create a context on GPU 0). status() is not OK
// when the device could not be set.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;
  const Status& status() const { return status_; }

 private:
  int previous_ = -1;
  int device_ = -1;
  Status status_;
};

// A PagedKvLayout whose per-layer base table is uploaded to the device once
// (at registration: cudaMalloc + a synchronous copy, off the hot path).
class CudaKvLayout {
 public:
  static StatusOr<CudaKvLayout> Create(const PagedKvLayout& layout);
  CudaKvLayout(CudaKvLayout&&) noexcept;
  CudaKvLayout& operator=(CudaKvLayout&&) noexcept;
  ~CudaKvLayout();

  const PagedKvLayout& layout() const { return layout_; }
  const uintptr_t* device_bases() const { return device_bases_; }
  // Largest power of two <= 16 dividing every paged-side address and stride.
  int paged_alignment() const { return paged_alignment_; }

 private:
  explicit CudaKvLayout(const PagedKvLayout& l) : layout_(l) {}
  PagedKvLayout layout_;
  uintptr_t* device_bases_ = nullptr;
  int paged_alignment_ = 1;
};

struct ChunkCopy {
  const int64_t* slots = nullptr;  // device-accessible [num_tokens]
  int64_t num_tokens = 0;
  std::byte* chunk = nullptr;  // device or mapped pinned host, ChunkBytes(num_tokens)
  size_t chunk_bytes = 0;      // checked against ChunkBytes(num_tokens)
};

Status GatherCuda(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks, CudaStream stream,
                  int* bad_slot = nullptr);
Status ScatterCuda(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks,
                   CudaStream stream, int* bad_slot = nullptr);
Status GatherCudaLayers(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks, int layer_begin,
                        int layer_end, CudaStream stream, int* bad_slot = nullptr);
Status ScatterCudaLayers(const CudaKvLayout& layout, std::span<const ChunkCopy> chunks, int layer_begin,
                         int layer_end, CudaStream stream, int* bad_slot = nullptr);

}  // namespace kvtier
