#include "cc/index/chunk_index.h"

#include <fcntl.h>
#include <dirent.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <new>
#include <utility>
#include <vector>

namespace kvtier {
namespace index_internal {

// "KVTIDX01" little-endian. Written last by the creator (release), checked
// first by openers (acquire).
inline constexpr uint64_t kRegionMagic = 0x313058444954564bull;
inline constexpr uint32_t kRegionFormatVersion = 1;

struct alignas(64) RegionHeader {
  std::atomic<uint64_t> magic;
  std::atomic<uint32_t> format_version;
  std::atomic<uint32_t> slot_size;
  std::atomic<uint64_t> capacity;
  std::atomic<uint64_t> num_slots;
  std::atomic<uint64_t> live;      // entries in Writing/Ready/Evicting (+ inserts about to win)
  std::atomic<uint64_t> reserved;  // capacity reservations held by live entries and inserts
  // The creating process (CreateShared), for "in use by pid N" errors; 0 for
  // anonymous memory. Was unused (zero) before, so the format is unchanged.
  std::atomic<uint64_t> owner_pid;
  std::atomic<uint64_t> unused[1];
};

struct alignas(64) Slot {
  std::atomic<uint64_t> control;
  std::atomic<uint64_t> key_lo;
  std::atomic<uint64_t> key_hi;
  std::atomic<uint64_t> fingerprint;
  std::atomic<uint64_t> sizes;  // num_tokens | size_bytes << 32
  std::atomic<uint64_t> unused[3];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "the region is shared between processes and read through a PROT_READ mapping: "
              "its atomics must be plain lock-free words, never a hidden lock");
static_assert(sizeof(Slot) == 64, "one slot per cache line: a probe costs one line, and the "
                                  "region layout is part of the cross-process format");
static_assert(sizeof(RegionHeader) == 64, "the slot array starts at offset 64 in the region");
static_assert(alignof(Slot) == 64 && alignof(RegionHeader) == 64);

}  // namespace index_internal

namespace {

using index_internal::RegionHeader;
using index_internal::Slot;

// Control word layout; see the header's "Slot" section.
enum : uint64_t {
  kStEmpty = 0,
  kStWriting = 1,
  kStReady = 2,
  kStEvicting = 3,
  kStTombstone = 4,
  kStClaimed = 5,    // owned by one inserter, key being written; invisible
  kStCandidate = 6,  // key written, duplicate check in progress; invisible to readers
};
constexpr uint64_t kStateBits = 3;
constexpr uint64_t kTierShift = 3;
constexpr uint64_t kTierMaskBits = (uint64_t{1} << ChunkIndex::kMaxTierBits) - 1;
constexpr uint64_t kPinShift = kTierShift + ChunkIndex::kMaxTierBits;
constexpr uint64_t kVersionShift = 32;
static_assert(kPinShift + 21 == kVersionShift, "pins take bits 11..31");
static_assert(ChunkIndex::kMaxPins == (1u << (kVersionShift - kPinShift)) - 1);

constexpr uint64_t State(uint64_t c) { return c & ((1u << kStateBits) - 1); }
constexpr uint32_t Tiers(uint64_t c) { return static_cast<uint32_t>((c >> kTierShift) & kTierMaskBits); }
constexpr uint32_t Pins(uint64_t c) { return static_cast<uint32_t>((c >> kPinShift) & ChunkIndex::kMaxPins); }
constexpr uint32_t Version(uint64_t c) { return static_cast<uint32_t>(c >> kVersionShift); }
constexpr uint64_t MakeControl(uint64_t state, uint32_t tiers, uint32_t pins, uint32_t version) {
  return state | (uint64_t{tiers} << kTierShift) | (uint64_t{pins} << kPinShift) |
         (uint64_t{version} << kVersionShift);
}
constexpr uint64_t WithState(uint64_t c, uint64_t state) { return (c & ~uint64_t{7}) | state; }
constexpr bool IsLive(uint64_t state) {
  return state == kStWriting || state == kStReady || state == kStEvicting;
}

const char* StateName(uint64_t s) {
  switch (s) {
    case kStEmpty: return "empty";
    case kStWriting: return "writing";
    case kStReady: return "ready";
    case kStEvicting: return "evicting";
    case kStTombstone: return "tombstone";
    case kStClaimed: return "claimed";
    case kStCandidate: return "candidate";
  }
  return "?";
}

// ---- Memory-ordering helpers: the name says the intent, the call site says
// ---- what it pairs with.

// Sees the fields written before the state it reads was published.
uint64_t LoadControlAcquire(const Slot& s) { return s.control.load(std::memory_order_acquire); }
// Second load of a seqlock read; ordered after the field reads by
// FenceAfterFieldReads, so relaxed suffices.
uint64_t ReloadControlAfterFence(const Slot& s) { return s.control.load(std::memory_order_relaxed); }
// Insert path: part of the single total order the duplicate check relies on.
uint64_t LoadControlSeqCst(const Slot& s) { return s.control.load(std::memory_order_seq_cst); }
void PublishControlSeqCst(Slot& s, uint64_t c) { s.control.store(c, std::memory_order_seq_cst); }
bool CasControlSeqCst(Slot& s, uint64_t& expected, uint64_t desired) {
  return s.control.compare_exchange_strong(expected, desired, std::memory_order_seq_cst,
                                           std::memory_order_seq_cst);
}
// State transitions of a live entry: release so the new state is seen with
// everything before it, acquire so the CAS loop sees the latest word.
bool CasControlAcqRel(Slot& s, uint64_t& expected, uint64_t desired) {
  return s.control.compare_exchange_weak(expected, desired, std::memory_order_acq_rel,
                                         std::memory_order_acquire);
}
// Between claiming a slot (version bump) and rewriting its fields.
void FenceBeforeFieldWrites() { std::atomic_thread_fence(std::memory_order_release); }
// Between a reader's relaxed field reads and its second control load.
void FenceAfterFieldReads() { std::atomic_thread_fence(std::memory_order_acquire); }

uint64_t Relaxed(const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); }

bool ValidShmName(const std::string& name) {
  return name.size() >= 2 && name.size() <= 255 && name[0] == '/' &&
         name.find('/', 1) == std::string::npos;
}

StatusOr<size_t> SlotsFor(size_t capacity) {
  if (capacity == 0 || capacity > ChunkIndex::kMaxCapacity) {
    return InvalidArgument("ChunkIndex capacity must be in [1, " +
                           std::to_string(ChunkIndex::kMaxCapacity) + "], got " +
                           std::to_string(capacity));
  }
  const size_t need = static_cast<size_t>(std::ceil(static_cast<double>(capacity) /
                                                    ChunkIndex::kMaxLoadFactor));
  return std::bit_ceil(std::max<size_t>(need, 16));
}

size_t RegionBytes(size_t num_slots) { return sizeof(RegionHeader) + num_slots * sizeof(Slot); }

// How many times CreateShared retries after finding the name taken by a
// stale object (reclaimed) or losing a race with another creator.
constexpr int kCreateAttempts = 8;

// True when `name` currently names the object open at fd (same inode).
bool NameRefersTo(const std::string& name, int fd) {
  struct stat mine, named;
  if (fstat(fd, &mine) != 0) return false;
  const int other = shm_open(name.c_str(), O_RDONLY, 0);
  if (other < 0) return false;
  const bool same = fstat(other, &named) == 0 && named.st_dev == mine.st_dev && named.st_ino == mine.st_ino;
  close(other);
  return same;
}

// RegionHeader as plain words, for reading an object's header with pread:
// never through a mapping, so an object shorter than it claims (truncated)
// is an error here, not a SIGBUS.
struct HeaderWords {
  uint64_t magic;
  uint32_t format_version;
  uint32_t slot_size;
  uint64_t capacity;
  uint64_t num_slots;
  uint64_t live;
  uint64_t reserved;
  uint64_t owner_pid;
  uint64_t unused;
};
static_assert(sizeof(HeaderWords) == sizeof(RegionHeader) &&
                  offsetof(HeaderWords, owner_pid) == offsetof(RegionHeader, owner_pid) &&
                  offsetof(HeaderWords, num_slots) == offsetof(RegionHeader, num_slots),
              "HeaderWords mirrors RegionHeader word for word");

bool ReadHeader(int fd, HeaderWords* out) {
  return pread(fd, out, sizeof(*out), 0) == static_cast<ssize_t>(sizeof(*out));
}

// The pid recorded by the object's creator, or 0 if it is not readable yet.
uint64_t OwnerPid(int fd) {
  HeaderWords h{};
  return ReadHeader(fd, &h) && h.magic == index_internal::kRegionMagic ? h.owner_pid : 0;
}

// The name exists. If its creator is gone (nobody holds the object's
// flock), unlink it and return OK so the caller retries; a live owner is
// kFailedPrecondition naming its pid. OK also when the name vanished.
Status ReclaimIfStale(const std::string& name) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (errno == ENOENT) return Status();  // gone meanwhile: retry
    if (errno == EACCES) {
      return FailedPrecondition("shm object " + name + " exists and is not ours (permission denied)");
    }
    return ErrnoError("shm_open " + name, errno);
  }
  // Another user's object is never ours to remove, stale or not (root could
  // unlink it; anyone else could not, and would retry until kUnavailable).
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoError("fstat " + name, err);
  }
  if (st.st_uid != geteuid()) {
    close(fd);
    return FailedPrecondition("shm object " + name + " exists and belongs to uid " + std::to_string(st.st_uid) +
                              ", not to this process's uid " + std::to_string(geteuid()));
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err != EWOULDBLOCK) {
      close(fd);
      return ErrnoError("flock " + name, err);
    }
    const uint64_t pid = OwnerPid(fd);
    close(fd);
    return FailedPrecondition("shm object " + name + " is in use by a live owner (pid " +
                              (pid != 0 ? std::to_string(pid) : std::string("unknown, still creating")) + ")");
  }
  // We hold the lock of the object `name` named when we opened it. Only a
  // holder of that lock unlinks that name, so if it still names our object
  // nobody can change that before our unlink; if not, another process
  // reclaimed it first and we leave its new object alone.
  if (NameRefersTo(name, fd) && shm_unlink(name.c_str()) != 0 && errno != ENOENT) {
    const int err = errno;
    close(fd);
    return ErrnoError("shm_unlink " + name + " (stale)", err);
  }
  close(fd);  // drops the lock only after the name no longer refers to this object
  return Status();
}

}  // namespace

