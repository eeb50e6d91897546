// Engine bindings: kvtier::Engine as _kvtier.Engine.
//
// Options arrive as a flat dict of native values (kvtier.config produces it
// from the validated configuration); unknown keys are rejected here too so a
// typo between the Python and C++ halves cannot pass silently.
// Every method that hashes, copies or waits releases the GIL; arguments are
// copied into C++ containers first so no Python object is touched without it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cc/engine/engine.h"
#include "cc/index/chunk_index.h"
#include "python/src/bindings.h"
#include "python/src/datapath_bindings.h"
#include "python/src/engine_bindings.h"
#include "python/src/status_to_exception.h"

namespace kvtier::py {
namespace pyb = pybind11;

std::vector<int32_t> CopyTokens(const TokenArray& tokens) {
  if (tokens.ndim() != 1) {
    ThrowStatus(InvalidArgument("tokens must be 1-D, got " + std::to_string(tokens.ndim()) + " dimensions"));
  }
  return std::vector<int32_t>(tokens.data(), tokens.data() + tokens.shape(0));
}

}  // namespace kvtier::py

namespace kvtier::py {

PartialChunkPolicy ParsePartial(const std::string& v) {
  if (v == "keep") return PartialChunkPolicy::kKeep;
  if (v == "drop") return PartialChunkPolicy::kDrop;
  ThrowStatus(InvalidArgument("partial_chunks must be keep or drop; got '" + v + "'"));
}

namespace {

std::string TypeName(const pyb::handle& o) { return pyb::str(pyb::type::handle_of(o).attr("__name__")); }

// An identity (salt or span id) as a key: str as UTF-8, bytes as they are.
ChunkKey IdentityOf(const pyb::handle& v, const std::string& what) {
  if (PyUnicode_Check(v.ptr())) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(v.ptr(), &n);  // UnicodeEncodeError is a ValueError
    if (s == nullptr) throw pyb::error_already_set();
    return IdentityKey(std::string_view(s, static_cast<size_t>(n)));
  }
  if (PyBytes_Check(v.ptr())) {
    return IdentityKey(std::string_view(PyBytes_AS_STRING(v.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(v.ptr()))));
  }
  ThrowStatus(InvalidArgument(what + " must be str or bytes, got " + TypeName(v)));
}

uint32_t SpanBound(const pyb::handle& v, const std::string& what) {
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr())) {
    ThrowStatus(InvalidArgument(what + " must be an int, got " + TypeName(v)));
  }
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || x < 0 || x > static_cast<long long>(std::numeric_limits<uint32_t>::max())) {
    ThrowStatus(InvalidArgument(what + " must be in [0, 2**32), got " + std::string(pyb::str(v))));
  }
  return static_cast<uint32_t>(x);
}

}  // namespace

std::optional<KeyExtras> ExtrasOf(const pyb::handle& extras) {
  if (extras.is_none()) return std::nullopt;
  if (!pyb::hasattr(extras, "salt") || !pyb::hasattr(extras, "spans")) {
    ThrowStatus(InvalidArgument("extras must be a kvtier.KeyExtras or None, got " + TypeName(extras)));
  }
  KeyExtras out;
  pyb::object salt = extras.attr("salt");
  if (!salt.is_none()) out.salt = IdentityOf(salt, "KeyExtras.salt");
  pyb::object spans = extras.attr("spans");
  if (!pyb::isinstance<pyb::sequence>(spans) || PyUnicode_Check(spans.ptr()) || PyBytes_Check(spans.ptr())) {
    ThrowStatus(InvalidArgument("KeyExtras.spans must be a sequence of (begin, end, id), got " + TypeName(spans)));
  }
  for (size_t i = 0; i < pyb::len(spans); ++i) {
    pyb::object span = pyb::reinterpret_borrow<pyb::sequence>(spans)[i];
    const std::string where = "KeyExtras span " + std::to_string(i);
    if (!PyTuple_Check(span.ptr()) || PyTuple_GET_SIZE(span.ptr()) != 3) {
      ThrowStatus(InvalidArgument(where + " must be a (begin, end, id) tuple, got " + std::string(pyb::repr(span))));
    }
    pyb::tuple t = pyb::reinterpret_borrow<pyb::tuple>(span);
    KeySpan ks;
    ks.begin = SpanBound(t[0], where + " begin");
    ks.end = SpanBound(t[1], where + " end");
    ks.id = IdentityOf(t[2], where + " id");
    out.spans.push_back(ks);
  }
  ThrowIfError(ValidateKeyExtras(&out));  // begin < end, sorted by begin
  return out;
}

