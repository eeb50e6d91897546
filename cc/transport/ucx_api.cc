#include "cc/transport/ucx_api.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace kvtier::transport {
namespace {

constexpr char kInstallHint[] =
    "UCX not found: install libucx0 (Debian: apt-get install libucx0), or point KVTIER_UCX_LIB_DIR at a "
    "directory holding libucp.so.0 (e.g. PyPI's libucx wheel), or set transport: none";

struct Loaded {
  UcxApi api{};
  Status status;
};

template <typename F>
bool Resolve(void* lib, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (*out == nullptr && missing->empty()) *missing = name;
  return *out != nullptr;
}

Loaded LoadOnce() {
  Loaded l;
  std::string dir;
  if (const char* d = std::getenv("KVTIER_UCX_LIB_DIR"); d != nullptr && *d != '\0') dir = std::string(d) + "/";
  // RTLD_GLOBAL: libucp's transport modules (libuct_*.so, loaded by UCX
  // itself) resolve symbols of libucs/libuct from the global scope.
  void* ucs = dlopen((dir + "libucs.so.0").c_str(), RTLD_NOW | RTLD_GLOBAL);
  void* ucp = ucs != nullptr ? dlopen((dir + "libucp.so.0").c_str(), RTLD_NOW | RTLD_GLOBAL) : nullptr;
  if (ucp == nullptr) {
    const char* err = dlerror();
    l.status = FailedPrecondition(std::string(kInstallHint) + " (dlopen: " + (err ? err : "unknown") + ")");
    return l;
  }
  std::string missing;
  UcxApi& a = l.api;
  Resolve(ucp, "ucp_config_read", &a.config_read, &missing);
  Resolve(ucp, "ucp_config_release", &a.config_release, &missing);
  Resolve(ucp, "ucp_init_version", &a.init_version, &missing);
  Resolve(ucp, "ucp_cleanup", &a.cleanup, &missing);
  Resolve(ucp, "ucp_worker_create", &a.worker_create, &missing);
  Resolve(ucp, "ucp_worker_destroy", &a.worker_destroy, &missing);
  Resolve(ucp, "ucp_worker_progress", &a.worker_progress, &missing);
  Resolve(ucp, "ucp_worker_set_am_recv_handler", &a.worker_set_am_recv_handler, &missing);
  Resolve(ucp, "ucp_listener_create", &a.listener_create, &missing);
  Resolve(ucp, "ucp_listener_destroy", &a.listener_destroy, &missing);
  Resolve(ucp, "ucp_listener_query", &a.listener_query, &missing);
  Resolve(ucp, "ucp_listener_reject", &a.listener_reject, &missing);
  Resolve(ucp, "ucp_ep_create", &a.ep_create, &missing);
  Resolve(ucp, "ucp_ep_close_nbx", &a.ep_close_nbx, &missing);
  Resolve(ucp, "ucp_request_free", &a.request_free, &missing);
  Resolve(ucp, "ucp_request_check_status", &a.request_check_status, &missing);
  Resolve(ucp, "ucp_mem_map", &a.mem_map, &missing);
  Resolve(ucp, "ucp_mem_unmap", &a.mem_unmap, &missing);
  Resolve(ucp, "ucp_rkey_pack", &a.rkey_pack, &missing);
  Resolve(ucp, "ucp_rkey_buffer_release", &a.rkey_buffer_release, &missing);
  Resolve(ucp, "ucp_ep_rkey_unpack", &a.ep_rkey_unpack, &missing);
  Resolve(ucp, "ucp_rkey_destroy", &a.rkey_destroy, &missing);
  Resolve(ucp, "ucp_get_nbx", &a.get_nbx, &missing);
  Resolve(ucp, "ucp_am_send_nbx", &a.am_send_nbx, &missing);
  Resolve(ucs, "ucs_status_string", &a.status_string, &missing);
  Resolve(ucp, "ucp_get_version_string", &a.version_string, &missing);
  if (!missing.empty()) {
    l.status = FailedPrecondition("UCX too old or incomplete: libucp has no " + missing +
                                  " (kvtier needs UCX >= 1.13)");
  }
  // The libraries stay loaded for the life of the process: UCX registers
  // atexit handlers and memory hooks that must not outlive its code.
  return l;
}

}  // namespace

StatusOr<const UcxApi*> UcxApi::Load() {
  static const Loaded* loaded = new Loaded(LoadOnce());
  if (!loaded->status.ok()) return loaded->status;
  return &loaded->api;
}

}  // namespace kvtier::transport