StatusOr<size_t> ChunkIndex::ReclaimStale(const std::string& name_prefix) {
  if (name_prefix.size() < 2 || name_prefix[0] != '/' || name_prefix.find('/', 1) != std::string::npos) {
    return InvalidArgument("shm name prefix must be \"/prefix\" with no other '/', got \"" + name_prefix + "\"");
  }
  // glibc's shm_open names objects /dev/shm/<name without the slash>.
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return ErrnoError("opendir /dev/shm", errno);
  std::vector<std::string> names;
  const std::string bare = name_prefix.substr(1);
  while (const dirent* e = readdir(dir)) {
    const std::string n = e->d_name;
    if (n.compare(0, bare.size(), bare) == 0) names.push_back("/" + n);
  }
  closedir(dir);
  size_t reclaimed = 0;
  for (const std::string& name : names) {
    if (!ValidShmName(name)) continue;
    // OK: stale and unlinked (or vanished meanwhile); an error: live, not
    // ours, or unreadable, all of which are left as they are.
    if (ReclaimIfStale(name).ok()) ++reclaimed;
  }
  return reclaimed;
}

struct ChunkIndex::Located {
  Slot* slot;
  uint64_t control;  // a live state, validated against the key read
  uint64_t fingerprint;
  uint64_t sizes;
};

