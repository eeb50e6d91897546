"""Repository rule: locate the CUDA toolkit (nvcc, headers, static cudart).
The CPU build never needs it: when no toolkit is found the repository still
exists and HAS_CUDA is False, and nothing in the default build refers to it."""

def _impl(ctx):
    root = ctx.os.environ.get("CUDA_PATH", "")
    if not root:
        nvcc = ctx.which("nvcc")
        if nvcc != None:
            # /usr/local/bin/nvcc may be a wrapper script; prefer the real toolkit.
            for cand in ["/usr/local/cuda", "/usr/local/cuda-13.0"]:
                if ctx.path(cand + "/include/cuda_runtime.h").exists:
                    root = cand
                    break
    has = bool(root) and ctx.path(root + "/include/cuda_runtime.h").exists
    if has:
        ctx.symlink(root + "/include", "include")
        libdir = root + "/lib64" if ctx.path(root + "/lib64/libcudart_static.a").exists else root + "/lib"
        ctx.symlink(libdir, "lib")
        ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "cuda_headers",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp"]),
    includes = ["include"],
)

cc_library(
    name = "cudart_static",
    srcs = ["lib/libcudart_static.a"],
    linkopts = ["-ldl", "-lpthread", "-lrt"],
    deps = [":cuda_headers"],
)
""")
    else:
        ctx.file("BUILD", "package(default_visibility = [\"//visibility:public\"])\n")
    ctx.file("defs.bzl", "HAS_CUDA = %r\nCUDA_ROOT = %r\nNVCC = %r\n" % (has, root, root + "/bin/nvcc" if has else ""))

cuda_configure = repository_rule(
    implementation = _impl,
    environ = ["CUDA_PATH", "PATH"],
    local = True,
)
