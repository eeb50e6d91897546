#include "cc/datapath/kv_layout.h"

#include <xxhash.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace kvtier {
namespace {

constexpr int kMaxLayers = 4096;

std::string ShapeString(std::span<const int64_t> v) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
  o << "]";
  return o.str();
}

std::string DeviceString(DeviceType d, int index) {
  return d == DeviceType::kCpu ? std::string("cpu") : "cuda:" + std::to_string(index);
}

int ExpectedRank(KvLayoutKind kind) {
  switch (kind) {
    case KvLayoutKind::kFlashAttn:
    case KvLayoutKind::kFlashInfer:
      return 5;
    case KvLayoutKind::kPackedKv:
    case KvLayoutKind::kVllmCpu:
      return 4;
    case KvLayoutKind::kMla:
      return 3;
    case KvLayoutKind::kAuto:
      break;
  }
  return 0;
}

StatusOr<KvLayoutKind> DetectKind(const TensorDesc& t) {
  switch (t.shape.size()) {
    case 3:
      return KvLayoutKind::kMla;
    case 4:
      return t.device == DeviceType::kCpu ? KvLayoutKind::kVllmCpu : KvLayoutKind::kPackedKv;
    case 5:
      if (t.shape[0] == 2 && t.shape[1] == 2) {
        return InvalidArgument("layer 0: shape " + ShapeString(t.shape) +
                               " is ambiguous between flash_attn [2, blocks, ...] and flash_infer "
                               "[blocks, 2, ...]; pass the layout kind explicitly");
      }
      if (t.shape[0] == 2) return KvLayoutKind::kFlashAttn;
      if (t.shape[1] == 2) return KvLayoutKind::kFlashInfer;
      return InvalidArgument("layer 0: rank-5 shape " + ShapeString(t.shape) +
                             " has no K/V axis of size 2 at dim 0 (flash_attn) or dim 1 "
                             "(flash_infer)");
    default:
      return InvalidArgument("layer 0: rank " + std::to_string(t.shape.size()) +
                             " (shape " + ShapeString(t.shape) +
                             ") is no known paged KV layout; expected rank 3 (mla), 4 "
                             "(packed_kv / vllm_cpu) or 5 (flash_attn / flash_infer)");
  }
}

