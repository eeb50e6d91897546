// Layer-wise transfer for Python: LayerSignal, CudaLayerSignal,
// Engine.store_paged_layerwise and Engine.load_paged_layerwise. CPU layouts
// go to cc/engine/layerwise.h; CUDA layouts (builds with --config=cuda) to
// cuda/layerwise_io.h, where signals are CUDA events recorded on the
// forward's stream and a load's wait_layer makes a stream wait (no host
// wait). The vLLM connector uses them when `layerwise: true`.
//
// Lifetimes: a LayerwiseLoadHandle keeps the layout (so the KV tensors) and,
// through the C++ load, the engine alive until its copy thread has finished;
// dropping the handle waits for that thread without the GIL. A layer-wise
// store captures the layout by value like store_paged: the KV must stay
// allocated and unmodified (after its layer is reported) until the handle
// is done.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cc/engine/layerwise.h"
#include "python/src/bindings.h"
#include "python/src/datapath_bindings.h"
#include "python/src/engine_bindings.h"
#include "python/src/status_to_exception.h"

#ifdef KVTIER_WITH_CUDA
#include "cuda/layerwise_io.h"
#endif

namespace kvtier::py {
namespace pyb = pybind11;

namespace {

using SlotArray = pyb::array_t<int64_t, pyb::array::c_style | pyb::array::forcecast>;

std::vector<int64_t> CopySlots(const SlotArray& slots) {
  if (slots.ndim() != 1) ThrowStatus(InvalidArgument("slot_mapping must be 1-D"));
  return {slots.data(), slots.data() + slots.shape(0)};
}

// True for a CUDA layout (this build has the CUDA path); throws for a CUDA
// layout in a build without it.
bool OnCuda(const PyLayout& layout) {
  if (layout.layout.device() == DeviceType::kCpu) return false;
#ifdef KVTIER_WITH_CUDA
  return true;
#else
  ThrowStatus(FailedPrecondition("this kvtier build has no CUDA kernels (built without --config=cuda); layout is " +
                                 layout.layout.DebugString()));
#endif
}

#ifdef KVTIER_WITH_CUDA
CudaStream StreamOf(uintptr_t s) { return reinterpret_cast<CudaStream>(s); }
#endif

// One of the two loads, by the layout's device.
struct __attribute__((visibility("hidden"))) PyLayerwiseLoad {
  std::shared_ptr<PyLayout> layout;  // the destination tensors outlive the copy
  std::unique_ptr<LayerwiseLoad> load;
#ifdef KVTIER_WITH_CUDA
  std::unique_ptr<CudaLayerwiseLoad> cuda;
#endif
  ~PyLayerwiseLoad() {
    pyb::gil_scoped_release nogil;  // joins the copy thread / waits for the GPU
    load.reset();
#ifdef KVTIER_WITH_CUDA
    cuda.reset();
#endif
  }
  size_t num_requests() const {
#ifdef KVTIER_WITH_CUDA
    if (cuda) return cuda->num_requests();
#endif
    return load->num_requests();
  }
  size_t valid_tokens(size_t i) const {
#ifdef KVTIER_WITH_CUDA
    if (cuda) return cuda->valid_tokens(i);
#endif
    return load->valid_tokens(i);
  }
  const Status& request_status(size_t i) const {
#ifdef KVTIER_WITH_CUDA
    if (cuda) return cuda->request_status(i);
#endif
    return load->request_status(i);
  }
  size_t chunks() const {
#ifdef KVTIER_WITH_CUDA
    if (cuda) return cuda->chunks();
#endif
    return load->chunks();
  }
};

}  // namespace

void RegisterLayerwise(pyb::module_& m) {
  pyb::class_<LayerSignal, std::shared_ptr<LayerSignal>>(m, "LayerSignal", R"doc(
Which layers of one forward pass are final, for layer-wise stores: call
layer_ready(i) once layer i's KV is written, all_ready() when the pass is
over, abort() if it failed. A store waiting on the signal gives up (stores
nothing) on abort() or once timeout_ms have passed since the signal was made.
)doc")
      .def(pyb::init([](int num_layers, int64_t timeout_ms) {
             if (num_layers < 0) ThrowStatus(InvalidArgument("num_layers must be >= 0"));
             if (timeout_ms <= 0) ThrowStatus(InvalidArgument("timeout_ms must be > 0"));
             return std::make_shared<LayerSignal>(num_layers, std::chrono::milliseconds(timeout_ms));
           }),
           pyb::arg("num_layers"), pyb::arg("timeout_ms") = 30000)
      .def_property_readonly("num_layers", &LayerSignal::num_layers)
      .def_property_readonly("finished", &LayerSignal::finished)
      .def("layer_ready", [](LayerSignal& s, int layer) { ThrowIfError(s.LayerReady(layer)); }, pyb::arg("layer"))
      .def("all_ready", &LayerSignal::AllReady)
      .def("abort", &LayerSignal::Abort);

#ifdef KVTIER_WITH_CUDA
  pyb::class_<CudaLayerSignal, std::shared_ptr<CudaLayerSignal>>(m, "CudaLayerSignal", R"doc(
LayerSignal for a CUDA layout: layer_ready(i, stream) records a CUDA event on
`stream` (a cudaStream_t as int; the forward pass's) after the kernels that
wrote layer i's KV, and a layer-wise store gathers layer i on its own stream
once that event has completed. all_ready(stream) records every layer not yet
reported; abort() makes waiting stores give up (they store nothing).
)doc")
      .def(pyb::init([](int device, int num_layers, int64_t timeout_ms) {
             if (timeout_ms <= 0) ThrowStatus(InvalidArgument("timeout_ms must be > 0"));
             return ValueOrThrow(CudaLayerSignal::Create(device, num_layers, std::chrono::milliseconds(timeout_ms)));
           }),
           pyb::arg("device"), pyb::arg("num_layers"), pyb::arg("timeout_ms") = 30000)
      .def_property_readonly("num_layers", &CudaLayerSignal::num_layers)
      .def_property_readonly("device", &CudaLayerSignal::device)
      .def_property_readonly("finished", &CudaLayerSignal::finished)
      .def(
          "layer_ready", [](CudaLayerSignal& s, int layer, uintptr_t stream) { ThrowIfError(s.LayerReady(layer, StreamOf(stream))); },
          pyb::arg("layer"), pyb::arg("stream") = 0)
      .def(
          "all_ready", [](CudaLayerSignal& s, uintptr_t stream) { ThrowIfError(s.AllReady(StreamOf(stream))); },
          pyb::arg("stream") = 0)
      .def("abort", &CudaLayerSignal::Abort);
#endif

  pyb::class_<PyLayerwiseLoad>(m, "LayerwiseLoadHandle", R"doc(
A layer-wise load of several requests' cached prefixes. valid_tokens (one per
request) is known at once. CPU layouts: the layers are copied in order on a
thread of the load's own, and wait_layer(i) returns once layer i of every
request is in the paged KV. CUDA layouts: the layers are enqueued in order
on a stream of the load's own; wait_layer(i, stream) makes `stream` (default:
the stream the load was started on) wait for layer i without blocking the
caller, done() polls, wait() blocks until every layer is in place.
)doc")
      .def_property_readonly("valid_tokens",
                             [](const PyLayerwiseLoad& l) {
                               std::vector<size_t> v(l.num_requests());
                               for (size_t i = 0; i < v.size(); ++i) v[i] = l.valid_tokens(i);
                               return v;
                             })
      .def_property_readonly("chunks", [](const PyLayerwiseLoad& l) { return l.chunks(); })
      .def("request_error",
           [](const PyLayerwiseLoad& l, size_t i) -> std::optional<std::string> {
             if (i >= l.num_requests()) ThrowStatus(InvalidArgument("no request " + std::to_string(i)));
             const Status& s = l.request_status(i);
             if (s.ok()) return std::nullopt;
             return s.ToString();
           })
      .def("done",
           [](PyLayerwiseLoad& l) {
#ifdef KVTIER_WITH_CUDA
             if (l.cuda) return l.cuda->done();
#endif
             return l.load->done();
           })
      .def(
          "wait_layer",
          [](PyLayerwiseLoad& l, int layer, std::optional<uintptr_t> stream) {
            Status s;
            {
              pyb::gil_scoped_release nogil;
#ifdef KVTIER_WITH_CUDA
              if (l.cuda) {
                s = l.cuda->WaitLayer(layer, stream ? StreamOf(*stream) : l.cuda->stream());
              } else {
                s = l.load->WaitLayer(layer);
              }
#else
              (void)stream;
              s = l.load->WaitLayer(layer);
#endif
            }
            ThrowIfError(s);
          },
          pyb::arg("layer"), pyb::arg("stream") = pyb::none())
      .def("wait", [](PyLayerwiseLoad& l) {
        Status s;
        {
          pyb::gil_scoped_release nogil;
#ifdef KVTIER_WITH_CUDA
          if (l.cuda) {
            s = l.cuda->Wait();
          } else {
            s = l.load->Wait();
          }
#else
          s = l.load->Wait();
#endif
        }
        ThrowIfError(s);
      });

