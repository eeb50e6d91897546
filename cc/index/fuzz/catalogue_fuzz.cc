// Fuzz target: a shared-memory catalogue (ChunkIndex region) opened
// read-only over hostile bytes, directly (ChunkIndex::OpenReadOnly) and
// through the scheduler's CatalogueView.
//
// Input (see FUZZING.md; seeds from tools/fuzz_seeds.py):
//   byte 0      control: bits 0-1 capacity (8, 16, 40, 40 -> 16, 32, 64,
//               64 slots), bit 2 patches may touch the 64-byte header,
//               bit 3 truncate the object to the last patch's offset,
//               bit 4 publish the inserted entries (else they stay Writing)
//   byte 1      how many chunks of the tokens to insert (mod 7)
//   bytes 2-25  24 token ids (6 chunks of 4 tokens)
//   then        patches: (offset u16 LE, length u8, bytes) overwriting the
//               region
// A real owner (CreateShared) builds the region from the tokens first, so
// that patches start from a sound catalogue whose keys the view can find;
// the patched bytes then go into a fresh 0600 shm object, as a hostile
// process of our uid could leave them.
//
// Checks, beyond "no sanitizer report": OpenReadOnly either succeeds or says
// kFailedPrecondition; every entry ForEach shows has a public live state,
// tier bits below kMaxTierBits and pins <= kMaxPins; LookupPrefix never
// exceeds its input; the view's Lookup equals what LookupPrefix over the
// same mapping answers; without patches, the view finds exactly the
// published prefix.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cc/engine/catalogue_view.h"
#include "cc/fuzz/fuzz_check.h"
#include "cc/hash/chunk_hash.h"
#include "cc/index/chunk_index.h"

