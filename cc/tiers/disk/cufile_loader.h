// CuFile: NVIDIA cuFile (GPUDirect Storage) loaded at run time with dlopen,
// so kvtier builds and runs without it. Only the handful of entry points the
// disk tier and gds_check use are declared here, with layouts taken from
// cufile.h (nvidia-cufile 1.15, CUDA 13); they have been stable since cuFile
// 1.0.
//
// Contract
// - Load() dlopens libcufile.so.0 once per process (the first call decides;
//   thread-safe, no unload). $KVTIER_CUFILE_PATH, if set, names the library
//   file to try first. kNotImplemented when the library or a required symbol
//   is missing (no CUDA driver, no GDS package): the caller falls back.
// - OpenDriver() = Load() + cuFileDriverOpen() once per process; kUnavailable
//   carrying cuFile's error code when the driver refuses.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>

#include "cc/common/status.h"

namespace kvtier::disk {

// cufile.h's CUfileError_t: {CUfileOpError err; CUresult cu_err;}, returned
// by value (two ints, so in a register on x86-64 SysV).
struct CuFileError {
  int err;     // 0 == CU_FILE_SUCCESS; 5000 + n are cuFile's own codes
  int cu_err;  // CUDA driver error when err == CU_FILE_CUDA_DRIVER_ERROR
};

// cufile.h's CUfileDescr_t.
struct CuFileDescr {
  int type;  // 1 == CU_FILE_HANDLE_TYPE_OPAQUE_FD
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;  // null for kernel file systems
};
inline constexpr int kCuFileHandleTypeOpaqueFd = 1;

// Indices of CUFileBoolConfigParameter_t used by gds_check.
inline constexpr int kCuFileParamAllowCompatMode = 1;
inline constexpr int kCuFileParamForceCompatMode = 2;
inline constexpr int kCuFileParamUsePciP2pDma = 8;

struct CuFile {
  using DriverOpenFn = CuFileError (*)();
  using DriverCloseFn = CuFileError (*)();
  using HandleRegisterFn = CuFileError (*)(void** fh, CuFileDescr* descr);
  using HandleDeregisterFn = void (*)(void* fh);
  using BufRegisterFn = CuFileError (*)(const void* base, size_t length, int flags);
  using BufDeregisterFn = CuFileError (*)(const void* base);
  using ReadFn = ssize_t (*)(void* fh, void* base, size_t size, off_t file_offset, off_t buf_offset);
  using WriteFn = ssize_t (*)(void* fh, const void* base, size_t size, off_t file_offset, off_t buf_offset);
  using GetVersionFn = CuFileError (*)(int* version);
  using GetParameterBoolFn = CuFileError (*)(int param, bool* value);

  DriverOpenFn driver_open = nullptr;
  DriverCloseFn driver_close = nullptr;
  HandleRegisterFn handle_register = nullptr;
  HandleDeregisterFn handle_deregister = nullptr;
  BufRegisterFn buf_register = nullptr;
  BufDeregisterFn buf_deregister = nullptr;
  ReadFn read = nullptr;
  WriteFn write = nullptr;
  GetVersionFn get_version = nullptr;                // optional (older releases lack it)
  GetParameterBoolFn get_parameter_bool = nullptr;   // optional
  std::string library;                               // what was loaded

  static StatusOr<const CuFile*> Load();
  static Status OpenDriver();
};

}  // namespace kvtier::disk
