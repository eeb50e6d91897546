// IoFaults: the disk tier's fault-injection seam (tests only).
//
// Every I/O the disk tier issues asks the IoFaults it was opened with (if any)
// what to do first: segment reads and writes through io_uring, io_uring
// submits and ring set-up, header pwrites, fallocate, fdatasync, start-up
// preads, and opening the directory's files. A test can so make the tier meet
// EIO, ENOSPC in the middle of a batch, short transfers, a failing
// io_uring_submit or fdatasync, or a read-only directory without privileges
// or a real broken disk, can see where syncs are issued, and can drop or
// tear writes to simulate what a power cut loses (see
// disk_tier_io_fault_test.cc). In production no IoFaults is set, and the
// cost is one pointer test per I/O.
//
// Contract
// - Before() may be called from any thread, concurrently; it must not call
//   back into the tier.
// - Before() is asked once per I/O: an io_uring op once per Run (not per
//   resubmission of its remainder), a synchronous pwrite/pread once per call.
// - The tier cannot tell an injected fault from a real one; that is the point.
#pragma once

#include <cstdint>

namespace kvtier::disk {

inline constexpr uint32_t kNoSegment = UINT32_MAX;

enum class IoKind : uint8_t {
  kRead,       // segment read (Get through io_uring, start-up pread)
  kWrite,      // segment write (Put through io_uring, header pwrite)
  kSubmit,     // io_uring_submit of a batch (length = SQEs)
  kRingInit,   // io_uring_queue_init (a new ring, or its rebuild after a failed submit)
  kFallocate,  // preallocating a new segment file
  kOpen,       // open() of a segment file, or of LOCK (segment = kNoSegment)
  kSync,       // fdatasync of a segment file (DiskTierOptions::sync; length 0).
               // kFail fails it with `error`; kDrop skips it and reports
               // success (a device that ignores cache flushes)
};

struct IoRequest {
  IoKind kind = IoKind::kRead;
  uint32_t segment = kNoSegment;
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct IoFault {
  enum class Action : uint8_t {
    kRun,    // do the I/O
    kFail,   // do not do it; it fails with `error` (an errno)
    kShort,  // kRead/kWrite: do it, but its first transfer reports only `bytes`
             // (the caller must then finish the rest itself)
    kDrop,   // kWrite: report success and write nothing (a write lost in a cache)
    kTear,   // kWrite: write only the first `bytes` (a multiple of 4096) and
             // report success (a write torn by a power cut)
  };
  Action action = Action::kRun;
  int error = 0;
  uint64_t bytes = 0;

  static IoFault Run() { return {}; }
  static IoFault Fail(int err) { return {Action::kFail, err, 0}; }
  static IoFault Short(uint64_t n) { return {Action::kShort, 0, n}; }
  static IoFault Drop() { return {Action::kDrop, 0, 0}; }
  static IoFault Tear(uint64_t n) { return {Action::kTear, 0, n}; }
};

class IoFaults {
 public:
  virtual ~IoFaults() = default;
  virtual IoFault Before(const IoRequest& io) = 0;
};

}  // namespace kvtier::disk
