#include "cc/tiers/disk/disk_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "cc/tiers/disk/crc32c.h"
#include "cc/tiers/disk/cufile_loader.h"
#include "cc/tiers/disk/disk_format.h"
#include "cc/tiers/disk/io_faults.h"
#include "cc/tiers/disk/io_ring.h"

namespace kvtier {

using disk::IoFault;
using disk::IoFaults;
using disk::IoKind;
using disk::IoOp;
using disk::IoRing;
using disk::kBlock;
using disk::RecordBytes;
using disk::RecordHeader;
using disk::SegmentHeader;

namespace {

constexpr uint64_t kAutoSegmentBytes = 64ull << 20;
constexpr uint64_t kMinAutoSegmentBytes = 64ull << 10;
constexpr uint64_t kMaxSegmentBytes = 1ull << 30;  // keeps every I/O under INT_MAX bytes
// Read-ahead of the start-up scan where it steps block by block; also each
// rebuild worker's whole buffer.
constexpr uint64_t kScanPiece = 1ull << 20;
// Auto segments grown for large chunks hold this many records of the largest
// chunk (a segment is the eviction unit: more per segment evicts more at once).
constexpr uint64_t kAutoRecordsPerSegment = 8;
constexpr uint64_t kMaxSegments = 100000;

void Log(const std::string& msg) { std::fprintf(stderr, "[kvtier disk] %s\n", msg.c_str()); }

// RAII 4096-aligned heap buffer that only grows (reused across calls).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  // False if the allocation failed (the old buffer is kept).
  bool Reserve(size_t n) {
    if (n <= size_) return true;
    n = disk::RoundUpToBlock(n);
    void* p = std::aligned_alloc(kBlock, n);
    if (p == nullptr) return false;
    std::free(p_);
    p_ = static_cast<std::byte*>(p);
    size_ = n;
    return true;
  }
  std::byte* data() const { return p_; }

 private:
  std::byte* p_ = nullptr;
  size_t size_ = 0;
};

bool IsAligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & (kBlock - 1)) == 0; }

// What the test's IoFaults (if any) makes of one synchronous I/O.
IoFault Ask(IoFaults* faults, IoKind kind, uint32_t seg, uint64_t off, uint64_t len) {
  return faults == nullptr ? IoFault{} : faults->Before(disk::IoRequest{kind, seg, off, len});
}

// fdatasync of a segment file (DiskTierOptions::sync), asking the test's
// IoFaults first.
Status SyncFile(IoFaults* faults, uint32_t seg, int fd, const std::string& what) {
  const IoFault f = Ask(faults, IoKind::kSync, seg, 0, 0);
  if (f.action == IoFault::Action::kFail) return ErrnoError("fdatasync " + what, f.error);
  if (f.action == IoFault::Action::kDrop) return Status::Ok();
  while (fdatasync(fd) != 0) {
    if (errno != EINTR) return ErrnoError("fdatasync " + what, errno);
  }
  return Status::Ok();
}

// Writes n bytes at off, then (sync) fdatasyncs the file.
Status WriteAll(IoFaults* faults, uint32_t seg, int fd, const std::byte* buf, size_t n, uint64_t off,
                const char* what, bool sync = false) {
  const IoFault f = Ask(faults, IoKind::kWrite, seg, off, n);
  size_t first = n;  // most bytes the first pwrite may take
  switch (f.action) {
    case IoFault::Action::kFail:
      if (f.error == ENOSPC) return ResourceExhausted(std::string("disk full (ENOSPC) writing ") + what);
      return ErrnoError(std::string("pwrite ") + what, f.error);
    case IoFault::Action::kDrop:
      return Status::Ok();
    case IoFault::Action::kTear:
      n = std::min<size_t>(n, f.bytes);
      break;
    case IoFault::Action::kShort:
      if (f.bytes > 0) first = std::min<size_t>(n, f.bytes);
      break;
    case IoFault::Action::kRun:
      break;
  }
  while (n > 0) {
    const ssize_t w = pwrite(fd, buf, std::min(n, first), static_cast<off_t>(off));
    first = n;
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOSPC) return ResourceExhausted(std::string("disk full (ENOSPC) writing ") + what);
      return ErrnoError(std::string("pwrite ") + what, errno);
    }
    buf += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return sync ? SyncFile(faults, seg, fd, what) : Status::Ok();
}

Status StatusFromIo(int neg_errno, const std::string& what) {
  if (neg_errno == -ENOSPC) return ResourceExhausted("disk full (ENOSPC) " + what);
  return ErrnoError(what, -neg_errno);
}

RecordHeader MakeHeader(const ChunkKey& key, uint64_t gen, uint64_t fp, uint64_t layout, uint32_t tokens,
                        uint64_t payload, uint32_t crc, uint16_t flags) {
  RecordHeader h{};
  h.magic = disk::kRecordMagic;
  h.version = disk::kFormatVersion;
  h.flags = flags;
  h.segment_gen = gen;
  h.key_lo = key.lo;
  h.key_hi = key.hi;
  h.fingerprint = fp;
  h.layout_id = layout;
  h.num_tokens = tokens;
  h.payload_crc = crc;
  h.payload_bytes = payload;
  disk::SealRecordHeader(&h);
  return h;
}

// Rewrites a record's header block with kFlagDead so rebuild skips it (also
// the filler that closes a sealed segment: null key, payload = the tail).
Status WriteDeadHeader(IoFaults* faults, uint32_t seg, int fd, uint64_t offset, const ChunkKey& key, uint64_t gen,
                       uint64_t fp, uint64_t layout, uint32_t tokens, uint64_t payload, uint32_t crc, bool sync) {
  AlignedBuffer b;
  if (!b.Reserve(kBlock)) return ResourceExhausted("out of memory for a header block");
  std::memset(b.data(), 0, kBlock);
  const RecordHeader h = MakeHeader(key, gen, fp, layout, tokens, payload, crc, disk::kFlagDead);
  std::memcpy(b.data(), &h, sizeof(h));
  return WriteAll(faults, seg, fd, b.data(), kBlock, offset, "record header", sync);
}

// What one rebuild worker found in one segment file.
struct SegmentScan {
  uint64_t gen = 0;  // 0: no live generation
  uint64_t retired_gen = 0;  // an empty segment's last generation (see disk_format.h)
  uint64_t max_record_gen = 0;  // the highest gen of any intact record header, stale ones included
  struct Rec {
    RecordHeader h;
    uint64_t offset;
  };
  std::vector<Rec> recs;
  uint64_t corrupt = 0;
  Status io;
};

// Reads a segment file through one small aligned window: a block at a time
// where records are jumped over, kScanPiece at a time where blocks are
// stepped over one by one.
class SegmentReader {
 public:
  SegmentReader(IoFaults* faults, uint32_t seg, int fd, uint64_t seg_bytes, AlignedBuffer* buf)
      : faults_(faults), seg_(seg), fd_(fd), seg_bytes_(seg_bytes), buf_(buf) {}

  // The 4096-byte block at `pos` (< segment end), reading `ahead` bytes from
  // pos when it is not in the window; nullptr after an I/O error (status()).
  const std::byte* Block(uint64_t pos, uint64_t ahead) {
    if (pos >= win_off_ && pos + kBlock <= win_off_ + win_len_) return buf_->data() + (pos - win_off_);
    const uint64_t n = std::min(ahead, seg_bytes_ - pos);
    const IoFault f = Ask(faults_, IoKind::kRead, seg_, pos, n);
    if (f.action == IoFault::Action::kFail) {
      status_ = ErrnoError("pread", f.error);
      win_len_ = 0;
      return nullptr;
    }
    uint64_t first = f.action == IoFault::Action::kShort && f.bytes > 0 ? std::min(n, f.bytes) : n;
    uint64_t got = 0;
    while (got < n) {
      const ssize_t r = pread(fd_, buf_->data() + got, std::min(n - got, first), static_cast<off_t>(pos + got));
      first = n;
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        status_ = r < 0 ? ErrnoError("pread", errno) : IoError("short segment file");
        win_len_ = 0;
        return nullptr;
      }
      got += static_cast<uint64_t>(r);
    }
    win_off_ = pos;
    win_len_ = n;
    return buf_->data();
  }
  const Status& status() const { return status_; }

 private:
  IoFaults* const faults_;
  const uint32_t seg_;
  const int fd_;
  const uint64_t seg_bytes_;
  AlignedBuffer* const buf_;  // at least kScanPiece bytes
  uint64_t win_off_ = 0, win_len_ = 0;
  Status status_;
};

