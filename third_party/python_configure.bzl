"""Repository rule: Python headers, pybind11 headers and extension suffix of
the active interpreter, so the pybind11 module builds offline against the
Python that will import it."""

_PROBE = """
import json, sysconfig
out = {"include": sysconfig.get_paths()["include"],
       "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
       "version": sysconfig.get_python_version()}
try:
    import pybind11
    out["pybind11"] = pybind11.get_include()
except ImportError:
    out["pybind11"] = ""
print(json.dumps(out))
"""

def _find_python(ctx):
    env = ctx.os.environ.get("PYTHON_BIN_PATH", "")
    if env:
        return env
    venv = ctx.path(Label("//:WORKSPACE")).dirname.get_child(".venv").get_child("bin").get_child("python")
    if venv.exists:
        return str(venv)
    found = ctx.which("python3")
    if found == None:
        fail("python_configure: no Python found; set PYTHON_BIN_PATH")
    return str(found)

def _impl(ctx):
    python = _find_python(ctx)
    res = ctx.execute([python, "-c", _PROBE])
    if res.return_code != 0:
        fail("python_configure: %s failed: %s" % (python, res.stderr))
    info = json.decode(res.stdout.strip())
    ctx.symlink(info["include"], "python_include")
    pybind_build = ""
    if info["pybind11"]:
        ctx.symlink(info["pybind11"], "pybind11_include")
        pybind_build = """
cc_library(
    name = "pybind11",
    hdrs = glob(["pybind11_include/**/*.h"]),
    includes = ["pybind11_include"],
    deps = [":python_headers"],
)
"""
    ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "python_headers",
    hdrs = glob(["python_include/**/*.h"]),
    includes = ["python_include"],
)
""" + pybind_build)
    ctx.file("defs.bzl", "PYTHON_BIN = %r\nEXT_SUFFIX = %r\nPY_VERSION = %r\nHAS_PYBIND11 = %r\n" % (
        python,
        info["ext_suffix"],
        info["version"],
        bool(info["pybind11"]),
    ))

python_configure = repository_rule(
    implementation = _impl,
    environ = ["PYTHON_BIN_PATH"],
    local = True,
)
