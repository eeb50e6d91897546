"""Rules for kvtier's CUDA targets.

Each macro declares its target only when the CUDA toolkit was found
(@local_cuda's HAS_CUDA) and marks it incompatible unless --config=cuda, so
the default build and wildcard patterns (//...) skip it without nvcc.
"""

load("@local_cuda//:defs.bzl", "HAS_CUDA")

def _cuda_only():
    return select({
        "//:cuda_enabled": [],
        "//conditions:default": ["//cuda:incompatible"],
    })

def cuda_cc_library(**kwargs):
    if HAS_CUDA:
        native.cc_library(target_compatible_with = _cuda_only(), **kwargs)

def cuda_cc_test(requires_gpu = True, tags = [], **kwargs):
    """A test carried to a GPU machine of another distribution: the C++
    runtime and cudart_static inside the executable (per-library shared
    objects would leave the kernels' cudart references unresolved).
    requires_gpu: tagged manual + requires-gpu (tools/device_check.sh runs it)."""
    if HAS_CUDA:
        native.cc_test(
            linkopts = ["-static-libstdc++", "-static-libgcc"],
            linkstatic = True,
            tags = tags + (["manual", "requires-gpu"] if requires_gpu else []),
            target_compatible_with = _cuda_only(),
            **kwargs
        )

def cuda_cc_benchmark(**kwargs):
    """A GPU benchmark program (google-benchmark, run by tools/device_check.sh)."""
    if HAS_CUDA:
        native.cc_binary(
            testonly = True,
            tags = ["benchmark", "manual", "requires-gpu"],
            target_compatible_with = _cuda_only(),
            **kwargs
        )
