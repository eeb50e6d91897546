#!/usr/bin/env python3
"""Builds the kvtier wheel from files Bazel hands over. Standard library only.

    build_wheel.py --out DIR/kvtier-V-T-T-P.whl --version V \
        --package-root python --extension path/to/_kvtier<EXT_SUFFIX> FILE...

Every FILE must lie under --package-root; it is stored at its path relative
to that root (python/kvtier/config.py -> kvtier/config.py). The extension is
stored as kvtier/<its basename>. The wheel is reproducible: entries are
sorted and carry a fixed timestamp, so the same inputs give the same bytes.

The tags in the --out name must be the running interpreter's: the extension
was compiled against this Python's headers, so a mismatched tag would let pip
install a module that cannot load.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import sysconfig
import zipfile
from pathlib import Path

NAME = "kvtier"
SUMMARY = "Tiered KV-cache layer for LLM inference (CPU DRAM, NVMe, remote)"
REQUIRES_PYTHON = ">=3.11"
REQUIRES_DIST = ("pyyaml", "numpy")
# 1980-01-01, the earliest date a zip entry can carry: keeps builds reproducible.
FIXED_DATE = (1980, 1, 1, 0, 0, 0)


class WheelError(Exception):
    pass


def interpreter_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def platform_tag() -> str:
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def metadata(version: str) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {NAME}",
        f"Version: {version}",
        f"Summary: {SUMMARY}",
        f"Requires-Python: {REQUIRES_PYTHON}",
        *(f"Requires-Dist: {dep}" for dep in REQUIRES_DIST),
    ]
    return "\n".join(lines) + "\n"


def wheel_file(tag: str) -> str:
    return ("Wheel-Version: 1.0\n"
            "Generator: kvtier tools/build_wheel.py\n"
            "Root-Is-Purelib: false\n"
            f"Tag: {tag}\n")


ENTRY_POINTS = "[console_scripts]\nkvtier = kvtier.cli:main\n"


def read_version(version_file: Path) -> str:
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', version_file.read_text(), re.MULTILINE)
    if match is None:
        raise WheelError(f"no __version__ = \"...\" line in {version_file}")
    return match.group(1)


def collect(files: list[str], package_root: Path, extension: Path) -> dict[str, bytes]:
    """Maps archive path -> bytes for the package files and the extension."""
    entries: dict[str, bytes] = {}
    for name in files:
        path = Path(name)
        try:
            relative = path.relative_to(package_root)
        except ValueError:
            raise WheelError(f"{path} is not under --package-root {package_root}") from None
        if relative.parts[0] != NAME:
            raise WheelError(f"{path} is outside the {NAME} package")
        entries[relative.as_posix()] = path.read_bytes()
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not extension.name.endswith(ext_suffix):
        raise WheelError(f"extension {extension.name} does not end with this interpreter's "
                         f"suffix {ext_suffix}; rebuild with the same Python")
    entries[f"{NAME}/{extension.name}"] = extension.read_bytes()
    if f"{NAME}/__init__.py" not in entries:
        raise WheelError(f"{NAME}/__init__.py is missing from the inputs")
    return entries


def write_wheel(out: Path, version: str, entries: dict[str, bytes], tag: str) -> None:
    dist_info = f"{NAME}-{version}.dist-info"
    entries = dict(entries)
    entries[f"{dist_info}/METADATA"] = metadata(version).encode()
    entries[f"{dist_info}/WHEEL"] = wheel_file(tag).encode()
    entries[f"{dist_info}/entry_points.txt"] = ENTRY_POINTS.encode()
    entries[f"{dist_info}/top_level.txt"] = f"{NAME}\n".encode()
    record_path = f"{dist_info}/RECORD"
    record = "".join(f"{path},{record_hash(data)},{len(data)}\n"
                     for path, data in sorted(entries.items()))
    record += f"{record_path},,\n"  # RECORD cannot hash itself
    entries[record_path] = record.encode()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        # dist-info last, RECORD at the very end, as the wheel spec recommends.
        order = sorted(entries, key=lambda p: (p.startswith(dist_info), p == record_path, p))
        for path in order:
            info = zipfile.ZipInfo(path, date_time=FIXED_DATE)
            executable = path.endswith(".so")
            info.external_attr = ((0o755 if executable else 0o644) | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[path])
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the .whl to write")
    parser.add_argument("--version", required=True)
    parser.add_argument("--package-root", required=True, type=Path)
    parser.add_argument("--extension", required=True, type=Path)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    try:
        entries = collect(args.files, args.package_root, args.extension)
        source_version = read_version(args.package_root / NAME / "_version.py")
        if source_version != args.version:
            raise WheelError(f"python/BUILD.bazel says version {args.version} but "
                             f"kvtier/_version.py says {source_version}; make them agree")
        tag = f"{interpreter_tag()}-{interpreter_tag()}-{platform_tag()}"
        expected = f"{NAME}-{args.version}-{tag}.whl"
        if args.out.name != expected:
            raise WheelError(f"output {args.out.name} does not match this interpreter's "
                             f"wheel name {expected}")
        write_wheel(args.out, args.version, entries, tag)
    except (WheelError, OSError) as exc:
        print(f"build_wheel: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