namespace {

template <typename T>
T Get(const pyb::dict& d, const char* key, T fallback) {
  if (!d.contains(key)) return fallback;
  try {
    return d[key].cast<T>();
  } catch (const pyb::cast_error&) {
    ThrowStatus(InvalidArgument(std::string("engine option '") + key + "' has the wrong type: " +
                                std::string(pyb::str(pyb::type::of(d[key])))));
  }
}

HugePages ParseHugePages(const std::string& v) {
  if (v == "auto") return HugePages::kAuto;
  if (v == "on") return HugePages::kOn;
  if (v == "off") return HugePages::kOff;
  ThrowStatus(InvalidArgument("huge_pages must be one of auto, on, off; got '" + v + "'"));
}

const std::set<std::string>& KnownKeys() {
  static const std::set<std::string> keys = {
      "chunk_size", "partial_chunks", "cpu_capacity", "cpu_high_watermark", "cpu_low_watermark",
      "eviction_policy", "ttl_seconds", "index_capacity", "huge_pages", "numa_node", "disk_path",
      "disk_capacity", "disk_segment_size", "disk_queue_depth", "gds", "write_behind", "write_behind_queue",
      "disk_sync",
      "io_threads", "copy_threads", "namespace", "log_level", "model", "dtype", "layout", "rank",
      "world_size", "chunk_bytes", "catalogue_shm_name", "remote_url", "remote_ttl_seconds", "remote_timeout_ms",
      "remote_write", "remote_queue", "remote_username", "remote_password", "remote_tls_ca_file"};
  return keys;
}

}  // namespace

HashNamespace NamespaceOf(const pyb::dict& d) {
  HashNamespace ns;
  ns.model = Get<std::string>(d, "model", "");
  ns.dtype = Get<std::string>(d, "dtype", "");
  // The user namespace and the layout both separate caches: fold them into
  // the layout field so the hash format stays one documented tuple.
  const std::string user_ns = Get<std::string>(d, "namespace", "");
  ns.layout = Get<std::string>(d, "layout", "") + (user_ns.empty() ? "" : "|ns=" + user_ns);
  ns.rank = Get<uint32_t>(d, "rank", 0);
  ns.world_size = Get<uint32_t>(d, "world_size", 1);
  return ns;
}

