// Datapath bindings (issue 3): paged-KV layouts over engine tensors and the
// CPU gather/scatter, without copies at the boundary.
//
// Tensors are read by duck typing, never by linking torch: anything with
// data_ptr() / shape / stride() / element_size() / dtype / device (a torch
// tensor) or the Python buffer protocol (numpy, memoryview, bytearray). The
// layout object keeps a reference to every tensor it was built from, so the
// engine's KV cannot be freed while the layout is alive. Copies run with the
// GIL released; the caller's argument references keep slots and the chunk
// buffer alive for the duration of the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cc/datapath/cpu_copy.h"
#include "cc/datapath/kv_layout.h"
#include "python/src/bindings.h"
#include "python/src/datapath_bindings.h"
#include "python/src/status_to_exception.h"

#ifdef KVTIER_WITH_CUDA
#include "cuda/kv_copy.h"
#endif

namespace kvtier::py {
namespace {

namespace pyb = pybind11;

bool IsTorchLike(const pyb::handle& o) {
  return pyb::hasattr(o, "data_ptr") && pyb::hasattr(o, "stride") &&
         pyb::hasattr(o, "element_size");
}

StatusOr<KvDtype> DtypeFromFormat(const std::string& fmt, ssize_t itemsize) {
  // struct-module codes: the KV dtypes numpy can express. bf16/fp8 arrive as
  // torch tensors (or as raw uint8 views).
  if (fmt == "f" && itemsize == 4) return KvDtype::kFloat32;
  if (fmt == "e" && itemsize == 2) return KvDtype::kFloat16;
  if (fmt == "B" && itemsize == 1) return KvDtype::kUInt8;
  if (fmt == "b" && itemsize == 1) return KvDtype::kInt8;
  return InvalidArgument("unsupported buffer format '" + fmt + "' (" + std::to_string(itemsize) +
                         " bytes); KV tensors must be float32, float16, bfloat16, float8 or "
                         "uint8/int8");
}

StatusOr<DeviceType> DeviceOf(const pyb::handle& t, int* index) {
  pyb::object dev = t.attr("device");
  const std::string type = pyb::str(dev.attr("type"));
  pyb::object idx = dev.attr("index");
  *index = idx.is_none() ? 0 : idx.cast<int>();
  if (type == "cpu") return DeviceType::kCpu;
  if (type == "cuda") return DeviceType::kCuda;
  return InvalidArgument("unsupported device '" + std::string(pyb::str(dev)) +
                         "'; KV tensors must be on cpu or cuda");
}

// Reads one engine tensor. Needs the GIL.
StatusOr<TensorDesc> DescribeTensor(const pyb::handle& t, size_t layer) {
  const std::string where = "layer " + std::to_string(layer) + ": ";
  TensorDesc d;
  if (IsTorchLike(t)) {
    d.data = reinterpret_cast<std::byte*>(t.attr("data_ptr")().cast<uintptr_t>());
    d.shape = pyb::cast<std::vector<int64_t>>(pyb::tuple(t.attr("shape")));
    d.strides = pyb::cast<std::vector<int64_t>>(t.attr("stride")());
    d.elem_size = t.attr("element_size")().cast<int>();
    const std::string dtype = pyb::str(t.attr("dtype"));
    auto dt = ParseKvDtype(dtype);
    if (!dt.ok()) return dt.status().Annotate(where.substr(0, where.size() - 2));
    d.dtype = *dt;
    auto dev = DeviceOf(t, &d.device_index);
    if (!dev.ok()) return dev.status().Annotate(where.substr(0, where.size() - 2));
    d.device = *dev;
    return d;
  }
  if (!PyObject_CheckBuffer(t.ptr())) {
    return InvalidArgument(where + "object of type " +
                           std::string(pyb::str(pyb::type::handle_of(t).attr("__name__"))) +
                           " is neither a tensor nor a buffer");
  }
  pyb::buffer_info info = pyb::reinterpret_borrow<pyb::buffer>(t).request(/*writable=*/true);
  auto dt = DtypeFromFormat(info.format, info.itemsize);
  if (!dt.ok()) return dt.status().Annotate(where.substr(0, where.size() - 2));
  d.data = static_cast<std::byte*>(info.ptr);
  d.shape.assign(info.shape.begin(), info.shape.end());
  for (ssize_t s : info.strides) {
    if (s % info.itemsize != 0) {
      return InvalidArgument(where + "byte stride " + std::to_string(s) +
                             " is not a multiple of the element size");
    }
    d.strides.push_back(s / info.itemsize);
  }
  d.elem_size = static_cast<int>(info.itemsize);
  d.dtype = *dt;
  return d;
}

// A contiguous CPU byte range from a tensor or a buffer. Needs the GIL.
struct Bytes {
  std::byte* data = nullptr;
  size_t size = 0;
  std::string dtype;  // "int64" etc., for checks by the caller
};

StatusOr<Bytes> BytesOf(const pyb::handle& o, bool writable, const char* what) {
  Bytes b;
  if (IsTorchLike(o)) {
    int index = 0;
    KVT_ASSIGN_OR_RETURN(DeviceType dev, DeviceOf(o, &index));
    if (dev != DeviceType::kCpu) {
      return InvalidArgument(std::string(what) + " is on " +
                             std::string(pyb::str(o.attr("device"))) +
                             "; the CPU path needs CPU memory");
    }
    if (!o.attr("is_contiguous")().cast<bool>()) {
      return InvalidArgument(std::string(what) + " must be contiguous");
    }
    b.data = reinterpret_cast<std::byte*>(o.attr("data_ptr")().cast<uintptr_t>());
    b.size = o.attr("numel")().cast<size_t>() * o.attr("element_size")().cast<size_t>();
    b.dtype = pyb::str(o.attr("dtype"));
    if (b.dtype.starts_with("torch.")) b.dtype = b.dtype.substr(6);
    return b;
  }
  if (!PyObject_CheckBuffer(o.ptr())) {
    return InvalidArgument(std::string(what) + ": object of type " +
                           std::string(pyb::str(pyb::type::handle_of(o).attr("__name__"))) +
                           " is neither a tensor nor a buffer");
  }
  pyb::buffer_info info;
  try {
    info = pyb::reinterpret_borrow<pyb::buffer>(o).request(writable);
  } catch (pyb::error_already_set& e) {
    return InvalidArgument(std::string(what) + ": " + e.what());
  }
  ssize_t expect = info.itemsize;
  for (ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expect) {
      return InvalidArgument(std::string(what) + " must be C-contiguous");
    }
    expect *= info.shape[d];
  }
  b.data = static_cast<std::byte*>(info.ptr);
  b.size = static_cast<size_t>(info.size * info.itemsize);
  if ((info.format == "q" || info.format == "l") && info.itemsize == 8) {
    b.dtype = "int64";
  } else {
    b.dtype = "format '" + info.format + "'";
  }
  return b;
}

StatusOr<std::span<const int64_t>> SlotsOf(const pyb::handle& o) {
  KVT_ASSIGN_OR_RETURN(Bytes b, BytesOf(o, /*writable=*/false, "slot_mapping"));
  if (b.dtype != "int64") {
    return InvalidArgument("slot_mapping must be int64, got " + b.dtype);
  }
  return std::span<const int64_t>(reinterpret_cast<const int64_t*>(b.data), b.size / 8);
}

std::shared_ptr<PyLayout> MakeLayout(const pyb::sequence& layers, const std::string& kind_name) {
  KvLayoutKind kind = ValueOrThrow(ParseKvLayoutKind(kind_name));
  std::vector<TensorDesc> descs;
  pyb::list owners;
  for (size_t i = 0; i < layers.size(); ++i) {
    pyb::object t = layers[i];
    descs.push_back(ValueOrThrow(DescribeTensor(t, i)));
    owners.append(t);
  }
  return std::make_shared<PyLayout>(
      PyLayout{ValueOrThrow(PagedKvLayout::Create(descs, kind)), std::move(owners)});
}

std::string IdHex(uint64_t id) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(id));
  return buf;
}

}  // namespace

