// Datapath bindings: filled in by the data-path work (issue 3).
#include "python/src/bindings.h"

namespace kvtier::py {

void RegisterDatapath(pybind11::module_& m) {}

}  // namespace kvtier::py
