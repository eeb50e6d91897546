"""Checks the built kvtier wheel: metadata, RECORD, and a clean install.

Builds nothing. The wheel is $KVTIER_WHEEL (tools/test.sh sets it), else the
newest bazel-bin/python/kvtier-*.whl; without either the tests are skipped.
The install goes into a new, plain venv (no system site-packages) with
``--no-deps --no-index``, so only what needs no third-party package is
imported there: the package, its native module and the console script.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
PLATFORM_TAG = sysconfig.get_platform().replace("-", "_").replace(".", "_")
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def find_wheel() -> Path | None:
    explicit = os.environ.get("KVTIER_WHEEL")
    if explicit:
        path = Path(explicit)
        assert path.is_file(), f"KVTIER_WHEEL={explicit} does not exist"
        return path
    found = sorted((REPO / "bazel-bin" / "python").glob("kvtier-*.whl"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


@pytest.fixture(scope="module")
def wheel() -> Path:
    path = find_wheel()
    if path is None:
        pytest.skip("no wheel: set KVTIER_WHEEL or bazel build //python:wheel")
    return path


@pytest.fixture(scope="module")
def archive(wheel: Path) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(wheel) as zf:
        yield zf


def dist_info(wheel: Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{name}-{version}.dist-info"


def headers(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            break  # a blank line starts the description body
        key, _, value = line.partition(": ")
        pairs.append((key, value))
    return pairs


def test_file_name_tags_match_interpreter(wheel: Path) -> None:
    import kvtier

    assert wheel.name == f"kvtier-{kvtier.__version__}-{PY_TAG}-{PY_TAG}-{PLATFORM_TAG}.whl"


def test_metadata(wheel: Path, archive: zipfile.ZipFile) -> None:
    import kvtier

    fields = headers(archive.read(f"{dist_info(wheel)}/METADATA").decode())
    values = dict(fields)
    assert values["Metadata-Version"] == "2.1"
    assert values["Name"] == "kvtier"
    assert values["Version"] == kvtier.__version__
    assert values["Summary"]
    assert values["Requires-Python"] == ">=3.11"
    assert sorted(v for k, v in fields if k == "Requires-Dist") == ["numpy", "pyyaml"]


def test_wheel_file(wheel: Path, archive: zipfile.ZipFile) -> None:
    values = dict(headers(archive.read(f"{dist_info(wheel)}/WHEEL").decode()))
    assert values["Wheel-Version"] == "1.0"
    assert values["Root-Is-Purelib"] == "false"  # it carries a native module
    assert values["Tag"] == f"{PY_TAG}-{PY_TAG}-{PLATFORM_TAG}"


def test_entry_point(wheel: Path, archive: zipfile.ZipFile) -> None:
    text = archive.read(f"{dist_info(wheel)}/entry_points.txt").decode()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines == ["[console_scripts]", "kvtier = kvtier.cli:main"]


def test_record_covers_every_file_with_correct_digest(wheel: Path,
                                                      archive: zipfile.ZipFile) -> None:
    record_name = f"{dist_info(wheel)}/RECORD"
    rows = list(csv.reader(io.StringIO(archive.read(record_name).decode())))
    listed = {row[0]: row for row in rows}
    assert len(listed) == len(rows), "RECORD lists a file twice"
    assert set(listed) == set(archive.namelist())
    assert listed[record_name][1:] == ["", ""]
    for name, (_, digest, size) in listed.items():
        if name == record_name:
            continue
        data = archive.read(name)
        algorithm, _, encoded = digest.partition("=")
        assert algorithm == "sha256", name
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        assert encoded == expected.decode(), f"digest mismatch for {name}"
        assert int(size) == len(data), f"size mismatch for {name}"


def test_contents(archive: zipfile.ZipFile) -> None:
    names = set(archive.namelist())
    assert f"kvtier/_kvtier{EXT_SUFFIX}" in names
    assert {"kvtier/__init__.py", "kvtier/config.py", "kvtier/cli.py", "kvtier/py.typed"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    source = REPO / "python" / "kvtier"
    if source.is_dir():
        expected = {
            "kvtier/" + p.relative_to(source).as_posix()
            for p in source.rglob("*")
            if p.is_file() and (p.suffix in (".py", ".pyi") or p.name == "py.typed")
            and "__pycache__" not in p.parts
        }
        assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


# ------------------------------------------------------------ clean install


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=180, env=clean_env(venv))
    return venv


def clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVTIER_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["PYTHONPATH"] = ""
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_in(venv: Path, *cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=clean_env(venv), check=False)


def test_installed_package_and_extension_import(fresh_venv: Path, tmp_path: Path) -> None:
    probe = ("import kvtier, kvtier._kvtier, sys; "
             "print(kvtier.__file__); print(kvtier._kvtier.__file__); "
             "print(kvtier.__version__); print('yaml' in sys.modules)")
    result = run_in(fresh_venv, str(fresh_venv / "bin" / "python"), "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package, extension, version, yaml_loaded = result.stdout.split()
    assert Path(package).resolve().is_relative_to(fresh_venv.resolve())
    assert Path(extension).name == f"_kvtier{EXT_SUFFIX}"
    assert Path(extension).resolve().is_relative_to(fresh_venv.resolve())
    assert version == "0.1.0"
    assert yaml_loaded == "False"  # import kvtier must not need PyYAML


def test_console_script_version(fresh_venv: Path, tmp_path: Path) -> None:
    script = fresh_venv / "bin" / "kvtier"
    assert script.is_file()
    result = run_in(fresh_venv, str(script), "version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kvtier 0.1.0"


def test_console_script_config_without_deps(fresh_venv: Path, tmp_path: Path) -> None:
    script = str(fresh_venv / "bin" / "kvtier")
    shown = run_in(fresh_venv, script, "config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "chunk_size" in shown.stdout and "# default" in shown.stdout
    # Reading a YAML file needs PyYAML, which --no-deps left out: a clear error.
    config_file = tmp_path / "kvtier.yaml"
    config_file.write_text("chunk_size: 512\n")
    checked = run_in(fresh_venv, script, "config", "--check", str(config_file), cwd=tmp_path)
    assert checked.returncode == 2
    assert "PyYAML" in checked.stderr
