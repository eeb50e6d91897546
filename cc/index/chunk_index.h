// ChunkIndex: the lock-free catalogue  chunk key -> entry (state, pins, tier
// mask, sizes, fingerprint), in one position-independent memory region that a
// second process (the vLLM scheduler) can map read-only and query.
//
// Design
// ======
//
// Region. One contiguous mapping: a 64-byte RegionHeader followed by
// num_slots 64-byte Slots. Nothing in it is a pointer, so every process may
// map it at any address. Memory comes from an anonymous mapping (Create) or
// a POSIX shared-memory object (CreateShared / OpenReadOnly). The header
// carries a magic, a format version, the slot size, the capacity and the slot
// count; OpenReadOnly refuses a region whose header does not match this build.
// Every field inside the region is a std::atomic of an always-lock-free type:
// plain loads then work on a PROT_READ mapping (no lock, no CAS needed to
// read), and concurrent access is race-free by the language's rules, so
// TSAN reports nothing.
//
// Table. Fixed-capacity open addressing. num_slots is the smallest power of
// two >= capacity / kMaxLoadFactor (0.75); at most `capacity` entries are
// live or being inserted at once (an insert reserves its place in a counter
// first, so the table's load never passes 0.75). A key's home slot is a
// Fibonacci hash of its 128 bits; probing is triangular (home + i*(i+1)/2),
// which visits every slot of a power-of-two table exactly once and breaks the
// primary clustering of linear probing. Probing is bounded: an operation
// looks at no more than max_probe = min(num_slots, kMaxProbe) slots, so a
// miss costs at most kMaxProbe cache lines even in a table full of
// tombstones. An insert that finds no free slot within its window returns
// kResourceExhausted (at load <= 0.75 and a 64-slot window this is
// vanishingly rare; it is a status, never a crash or an unbounded loop).
//
// Slot. One cache line. Its 64-bit control word holds everything that changes
// after an insert:
//     bits  0..2   state   (Empty, Writing, Ready, Evicting, Tombstone are the
//                           public EntryState values; Claimed and Candidate
//                           are insert-internal)
//     bits  3..10  tier mask (kMaxTierBits = 8 tiers)
//     bits 11..31  pin count (up to kMaxPins)
//     bits 32..63  version: bumped each time the slot is claimed for a new key
// The key, fingerprint and sizes are written once, while the slot is Claimed
// (owned by one inserter), and never change until the slot is claimed again,
// which bumps the version. Because state, pins and tier mask share one word,
// every transition (Publish, Pin, Unpin, BeginEvict, UpdateTiers, Remove) is a
// single CAS, so "a pinned entry can never enter Evicting" and "an Evicting
// entry can never be pinned" hold by construction, and a reader's snapshot of
// them is exactly consistent.
//
// Slot life cycle. Empty -> Claimed -> Candidate -> Writing -> Ready ->
// Evicting -> Tombstone -> Claimed -> ... A slot never returns to Empty, so
// an Empty slot ends every probe (the key cannot be further on). Tombstones
// are reused by later inserts; the version tells readers the slot was
// recycled under them.
//
// Readers (Find, LookupPrefix, ForEach) use a seqlock-style validation per
// slot: load control (acquire), read the key and fields (relaxed atomics),
// acquire fence, load control again; if the version is unchanged the fields
// belong to the incarnation described by the second control word. A slot that
// changed version is skipped: the key was absent at some instant of the read,
// which is a linearizable miss. Readers never write, never retry a slot and
// never wait.
//
// Insert is key-as-lock: CAS the first free (Empty or Tombstone) slot of the
// window to Claimed with version+1, fill key/fingerprint/sizes, publish the
// slot as Candidate (seq_cst), then scan the window (up to the first Empty)
// for another Candidate or live entry of the same key:
//   - a live entry (Writing/Ready/Evicting) -> we lose;
//   - a Candidate nearer the home slot      -> we lose;
//   - a Candidate further from home         -> we CAS it to Tombstone.
// If we did not lose, CAS our own Candidate -> Writing; that CAS fails only
// if a nearer Candidate tombstoned us. Losers tombstone their own slot and
// return kAlreadyExists. Why exactly one of several racing inserts of a key
// wins: publish-then-scan with seq_cst on both sides is Dekker's pattern, so of
// two racing Candidates at least one sees the other; a later Candidate's scan
// always reaches an earlier one's slot (every slot before a claimed slot was
// non-free when it was claimed, so no Empty can appear before it); and the
// Candidate nearest home can only lose to an entry that is already live.
//
// Progress. Readers are wait-free: at most max_probe slots, each read a
// bounded number of times. Writers are lock-free: a CAS fails only because
// another operation changed the same control word (and so made progress);
// no operation waits for another thread, a Claimed slot is simply skipped.
//
// Memory ordering (named helpers in chunk_index.cc, pairing noted at each
// call site):
//   - LoadControlAcquire pairs with PublishControlRelease /
//     CasControl (release half): whoever sees a state sees the key and
//     fields written before it was published.
//   - After claiming a slot and before rewriting its key, the inserter issues
//     FenceBeforeFieldWrites (release fence); a reader's
//     FenceAfterFieldReads (acquire fence) then guarantees that a reader who
//     read a new key also sees the new version and discards what it read.
//   - The Candidate publish and the duplicate scan are seq_cst (Dekker).
//   - Counters (size, reservations) are relaxed: they count, they guard no
//     memory.
//
// Reclamation. None is needed: no memory is ever freed while the index
// exists. Slots are recycled through versions (a 32-bit version wraps only
// after 2^32 reuses of one slot while a reader sits between its two control
// loads, which we accept).
//
// Cross-process. The owner (CreateShared) unlinks the shm name on
// destruction; mappings already open stay valid. A read-only opener maps the
// region PROT_READ, so a stray write faults instead of corrupting the index.
// The region is in host byte order and layout (same machine only).
//
// Crashes and trust. The owner holds flock(LOCK_EX) on the object for its
// lifetime (flock works on a /dev/shm fd; the kernel drops it when the
// process dies, however it dies). A killed owner leaves its name behind;
// the next CreateShared finds the lock free, unlinks the stale name and
// creates a fresh object, while a live owner's name is refused with its pid
// (recorded in the header), and another uid's object is refused, never
// removed. Only the holder of an object's lock unlinks its
// name, and it checks that the name still refers to that object first, so
// two processes reclaiming the same stale name cannot remove each other's
// fresh object. OpenReadOnly trusts only an object of our own uid with mode
// 0600, reads the header with pread, and maps exactly the size the header
// describes after checking that the object is that large; the owner sizes
// the object once, before publishing the magic, and never shrinks it.
// Remaining hazards: (1) another process of the same uid that truncates the
// object after a reader mapped it makes that reader's next access SIGBUS
// (nothing short of copying the region avoids that; same-uid processes are
// trusted anyway); (2) the lock belongs to the open file description, so a
// child the owner forks without exec (the fd is close-on-exec) keeps the
// name "live" until it exits too.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "cc/common/chunk_key.h"
#include "cc/common/status.h"