// Validates one layer on its own (not yet against layer 0).
Status CheckLayer(int l, const TensorDesc& t, KvLayoutKind kind) {
  const std::string where = "layer " + std::to_string(l) + ": ";
  if (t.data == nullptr) return InvalidArgument(where + "null data pointer");
  if (t.elem_size != 1 && t.elem_size != 2 && t.elem_size != 4) {
    return InvalidArgument(where + "element size " + std::to_string(t.elem_size) +
                           " bytes is unsupported; expected 1 (fp8/uint8), 2 (fp16/bf16) or 4 "
                           "(fp32)");
  }
  if (t.dtype != KvDtype::kUnknown && KvDtypeSize(t.dtype) != t.elem_size) {
    return InvalidArgument(where + "dtype " + std::string(KvDtypeName(t.dtype)) + " is " +
                           std::to_string(KvDtypeSize(t.dtype)) + " bytes but element size is " +
                           std::to_string(t.elem_size));
  }
  if (t.device != DeviceType::kCpu && t.device != DeviceType::kCuda) {
    return InvalidArgument(where + "unsupported device type " +
                           std::to_string(static_cast<int>(t.device)));
  }
  const int rank = ExpectedRank(kind);
  if (static_cast<int>(t.shape.size()) != rank) {
    return InvalidArgument(where + "rank " + std::to_string(t.shape.size()) + " (shape " +
                           ShapeString(t.shape) + ") but layout " +
                           std::string(KvLayoutKindName(kind)) + " needs rank " +
                           std::to_string(rank));
  }
  if (t.strides.size() != t.shape.size()) {
    return InvalidArgument(where + "strides " + ShapeString(t.strides) + " have rank " +
                           std::to_string(t.strides.size()) + " but shape " +
                           ShapeString(t.shape) + " has rank " + std::to_string(t.shape.size()));
  }
  for (size_t d = 0; d < t.shape.size(); ++d) {
    if (t.shape[d] <= 0) {
      return InvalidArgument(where + "dimension " + std::to_string(d) + " of shape " +
                             ShapeString(t.shape) + " is not positive");
    }
    if (t.strides[d] < 0) {
      return InvalidArgument(where + "negative stride at dimension " + std::to_string(d) +
                             " (strides " + ShapeString(t.strides) + ")");
    }
  }
  // Copies move whole head_size rows with memcpy / vector loads, so the
  // element axis must be dense.
  if (t.strides.back() != 1) {
    return InvalidArgument(where + "innermost (head_size) stride is " +
                           std::to_string(t.strides.back()) + ", must be 1 (strides " +
                           ShapeString(t.strides) + ")");
  }
  switch (kind) {
    case KvLayoutKind::kFlashAttn:
      if (t.shape[0] != 2) {
        return InvalidArgument(where + "flash_attn shape " + ShapeString(t.shape) +
                               " needs dim 0 == 2 (K, V)");
      }
      break;
    case KvLayoutKind::kFlashInfer:
      if (t.shape[1] != 2) {
        return InvalidArgument(where + "flash_infer shape " + ShapeString(t.shape) +
                               " needs dim 1 == 2 (K, V)");
      }
      break;
    case KvLayoutKind::kPackedKv:
    case KvLayoutKind::kVllmCpu:
      if (t.shape[3] % 2 != 0) {
        return InvalidArgument(where + std::string(KvLayoutKindName(kind)) + " shape " +
                               ShapeString(t.shape) +
                               " needs an even last dim (K and V packed: 2 * head_size)");
      }
      // vLLM CPU views each (block, head) plane as [2 * block_size, head_size];
      // that reinterpretation is only valid over a dense plane.
      if (kind == KvLayoutKind::kVllmCpu && t.strides[2] != t.shape[3]) {
        return InvalidArgument(where + "vllm_cpu needs a dense (block_size, 2*head_size) plane: "
                               "stride of dim 2 is " + std::to_string(t.strides[2]) +
                               ", expected " + std::to_string(t.shape[3]) + " (strides " +
                               ShapeString(t.strides) + ")");
      }
      break;
    default:
      break;
  }
  return Status::Ok();
}

void PutU64(std::array<unsigned char, 64>& buf, size_t& pos, uint64_t v) {
  for (int i = 0; i < 8; ++i) buf[pos++] = static_cast<unsigned char>(v >> (8 * i));
}

}  // namespace

std::string_view KvLayoutKindName(KvLayoutKind kind) {
  switch (kind) {
    case KvLayoutKind::kAuto: return "auto";
    case KvLayoutKind::kFlashAttn: return "flash_attn";
    case KvLayoutKind::kFlashInfer: return "flash_infer";
    case KvLayoutKind::kPackedKv: return "packed_kv";
    case KvLayoutKind::kVllmCpu: return "vllm_cpu";
    case KvLayoutKind::kMla: return "mla";
  }
  return "unknown";
}

StatusOr<KvLayoutKind> ParseKvLayoutKind(std::string_view name) {
  for (auto k : {KvLayoutKind::kAuto, KvLayoutKind::kFlashAttn, KvLayoutKind::kFlashInfer,
                 KvLayoutKind::kPackedKv, KvLayoutKind::kVllmCpu, KvLayoutKind::kMla}) {
    if (KvLayoutKindName(k) == name) return k;
  }
  return InvalidArgument("unknown KV layout kind '" + std::string(name) +
                         "'; expected auto, flash_attn, flash_infer, packed_kv, vllm_cpu or mla");
}

std::string_view KvDtypeName(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kUnknown: return "unknown";
    case KvDtype::kFloat32: return "float32";
    case KvDtype::kFloat16: return "float16";
    case KvDtype::kBFloat16: return "bfloat16";
    case KvDtype::kFloat8E4M3: return "float8_e4m3fn";
    case KvDtype::kFloat8E5M2: return "float8_e5m2";
    case KvDtype::kUInt8: return "uint8";
    case KvDtype::kInt8: return "int8";
  }
  return "unknown";
}

