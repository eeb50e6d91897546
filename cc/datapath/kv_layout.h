// PagedKvLayout: where an inference engine keeps its paged KV, described once
// from the engine's own tensors, and the one chunk buffer format kvtier stores.
//
// Contract
// - A layout is built once (at KV-cache registration) from per-layer tensor
//   descriptors: base pointer, shape, strides in elements, element size,
//   dtype, device. Nothing about a backend's shape is hard-coded beyond which
//   logical axis means what; every address is computed from the strides.
// - Create() validates everything it can see and returns kInvalidArgument
//   with a message naming the layer and the property that is wrong (rank,
//   dtype, device, a dimension, strides that differ between layers ...). It
//   never returns any other code.
// - All layers share shape, strides, dtype and device; only base pointers
//   differ. Strides are therefore stored once.
// - The layout does not own the memory. The caller (the Python binding keeps
//   a reference to the producing tensors) keeps it alive while the layout is
//   used. A PagedKvLayout is immutable after Create(), so it may be shared
//   between threads without synchronisation.
// - layout_id() is a stable 64-bit hash (XXH3, fixed seed, canonical
//   little-endian encoding) of everything but pointers and num_blocks: kind,
//   number of layers, block size, heads, head size, element size, dtype and
//   K/V presence. Two processes holding the same model see the same id; the
//   engine stores it in ChunkMeta.layout_id and CheckCompatible() refuses a
//   chunk whose id differs.
//
// Supported kinds (logical shapes per layer; strides may be anything with a
// unit stride on the innermost element axis):
//   kFlashAttn   [2, num_blocks, block_size, heads, head_size]   (vLLM GPU < 0.33)
//   kFlashInfer  [num_blocks, 2, block_size, heads, head_size]
//   kPackedKv    [num_blocks, heads, block_size, 2*head_size]    (vLLM 0.33 GPU:
//                K = content[:head_size], V = content[head_size:], any
//                permutation of the first three axes, not contiguous)
//   kVllmCpu     [num_blocks, heads, block_size, 2*head_size]    (vLLM CPU 0.32:
//                the (block, head) plane is reinterpreted as K[block_size]
//                [head_size] followed by V[block_size][head_size], exactly as
//                cpu_attn.py's Python view shows it; the plane must be
//                contiguous). Caveat: the C++ kernels of vLLM CPU 0.32 do not
//                all use that view -- the "vec" kernel keeps K transposed,
//                [head_size][block_size] per (block, head) -- so token rows
//                are not where this kind says. The vLLM connector therefore
//                never uses kVllmCpu: it registers each contiguous layer as
//                raw blocks ([blocks, 2, block_size, heads, head] bytes,
//                kind flash_infer) and copies whole blocks, which is
//                byte-exact whatever the kernel's inner layout.
//   kMla         [num_blocks, block_size, head_size]             (one latent)
// kAuto picks by rank: 3 -> kMla; 5 -> kFlashAttn if shape[0]==2 else
// kFlashInfer if shape[1]==2 (both 2 is ambiguous: an error asking for a
// kind); 4 -> kVllmCpu on a CPU device, kPackedKv on a CUDA device.
//
// Chunk buffer format (the only one; layer-major so layer l can be stored or
// loaded while layer l+1 is still being computed):
//   for layer in 0..num_layers-1:
//     K[num_tokens][heads * head_size]   (elements, token-major)
//     V[num_tokens][heads * head_size]   (absent for kMla: the latent only)
//   contiguous, no padding, no header. The layout id travels beside the bytes
//   (ChunkMeta.layout_id), not inside them, so tiers store raw KV.
//   ChunkBytes(n) = num_layers * LayerBytes(n),
//   LayerBytes(n) = n * row_bytes() * (has_v() ? 2 : 1),
//   LayerOffset(l, n) = l * LayerBytes(n).
// Slots: slot = block * block_size + offset_in_block; a negative slot means
// "no token here" (padding): gather leaves its bytes in the buffer untouched
// and scatter does not write the engine's KV for it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cc/common/status.h"