// Finds the records of one segment from their headers alone; payloads are
// not read (every Get checks its payload CRC, so a record whose payload
// never fully landed is a kDataLoss miss at its first Get, then gone).
// A valid header of the live gen is jumped over by its length: no other
// record of that gen can start inside space reserved for it. Anything else
// (a damaged header, a hole left by a failed write, blocks of an older gen,
// never-written zeros) is stepped over a block at a time, because a
// completed record may follow an unfinished one and must still be found;
// there the reader reads ahead kScanPiece at a time. A sealed segment ends
// with a dead filler record over its unused tail (RollLocked), so only the
// segment that was open, and holes, are read block by block.
void ScanSegment(SegmentReader& rd, uint64_t seg_bytes, uint32_t idx, SegmentScan* out) {
  const std::byte* b = rd.Block(0, kBlock);
  if (b == nullptr) return;
  const auto sh = disk::LoadHeader<SegmentHeader>(b);
  if (!disk::SegmentHeaderValid(sh) || sh.segment_index != idx || sh.segment_bytes != seg_bytes) return;
  // Empty (gen 0): its old records must stay dead, so no gen they carry is
  // reused. They are read for their gens only.
  const bool retired = sh.gen == 0;
  if (retired) {
    out->retired_gen = sh.reserved1;
  } else {
    out->gen = sh.gen;
  }
  uint64_t pos = kBlock;
  bool stepping = false;
  while (pos + kBlock <= seg_bytes) {
    b = rd.Block(pos, stepping ? kScanPiece : kBlock);
    if (b == nullptr) return;
    const auto h = disk::LoadHeader<RecordHeader>(b);
    stepping = true;
    if (h.magic != disk::kRecordMagic) {
      pos += kBlock;
      continue;
    }
    if (!disk::RecordHeaderValid(h)) {
      if (!retired) ++out->corrupt;  // our magic with a bad checksum: a damaged header
      pos += kBlock;
      continue;
    }
    out->max_record_gen = std::max(out->max_record_gen, h.segment_gen);
    if (retired || h.segment_gen != sh.gen) {  // left over from an earlier use of the segment
      pos += kBlock;
      continue;
    }
    // Size first, arithmetic after: a forged payload_bytes near 2^64 would
    // wrap RecordBytes() or pos + rec and pass a plain bounds check.
    if (!disk::PayloadBytesFit(h.payload_bytes, seg_bytes) ||
        RecordBytes(h.payload_bytes) > seg_bytes - pos) {
      ++out->corrupt;
      pos += kBlock;
      continue;
    }
    if ((h.flags & disk::kFlagDead) == 0) out->recs.push_back({h, pos});
    pos += RecordBytes(h.payload_bytes);
    stepping = false;
  }
}

}  // namespace

StatusOr<DiskSync> ParseDiskSync(std::string_view name) {
  if (name == "none") return DiskSync::kNone;
  if (name == "batch") return DiskSync::kBatch;
  if (name == "always") return DiskSync::kAlways;
  return InvalidArgument("disk_sync must be one of none, batch, always; got '" + std::string(name) + "'");
}

const char* DiskSyncName(DiskSync sync) {
  switch (sync) {
    case DiskSync::kNone: return "none";
    case DiskSync::kBatch: return "batch";
    case DiskSync::kAlways: return "always";
  }
  return "?";
}

struct DiskTier::RingCtx {
  std::unique_ptr<IoRing> ring;
  AlignedBuffer bounce;
  uint64_t registered_version = 0;
};

DiskTier::DiskTier(DiskTierOptions options, int dir_fd, uint64_t segment_bytes, uint32_t num_segments)
    : Tier(TierKind::kDisk, "disk"), options_(std::move(options)), segment_bytes_(segment_bytes), dir_fd_(dir_fd),
      segs_(num_segments) {
  opened_at_ = Now();
}

DiskTier::~DiskTier() {
  for (Segment& s : segs_) {
    if (s.fd >= 0) close(s.fd);
  }
  if (lock_fd_ >= 0) close(lock_fd_);  // releases the flock
  if (dir_fd_ >= 0) close(dir_fd_);
}

std::string DiskTier::SegmentName(uint32_t idx) {
  char name[32];
  std::snprintf(name, sizeof(name), "seg_%05u.kvt", idx);
  return name;
}

std::string DiskTier::SegmentPath(uint32_t idx) const { return options_.path + "/" + SegmentName(idx); }

namespace {

// Segment files and LOCK are private to the user: a chunk's KV can be turned
// back into the prompt it encodes. Set with fchmod after creation, so the
// process umask (which can only remove bits) changes nothing.
constexpr mode_t kFileMode = 0600;
constexpr mode_t kDirMode = 0700;

// Calls fn(name) for every entry of the directory named like a segment file
// (seg_<index>.kvt), whatever its type.
Status ForEachSegmentEntry(int dir_fd, const std::function<void(const std::string&, unsigned)>& fn) {
  const int fd = fcntl(dir_fd, F_DUPFD_CLOEXEC, 0);  // fdopendir takes this fd over
  if (fd < 0) return ErrnoError("dup of the disk tier directory", errno);
  DIR* d = fdopendir(fd);
  if (d == nullptr) {
    const int err = errno;
    close(fd);
    return ErrnoError("fdopendir", err);
  }
  rewinddir(d);  // the dup shares its offset with dir_fd and every earlier listing
  while (const struct dirent* de = readdir(d)) {
    const std::string name = de->d_name;
    unsigned idx = 0;
    char tail[8] = {};
    if (std::sscanf(name.c_str(), "seg_%u.%7s", &idx, tail) == 2 && std::string(tail) == "kvt") fn(name, idx);
  }
  closedir(d);
  return Status::Ok();
}

// Why an entry of the directory is not a file this tier may open, read or
// write; empty when it is one (a regular file owned by this user). A link
// or a file of another user is refused, never followed or written: it
// could point the tier's writes (prompts' KV) or reads anywhere.
std::string UnusableFile(const struct stat& st) {
  if (S_ISLNK(st.st_mode)) return "is a symbolic link";
  if (!S_ISREG(st.st_mode)) return "is not a regular file";
  if (st.st_uid != geteuid()) {
    return "is owned by uid " + std::to_string(st.st_uid) + ", not by this process's user (uid " +
           std::to_string(geteuid()) + ")";
  }
  return "";
}

Status RefuseFile(const std::string& path, const std::string& why) {
  return FailedPrecondition("disk tier: " + path + " " + why +
                            "; kvtier did not create it and does not read or write through it (remove it, or "
                            "use another disk_path)");
}

// The status of a failed openat of `path` inside the directory (always with
// O_NOFOLLOW, which fails a symbolic link with ELOOP).
Status OpenError(const std::string& path, int err) {
  if (err == ELOOP) return RefuseFile(path, "is a symbolic link");
  if (err == ENOSPC) return ResourceExhausted("disk full (ENOSPC) creating " + path);
  return ErrnoError("open " + path, err);
}

// Checks a file just opened in the directory (fstat of the open descriptor:
// no window between check and use) and makes it mode 0600, which also
// tightens files that earlier versions created 0644.
Status AdoptFile(int fd, const std::string& path) {
  struct stat st;
  if (fstat(fd, &st) != 0) return ErrnoError("fstat " + path, errno);
  const std::string why = UnusableFile(st);
  if (!why.empty()) return RefuseFile(path, why);
  if ((st.st_mode & 07777) != kFileMode && fchmod(fd, kFileMode) != 0) {
    return ErrnoError("fchmod 0600 " + path, errno);
  }
  return Status::Ok();
}

// Creates `path` and its missing parents, each mode 0700 (a directory that
// exists is left as it is).
Status MakeDirectories(const std::string& path) {
  std::filesystem::path cur;
  for (const auto& part : std::filesystem::path(path)) {
    cur /= part;
    if (part.empty() || part == part.root_directory()) continue;
    struct stat st;
    if (stat(cur.c_str(), &st) == 0) continue;  // a link to a directory above the last component is the user's
    if (mkdir(cur.c_str(), kDirMode) != 0) {
      if (errno == EEXIST) continue;
      return ErrnoError("cannot create disk tier directory " + path + ": mkdir " + cur.string(), errno);
    }
    const int fd = open(cur.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    const int err = fd < 0 ? errno : fchmod(fd, kDirMode) != 0 ? errno : 0;
    if (fd >= 0) close(fd);
    if (err != 0) return ErrnoError("cannot make disk tier directory " + cur.string() + " mode 0700", err);
  }
  return Status::Ok();
}

// Opens the tier's directory, once; every file inside is then opened,
// listed and removed relative to this descriptor, never by path. The last
// component is not followed: the directory checked here is the one used.
// Refused (kFailedPrecondition, naming the path and the reason): a symbolic
// link; a directory owned by another user (root excepted: root can read
// every file anyway, and owns /tmp and mount points); a world-writable
// directory without the sticky bit, where anyone could replace the files.
StatusOr<int> OpenTierDirectory(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    struct stat st;
    if ((err == ELOOP || err == ENOTDIR) && lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {
      std::error_code ec;
      const std::filesystem::path target = std::filesystem::canonical(path, ec);
      return FailedPrecondition("disk tier directory " + path + " is a symbolic link" +
                                (ec ? std::string() : " to " + target.string()) +
                                "; set disk_path to the directory itself");
    }
    return ErrnoError("open disk tier directory " + path, err);
  }
  struct stat st;
  std::string why;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoError("fstat disk tier directory " + path, err);
  }
  if (st.st_uid != geteuid() && st.st_uid != 0) {
    why = "is owned by uid " + std::to_string(st.st_uid) + ", not by this process's user (uid " +
          std::to_string(geteuid()) + "), who could read the cached KV (the prompts it encodes) or replace its files";
  } else if ((st.st_mode & S_IWOTH) != 0 && (st.st_mode & S_ISVTX) == 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    why = std::string("is world-writable without the sticky bit (mode ") + mode +
          "): any local user could replace or remove its files";
  }
  if (!why.empty()) {
    close(fd);
    return FailedPrecondition("disk tier directory " + path + " " + why +
                              "; use a directory of your own that others cannot write (e.g. mode 0700)");
  }
  return fd;
}

// The one size every segment file in the directory has, or 0 (none, or
// they differ). Entries that are not regular files are not looked at here;
// Rebuild refuses them.
uint64_t ExistingSegmentBytes(int dir_fd) {
  uint64_t size = 0;
  bool differ = false;
  (void)ForEachSegmentEntry(dir_fd, [&](const std::string& name, unsigned) {
    struct stat st;
    if (fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) return;
    const uint64_t s = static_cast<uint64_t>(st.st_size);
    if (size != 0 && s != size) differ = true;
    size = s;
  });
  return differ ? 0 : size;
}

// Auto segment size (see DiskTierOptions::segment_bytes).
StatusOr<uint64_t> AutoSegmentBytes(const DiskTierOptions& o, int dir_fd) {
  const uint64_t cap = o.capacity_bytes;
  const uint64_t max_chunk = o.max_chunk_bytes;
  const uint64_t existing = ExistingSegmentBytes(dir_fd);
  if (existing % kBlock == 0 && existing >= 2 * kBlock && existing <= kMaxSegmentBytes && cap / existing >= 2 &&
      cap / existing <= kMaxSegments && max_chunk <= disk::MaxPayloadBytes(existing)) {
    return existing;
  }
  // A capacity above kMaxSegments * 64 MiB gets larger segments, not an error.
  const uint64_t fewest = std::min(kMaxSegmentBytes, disk::RoundUpToBlock((cap + kMaxSegments - 1) / kMaxSegments));
  const uint64_t base = std::max({std::min(kAutoSegmentBytes, (cap / 8) & ~(kBlock - 1)), kMinAutoSegmentBytes, fewest});
  if (max_chunk <= disk::MaxPayloadBytes(base)) return base;
  // max_chunk <= MaxPayloadBytes(1 GiB) was checked: at least one record fits.
  const uint64_t rec = RecordBytes(max_chunk);
  uint64_t n = std::min(kAutoRecordsPerSegment, (kMaxSegmentBytes - kBlock) / rec);
  while (n > 1 && cap / (kBlock + n * rec) < 2) --n;
  const uint64_t seg = kBlock + n * rec;
  if (cap / seg < 2) {
    return InvalidArgument("DiskTierOptions.capacity_bytes (" + std::to_string(cap) +
                           ") must hold at least 2 segments; with max_chunk_bytes " + std::to_string(max_chunk) +
                           " a segment needs " + std::to_string(seg) + " bytes, so capacity needs at least " +
                           std::to_string(2 * seg));
  }
  return seg;
}

}  // namespace

StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options) {
  if (options.path.empty()) return InvalidArgument("DiskTierOptions.path is empty");
  if (options.capacity_bytes == 0) return InvalidArgument("DiskTierOptions.capacity_bytes is 0");
  if (options.queue_depth == 0 || options.queue_depth > 4096)
    return InvalidArgument("DiskTierOptions.queue_depth must be in [1, 4096], got " +
                           std::to_string(options.queue_depth));
  if (options.max_chunk_bytes > disk::MaxPayloadBytes(kMaxSegmentBytes)) {
    return InvalidArgument("DiskTierOptions.max_chunk_bytes (" + std::to_string(options.max_chunk_bytes) +
                           ") exceeds the largest chunk a disk segment can hold (" +
                           std::to_string(disk::MaxPayloadBytes(kMaxSegmentBytes)) + " bytes: 1 GiB less 8 KiB)");
  }
  uint64_t seg = options.segment_bytes;
  if (seg != 0 && (seg % kBlock != 0 || seg < 2 * kBlock || seg > kMaxSegmentBytes)) {
    return InvalidArgument("DiskTierOptions.segment_bytes must be a multiple of 4096 in [8192, 1 GiB], got " +
                           std::to_string(seg));
  } else if (seg != 0 && options.max_chunk_bytes > disk::MaxPayloadBytes(seg)) {
    return InvalidArgument("DiskTierOptions.segment_bytes (disk_segment_size) " + std::to_string(seg) +
                           " cannot hold a chunk of max_chunk_bytes (" + std::to_string(options.max_chunk_bytes) +
                           "): a segment needs at least " + std::to_string(RecordBytes(options.max_chunk_bytes) + kBlock) +
                           " bytes (8 KiB of headers, the payload rounded up to 4 KiB), or 0 for auto");
  }

  KVT_RETURN_IF_ERROR(MakeDirectories(options.path));
  KVT_ASSIGN_OR_RETURN(const int dir_fd, OpenTierDirectory(options.path));
  if (seg == 0) {
    StatusOr<uint64_t> auto_seg = AutoSegmentBytes(options, dir_fd);
    if (!auto_seg.ok()) {
      close(dir_fd);
      return auto_seg.status();
    }
    seg = *auto_seg;
  }
  Status bad;
  if (options.capacity_bytes / seg < 2) {
    bad = InvalidArgument("DiskTierOptions.capacity_bytes (" + std::to_string(options.capacity_bytes) +
                          ") must hold at least 2 segments of " + std::to_string(seg) + " bytes");
  } else if (options.capacity_bytes / seg > kMaxSegments) {
    bad = InvalidArgument("capacity / segment_bytes gives more than 100000 segments");
  }
  if (!bad.ok()) {
    close(dir_fd);
    return bad;
  }
  const uint64_t nseg = options.capacity_bytes / seg;

  // The tier owns dir_fd from here.
  std::unique_ptr<DiskTier> t(new DiskTier(options, dir_fd, seg, static_cast<uint32_t>(nseg)));
  KVT_RETURN_IF_ERROR(t->LockDirectory());

  // Without io_uring every Put and Get would fail: say so here, once. The
  // first ring then serves the first caller.
  {
    auto ring = t->AcquireRing();
    if (!ring.ok()) {
      return ring.status().Annotate(
          "the disk tier needs io_uring, and this process cannot set up a ring (disabled by "
          "sysctl kernel.io_uring_disabled, blocked by a container's seccomp profile, or a kernel "
          "older than 5.6?)");
    }
    t->ReleaseRing(std::move(ring).value());
  }

  if (options.use_gds) {
    Status g = disk::CuFile::OpenDriver();
    t->gds_available_ = g.ok();
    static std::once_flag logged;
    std::call_once(logged, [&] {
      if (g.ok()) {
        Log("cuFile driver opened; host-memory chunks still use io_uring (no device-memory path yet)");
      } else {
        Log("GPUDirect Storage unavailable (" + g.ToString() + "); using io_uring");
      }
    });
  }

  KVT_RETURN_IF_ERROR(t->Rebuild());

  struct statvfs vfs;
  if (fstatvfs(t->dir_fd_, &vfs) == 0) {
    uint64_t have = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    for (const Segment& s : t->segs_) {
      if (s.fd >= 0) have += seg;
    }
    if (have < nseg * seg) {
      Log("warning: " + options.path + " has room for " + std::to_string(have >> 20) + " MiB of segments, capacity is " +
          std::to_string((nseg * seg) >> 20) + " MiB; once it fills, old segments are recycled early (Puts fail only when none can go)");
    }
  }
  return t;
}

Status DiskTier::LockDirectory() {
  const std::string lock_path = options_.path + "/LOCK";
  const IoFault f = Ask(options_.io_faults.get(), IoKind::kOpen, disk::kNoSegment, 0, 0);
  lock_fd_ = f.action == IoFault::Action::kFail
                 ? (errno = f.error, -1)
                 : openat(dir_fd_, "LOCK", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, kFileMode);
  if (lock_fd_ < 0) return OpenError(lock_path, errno);
  KVT_RETURN_IF_ERROR(AdoptFile(lock_fd_, lock_path));
  if (flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err != EWOULDBLOCK) return ErrnoError("flock " + lock_path, err);
    char buf[32] = {};
    const ssize_t n = pread(lock_fd_, buf, sizeof(buf) - 1, 0);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("unknown");
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    close(lock_fd_);
    lock_fd_ = -1;
    return FailedPrecondition("disk tier directory " + options_.path + " is in use by pid " + holder +
                              " (holds " + lock_path + ")");
  }
  const std::string pid = std::to_string(getpid()) + "\n";
  if (ftruncate(lock_fd_, 0) != 0 || pwrite(lock_fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    return ErrnoError("write " + lock_path, errno);
  }
  return Status::Ok();
}

