#include "cc/tiers/disk/io_ring.h"

#include <cerrno>
#include <deque>
#include <string>

namespace kvtier::disk {

StatusOr<std::unique_ptr<IoRing>> IoRing::Create(uint32_t entries) {
  if (entries == 0) return InvalidArgument("io_uring queue depth must be > 0");
  std::unique_ptr<IoRing> r(new IoRing(entries));
  const int rc = io_uring_queue_init(entries, &r->ring_, 0);
  if (rc < 0) return ErrnoError("io_uring_queue_init", -rc);
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
  for (size_t i = 0; i < ops.size(); ++i) {
    ops[i].done = 0;
    ops[i].result = 0;
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
      if (!Prep(ops[i], i)) break;
      todo.pop_front();
      ++queued;
      if (prepare) break;  // submit now; the next prepare overlaps this I/O
    }
    if (queued > 0) {
      int rc;
      do {
        rc = io_uring_submit(&ring_);
      } while (rc == -EINTR);
      if (rc < 0) {
        // Submission itself failed: nothing queued reached the kernel. Fail
        // every op not yet finished rather than spin.
        // Tearing the ring down cancels and waits for what is in flight, so
        // no buffer is touched by the kernel after this.
        io_uring_queue_exit(&ring_);
        const int init = io_uring_queue_init(entries_, &ring_, 0);
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
      op.done += static_cast<uint64_t>(res);
      if (op.done < op.Length()) {
        todo.push_back(idx);
        continue;
      }
    }
    if (done) done(idx);
  }
}

}  // namespace kvtier::disk