StatusOr<KvDtype> ParseKvDtype(std::string_view name) {
  if (name.starts_with("torch.")) name.remove_prefix(6);
  for (auto d : {KvDtype::kFloat32, KvDtype::kFloat16, KvDtype::kBFloat16, KvDtype::kFloat8E4M3,
                 KvDtype::kFloat8E5M2, KvDtype::kUInt8, KvDtype::kInt8}) {
    if (KvDtypeName(d) == name) return d;
  }
  if (name == "half") return KvDtype::kFloat16;
  if (name == "float") return KvDtype::kFloat32;
  return InvalidArgument("unsupported KV dtype '" + std::string(name) +
                         "'; expected float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, "
                         "uint8 or int8");
}

int KvDtypeSize(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kFloat32: return 4;
    case KvDtype::kFloat16:
    case KvDtype::kBFloat16: return 2;
    case KvDtype::kFloat8E4M3:
    case KvDtype::kFloat8E5M2:
    case KvDtype::kUInt8:
    case KvDtype::kInt8: return 1;
    case KvDtype::kUnknown: break;
  }
  return 0;
}

StatusOr<PagedKvLayout> PagedKvLayout::Create(std::span<const TensorDesc> layers,
                                              KvLayoutKind kind) {
  if (layers.empty()) return InvalidArgument("no layers: a KV layout needs at least one tensor");
  if (layers.size() > static_cast<size_t>(kMaxLayers)) {
    return InvalidArgument(std::to_string(layers.size()) + " layers exceed the limit of " +
                           std::to_string(kMaxLayers));
  }
  const TensorDesc& t0 = layers[0];
  if (kind == KvLayoutKind::kAuto) {
    KVT_ASSIGN_OR_RETURN(kind, DetectKind(t0));
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    const TensorDesc& t = layers[l];
    KVT_RETURN_IF_ERROR(CheckLayer(static_cast<int>(l), t, kind));
    if (l == 0) continue;
    const std::string where = "layer " + std::to_string(l) + ": ";
    if (t.shape != t0.shape) {
      return InvalidArgument(where + "shape " + ShapeString(t.shape) + " differs from layer 0 " +
                             ShapeString(t0.shape));
    }
    if (t.strides != t0.strides) {
      return InvalidArgument(where + "strides " + ShapeString(t.strides) +
                             " differ from layer 0 " + ShapeString(t0.strides));
    }
    if (t.elem_size != t0.elem_size || t.dtype != t0.dtype) {
      return InvalidArgument(where + "dtype " + std::string(KvDtypeName(t.dtype)) + " (" +
                             std::to_string(t.elem_size) + " bytes) differs from layer 0 " +
                             std::string(KvDtypeName(t0.dtype)) + " (" +
                             std::to_string(t0.elem_size) + " bytes)");
    }
    if (t.device != t0.device || t.device_index != t0.device_index) {
      return InvalidArgument(where + "device " + DeviceString(t.device, t.device_index) +
                             " differs from layer 0 " + DeviceString(t0.device, t0.device_index));
    }
  }

  PagedKvLayout out;
  out.kind_ = kind;
  out.elem_size_ = t0.elem_size;
  out.dtype_ = t0.dtype;
  out.device_ = t0.device;
  out.device_index_ = t0.device_index;
  const auto& s = t0.shape;
  const auto& st = t0.strides;
  switch (kind) {
    case KvLayoutKind::kFlashAttn:
      out.num_blocks_ = s[1], out.block_size_ = s[2], out.num_heads_ = s[3], out.head_size_ = s[4];
      out.block_stride_ = st[1], out.token_stride_ = st[2], out.head_stride_ = st[3];
      out.v_offset_ = st[0];
      break;
    case KvLayoutKind::kFlashInfer:
      out.num_blocks_ = s[0], out.block_size_ = s[2], out.num_heads_ = s[3], out.head_size_ = s[4];
      out.block_stride_ = st[0], out.token_stride_ = st[2], out.head_stride_ = st[3];
      out.v_offset_ = st[1];
      break;
    case KvLayoutKind::kPackedKv:
      out.num_blocks_ = s[0], out.num_heads_ = s[1], out.block_size_ = s[2];
      out.head_size_ = s[3] / 2;
      out.block_stride_ = st[0], out.head_stride_ = st[1], out.token_stride_ = st[2];
      out.v_offset_ = out.head_size_;
      break;
    case KvLayoutKind::kVllmCpu:
      out.num_blocks_ = s[0], out.num_heads_ = s[1], out.block_size_ = s[2];
      out.head_size_ = s[3] / 2;
      out.block_stride_ = st[0], out.head_stride_ = st[1];
      // Plane [2*block_size, head_size]: K rows first, then V rows.
      out.token_stride_ = out.head_size_;
      out.v_offset_ = out.block_size_ * out.head_size_;
      break;
    case KvLayoutKind::kMla:
      out.num_blocks_ = s[0], out.block_size_ = s[1], out.num_heads_ = 1, out.head_size_ = s[2];
      out.block_stride_ = st[0], out.token_stride_ = st[1], out.head_stride_ = 0;
      out.v_offset_ = 0;
      out.has_v_ = false;
      break;
    case KvLayoutKind::kAuto:
      return Internal("layout kind still auto after detection");
  }
  out.k_base_.reserve(layers.size());
  for (const TensorDesc& t : layers) out.k_base_.push_back(t.data);

  // Canonical encoding, independent of host struct layout and pointers.
  std::array<unsigned char, 64> buf{};
  size_t pos = 0;
  PutU64(buf, pos, 0x6b7674696572'4c31ULL);  // "kvtierL1": bump if the encoding changes
  PutU64(buf, pos, static_cast<uint64_t>(kind));
  PutU64(buf, pos, static_cast<uint64_t>(layers.size()));
  PutU64(buf, pos, static_cast<uint64_t>(out.block_size_));
  PutU64(buf, pos, static_cast<uint64_t>(out.num_heads_));
  PutU64(buf, pos, static_cast<uint64_t>(out.head_size_));
  PutU64(buf, pos,
         static_cast<uint64_t>(out.elem_size_) | (static_cast<uint64_t>(out.dtype_) << 8) |
             (static_cast<uint64_t>(out.has_v_) << 16));
  out.layout_id_ = XXH3_64bits(buf.data(), pos);
  return out;
}

std::string PagedKvLayout::DebugString() const {
  std::ostringstream o;
  o << KvLayoutKindName(kind_) << " L=" << num_layers() << " blocks=" << num_blocks_
    << " block=" << block_size_ << " heads=" << num_heads_ << " head=" << head_size_ << " "
    << KvDtypeName(dtype_) << "/" << elem_size_ << "B " << DeviceString(device_, device_index_);
  return o.str();
}

Status CheckNoPadding(std::span<const int64_t> chunk_slots, size_t chunk_begin) {
  for (int64_t s : chunk_slots) {
    if (s < 0) {
      return InvalidArgument("chunk at token " + std::to_string(chunk_begin) +
                             " has padding slots (< 0); only computed tokens can be stored");
    }
  }
  return Status::Ok();
}

Status CheckSlots(const PagedKvLayout& layout, std::span<const int64_t> slots) {
  const int64_t limit = layout.num_slots();
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i] >= limit) {
      return InvalidArgument("slot_mapping[" + std::to_string(i) + "] = " +
                             std::to_string(slots[i]) + " is out of range: the layout has " +
                             std::to_string(layout.num_blocks()) + " blocks of " +
                             std::to_string(layout.block_size()) + " tokens (valid slots 0.." +
                             std::to_string(limit - 1) + ", negative = skip)");
    }
  }
  return Status::Ok();
}

Status CheckCompatible(const PagedKvLayout& layout, uint64_t chunk_layout_id) {
  if (chunk_layout_id == layout.layout_id()) return Status::Ok();
  char a[32], b[32];
  std::snprintf(a, sizeof(a), "%016llx", static_cast<unsigned long long>(chunk_layout_id));
  std::snprintf(b, sizeof(b), "%016llx", static_cast<unsigned long long>(layout.layout_id()));
  return InvalidArgument(std::string("chunk layout id ") + a +
                         " does not match this KV layout (id " + b + ", " +
                         layout.DebugString() +
                         "): the chunk was gathered from a different model, dtype or layout");
}

}  // namespace kvtier
