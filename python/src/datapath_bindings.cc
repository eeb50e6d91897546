// Datapath bindings (issue 3): paged-KV layouts over engine tensors and the
// CPU gather/scatter, without copies at the boundary.
//
// Tensors are read by duck typing, never by linking torch: anything with
// data_ptr() / shape / stride() / element_size() / dtype / device (a torch
// tensor) or the Python buffer protocol (numpy, memoryview, bytearray). The
// layout object keeps a reference to every tensor it was built from, so the
// engine's KV cannot be freed while the layout is alive (and holds a buffer
// export of each buffer-protocol tensor, so it cannot be resized either).
// Copies run with the GIL released; the caller's argument references keep
// slots and the chunk buffer alive, and the held buffer exports keep their
// memory in place, for the duration of the call. Every buffer must be
// C-contiguous: a strided view's bytes are not a flat range at its pointer.
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
#include <cuda_runtime.h>

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

// Slots with the export that keeps them valid. Needs the GIL.
struct Slots {
  std::span<const int64_t> slots;
  Bytes bytes;
};

StatusOr<Slots> SlotsOf(const pyb::handle& o) {
  Slots s;
  KVT_ASSIGN_OR_RETURN(s.bytes, BytesOf(o, /*writable=*/false, "slot_mapping"));
  if (s.bytes.dtype != "int64") {
    return InvalidArgument("slot_mapping must be int64, got " + s.bytes.dtype);
  }
  s.slots = std::span<const int64_t>(reinterpret_cast<const int64_t*>(s.bytes.data), s.bytes.size / 8);
  return s;
}

std::shared_ptr<PyLayout> MakeLayout(const pyb::sequence& layers, const std::string& kind_name) {
  KvLayoutKind kind = ValueOrThrow(ParseKvLayoutKind(kind_name));
  std::vector<TensorDesc> descs;
  pyb::list owners;
  pyb::list exports;
  for (size_t i = 0; i < layers.size(); ++i) {
    pyb::object t = layers[i];
    descs.push_back(ValueOrThrow(DescribeTensor(t, i)));
    owners.append(t);
    if (!IsTorchLike(t)) {
      // Always a new memoryview (pyb::memoryview(t) would reuse t if it is
      // one, and hold no export of its own).
      PyObject* mv = PyMemoryView_FromObject(t.ptr());
      if (mv == nullptr) throw pyb::error_already_set();
      exports.append(pyb::reinterpret_steal<pyb::object>(mv));
    }
  }
  return std::make_shared<PyLayout>(
      PyLayout{ValueOrThrow(PagedKvLayout::Create(descs, kind)), std::move(owners), std::move(exports), nullptr});
}

std::string IdHex(uint64_t id) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(id));
  return buf;
}

#ifdef KVTIER_WITH_CUDA

// A device address for a tensor's bytes: CUDA memory on the layout's device,
// or pinned host memory (torch's pin_memory()). Needs the GIL.
StatusOr<std::byte*> DeviceAddress(const pyb::handle& o, const PagedKvLayout& l, size_t want, const char* what) {
  if (!IsTorchLike(o)) {
    return InvalidArgument(std::string(what) + " must be a torch tensor (CUDA, or pinned CPU memory) for a " +
                           "layout on cuda:" + std::to_string(l.device_index()));
  }
  if (!o.attr("is_contiguous")().cast<bool>()) return InvalidArgument(std::string(what) + " must be contiguous");
  const size_t size = o.attr("numel")().cast<size_t>() * o.attr("element_size")().cast<size_t>();
  if (size != want) {
    return InvalidArgument(std::string(what) + " is " + std::to_string(size) + " bytes; the chunk needs " +
                           std::to_string(want));
  }
  auto* ptr = reinterpret_cast<void*>(o.attr("data_ptr")().cast<uintptr_t>());
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return CudaErrorStatus(std::string(what) + ": cudaPointerGetAttributes", e);
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
    if (attr.device != l.device_index()) {
      return InvalidArgument(std::string(what) + " is on cuda:" + std::to_string(attr.device) +
                             ", the layout on cuda:" + std::to_string(l.device_index()));
    }
    return static_cast<std::byte*>(ptr);
  }
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr) {
    return static_cast<std::byte*>(attr.devicePointer);
  }
  return InvalidArgument(std::string(what) +
                         " is pageable CPU memory, which a GPU kernel cannot reach; pass a CUDA tensor "
                         "or tensor.pin_memory()");
}

