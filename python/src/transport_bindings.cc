// _kvtier.Transport: the peer transport (cc/transport) of one engine, and
// _kvtier.ucx_status() to ask whether UCX can be loaded at all. UCX is
// dlopen'ed on first use, so importing _kvtier never needs it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cc/transport/peer_transport.h"
#include "cc/transport/ucx_api.h"
#include "python/src/engine_bindings.h"
#include "python/src/status_to_exception.h"

namespace kvtier::py {
namespace pyb = pybind11;
using transport::PeerTransport;

namespace {

struct __attribute__((visibility("hidden"))) PyTransport {
  // The engine stays alive as long as the transport: Engine::close() in
  // Python closes the transport first, but a transport dropped late must not
  // see its engine destroyed under it.
  std::shared_ptr<Engine> engine;
  std::shared_ptr<PeerTransport> transport;  // null once closed
  std::mutex mu;                             // guards transport (not the calls)
};

std::shared_ptr<PeerTransport> TransportRef(PyTransport& t) {
  std::lock_guard<std::mutex> lock(t.mu);
  if (!t.transport) ThrowStatus(FailedPrecondition("transport is closed"));
  return t.transport;
}

pyb::dict StatsDict(const transport::TransportStats& s) {
  pyb::dict d;
#define KVT_STAT(f) d[#f] = s.f
  KVT_STAT(pulls);
  KVT_STAT(chunks_pulled);
  KVT_STAT(bytes_pulled);
  KVT_STAT(chunks_served);
  KVT_STAT(bytes_served);
  KVT_STAT(misses);
  KVT_STAT(corrupt);
  KVT_STAT(timeouts);
  KVT_STAT(errors);
  KVT_STAT(connected_peers);
  KVT_STAT(holds);
  KVT_STAT(holds_expired);
#undef KVT_STAT
  return d;
}

}  // namespace

void RegisterTransport(pyb::module_& m) {
  m.def(
      "ucx_status",
      [] {
        auto api = transport::UcxApi::Load();
        return std::make_pair(api.ok(), api.ok() ? std::string() : std::string(api.status().message()));
      },
      "(True, '') when UCX can be loaded (transport: ucx works), else (False, why).");
  m.def(
      "ucx_version",
      [] {
        auto api = transport::UcxApi::Load();
        return api.ok() ? std::string((*api)->version_string()) : std::string();
      },
      "The version of the UCX library loaded (e.g. '1.13.1'); '' when none can be.");

  pyb::class_<PyTransport, std::shared_ptr<PyTransport>>(m, "Transport",
                                                         "Peer-to-peer KV transfer over UCX (cc/transport).")
      .def(pyb::init([](PyEngine& e, const std::string& listen_host, int listen_port, uint32_t timeout_ms,
                        const std::string& fault) {
             transport::TransportOptions o;
             o.listen_host = listen_host;
             o.listen_port = listen_port;
             o.timeout_ms = timeout_ms;
             o.hooks = ValueOrThrow(transport::ParseFault(fault));
             auto t = std::make_shared<PyTransport>();
             t->engine = EngineRef(e);
             StatusOr<std::unique_ptr<PeerTransport>> created = InvalidArgument("unset");
             {
               pyb::gil_scoped_release nogil;
               created = PeerTransport::Create(t->engine.get(), o);
             }
             t->transport = ValueOrThrow(std::move(created));
             return t;
           }),
           pyb::arg("engine"), pyb::arg("listen_host") = "", pyb::arg("listen_port") = 0,
           pyb::arg("timeout_ms") = 5000, pyb::arg("fault") = "")
      .def_property_readonly("address",
                             [](PyTransport& t) -> std::optional<std::string> {
                               auto tr = TransportRef(t);
                               if (tr->address().empty()) return std::nullopt;
                               return tr->address();
                             })
      .def(
          "pull",
          [](PyTransport& t, const std::string& address, const TokenArray& tokens, uint64_t layout_id,
             const pyb::object& extras, bool release_hold) {
            auto tr = TransportRef(t);
            std::vector<int32_t> toks = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return tr->Pull(address, toks, layout_id, ExtrasPtr(x), release_hold);
          },
          pyb::arg("address"), pyb::arg("tokens"), pyb::arg("layout_id"), pyb::kw_only(),
          pyb::arg("extras") = pyb::none(), pyb::arg("release_hold") = true,
          "Pull the chunks past the local prefix from the producer at address; returns tokens cached locally.")
      .def(
          "hold",
          [](PyTransport& t, const TokenArray& tokens, double seconds, const pyb::object& extras) {
            auto tr = TransportRef(t);
            std::vector<int32_t> toks = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return tr->Hold(toks, ExtrasPtr(x), seconds);
          },
          pyb::arg("tokens"), pyb::arg("seconds"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Hold the CPU-resident prefix of tokens for a peer; returns chunks held.")
      .def("stats", [](PyTransport& t) { return StatsDict(TransportRef(t)->Stats()); })
      .def(
          "set_fault",
          [](PyTransport& t, const std::string& spec) {
            TransportRef(t)->SetHooks(ValueOrThrow(transport::ParseFault(spec)));
          },
          pyb::arg("spec"), "Test fault injection: none, drop, delay:MS, corrupt, truncate.")
      .def(
          "close",
          [](PyTransport& t) {
            std::shared_ptr<PeerTransport> dying;
            {
              std::lock_guard<std::mutex> lock(t.mu);
              dying = std::move(t.transport);
            }
            pyb::gil_scoped_release nogil;
            dying.reset();  // a pull in flight holds its own reference: the last one stops it
          },
          "Stop serving and close every endpoint. Idempotent.");
}

}  // namespace kvtier::py
