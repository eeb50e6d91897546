// FUZZ_CHECK: the invariant check of a fuzz target. A violated invariant is
// a finding, exactly like a sanitizer report: print it and abort, so
// libFuzzer saves the input as a crash-* reproducer and the replay test
// (replay_main.cc) fails on it. Kept independent of NDEBUG: fuzz builds and
// the opt builds of the corpus tests must check the same things.
#pragma once

#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(cond, ...)                                                  \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, \
                   #cond);                                                     \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
      std::abort();                                                            \
    }                                                                          \
  } while (0)