// Module-level gather/scatter of a CUDA layout: synchronous (waits for its
// own stream work), for tools and tests; the engine's path is CudaPagedIo.
void CudaCopy(PyLayout& pl, const pyb::handle& slots_obj, const pyb::handle& buf, bool gather, uintptr_t stream_h) {
  const PagedKvLayout& l = pl.layout;
  if (!pl.cuda_layout) {
    pl.cuda_layout = std::make_shared<CudaKvLayout>(ValueOrThrow(CudaKvLayout::Create(l)));
  }
  const auto& cl = *std::static_pointer_cast<CudaKvLayout>(pl.cuda_layout);
  // Slots: a CUDA int64 tensor is used in place; CPU slots are checked here
  // and uploaded.
  const int64_t* dev_slots = nullptr;
  std::vector<int64_t> host_slots;
  bool slots_on_device = false;
  if (IsTorchLike(slots_obj)) {
    int index = 0;
    if (ValueOrThrow(DeviceOf(slots_obj, &index)) == DeviceType::kCuda) {
      if (index != l.device_index()) {
        ThrowStatus(InvalidArgument("slot_mapping is on cuda:" + std::to_string(index) + ", the layout on cuda:" +
                                    std::to_string(l.device_index())));
      }
      if (std::string(pyb::str(slots_obj.attr("dtype"))) != "torch.int64") {
        ThrowStatus(InvalidArgument("slot_mapping must be int64"));
      }
      if (!slots_obj.attr("is_contiguous")().cast<bool>()) ThrowStatus(InvalidArgument("slot_mapping must be contiguous"));
      dev_slots = reinterpret_cast<const int64_t*>(slots_obj.attr("data_ptr")().cast<uintptr_t>());
      host_slots.resize(slots_obj.attr("numel")().cast<size_t>());
      slots_on_device = true;
    }
  }
  if (!slots_on_device) {
    const Slots s = ValueOrThrow(SlotsOf(slots_obj));
    ThrowIfError(CheckSlots(l, s.slots));
    host_slots.assign(s.slots.begin(), s.slots.end());
  }
  const size_t n = host_slots.size();
  std::byte* chunk = ValueOrThrow(DeviceAddress(buf, l, l.ChunkBytes(static_cast<int64_t>(n)), gather ? "out" : "src"));
  auto stream = reinterpret_cast<cudaStream_t>(stream_h);
  Status st;
  {
    pyb::gil_scoped_release nogil;
    st = [&]() -> Status {
      CudaDeviceGuard device(l.device_index());
      KVT_RETURN_IF_ERROR(device.status());
      int64_t* upload = nullptr;
      int* bad = nullptr;
      auto cleanup = [&] {
        if (upload != nullptr) cudaFreeAsync(upload, stream);
        if (bad != nullptr) cudaFreeAsync(bad, stream);
        cudaStreamSynchronize(stream);
      };
      cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&bad), sizeof(int), stream);
      if (e == cudaSuccess) e = cudaMemsetAsync(bad, 0, sizeof(int), stream);
      if (e == cudaSuccess && !slots_on_device && n > 0) {
        e = cudaMallocAsync(reinterpret_cast<void**>(&upload), n * sizeof(int64_t), stream);
        if (e == cudaSuccess) {
          e = cudaMemcpyAsync(upload, host_slots.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream);
        }
        dev_slots = upload;
      }
      if (e != cudaSuccess) {
        cleanup();
        return CudaErrorStatus("staging the slot mapping", e);
      }
      const ChunkCopy copy{dev_slots, static_cast<int64_t>(n), chunk, l.ChunkBytes(static_cast<int64_t>(n))};
      Status s = gather ? GatherCuda(cl, std::span<const ChunkCopy>(&copy, 1), stream, bad)
                        : ScatterCuda(cl, std::span<const ChunkCopy>(&copy, 1), stream, bad);
      int bad_host = 0;
      if (s.ok()) {
        e = cudaMemcpyAsync(&bad_host, bad, sizeof(int), cudaMemcpyDeviceToHost, stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
        if (e != cudaSuccess) s = CudaErrorStatus(gather ? "gather" : "scatter", e);
      }
      cleanup();
      if (s.ok() && bad_host != 0) {
        s = InvalidArgument("slot_mapping has slots >= " + std::to_string(l.num_slots()) +
                            " (out of range for the layout); those tokens were skipped");
      }
      return s;
    }();
  }
  ThrowIfError(st);
}
#endif  // KVTIER_WITH_CUDA

}  // namespace

