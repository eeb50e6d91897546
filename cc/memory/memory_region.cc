#include "cc/memory/memory_region.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace kvtier {
namespace {

constexpr size_t kSmallPage = 4096;
constexpr size_t kHugePage = size_t{2} << 20;

size_t RoundUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

size_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return 0;
  return static_cast<size_t>(pages) * static_cast<size_t>(page);
}

// NUMA without libnuma: its static archive is not PIC (it cannot go into the
// Python extension) and the two things needed are a sysfs probe and the
// mbind system call.
constexpr int kMpolBind = 2;           // MPOL_BIND, <linux/mempolicy.h>
constexpr unsigned kMpolMfStrict = 1;  // MPOL_MF_STRICT

bool NumaNodeExists(int node) {
  struct stat st;
  const std::string path = "/sys/devices/system/node/node" + std::to_string(node);
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

Status CheckNumaNode(int node) {
  if (node < -1) return InvalidArgument("numa_node must be -1 (any) or a node id, got " + std::to_string(node));
  if (node == -1) return Status::Ok();
  if (node >= 1024 || !NumaNodeExists(node)) {
    int max_node = -1;
    while (max_node < 1023 && NumaNodeExists(max_node + 1)) ++max_node;
    return InvalidArgument("numa_node " + std::to_string(node) + " does not exist" +
                           (max_node >= 0 ? " (nodes 0.." + std::to_string(max_node) + ")"
                                          : std::string(" (NUMA is not available on this machine)")));
  }
  return Status::Ok();
}

}  // namespace

StatusOr<std::unique_ptr<MemoryRegion>> MemoryRegion::Allocate(const RegionOptions& options) {
  if (options.bytes == 0) return InvalidArgument("MemoryRegion: bytes must be > 0");
  const size_t phys = PhysicalMemoryBytes();
  if (phys != 0 && options.bytes > phys) {
    return InvalidArgument("MemoryRegion: bytes=" + std::to_string(options.bytes) +
                           " exceeds physical memory (" + std::to_string(phys) + " bytes)");
  }
  KVT_RETURN_IF_ERROR(CheckNumaNode(options.numa_node));

  void* p = MAP_FAILED;
  size_t size = 0;
  bool hugetlb = false;
  bool huge = false;
  // Pages are populated only after mbind, so MAP_POPULATE is not used when a
  // node is requested (first touch would otherwise decide placement).
  const int populate = (options.prefault && options.numa_node < 0) ? MAP_POPULATE : 0;
  if (options.huge_pages != HugePages::kOff) {
    size = RoundUp(options.bytes, kHugePage);
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | populate, -1, 0);
    if (p != MAP_FAILED) {
      hugetlb = huge = true;
    } else if (options.huge_pages == HugePages::kOn) {
      return InvalidArgument("MemoryRegion: huge_pages=on but MAP_HUGETLB failed for " + std::to_string(size) +
                             " bytes (" + std::strerror(errno) + "); reserve pages in /proc/sys/vm/nr_hugepages or use auto");
    }
  }
  if (p == MAP_FAILED) {
    // Plain mapping; 2 MiB alignment is kept when THP is wanted so that the
    // kernel can actually use huge pages for the whole range.
    size = RoundUp(options.bytes, options.huge_pages == HugePages::kAuto ? kHugePage : kSmallPage);
    p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      return ResourceExhausted("MemoryRegion: mmap of " + std::to_string(size) + " bytes failed: " + std::strerror(errno));
    }
    // THP is advisory: a failing madvise (THP disabled) leaves plain pages.
    if (options.huge_pages == HugePages::kAuto) huge = madvise(p, size, MADV_HUGEPAGE) == 0;
  }
  if (options.numa_node >= 0) {
    unsigned long mask[16] = {};  // up to 1024 nodes
    mask[options.numa_node / (8 * sizeof(unsigned long))] |= 1ul << (options.numa_node % (8 * sizeof(unsigned long)));
    if (syscall(SYS_mbind, p, size, kMpolBind, mask, sizeof(mask) * 8, kMpolMfStrict) != 0) {
      const int err = errno;
      munmap(p, size);
      return ResourceExhausted("MemoryRegion: mbind to numa_node " + std::to_string(options.numa_node) +
                               " failed: " + std::strerror(err));
    }
  }
  if (options.prefault) {
    // A write per page: MAP_POPULATE of a private mapping may map the shared
    // zero page for reads only; writing commits real frames now.
    const size_t step = hugetlb ? kHugePage : kSmallPage;
    auto* bytes = static_cast<volatile char*>(p);
    for (size_t off = 0; off < size; off += step) bytes[off] = 0;
  }
  return std::unique_ptr<MemoryRegion>(
      new MemoryRegion(static_cast<std::byte*>(p), size, huge, hugetlb, options.numa_node));
}

MemoryRegion::~MemoryRegion() { munmap(data_, size_); }

}  // namespace kvtier
