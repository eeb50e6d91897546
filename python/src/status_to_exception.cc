#include "python/src/status_to_exception.h"

#include <array>
#include <string>

#include "python/src/bindings.h"

namespace kvtier::py {
namespace {

namespace pyb = pybind11;

// Index by StatusCode; filled once by RegisterStatus.
std::array<PyObject*, static_cast<size_t>(StatusCode::kInternal) + 1> g_exceptions{};

}  // namespace

void ThrowStatus(const Status& s) {
  PyObject* type = g_exceptions[static_cast<size_t>(s.code())];
  if (type == nullptr) type = PyExc_RuntimeError;
  PyErr_SetString(type, std::string(s.message()).c_str());
  throw pyb::error_already_set();
}

void RegisterStatus(pyb::module_& m) {
  pyb::object base = pyb::reinterpret_steal<pyb::object>(
      PyErr_NewException("kvtier._kvtier.KvtierError", PyExc_RuntimeError, nullptr));
  m.attr("KvtierError") = base;
  struct Spec {
    StatusCode code;
    const char* name;
    PyObject* extra_base;
  };
  const Spec specs[] = {
      {StatusCode::kNotFound, "NotFoundError", PyExc_KeyError},
      {StatusCode::kAlreadyExists, "AlreadyExistsError", nullptr},
      {StatusCode::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError},
      {StatusCode::kResourceExhausted, "ResourceExhaustedError", PyExc_MemoryError},
      {StatusCode::kFailedPrecondition, "FailedPreconditionError", nullptr},
      {StatusCode::kUnavailable, "UnavailableError", nullptr},
      {StatusCode::kDataLoss, "DataLossError", nullptr},
      {StatusCode::kIoError, "IoError", PyExc_OSError},
      {StatusCode::kNotImplemented, "NotImplementedByBuildError", PyExc_NotImplementedError},
      {StatusCode::kInternal, "InternalError", nullptr},
  };
  for (const Spec& sp : specs) {
    pyb::tuple bases = sp.extra_base ? pyb::tuple(pyb::make_tuple(base, pyb::handle(sp.extra_base)))
                                     : pyb::tuple(pyb::make_tuple(base));
    std::string full = std::string("kvtier._kvtier.") + sp.name;
    PyObject* exc = PyErr_NewException(full.c_str(), bases.ptr(), nullptr);
    if (exc == nullptr) throw pyb::error_already_set();
    m.attr(sp.name) = pyb::reinterpret_steal<pyb::object>(exc);
    g_exceptions[static_cast<size_t>(sp.code)] = exc;  // module attribute keeps it alive
  }
}

}  // namespace kvtier::py
