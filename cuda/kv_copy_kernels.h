// Internal ABI between the nvcc-compiled kernels (kv_copy_kernels.cu) and the
// gcc-compiled host launchers (kv_copy.cc). Plain structs and a C++ function
// returning the CUDA error code: no kvtier headers cross into nvcc, so the
// .cu compiles on its own.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace kvtier::cuda_internal {

// Everything the kernel needs about the paged side, in bytes. Passed by value
// as a kernel parameter (no per-launch upload).
struct KernelLayout {
  const uintptr_t* k_base = nullptr;  // device table [num_layers]: K base per layer
  int64_t v_offset = 0;               // K base -> V base
  int64_t block_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  int64_t block_size = 0;             // tokens
  int64_t num_slots = 0;              // num_blocks * block_size
  int64_t head_bytes = 0;             // head_size * elem_size
  int32_t num_layers = 0;
  int32_t planes = 0;                 // 2 (K, V) or 1 (MLA)
  int32_t heads = 0;
  // The layers copied: [layer_begin, layer_begin + layer_count). The chunk
  // buffer is still the whole chunk (layer-major), so these layers are one
  // contiguous slice of it; no other byte is touched.
  int32_t layer_begin = 0;
  int32_t layer_count = 0;
};

// One chunk of a batch. slots: device-accessible [num_tokens]; chunk:
// device memory or mapped pinned host memory, ChunkBytes(num_tokens).
struct KernelChunk {
  const int64_t* slots = nullptr;
  int64_t num_tokens = 0;
  uintptr_t chunk = 0;
};

// Up to this many chunks ride in one launch's parameters (4 KiB limit).
inline constexpr int kMaxChunksPerLaunch = 64;

struct KernelBatch {
  KernelChunk chunks[kMaxChunksPerLaunch];
  int32_t count = 0;
  int64_t max_rows = 0;  // max over chunks of layer_count * planes * num_tokens
};

// Launches one gather (paged -> chunk) or scatter kernel on `stream`.
// vec_bytes (16, 8, 4, 2 or 1) divides every address and size involved.
// bad_slot: optional device int set to 1 when a slot >= num_slots was met
// (that token is skipped). Returns the cudaError_t of the launch as int.
int LaunchKvCopy(const KernelLayout& layout, const KernelBatch& batch, int vec_bytes,
                 bool gather, int* bad_slot, CUstream_st* stream);

}  // namespace kvtier::cuda_internal
