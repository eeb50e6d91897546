// UcxApi: the slice of UCX's ucp API kvtier uses, loaded with dlopen on
// first use instead of linked.
//
// Why: the Python extension must import, and run with `transport: none`, on
// machines without UCX (the GPU test machines have none). Linking libucp
// would make the dynamic loader refuse the whole module there. The code is
// compiled against Debian's libucx-dev headers (types, constants, inline
// helpers) and calls every ucp/ucs function through this table.
//
// Contract
// - Load() returns the process-wide table, loading it once (thread-safe). A
//   missing library or symbol is kFailedPrecondition naming what is missing
//   and how to install it; later calls return the same error (no retry).
// - Search order for libucp: $KVTIER_UCX_LIB_DIR/libucp.so.0 when the
//   variable is set (e.g. the lib dir of PyPI's libucx wheel), then the
//   loader's default search (libucp.so.0, Debian's libucx0). libucs is
//   taken from the same directory as libucp was.
// - The ABI is UCX's stable 1.x ABI: ucp_init_version is called with the
//   header version this was compiled with (1.13), which any newer 1.x
//   accepts.
#pragma once

#include <ucp/api/ucp.h>

#include "cc/common/status.h"

namespace kvtier::transport {

struct UcxApi {
  decltype(&ucp_config_read) config_read;
  decltype(&ucp_config_release) config_release;
  decltype(&ucp_init_version) init_version;
  decltype(&ucp_cleanup) cleanup;
  decltype(&ucp_worker_create) worker_create;
  decltype(&ucp_worker_destroy) worker_destroy;
  decltype(&ucp_worker_progress) worker_progress;
  decltype(&ucp_worker_set_am_recv_handler) worker_set_am_recv_handler;
  decltype(&ucp_listener_create) listener_create;
  decltype(&ucp_listener_destroy) listener_destroy;
  decltype(&ucp_listener_query) listener_query;
  decltype(&ucp_listener_reject) listener_reject;
  decltype(&ucp_ep_create) ep_create;
  decltype(&ucp_ep_close_nbx) ep_close_nbx;
  decltype(&ucp_request_free) request_free;
  decltype(&ucp_request_check_status) request_check_status;
  decltype(&ucp_mem_map) mem_map;
  decltype(&ucp_mem_unmap) mem_unmap;
  decltype(&ucp_rkey_pack) rkey_pack;
  decltype(&ucp_rkey_buffer_release) rkey_buffer_release;
  decltype(&ucp_ep_rkey_unpack) ep_rkey_unpack;
  decltype(&ucp_rkey_destroy) rkey_destroy;
  decltype(&ucp_get_nbx) get_nbx;
  decltype(&ucp_am_send_nbx) am_send_nbx;
  decltype(&ucs_status_string) status_string;
  decltype(&ucp_get_version_string) version_string;  // of the library loaded, e.g. "1.13.1"

  static StatusOr<const UcxApi*> Load();
};

}  // namespace kvtier::transport