Status DiskTier::Rebuild() {
  const auto t0 = std::chrono::steady_clock::now();
  const uint32_t nseg = num_segments();

  // Segment files beyond the configured count (capacity shrank) hold data we
  // can no longer address: remove them so their space comes back. Only our
  // own regular files: anything else is never touched.
  KVT_RETURN_IF_ERROR(ForEachSegmentEntry(dir_fd_, [&](const std::string& name, unsigned idx) {
    struct stat st;
    if (idx < nseg || fstatat(dir_fd_, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return;
    if (!UnusableFile(st).empty()) {
      Log("leaving " + options_.path + "/" + name + " alone: beyond the configured capacity, and " + UnusableFile(st));
      return;
    }
    Log("removing " + options_.path + "/" + name + ": beyond the configured capacity");
    unlinkat(dir_fd_, name.c_str(), 0);
  }));

  for (uint32_t i = 0; i < nseg; ++i) {
    const std::string name = SegmentName(i);
    const std::string p = SegmentPath(i);
    struct stat st;
    if (fstatat(dir_fd_, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno == ENOENT) continue;
      return ErrnoError("stat " + p, errno);
    }
    // A link or a file of another user in our directory was planted: refuse
    // to start rather than read it or, once the segment is reused, write
    // prompts' KV through it.
    if (const std::string why = UnusableFile(st); !why.empty()) return RefuseFile(p, why);
    if (static_cast<uint64_t>(st.st_size) != segment_bytes_) {
      // Written with another segment size: the records are unreachable.
      Log("discarding " + p + ": size " + std::to_string(st.st_size) + " != segment_bytes " +
          std::to_string(segment_bytes_));
      unlinkat(dir_fd_, name.c_str(), 0);
      continue;
    }
    const IoFault f = Ask(options_.io_faults.get(), IoKind::kOpen, i, 0, 0);
    const int fd = f.action == IoFault::Action::kFail
                       ? (errno = f.error, -1)
                       : openat(dir_fd_, name.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return OpenError(p, errno);
    segs_[i].fd = fd;  // closed by the destructor, also when AdoptFile refuses it
    KVT_RETURN_IF_ERROR(AdoptFile(fd, p));
    segs_[i].state = Segment::State::kFree;
  }

  std::vector<SegmentScan> scans(nseg);
  std::atomic<uint32_t> next{0};
  auto worker = [&] {
    AlignedBuffer buf;
    if (!buf.Reserve(kScanPiece)) {
      // Without a buffer this worker cannot scan; the others still can.
      return;
    }
    for (;;) {
      // relaxed: the counter only hands out distinct indices; scans[i] is
      // published to the merging thread by join(), not by this atomic.
      const uint32_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= nseg) return;
      if (segs_[i].fd < 0) continue;
      SegmentReader rd(options_.io_faults.get(), i, segs_[i].fd, segment_bytes_, &buf);
      ScanSegment(rd, segment_bytes_, i, &scans[i]);
      if (!rd.status().ok()) scans[i].io = rd.status().Annotate(SegmentPath(i));
    }
  };
  const uint32_t nthreads = std::max<uint32_t>(1, std::min(options_.rebuild_threads, nseg));
  std::vector<std::thread> threads;
  for (uint32_t k = 1; k < nthreads; ++k) threads.emplace_back(worker);
  worker();
  for (std::thread& th : threads) th.join();
  // A worker that failed to allocate leaves its share to the others; if all
  // failed, next never reached nseg.
  if (next.load(std::memory_order_relaxed) < nseg) {
    return ResourceExhausted("cannot allocate a " + std::to_string(kScanPiece) + "-byte rebuild buffer");
  }

  // Apply oldest generation first, so that where a key appears twice (a
  // crash between a re-Put and the removal of the older copy) the newest wins.
  std::vector<uint32_t> order;
  for (uint32_t i = 0; i < nseg; ++i) {
    if (!scans[i].io.ok()) {
      Log("segment " + SegmentPath(i) + " unreadable, treated as empty: " + scans[i].io.ToString());
      continue;
    }
    rebuild_stats_.corrupt_records += scans[i].corrupt;
    next_gen_ = std::max(next_gen_, scans[i].retired_gen + 1);
    // Above every gen a record on disk carries (saturating: a forged
    // UINT64_MAX must not wrap the counter to 0, "empty").
    if (scans[i].max_record_gen != UINT64_MAX) next_gen_ = std::max(next_gen_, scans[i].max_record_gen + 1);
    if (scans[i].gen != 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return scans[a].gen < scans[b].gen; });
  for (uint32_t i : order) {
    Segment& s = segs_[i];
    s.state = Segment::State::kSealed;
    s.gen = scans[i].gen;
    s.write_ptr = segment_bytes_;  // never appended to again in this generation
    next_gen_ = std::max(next_gen_, s.gen + 1);
    ++rebuild_stats_.segments;
    for (const SegmentScan::Rec& r : scans[i].recs) {
      const ChunkKey key = disk::KeyOf(r.h);
      auto it = map_.find(key);
      if (it != map_.end()) EraseEntryLocked(it);
      Entry e;
      e.seg = i;
      e.offset = r.offset;
      e.gen = s.gen;
      e.payload_bytes = r.h.payload_bytes;
      e.fingerprint = r.h.fingerprint;
      e.layout_id = r.h.layout_id;
      e.num_tokens = r.h.num_tokens;
      e.payload_crc = r.h.payload_crc;
      map_.emplace(key, e);
      s.keys.push_back(key);
      used_bytes_ += RecordBytes(e.payload_bytes);
    }
  }
  rebuild_stats_.chunks = map_.size();
  for (const auto& [k, e] : map_) rebuild_stats_.bytes += e.payload_bytes;
  rebuild_stats_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Space management

void DiskTier::EraseEntryLocked(std::unordered_map<ChunkKey, Entry, ChunkKeyHash>::iterator it) {
  const Entry& e = it->second;
  if (!e.writing) {
    segs_[e.seg].pins -= e.pins;
    used_bytes_ -= RecordBytes(e.payload_bytes);
  }
  map_.erase(it);
}

std::vector<ChunkKey> DiskTier::DropSegmentLocked(uint32_t idx, uint64_t* bytes) {
  Segment& s = segs_[idx];
  std::vector<ChunkKey> dropped;
  for (const ChunkKey& k : s.keys) {
    auto it = map_.find(k);
    // keys may name a chunk since removed, or re-Put elsewhere: skip those.
    if (it == map_.end() || it->second.writing || it->second.seg != idx || it->second.gen != s.gen) continue;
    dropped.push_back(k);
    if (bytes != nullptr) *bytes += it->second.payload_bytes;
    EraseEntryLocked(it);
  }
  s.keys.clear();
  return dropped;
}

StatusOr<DiskTier::Slot> DiskTier::ReserveLocked(std::unique_lock<std::mutex>& l, uint64_t record_bytes) {
  for (;;) {
    if (open_seg_ >= 0) {
      Segment& s = segs_[open_seg_];
      if (s.write_ptr + record_bytes <= segment_bytes_) {
        Slot slot{static_cast<uint32_t>(open_seg_), s.write_ptr, s.gen};
        s.write_ptr += record_bytes;
        ++s.writers;
        return slot;
      }
    }
    if (rolling_) {
      cv_.wait(l);
      continue;
    }
    rolling_ = true;
    Status st = RollLocked(l);
    rolling_ = false;
    cv_.notify_all();
    if (!st.ok()) return st;
  }
}

Status DiskTier::RollLocked(std::unique_lock<std::mutex>& l) {
  using State = Segment::State;
  if (open_seg_ >= 0) {
    Segment& old = segs_[open_seg_];
    const uint32_t idx = static_cast<uint32_t>(open_seg_);
    old.state = State::kSealed;
    open_seg_ = -1;
    const uint64_t tail = segment_bytes_ - old.write_ptr;
    if (tail >= 2 * kBlock) {
      // A dead record over the unused tail lets the start-up scan jump to
      // the end instead of stepping through the tail block by block. Writes
      // still in flight end before write_ptr, so none overlaps it; `readers`
      // keeps the segment from being reused under this write. A failed write
      // costs start-up time only.
      ++old.readers;
      const int fd = old.fd;
      const uint64_t at = old.write_ptr, gen = old.gen;
      l.unlock();
      (void)WriteDeadHeader(options_.io_faults.get(), idx, fd, at, ChunkKey{}, gen, 0, 0, 0, tail - kBlock, 0,
                            options_.sync == DiskSync::kAlways);
      l.lock();
      --segs_[idx].readers;
      cv_.notify_all();
    }
  }
  // 1. A segment file with no live generation.
  int target = -1;
  for (size_t i = 0; i < segs_.size() && target < 0; ++i) {
    if (segs_[i].state == State::kFree) target = static_cast<int>(i);
  }
  // 2. A segment file not created yet.
  Status full;
  for (size_t i = 0; i < segs_.size() && target < 0; ++i) {
    if (segs_[i].state != State::kUncreated) continue;
    segs_[i].state = State::kReclaiming;
    int fd = -1;
    l.unlock();
    Status st = CreateSegmentFile(static_cast<uint32_t>(i), &fd);
    l.lock();
    if (st.ok()) {
      segs_[i].fd = fd;
      target = static_cast<int>(i);
      disk_full_logged_ = false;
      break;
    }
    segs_[i].state = State::kUncreated;
    if (st.code() != StatusCode::kResourceExhausted) return st;
    // Disk full: the file system is smaller than the capacity (or shared and
    // filling). Recycle an old segment instead if one can go; only when none
    // can does the Put fail. The next roll tries to create again.
    ++counters_.enospc;
    full = st;
    break;
  }
  // 3. The oldest reclaimable segment (FIFO over generations); one holding a
  // pinned chunk or an unfinished write is skipped, not waited for.
  std::vector<ChunkKey> evicted;
  if (target < 0) {
    for (size_t i = 0; i < segs_.size(); ++i) {
      const Segment& s = segs_[i];
      if (s.state != State::kSealed || s.pins > 0 || s.writers > 0) continue;
      if (target < 0 || s.gen < segs_[target].gen) target = static_cast<int>(i);
    }
    if (target < 0) {
      if (!full.ok()) return full;
      return ResourceExhausted("disk tier: no reclaimable segment (all " + std::to_string(segs_.size()) +
                               " hold pinned chunks or unfinished writes)");
    }
    if (!full.ok() && !disk_full_logged_) {
      disk_full_logged_ = true;  // once per disk-full episode
      Log(std::string(full.message()) + "; recycling old segments until space returns");
    }
    evicted = DropSegmentLocked(static_cast<uint32_t>(target), &evicted_bytes_);
    evictions_ += evicted.size();
  }
  Segment& seg = segs_[target];
  seg.state = State::kReclaiming;
  // Gets that looked the dropped chunks up before the drop are still reading
  // this segment; rewriting it under them would turn their hits into kDataLoss.
  cv_.wait(l, [&] { return seg.readers == 0; });
  const uint64_t gen = next_gen_++;
  const int fd = seg.fd;
  l.unlock();
  Status st = WriteSegmentHeader(fd, static_cast<uint32_t>(target), gen);
  for (const ChunkKey& k : evicted) NotifyEvicted(k);
  l.lock();
  // segs_ never reallocates, so `seg` is still valid.
  if (!st.ok()) {
    seg.state = State::kFree;
    if (st.code() == StatusCode::kResourceExhausted) ++counters_.enospc;
    return st;
  }
  seg.state = State::kOpen;
  seg.gen = gen;
  seg.write_ptr = kBlock;
  seg.keys.clear();
  open_seg_ = target;
  return Status::Ok();
}

Status DiskTier::CreateSegmentFile(uint32_t idx, int* fd_out) {
  const std::string name = SegmentName(idx);
  const std::string p = SegmentPath(idx);
  IoFaults* faults = options_.io_faults.get();
  const IoFault fo = Ask(faults, IoKind::kOpen, idx, 0, 0);
  // O_NOFOLLOW: a link planted under this name after Open is refused
  // (ELOOP), never followed; AdoptFile refuses a file another user planted.
  const int fd = fo.action == IoFault::Action::kFail
                     ? (errno = fo.error, -1)
                     : openat(dir_fd_, name.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC | O_NOFOLLOW, kFileMode);
  if (fd < 0) return OpenError(p, errno);
  if (Status adopt = AdoptFile(fd, p); !adopt.ok()) {
    close(fd);
    return adopt;
  }
  const IoFault ff = Ask(faults, IoKind::kFallocate, idx, 0, segment_bytes_);
  int rc = ff.action == IoFault::Action::kFail ? (errno = ff.error, -1)
                                               : fallocate(fd, 0, 0, static_cast<off_t>(segment_bytes_));
  if (rc != 0 && errno == EOPNOTSUPP) {
    // No preallocation on this file system: the file is sparse and ENOSPC
    // surfaces on the record writes instead (handled there).
    rc = ftruncate(fd, static_cast<off_t>(segment_bytes_));
  }
  if (rc != 0) {
    const int err = errno;
    close(fd);
    unlinkat(dir_fd_, name.c_str(), 0);
    if (err == ENOSPC) return ResourceExhausted("disk full (ENOSPC) preallocating " + p);
    return ErrnoError("fallocate " + p, err);
  }
  *fd_out = fd;
  return Status::Ok();
}

Status DiskTier::WriteSegmentHeader(int fd, uint32_t idx, uint64_t gen, uint64_t retired_gen) {
  AlignedBuffer b;
  if (!b.Reserve(kBlock)) return ResourceExhausted("out of memory for a header block");
  std::memset(b.data(), 0, kBlock);
  SegmentHeader h{};
  h.magic = disk::kSegmentMagic;
  h.version = disk::kFormatVersion;
  h.segment_index = idx;
  h.segment_bytes = segment_bytes_;
  h.gen = gen;
  h.reserved1 = static_cast<uint32_t>(std::min<uint64_t>(retired_gen, UINT32_MAX));
  disk::SealSegmentHeader(&h);
  std::memcpy(b.data(), &h, sizeof(h));
  // kBatch: the records that follow in this segment sync the file, header
  // included, before they are acknowledged.
  return WriteAll(options_.io_faults.get(), idx, fd, b.data(), kBlock, 0, SegmentPath(idx).c_str(),
                  options_.sync == DiskSync::kAlways);
}

uint64_t DiskTier::max_payload_bytes() const { return disk::MaxPayloadBytes(segment_bytes_); }

Status DiskTier::EnsureChunkFits(size_t max_chunk_bytes) const {
  if (max_chunk_bytes == 0) return InvalidArgument("disk: EnsureChunkFits(0): a chunk size must be > 0");
  if (max_chunk_bytes > disk::MaxPayloadBytes(kMaxSegmentBytes)) {
    return InvalidArgument("disk: chunks of " + std::to_string(max_chunk_bytes) +
                           " bytes exceed the largest a disk segment can hold (" +
                           std::to_string(disk::MaxPayloadBytes(kMaxSegmentBytes)) + " bytes: 1 GiB less 8 KiB)");
  }
  if (max_chunk_bytes <= max_payload_bytes()) return Status::Ok();
  // kInvalidArgument, not kFailedPrecondition: the segment size is
  // configuration, and no retry or wait makes these chunks fit.
  const uint64_t need = RecordBytes(max_chunk_bytes) + kBlock;
  const std::string remedy =
      options_.segment_bytes == 0
          ? "segments were sized automatically before the chunk size was known; set disk_segment_size "
            "(DiskTierOptions.segment_bytes) to at least " +
                std::to_string(need) +
                ", or give the chunk size at start (chunk_bytes / DiskTierOptions.max_chunk_bytes) so auto "
                "segments grow to fit (existing segments of the old size are then discarded)"
          : "set disk_segment_size (DiskTierOptions.segment_bytes) to at least " + std::to_string(need) +
                " or 0 (auto)";
  return InvalidArgument("disk tier at " + options_.path + ": segments of " + std::to_string(segment_bytes_) +
                         " bytes (disk_segment_size) hold chunks of at most " + std::to_string(max_payload_bytes()) +
                         " bytes; chunks of " + std::to_string(max_chunk_bytes) + " bytes do not fit: " + remedy);
}

// ---------------------------------------------------------------------------
// Rings

StatusOr<std::unique_ptr<DiskTier::RingCtx>> DiskTier::AcquireRing() {
  std::unique_ptr<RingCtx> ctx;
  std::span<std::byte> region;
  uint64_t version;
  {
    std::lock_guard<std::mutex> g(ring_mu_);
    if (!free_rings_.empty()) {
      ctx = std::move(free_rings_.back());
      free_rings_.pop_back();
    }
    region = registered_;
    version = registered_version_;
  }
  if (!ctx) {
    ctx = std::make_unique<RingCtx>();
    KVT_ASSIGN_OR_RETURN(ctx->ring, IoRing::Create(options_.queue_depth, options_.io_faults.get()));
  }
  if (ctx->registered_version != version) {
    // A failed registration only loses the fixed-buffer fast path.
    if (!region.empty()) (void)ctx->ring->RegisterRegion(region);
    ctx->registered_version = version;
  }
  return ctx;
}

void DiskTier::ReleaseRing(std::unique_ptr<RingCtx> ctx) {
  if (!ctx->ring->status().ok()) {
    // Broken beyond repair (its rebuild failed): the next caller makes a new
    // one, or gets the reason as its Status.
    Log("dropping an io_uring ring: " + ctx->ring->status().ToString());
    return;
  }
  std::lock_guard<std::mutex> g(ring_mu_);
  free_rings_.push_back(std::move(ctx));
}

Status DiskTier::RegisterBuffers(std::span<std::byte> region) {
  if (region.empty()) return InvalidArgument("RegisterBuffers: empty region");
  if (!IsAligned(region.data()) || region.size() % kBlock != 0)
    return InvalidArgument("RegisterBuffers: region must be 4096-aligned in address and size");
  {
    std::lock_guard<std::mutex> g(ring_mu_);
    registered_ = region;
    ++registered_version_;
  }
  // Register on one ring now so the caller learns whether the kernel agrees.
  KVT_ASSIGN_OR_RETURN(std::unique_ptr<RingCtx> ctx, AcquireRing());
  Status s = ctx->ring->RegisterRegion(region);
  ReleaseRing(std::move(ctx));
  return s;
}

// ---------------------------------------------------------------------------
// Put

std::vector<Status> DiskTier::PutBatch(std::span<const ChunkMeta> metas,
                                       std::span<const std::span<const std::byte>> datas) {
  std::vector<Status> out = PutBatchImpl(metas, datas);
  std::lock_guard<std::mutex> g(mu_);
  ++counters_.batch_calls;
  for (size_t i = 0; i < out.size(); ++i) {
    ++counters_.puts;
    if (out[i].ok()) {
      CountPut(datas[i].size());
      counters_.put_bytes += datas[i].size();
    } else if (out[i].code() != StatusCode::kAlreadyExists) {
      ++batch_errors_;  // same rule as Tier::Put
    }
  }
  return out;
}

std::vector<Status> DiskTier::GetBatch(std::span<const ChunkKey> keys, std::span<const uint64_t> fingerprints,
                                       std::span<const std::span<std::byte>> dsts) {
  std::vector<Status> out = GetBatchImpl(keys, fingerprints, dsts);
  std::lock_guard<std::mutex> g(mu_);
  ++counters_.batch_calls;
  for (size_t i = 0; i < out.size(); ++i) {
    ++counters_.gets;
    CountGet(out[i].ok(), dsts[i].size());
    if (out[i].ok()) {
      ++counters_.get_hits;
      counters_.get_bytes += dsts[i].size();
    } else if (out[i].code() == StatusCode::kDataLoss || out[i].code() == StatusCode::kIoError) {
      ++batch_errors_;  // same rule as Tier::Get
    }
  }
  return out;
}

std::vector<Status> DiskTier::PutBatchImpl(std::span<const ChunkMeta> metas,
                                           std::span<const std::span<const std::byte>> datas) {
  const size_t n = metas.size();
  std::vector<Status> out(std::max(n, datas.size()));
  if (metas.size() != datas.size()) {
    for (Status& s : out) s = InvalidArgument("PutBatch: metas and datas differ in length");
    return out;
  }
  const uint64_t max_payload = disk::MaxPayloadBytes(segment_bytes_);
  std::vector<bool> valid(n, false);
  for (size_t i = 0; i < n; ++i) {
    if (datas[i].empty()) {
      out[i] = InvalidArgument("disk: Put of an empty chunk");
    } else if (metas[i].key.IsNull()) {
      out[i] = InvalidArgument("disk: Put with the null key");
    } else if (datas[i].size() > max_payload) {
      // Permanent for this tier: retrying cannot help (kInvalidArgument).
      out[i] = InvalidArgument("disk: chunk of " + std::to_string(datas[i].size()) +
                               " bytes exceeds the largest this tier stores (" + std::to_string(max_payload) +
                               " bytes: segments of " + std::to_string(segment_bytes_) +
                               " bytes less 8 KiB of headers); open the disk tier with max_chunk_bytes set or a "
                               "larger segment_bytes");
    } else {
      valid[i] = true;
    }
  }

  struct Pending {
    size_t i;
    Slot slot;
    int fd = -1;
    Status sync;  // the fdatasync that covers this record (DiskTierOptions::sync)
    uint32_t crc = 0;
    std::byte* hdr = nullptr;  // bounce: header block, then tail block or whole payload
    size_t first_op = 0, num_ops = 0;
  };
  std::vector<Pending> pending;
  {
    std::unique_lock<std::mutex> l(mu_);
    std::vector<size_t> mine;
    for (size_t i = 0; i < n; ++i) {
      if (!valid[i]) continue;
      auto [it, inserted] = map_.try_emplace(metas[i].key);
      if (!inserted) {
        out[i] = AlreadyExists("disk: chunk " + metas[i].key.ToHex() + " already stored");
        continue;
      }
      Entry& e = it->second;
      e.writing = true;
      e.payload_bytes = datas[i].size();
      e.fingerprint = metas[i].fingerprint;
      e.layout_id = metas[i].layout_id;
      e.num_tokens = metas[i].num_tokens;
      mine.push_back(i);
    }
    for (size_t i : mine) {
      StatusOr<Slot> slot = ReserveLocked(l, RecordBytes(datas[i].size()));
      if (!slot.ok()) {
        out[i] = slot.status();
        map_.erase(metas[i].key);  // still `writing`: no segment accounting to undo
        continue;
      }
      Entry& e = map_.find(metas[i].key)->second;
      e.seg = slot->seg;
      e.offset = slot->offset;
      e.gen = slot->gen;
      pending.push_back({i, *slot});
    }
  }
  if (pending.empty()) return out;

  Status ring_status;
  StatusOr<std::unique_ptr<RingCtx>> ctx_or = AcquireRing();
  std::vector<IoOp> ops;
  if (!ctx_or.ok()) {
    ring_status = ctx_or.status();
  } else {
    RingCtx& ctx = **ctx_or;
    size_t bounce_bytes = 0;
    for (Pending& p : pending) {
      const auto d = datas[p.i];
      bounce_bytes += IsAligned(d.data()) ? 2 * kBlock : RecordBytes(d.size());
    }
    if (!ctx.bounce.Reserve(bounce_bytes)) {
      ring_status = ResourceExhausted("disk: out of memory for a " + std::to_string(bounce_bytes) + "-byte bounce buffer");
    } else {
      std::byte* b = ctx.bounce.data();
      std::vector<size_t> owner;  // op index -> pending index, for prepare()
      for (size_t pi = 0; pi < pending.size(); ++pi) {
        Pending& p = pending[pi];
        const auto d = datas[p.i];
        const int fd = segs_[p.slot.seg].fd;  // fd of an open segment never changes while writers > 0
        p.fd = fd;
        p.hdr = b;
        p.first_op = ops.size();
        if (IsAligned(d.data())) {
          const size_t body = d.size() & ~(kBlock - 1);
          const size_t tail = d.size() - body;
          std::byte* tail_block = b + kBlock;
          b += 2 * kBlock;
          const int fixed = body > 0 ? ctx.ring->FixedIndexFor(d.data(), body) : -1;
          auto* body_ptr = const_cast<std::byte*>(d.data());  // written from, never to
          if (fixed >= 0) {
            ops.push_back(IoOp{IoOp::Kind::kWrite, fd, p.slot.offset + kBlock, {{body_ptr, body}}, 1, fixed});
            if (tail > 0) ops.push_back(IoOp{IoOp::Kind::kWrite, fd, p.slot.offset + kBlock + body, {{tail_block, kBlock}}, 1});
          } else {
            IoOp op{IoOp::Kind::kWrite, fd, p.slot.offset + kBlock, {}, 0};
            if (body > 0) op.iov[op.niov++] = iovec{body_ptr, body};
            if (tail > 0) op.iov[op.niov++] = iovec{tail_block, kBlock};
            ops.push_back(op);
          }
        } else {
          const size_t rec = RecordBytes(d.size());
          ops.push_back(IoOp{IoOp::Kind::kWrite, fd, p.slot.offset + kBlock, {{p.hdr + kBlock, rec - kBlock}}, 1});
          b += rec;
        }
        // The header block last: it holds the payload's CRC, computed while
        // the payload's write is already in flight (prepare below).
        ops.push_back(IoOp{IoOp::Kind::kWrite, fd, p.slot.offset, {{p.hdr, kBlock}}, 1});
        p.num_ops = ops.size() - p.first_op;
        for (size_t k = p.first_op; k < ops.size(); ++k) ops[k].segment = p.slot.seg;
        owner.resize(ops.size(), pi);
      }
      // Each record's payload is written first and its header block last
      // (ops are queued in that order, each right after its prepare): the
      // payload's CRC, which the header holds, is computed while the payload
      // is being written, so a single Put costs about max(write, CRC), not
      // their sum. Torn records stay safe: a header whose payload did not
      // land fails its CRC at Get, as before.
      auto prepare = [&](size_t op) {
        Pending& p = pending[owner[op]];
        const auto d = datas[p.i];
        if (op == p.first_op + p.num_ops - 1) {  // the header block
          const ChunkMeta& m = metas[p.i];
          p.crc = disk::Crc32c(d);
          const RecordHeader h =
              MakeHeader(m.key, p.slot.gen, m.fingerprint, m.layout_id, m.num_tokens, d.size(), p.crc, 0);
          std::memset(p.hdr, 0, kBlock);
          std::memcpy(p.hdr, &h, sizeof(h));
          return;
        }
        if (op != p.first_op) return;
        if (IsAligned(d.data())) {
          const size_t body = d.size() & ~(kBlock - 1);
          const size_t tail = d.size() - body;
          if (tail > 0) {
            std::memcpy(p.hdr + kBlock, d.data() + body, tail);
            std::memset(p.hdr + kBlock + tail, 0, kBlock - tail);
          }
        } else {
          const size_t rec = RecordBytes(d.size());
          std::memcpy(p.hdr + kBlock, d.data(), d.size());
          std::memset(p.hdr + kBlock + d.size(), 0, rec - kBlock - d.size());
        }
      };
      auto written = [&](const Pending& p) {
        for (size_t k = p.first_op; k < p.first_op + p.num_ops; ++k) {
          if (ops[k].result != 0) return false;
        }
        return true;
      };
      IoFaults* faults = options_.io_faults.get();
      // A record whose payload failed while its header landed would be found
      // by the next start-up (then fail its CRC at Get): mark it dead now.
      auto bury_failed = [&](const Pending& p) {
        const size_t hdr_op = p.first_op + p.num_ops - 1;
        if (ops[hdr_op].result != 0 || written(p)) return;
        const ChunkMeta& m = metas[p.i];
        (void)WriteDeadHeader(faults, p.slot.seg, p.fd, p.slot.offset, m.key, p.slot.gen, m.fingerprint, m.layout_id,
                              m.num_tokens, datas[p.i].size(), p.crc, options_.sync == DiskSync::kAlways);
      };
      if (options_.sync == DiskSync::kAlways) {
        // Record by record: each is on stable storage before the next is written.
        for (Pending& p : pending) {
          ctx.ring->Run(std::span<IoOp>(ops).subspan(p.first_op, p.num_ops),
                        [&](size_t k) { prepare(p.first_op + k); });
          bury_failed(p);
          if (written(p)) p.sync = SyncFile(faults, p.slot.seg, p.fd, SegmentPath(p.slot.seg));
        }
      } else {
        ctx.ring->Run(ops, prepare);
        for (const Pending& p : pending) bury_failed(p);
        if (options_.sync == DiskSync::kBatch) {
          // One fdatasync per segment file this batch wrote, after every
          // write finished and before anything is published.
          std::vector<uint32_t> synced;
          for (const Pending& p : pending) {
            if (!written(p) || std::find(synced.begin(), synced.end(), p.slot.seg) != synced.end()) continue;
            synced.push_back(p.slot.seg);
            const Status st = SyncFile(faults, p.slot.seg, p.fd, SegmentPath(p.slot.seg));
            for (Pending& q : pending) {
              if (q.slot.seg == p.slot.seg) q.sync = st;
            }
          }
        }
      }
    }
    ReleaseRing(std::move(*ctx_or));
  }

  std::unique_lock<std::mutex> l(mu_);
  for (Pending& p : pending) {
    Status st = ring_status;
    for (size_t k = p.first_op; st.ok() && k < p.first_op + p.num_ops; ++k) {
      if (ops[k].result != 0) st = StatusFromIo(ops[k].result, "writing " + SegmentPath(p.slot.seg));
    }
    if (st.ok()) st = p.sync;
    Segment& s = segs_[p.slot.seg];
    --s.writers;
    auto it = map_.find(metas[p.i].key);
    if (st.ok()) {
      Entry& e = it->second;
      e.writing = false;
      e.payload_crc = p.crc;
      e.last_used = Now();
      s.keys.push_back(metas[p.i].key);
      used_bytes_ += RecordBytes(e.payload_bytes);
    } else {
      if (st.code() == StatusCode::kResourceExhausted) ++counters_.enospc;
      // The reserved space stays a hole; rebuild steps over it block by block.
      map_.erase(it);
      out[p.i] = st;
    }
  }
  cv_.notify_all();
  return out;
}

Status DiskTier::PutImpl(const ChunkMeta& meta, std::span<const std::byte> data) {
  return PutBatchImpl(std::span<const ChunkMeta>(&meta, 1), std::span<const std::span<const std::byte>>(&data, 1))[0];
}

// ---------------------------------------------------------------------------
// Get

std::vector<Status> DiskTier::GetBatchImpl(std::span<const ChunkKey> keys, std::span<const uint64_t> fingerprints,
                                           std::span<const std::span<std::byte>> dsts, bool verify_only) {
  const size_t n = keys.size();
  std::vector<Status> out(std::max({n, fingerprints.size(), dsts.size()}));
  if (fingerprints.size() != n || dsts.size() != n) {
    for (Status& s : out) s = InvalidArgument("GetBatch: keys, fingerprints and dsts differ in length");
    return out;
  }
  struct Plan {
    size_t i;
    Entry e;
    int fd;
    std::byte* hdr = nullptr;
    std::byte* tail = nullptr;  // aligned path: bounce block holding the sub-block tail
    std::byte* whole = nullptr; // unaligned path: the whole record image
    size_t first_op = 0, num_ops = 0;
  };
  std::vector<Plan> plans;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (size_t i = 0; i < n; ++i) {
      auto it = map_.find(keys[i]);
      if (it == map_.end()) {
        out[i] = NotFound("disk: chunk " + keys[i].ToHex() + " not stored");
      } else if (it->second.writing) {
        out[i] = FailedPrecondition("disk: chunk " + keys[i].ToHex() + " is still being written");
      } else if (it->second.fingerprint != fingerprints[i]) {
        out[i] = NotFound("disk: chunk " + keys[i].ToHex() + " fingerprint mismatch (hash collision)");
      } else if (it->second.payload_bytes != dsts[i].size()) {
        out[i] = InvalidArgument("disk: chunk " + keys[i].ToHex() + " holds " +
                                 std::to_string(it->second.payload_bytes) + " bytes, dst has " +
                                 std::to_string(dsts[i].size()));
      } else {
        ++segs_[it->second.seg].readers;
        if (!verify_only) it->second.last_used = Now();
        plans.push_back({i, it->second, segs_[it->second.seg].fd});
      }
    }
  }
  if (plans.empty()) return out;

  Status ring_status;
  std::vector<IoOp> ops;
  StatusOr<std::unique_ptr<RingCtx>> ctx_or = AcquireRing();
  if (!ctx_or.ok()) {
    ring_status = ctx_or.status();
  } else {
    RingCtx& ctx = **ctx_or;
    size_t bounce_bytes = 0;
    for (const Plan& p : plans) {
      bounce_bytes += IsAligned(dsts[p.i].data()) ? 2 * kBlock : RecordBytes(p.e.payload_bytes);
    }
    if (!ctx.bounce.Reserve(bounce_bytes)) {
      ring_status = ResourceExhausted("disk: out of memory for a " + std::to_string(bounce_bytes) + "-byte bounce buffer");
    } else {
      std::byte* b = ctx.bounce.data();
      for (Plan& p : plans) {
        const auto d = dsts[p.i];
        p.first_op = ops.size();
        p.hdr = b;
        if (IsAligned(d.data())) {
          const size_t body = d.size() & ~(kBlock - 1);
          const size_t tail = d.size() - body;
          p.tail = b + kBlock;
          b += 2 * kBlock;
          const int fixed = body > 0 ? ctx.ring->FixedIndexFor(d.data(), body) : -1;
          if (fixed >= 0) {
            ops.push_back(IoOp{IoOp::Kind::kRead, p.fd, p.e.offset, {{p.hdr, kBlock}}, 1});
            ops.push_back(IoOp{IoOp::Kind::kRead, p.fd, p.e.offset + kBlock, {{d.data(), body}}, 1, fixed});
            if (tail > 0) ops.push_back(IoOp{IoOp::Kind::kRead, p.fd, p.e.offset + kBlock + body, {{p.tail, kBlock}}, 1});
          } else {
            IoOp op{IoOp::Kind::kRead, p.fd, p.e.offset, {{p.hdr, kBlock}}, 1};
            if (body > 0) op.iov[op.niov++] = iovec{d.data(), body};
            if (tail > 0) op.iov[op.niov++] = iovec{p.tail, kBlock};
            ops.push_back(op);
          }
        } else {
          const size_t rec = RecordBytes(p.e.payload_bytes);
          p.whole = b;
          ops.push_back(IoOp{IoOp::Kind::kRead, p.fd, p.e.offset, {{b, rec}}, 1});
          b += rec;
        }
        p.num_ops = ops.size() - p.first_op;
        for (size_t k = p.first_op; k < ops.size(); ++k) ops[k].segment = p.e.seg;
      }
      // Each record is verified as soon as its last op completes, so its
      // CRC overlaps the reads still in flight.
      auto verify = [&](Plan& p) {
        Status st;
        for (size_t k = p.first_op; st.ok() && k < p.first_op + p.num_ops; ++k) {
          if (ops[k].result != 0) st = StatusFromIo(ops[k].result, "reading " + SegmentPath(p.e.seg));
        }
        if (!st.ok()) {
          out[p.i] = st;
          return;
        }
        const auto d = dsts[p.i];
        const auto h = disk::LoadHeader<RecordHeader>(p.hdr);
        const ChunkKey& key = keys[p.i];
        // payload_bytes is compared, never used: the map's value was checked
        // (PayloadBytesFit) when it entered the map.
        const bool header_ok = disk::RecordHeaderValid(h) && (h.flags & disk::kFlagDead) == 0 &&
                               h.segment_gen == p.e.gen && disk::KeyOf(h) == key &&
                               h.fingerprint == p.e.fingerprint && h.payload_bytes == p.e.payload_bytes &&
                               h.payload_crc == p.e.payload_crc;
        bool payload_ok = false;
        if (header_ok) {
          if (p.whole != nullptr) {
            payload_ok = disk::Crc32c(std::span<const std::byte>(p.whole + kBlock, d.size())) == h.payload_crc;
            if (payload_ok) std::memcpy(d.data(), p.whole + kBlock, d.size());
          } else {
            const size_t body = d.size() & ~(kBlock - 1);
            const size_t tail = d.size() - body;
            uint32_t crc = disk::Crc32cExtend(0, d.first(body));
            crc = disk::Crc32cExtend(crc, std::span<const std::byte>(p.tail, tail));
            payload_ok = crc == h.payload_crc;
            if (payload_ok && tail > 0) std::memcpy(d.data() + body, p.tail, tail);
          }
        }
        if (!payload_ok) {
          out[p.i] = DataLoss("disk: chunk " + key.ToHex() + " failed its " +
                              (header_ok ? "payload CRC32C" : "record header check") + " in " +
                              SegmentPath(p.e.seg) + " at offset " + std::to_string(p.e.offset));
        }
      };
      std::vector<size_t> owner(ops.size());
      std::vector<size_t> left(plans.size());
      for (size_t pi = 0; pi < plans.size(); ++pi) {
        left[pi] = plans[pi].num_ops;
        for (size_t k = 0; k < plans[pi].num_ops; ++k) owner[plans[pi].first_op + k] = pi;
      }
      ctx.ring->Run(ops, nullptr, [&](size_t op) {
        const size_t pi = owner[op];
        if (--left[pi] == 0) verify(plans[pi]);
      });
    }
    ReleaseRing(std::move(*ctx_or));
  }

  std::lock_guard<std::mutex> g(mu_);
  for (Plan& p : plans) {
    if (!ring_status.ok()) out[p.i] = ring_status;
    --segs_[p.e.seg].readers;
    if (out[p.i].code() == StatusCode::kDataLoss && !verify_only) {
      ++counters_.checksum_failures;
      auto it = map_.find(keys[p.i]);
      // Drop only the record we read; a pinned one stays (its pin holds a
      // segment we must not reclaim under the pinner) but still fails.
      if (it != map_.end() && !it->second.writing && it->second.seg == p.e.seg &&
          it->second.offset == p.e.offset && it->second.gen == p.e.gen && it->second.pins == 0) {
        EraseEntryLocked(it);
      }
    }
  }
  cv_.notify_all();
  return out;
}

Status DiskTier::GetImpl(const ChunkKey& key, uint64_t fingerprint, std::span<std::byte> dst) {
  return GetBatchImpl(std::span<const ChunkKey>(&key, 1), std::span<const uint64_t>(&fingerprint, 1),
                  std::span<const std::span<std::byte>>(&dst, 1))[0];
}

// ---------------------------------------------------------------------------
// Small operations

StatusOr<ChunkMeta> DiskTier::GetMeta(const ChunkKey& key) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.writing) return NotFound("disk: chunk " + key.ToHex() + " not stored");
  ChunkMeta m;
  m.key = key;
  m.fingerprint = it->second.fingerprint;
  m.layout_id = it->second.layout_id;
  m.num_tokens = it->second.num_tokens;
  return m;
}