ChunkIndex::ChunkIndex(void* base, size_t bytes, bool read_only, std::string shm_name, bool owner)
    : base_(base),
      bytes_(bytes),
      read_only_(read_only),
      shm_name_(std::move(shm_name)),
      owner_(owner),
      // The opener never constructs objects in a mapping it cannot write; the
      // creator constructed them (Init) in the same layout.
      header_(std::launder(reinterpret_cast<RegionHeader*>(base))),
      slots_(std::launder(reinterpret_cast<Slot*>(static_cast<char*>(base) + sizeof(RegionHeader)))) {
  const uint64_t n = header_->num_slots.load(std::memory_order_relaxed);
  mask_ = n - 1;
  shift_ = 64 - static_cast<uint32_t>(std::countr_zero(n));
  max_probe_ = std::min<size_t>(n, kMaxProbe);
  capacity_ = header_->capacity.load(std::memory_order_relaxed);
}

ChunkIndex::~ChunkIndex() {
  munmap(base_, bytes_);
  if (owner_ && !shm_name_.empty()) shm_unlink(shm_name_.c_str());
  if (lock_fd_ >= 0) close(lock_fd_);  // after the unlink: a reclaimer never sees our name unlocked
}

StatusOr<std::unique_ptr<ChunkIndex>> ChunkIndex::Init(void* base, size_t bytes, size_t capacity,
                                                       size_t num_slots, std::string shm_name,
                                                       bool owner) {
  // The memory is zero-filled (fresh anonymous pages or a fresh ftruncate),
  // which is the encoding of Empty/version 0; constructing the atomics only
  // starts their lifetimes.
  auto* h = new (base) RegionHeader{};
  auto* slots = reinterpret_cast<Slot*>(static_cast<char*>(base) + sizeof(RegionHeader));
  for (size_t i = 0; i < num_slots; ++i) new (&slots[i]) Slot{};
  h->format_version.store(index_internal::kRegionFormatVersion, std::memory_order_relaxed);
  h->slot_size.store(sizeof(Slot), std::memory_order_relaxed);
  h->capacity.store(capacity, std::memory_order_relaxed);
  h->num_slots.store(num_slots, std::memory_order_relaxed);
  h->owner_pid.store(shm_name.empty() ? 0 : static_cast<uint64_t>(getpid()), std::memory_order_relaxed);
  // Pairs with the acquire load of magic in OpenReadOnly: an opener that sees
  // the magic sees every header field and every constructed slot.
  h->magic.store(index_internal::kRegionMagic, std::memory_order_release);
  return std::unique_ptr<ChunkIndex>(new ChunkIndex(base, bytes, false, std::move(shm_name), owner));
}