namespace {

EngineOptions ParseOptions(const pyb::dict& d) {
  for (auto item : d) {
    std::string k = pyb::str(item.first);
    if (!KnownKeys().count(k)) ThrowStatus(InvalidArgument("unknown engine option '" + k + "'"));
  }
  EngineOptions o;
  o.hash_namespace = NamespaceOf(d);
  o.catalogue_shm_name = Get<std::string>(d, "catalogue_shm_name", "");
  o.chunk_tokens = Get<uint32_t>(d, "chunk_size", 256);
  o.partial = ParsePartial(Get<std::string>(d, "partial_chunks", "keep"));
  o.index_capacity = Get<size_t>(d, "index_capacity", 0);
  o.cpu.capacity_bytes = Get<size_t>(d, "cpu_capacity", size_t{4} << 30);
  o.cpu.chunk_bytes = Get<size_t>(d, "chunk_bytes", 0);
  o.cpu.high_watermark = Get<double>(d, "cpu_high_watermark", 0.9);
  o.cpu.low_watermark = Get<double>(d, "cpu_low_watermark", 0.8);
  o.cpu.eviction_policy = Get<std::string>(d, "eviction_policy", "s3fifo");
  o.cpu.ttl_ms = static_cast<uint64_t>(Get<double>(d, "ttl_seconds", 0.0) * 1000.0);
  o.cpu.numa_node = Get<int>(d, "numa_node", -1);
  o.cpu.huge_pages = ParseHugePages(Get<std::string>(d, "huge_pages", "auto"));
  o.disk.path = Get<std::string>(d, "disk_path", "");
  o.disk.capacity_bytes = Get<uint64_t>(d, "disk_capacity", uint64_t{16} << 30);
  o.disk.segment_bytes = Get<uint64_t>(d, "disk_segment_size", 0);
  o.disk.queue_depth = Get<uint32_t>(d, "disk_queue_depth", 64);
  o.disk.rebuild_threads = Get<uint32_t>(d, "io_threads", 2);
  const std::string gds = Get<std::string>(d, "gds", "auto");
  if (gds != "auto" && gds != "on" && gds != "off") {
    ThrowStatus(InvalidArgument("gds must be one of auto, on, off; got '" + gds + "'"));
  }
  o.disk.use_gds = gds != "off";
  const StatusOr<DiskSync> sync = ParseDiskSync(Get<std::string>(d, "disk_sync", "none"));
  if (!sync.ok()) ThrowStatus(sync.status());
  o.disk.sync = *sync;
  o.write_behind = Get<bool>(d, "write_behind", true);
  o.write_behind_queue = Get<size_t>(d, "write_behind_queue", 1024);
  o.copy_threads = Get<size_t>(d, "copy_threads", 2);
  if (o.copy_threads == 0) o.copy_threads = 2;
  o.remote.url = Get<std::string>(d, "remote_url", "");
  o.remote.ttl = std::chrono::seconds(Get<int64_t>(d, "remote_ttl_seconds", 0));
  o.remote.timeout = std::chrono::milliseconds(Get<int64_t>(d, "remote_timeout_ms", 200));
  o.remote.write = Get<bool>(d, "remote_write", true);
  o.remote.queue = Get<size_t>(d, "remote_queue", 256);
  o.remote.username = Get<std::string>(d, "remote_username", "");
  o.remote.password = Get<std::string>(d, "remote_password", "");
  o.remote.tls_ca_file = Get<std::string>(d, "remote_tls_ca_file", "");
  return o;
}

pyb::dict TierStatsDict(const TierStats& t) {
  pyb::dict d;
  d["capacity_bytes"] = t.capacity_bytes;
  d["used_bytes"] = t.used_bytes;
  d["entries"] = t.entries;
  d["puts"] = t.puts;
  d["put_bytes"] = t.put_bytes;
  d["gets"] = t.gets;
  d["get_hits"] = t.get_hits;
  d["get_bytes"] = t.get_bytes;
  d["evictions"] = t.evictions;
  d["evictions_expired"] = t.evictions_expired;
  d["evicted_bytes"] = t.evicted_bytes;
  d["errors"] = t.errors;
  return d;
}

pyb::dict HistogramDict(const LatencyHistogram::Snapshot& h) {
  pyb::dict d;
  d["bounds"] = std::vector<uint64_t>(LatencyHistogram::kBounds.begin(), LatencyHistogram::kBounds.end());
  d["counts"] = std::vector<uint64_t>(h.counts.begin(), h.counts.end());
  d["sum"] = h.sum_us;
  d["count"] = h.count;
  return d;
}

void AddEvictions(pyb::dict& tier, const EvictionsByReason& e) {
  tier["evictions_capacity"] = e.capacity;
  tier["evictions_clear"] = e.clear;
  tier["evictions_expired"] = e.expired;
  tier["evictions_layout_mismatch"] = e.layout_mismatch;
  tier["evictions_corrupt"] = e.corrupt;
}

// The operations additions: evictions by reason in each tier's dict (also
// reachable as stats()["cpu"] / ["disk"]), histograms (NON-cumulative
// counts; len(counts) == len(bounds) + 1, the last is +Inf), index capacity.
void AddOpsStats(pyb::dict& d, const EngineStats& s) {
  pyb::dict tiers = d["tiers"];
  if (s.has_cpu) {
    pyb::dict cpu = tiers["cpu"];
    AddEvictions(cpu, s.cpu_evictions);
    d["cpu"] = cpu;
  }
  if (s.has_disk) {
    pyb::dict disk = tiers["disk"];
    AddEvictions(disk, s.disk_evictions);
    d["disk"] = disk;
  }
  d["catalogue_capacity"] = s.catalogue_capacity;
  d["pins_with_ttl"] = s.pins_with_ttl;
  d["pins_expired"] = s.pins_expired;
  d["store_queue_depth"] = s.copies_pending;
  d["moves_started"] = s.moves_started;
  d["moves_chunks_moved"] = s.moves_chunks_moved;
  d["moves_chunks_failed"] = s.moves_chunks_failed;
  pyb::dict load, store, hist;
  load["cpu"] = HistogramDict(s.load_cpu_us);
  load["disk"] = HistogramDict(s.load_disk_us);
  load["remote"] = HistogramDict(s.load_remote_us);
  store["cpu"] = HistogramDict(s.store_cpu_us);
  store["disk"] = HistogramDict(s.store_disk_us);
  hist["load_us"] = load;
  hist["store_us"] = store;
  d["histograms"] = hist;
}

// Seconds from Python as a duration; InvalidArgumentError unless finite and
// in range (lo_open: > 0, else >= 0). Past 100 years is 100 years.
std::chrono::nanoseconds Seconds(double s, const char* what, bool lo_open) {
  if (std::isnan(s) || (lo_open ? s <= 0 : s < 0)) {
    ThrowStatus(InvalidArgument(std::string(what) + (lo_open ? " must be > 0" : " must be >= 0") + ", got " +
                                std::to_string(s)));
  }
  constexpr double kMax = 100.0 * 365 * 24 * 3600;
  return std::chrono::nanoseconds(static_cast<int64_t>(std::min(s, kMax) * 1e9));
}

uint32_t TierBit(const std::string& name) {
  if (name == "cpu") return kTierBitCpu;
  if (name == "disk") return kTierBitDisk;
  ThrowStatus(InvalidArgument("unknown tier '" + name + "': the tiers are cpu and disk (kvtier never clears or " +
                              "moves into the remote tier)"));
}

pyb::list TierNames(uint32_t mask) {
  pyb::list out;
  if (mask & kTierBitCpu) out.append("cpu");
  if (mask & kTierBitDisk) out.append("disk");
  return out;
}

pyb::dict MoveResultDict(const MoveTask::Result& r) {
  pyb::dict d;
  d["tier"] = r.tier == kTierBitCpu ? "cpu" : "disk";
  d["chunks"] = r.chunks;
  d["moved"] = r.moved;
  d["already"] = r.already;
  d["failed"] = r.failed;
  d["error"] = r.error.empty() ? pyb::object(pyb::none()) : pyb::object(pyb::str(r.error));
  d["done"] = r.done;
  return d;
}

pyb::dict TierHealthDict(const TierHealth& t) {
  pyb::dict d;
  d["status"] = HealthStatusName(t.status);
  d["reasons"] = t.reasons;
  d["enabled"] = t.enabled;
  return d;
}

pyb::dict StatsDict(const EngineStats& s) {
  pyb::dict d;
#define KVT_STAT(name) d[#name] = s.name
  KVT_STAT(lookups);
  KVT_STAT(lookup_hit_tokens);
  KVT_STAT(lookup_query_tokens);
  KVT_STAT(store_requests);
  KVT_STAT(chunks_stored);
  KVT_STAT(chunks_skipped_present);
  KVT_STAT(store_errors);
  KVT_STAT(tokens_stored);
  KVT_STAT(bytes_stored);
  KVT_STAT(retrieve_requests);
  KVT_STAT(chunks_loaded);
  KVT_STAT(tokens_loaded);
  KVT_STAT(bytes_loaded);
  KVT_STAT(chunks_loaded_cpu);
  KVT_STAT(chunks_loaded_disk);
  KVT_STAT(retrieve_misses);
  KVT_STAT(load_errors);
  KVT_STAT(layout_mismatches);
  KVT_STAT(internal_errors);
  KVT_STAT(write_behind_written);
  KVT_STAT(write_behind_retries);
  KVT_STAT(write_behind_failed);
  KVT_STAT(write_behind_dropped);
  KVT_STAT(write_behind_queue_depth);
  KVT_STAT(catalogue_entries);
  KVT_STAT(store_latency_us_total);
  KVT_STAT(retrieve_latency_us_total);
#undef KVT_STAT
  pyb::dict tiers;
  if (s.has_cpu) tiers["cpu"] = TierStatsDict(s.cpu);
  if (s.has_disk) tiers["disk"] = TierStatsDict(s.disk);
  d["tiers"] = tiers;
  d["chunks_fetched_remote"] = s.chunks_fetched_remote;
  if (s.has_remote) {
    pyb::dict r;
#define KVT_REMOTE(name) r[#name] = s.remote.name
    KVT_REMOTE(lookups);
    KVT_REMOTE(lookup_chunks);
    KVT_REMOTE(lookup_hit_chunks);
    KVT_REMOTE(fetches);
    KVT_REMOTE(fetch_hits);
    KVT_REMOTE(fetch_misses);
    KVT_REMOTE(bytes_in);
    KVT_REMOTE(corrupt);
    KVT_REMOTE(layout_mismatches);
    KVT_REMOTE(uploads);
    KVT_REMOTE(upload_present);
    KVT_REMOTE(bytes_out);
    KVT_REMOTE(upload_dropped);
    KVT_REMOTE(upload_skipped);
    KVT_REMOTE(upload_failed);
    KVT_REMOTE(upload_queue_depth);
    KVT_REMOTE(errors);
    KVT_REMOTE(timeouts);
    KVT_REMOTE(lookup_latency_us_total);
    KVT_REMOTE(fetch_latency_us_total);
    KVT_REMOTE(upload_latency_us_total);
    KVT_REMOTE(connected);
#undef KVT_REMOTE
    d["remote"] = r;
  }
  AddOpsStats(d, s);
  return d;
}

}  // namespace

