// Shared between the engine bindings and the paged-KV bindings that extend
// _kvtier.Engine with store_paged / retrieve_paged.
#pragma once

#include <atomic>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "cc/engine/engine.h"
#include "cc/hash/chunk_hash.h"
#include "python/src/status_to_exception.h"

#ifdef KVTIER_WITH_CUDA
namespace kvtier {
class CudaPagedIo;
}  // namespace kvtier
#endif

namespace kvtier::py {

struct PyLayout;

struct __attribute__((visibility("hidden"))) PyEngine {
  std::shared_ptr<Engine> engine;  // null once closed
  // CUDA data paths made for this engine, one per layout (a CudaPagedIo
  // behind void, so this header needs no CUDA). The PyLayout keeps the KV
  // tensors alive for as long as the data path may copy them (a layout
  // registered again stays referenced until close). GIL-guarded.
  std::vector<std::pair<std::shared_ptr<PyLayout>, std::shared_ptr<void>>> cuda_io;
  // Calls that took the engine and may still submit copies (ActiveCall);
  // close() waits for them before draining.
  std::atomic<int> calls{0};

  // Collected without close(): the same orderly shutdown.
  ~PyEngine();
};

// Held by a call that submits copies of the engine's KV tensors.
// Construct with the GIL held, after EngineRef.
class __attribute__((visibility("hidden"))) ActiveCall {
 public:
  explicit ActiveCall(PyEngine& e) : e_(e) { e_.calls.fetch_add(1); }
  ~ActiveCall() { e_.calls.fetch_sub(1); }
  ActiveCall(const ActiveCall&) = delete;
  ActiveCall& operator=(const ActiveCall&) = delete;

 private:
  PyEngine& e_;
};

// close(): waits for active calls and drains every copy (GIL released),
// then drops the CUDA data paths and the engine without the GIL and the KV
// tensors with it. Needs the GIL; idempotent.
void ShutdownEngine(PyEngine& e);

// Throws FailedPreconditionError when closed. Take the copy while holding
// the GIL; use it after releasing.
std::shared_ptr<Engine> EngineRef(PyEngine& e);

// A kvtier.KeyExtras (read by its .salt and .spans attributes) as the
// engine's KeyExtras; None gives nullopt. str ids are UTF-8 encoded, then
// str and bytes alike go through IdentityKey. Throws InvalidArgumentError (a
// ValueError) for wrong types, a span outside [0, 2^32), begin >= end or
// unsorted spans, so the engine never sees invalid extras. Needs the GIL.
std::optional<KeyExtras> ExtrasOf(const pybind11::handle& extras);

// The pointer to hand the engine: null for no extras.
inline const KeyExtras* ExtrasPtr(const std::optional<KeyExtras>& e) { return e ? &*e : nullptr; }

#ifdef KVTIER_WITH_CUDA
// The engine's CudaPagedIo for a CUDA layout, made on first use and cached on
// the PyEngine with the layout (so the KV tensors outlive every copy). Needs
// the GIL; throws when CUDA is unusable or the engine was closed meanwhile.
std::shared_ptr<CudaPagedIo> CudaIoFor(PyEngine& e, const std::shared_ptr<Engine>& eng,
                                       const std::shared_ptr<PyLayout>& layout);
#endif

// Token ids as every binding takes them: int32, C order. Its caster (below)
// takes an ndarray, a sequence or anything numpy.asarray takes, of ANY
// integer dtype, and converts it once, at the boundary. It never casts a
// non-integer: a float32 array truncated to ids would hash, store and
// retrieve some other prefix without a word. TypeError for a non-integer
// dtype (an empty sequence, float64 to numpy, is no tokens), and
// InvalidArgumentError (a ValueError) for a value outside int32; both name
// the argument and the dtype.
class __attribute__((visibility("hidden"))) TokenArray : public pybind11::array_t<int32_t, pybind11::array::c_style> {
 public:
  using array_t::array_t;
  TokenArray() = default;
};

// The tokens as a vector the GIL-free part of a call can read; throws
// InvalidArgumentError unless 1-D. Needs the GIL.
std::vector<int32_t> CopyTokens(const TokenArray& tokens);

// "keep" / "drop" as the hasher's policy; InvalidArgumentError otherwise.
PartialChunkPolicy ParsePartial(const std::string& v);

// The hash namespace of a native options dict (model, dtype, layout,
// namespace, rank, world_size; the user namespace is folded into the
// layout), exactly as an Engine built from the same dict hashes. Needs the GIL.
HashNamespace NamespaceOf(const pybind11::dict& d);

// Adds the paged-KV methods to the already registered _kvtier.Engine.
void RegisterPagedEngine(pybind11::module_& m);

}  // namespace kvtier::py

namespace pybind11::detail {
template <>
struct __attribute__((visibility("hidden"))) type_caster<kvtier::py::TokenArray> {
  // Named in signatures as the int32 array it converts to.
  using Converted = array_t<int32_t, array::c_style | array::forcecast>;
  PYBIND11_TYPE_CASTER(kvtier::py::TokenArray, make_caster<Converted>::name);
  // Throws (see TokenArray) instead of returning false for a wrong dtype or
  // value, so the error names them rather than "incompatible arguments".
  bool load(handle src, bool convert);
  static handle cast(const kvtier::py::TokenArray& a, return_value_policy, handle) { return a.inc_ref(); }
};

// Inline (in every translation unit that converts tokens): the caster is
// hidden, so a definition in one library would not link into another.
inline bool type_caster<kvtier::py::TokenArray>::load(handle src, bool convert) {
  using Exact = array_t<int32_t, array::c_style>;
  if (Exact::check_(src)) {  // already int32, C order: no copy
    value = reinterpret_borrow<kvtier::py::TokenArray>(src);
    return true;
  }
  if (!convert) return false;
  const bool is_array = isinstance<array>(src);
  array a = array::ensure(src);  // numpy.asarray: lists, tuples, CPU tensors
  if (!a) return false;
  const char kind = a.dtype().kind();
  const std::string dtype = str(a.dtype());
  if (kind != 'i' && kind != 'u') {
    if (!is_array && a.size() == 0) {
      value = kvtier::py::TokenArray(0);
      return true;
    }
    throw type_error("tokens must be integer token ids, got " + std::string(is_array ? "an array" : "a sequence") +
                     " of dtype " + dtype + " (not cast: a non-integer id is a caller's bug)");
  }
  if (a.size() > 0 && (a.itemsize() > 4 || (kind == 'u' && a.itemsize() == 4))) {
    const object lo = a.attr("min")(), hi = a.attr("max")();
    if (lo < int_(std::numeric_limits<int32_t>::min()) || hi > int_(std::numeric_limits<int32_t>::max())) {
      kvtier::py::ThrowStatus(kvtier::InvalidArgument(
          "tokens of dtype " + dtype + " hold " + std::string(str(lo < int_(std::numeric_limits<int32_t>::min()) ? lo : hi)) +
          ", outside the int32 range of token ids [-2147483648, 2147483647]"));
    }
  }
  auto converted = Converted::ensure(a);
  if (!converted) throw type_error("tokens of dtype " + dtype + " could not be converted to int32");
  value = reinterpret_borrow<kvtier::py::TokenArray>(converted);
  return true;
}
}  // namespace pybind11::detail