StatusOr<std::unique_ptr<ChunkIndex>> ChunkIndex::Create(size_t capacity) {
  KVT_ASSIGN_OR_RETURN(size_t num_slots, SlotsFor(capacity));
  const size_t bytes = RegionBytes(num_slots);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return ErrnoError("mmap ChunkIndex region", errno);
  return Init(p, bytes, capacity, num_slots, "", false);
}

StatusOr<std::unique_ptr<ChunkIndex>> ChunkIndex::CreateShared(const std::string& shm_name,
                                                               size_t capacity) {
  if (!ValidShmName(shm_name)) {
    return InvalidArgument("shm name must be \"/name\" (1-254 chars, no other '/'), got \"" +
                           shm_name + "\"");
  }
  KVT_ASSIGN_OR_RETURN(size_t num_slots, SlotsFor(capacity));
  const size_t bytes = RegionBytes(num_slots);
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    if (attempt == kCreateAttempts) {
      return Unavailable("shm object " + shm_name + ": gave up after " + std::to_string(kCreateAttempts) +
                         " attempts (other processes keep creating or reclaiming it)");
    }
    fd = shm_open(shm_name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      if (errno != EEXIST) return ErrnoError("shm_open " + shm_name, errno);
      KVT_RETURN_IF_ERROR(ReclaimIfStale(shm_name));  // a live owner ends here
      continue;
    }
    // Ours from here to the end of our life: the lock tells others that the
    // object is live. Between shm_open and flock a reclaimer may take the
    // object for stale (it is unlocked); then it is no longer named
    // shm_name, and we start over.
    if (flock(fd, LOCK_EX | LOCK_NB) != 0 || !NameRefersTo(shm_name, fd)) {
      close(fd);
      fd = -1;
    }
  }
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    shm_unlink(shm_name.c_str());
    close(fd);
    return ErrnoError("ftruncate " + shm_name, err);
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  if (p == MAP_FAILED) {
    shm_unlink(shm_name.c_str());
    close(fd);
    return ErrnoError("mmap " + shm_name, err);
  }
  auto index = Init(p, bytes, capacity, num_slots, shm_name, true);
  if (!index.ok()) {  // Init cannot fail today; keep the lock and name consistent if it ever does
    munmap(p, bytes);
    shm_unlink(shm_name.c_str());
    close(fd);
    return index.status();
  }
  (*index)->lock_fd_ = fd;  // held (and the flock with it) until destruction
  return index;
}

