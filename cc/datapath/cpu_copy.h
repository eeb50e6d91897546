// CPU reference gather/scatter between paged engine KV and the chunk buffer.
//
// This is the production copy for CPU engines (vLLM CPU) and the oracle the
// CUDA kernels (cuda/kv_copy.h, same argument shape) are tested against.
//
// Contract
// - Gather copies, for every layer and every token i with slots[i] >= 0, the
//   token's K (and V) rows from the paged tensors into `dst`, laid out as the
//   chunk buffer format of kv_layout.h for n = slots.size() tokens. Bytes of
//   padding tokens (slots[i] < 0) in `dst` are left untouched.
// - Scatter is the inverse: it writes the paged KV of every slot >= 0 from
//   `src` and touches nothing else of the engine's memory.
// - Arguments are checked before any byte moves, so an error never leaves a
//   half-copied buffer: kInvalidArgument for a slot >= num_slots (naming its
//   index and value), a buffer whose size is not ChunkBytes(n), or
//   num_threads < 1; kFailedPrecondition when the layout lives on a CUDA
//   device. No other codes.
// - Threads: up to num_threads (the caller's thread included) split the
//   (layer, token) space; fewer are used for small copies, where starting a
//   thread costs more than it saves. The call returns after all of them
//   joined, so the copy is complete and visible to the caller (thread join is
//   the synchronisation; nothing here uses atomics). A thread the system
//   refuses is not an error: its share runs on the caller's thread (logged
//   once to stderr).
// - Scatter with the same slot twice is a caller error: which token's bytes
//   land there is unspecified (and a data race when threads > 1).
// - Copies are byte-exact for any element size; runs of consecutive slots
//   inside one block are merged into one memcpy when the strides allow it.
// - The *Layers variants copy only layers [layer_begin, layer_end) of the
//   same whole-chunk buffer (the format is layer-major, so that is one
//   contiguous slice of it) and leave every other layer's bytes, in the
//   buffer and in the engine's KV, untouched. They check the same arguments
//   plus 0 <= layer_begin <= layer_end <= num_layers (kInvalidArgument).
//   Layer-wise transfer (cc/engine/layerwise.h) is built on them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "cc/common/status.h"
#include "cc/datapath/kv_layout.h"

namespace kvtier {

Status GatherCpu(const PagedKvLayout& layout, std::span<const int64_t> slots,
                 std::span<std::byte> dst, int num_threads = 1);

Status ScatterCpu(const PagedKvLayout& layout, std::span<const int64_t> slots,
                  std::span<const std::byte> src, int num_threads = 1);

Status GatherCpuLayers(const PagedKvLayout& layout, std::span<const int64_t> slots, std::span<std::byte> dst,
                       int layer_begin, int layer_end, int num_threads = 1);

Status ScatterCpuLayers(const PagedKvLayout& layout, std::span<const int64_t> slots,
                        std::span<const std::byte> src, int layer_begin, int layer_end, int num_threads = 1);

}  // namespace kvtier
