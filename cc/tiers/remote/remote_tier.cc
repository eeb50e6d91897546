#include "cc/tiers/remote/remote_tier.h"

#include <algorithm>
#include <string_view>
#include <utility>
#include <vector>

#include "cc/common/thread_guard.h"
#include "cc/tiers/remote/remote_record.h"

namespace kvtier::remote {
namespace {

uint64_t NowUs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

bool IsTimeout(const Status& s) {
  return s.code() == StatusCode::kUnavailable && s.message().find("deadline") != std::string_view::npos;
}

}  // namespace

RedisClientOptions ForegroundClientOptions(const RemoteTierOptions& options) {
  RedisClientOptions co;
  co.connect_timeout = options.timeout;
  co.command_timeout = options.timeout;
  co.username = options.username;
  co.password = options.password;
  co.tls_ca_file = options.tls_ca_file;
  co.tls_verify_peer = options.tls_verify_peer;
  return co;
}

RemoteTier::RemoteTier(const RemoteTierOptions& options, ReadFn read)
    : options_(options), read_(std::move(read)) {
  max_payload_.store(options.max_payload_bytes, std::memory_order_relaxed);
}

StatusOr<std::unique_ptr<RemoteTier>> RemoteTier::Create(const RemoteTierOptions& options, ReadFn read) {
  if (options.url.empty()) return InvalidArgument("remote tier without a URL");
  if (options.timeout.count() <= 0) return InvalidArgument("remote timeout must be > 0 ms");
  if (options.write && (options.queue == 0 || options.upload_batch == 0)) {
    return InvalidArgument("remote upload queue and batch must be > 0");
  }
  if (options.write && !read) return InvalidArgument("remote tier that uploads needs a ReadFn");
  const RedisClientOptions co = ForegroundClientOptions(options);
  std::unique_ptr<RemoteTier> t(new RemoteTier(options, std::move(read)));
  KVT_ASSIGN_OR_RETURN(t->fg_, RedisClient::Create(options.url, co));
  t->redacted_url_ = t->fg_->url().Redacted();
  if (options.write) {
    // Uploads may take longer than a lookup: a batch of 4 MiB values.
    RedisClientOptions bo = co;
    bo.command_timeout = std::max(options.timeout, std::chrono::milliseconds(5000));
    KVT_ASSIGN_OR_RETURN(t->bg_, RedisClient::Create(options.url, bo));
    RemoteTier* raw = t.get();
    KVT_RETURN_IF_ERROR(StartThread(&t->uploader_, [raw] { raw->UploadLoop(); }).Annotate("remote uploader"));
  }
  return t;
}

RemoteTier::~RemoteTier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  idle_cv_.notify_all();
  if (uploader_.joinable()) uploader_.join();
}

void RemoteTier::CountError(const Status& s) {
  errors_.fetch_add(1, std::memory_order_relaxed);
  if (IsTimeout(s)) timeouts_.fetch_add(1, std::memory_order_relaxed);
  connected_.store(false, std::memory_order_relaxed);
}

bool RemoteTier::Enqueue(const ChunkMeta& meta) {
  if (!options_.write) return false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;
    if (queue_.size() >= options_.queue) {
      upload_dropped_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    queue_.push_back(meta);
  }
  cv_.notify_one();
  return true;
}

void RemoteTier::Flush() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [&] { return stop_ || (queue_.empty() && in_flight_ == 0); });
}

void RemoteTier::UploadLoop() {
  std::vector<ChunkMeta> batch;
  std::vector<std::string> keys, values;
  std::vector<KeyValue> items;
  std::vector<KeyResult> results;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      batch.clear();
      while (!queue_.empty() && batch.size() < options_.upload_batch) {
        batch.push_back(queue_.front());
        queue_.pop_front();
      }
      in_flight_ = batch.size();
    }
    const uint64_t start = NowUs();
    keys.clear();
    values.clear();
    for (const ChunkMeta& m : batch) {
      std::string value;
      bool held = false;
      // The thread boundary: nothing thrown here (std::bad_alloc) may end
      // the process; the chunk is skipped like one no longer held.
      Status r = CallNoThrow("remote upload", [&] {
        held = read_(m, [&](std::span<const std::byte> bytes) { value = EncodeRemoteRecord(m, bytes); });
        return Status::Ok();
      });
      if (!r.ok() || !held || value.empty()) {
        upload_skipped_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      keys.push_back(RemoteKey(options_.namespace_digest, m.key));
      values.push_back(std::move(value));
    }
    if (!keys.empty()) {
      items.clear();
      for (size_t i = 0; i < keys.size(); ++i) items.push_back({keys[i], values[i]});
      Status s = bg_->SetNxMany(items, options_.ttl, &results);
      for (size_t i = 0; i < items.size(); ++i) {
        if (results[i] == KeyResult::kHit) {
          uploads_.fetch_add(1, std::memory_order_relaxed);
          bytes_out_.fetch_add(items[i].value.size(), std::memory_order_relaxed);
        } else if (results[i] == KeyResult::kMiss) {
          upload_present_.fetch_add(1, std::memory_order_relaxed);
        } else {
          upload_failed_.fetch_add(1, std::memory_order_relaxed);
        }
      }
      if (!s.ok()) connected_.store(false, std::memory_order_relaxed);
      upload_us_.fetch_add(NowUs() - start, std::memory_order_relaxed);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_ = 0;
    }
    idle_cv_.notify_all();
  }
}