namespace kvtier {
namespace {

constexpr uint32_t kChunkTokens = 4;
constexpr size_t kTokens = 24;
constexpr size_t kHeaderBytes = 64;

std::string ShmName(const char* what) { return "/kvtier-fuzz-" + std::to_string(getpid()) + "-" + what; }

HashNamespace Ns() {
  HashNamespace ns;
  ns.model = "fuzz";
  ns.dtype = "float16";
  ns.layout = "fuzz-layout";
  return ns;
}

std::vector<uint8_t> ReadShm(const std::string& name) {
  const int fd = shm_open(name.c_str(), O_RDONLY, 0);
  FUZZ_CHECK(fd >= 0, "shm_open %s", name.c_str());
  struct stat st;
  FUZZ_CHECK(fstat(fd, &st) == 0, "fstat");
  std::vector<uint8_t> out(static_cast<size_t>(st.st_size));
  FUZZ_CHECK(pread(fd, out.data(), out.size(), 0) == static_cast<ssize_t>(out.size()), "pread");
  close(fd);
  return out;
}

void WriteShm(const std::string& name, const std::vector<uint8_t>& bytes) {
  shm_unlink(name.c_str());
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  FUZZ_CHECK(fd >= 0, "shm_open %s", name.c_str());
  FUZZ_CHECK(fchmod(fd, 0600) == 0, "fchmod");  // whatever the umask
  FUZZ_CHECK(ftruncate(fd, static_cast<off_t>(bytes.size())) == 0, "ftruncate");
  FUZZ_CHECK(pwrite(fd, bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()), "pwrite");
  close(fd);
}

}  // namespace
}  // namespace kvtier

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvtier;
  if (size < 2 + kTokens) return 0;
  const uint8_t control = data[0];
  const size_t capacity = std::array<size_t, 4>{8, 16, 40, 40}[control & 3];
  const size_t inserted = data[1] % 7;
  std::vector<int32_t> tokens(kTokens);
  for (size_t i = 0; i < kTokens; ++i) tokens[i] = data[2 + i];

  auto hasher = ChunkHasher::Create(Ns(), kChunkTokens, PartialChunkPolicy::kKeep);
  FUZZ_CHECK(hasher.ok(), "ChunkHasher::Create");
  std::vector<ChunkHash> chunks;
  hasher->Hash(tokens, &chunks);
  FUZZ_CHECK(chunks.size() == kTokens / kChunkTokens, "chunks");

  // A sound region, as the owning engine would publish it.
  const std::string owner_name = ShmName("owner"), view_name = ShmName("view");
  std::vector<uint8_t> region;
  {
    auto owner = ChunkIndex::CreateShared(owner_name, capacity);
    FUZZ_CHECK(owner.ok(), "CreateShared: %s", owner.status().ToString().c_str());
    for (size_t i = 0; i < inserted; ++i) {
      // Equal token chunks give equal keys: a second insert is kAlreadyExists.
      if ((*owner)->Insert(chunks[i].key, chunks[i].fingerprint, kChunkTokens, 1000).ok() && (control & 0x10)) {
        (void)(*owner)->Publish(chunks[i].key);
        (void)(*owner)->UpdateTiers(chunks[i].key, 1u << (i % 3), 0);
      }
    }
    region = ReadShm(owner_name);
  }

  // Hostile edits.
  size_t pos = 2 + kTokens, patches = 0, last_offset = region.size();
  while (pos + 3 <= size) {
    const size_t offset = (data[pos] | size_t{data[pos + 1]} << 8) % region.size();
    const size_t len = std::min<size_t>(data[pos + 2], size - pos - 3);
    pos += 3;
    if (offset >= kHeaderBytes || (control & 0x04)) {
      const size_t n = std::min(len, region.size() - offset);
      std::memcpy(region.data() + offset, data + pos, n);
      ++patches;
    }
    last_offset = offset;
    pos += len;
  }
  if (control & 0x08) region.resize(last_offset);
  WriteShm(view_name, region);

  size_t direct = 0;
  auto index = ChunkIndex::OpenReadOnly(view_name);
  if (!index.ok()) {
    FUZZ_CHECK(index.status().code() == StatusCode::kFailedPrecondition, "OpenReadOnly over hostile bytes: %s",
               index.status().ToString().c_str());
  } else {
    const ChunkIndex& ix = **index;
    (void)ix.capacity();
    (void)ix.size();
    std::vector<ChunkKey> seen;
    ix.ForEach([&](const IndexEntry& e) {
      FUZZ_CHECK(e.state == EntryState::kWriting || e.state == EntryState::kReady ||
                     e.state == EntryState::kEvicting,
                 "ForEach shows state %d", static_cast<int>(e.state));
      FUZZ_CHECK(e.tier_mask < (1u << ChunkIndex::kMaxTierBits) && e.pins <= ChunkIndex::kMaxPins,
                 "tier mask %u, pins %u", e.tier_mask, e.pins);
      seen.push_back(e.key);
    });
    for (const ChunkKey& k : seen) (void)ix.Find(k);
    std::vector<ChunkKey> keys;
    std::vector<uint64_t> fps;
    for (const ChunkHash& c : chunks) {
      keys.push_back(c.key);
      fps.push_back(c.fingerprint);
      (void)ix.Find(c.key);
    }
    FUZZ_CHECK(ix.LookupPrefix(keys) <= keys.size(), "LookupPrefix without fingerprints");
    direct = ix.LookupPrefix(keys, fps);
    FUZZ_CHECK(direct <= keys.size(), "LookupPrefix");
    FUZZ_CHECK(ix.LookupPrefix(seen) <= seen.size(), "LookupPrefix of the listed keys");
  }

  // The scheduler's view over the same object: the same answer, in tokens.
  CatalogueViewOptions vo;
  vo.ranks.push_back(RankCatalogue{view_name, Ns()});
  vo.chunk_tokens = kChunkTokens;
  vo.recheck_ms = 0;
  auto view = CatalogueView::Create(vo);
  FUZZ_CHECK(view.ok(), "CatalogueView::Create: %s", view.status().ToString().c_str());
  const size_t got = (*view)->Lookup(tokens);
  FUZZ_CHECK(got == direct * kChunkTokens, "the view says %zu tokens, LookupPrefix %zu chunks", got, direct);
  if (patches == 0 && !(control & 0x08)) {
    size_t want = 0;
    if (control & 0x10) {
      // The published prefix: chunks whose key first appears within the
      // inserted ones (a repeated chunk is the same entry).
      for (size_t i = 0; i < chunks.size(); ++i) {
        bool present = false;
        for (size_t j = 0; j < inserted; ++j) present |= chunks[j].key == chunks[i].key;
        if (!present) break;
        want = i + 1;
      }
    }
    FUZZ_CHECK(got == want * kChunkTokens, "unpatched catalogue: the view finds %zu tokens, expected %zu", got,
               want * kChunkTokens);
  }
  shm_unlink(view_name.c_str());
  return 0;
}
