// The _kvtier extension is assembled from per-area registration functions,
// each in its own file and cc_library, so areas evolve independently.
//
// Binding-layer rules (see STYLE.md): exceptions are created here only,
// through ThrowIfError (status_to_exception.h); every call that can block
// (I/O, waits, copies of more than a few KiB) releases the GIL.
#pragma once

#include <pybind11/pybind11.h>

namespace kvtier::py {

void RegisterStatus(pybind11::module_& m);    // status_to_exception.cc
void RegisterDatapath(pybind11::module_& m);  // datapath_bindings.cc
void RegisterEngine(pybind11::module_& m);    // engine_bindings.cc
void RegisterCatalogue(pybind11::module_& m); // catalogue_bindings.cc
void RegisterLayerwise(pybind11::module_& m); // layerwise_bindings.cc (after RegisterEngine)

}  // namespace kvtier::py
