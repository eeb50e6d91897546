// crash_loop_worker: the two halves of tools/crash_loop.sh (issue 13), run
// against the real Engine with a disk tier.
//
//   crash_loop_worker write DIR SYNC   stores chunks under load until killed
//   crash_loop_worker check DIR SYNC   restarts, checks, prints one JSON line
//   crash_loop_worker write-ack-first DIR SYNC
//       a deliberately wrong writer for the loop's self-test: it acknowledges
//       each window before storing it, so a kill in the middle of a window
//       loses acknowledged chunks and the check must say so
//       (tools/crash_loop.sh --self-test)
//
// DIR holds the disk tier (DIR/disk) and the acknowledgement log (DIR/acks);
// SYNC is disk_sync (none, batch, always).
//
// write: chunk s (one per prompt; its tokens and bytes are functions of s
// alone) is stored in windows of kWindow prompts; window w holds chunks
// w*kWindow .. w*kWindow+kWindow-1, and a restart starts after the last
// window started, so no chunk is ever stored twice. Before storing a window
// the writer appends "S w" to DIR/acks; a chunk is acknowledged only once
// every store handle of its window completed, Flush() returned (write-behind
// finished: each PutBatch returned, after its fdatasync under batch/always)
// and the disk tier holds the chunk; then one write() appends "A w seq" for
// each such chunk. A SIGKILL cannot tear a write() to a regular file, and
// what write() returned is in the page cache, which a process crash does not
// lose. A reader thread meanwhile retrieves random
// acknowledged chunks and checks their bytes (exit 3 on a wrong byte), so
// the writes run under read load and promotions. It never exits by itself.
//
// check: opens the engine (the disk tier's rebuild: its time is reported),
// then retrieves every acknowledged chunk from disk (the CPU tier is empty
// after a restart) and compares its bytes. A chunk is
// - a hit: served, bytes right;
// - corrupt: served with a wrong byte (must never happen);
// - evicted: a miss in a window no later than the first window with a hit.
//   The disk tier reclaims whole segments, oldest generation first, and a
//   window is acknowledged before the next one is stored, so eviction can
//   only remove a prefix of the windows (cutting at most one window);
// - lost: a miss in any later window (must never happen).
// The unacknowledged chunks of the last window started (the one the kill
// interrupted) are retrieved too: each is served whole, or is a miss; a
// wrong byte counts as corrupt. A record torn by the kill is refused by its
// checksum (torn_refused counts the disk reads that failed it).
// Prints {"acked", "hits", "evicted", "lost", "corrupt", "unacked_served",
// "unacked_missed", "torn_refused",
// "rebuild_s", "open_s", "rebuild_chunks", "corrupt_headers"} and exits 0
// iff lost and corrupt are 0 (1 otherwise, 2 on a usage or start-up error).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cc/engine/engine.h"
#include "cc/tiers/disk/disk_test_util.h"

