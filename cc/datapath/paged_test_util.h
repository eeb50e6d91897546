// Test support: engine-like paged KV tensors with any physical axis order,
// and copies written straight from each kind's definition (the logical
// indexing the engine itself uses), independent of PagedKvLayout's derived
// strides. Used by the CPU tests, the CUDA tests and the benchmarks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "cc/datapath/kv_layout.h"

namespace kvtier::testing {

struct PagedSpec {
  KvLayoutKind kind = KvLayoutKind::kFlashAttn;
  int layers = 2;
  int64_t blocks = 8;
  int64_t block_size = 16;
  int64_t heads = 2;
  int64_t head_size = 8;
  int elem_size = 2;
  KvDtype dtype = KvDtype::kFloat16;
  // Physical axis order, outermost first, over the logical axes 0..rank-1
  // plus axis `rank` = the layer axis (all layers share one buffer). Empty:
  // layer outermost, then the logical order (one dense tensor per layer).
  std::vector<int> order;
  int pad_axis = -1;  // this axis' stride gets `pad` extra elements
  int64_t pad = 0;
};

inline std::vector<int64_t> LogicalShape(const PagedSpec& s) {
  switch (s.kind) {
    case KvLayoutKind::kFlashAttn:
      return {2, s.blocks, s.block_size, s.heads, s.head_size};
    case KvLayoutKind::kFlashInfer:
      return {s.blocks, 2, s.block_size, s.heads, s.head_size};
    case KvLayoutKind::kPackedKv:
    case KvLayoutKind::kVllmCpu:
      return {s.blocks, s.heads, s.block_size, 2 * s.head_size};
    default:
      return {s.blocks, s.block_size, s.head_size};
  }
}

class PagedKv {
 public:
  explicit PagedKv(const PagedSpec& spec, uint64_t seed = 1) : spec_(spec) {
    shape_ = LogicalShape(spec);
    const int rank = static_cast<int>(shape_.size());
    std::vector<int64_t> ext = shape_;
    ext.push_back(spec.layers);
    std::vector<int> order = spec.order;
    if (order.empty()) {
      order.push_back(rank);
      for (int d = 0; d < rank; ++d) order.push_back(d);
    }
    strides_.assign(rank + 1, 0);
    int64_t acc = 1;
    for (int k = rank; k >= 0; --k) {
      const int ax = order[k];
      strides_[ax] = acc + (ax == spec.pad_axis ? spec.pad : 0);
      acc = strides_[ax] * ext[ax];
    }
    elems_ = acc;
    words_.assign((static_cast<size_t>(elems_) * spec.elem_size + 7) / 8 + 1, 0);
    Randomize(seed);
  }

  const PagedSpec& spec() const { return spec_; }
  std::byte* base() { return reinterpret_cast<std::byte*>(words_.data()); }
  size_t bytes() const { return static_cast<size_t>(elems_) * spec_.elem_size; }
  int64_t layer_stride() const { return strides_.back(); }

  // Descriptors as the engine would hand them over, rooted at `root` (a copy
  // of base() elsewhere, e.g. on a device) or at base().
  std::vector<TensorDesc> Descs(std::byte* root = nullptr,
                                DeviceType device = DeviceType::kCpu) {
    if (root == nullptr) root = base();
    std::vector<TensorDesc> out;
    for (int l = 0; l < spec_.layers; ++l) {
      TensorDesc t;
      t.data = root + static_cast<size_t>(l * layer_stride()) * spec_.elem_size;
      t.shape = shape_;
      t.strides.assign(strides_.begin(), strides_.end() - 1);
      t.elem_size = spec_.elem_size;
      t.dtype = spec_.dtype;
      t.device = device;
      out.push_back(t);
    }
    return out;
  }

  void Randomize(uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (auto& w : words_) w = rng();
  }

