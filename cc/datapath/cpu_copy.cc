#include "cc/datapath/cpu_copy.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cc/common/thread_guard.h"

namespace kvtier {
namespace {

// Below this many bytes per thread a second thread costs more (start + join,
// ~20-50 us) than it saves.
constexpr size_t kMinBytesPerThread = size_t{512} << 10;

std::atomic<bool> g_thread_refusal_logged{false};

// One piece of a copy between paged memory and the chunk buffer; the
// direction is a template parameter so the inner loops carry no branch.
template <bool kGather>
inline void Move(std::byte* paged, std::byte* chunk, size_t n) {
  if constexpr (kGather) {
    std::memcpy(chunk, paged, n);
  } else {
    std::memcpy(paged, chunk, n);
  }
}

// Copies tokens [t0, t1) of one layer (K then V).
template <bool kGather>
void CopyLayerRange(const PagedKvLayout& lay, std::span<const int64_t> slots, std::byte* chunk,
                    int layer, int64_t t0, int64_t t1) {
  const int64_t n = static_cast<int64_t>(slots.size());
  const size_t es = static_cast<size_t>(lay.elem_size());
  const size_t row = lay.row_bytes();
  const size_t head_bytes = static_cast<size_t>(lay.head_size()) * es;
  const int64_t bs = lay.block_size();
  const size_t block_stride = static_cast<size_t>(lay.block_stride()) * es;
  const size_t token_stride = static_cast<size_t>(lay.token_stride()) * es;
  const size_t head_stride = static_cast<size_t>(lay.head_stride()) * es;
  const int64_t heads = lay.num_heads();
  const bool whole_runs = lay.block_rows_contiguous();
  const bool whole_rows = lay.token_rows_contiguous();
  const int planes = lay.has_v() ? 2 : 1;
  for (int kv = 0; kv < planes; ++kv) {
    std::byte* paged_base = kv == 0 ? lay.k_base(layer) : lay.v_base(layer);
    std::byte* chunk_base =
        chunk + lay.LayerOffset(layer, n) + static_cast<size_t>(kv) * static_cast<size_t>(n) * row;
    int64_t i = t0;
    while (i < t1) {
      const int64_t s = slots[i];
      if (s < 0) {
        ++i;
        continue;
      }
      const int64_t block = s / bs;
      const int64_t off = s % bs;
      // A run: consecutive slots that stay inside one block.
      int64_t j = i + 1;
      while (j < t1 && slots[j] == slots[j - 1] + 1 && off + (j - i) < bs) ++j;
      const size_t len = static_cast<size_t>(j - i);
      std::byte* p = paged_base + static_cast<size_t>(block) * block_stride +
                     static_cast<size_t>(off) * token_stride;
      std::byte* c = chunk_base + static_cast<size_t>(i) * row;
      if (whole_runs) {
        Move<kGather>(p, c, len * row);
      } else if (whole_rows) {
        for (size_t k = 0; k < len; ++k) Move<kGather>(p + k * token_stride, c + k * row, row);
      } else {
        // Token-outer: the chunk side is written strictly sequentially and
        // the paged side reads `heads` sequential streams, one per head plane
        // (vLLM CPU's head-major blocks). Measured faster than head-outer.
        for (size_t k = 0; k < len; ++k) {
          std::byte* pk = p + k * token_stride;
          std::byte* ck = c + k * row;
          for (int64_t h = 0; h < heads; ++h) {
            Move<kGather>(pk + static_cast<size_t>(h) * head_stride,
                          ck + static_cast<size_t>(h) * head_bytes, head_bytes);
          }
        }
      }
      i = j;
    }
  }
}

// Work item w in [w0, w1) of the flattened (layer, token) space.
template <bool kGather>
void CopyWork(const PagedKvLayout& lay, std::span<const int64_t> slots, std::byte* chunk,
              int64_t w0, int64_t w1) {
  const int64_t n = static_cast<int64_t>(slots.size());
  while (w0 < w1) {
    const int layer = static_cast<int>(w0 / n);
    const int64_t t0 = w0 % n;
    const int64_t t1 = std::min<int64_t>(n, t0 + (w1 - w0));
    CopyLayerRange<kGather>(lay, slots, chunk, layer, t0, t1);
    w0 += t1 - t0;
  }
}

Status CheckArgs(const PagedKvLayout& lay, std::span<const int64_t> slots, size_t buffer_bytes,
                 int num_threads, const char* op) {
  if (lay.device() != DeviceType::kCpu) {
    return FailedPrecondition(std::string(op) + ": layout (" + lay.DebugString() +
                              ") is on a CUDA device; use the CUDA launchers");
  }
  if (num_threads < 1) {
    return InvalidArgument(std::string(op) + ": num_threads is " + std::to_string(num_threads) +
                           ", must be >= 1");
  }
  const size_t want = lay.ChunkBytes(static_cast<int64_t>(slots.size()));
  if (buffer_bytes != want) {
    return InvalidArgument(std::string(op) + ": chunk buffer is " + std::to_string(buffer_bytes) +
                           " bytes but " + std::to_string(slots.size()) + " tokens of " +
                           lay.DebugString() + " need " + std::to_string(want));
  }
  Status s = CheckSlots(lay, slots);
  if (!s.ok()) return s.Annotate(op);
  return Status::Ok();
}

Status CheckLayers(const PagedKvLayout& lay, int layer_begin, int layer_end, const char* op) {
  if (layer_begin < 0 || layer_begin > layer_end || layer_end > lay.num_layers()) {
    return InvalidArgument(std::string(op) + ": layers [" + std::to_string(layer_begin) + ", " +
                           std::to_string(layer_end) + ") are not a range of the layout's " +
                           std::to_string(lay.num_layers()) + " layers");
  }
  return Status::Ok();
}

// Copies layers [layer_begin, layer_end) (the whole (layer, token) work
// space of those layers, split between threads).
template <bool kGather>
void Run(const PagedKvLayout& lay, std::span<const int64_t> slots, std::byte* chunk,
         int num_threads, int layer_begin, int layer_end) {
  const int64_t n = static_cast<int64_t>(slots.size());
  const int64_t base = n * layer_begin;
  const int64_t work = n * (layer_end - layer_begin);
  if (work == 0) return;
  const size_t bytes = lay.LayerBytes(n) * static_cast<size_t>(layer_end - layer_begin);
  const int threads = static_cast<int>(std::clamp<size_t>(
      bytes / kMinBytesPerThread, 1, static_cast<size_t>(std::min<int64_t>(num_threads, work))));
  if (threads == 1) {
    CopyWork<kGather>(lay, slots, chunk, base, base + work);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  // Parts [0, started) run on this thread; a part whose thread the system
  // refused runs here too, so a refusal slows the copy down but never fails
  // it, and no joinable std::thread is ever destroyed (std::terminate).
  int started = threads;
  for (int t = 1; t < threads; ++t) {
    std::thread th;
    Status s = StartThread(&th, [&, t] {
      CopyWork<kGather>(lay, slots, chunk, base + work * t / threads, base + work * (t + 1) / threads);
    });
    if (!s.ok()) {
      (void)LogOnce(&g_thread_refusal_logged, s.Annotate("cpu copy (continuing on fewer threads)"));
      started = t;
      break;
    }
    pool.push_back(std::move(th));  // capacity reserved: cannot throw
  }
  CopyWork<kGather>(lay, slots, chunk, base, base + work / threads);
  if (started < threads) CopyWork<kGather>(lay, slots, chunk, base + work * started / threads, base + work);
  for (auto& th : pool) th.join();  // join: the workers' writes happen-before our return
}

}  // namespace

Status GatherCpu(const PagedKvLayout& layout, std::span<const int64_t> slots,
                 std::span<std::byte> dst, int num_threads) {
  KVT_RETURN_IF_ERROR(CheckArgs(layout, slots, dst.size(), num_threads, "gather"));
  Run<true>(layout, slots, dst.data(), num_threads, 0, layout.num_layers());
  return Status::Ok();
}

Status GatherCpuLayers(const PagedKvLayout& layout, std::span<const int64_t> slots, std::span<std::byte> dst,
                       int layer_begin, int layer_end, int num_threads) {
  KVT_RETURN_IF_ERROR(CheckArgs(layout, slots, dst.size(), num_threads, "gather"));
  KVT_RETURN_IF_ERROR(CheckLayers(layout, layer_begin, layer_end, "gather"));
  Run<true>(layout, slots, dst.data(), num_threads, layer_begin, layer_end);
  return Status::Ok();
}

Status ScatterCpuLayers(const PagedKvLayout& layout, std::span<const int64_t> slots,
                        std::span<const std::byte> src, int layer_begin, int layer_end, int num_threads) {
  KVT_RETURN_IF_ERROR(CheckArgs(layout, slots, src.size(), num_threads, "scatter"));
  KVT_RETURN_IF_ERROR(CheckLayers(layout, layer_begin, layer_end, "scatter"));
  Run<false>(layout, slots, const_cast<std::byte*>(src.data()), num_threads, layer_begin, layer_end);
  return Status::Ok();
}

Status ScatterCpu(const PagedKvLayout& layout, std::span<const int64_t> slots,
                  std::span<const std::byte> src, int num_threads) {
  KVT_RETURN_IF_ERROR(CheckArgs(layout, slots, src.size(), num_threads, "scatter"));
  // The chunk side is only read on this path; Move<false> never writes it.
  Run<false>(layout, slots, const_cast<std::byte*>(src.data()), num_threads, 0, layout.num_layers());
  return Status::Ok();
}

}  // namespace kvtier