namespace kvtier {

enum class EntryState : uint8_t { kEmpty = 0, kWriting, kReady, kEvicting, kTombstone };

// A consistent snapshot of one entry.
struct IndexEntry {
  ChunkKey key;
  uint64_t fingerprint;
  uint32_t num_tokens;
  uint32_t size_bytes;
  uint32_t tier_mask;
  uint32_t pins;
  EntryState state;
};

namespace index_internal {
struct RegionHeader;
struct Slot;
}  // namespace index_internal

class ChunkIndex {
 public:
  static constexpr double kMaxLoadFactor = 0.75;
  static constexpr size_t kMaxProbe = 64;
  static constexpr size_t kMaxCapacity = size_t{1} << 30;
  static constexpr uint32_t kMaxTierBits = 8;  // tier_mask bits that exist
  static constexpr uint32_t kMaxPins = (1u << 21) - 1;

  // kInvalidArgument for capacity 0 or > kMaxCapacity; kIoError if the
  // mapping fails.
  static StatusOr<std::unique_ptr<ChunkIndex>> Create(size_t capacity);
  // POSIX shm object `shm_name` ("/name", no other '/'), mode 0600, created
  // exclusively; this object owns it, holds flock(LOCK_EX) on it for its
  // whole life, and unlinks it on destruction. A name left behind by a dead
  // owner (nobody holds its lock) is reclaimed: unlinked and created anew.
  // kInvalidArgument for a bad name or capacity; kFailedPrecondition if a
  // live owner holds the name (the message names its pid) or it belongs to
  // another user; kUnavailable if other processes keep racing for the name;
  // kIoError.
  static StatusOr<std::unique_ptr<ChunkIndex>> CreateShared(const std::string& shm_name,
                                                            size_t capacity);
  // Maps an existing region PROT_READ (lookups only). kInvalidArgument for a
  // bad name, kNotFound if absent, kFailedPrecondition if the object is not
  // owned by this process's uid, has any group/other permission bit (must be
  // 0600), is smaller than its header describes (truncated), or is not a
  // ChunkIndex of this format (or not yet initialised); kIoError. The header
  // is read with pread and checked before anything is mapped.
  static StatusOr<std::unique_ptr<const ChunkIndex>> OpenReadOnly(const std::string& shm_name);
  // Unlinks every shm object of this uid whose name starts with
  // name_prefix ("/prefix") and whose owner is gone (its flock is free):
  // what processes killed before they could unlink left behind. Live
  // owners' objects, other users' objects and names that vanish meanwhile
  // are left alone. Returns how many were unlinked; kInvalidArgument for a
  // bad prefix, kIoError if /dev/shm cannot be listed.
  static StatusOr<size_t> ReclaimStale(const std::string& name_prefix);