StatusOr<Bytes> BytesOf(const pyb::handle& o, bool writable, const std::string& what) {
  Bytes b;
  if (IsTorchLike(o)) {
    int index = 0;
    KVT_ASSIGN_OR_RETURN(DeviceType dev, DeviceOf(o, &index));
    if (dev != DeviceType::kCpu) {
      return InvalidArgument(what + " is on " +
                             std::string(pyb::str(o.attr("device"))) +
                             "; the CPU path needs CPU memory");
    }
    if (!o.attr("is_contiguous")().cast<bool>()) {
      return InvalidArgument(what + " must be contiguous");
    }
    b.data = reinterpret_cast<std::byte*>(o.attr("data_ptr")().cast<uintptr_t>());
    b.size = o.attr("numel")().cast<size_t>() * o.attr("element_size")().cast<size_t>();
    b.dtype = pyb::str(o.attr("dtype"));
    if (b.dtype.starts_with("torch.")) b.dtype = b.dtype.substr(6);
    return b;
  }
  if (!PyObject_CheckBuffer(o.ptr())) {
    return InvalidArgument(what + ": object of type " +
                           std::string(pyb::str(pyb::type::handle_of(o).attr("__name__"))) +
                           " is neither a tensor nor a buffer");
  }
  auto info = std::make_shared<pyb::buffer_info>();
  try {
    *info = pyb::reinterpret_borrow<pyb::buffer>(o).request(writable);
  } catch (pyb::error_already_set& e) {
    return InvalidArgument(what + ": " + e.what());
  }
  ssize_t expect = info->itemsize;
  for (ssize_t d = info->ndim - 1; d >= 0; --d) {
    if (info->shape[d] != 1 && info->strides[d] != expect) {
      return InvalidArgument(what + " must be C-contiguous");
    }
    expect *= info->shape[d];
  }
  b.data = static_cast<std::byte*>(info->ptr);
  b.size = static_cast<size_t>(info->size * info->itemsize);
  if ((info->format == "q" || info->format == "l") && info->itemsize == 8) {
    b.dtype = "int64";
  } else {
    b.dtype = "format '" + info->format + "'";
  }
  b.held = std::move(info);  // the export lives as long as b
  return b;
}

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
      [](PyLayout& l, const pyb::object& slots, const pyb::object& out, int num_threads, uintptr_t stream) {
#ifdef KVTIER_WITH_CUDA
        if (l.layout.device() == DeviceType::kCuda) return CudaCopy(l, slots, out, /*gather=*/true, stream);
#endif
        (void)stream;
        const Slots s = ValueOrThrow(SlotsOf(slots));  // both exports held until the copy is done
        const Bytes dst = ValueOrThrow(BytesOf(out, /*writable=*/true, "out"));
        Status st;
        {
          pyb::gil_scoped_release nogil;
          st = GatherCpu(l.layout, s.slots, std::span<std::byte>(dst.data, dst.size), num_threads);
        }
        ThrowIfError(st);
      },
      pyb::arg("layout"), pyb::arg("slot_mapping"), pyb::arg("out"), pyb::arg("num_threads") = 1,
      pyb::arg("stream") = 0,
      "Paged KV -> chunk buffer. `out` must be exactly layout.chunk_bytes(len(slots)) bytes; slots "
      "< 0 leave their bytes untouched. CUDA layouts: `out` is a CUDA tensor or pinned host memory, "
      "the copy runs on `stream` (cudaStream_t as int) and is complete when this returns.");

  m.def(
      "scatter",
      [](PyLayout& l, const pyb::object& slots, const pyb::object& src, int num_threads,
         pyb::object chunk_layout_id, uintptr_t stream) {
        if (!chunk_layout_id.is_none()) {
          ThrowIfError(CheckCompatible(l.layout, chunk_layout_id.cast<uint64_t>()));
        }
#ifdef KVTIER_WITH_CUDA
        if (l.layout.device() == DeviceType::kCuda) return CudaCopy(l, slots, src, /*gather=*/false, stream);
#endif
        (void)stream;
        const Slots s = ValueOrThrow(SlotsOf(slots));  // both exports held until the copy is done
        const Bytes b = ValueOrThrow(BytesOf(src, /*writable=*/false, "src"));
        Status st;
        {
          pyb::gil_scoped_release nogil;
          st = ScatterCpu(l.layout, s.slots, std::span<const std::byte>(b.data, b.size), num_threads);
        }
        ThrowIfError(st);
      },
      pyb::arg("layout"), pyb::arg("slot_mapping"), pyb::arg("src"), pyb::arg("num_threads") = 1,
      pyb::arg("chunk_layout_id") = pyb::none(), pyb::arg("stream") = 0,
      "Chunk buffer -> paged KV. With chunk_layout_id, refuses a chunk gathered from another "
      "layout. CUDA layouts: as gather.");

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
