// gds_check: what GPUDirect Storage does on this machine.
//
//   gds_check [directory]     (default /var/tmp)
//
// Loads libcufile.so.0 and libcuda.so.1 at run time, opens the cuFile
// driver, writes 8 MiB from device memory to a file with cuFileWrite, reads
// it back into other device memory with cuFileRead and compares on the host.
// Prints exactly one JSON line on stdout, e.g.
//   {"tool":"gds_check","cufile_loaded":true,"driver_open":true,
//    "nvidia_fs_loaded":false,"mode":"compat",...,"roundtrip_ok":true}
// "mode" is "gds" when the nvidia-fs kernel driver is loaded (or cuFile uses
// PCI P2PDMA) and compatibility mode is not forced, "compat" when cuFile
// runs its POSIX fallback, "none" when it could not run; "io_path" says what
// the round trip actually used ("none" if cuFile refused the file). Exit status: 0
// when the check ran to a verdict (including "no GPU here"), 1 when a round
// trip returned wrong bytes. Never crashes for lack of a GPU or library.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cc/tiers/disk/cufile_loader.h"

namespace {

using kvtier::disk::CuFile;
using kvtier::disk::CuFileDescr;
using kvtier::disk::CuFileError;

// The CUDA driver API entry points used (cuda.h, CUDA 12/13 ABI).
struct Cuda {
  using CUdevice = int;
  using CUcontext = void*;
  using CUdeviceptr = unsigned long long;
  int (*init)(unsigned) = nullptr;
  int (*device_get)(CUdevice*, int) = nullptr;
  int (*device_get_name)(char*, int, CUdevice) = nullptr;
  int (*primary_ctx_retain)(CUcontext*, CUdevice) = nullptr;
  int (*ctx_set_current)(CUcontext) = nullptr;
  int (*mem_alloc)(CUdeviceptr*, size_t) = nullptr;
  int (*mem_free)(CUdeviceptr) = nullptr;
  int (*memcpy_htod)(CUdeviceptr, const void*, size_t) = nullptr;
  int (*memcpy_dtoh)(void*, CUdeviceptr, size_t) = nullptr;
  int (*memset_d8)(CUdeviceptr, unsigned char, size_t) = nullptr;
};

std::string Esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      o += ' ';
    } else {
      o += c;
    }
  }
  return o;
}

struct Report {
  std::vector<std::string> fields;
  void Str(const char* k, const std::string& v) { fields.push_back("\"" + std::string(k) + "\":\"" + Esc(v) + "\""); }
  void Bool(const char* k, bool v) { fields.push_back("\"" + std::string(k) + "\":" + (v ? "true" : "false")); }
  void Num(const char* k, double v) {
    char b[64];
    std::snprintf(b, sizeof(b), "%.6g", v);
    fields.push_back("\"" + std::string(k) + "\":" + b);
  }
  int Print(int rc) {
    std::string line = "{\"tool\":\"gds_check\"";
    for (const auto& f : fields) line += "," + f;
    line += "}";
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
    return rc;
  }
};

template <typename F>
bool Sym(void* h, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(h, name));
  return *out != nullptr;
}

// Names of the cuFile codes this check can meet (cufile.h, CUFILEOP_BASE_ERR 5000).
std::string CuFileErrName(int e) {
  switch (e) {
    case 0: return "CU_FILE_SUCCESS";
    case 5001: return "CU_FILE_DRIVER_NOT_INITIALIZED";
    case 5007: return "CU_FILE_PLATFORM_NOT_SUPPORTED";
    case 5008: return "CU_FILE_IO_NOT_SUPPORTED";
    case 5009: return "CU_FILE_DEVICE_NOT_SUPPORTED";
    case 5011: return "CU_FILE_CUDA_DRIVER_ERROR";
    case 5018: return "CU_FILE_INVALID_FILE_TYPE";
    case 5019: return "CU_FILE_INVALID_FILE_OPEN_FLAG";
    case 5020: return "CU_FILE_DIO_NOT_SET";
    case 5025: return "CU_FILE_PERMISSION_DENIED";
    case 5027: return "CU_FILE_HANDLE_NOT_REGISTERED";
    case 5030: return "CU_FILE_INTERNAL_ERROR";
    case 5034: return "CU_FILE_IO_DISABLED";
    default: return "cuFile error " + std::to_string(e);
  }
}