void RegisterDatapath(pybind11::module_& m) {
  pyb::class_<PyLayout, std::shared_ptr<PyLayout>>(m, "PagedKvLayout", R"doc(
Paged KV layout over an engine's per-layer KV tensors (no copy; the tensors
are kept alive by this object).

kind: "auto", "flash_attn" [2, blocks, block, heads, head], "flash_infer"
[blocks, 2, block, heads, head], "packed_kv" (vLLM 0.33) [blocks, heads, block,
2*head], "vllm_cpu" (vLLM CPU 0.32) [blocks, heads, block, 2*head], "mla"
[blocks, block, head]. Chunk buffer format: per layer K[tokens][heads*head]
then V[tokens][heads*head] (MLA: the latent only), contiguous.
)doc")
      .def(pyb::init(&MakeLayout), pyb::arg("layers"), pyb::arg("kind") = "auto")
      .def_property_readonly("layout_id", [](const PyLayout& l) { return l.layout.layout_id(); })
      .def_property_readonly("kind",
                             [](const PyLayout& l) { return KvLayoutKindName(l.layout.kind()); })
      .def_property_readonly("num_layers", [](const PyLayout& l) { return l.layout.num_layers(); })
      .def_property_readonly("num_blocks", [](const PyLayout& l) { return l.layout.num_blocks(); })
      .def_property_readonly("block_size", [](const PyLayout& l) { return l.layout.block_size(); })
      .def_property_readonly("num_heads", [](const PyLayout& l) { return l.layout.num_heads(); })
      .def_property_readonly("head_size", [](const PyLayout& l) { return l.layout.head_size(); })
      .def_property_readonly("elem_size", [](const PyLayout& l) { return l.layout.elem_size(); })
      .def_property_readonly("dtype",
                             [](const PyLayout& l) { return KvDtypeName(l.layout.dtype()); })
      .def_property_readonly("has_v", [](const PyLayout& l) { return l.layout.has_v(); })
      .def_property_readonly("num_slots", [](const PyLayout& l) { return l.layout.num_slots(); })
      .def_property_readonly("device",
                             [](const PyLayout& l) {
                               return l.layout.device() == DeviceType::kCpu
                                          ? std::string("cpu")
                                          : "cuda:" + std::to_string(l.layout.device_index());
                             })
      .def_property_readonly("tensors", [](const PyLayout& l) { return l.owners; })
      .def(
          "chunk_bytes",
          [](const PyLayout& l, int64_t n) {
            if (n < 0) ThrowStatus(InvalidArgument("num_tokens must be >= 0"));
            return l.layout.ChunkBytes(n);
          },
          pyb::arg("num_tokens"))
      .def(
          "layer_bytes",
          [](const PyLayout& l, int64_t n) {
            if (n < 0) ThrowStatus(InvalidArgument("num_tokens must be >= 0"));
            return l.layout.LayerBytes(n);
          },
          pyb::arg("num_tokens"))
      .def(
          "layer_offset",
          [](const PyLayout& l, int layer, int64_t n) {
            if (layer < 0 || layer >= l.layout.num_layers()) {
              ThrowStatus(InvalidArgument("layer " + std::to_string(layer) + " out of range 0.." +
                                          std::to_string(l.layout.num_layers() - 1)));
            }
            if (n < 0) ThrowStatus(InvalidArgument("num_tokens must be >= 0"));
            return l.layout.LayerOffset(layer, n);
          },
          pyb::arg("layer"), pyb::arg("num_tokens"))
      .def(
          "check_compatible",
          [](const PyLayout& l, uint64_t id) { ThrowIfError(CheckCompatible(l.layout, id)); },
          pyb::arg("chunk_layout_id"),
          "Raises InvalidArgumentError when a chunk stored with this layout id may not be "
          "scattered here.")
      .def("__repr__", [](const PyLayout& l) {
        return "PagedKvLayout(" + l.layout.DebugString() + ", id=" + IdHex(l.layout.layout_id()) +
               ")";
      });

  m.def(
      "gather",
      [](const PyLayout& l, const pyb::object& slots, const pyb::object& out, int num_threads) {
        auto s = ValueOrThrow(SlotsOf(slots));
        Bytes dst = ValueOrThrow(BytesOf(out, /*writable=*/true, "out"));
        Status st;
        {
          pyb::gil_scoped_release nogil;
          st = GatherCpu(l.layout, s, std::span<std::byte>(dst.data, dst.size), num_threads);
        }
        ThrowIfError(st);
      },
      pyb::arg("layout"), pyb::arg("slot_mapping"), pyb::arg("out"), pyb::arg("num_threads") = 1,
      "Paged KV -> chunk buffer (CPU). `out` must be exactly layout.chunk_bytes(len(slots)) "
      "bytes; slots < 0 leave their bytes untouched.");

  m.def(
      "scatter",
      [](const PyLayout& l, const pyb::object& slots, const pyb::object& src, int num_threads,
         pyb::object chunk_layout_id) {
        auto s = ValueOrThrow(SlotsOf(slots));
        if (!chunk_layout_id.is_none()) {
          ThrowIfError(CheckCompatible(l.layout, chunk_layout_id.cast<uint64_t>()));
        }
        Bytes b = ValueOrThrow(BytesOf(src, /*writable=*/false, "src"));
        Status st;
        {
          pyb::gil_scoped_release nogil;
          st = ScatterCpu(l.layout, s, std::span<const std::byte>(b.data, b.size), num_threads);
        }
        ThrowIfError(st);
      },
      pyb::arg("layout"), pyb::arg("slot_mapping"), pyb::arg("src"), pyb::arg("num_threads") = 1,
      pyb::arg("chunk_layout_id") = pyb::none(),
      "Chunk buffer -> paged KV (CPU). With chunk_layout_id, refuses a chunk gathered from "
      "another layout.");

  m.def(
      "cuda_runtime_available",
      []() {
#ifdef KVTIER_WITH_CUDA
        return CudaRuntimeAvailable();
#else
        return false;
#endif
      },
      "True when this build carries the CUDA kernels and a CUDA device is usable.");
}

}  // namespace kvtier::py
