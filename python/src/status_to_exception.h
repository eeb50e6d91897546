// One table from kvtier::StatusCode to Python exceptions. The Python classes
// live in kvtier/errors.py-compatible names on the _kvtier module:
//   KvtierError (base, RuntimeError) and, per code, NotFoundError,
//   InvalidArgumentError (also a ValueError), ResourceExhaustedError,
//   FailedPreconditionError, UnavailableError, DataLossError, IoError
//   (also an OSError), NotImplementedError_ (also NotImplementedError),
//   InternalError, AlreadyExistsError.
#pragma once

#include <pybind11/pybind11.h>

#include "cc/common/status.h"

namespace kvtier::py {

// Raises the Python exception for a non-OK status (needs the GIL).
[[noreturn]] void ThrowStatus(const Status& s);

inline void ThrowIfError(const Status& s) {
  if (!s.ok()) ThrowStatus(s);
}

template <typename T>
T ValueOrThrow(StatusOr<T>&& v) {
  if (!v.ok()) ThrowStatus(v.status());
  return std::move(v).value();
}

}  // namespace kvtier::py
