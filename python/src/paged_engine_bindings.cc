// store_paged / retrieve_paged: the engine's store and retrieve composed with
// the data path, so KV moves between the inference engine's paged cache and
// kvtier's slab memory in one copy, with no Python on the per-chunk path.
//
// Lifetimes: the layout is copied by value into the store's fill function
// (it is a few pointers and strides; no Python object crosses to the copy
// threads). The paged KV it points to must stay allocated until the store
// handle is done: the vLLM connector holds the request's blocks until then.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cc/datapath/cpu_copy.h"
#include "cc/datapath/kv_layout.h"
#include "python/src/datapath_bindings.h"
#include "python/src/engine_bindings.h"
#include "python/src/status_to_exception.h"

namespace kvtier::py {
namespace pyb = pybind11;

namespace {

using TokenArray = pyb::array_t<int32_t, pyb::array::c_style | pyb::array::forcecast>;
using SlotArray = pyb::array_t<int64_t, pyb::array::c_style | pyb::array::forcecast>;

struct PagedArgs {
  std::vector<int32_t> tokens;
  std::vector<int64_t> slots;
};

std::shared_ptr<PagedArgs> CopyArgs(const TokenArray& tokens, const SlotArray& slots, const PyLayout& layout) {
  if (tokens.ndim() != 1) ThrowStatus(InvalidArgument("tokens must be 1-D"));
  if (slots.ndim() != 1) ThrowStatus(InvalidArgument("slot_mapping must be 1-D"));
  if (slots.shape(0) != tokens.shape(0)) {
    ThrowStatus(InvalidArgument("slot_mapping has " + std::to_string(slots.shape(0)) + " entries for " +
                                std::to_string(tokens.shape(0)) + " tokens; it needs one slot per token"));
  }
  if (layout.layout.device() != DeviceType::kCpu) {
    ThrowStatus(NotImplemented("store/retrieve of KV on a CUDA device is not wired into the engine yet; "
                               "layout is " + layout.layout.DebugString()));
  }
  auto args = std::make_shared<PagedArgs>();
  args->tokens.assign(tokens.data(), tokens.data() + tokens.shape(0));
  args->slots.assign(slots.data(), slots.data() + slots.shape(0));
  ThrowIfError(CheckSlots(layout.layout, args->slots));
  return args;
}

// 0 (auto) scatters on the calling thread alone: inside an inference engine
// the cores belong to its compute threads (vLLM CPU pins OpenMP threads that
// spin between steps), and extra copy threads there measured 2.7x slower
// than one (BENCHMARKS.md).
int CopyThreads(int requested) { return requested > 0 ? requested : 1; }

}  // namespace

void RegisterPagedEngine(pyb::module_& m) {
  auto cls = pyb::reinterpret_borrow<pyb::class_<PyEngine, std::shared_ptr<PyEngine>>>(m.attr("Engine"));
  cls.def(
      "store_paged",
      [](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
         const std::shared_ptr<PyLayout>& layout) {
        auto eng = EngineRef(e);
        if (skip_tokens < 0) ThrowStatus(InvalidArgument("skip_tokens must be >= 0"));
        std::shared_ptr<PagedArgs> args = CopyArgs(tokens, slots, *layout);
        const PagedKvLayout lay = layout->layout;  // by value: see the file comment
        auto chunk_bytes = [lay](uint32_t n) { return lay.ChunkBytes(n); };
        auto fill = [lay, args](const ChunkHash& c, std::span<std::byte> dst) -> Status {
          std::span<const int64_t> s(args->slots.data() + c.begin, c.num_tokens);
          if (std::any_of(s.begin(), s.end(), [](int64_t v) { return v < 0; })) {
            return InvalidArgument("chunk at token " + std::to_string(c.begin) +
                                   " has padding slots (< 0); only computed tokens can be stored");
          }
          return GatherCpu(lay, s, dst, 1);  // chunks already run in parallel
        };
        StatusOr<std::shared_ptr<StoreHandle>> h = Status();
        {
          pyb::gil_scoped_release nogil;
          h = eng->Store(args->tokens, static_cast<size_t>(skip_tokens), lay.layout_id(), chunk_bytes,
                         std::move(fill));
        }
        return ValueOrThrow(std::move(h));
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      "Gather the paged KV of uncached chunks (starting at or after skip_tokens) into kvtier, "
      "asynchronously. The KV must stay untouched until the handle is done.");

  cls.def(
      "retrieve_paged",
      [](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
         const std::shared_ptr<PyLayout>& layout, int num_threads) {
        auto eng = EngineRef(e);
        if (skip_tokens < 0) ThrowStatus(InvalidArgument("skip_tokens must be >= 0"));
        std::shared_ptr<PagedArgs> args = CopyArgs(tokens, slots, *layout);
        // Tokens the destination already holds are never written.
        const size_t skip = std::min<size_t>(static_cast<size_t>(skip_tokens), args->slots.size());
        std::fill(args->slots.begin(), args->slots.begin() + skip, int64_t{-1});
        const PagedKvLayout& lay = layout->layout;  // the caller's reference keeps it alive
        const int threads = CopyThreads(num_threads);
        StatusOr<size_t> n = Status();
        {
          pyb::gil_scoped_release nogil;
          n = eng->Retrieve(args->tokens, skip, lay.layout_id(),
                            [&](const ChunkHash& c, std::span<const std::byte> src) -> Status {
                              std::span<const int64_t> s(args->slots.data() + c.begin, c.num_tokens);
                              return ScatterCpu(lay, s, src, threads);
                            });
        }
        return ValueOrThrow(std::move(n));
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      pyb::arg("num_threads") = 0,
      "Scatter the cached prefix (beyond skip_tokens) into the paged KV; returns the number of "
      "leading tokens now valid there.");
}

}  // namespace kvtier::py