StatusOr<std::unique_ptr<const ChunkIndex>> ChunkIndex::OpenReadOnly(const std::string& shm_name) {
  if (!ValidShmName(shm_name)) {
    return InvalidArgument("shm name must be \"/name\" (1-254 chars, no other '/'), got \"" +
                           shm_name + "\"");
  }
  const int fd = shm_open(shm_name.c_str(), O_RDONLY, 0);
  if (fd < 0) {
    if (errno == ENOENT) return NotFound("shm object " + shm_name + " does not exist");
    return ErrnoError("shm_open " + shm_name, errno);
  }
  auto refuse = [&](const std::string& why) -> Status {
    close(fd);
    return FailedPrecondition(shm_name + ": " + why);
  };
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoError("fstat " + shm_name, err);
  }
  // Only a catalogue our own user created, readable by nobody else, is
  // trusted: anyone could otherwise plant a region under the name.
  if (st.st_uid != geteuid()) {
    return refuse("owned by uid " + std::to_string(st.st_uid) + ", not by this process's uid " +
                  std::to_string(geteuid()));
  }
  if ((st.st_mode & 0077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return refuse(std::string("mode ") + mode + "; a catalogue must be 0600 (no group or other access)");
  }
  const size_t file_bytes = static_cast<size_t>(st.st_size);
  HeaderWords h{};
  if (file_bytes < sizeof(RegionHeader) || !ReadHeader(fd, &h)) {
    return refuse("too small to be a ChunkIndex region (" + std::to_string(file_bytes) + " bytes)");
  }
  if (h.magic != index_internal::kRegionMagic) {
    return refuse("bad magic (not a ChunkIndex region, or not initialised yet)");
  }
  if (h.format_version != index_internal::kRegionFormatVersion) {
    return refuse("format version " + std::to_string(h.format_version) + " != " +
                  std::to_string(index_internal::kRegionFormatVersion));
  }
  if (h.slot_size != sizeof(Slot)) return refuse("slot size mismatch");
  const uint64_t n = h.num_slots;
  if (n < 16 || !std::has_single_bit(n) || h.capacity == 0 || h.capacity > n || n > (uint64_t{1} << 40)) {
    return refuse("inconsistent header (slots " + std::to_string(n) + ", capacity " + std::to_string(h.capacity) +
                  ")");
  }
  // Map exactly what the header describes, and only if the object holds it:
  // touching a page past the end of the object would be a SIGBUS.
  const size_t bytes = RegionBytes(n);
  if (bytes > file_bytes) {
    return refuse("truncated: the header describes " + std::to_string(n) + " slots (" + std::to_string(bytes) +
                  " bytes), the object has " + std::to_string(file_bytes) + " bytes");
  }
  void* p = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  if (p == MAP_FAILED) return ErrnoError("mmap " + shm_name, err);
  // Pairs with the release store of magic in Init: the fields and slots the
  // creator wrote before it are visible through this mapping.
  const auto* mapped = std::launder(reinterpret_cast<const RegionHeader*>(p));
  if (mapped->magic.load(std::memory_order_acquire) != index_internal::kRegionMagic ||
      mapped->num_slots.load(std::memory_order_relaxed) != n) {
    munmap(p, bytes);
    return FailedPrecondition(shm_name + ": the region changed while it was being opened");
  }
  return std::unique_ptr<const ChunkIndex>(new ChunkIndex(p, bytes, true, shm_name, false));
}

size_t ChunkIndex::capacity() const { return capacity_; }

size_t ChunkIndex::size() const {
  return static_cast<size_t>(header_->live.load(std::memory_order_relaxed));  // a count; guards nothing
}

namespace {
inline uint64_t HomeHash(const ChunkKey& k) {
  // Keys are XXH3 output in production, but structured keys (tests, tools)
  // must not pile onto one home: mix both halves, then fold the high bits
  // down (the caller takes the top bits: Fibonacci hashing).
  uint64_t x = k.lo * 0x9E3779B97F4A7C15ull + k.hi;
  x ^= x >> 32;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 29;
  return x * 0x9E3779B97F4A7C15ull;
}
}  // namespace

std::optional<ChunkIndex::Located> ChunkIndex::Locate(const ChunkKey& key) const {
  const uint64_t home = HomeHash(key) >> shift_;
  for (size_t i = 0; i < max_probe_; ++i) {
    Slot& s = slots_[(home + i * (i + 1) / 2) & mask_];
    // Pairs with the inserter's seq_cst Candidate publish (release half) and
    // later state CASes: seeing a live state means the key is written.
    const uint64_t c1 = LoadControlAcquire(s);
    const uint64_t st = State(c1);
    if (st == kStEmpty) return std::nullopt;  // slots never return to Empty
    if (!IsLive(st)) continue;
    const uint64_t lo = Relaxed(s.key_lo);
    const uint64_t hi = Relaxed(s.key_hi);
    const uint64_t fp = Relaxed(s.fingerprint);
    const uint64_t sizes = Relaxed(s.sizes);
    // Pairs with FenceBeforeFieldWrites of an inserter re-claiming this slot:
    // if we read its new key, c2 shows its new version.
    FenceAfterFieldReads();
    const uint64_t c2 = ReloadControlAfterFence(s);
    if (Version(c2) != Version(c1) || !IsLive(State(c2))) continue;
    if (lo == key.lo && hi == key.hi) return Located{&s, c2, fp, sizes};
  }
  return std::nullopt;
}