  ~ChunkIndex();
  ChunkIndex(const ChunkIndex&) = delete;
  ChunkIndex& operator=(const ChunkIndex&) = delete;

  size_t capacity() const;
  // Live entries (Writing/Ready/Evicting). Exact when no insert or remove is
  // in flight; during one it may be ahead by the inserts in flight.
  size_t size() const;

  // New entry in kWriting, tier_mask 0, pins 0. kInvalidArgument for the
  // null key; kAlreadyExists if the key is live (or a concurrent insert of it
  // won); kResourceExhausted when `capacity` entries exist or the key's probe
  // window has no free slot.
  Status Insert(const ChunkKey& key, uint64_t fingerprint, uint32_t num_tokens,
                uint32_t size_bytes);
  // kWriting -> kReady. kNotFound; kFailedPrecondition from any other state.
  Status Publish(const ChunkKey& key);
  // Atomically mask = (mask | set) & ~clear; returns the new mask. Works in
  // any live state. kNotFound; kInvalidArgument if a mask has bits at or
  // above kMaxTierBits.
  StatusOr<uint32_t> UpdateTiers(const ChunkKey& key, uint32_t set_mask, uint32_t clear_mask);
  // Only kReady; pins nest. kNotFound, kFailedPrecondition (not kReady),
  // kResourceExhausted (kMaxPins reached).
  Status Pin(const ChunkKey& key);
  // kNotFound, kFailedPrecondition (pins == 0).
  Status Unpin(const ChunkKey& key);
  // kReady && pins == 0 -> kEvicting; else kFailedPrecondition. kNotFound.
  Status BeginEvict(const ChunkKey& key);
  // kWriting/kReady/kEvicting -> gone. kFailedPrecondition if pinned;
  // kNotFound.
  Status Remove(const ChunkKey& key);

  // Never blocks; nullopt if absent (or mid-insert).
  std::optional<IndexEntry> Find(const ChunkKey& key) const;
  // Number of leading keys present in kReady (and, when fingerprints is
  // non-empty, with an equal fingerprint). Stops at the first miss. With
  // fingerprints, only the first min(keys.size(), fingerprints.size()) keys
  // can count (a key without a fingerprint to check is a miss).
  size_t LookupPrefix(std::span<const ChunkKey> keys,
                      std::span<const uint64_t> fingerprints = {}) const;
  // Weakly consistent walk: every entry live for the whole walk is visited
  // once; each visited entry is a consistent snapshot; entries inserted or
  // removed during the walk may or may not be seen.
  void ForEach(const std::function<void(const IndexEntry&)>& fn) const;

 private:
  struct Located;
  ChunkIndex(void* base, size_t bytes, bool read_only, std::string shm_name, bool owner);
  static StatusOr<std::unique_ptr<ChunkIndex>> Init(void* base, size_t bytes, size_t capacity,
                                                    size_t num_slots, std::string shm_name,
                                                    bool owner);

  std::optional<Located> Locate(const ChunkKey& key) const;
  template <typename Transition>
  Status Transform(const ChunkKey& key, Transition&& t, uint64_t* new_control);
  bool ReadEntry(const index_internal::Slot& s, IndexEntry* e, uint64_t* control) const;

  void* base_;
  size_t bytes_;
  bool read_only_;
  std::string shm_name_;  // empty for anonymous memory
  bool owner_;            // unlink shm_name_ on destruction
  int lock_fd_ = -1;      // CreateShared: the object's fd, flock(LOCK_EX)ed while we live
  index_internal::RegionHeader* header_;
  index_internal::Slot* slots_;
  uint64_t mask_;          // num_slots - 1
  uint32_t shift_;         // 64 - log2(num_slots), for Fibonacci hashing
  size_t max_probe_;
  size_t capacity_;
};

}  // namespace kvtier
