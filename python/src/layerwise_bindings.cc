// Layer-wise transfer (cc/engine/layerwise.h) for Python: LayerSignal,
// Engine.store_paged_layerwise and Engine.load_paged_layerwise. CPU layouts
// only; the vLLM connector uses them when `layerwise: true`.
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

namespace kvtier::py {
namespace pyb = pybind11;

namespace {

using SlotArray = pyb::array_t<int64_t, pyb::array::c_style | pyb::array::forcecast>;

std::vector<int64_t> CopySlots(const SlotArray& slots) {
  if (slots.ndim() != 1) ThrowStatus(InvalidArgument("slot_mapping must be 1-D"));
  return {slots.data(), slots.data() + slots.shape(0)};
}

void CheckCpu(const PyLayout& layout) {
  if (layout.layout.device() != DeviceType::kCpu) {
    ThrowStatus(FailedPrecondition("layer-wise transfer is implemented for CPU layouts only; layout is " +
                                   layout.layout.DebugString()));
  }
}

struct __attribute__((visibility("hidden"))) PyLayerwiseLoad {
  std::shared_ptr<PyLayout> layout;  // the destination tensors outlive the copy
  std::unique_ptr<LayerwiseLoad> load;
  ~PyLayerwiseLoad() {
    pyb::gil_scoped_release nogil;  // joins the copy thread
    load.reset();
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

  pyb::class_<PyLayerwiseLoad>(m, "LayerwiseLoadHandle", R"doc(
A layer-wise load of several requests' cached prefixes. valid_tokens (one per
request) is known at once; the layers are copied in order on a thread of the
load's own, and wait_layer(i) returns once layer i of every request is in
the paged KV.
)doc")
      .def_property_readonly("valid_tokens",
                             [](const PyLayerwiseLoad& l) {
                               std::vector<size_t> v(l.load->num_requests());
                               for (size_t i = 0; i < v.size(); ++i) v[i] = l.load->valid_tokens(i);
                               return v;
                             })
      .def_property_readonly("chunks", [](const PyLayerwiseLoad& l) { return l.load->chunks(); })
      .def("request_error",
           [](const PyLayerwiseLoad& l, size_t i) -> std::optional<std::string> {
             if (i >= l.load->num_requests()) ThrowStatus(InvalidArgument("no request " + std::to_string(i)));
             const Status& s = l.load->request_status(i);
             if (s.ok()) return std::nullopt;
             return s.ToString();
           })
      .def("done", [](const PyLayerwiseLoad& l) { return l.load->done(); })
      .def(
          "wait_layer",
          [](PyLayerwiseLoad& l, int layer) {
            Status s;
            {
              pyb::gil_scoped_release nogil;
              s = l.load->WaitLayer(layer);
            }
            ThrowIfError(s);
          },
          pyb::arg("layer"))
      .def("wait", [](PyLayerwiseLoad& l) {
        Status s;
        {
          pyb::gil_scoped_release nogil;
          s = l.load->Wait();
        }
        ThrowIfError(s);
      });

  auto cls = pyb::reinterpret_borrow<pyb::class_<PyEngine, std::shared_ptr<PyEngine>>>(m.attr("Engine"));
  cls.def(
      "store_paged_layerwise",
      [](PyEngine& e, const TokenArray& tokens, const SlotArray& slots, int64_t skip_tokens,
         const std::shared_ptr<PyLayout>& layout, const std::shared_ptr<LayerSignal>& signal,
         const pyb::object& key_extras) {
        if (skip_tokens < 0) ThrowStatus(InvalidArgument("skip_tokens must be >= 0"));
        CheckCpu(*layout);
        std::shared_ptr<Engine> eng = EngineRef(e);
        ActiveCall active(e);
        std::vector<int32_t> t = CopyTokens(tokens);
        std::vector<int64_t> s = CopySlots(slots);
        std::optional<KeyExtras> extras = ExtrasOf(key_extras);
        StatusOr<std::shared_ptr<StoreHandle>> h = Status();
        {
          pyb::gil_scoped_release nogil;
          h = StoreLayerwise(*eng, layout->layout, t, s, static_cast<size_t>(skip_tokens), signal, ExtrasPtr(extras));
        }
        return ValueOrThrow(std::move(h));
      },
      pyb::arg("tokens"), pyb::arg("slot_mapping"), pyb::arg("skip_tokens"), pyb::arg("layout"),
      pyb::arg("signal"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
      "store_paged, but each layer of a chunk is copied once `signal` reports it final (CPU layouts).");

  cls.def(
      "load_paged_layerwise",
      [](PyEngine& e, const pyb::list& requests, const std::shared_ptr<PyLayout>& layout) {
        CheckCpu(*layout);
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
        StatusOr<std::unique_ptr<LayerwiseLoad>> l = Status();
        {
          pyb::gil_scoped_release nogil;
          l = LayerwiseLoad::Start(std::move(eng), layout->layout, std::move(reqs));
        }
        out->load = ValueOrThrow(std::move(l));
        return out;
      },
      pyb::arg("requests"), pyb::arg("layout"),
      "Lease the cached prefix of each (tokens, slot_mapping, skip_tokens[, extras]) and scatter it "
      "into the paged KV layer by layer on a thread of its own; returns a LayerwiseLoadHandle.");
}

}  // namespace kvtier::py