bool FileExists(const char* p) {
  struct stat st;
  return stat(p, &st) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/var/tmp";
  Report r;
  const bool nvfs = FileExists("/proc/driver/nvidia-fs/version");
  r.Bool("nvidia_fs_loaded", nvfs);

  auto cf = CuFile::Load();
  r.Bool("cufile_loaded", cf.ok());
  if (!cf.ok()) {
    r.Str("mode", "none");
    r.Str("error", cf.status().ToString());
    return r.Print(0);
  }
  const CuFile& f = **cf;
  r.Str("cufile_library", f.library);
  if (f.get_version != nullptr) {
    int v = 0;
    if (f.get_version(&v).err == 0) r.Num("cufile_version", v);
  }

  void* cuda_h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  r.Bool("cuda_driver_loaded", cuda_h != nullptr);
  if (cuda_h == nullptr) {
    const char* e = dlerror();
    r.Str("mode", "none");
    r.Str("error", std::string("no CUDA driver: ") + (e ? e : "dlopen libcuda.so.1 failed"));
    return r.Print(0);
  }
  Cuda cu;
  const bool syms = Sym(cuda_h, "cuInit", &cu.init) && Sym(cuda_h, "cuDeviceGet", &cu.device_get) &&
                    Sym(cuda_h, "cuDeviceGetName", &cu.device_get_name) &&
                    Sym(cuda_h, "cuDevicePrimaryCtxRetain", &cu.primary_ctx_retain) &&
                    Sym(cuda_h, "cuCtxSetCurrent", &cu.ctx_set_current) &&
                    Sym(cuda_h, "cuMemAlloc_v2", &cu.mem_alloc) && Sym(cuda_h, "cuMemFree_v2", &cu.mem_free) &&
                    Sym(cuda_h, "cuMemcpyHtoD_v2", &cu.memcpy_htod) &&
                    Sym(cuda_h, "cuMemcpyDtoH_v2", &cu.memcpy_dtoh) && Sym(cuda_h, "cuMemsetD8_v2", &cu.memset_d8);
  if (!syms) {
    r.Str("mode", "none");
    r.Str("error", "libcuda.so.1 lacks a driver API symbol");
    return r.Print(0);
  }
  int rc = cu.init(0);
  Cuda::CUdevice dev = 0;
  if (rc == 0) rc = cu.device_get(&dev, 0);
  if (rc != 0) {
    r.Str("mode", "none");
    r.Str("error", "no usable GPU: cuInit/cuDeviceGet returned " + std::to_string(rc));
    return r.Print(0);
  }
  char name[256] = {};
  cu.device_get_name(name, sizeof(name), dev);
  r.Str("gpu", name);
  Cuda::CUcontext ctx = nullptr;
  if (cu.primary_ctx_retain(&ctx, dev) != 0 || cu.ctx_set_current(ctx) != 0) {
    r.Str("mode", "none");
    r.Str("error", "cannot make a CUDA context current");
    return r.Print(0);
  }

  const CuFileError open_err = f.driver_open();
  r.Bool("driver_open", open_err.err == 0);
  if (open_err.err != 0) {
    r.Str("mode", "none");
    r.Str("error", "cuFileDriverOpen: " + CuFileErrName(open_err.err) + ", CUDA error " +
                       std::to_string(open_err.cu_err));
    return r.Print(0);
  }
  bool allow_compat = false, force_compat = false, p2pdma = false;
  if (f.get_parameter_bool != nullptr) {
    f.get_parameter_bool(kvtier::disk::kCuFileParamAllowCompatMode, &allow_compat);
    f.get_parameter_bool(kvtier::disk::kCuFileParamForceCompatMode, &force_compat);
    f.get_parameter_bool(kvtier::disk::kCuFileParamUsePciP2pDma, &p2pdma);
    r.Bool("allow_compat_mode", allow_compat);
    r.Bool("force_compat_mode", force_compat);
    r.Bool("use_pci_p2pdma", p2pdma);
  }
  const bool real = (nvfs || p2pdma) && !force_compat;
  r.Str("mode", real ? "gds" : "compat");

  // Round trip: device -> file -> other device buffer -> host compare.
  constexpr size_t kBytes = 8 << 20;
  const std::string path = dir + "/kvtier_gds_check_" + std::to_string(getpid()) + ".bin";
  r.Str("file", path);
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) {
    r.Str("error", "open " + path + ": " + std::strerror(errno));
    return r.Print(0);
  }
  CuFileDescr d{};
  d.type = kvtier::disk::kCuFileHandleTypeOpaqueFd;
  d.handle.fd = fd;
  void* fh = nullptr;
  const CuFileError reg = f.handle_register(&fh, &d);
  r.Bool("handle_registered", reg.err == 0);
  bool ok = false;
  if (reg.err != 0) {
    // Seen on VMs whose block devices lack udev properties: cuFile cannot
    // classify the file system, so even compatibility mode refuses the file
    // (its log, cufile.log in the working directory, says why).
    r.Str("io_path", "none");
    r.Str("error", "cuFileHandleRegister: " + CuFileErrName(reg.err) + " (see cufile.log)");
  } else {
    std::vector<unsigned char> host(kBytes), back(kBytes);
    for (size_t i = 0; i < kBytes; ++i) host[i] = static_cast<unsigned char>(i * 131 + 7);
    Cuda::CUdeviceptr src = 0, dst = 0;
    if (cu.mem_alloc(&src, kBytes) == 0 && cu.mem_alloc(&dst, kBytes) == 0 &&
        cu.memcpy_htod(src, host.data(), kBytes) == 0 && cu.memset_d8(dst, 0, kBytes) == 0) {
      const bool buf_reg = f.buf_register(reinterpret_cast<void*>(src), kBytes, 0).err == 0 &&
                           f.buf_register(reinterpret_cast<void*>(dst), kBytes, 0).err == 0;
      r.Bool("buffers_registered", buf_reg);
      r.Str("io_path", real ? "gpudirect" : "cufile_posix_compat");
      const ssize_t w = f.write(fh, reinterpret_cast<void*>(src), kBytes, 0, 0);
      const ssize_t rd = w == static_cast<ssize_t>(kBytes) ? f.read(fh, reinterpret_cast<void*>(dst), kBytes, 0, 0) : -1;
      r.Num("write_ret", static_cast<double>(w));
      r.Num("read_ret", static_cast<double>(rd));
      if (rd == static_cast<ssize_t>(kBytes) && cu.memcpy_dtoh(back.data(), dst, kBytes) == 0) {
        ok = std::memcmp(host.data(), back.data(), kBytes) == 0;
        r.Bool("roundtrip_ok", ok);
      } else {
        r.Bool("roundtrip_ok", false);
        r.Str("error", "cuFileWrite/cuFileRead did not move every byte");
      }
      if (buf_reg) {
        f.buf_deregister(reinterpret_cast<void*>(src));
        f.buf_deregister(reinterpret_cast<void*>(dst));
      }
    } else {
      r.Str("error", "device memory allocation or copy failed");
    }
    if (src) cu.mem_free(src);
    if (dst) cu.mem_free(dst);
    f.handle_deregister(fh);
  }
  close(fd);
  unlink(path.c_str());
  f.driver_close();
  r.Num("bytes", kBytes);
  return r.Print(reg.err == 0 && !ok ? 1 : 0);
}