  auto cls = pyb::reinterpret_borrow<pyb::class_<PyEngine, std::shared_ptr<PyEngine>>>(m.attr("Engine"));
  cls.def(
      "store_paged_layerwise",
      [](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
         const std::shared_ptr<PyLayout>& layout, const pyb::object& signal, const pyb::object& key_extras) {
        if (skip_tokens < 0) ThrowStatus(InvalidArgument("skip_tokens must be >= 0"));
        const bool cuda = OnCuda(*layout);
        std::shared_ptr<Engine> eng = EngineRef(e);
        ActiveCall active(e);
        std::vector<int32_t> t = CopyTokens(tokens);
        std::vector<int64_t> s = CopySlots(slots);
        std::optional<KeyExtras> extras = ExtrasOf(key_extras);
        StatusOr<std::shared_ptr<StoreHandle>> h = Status();
#ifdef KVTIER_WITH_CUDA
        if (cuda) {
          if (!pyb::isinstance<CudaLayerSignal>(signal)) {
            ThrowStatus(InvalidArgument("a CUDA layout's layer-wise store takes a CudaLayerSignal"));
          }
          auto sig = signal.cast<std::shared_ptr<CudaLayerSignal>>();
          std::shared_ptr<CudaPagedIo> io = CudaIoFor(e, eng, layout);
          pyb::gil_scoped_release nogil;
          h = CudaStoreLayerwise(*io, t, s, static_cast<size_t>(skip_tokens), std::move(sig), ExtrasPtr(extras));
        }
#endif
        if (!cuda) {
          if (!pyb::isinstance<LayerSignal>(signal)) {
            ThrowStatus(InvalidArgument("a CPU layout's layer-wise store takes a LayerSignal"));
          }
          auto sig = signal.cast<std::shared_ptr<LayerSignal>>();
          pyb::gil_scoped_release nogil;
          h = StoreLayerwise(*eng, layout->layout, t, s, static_cast<size_t>(skip_tokens), std::move(sig),
                             ExtrasPtr(extras));
        }
        return ValueOrThrow(std::move(h));
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      pyb::arg("signal"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
      "store_paged, but each layer of a chunk is copied once `signal` reports it final (a LayerSignal "
      "for CPU layouts, a CudaLayerSignal for CUDA layouts).");

  cls.def(
      "load_paged_layerwise",
      [](PyEngine& e, const pyb::list& requests, const std::shared_ptr<PyLayout>& layout, uintptr_t stream) {
        const bool cuda = OnCuda(*layout);
        std::shared_ptr<Engine> eng = EngineRef(e);
        std::vector<LayerwiseRequest> reqs;
        reqs.reserve(requests.size());
        for (const pyb::handle& item : requests) {
          if (!pyb::isinstance<pyb::tuple>(item)) {
            ThrowStatus(InvalidArgument("each request is a tuple (tokens, slot_mapping, skip_tokens[, extras])"));
          }
          auto tup = pyb::reinterpret_borrow<pyb::tuple>(item);
          if (tup.size() != 3 && tup.size() != 4) {
            ThrowStatus(InvalidArgument("each request is (tokens, slot_mapping, skip_tokens[, extras])"));
          }
          LayerwiseRequest r;
          r.tokens = CopyTokens(tup[0].cast<TokenArray>());
          r.slots = CopySlots(tup[1].cast<SlotArray>());
          const int64_t skip = tup[2].cast<int64_t>();
          if (skip < 0) ThrowStatus(InvalidArgument("skip_tokens must be >= 0"));
          r.skip_tokens = static_cast<size_t>(skip);
          if (tup.size() == 4) r.extras = ExtrasOf(tup[3]);
          reqs.push_back(std::move(r));
        }
        auto out = std::make_unique<PyLayerwiseLoad>();
        out->layout = layout;
#ifdef KVTIER_WITH_CUDA
        if (cuda) {
          ActiveCall active(e);
          std::shared_ptr<CudaPagedIo> io = CudaIoFor(e, eng, layout);
          StatusOr<std::unique_ptr<CudaLayerwiseLoad>> l = Status();
          {
            pyb::gil_scoped_release nogil;
            l = CudaLayerwiseLoad::Start(std::move(io), std::move(reqs), StreamOf(stream));
          }
          out->cuda = ValueOrThrow(std::move(l));
          return out;
        }
#else
        (void)stream;
#endif
        (void)cuda;
        StatusOr<std::unique_ptr<LayerwiseLoad>> l = Status();
        {
          pyb::gil_scoped_release nogil;
          l = LayerwiseLoad::Start(std::move(eng), layout->layout, std::move(reqs));
        }
        out->load = ValueOrThrow(std::move(l));
        return out;
      },
      pyb::arg("requests"), pyb::arg("layout"), pyb::arg("stream") = 0,
      "Lease the cached prefix of each (tokens, slot_mapping, skip_tokens[, extras]) and scatter it "
      "into the paged KV layer by layer; returns a LayerwiseLoadHandle. CUDA layouts: enqueued on a "
      "stream of the load's own after the work already on `stream` (a cudaStream_t as int).");
}

}  // namespace kvtier::py
