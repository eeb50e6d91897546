#include "cc/tiers/disk/cufile_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace kvtier::disk {
namespace {

StatusOr<CuFile> LoadOnce() {
  std::string errors;
  void* h = nullptr;
  std::string loaded;
  std::vector<std::string> names;
  if (const char* p = std::getenv("KVTIER_CUFILE_PATH"); p != nullptr && *p != '\0') names.emplace_back(p);
  names.emplace_back("libcufile.so.0");
  for (const std::string& n : names) {
    h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h != nullptr) {
      loaded = n;
      break;
    }
    const char* e = dlerror();
    errors += (errors.empty() ? "" : "; ") + std::string(e != nullptr ? e : n + ": unknown dlopen error");
  }
  if (h == nullptr) return NotImplemented("cuFile not loadable: " + errors);
  CuFile f;
  f.library = loaded;
  auto sym = [&](const char* name) { return dlsym(h, name); };
  f.driver_open = reinterpret_cast<CuFile::DriverOpenFn>(sym("cuFileDriverOpen"));
  // cufile.h maps cuFileDriverClose to the _v2 symbol in current releases.
  void* close_v2 = sym("cuFileDriverClose_v2");
  f.driver_close = reinterpret_cast<CuFile::DriverCloseFn>(close_v2 != nullptr ? close_v2 : sym("cuFileDriverClose"));
  f.handle_register = reinterpret_cast<CuFile::HandleRegisterFn>(sym("cuFileHandleRegister"));
  f.handle_deregister = reinterpret_cast<CuFile::HandleDeregisterFn>(sym("cuFileHandleDeregister"));
  f.buf_register = reinterpret_cast<CuFile::BufRegisterFn>(sym("cuFileBufRegister"));
  f.buf_deregister = reinterpret_cast<CuFile::BufDeregisterFn>(sym("cuFileBufDeregister"));
  f.read = reinterpret_cast<CuFile::ReadFn>(sym("cuFileRead"));
  f.write = reinterpret_cast<CuFile::WriteFn>(sym("cuFileWrite"));
  f.get_version = reinterpret_cast<CuFile::GetVersionFn>(sym("cuFileGetVersion"));
  f.get_parameter_bool = reinterpret_cast<CuFile::GetParameterBoolFn>(sym("cuFileGetParameterBool"));
  if (!f.driver_open || !f.driver_close || !f.handle_register || !f.handle_deregister || !f.buf_register ||
      !f.buf_deregister || !f.read || !f.write) {
    return NotImplemented(loaded + " lacks a required cuFile symbol");
  }
  return f;  // the handle is never closed: cuFile keeps process-wide state
}

}  // namespace

StatusOr<const CuFile*> CuFile::Load() {
  static const StatusOr<CuFile>* loaded = new StatusOr<CuFile>(LoadOnce());  // thread-safe static init
  if (!loaded->ok()) return loaded->status();
  return &loaded->value();
}

Status CuFile::OpenDriver() {
  static const Status* opened = [] {
    StatusOr<const CuFile*> f = Load();
    if (!f.ok()) return new Status(f.status());
    const CuFileError e = (*f)->driver_open();
    if (e.err != 0) {
      return new Status(Unavailable("cuFileDriverOpen failed: cuFile error " + std::to_string(e.err) +
                                    ", CUDA error " + std::to_string(e.cu_err)));
    }
    return new Status();
  }();
  return *opened;
}

}  // namespace kvtier::disk