StatusOr<size_t> DiskTier::SizeOfImpl(const ChunkKey& key) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.writing) return NotFound("disk: chunk " + key.ToHex() + " not stored");
  return static_cast<size_t>(it->second.payload_bytes);
}

std::optional<std::chrono::steady_clock::time_point> DiskTier::LastUsed(const ChunkKey& key) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.writing) return std::nullopt;
  return std::max(it->second.last_used, opened_at_);
}

Status DiskTier::VerifyRecord(const ChunkKey& key) {
  uint64_t fingerprint = 0, bytes = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = map_.find(key);
    if (it == map_.end() || it->second.writing) return NotFound("disk: chunk " + key.ToHex() + " not stored");
    fingerprint = it->second.fingerprint;
    bytes = it->second.payload_bytes;
  }
  std::vector<std::byte> buf(bytes);
  std::span<std::byte> dst(buf);
  return GetBatchImpl(std::span<const ChunkKey>(&key, 1), std::span<const uint64_t>(&fingerprint, 1),
                      std::span<const std::span<std::byte>>(&dst, 1), /*verify_only=*/true)[0];
}

Status DiskTier::CheckWritable() const {
  struct stat opened {}, now {};
  if (fstat(dir_fd_, &opened) != 0) return IoError("disk: fstat of " + options_.path + ": " + std::strerror(errno));
  if (stat(options_.path.c_str(), &now) != 0) {
    return IoError("disk: directory " + options_.path + " is gone (" + std::strerror(errno) +
                   "): no new segment can be created");
  }
  if (now.st_dev != opened.st_dev || now.st_ino != opened.st_ino) {
    return IoError("disk: " + options_.path + " is no longer the directory the tier opened (removed or replaced" +
                   std::string(S_ISDIR(now.st_mode) ? "" : " by a non-directory") + "): no new segment can be created");
  }
  // A probe through the tier's own descriptor: what creating a segment does.
  const char* probe = ".kvtier-write-probe";
  const int fd = openat(dir_fd_, probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    return IoError("disk: cannot create a file in " + options_.path + ": " + std::strerror(errno));
  }
  const char block[512] = {};
  const ssize_t w = write(fd, block, sizeof(block));
  const int werr = errno;
  close(fd);
  unlinkat(dir_fd_, probe, 0);
  if (w != static_cast<ssize_t>(sizeof(block))) {
    return IoError("disk: cannot write a file in " + options_.path + ": " +
                   (w < 0 ? std::strerror(werr) : std::string("short write")));
  }
  return Status::Ok();
}