  // Element index of (layer, kv, block, offset, head, 0) by each kind's
  // definition.
  int64_t Index(int layer, int kv, int64_t b, int64_t off, int64_t h) const {
    const auto& st = strides_;
    const int64_t l = layer * st.back();
    switch (spec_.kind) {
      case KvLayoutKind::kFlashAttn:
        return l + kv * st[0] + b * st[1] + off * st[2] + h * st[3];
      case KvLayoutKind::kFlashInfer:
        return l + b * st[0] + kv * st[1] + off * st[2] + h * st[3];
      case KvLayoutKind::kPackedKv:
        return l + b * st[0] + h * st[1] + off * st[2] + kv * spec_.head_size * st[3];
      case KvLayoutKind::kVllmCpu:
        // cpu_attn.py: view(blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
        return l + b * st[0] + h * st[1] + (kv * spec_.block_size + off) * spec_.head_size;
      default:
        return l + b * st[0] + off * st[1];
    }
  }

  int planes() const { return spec_.kind == KvLayoutKind::kMla ? 1 : 2; }
  int64_t heads() const { return spec_.kind == KvLayoutKind::kMla ? 1 : spec_.heads; }
  size_t head_bytes() const { return static_cast<size_t>(spec_.head_size) * spec_.elem_size; }
  size_t row_bytes() const { return head_bytes() * static_cast<size_t>(heads()); }
  size_t chunk_bytes(size_t n) const { return n * row_bytes() * planes() * spec_.layers; }

  // Chunk format position of (layer, kv, token, head): see kv_layout.h.
  size_t ChunkPos(size_t n, int layer, int kv, size_t token, int64_t h) const {
    return ((static_cast<size_t>(layer) * planes() + kv) * n + token) * row_bytes() +
           static_cast<size_t>(h) * head_bytes();
  }

  void ReferenceGather(const std::vector<int64_t>& slots, std::vector<std::byte>& dst) {
    const size_t n = slots.size();
    for (int l = 0; l < spec_.layers; ++l)
      for (int kv = 0; kv < planes(); ++kv)
        for (size_t i = 0; i < n; ++i) {
          if (slots[i] < 0) continue;
          const int64_t b = slots[i] / spec_.block_size, off = slots[i] % spec_.block_size;
          for (int64_t h = 0; h < heads(); ++h)
            std::memcpy(dst.data() + ChunkPos(n, l, kv, i, h),
                        base() + Index(l, kv, b, off, h) * spec_.elem_size, head_bytes());
        }
  }

  void ReferenceScatter(const std::vector<int64_t>& slots, const std::vector<std::byte>& src) {
    const size_t n = slots.size();
    for (int l = 0; l < spec_.layers; ++l)
      for (int kv = 0; kv < planes(); ++kv)
        for (size_t i = 0; i < n; ++i) {
          if (slots[i] < 0) continue;
          const int64_t b = slots[i] / spec_.block_size, off = slots[i] % spec_.block_size;
          for (int64_t h = 0; h < heads(); ++h)
            std::memcpy(base() + Index(l, kv, b, off, h) * spec_.elem_size,
                        src.data() + ChunkPos(n, l, kv, i, h), head_bytes());
        }
  }

 private:
  PagedSpec spec_;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;  // logical axes, then the layer axis
  int64_t elems_ = 0;
  std::vector<uint64_t> words_;
};

// A request's slot mapping: `n` tokens in shuffled distinct blocks, starting
// at a block offset, with every `pad_every`-th token a padding slot (-1).
inline std::vector<int64_t> MakeSlots(const PagedSpec& s, size_t n, uint64_t seed,
                                      int64_t start_offset = 0, size_t pad_every = 0) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> blocks(static_cast<size_t>(s.blocks));
  for (size_t b = 0; b < blocks.size(); ++b) blocks[b] = static_cast<int64_t>(b);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  std::vector<int64_t> slots(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t pos = start_offset + static_cast<int64_t>(i);
    const int64_t blk = blocks[static_cast<size_t>(pos / s.block_size) % blocks.size()];
    slots[i] = blk * s.block_size + pos % s.block_size;
    if (pad_every && i % pad_every == pad_every - 1) slots[i] = -1;
  }
  return slots;
}

}  // namespace kvtier::testing