bool ChunkIndex::ReadEntry(const Slot& s, IndexEntry* e, uint64_t* control) const {
  const uint64_t c1 = LoadControlAcquire(s);  // pairs as in Locate
  if (!IsLive(State(c1))) return false;
  const uint64_t lo = Relaxed(s.key_lo), hi = Relaxed(s.key_hi);
  const uint64_t fp = Relaxed(s.fingerprint), sizes = Relaxed(s.sizes);
  FenceAfterFieldReads();  // pairs with FenceBeforeFieldWrites, as in Locate
  const uint64_t c2 = ReloadControlAfterFence(s);
  if (Version(c2) != Version(c1) || !IsLive(State(c2))) return false;
  *e = IndexEntry{ChunkKey{lo, hi},
                  fp,
                  static_cast<uint32_t>(sizes),
                  static_cast<uint32_t>(sizes >> 32),
                  Tiers(c2),
                  Pins(c2),
                  static_cast<EntryState>(State(c2))};
  if (control) *control = c2;
  return true;
}

template <typename Transition>
Status ChunkIndex::Transform(const ChunkKey& key, Transition&& transition, uint64_t* new_control) {
  for (;;) {
    std::optional<Located> loc = Locate(key);
    if (!loc) return NotFound("chunk " + key.ToHex() + " not in index");
    const uint32_t version = Version(loc->control);
    uint64_t c = loc->control;
    for (;;) {
      uint64_t next = 0;
      KVT_RETURN_IF_ERROR(transition(c, &next));
      // Release: publishes the transition; acquire (also on failure): the
      // retry decides on the newest word. Pairs with LoadControlAcquire of
      // readers and with other transitions of this slot.
      if (CasControlAcqRel(*loc->slot, c, next)) {
        if (new_control) *new_control = next;
        return Status::Ok();
      }
      // Removed (and maybe recycled) under us: look the key up again.
      if (Version(c) != version || !IsLive(State(c))) break;
    }
  }
}

