// Abort-on-failure checks for kvtier's GPU benchmarks (test-only: library
// code returns Status instead). Print the failed expression and the error.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define KVT_CHECK_CUDA(x)                                               \
  do {                                                                  \
    const cudaError_t kvt_e_ = (x);                                     \
    if (kvt_e_ != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(kvt_e_)); \
      std::abort();                                                     \
    }                                                                   \
  } while (0)

// For a StatusOr expression.
#define KVT_CHECK_OK(x)                                                         \
  do {                                                                          \
    auto&& kvt_r_ = (x);                                                        \
    if (!kvt_r_.ok()) {                                                         \
      std::fprintf(stderr, "%s: %s\n", #x, kvt_r_.status().ToString().c_str()); \
      std::abort();                                                             \
    }                                                                           \
  } while (0)