namespace kvtier {

enum class KvLayoutKind : uint8_t {
  kAuto = 0,
  kFlashAttn = 1,
  kFlashInfer = 2,
  kPackedKv = 3,
  kVllmCpu = 4,
  kMla = 5,
};

// Dtypes matter only for compatibility (fp16 and bf16 are both 2 bytes but
// scattering one into the other is garbage); copies are byte-exact.
enum class KvDtype : uint8_t {
  kUnknown = 0,  // caller did not say; only the element size is checked
  kFloat32 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kFloat8E4M3 = 4,
  kFloat8E5M2 = 5,
  kUInt8 = 6,
  kInt8 = 7,
};

enum class DeviceType : uint8_t { kCpu = 0, kCuda = 1 };

std::string_view KvLayoutKindName(KvLayoutKind kind);
// Accepts the names KvLayoutKindName returns ("auto", "flash_attn",
// "flash_infer", "packed_kv", "vllm_cpu", "mla"). kInvalidArgument otherwise.
StatusOr<KvLayoutKind> ParseKvLayoutKind(std::string_view name);
std::string_view KvDtypeName(KvDtype dtype);
// "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint8",
// "int8" (torch's names, with or without a "torch." prefix).
StatusOr<KvDtype> ParseKvDtype(std::string_view name);
// Bytes per element of a known dtype, 0 for kUnknown.
int KvDtypeSize(KvDtype dtype);

// One layer's KV tensor as the engine allocated it.
struct TensorDesc {
  std::byte* data = nullptr;     // first element (after any storage offset)
  std::vector<int64_t> shape;    // logical shape, see the kinds above
  std::vector<int64_t> strides;  // in elements, same rank as shape, >= 0
  int elem_size = 0;             // 1, 2 or 4
  KvDtype dtype = KvDtype::kUnknown;
  DeviceType device = DeviceType::kCpu;
  int device_index = 0;
};

class PagedKvLayout {
 public:
  static StatusOr<PagedKvLayout> Create(std::span<const TensorDesc> layers,
                                        KvLayoutKind kind = KvLayoutKind::kAuto);

  KvLayoutKind kind() const { return kind_; }
  int num_layers() const { return static_cast<int>(k_base_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_heads() const { return num_heads_; }
  int64_t head_size() const { return head_size_; }
  int elem_size() const { return elem_size_; }
  KvDtype dtype() const { return dtype_; }
  bool has_v() const { return has_v_; }
  DeviceType device() const { return device_; }
  int device_index() const { return device_index_; }
  uint64_t layout_id() const { return layout_id_; }
  int64_t num_slots() const { return num_blocks_ * block_size_; }

  // Strides in elements, shared by all layers. The element axis has stride 1.
  int64_t block_stride() const { return block_stride_; }
  int64_t token_stride() const { return token_stride_; }
  int64_t head_stride() const { return head_stride_; }
  // Distance in elements from a layer's K base to its V base (0 for kMla).
  int64_t v_offset() const { return v_offset_; }
  std::byte* k_base(int layer) const { return k_base_[layer]; }
  std::byte* v_base(int layer) const { return k_base_[layer] + v_offset_ * elem_size_; }

  // Copy granularity the strides allow, used by every copy implementation.
  // True when one token's heads*head_size elements are one contiguous run.
  bool token_rows_contiguous() const { return num_heads_ == 1 || head_stride_ == head_size_; }
  // True when consecutive tokens of a block are also adjacent, so a run of
  // consecutive slots inside one block is one contiguous copy.
  bool block_rows_contiguous() const {
    return token_rows_contiguous() && token_stride_ == num_heads_ * head_size_;
  }

  // Chunk buffer geometry (see the format above). row_bytes: one token's K
  // (or V) for all heads.
  size_t row_bytes() const {
    return static_cast<size_t>(num_heads_ * head_size_) * static_cast<size_t>(elem_size_);
  }
  size_t LayerBytes(int64_t num_tokens) const {
    return static_cast<size_t>(num_tokens) * row_bytes() * (has_v_ ? 2u : 1u);
  }
  size_t ChunkBytes(int64_t num_tokens) const {
    return LayerBytes(num_tokens) * static_cast<size_t>(num_layers());
  }
  size_t LayerOffset(int layer, int64_t num_tokens) const {
    return LayerBytes(num_tokens) * static_cast<size_t>(layer);
  }

  // "flash_attn L=32 blocks=1024 block=16 heads=8 head=128 float16 cpu".
  std::string DebugString() const;

 private:
  PagedKvLayout() = default;

  KvLayoutKind kind_ = KvLayoutKind::kAuto;
  int64_t num_blocks_ = 0;
  int64_t block_size_ = 0;
  int64_t num_heads_ = 0;
  int64_t head_size_ = 0;
  int elem_size_ = 0;
  KvDtype dtype_ = KvDtype::kUnknown;
  bool has_v_ = true;
  DeviceType device_ = DeviceType::kCpu;
  int device_index_ = 0;
  int64_t block_stride_ = 0;
  int64_t token_stride_ = 0;
  int64_t head_stride_ = 0;
  int64_t v_offset_ = 0;
  uint64_t layout_id_ = 0;
  std::vector<std::byte*> k_base_;
};

// kOk when every slot is negative (padding) or below layout.num_slots();
// kInvalidArgument naming the first bad index and value otherwise.
Status CheckSlots(const PagedKvLayout& layout, std::span<const int64_t> slots);

// A chunk to store (tokens chunk_begin.. of a request) may hold only
// computed tokens: kInvalidArgument naming the chunk when a slot is padding
// (< 0). Shared by the CPU and CUDA store paths.
Status CheckNoPadding(std::span<const int64_t> chunk_slots, size_t chunk_begin);

// kOk when a chunk stored with `chunk_layout_id` may be scattered into
// `layout`; kInvalidArgument naming both ids and this layout otherwise.
Status CheckCompatible(const PagedKvLayout& layout, uint64_t chunk_layout_id);

}  // namespace kvtier
