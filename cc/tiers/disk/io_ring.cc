#include "cc/tiers/disk/io_ring.h"

#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <string>

namespace kvtier::disk {

int IoRing::QueueInit() {
  if (faults_ != nullptr) {
    const IoFault f = faults_->Before(IoRequest{IoKind::kRingInit, kNoSegment, 0, entries_});
    if (f.action == IoFault::Action::kFail) return -f.error;
  }
  return io_uring_queue_init(entries_, &ring_, 0);
}

StatusOr<std::unique_ptr<IoRing>> IoRing::Create(uint32_t entries, IoFaults* faults) {
  if (entries == 0) return InvalidArgument("io_uring queue depth must be > 0");
  std::unique_ptr<IoRing> r(new IoRing(entries, faults));
  const int rc = r->QueueInit();
  if (rc < 0) {
    r->broken_ = ErrnoError("io_uring_queue_init", -rc);  // nothing to tear down
    return r->broken_;
  }
  // The kernel may round the SQ up; never queue more than we asked for so
  // the caller's queue_depth really bounds device concurrency.
  return r;
}

IoRing::~IoRing() {
  if (broken_.ok()) io_uring_queue_exit(&ring_);
}

Status IoRing::RegisterRegion(std::span<std::byte> region) {
  if (!broken_.ok()) return broken_;
  if (!fixed_.empty()) {
    io_uring_unregister_buffers(&ring_);
    fixed_.clear();
    region_ = {};
  }
  constexpr size_t kMaxPiece = size_t{1} << 30;
  for (size_t off = 0; off < region.size(); off += kMaxPiece) {
    fixed_.push_back(iovec{region.data() + off, std::min(kMaxPiece, region.size() - off)});
  }
  const int rc = io_uring_register_buffers(&ring_, fixed_.data(), static_cast<unsigned>(fixed_.size()));
  if (rc < 0) {
    fixed_.clear();
    return ErrnoError("io_uring_register_buffers", -rc);
  }
  region_ = region;
  return Status::Ok();
}

int IoRing::FixedIndexFor(const void* p, size_t len) const {
  const auto* b = static_cast<const std::byte*>(p);
  for (size_t i = 0; i < fixed_.size(); ++i) {
    const auto* base = static_cast<const std::byte*>(fixed_[i].iov_base);
    if (b >= base && b + len <= base + fixed_[i].iov_len) return static_cast<int>(i);
  }
  return -1;
}

bool IoRing::Prep(IoOp& op, uint64_t user_data) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) return false;
  // Skip the iovecs (or the part of one) already transferred.
  iovec rest[3];
  int n = 0;
  uint64_t skip = op.done;
  for (int i = 0; i < op.niov; ++i) {
    if (skip >= op.iov[i].iov_len) {
      skip -= op.iov[i].iov_len;
      continue;
    }
    rest[n].iov_base = static_cast<std::byte*>(op.iov[i].iov_base) + skip;
    rest[n].iov_len = op.iov[i].iov_len - skip;
    skip = 0;
    ++n;
  }
  const uint64_t off = op.offset + op.done;
  const bool write = op.kind == IoOp::Kind::kWrite;
  if (op.fixed_index >= 0 || n == 1) {
    if (op.fixed_index >= 0) {
      if (write) {
        io_uring_prep_write_fixed(sqe, op.fd, rest[0].iov_base, static_cast<unsigned>(rest[0].iov_len), off,
                                  op.fixed_index);
      } else {
        io_uring_prep_read_fixed(sqe, op.fd, rest[0].iov_base, static_cast<unsigned>(rest[0].iov_len), off,
                                 op.fixed_index);
      }
    } else if (write) {
      io_uring_prep_write(sqe, op.fd, rest[0].iov_base, static_cast<unsigned>(rest[0].iov_len), off);
    } else {
      io_uring_prep_read(sqe, op.fd, rest[0].iov_base, static_cast<unsigned>(rest[0].iov_len), off);
    }
  } else {
    for (int i = 0; i < n; ++i) op.submit_iov[i] = rest[i];
    if (write) {
      io_uring_prep_writev(sqe, op.fd, op.submit_iov, n, off);
    } else {
      io_uring_prep_readv(sqe, op.fd, op.submit_iov, n, off);
    }
  }
  io_uring_sqe_set_data64(sqe, user_data);
  return true;
}

bool IoRing::Inject(IoOp& op) {
  const bool write = op.kind == IoOp::Kind::kWrite;
  const IoFault f = faults_->Before(IoRequest{write ? IoKind::kWrite : IoKind::kRead, op.segment, op.offset, op.Length()});
  switch (f.action) {
    case IoFault::Action::kRun:
      return false;
    case IoFault::Action::kFail:
      op.result = -f.error;
      return true;
    case IoFault::Action::kShort:
      if (f.bytes > 0 && f.bytes < op.Length()) op.short_to = f.bytes;
      return false;
    case IoFault::Action::kDrop:
      if (!write) return false;
      op.done = op.Length();
      return true;
    case IoFault::Action::kTear: {
      if (!write) return false;
      // The first f.bytes of the op, written synchronously: the iovec
      // boundaries of the disk tier's ops are 4096 multiples, so a 4096
      // multiple prefix keeps O_DIRECT alignment.
      iovec part[3];
      int n = 0;
      uint64_t left = f.bytes;
      for (int i = 0; i < op.niov && left > 0; ++i, ++n) {
        part[n] = op.iov[i];
        part[n].iov_len = std::min<uint64_t>(left, op.iov[i].iov_len);
        left -= part[n].iov_len;
      }
      if (n > 0 && pwritev(op.fd, part, n, static_cast<off_t>(op.offset)) < 0) {
        op.result = -errno;
        return true;
      }
      op.done = op.Length();
      return true;
    }
  }
  return false;
}

