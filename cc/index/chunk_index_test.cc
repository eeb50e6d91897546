#include "cc/index/chunk_index.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace kvtier {
namespace {

ChunkKey Key(uint64_t i) { return ChunkKey{i * 0x9E3779B97F4A7C15ull + 1, i}; }
uint64_t Fp(uint64_t i) { return i * 31 + 7; }

std::unique_ptr<ChunkIndex> MakeIndex(size_t capacity) {
  auto idx = ChunkIndex::Create(capacity);
  EXPECT_TRUE(idx.ok()) << idx.status().ToString();
  return std::move(idx).value();
}

// Unique per run: Bazel's sandbox gives every test the same small pid, and
// /dev/shm outlives a crashed run.
std::string ShmName(const char* tag) {
  static const std::string run = std::to_string(getpid()) + "_" +
                                 std::to_string(std::random_device{}());
  return "/kvtier_idx_test_" + std::string(tag) + "_" + run;
}

TEST(ChunkIndexTest, CreateRejectsBadArguments) {
  EXPECT_EQ(ChunkIndex::Create(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkIndex::Create(ChunkIndex::kMaxCapacity + 1).status().code(),
            StatusCode::kInvalidArgument);
  for (const char* bad : {"", "/", "noslash", "/a/b"}) {
    EXPECT_EQ(ChunkIndex::CreateShared(bad, 16).status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(ChunkIndex::OpenReadOnly(bad).status().code(), StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(ChunkIndex::CreateShared(ShmName("cap0"), 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkIndex::OpenReadOnly(ShmName("missing")).status().code(), StatusCode::kNotFound);
  auto a = ChunkIndex::CreateShared(ShmName("dup"), 16);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  // A live owner keeps its name; the error says who holds it.
  auto dup = ChunkIndex::CreateShared(ShmName("dup"), 16);
  EXPECT_EQ(dup.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(dup.status().message().find("live owner (pid " + std::to_string(getpid()) + ")"),
            std::string_view::npos)
      << dup.status().ToString();
}

// The catalogue of an owner killed with SIGKILL (no destructor ran, its name
// is still in /dev/shm) is reclaimed by the next CreateShared.
TEST(ChunkIndexTest, CreateSharedReclaimsTheNameOfAKilledOwner) {
  const std::string name = ShmName("killed");
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(ready[0]);
    auto idx = ChunkIndex::CreateShared(name, 64);
    const char ok = idx.ok() && idx.value()->Insert(Key(1), Fp(1), 16, 64).ok() ? 'y' : 'n';
    (void)!write(ready[1], &ok, 1);
    for (;;) pause();  // killed here, still owning the name
  }
  close(ready[1]);
  char ok = 0;
  ASSERT_EQ(read(ready[0], &ok, 1), 1);
  close(ready[0]);
  ASSERT_EQ(ok, 'y');

  // While the child lives, its name is refused, naming the child.
  auto live = ChunkIndex::CreateShared(name, 64);
  EXPECT_EQ(live.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(live.status().message().find("pid " + std::to_string(pid)), std::string_view::npos)
      << live.status().ToString();

  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));
  const int stale = shm_open(name.c_str(), O_RDONLY, 0);
  ASSERT_GE(stale, 0) << "the killed owner's name should still exist";
  close(stale);

  auto fresh = ChunkIndex::CreateShared(name, 128);
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  EXPECT_EQ(fresh.value()->capacity(), 128u);
  EXPECT_FALSE(fresh.value()->Find(Key(1)).has_value());  // a new region, not the dead one's
  auto reader = ChunkIndex::OpenReadOnly(name);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ(reader.value()->capacity(), 128u);
}

// ReclaimStale sweeps what killed owners left under a prefix, whatever the
// names, and leaves live owners' objects alone.
TEST(ChunkIndexTest, ReclaimStaleSweepsDeadOwnersOnly) {
  const std::string prefix = ShmName("sweep");
  const std::string dead_name = prefix + "_dead";
  const std::string live_name = prefix + "_live";
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(ready[0]);
    auto idx = ChunkIndex::CreateShared(dead_name, 64);
    const char ok = idx.ok() ? 'y' : 'n';
    (void)!write(ready[1], &ok, 1);
    for (;;) pause();
  }
  close(ready[1]);
  char ok = 0;
  ASSERT_EQ(read(ready[0], &ok, 1), 1);
  close(ready[0]);
  ASSERT_EQ(ok, 'y');
  auto live = ChunkIndex::CreateShared(live_name, 64);
  ASSERT_TRUE(live.ok()) << live.status().ToString();

  // While the child lives nothing is stale.
  auto none = ChunkIndex::ReclaimStale(prefix);
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  EXPECT_EQ(*none, 0u);

  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  auto one = ChunkIndex::ReclaimStale(prefix);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_EQ(*one, 1u);
  EXPECT_EQ(ChunkIndex::OpenReadOnly(dead_name).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(ChunkIndex::OpenReadOnly(live_name).ok());
  EXPECT_EQ(ChunkIndex::ReclaimStale("no-slash").status().code(), StatusCode::kInvalidArgument);
}

// A creator that died between shm_open and sizing the object left an empty,
// unlocked object: stale as well.
TEST(ChunkIndexTest, CreateSharedReclaimsAnEmptyLeftover) {
  const std::string name = ShmName("empty");
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  auto idx = ChunkIndex::CreateShared(name, 16);
  ASSERT_TRUE(idx.ok()) << idx.status().ToString();
}

// A leftover of another user is not reclaimed, even when nobody holds its
// lock and we could remove it (root): the error names its uid, the object
// stays. Needs CAP_CHOWN to give the object away; skipped without it.
TEST(ChunkIndexTest, CreateSharedLeavesAnotherUsersObjectAlone) {
  const std::string name = ShmName("foreign_uid");
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  if (fchown(fd, 65534, static_cast<gid_t>(-1)) != 0) {
    close(fd);
    shm_unlink(name.c_str());
    GTEST_SKIP() << "cannot chown a shm object here (needs CAP_CHOWN)";
  }
  struct stat before;
  ASSERT_EQ(fstat(fd, &before), 0);
  auto idx = ChunkIndex::CreateShared(name, 16);
  EXPECT_EQ(idx.status().code(), StatusCode::kFailedPrecondition) << idx.status().ToString();
  EXPECT_NE(idx.status().message().find("belongs to uid 65534"), std::string_view::npos) << idx.status().ToString();
  const int again = shm_open(name.c_str(), O_RDONLY, 0);
  ASSERT_GE(again, 0) << "the other user's object was removed";
  struct stat after;
  ASSERT_EQ(fstat(again, &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino);
  close(again);
  close(fd);
  shm_unlink(name.c_str());
}

TEST(ChunkIndexTest, OpenReadOnlyRefusesAnyGroupOrOtherAccess) {
  const std::string name = ShmName("mode");
  auto idx = ChunkIndex::CreateShared(name, 16);
  ASSERT_TRUE(idx.ok()) << idx.status().ToString();
  ASSERT_TRUE(ChunkIndex::OpenReadOnly(name).ok());
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  for (mode_t mode : {0640, 0604, 0660, 0644}) {
    ASSERT_EQ(fchmod(fd, mode), 0);
    auto r = ChunkIndex::OpenReadOnly(name);
    EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << std::oct << mode;
    EXPECT_NE(r.status().message().find("must be 0600"), std::string_view::npos) << r.status().ToString();
  }
  ASSERT_EQ(fchmod(fd, 0600), 0);
  EXPECT_TRUE(ChunkIndex::OpenReadOnly(name).ok());
  // Only a process that may give the object away (root with CAP_CHOWN) can
  // test the owner check; elsewhere it is covered by reading the code.
  if (fchown(fd, 65534, static_cast<gid_t>(-1)) == 0) {
    auto r = ChunkIndex::OpenReadOnly(name);
    EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(r.status().message().find("owned by uid 65534"), std::string_view::npos) << r.status().ToString();
    ASSERT_EQ(fchown(fd, geteuid(), static_cast<gid_t>(-1)), 0);
  }
  close(fd);
}

// A region shorter than its header says is refused before it is mapped (the
// old code mapped first: reading a page past the end would be a SIGBUS).
TEST(ChunkIndexTest, OpenReadOnlyRefusesATruncatedRegionWithoutSigbus) {
  const std::string name = ShmName("trunc");
  auto idx = ChunkIndex::CreateShared(name, 1024);
  ASSERT_TRUE(idx.ok()) << idx.status().ToString();
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);  // header intact, most slots gone
  close(fd);
  auto r = ChunkIndex::OpenReadOnly(name);
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("truncated"), std::string_view::npos) << r.status().ToString();
}

TEST(ChunkIndexTest, OpenReadOnlyRejectsForeignRegion) {
  const std::string name = ShmName("foreign");
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);
  close(fd);
  auto r = ChunkIndex::OpenReadOnly(name);
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("magic"), std::string_view::npos) << r.status().ToString();
  fd = shm_open(name.c_str(), O_RDWR, 0600);
  ASSERT_EQ(ftruncate(fd, 8), 0);  // shorter than a header
  close(fd);
  EXPECT_EQ(ChunkIndex::OpenReadOnly(name).status().code(), StatusCode::kFailedPrecondition);
  shm_unlink(name.c_str());
}

TEST(ChunkIndexTest, EveryStateTransitionAndErrorCode) {
  auto idx = MakeIndex(16);
  const ChunkKey k = Key(1);
  const ChunkKey absent = Key(2);
  EXPECT_EQ(idx->Insert(ChunkKey{}, 1, 1, 1).code(), StatusCode::kInvalidArgument);

  for (Status s : {idx->Publish(absent), idx->Pin(absent), idx->Unpin(absent),
                   idx->BeginEvict(absent), idx->Remove(absent), idx->UpdateTiers(absent, 1, 0).status()}) {
    EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();
  }

  ASSERT_TRUE(idx->Insert(k, 77, 256, 4096).ok());
  EXPECT_EQ(idx->size(), 1u);
  auto e = idx->Find(k);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->key, k);
  EXPECT_EQ(e->fingerprint, 77u);
  EXPECT_EQ(e->num_tokens, 256u);
  EXPECT_EQ(e->size_bytes, 4096u);
  EXPECT_EQ(e->tier_mask, 0u);
  EXPECT_EQ(e->pins, 0u);
  EXPECT_EQ(e->state, EntryState::kWriting);
  EXPECT_EQ(idx->Insert(k, 77, 256, 4096).code(), StatusCode::kAlreadyExists);

  // kWriting: not pinnable, not evictable, invisible to LookupPrefix.
  EXPECT_EQ(idx->Pin(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->Unpin(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->BeginEvict(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->LookupPrefix(std::vector<ChunkKey>{k}), 0u);

  ASSERT_TRUE(idx->Publish(k).ok());
  EXPECT_EQ(idx->Find(k)->state, EntryState::kReady);
  EXPECT_EQ(idx->Publish(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->LookupPrefix(std::vector<ChunkKey>{k}), 1u);

  // Pins nest and block eviction and removal.
  ASSERT_TRUE(idx->Pin(k).ok());
  ASSERT_TRUE(idx->Pin(k).ok());
  EXPECT_EQ(idx->Find(k)->pins, 2u);
  EXPECT_EQ(idx->BeginEvict(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->Remove(k).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(idx->Unpin(k).ok());
  ASSERT_TRUE(idx->Unpin(k).ok());
  EXPECT_EQ(idx->Unpin(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->Find(k)->pins, 0u);

  // kEvicting: not pinnable, not re-evictable, not ready for lookups.
  ASSERT_TRUE(idx->BeginEvict(k).ok());
  EXPECT_EQ(idx->Find(k)->state, EntryState::kEvicting);
  EXPECT_EQ(idx->Pin(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->BeginEvict(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->Publish(k).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx->LookupPrefix(std::vector<ChunkKey>{k}), 0u);
  auto m = idx->UpdateTiers(k, 0b10, 0);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m, 0b10u);
  EXPECT_EQ(idx->Insert(k, 1, 1, 1).code(), StatusCode::kAlreadyExists);

  ASSERT_TRUE(idx->Remove(k).ok());
  EXPECT_FALSE(idx->Find(k).has_value());
  EXPECT_EQ(idx->size(), 0u);
  EXPECT_EQ(idx->Remove(k).code(), StatusCode::kNotFound);
  EXPECT_EQ(idx->Pin(k).code(), StatusCode::kNotFound);

  // Remove straight from kWriting and from kReady.
  ASSERT_TRUE(idx->Insert(k, 1, 1, 1).ok());
  EXPECT_EQ(idx->Find(k)->state, EntryState::kWriting);
  EXPECT_EQ(idx->Find(k)->tier_mask, 0u) << "a reinserted key starts fresh";
  ASSERT_TRUE(idx->Remove(k).ok());
  ASSERT_TRUE(idx->Insert(k, 1, 1, 1).ok());
  ASSERT_TRUE(idx->Publish(k).ok());
  ASSERT_TRUE(idx->Remove(k).ok());
  EXPECT_EQ(idx->size(), 0u);
}

TEST(ChunkIndexTest, UpdateTiers) {
  auto idx = MakeIndex(4);
  const ChunkKey k = Key(9);
  ASSERT_TRUE(idx->Insert(k, 1, 1, 1).ok());
  EXPECT_EQ(*idx->UpdateTiers(k, 0b0011, 0), 0b0011u);
  EXPECT_EQ(*idx->UpdateTiers(k, 0b0100, 0b0001), 0b0110u);
  EXPECT_EQ(*idx->UpdateTiers(k, 0b1000, 0b1000), 0b0110u) << "clear wins over set";
  EXPECT_EQ(*idx->UpdateTiers(k, 0, 0), 0b0110u);
  EXPECT_EQ(idx->Find(k)->tier_mask, 0b0110u);
  EXPECT_EQ(idx->UpdateTiers(k, 1u << ChunkIndex::kMaxTierBits, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(idx->UpdateTiers(k, 0, 0x80000000u).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(idx->Find(k)->tier_mask, 0b0110u);
  // Tier bits do not disturb state or pins, and vice versa.
  ASSERT_TRUE(idx->Publish(k).ok());
  ASSERT_TRUE(idx->Pin(k).ok());
  EXPECT_EQ(*idx->UpdateTiers(k, 0xff, 0), 0xffu);
  auto e = idx->Find(k);
  EXPECT_EQ(e->pins, 1u);
  EXPECT_EQ(e->state, EntryState::kReady);
}

TEST(ChunkIndexTest, FullIsResourceExhaustedAndRecovers) {
  auto idx = MakeIndex(10);
  EXPECT_EQ(idx->capacity(), 10u);
  for (uint64_t i = 0; i < 10; ++i) ASSERT_TRUE(idx->Insert(Key(i), Fp(i), 1, 1).ok()) << i;
  EXPECT_EQ(idx->size(), 10u);
  Status s = idx->Insert(Key(100), 1, 1, 1);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("full"), std::string_view::npos);
  EXPECT_EQ(idx->Insert(Key(3), 1, 1, 1).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(idx->size(), 10u);
  for (uint64_t i = 0; i < 10; ++i) EXPECT_TRUE(idx->Find(Key(i)).has_value());
  ASSERT_TRUE(idx->Remove(Key(4)).ok());
  ASSERT_TRUE(idx->Insert(Key(100), 1, 1, 1).ok());
  EXPECT_EQ(idx->Insert(Key(101), 1, 1, 1).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(idx->Find(Key(100)).has_value());
  EXPECT_FALSE(idx->Find(Key(4)).has_value());
}

TEST(ChunkIndexTest, TombstonesAreReused) {
  // 16 slots; 20000 insert/remove cycles of distinct keys only work if
  // tombstones are recycled (slots never return to Empty).
  auto idx = MakeIndex(4);
  for (uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(idx->Insert(Key(i), Fp(i), 1, 1).ok());
  for (uint64_t i = 1000; i < 21000; ++i) {
    ASSERT_TRUE(idx->Insert(Key(i), Fp(i), 5, 6).ok()) << i;
    ASSERT_TRUE(idx->Publish(Key(i)).ok());
    auto e = idx->Find(Key(i));
    ASSERT_TRUE(e.has_value());
    ASSERT_EQ(e->fingerprint, Fp(i));
    ASSERT_EQ(e->state, EntryState::kReady);
    ASSERT_FALSE(idx->Find(Key(i - 1)).has_value());
    ASSERT_TRUE(idx->Remove(Key(i)).ok());
  }
  EXPECT_EQ(idx->size(), 3u);
  for (uint64_t i = 0; i < 3; ++i) EXPECT_EQ(idx->Find(Key(i))->fingerprint, Fp(i));
  size_t n = 0;
  idx->ForEach([&](const IndexEntry&) { ++n; });
  EXPECT_EQ(n, 3u);
}

TEST(ChunkIndexTest, LookupPrefix) {
  auto idx = MakeIndex(64);
  std::vector<ChunkKey> keys;
  std::vector<uint64_t> fps;
  for (uint64_t i = 0; i < 10; ++i) {
    keys.push_back(Key(i));
    fps.push_back(Fp(i));
    ASSERT_TRUE(idx->Insert(Key(i), Fp(i), 256, 1024).ok());
    if (i != 6) {
      ASSERT_TRUE(idx->Publish(Key(i)).ok());
    }
  }
  EXPECT_EQ(idx->LookupPrefix({}), 0u);
  EXPECT_EQ(idx->LookupPrefix(keys), 6u) << "stops at the chunk still being written";
  EXPECT_EQ(idx->LookupPrefix(keys, fps), 6u);
  auto bad = fps;
  bad[2] ^= 1;
  EXPECT_EQ(idx->LookupPrefix(keys, bad), 2u) << "fingerprint mismatch is a miss";
  EXPECT_EQ(idx->LookupPrefix(keys), 6u) << "without fingerprints, keys alone decide";
  EXPECT_EQ(idx->LookupPrefix(keys, std::span<const uint64_t>(fps).first(3)), 3u);
  ASSERT_TRUE(idx->Publish(Key(6)).ok());
  EXPECT_EQ(idx->LookupPrefix(keys, fps), 10u);
  ASSERT_TRUE(idx->BeginEvict(Key(0)).ok());
  EXPECT_EQ(idx->LookupPrefix(keys, fps), 0u);
  std::vector<ChunkKey> tail(keys.begin() + 1, keys.end());
  tail.push_back(Key(555));
  EXPECT_EQ(idx->LookupPrefix(tail), 9u);
}

TEST(ChunkIndexTest, ForEachSeesEveryLiveEntryOnce) {
  auto idx = MakeIndex(100);
  for (uint64_t i = 0; i < 50; ++i) ASSERT_TRUE(idx->Insert(Key(i), Fp(i), i, 2 * i).ok());
  for (uint64_t i = 0; i < 50; i += 2) ASSERT_TRUE(idx->Publish(Key(i)).ok());
  for (uint64_t i = 0; i < 50; i += 5) ASSERT_TRUE(idx->Remove(Key(i)).ok());
  std::map<uint64_t, IndexEntry> seen;
  idx->ForEach([&](const IndexEntry& e) {
    EXPECT_EQ(e.key.hi * 0x9E3779B97F4A7C15ull + 1, e.key.lo);
    EXPECT_TRUE(seen.emplace(e.key.hi, e).second) << "visited twice";
  });
  EXPECT_EQ(seen.size(), 40u);
  EXPECT_EQ(idx->size(), 40u);
  for (auto& [i, e] : seen) {
    EXPECT_NE(i % 5, 0u);
    EXPECT_EQ(e.fingerprint, Fp(i));
    EXPECT_EQ(e.num_tokens, i);
    EXPECT_EQ(e.size_bytes, 2 * i);
    EXPECT_EQ(e.state, i % 2 == 0 ? EntryState::kReady : EntryState::kWriting);
  }
}

// ---- Cross-process --------------------------------------------------------

// The /proc/self/maps lines that map `shm_name` (address range + perms).
std::set<std::string> ShmMappings(const std::string& shm_name) {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> out;
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("/dev/shm" + shm_name) != std::string::npos) out.insert(line.substr(0, line.find(' ', line.find(' ') + 1)));
  }
  return out;
}

TEST(ChunkIndexTest, SecondProcessReadsSharedIndexReadOnly) {
  const std::string name = ShmName("xproc");
  auto idx_or = ChunkIndex::CreateShared(name, 128);
  ASSERT_TRUE(idx_or.ok()) << idx_or.status().ToString();
  auto idx = std::move(idx_or).value();
  std::vector<ChunkKey> keys;
  std::vector<uint64_t> fps;
  for (uint64_t i = 0; i < 20; ++i) {
    keys.push_back(Key(i));
    fps.push_back(Fp(i));
    ASSERT_TRUE(idx->Insert(Key(i), Fp(i), 256, 4096).ok());
    if (i < 12) {
      ASSERT_TRUE(idx->Publish(Key(i)).ok());
    }
  }
  ASSERT_TRUE(idx->Pin(Key(3)).ok());
  ASSERT_TRUE(idx->UpdateTiers(Key(3), 0b101, 0).ok());

  int to_child[2], to_parent[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(to_parent), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: exit code names the first failed check (0 = all passed).
    close(to_child[1]);
    close(to_parent[0]);
    // The fork inherited the owner's read-write mapping; the opener's own
    // mapping is the one that appears with OpenReadOnly.
    const std::set<std::string> inherited = ShmMappings(name);
    auto ro = ChunkIndex::OpenReadOnly(name);
    if (!ro.ok()) _exit(10);
    const ChunkIndex& r = **ro;
    if (r.capacity() != 128 || r.size() != 20) _exit(11);
    if (r.LookupPrefix(keys, fps) != 12) _exit(12);
    auto e = r.Find(Key(3));
    if (!e || e->pins != 1 || e->tier_mask != 0b101 || e->fingerprint != Fp(3) ||
        e->state != EntryState::kReady || e->size_bytes != 4096) {
      _exit(13);
    }
    int new_mappings = 0;
    for (const std::string& m : ShmMappings(name)) {
      if (inherited.count(m)) continue;
      ++new_mappings;
      if (m.substr(m.find(' ') + 1) != "r--s") _exit(14);  // PROT_READ, MAP_SHARED
    }
    if (new_mappings != 1) _exit(19);
    char b = 1;
    if (write(to_parent[1], &b, 1) != 1) _exit(15);
    if (read(to_child[0], &b, 1) != 1) _exit(16);  // parent published the rest
    // Key(0) is gone now, so count from Key(1).
    if (r.LookupPrefix(std::span(keys).subspan(1), std::span(fps).subspan(1)) != 19) _exit(17);
    if (r.LookupPrefix(keys, fps) != 0) _exit(20);
    if (r.Find(Key(0)).has_value()) _exit(18);  // parent removed it
    _exit(0);
  }
  // Closed here so that a child that fails early gives us EOF, not a hang.
  close(to_child[0]);
  close(to_parent[1]);
  char b = 0;
  const bool child_ready = read(to_parent[0], &b, 1) == 1;
  for (uint64_t i = 12; i < 20; ++i) EXPECT_TRUE(idx->Publish(Key(i)).ok());
  EXPECT_TRUE(idx->Remove(Key(0)).ok());
  if (child_ready) {
    EXPECT_EQ(write(to_child[1], &b, 1), 1);
  }
  close(to_child[1]);
  close(to_parent[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child check failed (see exit codes in the test)";

  // A writer through the read-only mapping faults instead of corrupting.
  pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto ro = ChunkIndex::OpenReadOnly(name);
    if (!ro.ok()) _exit(10);
    (void)const_cast<ChunkIndex&>(**ro).Unpin(Key(3));  // must fault
    _exit(0);
  }
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "write through PROT_READ succeeded";
  EXPECT_EQ(idx->Find(Key(3))->pins, 1u);

  idx.reset();  // owner unlinks the name
  EXPECT_EQ(ChunkIndex::OpenReadOnly(name).status().code(), StatusCode::kNotFound);
}

// ---- Concurrency ----------------------------------------------------------

// Releases all threads within nanoseconds of each other (std::barrier wakes
// sleepers one by one, which lets the first thread finish alone).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void ArriveAndWait() {
    // acq_rel/acquire: work before the barrier happens-before work after it.
    const int gen = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    while (gen_.load(std::memory_order_acquire) == gen) std::this_thread::yield();
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<int> gen_{0};
};

TEST(ChunkIndexStressTest, ConcurrentSameKeyInsertsHaveExactlyOneWinner) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 300;
  constexpr int kKeysPerRound = 16;  // threads walk the same keys in lockstep
  auto idx = MakeIndex(kRounds / 2 * kKeysPerRound + 16);  // odd rounds' keys stay
  SpinBarrier sync(kThreads);
  std::vector<std::atomic<int>> wins(kRounds * kKeysPerRound);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&] {
      std::vector<uint64_t> mine;
      for (int r = 0; r < kRounds; ++r) {
        sync.ArriveAndWait();
        mine.clear();
        for (int i = 0; i < kKeysPerRound; ++i) {
          const uint64_t k = static_cast<uint64_t>(r) * kKeysPerRound + i;
          Status s = idx->Insert(Key(k), Fp(k), 1, 1);
          if (s.ok()) {
            wins[k].fetch_add(1, std::memory_order_relaxed);
            mine.push_back(k);
          } else {
            EXPECT_EQ(s.code(), StatusCode::kAlreadyExists) << s.ToString();
          }
        }
        sync.ArriveAndWait();
        // Even rounds leave tombstones behind for the next rounds to race over.
        if (r % 2 == 0) {
          for (uint64_t k : mine) EXPECT_TRUE(idx->Remove(Key(k)).ok());
        }
      }
    });
  }
  for (auto& th : ts) th.join();
  for (size_t k = 0; k < wins.size(); ++k) ASSERT_EQ(wins[k].load(), 1) << "key " << k;
  EXPECT_EQ(idx->size(), static_cast<size_t>(kRounds / 2 * kKeysPerRound));
  size_t n = 0;
  idx->ForEach([&](const IndexEntry&) { ++n; });
  EXPECT_EQ(n, idx->size());
}

TEST(ChunkIndexStressTest, RandomOperationsKeepInvariants) {
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 30000;
  constexpr uint64_t kKeys = 48;
  auto idx = MakeIndex(40);  // fewer slots than keys: exhaustion happens too
  std::atomic<bool> failed{false};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(1234 + t);
      std::vector<int> my_pins(kKeys, 0);
      auto check = [&](bool ok, const char* what) {
        if (!ok) {
          ADD_FAILURE() << what;
          failed.store(true, std::memory_order_relaxed);
        }
      };
      for (int op = 0; op < kOpsPerThread && !failed.load(std::memory_order_relaxed); ++op) {
        const uint64_t k = rng() % kKeys;
        const ChunkKey key = Key(k);
        switch (rng() % 9) {
          case 0: {
            Status s = idx->Insert(key, Fp(k), static_cast<uint32_t>(k), static_cast<uint32_t>(k * 3));
            check(s.ok() || s.code() == StatusCode::kAlreadyExists ||
                      s.code() == StatusCode::kResourceExhausted,
                  "insert code");
            break;
          }
          case 1: {
            Status s = idx->Publish(key);
            check(s.ok() || s.code() == StatusCode::kNotFound ||
                      s.code() == StatusCode::kFailedPrecondition,
                  "publish code");
            break;
          }
          case 2:
          case 3: {
            if (idx->Pin(key).ok()) {
              ++my_pins[k];
              // While we hold a pin the entry can neither go nor be evicted.
              auto e = idx->Find(key);
              check(e && e->state == EntryState::kReady && e->pins >= 1, "pinned entry not ready");
              check(idx->BeginEvict(key).code() == StatusCode::kFailedPrecondition,
                    "pinned entry evictable");
              check(idx->Remove(key).code() == StatusCode::kFailedPrecondition,
                    "pinned entry removable");
            }
            break;
          }
          case 4: {
            if (my_pins[k] > 0) {
              check(idx->Unpin(key).ok(), "unpin of held pin failed");
              --my_pins[k];
            }
            break;
          }
          case 5: {
            Status s = idx->BeginEvict(key);
            if (s.ok()) check(idx->Pin(key).code() == StatusCode::kFailedPrecondition ||
                                  idx->Find(key)->state != EntryState::kEvicting,
                              "evicting entry pinnable");
            break;
          }
          case 6: {
            Status s = idx->Remove(key);
            check(my_pins[k] == 0 || !s.ok(), "removed while we hold a pin");
            break;
          }
          case 7: {
            auto e = idx->Find(key);
            if (e) {
              check(e->key == key && e->fingerprint == Fp(k) && e->num_tokens == k &&
                        e->size_bytes == k * 3,
                    "torn snapshot");
            }
            check(my_pins[k] == 0 || (e && e->state == EntryState::kReady), "held pin lost");
            (void)idx->UpdateTiers(key, 1u << (t % 4), 1u << ((t + 1) % 4));
            break;
          }
          case 8: {
            std::vector<ChunkKey> ks;
            std::vector<uint64_t> fs;
            for (uint64_t j = k; j < k + 4 && j < kKeys; ++j) {
              ks.push_back(Key(j));
              fs.push_back(Fp(j));
            }
            const size_t n = idx->LookupPrefix(ks, fs);
            check(n <= ks.size(), "prefix too long");
            if (my_pins[k] > 0) check(n >= 1, "pinned head not found by LookupPrefix");
            break;
          }
        }
      }
      for (uint64_t k = 0; k < kKeys; ++k) {
        while (my_pins[k]-- > 0) check(idx->Unpin(Key(k)).ok(), "final unpin");
      }
    });
  }
  for (auto& th : ts) th.join();
  ASSERT_FALSE(failed.load());
  std::set<ChunkKey> seen;
  size_t n = 0;
  idx->ForEach([&](const IndexEntry& e) {
    ++n;
    EXPECT_TRUE(seen.insert(e.key).second) << "duplicate live key " << e.key.ToHex();
    EXPECT_EQ(e.pins, 0u);
    EXPECT_EQ(e.fingerprint, Fp(e.key.hi));
  });
  EXPECT_EQ(n, idx->size());
  EXPECT_LE(n, idx->capacity());
  // Still fully usable: drain and refill to capacity.
  for (const ChunkKey& k : seen) ASSERT_TRUE(idx->Remove(k).ok());
  EXPECT_EQ(idx->size(), 0u);
  for (uint64_t i = 0; i < idx->capacity(); ++i) ASSERT_TRUE(idx->Insert(Key(1000 + i), 1, 1, 1).ok());
  EXPECT_EQ(idx->Insert(Key(5000), 1, 1, 1).code(), StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace kvtier
