// CatalogueView bindings: kvtier::CatalogueView as _kvtier.CatalogueView,
// and CatalogueShmName as _kvtier.catalogue_shm_name.
//
// The vLLM scheduler asks this view, once per new request, how many tokens
// every worker rank holds; lookups hash the prompt once per rank and release
// the GIL while they do.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cc/engine/catalogue_view.h"
#include "python/src/bindings.h"
#include "python/src/engine_bindings.h"
#include "python/src/status_to_exception.h"

namespace kvtier::py {
namespace pyb = pybind11;

void RegisterCatalogue(pyb::module_& m) {
  m.def("catalogue_shm_name", &CatalogueShmName, pyb::arg("deployment"), pyb::arg("rank"), pyb::arg("world_size"),
        "The POSIX shm name of a rank's shared catalogue in a deployment.");

  m.def(
      "reclaim_stale_catalogues",
      [] {
        StatusOr<size_t> n = [] {
          pyb::gil_scoped_release nogil;
          return ReclaimStaleCatalogues();
        }();
        return ValueOrThrow(std::move(n));  // raises with the GIL held
      },
      "Unlinks the shared catalogues of this uid whose owner process is gone; returns how many.");

  pyb::class_<CatalogueView>(m, "CatalogueView")
      .def(pyb::init([](const std::vector<std::pair<std::string, pyb::dict>>& ranks, uint32_t chunk_size,
                        const std::string& partial_chunks, int64_t recheck_ms, const pyb::dict& remote) {
             CatalogueViewOptions o;
             for (const auto& [name, ns] : ranks) o.ranks.push_back({name, NamespaceOf(ns)});
             o.chunk_tokens = chunk_size;
             o.partial = ParsePartial(partial_chunks);
             o.recheck_ms = recheck_ms;
             auto str = [&](const char* k) { return remote.contains(k) ? remote[k].cast<std::string>() : std::string(); };
             o.remote.url = str("remote_url");
             o.remote.username = str("remote_username");
             o.remote.password = str("remote_password");
             o.remote.tls_ca_file = str("remote_tls_ca_file");
             if (remote.contains("remote_timeout_ms")) {
               o.remote.timeout = std::chrono::milliseconds(remote["remote_timeout_ms"].cast<int64_t>());
             }
             return ValueOrThrow(CatalogueView::Create(o));
           }),
           pyb::arg("ranks"), pyb::arg("chunk_size"), pyb::arg("partial_chunks"), pyb::arg("recheck_ms") = 1000,
           pyb::arg("remote") = pyb::dict(),
           "ranks: [(shm_name, native namespace dict)], one per rank, in rank order. remote: the remote_* "
           "options (remote_url empty or absent: no remote).")
      .def_property_readonly("has_remote", &CatalogueView::has_remote)
      .def(
          "lookup_with_remote",
          [](CatalogueView& v, const TokenArray& tokens, const pyb::object& extras) {
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            size_t local = 0, total = 0;
            {
              pyb::gil_scoped_release nogil;
              total = v.LookupWithRemote(t, ExtrasPtr(x), &local);
            }
            return pyb::make_tuple(total, local);
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "(tokens cached on every rank locally or in the remote, of which local) as a prefix.")
      .def_property_readonly("num_ranks", &CatalogueView::num_ranks)
      .def(
          "lookup",
          [](CatalogueView& v, const TokenArray& tokens, const pyb::object& extras) {
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return v.Lookup(t, ExtrasPtr(x));
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Leading tokens cached on every rank.")
      .def(
          "lookup_rank",
          [](CatalogueView& v, size_t rank, const TokenArray& tokens, const pyb::object& extras) {
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return v.LookupRank(rank, t, ExtrasPtr(x));
          },
          pyb::arg("rank"), pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Leading tokens cached on one rank.")
      .def(
          "ranks_open",
          [](CatalogueView& v) {
            pyb::gil_scoped_release nogil;
            return v.ranks_open();
          },
          "Ranks whose shared catalogue is mapped now.");
}

}  // namespace kvtier::py