void IoRing::Run(std::span<IoOp> ops, const OpCallback& prepare, const OpCallback& done) {
  if (!broken_.ok()) {
    for (size_t i = 0; i < ops.size(); ++i) {
      ops[i].done = 0;
      ops[i].result = -EBADFD;
      if (done) done(i);
    }
    return;
  }
  std::deque<size_t> todo;
  std::vector<bool> prepared(prepare ? ops.size() : 0, false);
  std::vector<bool> injected(faults_ != nullptr ? ops.size() : 0, false);
  for (size_t i = 0; i < ops.size(); ++i) {
    ops[i].done = 0;
    ops[i].result = 0;
    ops[i].short_to = 0;
    if (ops[i].Length() > 0) {
      todo.push_back(i);
    } else if (done) {
      done(i);
    }
  }
  uint32_t inflight = 0;
  while (!todo.empty() || inflight > 0) {
    uint32_t queued = 0;
    while (!todo.empty() && inflight + queued < entries_) {
      const size_t i = todo.front();
      if (prepare && !prepared[i]) {
        prepared[i] = true;
        prepare(i);
      }
      if (faults_ != nullptr && !injected[i]) {
        injected[i] = true;  // after prepare: a torn write tears the prepared bytes
        if (Inject(ops[i])) {
          todo.pop_front();
          if (done) done(i);
          continue;
        }
      }
      if (!Prep(ops[i], i)) break;
      todo.pop_front();
      ++queued;
      if (prepare) break;  // submit now; the next prepare overlaps this I/O
    }
    if (queued > 0) {
      int rc = 0;
      IoFault f;
      if (faults_ != nullptr) f = faults_->Before(IoRequest{IoKind::kSubmit, kNoSegment, 0, queued});
      if (f.action == IoFault::Action::kFail) {
        rc = -f.error;  // the SQEs never reach the kernel
      } else {
        do {
          rc = io_uring_submit(&ring_);
        } while (rc == -EINTR);
      }
      if (rc < 0) {
        // Submission itself failed: nothing queued reached the kernel. Fail
        // every op not yet finished rather than spin.
        // Tearing the ring down cancels and waits for what is in flight, so
        // no buffer is touched by the kernel after this.
        io_uring_queue_exit(&ring_);
        const int init = QueueInit();
        if (init < 0) {
          // ring_ now points at unmapped rings: never touch it again.
          broken_ = ErrnoError("io_uring_queue_init (rebuilding the ring after io_uring_submit failed with errno " +
                                   std::to_string(-rc) + ")",
                               -init);
          fixed_.clear();
          region_ = {};
        } else if (!fixed_.empty() &&
                   io_uring_register_buffers(&ring_, fixed_.data(), static_cast<unsigned>(fixed_.size())) < 0) {
          // Only the fixed-buffer fast path is lost: FixedIndexFor says -1 from now on.
          fixed_.clear();
          region_ = {};
        }
        for (size_t i = 0; i < ops.size(); ++i) {
          if (ops[i].result == 0 && ops[i].done < ops[i].Length()) {
            ops[i].result = rc;
            if (done) done(i);
          }
        }
        return;
      }
      inflight += queued;
    }
    if (inflight == 0) continue;  // every op taken was finished by an injected fault
    // While ops remain to be prepared, only reap what has already finished;
    // block only when nothing more can be queued.
    const bool more_to_queue = prepare && !todo.empty() && inflight < entries_;
    io_uring_cqe* cqe = nullptr;
    const int rc = more_to_queue ? io_uring_peek_cqe(&ring_, &cqe) : io_uring_wait_cqe(&ring_, &cqe);
    if (rc < 0 || cqe == nullptr) continue;  // nothing yet (EAGAIN) or interrupted (EINTR)
    const size_t idx = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
    const int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    --inflight;
    IoOp& op = ops[idx];
    if (res == -EAGAIN || res == -EINTR) {
      todo.push_back(idx);
      continue;
    }
    if (res < 0) {
      op.result = res;
    } else if (res == 0) {
      op.result = op.kind == IoOp::Kind::kRead ? -ENODATA : -EIO;
    } else {
      uint64_t got = static_cast<uint64_t>(res);
      if (op.short_to > 0) {
        got = std::min(got, op.short_to);  // injected: the rest is redone
        op.short_to = 0;
      }
      op.done += got;
      if (op.done < op.Length()) {
        todo.push_back(idx);
        continue;
      }
    }
    if (done) done(idx);
  }
}

}  // namespace kvtier::disk