Status DiskTier::PinImpl(const ChunkKey& key) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.writing) return NotFound("disk: chunk " + key.ToHex() + " not stored");
  ++it->second.pins;
  ++segs_[it->second.seg].pins;
  return Status::Ok();
}

Status DiskTier::UnpinImpl(const ChunkKey& key) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.writing) return NotFound("disk: chunk " + key.ToHex() + " not stored");
  if (it->second.pins == 0) return FailedPrecondition("disk: chunk " + key.ToHex() + " is not pinned");
  --it->second.pins;
  --segs_[it->second.seg].pins;
  return Status::Ok();
}


Status DiskTier::RemoveImpl(const ChunkKey& key) {
  Entry e;
  int fd;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = map_.find(key);
    if (it == map_.end()) return NotFound("disk: chunk " + key.ToHex() + " not stored");
    if (it->second.writing) return FailedPrecondition("disk: chunk " + key.ToHex() + " is still being written");
    if (it->second.pins > 0) return FailedPrecondition("disk: chunk " + key.ToHex() + " is pinned");
    e = it->second;
    fd = segs_[e.seg].fd;
    ++segs_[e.seg].readers;  // keeps the segment from being reused under the header rewrite
    EraseEntryLocked(it);
  }
  Status s = WriteDeadHeader(options_.io_faults.get(), e.seg, fd, e.offset, key, e.gen, e.fingerprint, e.layout_id,
                             e.num_tokens, e.payload_bytes, e.payload_crc, options_.sync != DiskSync::kNone);
  std::lock_guard<std::mutex> g(mu_);
  --segs_[e.seg].readers;
  cv_.notify_all();
  if (!s.ok()) {
    // The chunk is gone from this process; only a restart could bring it back.
    ++errors_;
    Log("Remove: " + s.ToString() + " (the chunk may reappear after a restart)");
  }
  return Status::Ok();
}