void ShutdownEngine(PyEngine& e) {
  std::shared_ptr<Engine> dying = std::move(e.engine);  // new calls now fail "closed"
  if (dying == nullptr && e.cuda_io.empty()) return;
  {
    pyb::gil_scoped_release nogil;
    // A call that took the engine before this may still submit copies.
    while (e.calls.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    // Stores in flight read KV tensors that cuda_io keeps alive.
    if (dying != nullptr) dying->Flush();
  }
  std::vector<std::shared_ptr<void>> paths;
  std::vector<std::shared_ptr<PyLayout>> layouts;
  for (auto& [layout, path] : e.cuda_io) {
    layouts.push_back(std::move(layout));
    paths.push_back(std::move(path));
  }
  e.cuda_io.clear();
  {
    pyb::gil_scoped_release nogil;
    paths.clear();  // may unregister the whole CPU tier with CUDA: slow for a large one
    dying.reset();  // the last owner drains copies and write-behind
  }
  layouts.clear();  // the KV tensors: Python objects, so with the GIL
}

PyEngine::~PyEngine() { ShutdownEngine(*this); }

std::shared_ptr<Engine> EngineRef(PyEngine& e) {
  if (!e.engine) ThrowStatus(FailedPrecondition("engine is closed"));
  return e.engine;  // the copy keeps it alive across a concurrent close()
}

void RegisterEngine(pyb::module_& m) {
  // The largest index_capacity: kvtier.config validates against this, so
  // the limit has one source.
  m.def("index_capacity_max", [] { return ChunkIndex::kMaxCapacity; },
        "The largest index_capacity the catalogue accepts (ChunkIndex::kMaxCapacity).");
  pyb::class_<StoreHandle, std::shared_ptr<StoreHandle>>(m, "StoreHandle",
                                                          "Completion of an asynchronous store.")
      .def("done", &StoreHandle::done)
      .def(
          "wait",
          [](const StoreHandle& h, std::optional<double> timeout) {
            Status s;
            {
              pyb::gil_scoped_release nogil;
              s = h.Wait(timeout ? static_cast<int64_t>(*timeout * 1000.0) : -1);
            }
            ThrowIfError(s);
            return h.chunks_stored();
          },
          pyb::arg("timeout") = pyb::none(),
          "Wait for the store; returns the number of chunks stored. Raises on the first chunk error, "
          "UnavailableError on timeout.")
      .def_property_readonly("chunks_total", &StoreHandle::chunks_total)
      .def_property_readonly("chunks_stored", &StoreHandle::chunks_stored);

  pyb::class_<MoveTask, std::shared_ptr<MoveTask>>(m, "MoveTask", "Progress of an asynchronous Engine.move().")
      .def("done", &MoveTask::done)
      .def(
          "wait",
          [](const MoveTask& t, std::optional<double> timeout_s) {
            const int64_t ms = timeout_s ? static_cast<int64_t>(Seconds(*timeout_s, "timeout_s", false).count() / 1000000) : -1;
            pyb::gil_scoped_release nogil;
            return t.Wait(ms);
          },
          pyb::arg("timeout_s") = pyb::none(), "Wait up to timeout_s (None: until done); True once done.")
      .def("result", [](const MoveTask& t) { return MoveResultDict(t.result()); },
           "{tier, chunks, moved, already, failed, error (str or None), done}; counts are final once done.");

  pyb::class_<PyEngine, std::shared_ptr<PyEngine>>(m, "Engine")
      .def(pyb::init([](const pyb::dict& options) {
             EngineOptions o = ParseOptions(options);
             auto p = std::make_shared<PyEngine>();
             StatusOr<std::unique_ptr<Engine>> e = Status();
             {
               pyb::gil_scoped_release nogil;  // disk rebuild may take a while
               e = Engine::Create(o);
             }
             p->engine = std::shared_ptr<Engine>(ValueOrThrow(std::move(e)));
             // gds=on is a requirement, not a wish: refuse to start without it.
             if (Get<std::string>(options, "gds", "auto") == "on" && !o.disk.path.empty() &&
                 !p->engine->disk_tier()->gds_available()) {
               ThrowStatus(NotImplemented("gds=on, but cuFile could not open a GPUDirect Storage driver on this "
                                          "machine (see the log line above); use gds=auto or gds=off"));
             }
             return p;
           }),
           pyb::arg("options"))
      .def_property_readonly("chunk_size", [](PyEngine& e) {
            auto eng = EngineRef(e); return eng->chunk_tokens(); })
      .def(
          "set_chunk_bytes",
          [](PyEngine& e, size_t n) {
            auto eng = EngineRef(e); ThrowIfError(eng->SetChunkBytes(n)); }, pyb::arg("max_chunk_bytes"))
      .def(
          "chunk_keys",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            std::vector<ChunkHash> chunks;
            eng->hasher().Hash(t, &chunks, ExtrasPtr(x));
            pyb::list out;
            for (const ChunkHash& c : chunks) out.append(pyb::make_tuple(c.key.ToHex(), c.begin, c.num_tokens));
            return out;
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(), "(hex key, first token, tokens) per chunk; for tools and tests.")
      .def(
          "lookup",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return eng->Lookup(t, ExtrasPtr(x));
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(), "Number of leading tokens whose KV is cached.")
      .def(
          "store_buffers",
          [](PyEngine& e, const TokenArray& tokens, const pyb::list& buffers, uint64_t layout_id,
             const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            // C-contiguous only (a strided view's bytes are not a flat range
            // at its pointer); each export is held, so the memory cannot be
            // resized or freed, until every chunk copy out of it is done.
            std::vector<Bytes> held;
            std::vector<std::span<const std::byte>> spans;
            for (size_t i = 0; i < buffers.size(); ++i) {
              held.push_back(ValueOrThrow(BytesOf(buffers[i], /*writable=*/false, "buffers[" + std::to_string(i) + "]")));
              spans.emplace_back(held.back().data, held.back().size);
            }
            StatusOr<std::shared_ptr<StoreHandle>> h = Status();
            {
              pyb::gil_scoped_release nogil;
              h = eng->StoreBuffers(t, layout_id, std::move(spans), ExtrasPtr(x));
              // Wait() returns only once no chunk is pending: then nothing
              // reads the held buffers any more.
              if (h.ok()) (void)(*h)->Wait();
            }
            return ValueOrThrow(std::move(h));
          },
          pyb::arg("tokens"), pyb::arg("buffers"), pyb::arg("layout_id") = 0, pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Store finished chunk buffers (bytes-like, one per chunk). Synchronous; returns the handle.")
      .def(
          "retrieve_buffers",
          [](PyEngine& e, const TokenArray& tokens, const pyb::list& buffers, uint64_t layout_id,
             const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            // C-contiguous and writable; the exports are held until the
            // copies into them (without the GIL) are done.
            std::vector<Bytes> held;
            std::vector<std::span<std::byte>> dsts;
            for (size_t i = 0; i < buffers.size(); ++i) {
              held.push_back(ValueOrThrow(BytesOf(buffers[i], /*writable=*/true, "buffers[" + std::to_string(i) + "]")));
              dsts.emplace_back(held.back().data, held.back().size);
            }
            const uint32_t ct = eng->chunk_tokens();
            StatusOr<size_t> n = Status();
            {
              pyb::gil_scoped_release nogil;
              n = eng->Retrieve(t, 0, layout_id,
                                        [&](const ChunkHash& c, std::span<const std::byte> src) -> Status {
                                          const size_t i = c.begin / ct;
                                          if (i >= dsts.size()) return InvalidArgument("not enough buffers");
                                          if (dsts[i].size() != src.size()) {
                                            return InvalidArgument("buffer " + std::to_string(i) + " has " +
                                                                   std::to_string(dsts[i].size()) +
                                                                   " bytes, the chunk has " +
                                                                   std::to_string(src.size()));
                                          }
                                          std::memcpy(dsts[i].data(), src.data(), src.size());
                                          return Status();
                                        },
                                        ExtrasPtr(x));
            }
            return ValueOrThrow(std::move(n));
          },
          pyb::arg("tokens"), pyb::arg("buffers"), pyb::arg("layout_id") = 0, pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Load cached chunks into writable buffers (one per chunk); returns tokens loaded.")
      .def(
          "lookup_remote",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return eng->LookupRemote(t, ExtrasPtr(x));
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Leading tokens cached locally or, past the local prefix, in the remote tier.")
      .def(
          "fetch_remote",
          [](PyEngine& e, const TokenArray& tokens, uint64_t layout_id, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return eng->FetchRemote(t, layout_id, ExtrasPtr(x));
          },
          pyb::arg("tokens"), pyb::arg("layout_id"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Bring the chunks past the local prefix that the remote tier holds into the CPU tier; returns "
          "the leading tokens now cached locally.")
      .def(
          "flush_remote",
          [](PyEngine& e) {
            auto eng = EngineRef(e);
            pyb::gil_scoped_release nogil;
            eng->FlushRemote();
          },
          "Wait until every queued remote upload has been attempted.")
      .def(
          "prefetch",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return eng->Prefetch(t, ExtrasPtr(x));
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none())
      .def(
          "pin",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras, std::optional<double> ttl_s) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            std::optional<std::chrono::nanoseconds> ttl;
            if (ttl_s) ttl = Seconds(*ttl_s, "ttl_s", /*lo_open=*/true);
            StatusOr<size_t> n = Status();
            {
              pyb::gil_scoped_release nogil;
              n = ttl ? eng->PinWithTtl(t, ExtrasPtr(x), *ttl) : StatusOr<size_t>(eng->Pin(t, ExtrasPtr(x)));
            }
            return ValueOrThrow(std::move(n));
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(), pyb::arg("ttl_s") = pyb::none(),
          "Pin the cached prefix; with ttl_s the pins are released after that many seconds.")
      .def(
          "expire_pins_now",
          [](PyEngine& e, double ahead_s) {
            auto eng = EngineRef(e);
            const auto ahead = Seconds(ahead_s, "ahead_s", /*lo_open=*/false);
            pyb::gil_scoped_release nogil;
            return eng->ExpirePins(ahead);
          },
          pyb::arg("ahead_s") = 0.0,
          "Release now every TTL pin due within ahead_s seconds; returns chunk pins released (tests, tools).")
      .def(
          "unpin",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            pyb::gil_scoped_release nogil;
            return eng->Unpin(t, ExtrasPtr(x));
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none())
      .def("flush",
           [](PyEngine& e) {
            auto eng = EngineRef(e);
             pyb::gil_scoped_release nogil;
             eng->Flush();
           })
      .def(
          "clear",
          [](PyEngine& e, std::optional<std::vector<std::string>> tiers, std::optional<TokenArray> tokens,
             const pyb::object& extras, std::optional<double> older_than_s) {
            auto eng = EngineRef(e);
            Engine::ClearFilter f;
            if (tiers) {
              if (tiers->empty()) ThrowStatus(InvalidArgument("tiers must name at least one tier (cpu, disk)"));
              f.tiers = 0;
              for (const std::string& name : *tiers) f.tiers |= TierBit(name);
            }
            std::vector<int32_t> t;
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            if (tokens) {
              t = CopyTokens(*tokens);
              f.by_tokens = true;
              f.tokens = t;
              f.extras = ExtrasPtr(x);
            }
            if (older_than_s) f.older_than = Seconds(*older_than_s, "older_than_s", /*lo_open=*/false);
            StatusOr<size_t> n = Status();
            {
              pyb::gil_scoped_release nogil;
              n = eng->ClearChunks(f);
            }
            return ValueOrThrow(std::move(n));
          },
          pyb::kw_only(), pyb::arg("tiers") = pyb::none(), pyb::arg("tokens") = pyb::none(),
          pyb::arg("extras") = pyb::none(), pyb::arg("older_than_s") = pyb::none(),
          "Drop unpinned chunks (all, or of some tiers / a prefix / older than); returns chunks dropped.")
      .def(
          "move",
          [](PyEngine& e, const TokenArray& tokens, const std::string& tier, const pyb::object& extras) {
            auto eng = EngineRef(e);
            const uint32_t bit = TierBit(tier);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            StatusOr<std::shared_ptr<MoveTask>> task = Status();
            {
              pyb::gil_scoped_release nogil;
              task = eng->Move(t, bit, ExtrasPtr(x));
            }
            return ValueOrThrow(std::move(task));
          },
          pyb::arg("tokens"), pyb::arg("tier"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Move the cached prefix to a tier (cpu: promote; disk: write and drop the CPU copy) in the background.")
      .def(
          "lookup_tiers",
          [](PyEngine& e, const TokenArray& tokens, const pyb::object& extras) {
            auto eng = EngineRef(e);
            std::vector<int32_t> t = CopyTokens(tokens);
            const std::optional<KeyExtras> x = ExtrasOf(extras);
            StatusOr<TierLookup> l = Status();
            {
              pyb::gil_scoped_release nogil;
              l = eng->LookupTiers(t, ExtrasPtr(x));
            }
            const TierLookup& r = ValueOrThrow(std::move(l));
            pyb::list chunks;
            for (const TierLookup::Chunk& c : r.chunks) {
              pyb::dict d;
              d["index"] = c.index;
              d["tiers"] = TierNames(c.tiers);
              d["pinned"] = c.pinned;
              chunks.append(d);
            }
            pyb::dict by_tier;
            by_tier["cpu"] = r.cpu_chunks;
            by_tier["disk"] = r.disk_chunks;
            pyb::dict out;
            out["tokens"] = r.tokens;
            out["chunk_tokens"] = r.chunk_tokens;
            out["chunks"] = chunks;
            out["by_tier"] = by_tier;
            return out;
          },
          pyb::arg("tokens"), pyb::kw_only(), pyb::arg("extras") = pyb::none(),
          "Where each chunk of the cached prefix is; not counted as a lookup.")
      .def(
          "verify",
          [](PyEngine& e, bool deep) {
            auto eng = EngineRef(e);
            VerifyReport v;
            {
              pyb::gil_scoped_release nogil;
              v = eng->Verify(deep);
            }
            pyb::dict missing, orphans, out;
            missing["cpu"] = v.missing_cpu;
            missing["disk"] = v.missing_disk;
            orphans["cpu"] = v.orphans_cpu;
            orphans["disk"] = v.orphans_disk;
            out["entries"] = v.entries;
            out["checked"] = v.checked;
            out["ok"] = v.ok;
            out["missing"] = missing;
            out["orphans"] = orphans;
            out["corrupt"] = v.corrupt;
            out["consistent"] = v.consistent();
            out["deep"] = deep;
            return out;
          },
          pyb::kw_only(), pyb::arg("deep") = false, "The catalogue checked against the tiers (read-only).")
      .def(
          "health",
          [](PyEngine& e) {
            auto eng = EngineRef(e);
            HealthReport h;
            {
              pyb::gil_scoped_release nogil;
              h = eng->Health();
            }
            pyb::dict tiers, queues, out;
            tiers["cpu"] = TierHealthDict(h.cpu);
            tiers["disk"] = TierHealthDict(h.disk);
            tiers["remote"] = TierHealthDict(h.remote);
            queues["write_behind"] = h.write_behind_depth;
            queues["write_behind_capacity"] = h.write_behind_capacity;
            queues["remote_upload"] = h.remote_upload_depth;
            queues["remote_upload_capacity"] = h.remote_upload_capacity;
            queues["store"] = h.store_copies_pending;
            queues["store_capacity"] = h.store_queue_capacity;
            out["status"] = HealthStatusName(h.status);
            out["reasons"] = h.reasons;
            out["tiers"] = tiers;
            out["queues"] = queues;
            return out;
          },
          "ok / degraded / down for the engine and each tier, with reasons and queue depths.")
      .def("stats", [](PyEngine& e) {
            auto eng = EngineRef(e); return StatsDict(eng->Stats()); })
      .def("close", [](PyEngine& e) { ShutdownEngine(e); },
           "Drain pending work and release the tiers. Idempotent.")
      .def_property_readonly("closed", [](PyEngine& e) {
            return e.engine == nullptr; });

  RegisterPagedEngine(m);
}

}  // namespace kvtier::py
