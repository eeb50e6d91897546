// IoRing: an RAII io_uring (liburing) that runs a batch of file reads and
// writes to completion. The disk tier keeps a pool of these, one per calling
// thread at a time, so a ring is never shared between threads.
//
// Contract
// - Run(ops) submits every op (as many per io_uring_submit as the SQ holds),
//   reaps completions, and resubmits the remainder of short transfers and
//   EAGAIN/EINTR completions, returning only when every op has finished. It
//   makes no syscalls beyond io_uring_enter; blocking, not polling.
// - Per-op outcome in IoOp::result: 0, or -errno of the first failure (ENOSPC
//   included; the caller maps it). A read that hits end of file fails with
//   -ENODATA rather than looping.
// - Buffers: each iovec must satisfy O_DIRECT alignment (the caller's job). An
//   op with fixed_index >= 0 has one iovec inside that registered buffer and
//   is issued with IORING_OP_{READ,WRITE}_FIXED (no per-I/O page pinning).
// - A failed io_uring_submit fails every unfinished op of that Run with its
//   -errno and rebuilds the ring (teardown waits out what was in flight). If
//   the rebuild itself fails, the ring is broken for good: status() says why
//   and every later Run fails each op with -EBADFD without a syscall. Owners
//   check status() after Run and drop a broken ring.
// - Not thread-safe: one thread uses a ring at a time.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "cc/common/status.h"
#include "cc/tiers/disk/io_faults.h"

namespace kvtier::disk {

struct IoOp {
  enum class Kind : uint8_t { kRead, kWrite };
  Kind kind = Kind::kRead;
  int fd = -1;
  uint64_t offset = 0;
  iovec iov[3] = {};
  int niov = 0;
  int fixed_index = -1;  // registered buffer index, or -1
  int result = 0;        // out: 0 or -errno
  uint32_t segment = kNoSegment;  // whose file: for IoFaults only

  // Progress and the iovecs of the current submission, owned by IoRing::Run
  // (readv/writev read their iovec array during io_uring_submit, so it must
  // live in the op, not on Prep's stack).
  uint64_t done = 0;
  uint64_t short_to = 0;  // IoFault::kShort: report at most this much of the next completion
  iovec submit_iov[3] = {};
  uint64_t Length() const {
    uint64_t n = 0;
    for (int i = 0; i < niov; ++i) n += iov[i].iov_len;
    return n;
  }
};

class IoRing {
 public:
  // kInvalidArgument for 0 entries; otherwise io_uring_queue_init's error
  // (e.g. EPERM when a seccomp profile or kernel.io_uring_disabled forbids
  // io_uring, EINVAL for a depth the kernel refuses) as kIoError.
  // `faults` (tests only; may be null) is asked before each op, submit and
  // ring set-up (io_faults.h) and must outlive the ring.
  static StatusOr<std::unique_ptr<IoRing>> Create(uint32_t entries, IoFaults* faults = nullptr);
  ~IoRing();
  IoRing(const IoRing&) = delete;
  IoRing& operator=(const IoRing&) = delete;

  // prepare(i), if given, runs just before op i is first queued, and each op
  // is then submitted at once, so the caller's CPU work for op i+1 (e.g. a
  // checksum) overlaps op i's I/O. done(i), if given, runs as soon as op i
  // has finished (result set), while later ops are still in flight.
  using OpCallback = std::function<void(size_t)>;
  void Run(std::span<IoOp> ops, const OpCallback& prepare = nullptr, const OpCallback& done = nullptr);

  // Registers [region) as fixed buffers (split in pieces of at most 1 GiB,
  // the kernel's per-buffer limit), replacing any earlier registration.
  Status RegisterRegion(std::span<std::byte> region);
  // Index of the registered buffer that holds [p, p+len), or -1.
  int FixedIndexFor(const void* p, size_t len) const;
  const std::byte* region_base() const { return region_.data(); }

  // OK, or why the ring is broken (see the contract).
  const Status& status() const { return broken_; }

 private:
  IoRing(uint32_t entries, IoFaults* faults) : entries_(entries), faults_(faults) {}
  bool Prep(IoOp& op, uint64_t user_data);
  // Applies an injected fault to op before its first submission; true if
  // that finished the op (it must not be queued).
  bool Inject(IoOp& op);
  int QueueInit();

  io_uring ring_{};
  uint32_t entries_;
  IoFaults* faults_;
  std::span<std::byte> region_;
  std::vector<iovec> fixed_;
  Status broken_;  // non-OK once a rebuild failed: ring_ is then torn down
};

}  // namespace kvtier::disk