void DiskTier::ClearImpl() {
  using State = Segment::State;
  struct Dead {
    ChunkKey key;
    Entry e;
    int fd;
  };
  std::vector<uint32_t> whole;
  std::vector<Dead> dead;
  {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !rolling_; });
    rolling_ = true;  // no segment changes hands while we clear
    if (open_seg_ >= 0) {
      segs_[open_seg_].state = State::kSealed;
      open_seg_ = -1;
    }
    for (uint32_t i = 0; i < segs_.size(); ++i) {
      Segment& s = segs_[i];
      if (s.state != State::kSealed) continue;
      if (s.pins == 0 && s.writers == 0) {
        DropSegmentLocked(i, nullptr);  // not evictions: Clear is not reported
        s.state = State::kReclaiming;
        whole.push_back(i);
        continue;
      }
      std::vector<ChunkKey> keep;
      for (const ChunkKey& k : s.keys) {
        auto it = map_.find(k);
        if (it == map_.end() || it->second.writing || it->second.seg != i || it->second.gen != s.gen) continue;
        if (it->second.pins > 0) {
          keep.push_back(k);
          continue;
        }
        dead.push_back({k, it->second, s.fd});
        ++s.readers;
        EraseEntryLocked(it);
      }
      s.keys = std::move(keep);
    }
    for (uint32_t i : whole) cv_.wait(l, [&] { return segs_[i].readers == 0; });
  }
  std::vector<Status> results;
  // Empty, remembering the generation its records carry: a restart must
  // not reuse it, or those records would come back to life.
  for (uint32_t i : whole) results.push_back(WriteSegmentHeader(segs_[i].fd, i, 0, segs_[i].gen));
  for (const Dead& d : dead) {
    results.push_back(WriteDeadHeader(options_.io_faults.get(), d.e.seg, d.fd, d.e.offset, d.key, d.e.gen,
                                      d.e.fingerprint, d.e.layout_id, d.e.num_tokens, d.e.payload_bytes,
                                      d.e.payload_crc, options_.sync == DiskSync::kAlways));
  }
  if (options_.sync == DiskSync::kBatch) {
    // One fdatasync per file written (kAlways synced each write already).
    std::vector<std::pair<uint32_t, int>> files;
    for (uint32_t i : whole) files.emplace_back(i, segs_[i].fd);
    for (const Dead& d : dead) files.emplace_back(d.e.seg, d.fd);
    std::sort(files.begin(), files.end());
    files.erase(std::unique(files.begin(), files.end()), files.end());
    for (const auto& [seg, fd] : files) results.push_back(SyncFile(options_.io_faults.get(), seg, fd, SegmentPath(seg)));
  }
  std::lock_guard<std::mutex> g(mu_);
  for (uint32_t i : whole) {
    segs_[i].state = State::kFree;
    segs_[i].gen = 0;
  }
  for (const Dead& d : dead) --segs_[d.e.seg].readers;
  for (const Status& s : results) {
    if (!s.ok()) {
      ++errors_;
      Log("Clear: " + s.ToString() + " (cleared chunks may reappear after a restart)");
    }
  }
  rolling_ = false;
  cv_.notify_all();
}

