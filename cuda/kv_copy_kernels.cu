// Gather/scatter kernels between paged KV and chunk buffers. See kv_copy.h
// for the contract; this file only moves bytes.
//
// Mapping: one warp per chunk row (layer, K/V plane, token) of the layers
// [layer_begin, layer_begin + layer_count): the row's
// heads * head_bytes bytes are contiguous on the chunk side and made of
// `heads` pieces of head_bytes on the paged side. Lanes stride over the
// row in vec_bytes units, so chunk-side accesses of a warp are coalesced and
// paged-side accesses are coalesced within each head. blockIdx.y picks the
// chunk of the batch. No shared memory, no synchronisation: pure copies.
#include <cuda_runtime.h>

#include "cuda/kv_copy_kernels.h"

namespace kvtier::cuda_internal {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename V, bool kGather>
__global__ void __launch_bounds__(kThreads)
    KvCopyKernel(const KernelLayout L, const KernelBatch B, int* bad_slot) {
  const KernelChunk ch = B.chunks[blockIdx.y];
  const int64_t rows = static_cast<int64_t>(L.layer_count) * L.planes * ch.num_tokens;
  const int64_t lp0 = static_cast<int64_t>(L.layer_begin) * L.planes;  // first (layer, plane) row group
  const int64_t vecs_per_head = L.head_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t vecs_per_row = vecs_per_head * L.heads;
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warp_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = warp0; row < rows; row += warp_step) {
    const int64_t t = row % ch.num_tokens;
    const int64_t lp = lp0 + row / ch.num_tokens;  // layer * planes + plane, in the whole chunk
    const int plane = static_cast<int>(lp % L.planes);
    const int layer = static_cast<int>(lp / L.planes);
    const int64_t slot = ch.slots[t];
    if (slot < 0) continue;  // padding: chunk bytes / engine KV untouched
    if (slot >= L.num_slots) {
      // Relaxed device-scope store; the host reads it only after the stream
      // has completed (event / stream sync), which orders it.
      if (bad_slot != nullptr && lane == 0) atomicExch(bad_slot, 1);
      continue;
    }
    const int64_t b = slot / L.block_size;
    const int64_t off = slot - b * L.block_size;
    char* paged = reinterpret_cast<char*>(L.k_base[layer]) + plane * L.v_offset +
                  b * L.block_stride + off * L.token_stride;
    char* chunk = reinterpret_cast<char*>(ch.chunk) +
                  (lp * ch.num_tokens + t) * (L.head_bytes * L.heads);
    for (int64_t v = lane; v < vecs_per_row; v += 32) {
      const int64_t h = v / vecs_per_head;
      const int64_t hv = v - h * vecs_per_head;
      V* p = reinterpret_cast<V*>(paged + h * L.head_stride) + hv;
      V* c = reinterpret_cast<V*>(chunk) + v;
      if constexpr (kGather) {
        *c = *p;
      } else {
        *p = *c;
      }
    }
  }
}

template <typename V>
cudaError_t Launch(const KernelLayout& L, const KernelBatch& B, bool gather, int* bad_slot,
                   cudaStream_t stream) {
  if (B.count == 0 || B.max_rows == 0) return cudaSuccess;
  // Enough blocks to fill the GPU a few times over; the grid-stride loop
  // covers the rest.
  const int64_t want = (B.max_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(want < 4096 ? want : 4096), static_cast<unsigned>(B.count));
  if (gather) {
    KvCopyKernel<V, true><<<grid, kThreads, 0, stream>>>(L, B, bad_slot);
  } else {
    KvCopyKernel<V, false><<<grid, kThreads, 0, stream>>>(L, B, bad_slot);
  }
  return cudaGetLastError();  // launch errors only; never synchronises
}

}  // namespace

int LaunchKvCopy(const KernelLayout& layout, const KernelBatch& batch, int vec_bytes, bool gather,
                 int* bad_slot, CUstream_st* stream) {
  switch (vec_bytes) {
    case 16: return Launch<uint4>(layout, batch, gather, bad_slot, stream);
    case 8: return Launch<uint2>(layout, batch, gather, bad_slot, stream);
    case 4: return Launch<uint32_t>(layout, batch, gather, bad_slot, stream);
    case 2: return Launch<uint16_t>(layout, batch, gather, bad_slot, stream);
    case 1: return Launch<uint8_t>(layout, batch, gather, bad_slot, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvtier::cuda_internal