size_t RemoteTier::ContainsPrefix(std::span<const ChunkMeta> chunks) {
  if (chunks.empty()) return 0;
  const uint64_t start = NowUs();
  lookups_.fetch_add(1, std::memory_order_relaxed);
  lookup_chunks_.fetch_add(chunks.size(), std::memory_order_relaxed);
  std::vector<std::string> keys;
  keys.reserve(chunks.size());
  for (const ChunkMeta& m : chunks) keys.push_back(RemoteKey(options_.namespace_digest, m.key));
  std::vector<std::string_view> views(keys.begin(), keys.end());
  std::vector<KeyResult> results;
  Status s = fg_->ExistsMany(views, &results);
  lookup_us_.fetch_add(NowUs() - start, std::memory_order_relaxed);
  if (!s.ok()) {
    CountError(s);
    return 0;
  }
  connected_.store(true, std::memory_order_relaxed);
  size_t n = 0;
  while (n < results.size() && results[n] == KeyResult::kHit) ++n;
  lookup_hit_chunks_.fetch_add(n, std::memory_order_relaxed);
  return n;
}

size_t RemoteTier::Fetch(std::span<const ChunkMeta> chunks, uint64_t layout_id, const SinkFn& sink) {
  if (chunks.empty()) return 0;
  const size_t max_payload = max_payload_.load(std::memory_order_acquire);
  if (max_payload == 0) return 0;  // the layout is not known yet: nothing can be checked
  const uint64_t start = NowUs();
  fetches_.fetch_add(1, std::memory_order_relaxed);
  // Round trips of at most ~16 MiB each, each with its own deadline: a
  // slow but working remote still delivers a long prefix, a stalled one
  // costs one timeout (and the prefix ends there).
  const size_t per_trip = std::max<size_t>(1, (size_t{16} << 20) / RemoteRecordMaxBytes(max_payload));
  std::vector<bool> ok(chunks.size(), false);
  std::vector<std::string> keys;
  std::vector<KeyResult> results;
  size_t delivered = 0;
  for (size_t begin = 0; begin < chunks.size(); begin += per_trip) {
    const size_t end = std::min(chunks.size(), begin + per_trip);
    keys.clear();
    for (size_t i = begin; i < end; ++i) keys.push_back(RemoteKey(options_.namespace_digest, chunks[i].key));
    std::vector<std::string_view> views(keys.begin(), keys.end());
    // Values stay in the client's reply buffers only during the callback,
    // so each is checked and handed to the sink there. In a cluster the
    // replies come node by node, not in key order: every valid chunk goes to
    // the sink as it arrives, and the prefix is the run of leading chunks
    // that did (a valid chunk past a gap is filed too, harmlessly: it is the
    // right KV for its key, only not reachable by this prompt's prefix).
    const RedisClient::ValueFn on_value = [&](size_t j, std::string_view value) {
      const size_t i = begin + j;
      if (i >= end) return;
      bytes_in_.fetch_add(value.size(), std::memory_order_relaxed);
      std::span<const std::byte> payload;
      uint64_t value_layout = 0;
      Status c = CheckRemoteRecord(value, chunks[i], max_payload, &payload, &value_layout);
      if (!c.ok()) {
        if (c.code() == StatusCode::kDataLoss) corrupt_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      if (value_layout != layout_id) {
        layout_mismatches_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      ok[i] = sink(i, payload).ok();
    };
    // One byte more than the largest valid value: a longer one shows itself
    // (and fails the length check) without being read whole.
    Status s = fg_->GetRangeMany(views, RemoteRecordMaxBytes(max_payload) + 1, on_value, &results);
    if (!s.ok()) {
      CountError(s);
    } else {
      connected_.store(true, std::memory_order_relaxed);
    }
    while (delivered < end && ok[delivered]) ++delivered;
    if (delivered < end) break;  // the prefix ended in this trip
  }
  const uint64_t took = NowUs() - start;
  fetch_us_.fetch_add(took, std::memory_order_relaxed);
  fetch_hist_.Record(took);
  fetch_hits_.fetch_add(delivered, std::memory_order_relaxed);
  fetch_misses_.fetch_add(chunks.size() - delivered, std::memory_order_relaxed);
  return delivered;
}

RemoteTierStats RemoteTier::Stats() const {
  RemoteTierStats s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.lookups = ld(lookups_);
  s.lookup_chunks = ld(lookup_chunks_);
  s.lookup_hit_chunks = ld(lookup_hit_chunks_);
  s.fetches = ld(fetches_);
  s.fetch_hits = ld(fetch_hits_);
  s.fetch_misses = ld(fetch_misses_);
  s.bytes_in = ld(bytes_in_);
  s.corrupt = ld(corrupt_);
  s.layout_mismatches = ld(layout_mismatches_);
  s.uploads = ld(uploads_);
  s.upload_present = ld(upload_present_);
  s.bytes_out = ld(bytes_out_);
  s.upload_dropped = ld(upload_dropped_);
  s.upload_skipped = ld(upload_skipped_);
  s.upload_failed = ld(upload_failed_);
  s.errors = ld(errors_);
  s.timeouts = ld(timeouts_);
  s.lookup_latency_us_total = ld(lookup_us_);
  s.fetch_latency_us_total = ld(fetch_us_);
  s.upload_latency_us_total = ld(upload_us_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.upload_queue_depth = queue_.size();
  }
  s.connected = connected_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace kvtier::remote