Status ChunkIndex::Insert(const ChunkKey& key, uint64_t fingerprint, uint32_t num_tokens,
                          uint32_t size_bytes) {
  if (key.IsNull()) return InvalidArgument("the null ChunkKey cannot be inserted");
  // Reservation bounds the load factor; relaxed because it is a count: slot
  // ownership is decided by the control CAS alone.
  if (header_->reserved.fetch_add(1, std::memory_order_relaxed) >= capacity_) {
    header_->reserved.fetch_sub(1, std::memory_order_relaxed);
    return ResourceExhausted("ChunkIndex full (capacity " + std::to_string(capacity_) + ")");
  }
  auto release_reservation = [&] { header_->reserved.fetch_sub(1, std::memory_order_relaxed); };

  const uint64_t home = HomeHash(key) >> shift_;
  auto slot_at = [&](size_t i) -> Slot& { return slots_[(home + i * (i + 1) / 2) & mask_]; };

  // 1. Claim the first free slot of the window (fail fast on a live copy
  //    before it). Every load/CAS on this path is seq_cst: the duplicate
  //    argument in the header reasons in their single total order.
  size_t pos = max_probe_;
  uint32_t version = 0;
  for (size_t i = 0; i < max_probe_ && pos == max_probe_; ++i) {
    Slot& s = slot_at(i);
    uint64_t c = LoadControlSeqCst(s);
    for (;;) {
      const uint64_t st = State(c);
      if (st == kStEmpty || st == kStTombstone) {
        const uint32_t v = Version(c) + 1;
        if (CasControlSeqCst(s, c, MakeControl(kStClaimed, 0, 0, v))) {
          pos = i;
          version = v;
        }
        if (pos == i) break;
        continue;  // lost the slot: c holds its new word
      }
      if (IsLive(st) && Relaxed(s.key_lo) == key.lo && Relaxed(s.key_hi) == key.hi) {
        FenceAfterFieldReads();  // pairs with FenceBeforeFieldWrites (seqlock read)
        if (Version(ReloadControlAfterFence(s)) == Version(c)) {
          release_reservation();
          return AlreadyExists("chunk " + key.ToHex() + " already in index");
        }
      }
      break;
    }
  }
  if (pos == max_probe_) {
    release_reservation();
    return ResourceExhausted("no free slot within " + std::to_string(max_probe_) +
                             " probes of chunk " + key.ToHex());
  }

  // 2. Fill the claimed slot, then publish it as Candidate.
  Slot& mine = slot_at(pos);
  // Pairs with FenceAfterFieldReads in readers: a reader that reads the key
  // below also sees our Claimed version and discards the read.
  FenceBeforeFieldWrites();
  mine.key_lo.store(key.lo, std::memory_order_relaxed);
  mine.key_hi.store(key.hi, std::memory_order_relaxed);
  mine.fingerprint.store(fingerprint, std::memory_order_relaxed);
  mine.sizes.store(uint64_t{num_tokens} | (uint64_t{size_bytes} << 32), std::memory_order_relaxed);
  const uint64_t candidate = MakeControl(kStCandidate, 0, 0, version);
  // Release half: other inserters' scans that see Candidate see the key.
  // Seq_cst: Dekker with their Candidate publish + scan.
  PublishControlSeqCst(mine, candidate);

  // 3. Duplicate scan over the whole window up to the first Empty.
  bool lost = false;
  for (size_t j = 0; j < max_probe_ && !lost; ++j) {
    if (j == pos) continue;
    Slot& s = slot_at(j);
    uint64_t c = LoadControlSeqCst(s);
    if (State(c) == kStEmpty) break;
    for (;;) {
      const uint64_t st = State(c);
      if (!IsLive(st) && st != kStCandidate) break;
      const uint64_t lo = Relaxed(s.key_lo), hi = Relaxed(s.key_hi);
      FenceAfterFieldReads();  // pairs with FenceBeforeFieldWrites (seqlock read)
      const uint64_t c2 = LoadControlSeqCst(s);
      // Recycled: the new owner published after our Candidate, so its own
      // scan will meet us.
      if (Version(c2) != Version(c) || lo != key.lo || hi != key.hi) break;
      const uint64_t st2 = State(c2);
      if (IsLive(st2) || (st2 == kStCandidate && j < pos)) {
        lost = true;
        break;
      }
      if (st2 != kStCandidate) break;
      // A Candidate further from home than us: it must not win.
      uint64_t expect = c2;
      if (CasControlSeqCst(s, expect, MakeControl(kStTombstone, 0, 0, Version(c2)))) break;
      c = expect;  // it moved on (won, or was killed): judge its new word
    }
  }

  if (!lost) {
    // Counted before the CAS so size() is never below the true count.
    header_->live.fetch_add(1, std::memory_order_relaxed);
    uint64_t expect = candidate;
    // Fails only if a Candidate nearer home tombstoned us.
    if (CasControlSeqCst(mine, expect, MakeControl(kStWriting, 0, 0, version))) return Status::Ok();
    header_->live.fetch_sub(1, std::memory_order_relaxed);
  } else {
    uint64_t expect = candidate;
    (void)CasControlSeqCst(mine, expect, MakeControl(kStTombstone, 0, 0, version));  // fails if already killed
  }
  release_reservation();
  return AlreadyExists("chunk " + key.ToHex() + " already in index (concurrent insert won)");
}

Status ChunkIndex::Publish(const ChunkKey& key) {
  return Transform(
      key,
      [&](uint64_t c, uint64_t* next) -> Status {
        if (State(c) != kStWriting) {
          return FailedPrecondition("Publish of chunk " + key.ToHex() + " in state " +
                                    StateName(State(c)) + " (want writing)");
        }
        *next = WithState(c, kStReady);
        return Status::Ok();
      },
      nullptr);
}