namespace kvtier {
namespace {

constexpr uint32_t kChunkTokens = 16;
// Not a multiple of 4096: the record's sub-block tail takes the bounce path.
constexpr size_t kChunkBytes = 200000;
constexpr size_t kWindow = 8;
constexpr uint64_t kLayout = 7;

EngineOptions Options(const std::string& dir, DiskSync sync) {
  EngineOptions o;
  o.hash_namespace.model = "crash-loop";
  o.chunk_tokens = kChunkTokens;
  o.cpu.capacity_bytes = 16ull << 20;  // ~80 chunks: reads promote from disk
  o.cpu.chunk_bytes = kChunkBytes;
  o.copy_threads = 2;
  o.disk.path = dir + "/disk";
  // 16 segments of 2 MiB, 10 records each: ~150 chunks, so a run of a
  // second or more evicts and every restart finds sealed, evicted and
  // recycled segments.
  o.disk.capacity_bytes = 32ull << 20;
  o.disk.segment_bytes = 2ull << 20;
  o.disk.sync = sync;
  return o;
}

std::vector<int32_t> TokensFor(uint64_t seq) {
  std::vector<int32_t> t(kChunkTokens);
  for (uint32_t k = 0; k < kChunkTokens; ++k) t[k] = static_cast<int32_t>((seq * kChunkTokens + k) % 2000000000);
  return t;
}

struct Ack {
  uint64_t window, seq;
};
struct AckLog {
  std::vector<uint64_t> started;  // windows, in order
  std::vector<Ack> acks;          // in order
};

// Whole lines only: a line cut short (cannot happen with one write() per
// line group, but costs nothing to allow) is not an acknowledgement.
AckLog ReadAcks(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  AckLog log;
  size_t pos = 0;
  while (true) {
    const size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) break;
    const std::string line = text.substr(pos, nl - pos);
    Ack a{};
    unsigned long w = 0, q = 0;
    if (std::sscanf(line.c_str(), "A %lu %lu", &w, &q) == 2) {
      a.window = w;
      a.seq = q;
      log.acks.push_back(a);
    } else if (std::sscanf(line.c_str(), "S %lu", &w) == 1) {
      log.started.push_back(w);
    }
    pos = nl + 1;
  }
  return log;
}

void Append(int fd, const std::string& text, const std::string& path) {
  if (write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    std::fprintf(stderr, "crash_loop_worker: write %s: %s\n", path.c_str(), std::strerror(errno));
    std::_Exit(2);
  }
}

[[noreturn]] void Die(const std::string& msg, int code = 2) {
  std::fprintf(stderr, "crash_loop_worker: %s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(code);
}

std::unique_ptr<Engine> OpenEngine(const std::string& dir, DiskSync sync, double* open_s) {
  const auto t0 = std::chrono::steady_clock::now();
  auto e = Engine::Create(Options(dir, sync));
  if (!e.ok()) Die("Engine::Create: " + e.status().ToString());
  if (open_s != nullptr) *open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::move(e).value();
}

// Retrieves chunk seq; true if it was served. *wrong is set if any byte
// served differs from the pattern.
bool Load(Engine& e, uint64_t seq, bool* wrong) {
  const std::vector<int32_t> tokens = TokensFor(seq);
  *wrong = false;
  auto got = e.Retrieve(tokens, 0, kLayout, [&](const ChunkHash&, std::span<const std::byte> src) {
    if (src.size() != kChunkBytes || !disk_test::MatchesFor(seq, src)) *wrong = true;
    return Status();
  });
  return got.ok() && *got == kChunkTokens;
}

int Write(const std::string& dir, DiskSync sync, bool ack_first) {
  const std::string ack_path = dir + "/acks";
  const AckLog old = ReadAcks(ack_path);
  uint64_t window = old.started.empty() ? 0 : old.started.back() + 1;
  const int ack_fd = open(ack_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (ack_fd < 0) Die("open " + ack_path + ": " + std::strerror(errno));
  std::unique_ptr<Engine> e = OpenEngine(dir, sync, nullptr);
  Engine& eng = *e;

  // Acknowledged seqs of this run, for the reader (seqs of earlier runs may
  // have been evicted since; a miss is fine for the reader, a wrong byte not).
  const uint64_t first_acked = window * kWindow;
  std::atomic<uint64_t> end_acked{first_acked};
  std::thread reader([&] {
    std::mt19937_64 rng(std::random_device{}());
    for (;;) {
      const uint64_t hi = end_acked.load();
      // The last ~300 chunks: about what the disk tier holds.
      const uint64_t lo = std::max<uint64_t>(first_acked, hi > 300 ? hi - 300 : 0);
      if (hi == lo) {
        std::this_thread::yield();  // nothing acknowledged yet; the writer is busy
        continue;
      }
      const uint64_t s = lo + rng() % (hi - lo);
      bool wrong = false;
      Load(eng, s, &wrong);
      if (wrong) Die("reader: chunk " + std::to_string(s) + " served with wrong bytes", 3);
    }
  });
  reader.detach();  // runs until the process is killed

  std::vector<std::unique_ptr<disk_test::Buffer>> bufs;
  for (size_t k = 0; k < kWindow; ++k) bufs.push_back(std::make_unique<disk_test::Buffer>(kChunkBytes));
  std::vector<ChunkHash> hashes;
  for (;; ++window) {
    const uint64_t seq = window * kWindow;
    Append(ack_fd, "S " + std::to_string(window) + "\n", ack_path);
    if (ack_first) {
      std::string lines;
      for (size_t k = 0; k < kWindow; ++k) lines += "A " + std::to_string(window) + " " + std::to_string(seq + k) + "\n";
      Append(ack_fd, lines, ack_path);
    }
    std::vector<std::shared_ptr<StoreHandle>> handles;
    for (size_t k = 0; k < kWindow; ++k) {
      disk_test::FillFor(seq + k, bufs[k]->span());
      auto h = eng.StoreBuffers(TokensFor(seq + k), kLayout, {bufs[k]->cspan()});
      if (!h.ok()) Die("StoreBuffers: " + h.status().ToString());
      handles.push_back(*h);
    }
    for (auto& h : handles) (void)h->Wait();  // a failed store is simply not acknowledged
    eng.Flush();
    std::string lines;
    for (size_t k = 0; k < kWindow && !ack_first; ++k) {
      eng.hasher().Hash(TokensFor(seq + k), &hashes);
      if (hashes.size() == 1 && eng.disk_tier()->Contains(hashes[0].key)) {
        lines += "A " + std::to_string(window) + " " + std::to_string(seq + k) + "\n";
      }
    }
    if (!lines.empty()) Append(ack_fd, lines, ack_path);
    end_acked.store(seq + kWindow);
  }
}

int Check(const std::string& dir, DiskSync sync) {
  const AckLog log = ReadAcks(dir + "/acks");
  const std::vector<Ack>& acks = log.acks;
  double open_s = 0;
  std::unique_ptr<Engine> e = OpenEngine(dir, sync, &open_s);
  const RebuildStats rb = e->disk_tier()->rebuild_stats();
  std::vector<bool> hit(acks.size()), wrong(acks.size());
  uint64_t first_hit_window = UINT64_MAX;
  for (size_t i = 0; i < acks.size(); ++i) {
    bool w = false;
    hit[i] = Load(*e, acks[i].seq, &w);
    wrong[i] = w;
    if (hit[i]) first_hit_window = std::min(first_hit_window, acks[i].window);
  }
  uint64_t hits = 0, evicted = 0, lost = 0, corrupt = 0;
  for (size_t i = 0; i < acks.size(); ++i) {
    if (wrong[i]) {
      ++corrupt;
      std::fprintf(stderr, "check: chunk %lu served with wrong bytes\n", static_cast<unsigned long>(acks[i].seq));
    } else if (hit[i]) {
      ++hits;
    } else if (acks[i].window <= first_hit_window) {
      ++evicted;
    } else {
      ++lost;
      std::fprintf(stderr, "check: acknowledged chunk %lu (window %lu) lost\n",
                   static_cast<unsigned long>(acks[i].seq), static_cast<unsigned long>(acks[i].window));
    }
  }
  // Started, not acknowledged: the window the kill interrupted.
  uint64_t unacked_served = 0, unacked_missed = 0;
  if (!log.started.empty()) {
    const uint64_t w = log.started.back();
    for (uint64_t s = w * kWindow; s < (w + 1) * kWindow; ++s) {
      if (std::any_of(acks.rbegin(), acks.rend(), [&](const Ack& a) { return a.seq == s; })) continue;
      bool w_bytes = false;
      const bool served = Load(*e, s, &w_bytes);
      if (w_bytes) {
        ++corrupt;
        std::fprintf(stderr, "check: unacknowledged chunk %lu served with wrong bytes\n", static_cast<unsigned long>(s));
      } else if (served) {
        ++unacked_served;
      } else {
        ++unacked_missed;
      }
    }
  }
  const DiskTier::BatchCounters c = e->disk_tier()->batch_counters();
  std::printf(
      "{\"acked\": %zu, \"hits\": %lu, \"evicted\": %lu, \"lost\": %lu, \"corrupt\": %lu, "
      "\"unacked_served\": %lu, \"unacked_missed\": %lu, \"torn_refused\": %lu, "
      "\"rebuild_s\": %.6f, \"open_s\": %.6f, \"rebuild_chunks\": %lu, \"corrupt_headers\": %lu}\n",
      acks.size(), static_cast<unsigned long>(hits), static_cast<unsigned long>(evicted),
      static_cast<unsigned long>(lost), static_cast<unsigned long>(corrupt),
      static_cast<unsigned long>(unacked_served), static_cast<unsigned long>(unacked_missed),
      static_cast<unsigned long>(c.checksum_failures), rb.seconds, open_s, static_cast<unsigned long>(rb.chunks),
      static_cast<unsigned long>(rb.corrupt_records));
  std::fflush(stdout);
  return lost == 0 && corrupt == 0 ? 0 : 1;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) {
  using namespace kvtier;
  if (argc != 4) Die("usage: crash_loop_worker write|check DIR none|batch|always");
  const std::string mode = argv[1], dir = argv[2];
  StatusOr<DiskSync> sync = ParseDiskSync(argv[3]);
  if (!sync.ok()) Die(sync.status().ToString());
  if (mode == "write") return Write(dir, *sync, false);
  if (mode == "write-ack-first") return Write(dir, *sync, true);
  if (mode == "check") return Check(dir, *sync);
  Die("unknown mode '" + mode + "' (write or check)");
}
