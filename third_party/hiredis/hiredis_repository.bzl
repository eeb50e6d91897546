"""hiredis built from source, offline: the C sources vendored by PyPI's
`hiredis` sdist (a registry-shipped, pinned, checksummed tarball).

tools/setup.sh fetches the sdist with pip into .kvtier-cache/ (ignored by
git); this rule only checks its sha256 and unpacks vendor/hiredis/ as
@hiredis//hiredis/*.{c,h}. Nothing is downloaded at build time. Why this
source and not Debian's libhiredis-dev: see cc/tiers/remote/README.md.

Environment: KVTIER_HIREDIS_SDIST  path of the sdist (default:
<workspace>/.kvtier-cache/hiredis-<version>.tar.gz).
"""

# Pinned: change all three together (and HIREDIS_SDIST_* in tools/setup.sh).
HIREDIS_PY_VERSION = "3.5.0"  # the PyPI package; it vendors hiredis C 1.5.0
HIREDIS_SDIST_SHA256 = "c227592cc56b7df247abe4755c26723965be68972be2149fa441ac33d82131ba"

def _hiredis_repository_impl(ctx):
    name = "hiredis-%s.tar.gz" % HIREDIS_PY_VERSION
    sdist = ctx.os.environ.get("KVTIER_HIREDIS_SDIST", "")
    if not sdist:
        root = ctx.path(Label("//:WORKSPACE")).dirname
        sdist = "%s/.kvtier-cache/%s" % (root, name)
    path = ctx.path(sdist)
    if not path.exists:
        fail(("hiredis source %s is missing: run tools/setup.sh (it fetches the " +
              "pinned PyPI sdist hiredis==%s), or set KVTIER_HIREDIS_SDIST") % (sdist, HIREDIS_PY_VERSION))
    res = ctx.execute(["sha256sum", str(path)])
    if res.return_code != 0:
        fail("sha256sum %s failed: %s" % (sdist, res.stderr))
    got = res.stdout.split(" ")[0]
    if got != HIREDIS_SDIST_SHA256:
        fail("%s has sha256 %s, expected %s (pinned hiredis==%s)" % (sdist, got, HIREDIS_SDIST_SHA256, HIREDIS_PY_VERSION))
    ctx.extract(path, output = "hiredis", stripPrefix = "hiredis-%s/vendor/hiredis" % HIREDIS_PY_VERSION)
    ctx.symlink(ctx.attr.build_file, "BUILD.bazel")
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)

hiredis_repository = repository_rule(
    implementation = _hiredis_repository_impl,
    attrs = {"build_file": attr.label(allow_single_file = True, mandatory = True)},
    environ = ["KVTIER_HIREDIS_SDIST"],
    local = True,
)
