// Engine bindings: filled in with the engine facade.
#include "python/src/bindings.h"

namespace kvtier::py {

void RegisterEngine(pybind11::module_& m) {}

}  // namespace kvtier::py