void DiskTier::ForEachChunk(const std::function<void(const ChunkMeta&, size_t bytes)>& fn) const {
  std::lock_guard<std::mutex> g(mu_);
  for (const auto& [k, e] : map_) {
    if (e.writing) continue;
    ChunkMeta m;
    m.key = k;
    m.fingerprint = e.fingerprint;
    m.layout_id = e.layout_id;
    m.num_tokens = e.num_tokens;
    fn(m, static_cast<size_t>(e.payload_bytes));
  }
}

StatusOr<DiskLocation> DiskTier::LocationOf(const ChunkKey& key) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.writing) return NotFound("disk: chunk " + key.ToHex() + " not stored");
  const Entry& e = it->second;
  return DiskLocation{SegmentPath(e.seg), e.seg, e.offset, RecordBytes(e.payload_bytes), e.payload_bytes};
}

DiskTier::BatchCounters DiskTier::batch_counters() const {
  std::lock_guard<std::mutex> g(mu_);
  return counters_;
}

void DiskTier::FillStatsImpl(TierStats* s) const {
  std::lock_guard<std::mutex> g(mu_);
  s->capacity_bytes = segment_bytes_ * segs_.size();
  s->used_bytes = used_bytes_;
  uint64_t entries = 0;
  for (const auto& [k, e] : map_) entries += e.writing ? 0 : 1;
  s->entries = entries;
  s->evictions = evictions_;
  s->evicted_bytes = evicted_bytes_;
  // Batch calls bypass Tier's own counters; their errors are added here
  // (Tier::Stats adds its own to this), their puts/gets are in batch_counters().
  s->errors = errors_ + batch_errors_;
}

}  // namespace kvtier