StatusOr<uint32_t> ChunkIndex::UpdateTiers(const ChunkKey& key, uint32_t set_mask,
                                           uint32_t clear_mask) {
  if ((set_mask | clear_mask) & ~static_cast<uint32_t>(kTierMaskBits)) {
    return InvalidArgument("tier masks may use only the low " + std::to_string(kMaxTierBits) +
                           " bits (set " + std::to_string(set_mask) + ", clear " +
                           std::to_string(clear_mask) + ")");
  }
  uint64_t after = 0;
  KVT_RETURN_IF_ERROR(Transform(
      key,
      [&](uint64_t c, uint64_t* next) -> Status {
        const uint32_t m = (Tiers(c) | set_mask) & ~clear_mask;
        *next = (c & ~(kTierMaskBits << kTierShift)) | (uint64_t{m} << kTierShift);
        return Status::Ok();
      },
      &after));
  return Tiers(after);
}

Status ChunkIndex::Pin(const ChunkKey& key) {
  return Transform(
      key,
      [&](uint64_t c, uint64_t* next) -> Status {
        if (State(c) != kStReady) {
          return FailedPrecondition("Pin of chunk " + key.ToHex() + " in state " +
                                    StateName(State(c)) + " (want ready)");
        }
        if (Pins(c) == kMaxPins) return ResourceExhausted("pin count of chunk " + key.ToHex() + " at maximum");
        *next = c + (uint64_t{1} << kPinShift);
        return Status::Ok();
      },
      nullptr);
}

Status ChunkIndex::Unpin(const ChunkKey& key) {
  return Transform(
      key,
      [&](uint64_t c, uint64_t* next) -> Status {
        if (Pins(c) == 0) return FailedPrecondition("Unpin of chunk " + key.ToHex() + " with no pins");
        *next = c - (uint64_t{1} << kPinShift);
        return Status::Ok();
      },
      nullptr);
}

Status ChunkIndex::BeginEvict(const ChunkKey& key) {
  return Transform(
      key,
      [&](uint64_t c, uint64_t* next) -> Status {
        if (State(c) != kStReady || Pins(c) != 0) {
          return FailedPrecondition("BeginEvict of chunk " + key.ToHex() + " in state " +
                                    StateName(State(c)) + " with " + std::to_string(Pins(c)) +
                                    " pins (want ready, unpinned)");
        }
        *next = WithState(c, kStEvicting);
        return Status::Ok();
      },
      nullptr);
}

Status ChunkIndex::Remove(const ChunkKey& key) {
  KVT_RETURN_IF_ERROR(Transform(
      key,
      [&](uint64_t c, uint64_t* next) -> Status {
        if (Pins(c) != 0) {
          return FailedPrecondition("Remove of chunk " + key.ToHex() + " with " +
                                    std::to_string(Pins(c)) + " pins");
        }
        // Same version: only a new claim bumps it.
        *next = MakeControl(kStTombstone, 0, 0, Version(c));
        return Status::Ok();
      },
      nullptr));
  header_->live.fetch_sub(1, std::memory_order_relaxed);
  header_->reserved.fetch_sub(1, std::memory_order_relaxed);
  return Status::Ok();
}

std::optional<IndexEntry> ChunkIndex::Find(const ChunkKey& key) const {
  std::optional<Located> loc = Locate(key);
  if (!loc) return std::nullopt;
  // Every field was read inside one validated window of Locate.
  const uint64_t c = loc->control;
  return IndexEntry{key,
                    loc->fingerprint,
                    static_cast<uint32_t>(loc->sizes),
                    static_cast<uint32_t>(loc->sizes >> 32),
                    Tiers(c),
                    Pins(c),
                    static_cast<EntryState>(State(c))};
}

size_t ChunkIndex::LookupPrefix(std::span<const ChunkKey> keys,
                                std::span<const uint64_t> fingerprints) const {
  const bool check_fp = !fingerprints.empty();
  const size_t n = check_fp ? std::min(keys.size(), fingerprints.size()) : keys.size();
  for (size_t i = 0; i < n; ++i) {
    if (i + 1 < n) __builtin_prefetch(&slots_[(HomeHash(keys[i + 1]) >> shift_) & mask_]);
    std::optional<Located> loc = Locate(keys[i]);
    if (!loc || State(loc->control) != kStReady) return i;
    if (check_fp && loc->fingerprint != fingerprints[i]) return i;
  }
  return n;
}

void ChunkIndex::ForEach(const std::function<void(const IndexEntry&)>& fn) const {
  for (size_t i = 0; i <= mask_; ++i) {
    IndexEntry e;
    if (ReadEntry(slots_[i], &e, nullptr)) fn(e);
  }
}

}  // namespace kvtier
