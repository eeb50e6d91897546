// store_paged / retrieve_paged: the engine's store and retrieve composed with
// the data path, so KV moves between the inference engine's paged cache and
// kvtier's slab memory in one copy, with no Python on the per-chunk path.
//
// Lifetimes: the layout is copied by value into the store's fill function
// (it is a few pointers and strides; no Python object crosses to the copy
// threads). The paged KV it points to must stay allocated until the store
// handle is done: the vLLM connector holds the request's blocks until then.
//
// KV on a CUDA device (builds with --config=cuda, i.e. the wheel): the calls
// go to a CudaPagedIo (cuda/paged_io.h), made once per (engine, layout) and
// cached on the PyEngine together with the PyLayout, so the tensors outlive
// every copy; close() drains the engine before dropping them. `stream` is a
// cudaStream_t as an integer (torch.cuda.Stream.cuda_stream); 0 is the
// legacy default stream. Without CUDA in the build, or without a usable
// device, CUDA layouts get a clear error and nothing moves.
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

#ifdef KVTIER_WITH_CUDA
#include "cuda/paged_io.h"
#endif

namespace kvtier::py {
namespace pyb = pybind11;

namespace {

using SlotArray = pyb::array_t<int64_t, pyb::array::c_style | pyb::array::forcecast>;

struct PagedArgs {
  std::vector<int32_t> tokens;
  std::vector<int64_t> slots;
  size_t skip = 0;
};

// Copies and checks the arguments of a paged call (needs the GIL). Slot
// ranges are checked here for CPU layouts; CudaPagedIo checks its own.
std::shared_ptr<PagedArgs> CopyArgs(const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
                                    const PyLayout& layout) {
  if (skip_tokens < 0) ThrowStatus(InvalidArgument("skip_tokens must be >= 0"));
  if (tokens.ndim() != 1) ThrowStatus(InvalidArgument("tokens must be 1-D"));
  if (slots.ndim() != 1) ThrowStatus(InvalidArgument("slot_mapping must be 1-D"));
  if (slots.shape(0) != tokens.shape(0)) {
    ThrowStatus(InvalidArgument("slot_mapping has " + std::to_string(slots.shape(0)) + " entries for " +
                                std::to_string(tokens.shape(0)) + " tokens; it needs one slot per token"));
  }
#ifndef KVTIER_WITH_CUDA
  if (layout.layout.device() != DeviceType::kCpu) {
    ThrowStatus(FailedPrecondition("this kvtier build has no CUDA kernels (built without --config=cuda); "
                                   "layout is " + layout.layout.DebugString()));
  }
#endif
  auto args = std::make_shared<PagedArgs>();
  args->tokens.assign(tokens.data(), tokens.data() + tokens.shape(0));
  args->slots.assign(slots.data(), slots.data() + slots.shape(0));
  args->skip = static_cast<size_t>(skip_tokens);
  if (layout.layout.device() == DeviceType::kCpu) ThrowIfError(CheckSlots(layout.layout, args->slots));
  return args;
}

// How every paged call starts (GIL held): the engine, or "closed"; the call
// counted as active, so close() waits for it; the arguments, checked.
struct PagedCall {
  PagedCall(PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
            const PyLayout& layout, const pyb::handle& key_extras)
      : eng(EngineRef(e)),
        active(e),
        args(CopyArgs(tokens, slots, skip_tokens, layout)),
        extras(ExtrasOf(key_extras)) {}
  std::shared_ptr<Engine> eng;
  ActiveCall active;
  std::shared_ptr<PagedArgs> args;
  std::optional<KeyExtras> extras;
};

// 0 (auto) scatters on the calling thread alone: inside an inference engine
// the cores belong to its compute threads (vLLM CPU pins OpenMP threads that
// spin between steps), and extra copy threads there measured 2.7x slower
// than one (BENCHMARKS.md).
int CopyThreads(int requested) { return requested > 0 ? requested : 1; }

// One retrieve as Python sees it: the CPU path is finished when returned;
// the CUDA path may still be in flight on its stream. Always created and
// destroyed with the GIL held.
struct __attribute__((visibility("hidden"))) PyLoad {
  size_t valid_tokens = 0;
  size_t chunks = 0;
  // The destination tensors: alive until the copy into them is complete
  // (declared first, so destroyed after `cuda` has waited).
  std::shared_ptr<PyLayout> layout;
#ifdef KVTIER_WITH_CUDA
  std::unique_ptr<CudaLoad> cuda;
#endif
  ~PyLoad() {
#ifdef KVTIER_WITH_CUDA
    if (cuda != nullptr) {
      // Waits for the copy and may drop the last reference to a closed
      // engine: neither with the GIL held.
      pybind11::gil_scoped_release nogil;
      cuda.reset();
    }
#endif
  }
};

#ifdef KVTIER_WITH_CUDA
bool OnCuda(const PyLayout& l) { return l.layout.device() == DeviceType::kCuda; }

CudaStream StreamOf(uintptr_t s) { return reinterpret_cast<CudaStream>(s); }
#endif

}  // namespace

#ifdef KVTIER_WITH_CUDA
std::shared_ptr<CudaPagedIo> CudaIoFor(PyEngine& e, const std::shared_ptr<Engine>& eng,
                                       const std::shared_ptr<PyLayout>& layout) {
  for (const auto& [l, io] : e.cuda_io) {
    if (l.get() == layout.get()) return std::static_pointer_cast<CudaPagedIo>(io);
  }
  StatusOr<std::shared_ptr<CudaPagedIo>> io = Status();
  {
    pyb::gil_scoped_release nogil;  // cudaHostRegister pins the whole CPU tier
    io = CudaPagedIo::Create(eng, layout->layout);
  }
  std::shared_ptr<CudaPagedIo> out = ValueOrThrow(std::move(io));
  if (e.engine == nullptr) {
    // close() ran while the GIL was released: do not keep the engine alive.
    pyb::gil_scoped_release nogil;
    out.reset();
    ThrowStatus(FailedPrecondition("engine is closed"));
  }
  e.cuda_io.emplace_back(layout, out);
  return out;
}
#endif

void RegisterPagedEngine(pyb::module_& m) {
  auto cls = pyb::reinterpret_borrow<pyb::class_<PyEngine, std::shared_ptr<PyEngine>>>(m.attr("Engine"));
  cls.def(
      "store_paged",
      [](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
         const std::shared_ptr<PyLayout>& layout, uintptr_t stream, const pyb::object& extras) {
        PagedCall call(e, tokens, slots, skip_tokens, *layout, extras);
        const std::shared_ptr<PagedArgs>& args = call.args;
#ifdef KVTIER_WITH_CUDA
        if (OnCuda(*layout)) {
          std::shared_ptr<CudaPagedIo> io = CudaIoFor(e, call.eng, layout);
          StatusOr<std::shared_ptr<StoreHandle>> h = Status();
          {
            pyb::gil_scoped_release nogil;
            h = io->Store(args->tokens, args->slots, args->skip, StreamOf(stream), ExtrasPtr(call.extras));
          }
          return ValueOrThrow(std::move(h));
        }
#else
        (void)stream;
#endif
        const PagedKvLayout lay = layout->layout;  // by value: see the file comment
        auto chunk_bytes = [lay](uint32_t n) { return lay.ChunkBytes(n); };
        auto fill = [lay, args](const ChunkHash& c, std::span<std::byte> dst) -> Status {
          std::span<const int64_t> s(args->slots.data() + c.begin, c.num_tokens);
          KVT_RETURN_IF_ERROR(CheckNoPadding(s, c.begin));
          return GatherCpu(lay, s, dst, 1);  // chunks already run in parallel
        };
        StatusOr<std::shared_ptr<StoreHandle>> h = Status();
        {
          pyb::gil_scoped_release nogil;
          h = call.eng->Store(args->tokens, args->skip, lay.layout_id(), chunk_bytes, std::move(fill),
                             ExtrasPtr(call.extras));
        }
        return ValueOrThrow(std::move(h));
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      pyb::arg("stream") = 0, pyb::kw_only(), pyb::arg("extras") = pyb::none(),
      "Gather the paged KV of uncached chunks (starting at or after skip_tokens) into kvtier, "
      "asynchronously. The KV must stay untouched until the handle is done. CUDA layouts: the "
      "copies start once `stream` (a cudaStream_t as int) has reached this point.");

  // Both retrieve entry points: CPU layouts scatter synchronously; CUDA
  // layouts enqueue on `stream` and return a PyLoad still in flight.
  auto retrieve = [](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
                     const std::shared_ptr<PyLayout>& layout, int num_threads, uintptr_t stream,
                     const pyb::object& extras) {
    PagedCall call(e, tokens, slots, skip_tokens, *layout, extras);
    const std::shared_ptr<PagedArgs>& args = call.args;
    auto load = std::make_unique<PyLoad>();
    load->layout = layout;
#ifdef KVTIER_WITH_CUDA
    if (OnCuda(*layout)) {
      std::shared_ptr<CudaPagedIo> io = CudaIoFor(e, call.eng, layout);
      StatusOr<std::unique_ptr<CudaLoad>> l = Status();
      {
        pyb::gil_scoped_release nogil;
        l = io->Retrieve(args->tokens, args->slots, args->skip, StreamOf(stream), ExtrasPtr(call.extras));
      }
      load->cuda = ValueOrThrow(std::move(l));
      load->valid_tokens = load->cuda->valid_tokens();
      load->chunks = load->cuda->chunks();
      return load;
    }
#else
    (void)stream;
#endif
    // Tokens the destination already holds are never written.
    const size_t skip = std::min(args->skip, args->slots.size());
    std::fill(args->slots.begin(), args->slots.begin() + skip, int64_t{-1});
    const PagedKvLayout& lay = layout->layout;  // the caller's reference keeps it alive
    const int threads = CopyThreads(num_threads);
    StatusOr<size_t> n = Status();
    size_t chunks = 0;
    {
      pyb::gil_scoped_release nogil;
      n = call.eng->Retrieve(args->tokens, skip, lay.layout_id(),
                        [&](const ChunkHash& c, std::span<const std::byte> src) -> Status {
                          std::span<const int64_t> s(args->slots.data() + c.begin, c.num_tokens);
                          ++chunks;
                          return ScatterCpu(lay, s, src, threads);
                        },
                        ExtrasPtr(call.extras));
    }
    load->valid_tokens = ValueOrThrow(std::move(n));
    load->chunks = chunks;
    return load;
  };

  pyb::class_<PyLoad>(m, "LoadHandle", R"doc(
A retrieve of paged KV. valid_tokens is known at once. On a CUDA layout the
copy may still be in flight on the stream it was enqueued on: work queued on
that stream afterwards sees the KV, and the cached chunks stay pinned until
done() is True or wait() returned (dropping the handle waits too). On a CPU
layout the copy is already complete.
)doc")
      .def_property_readonly("valid_tokens", [](const PyLoad& l) { return l.valid_tokens; })
      .def_property_readonly("chunks", [](const PyLoad& l) { return l.chunks; })
      .def("done",
           [](PyLoad& l) {
#ifdef KVTIER_WITH_CUDA
             if (l.cuda) return l.cuda->done();
#endif
             (void)l;
             return true;
           })
      .def(
          "wait",
          [](PyLoad& l) {
#ifdef KVTIER_WITH_CUDA
            if (l.cuda) {
              Status s;
              {
                pyb::gil_scoped_release nogil;
                s = l.cuda->Wait();
              }
              ThrowIfError(s);
            }
#endif
            return l.valid_tokens;
          },
          "Blocks until the copy is complete; returns valid_tokens.");

  cls.def(
      "retrieve_paged",
      [retrieve](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
                 const std::shared_ptr<PyLayout>& layout, int num_threads, uintptr_t stream,
                 const pyb::object& extras) {
        std::unique_ptr<PyLoad> load = retrieve(e, tokens, slots, skip_tokens, layout, num_threads, stream, extras);
#ifdef KVTIER_WITH_CUDA
        if (load->cuda) {
          Status s;
          {
            pyb::gil_scoped_release nogil;
            s = load->cuda->Wait();
          }
          ThrowIfError(s);
        }
#endif
        return load->valid_tokens;
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      pyb::arg("num_threads") = 0, pyb::arg("stream") = 0, pyb::kw_only(), pyb::arg("extras") = pyb::none(),
      "Scatter the cached prefix (beyond skip_tokens) into the paged KV and wait for it; returns "
      "the number of leading tokens now valid there.");

  cls.def(
      "retrieve_paged_on_stream",
      [retrieve](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
                 const std::shared_ptr<PyLayout>& layout, uintptr_t stream, const pyb::object& extras) {
        return retrieve(e, tokens, slots, skip_tokens, layout, 0, stream, extras);
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      pyb::arg("stream") = 0, pyb::kw_only(), pyb::arg("extras") = pyb::none(),
      "Enqueue the load of the cached prefix on a CUDA stream and return a LoadHandle at once "
      "(CPU layouts: the copy is done when it returns).");
}

}  // namespace kvtier::py
