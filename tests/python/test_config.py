"""Tests of kvtier.config: precedence, parsing, every error path, docs sync."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kvtier
import pytest
from kvtier import Config, ConfigError, load_config
from kvtier.config import format_size, load_config_with_sources, parse_size

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIB = 1 << 20


def write_yaml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "kvtier.yaml"
    path.write_text(text)
    return {"KVTIER_CONFIG": str(path)}


# ---------------------------------------------------------------- defaults


def test_defaults_match_documented_values() -> None:
    config = load_config(environ={})
    assert config.chunk_size == 256
    assert config.partial_chunks == "keep"
    assert config.cpu_capacity == 4 * GIB
    assert config.cpu_capacity_clamp is False
    assert config.cpu_high_watermark == 0.90
    assert config.cpu_low_watermark == 0.80
    assert config.eviction_policy == "s3fifo"
    assert config.ttl_seconds == 0
    assert config.index_capacity == 0
    assert config.huge_pages == "auto"
    assert config.numa_node == -1
    assert config.disk_path == os.path.expanduser("~/.cache/kvtier/disk")
    assert config.disk_enabled
    assert config.disk_capacity == 16 * GIB
    assert config.disk_segment_size == 0
    assert config.disk_queue_depth == 64
    assert config.gds == "auto"
    assert config.write_behind is True
    assert config.write_behind_queue == 1024
    assert config.io_threads == 2
    assert config.copy_threads == 0
    assert config.namespace == ""
    assert config.log_level == "info"


def test_config_is_frozen() -> None:
    config = load_config(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.chunk_size = 512  # type: ignore[misc]


def test_package_exports() -> None:
    assert kvtier.__version__ == "0.1.0"
    assert kvtier.Config is Config and kvtier.load_config is load_config
    assert issubclass(kvtier.ConfigError, ValueError)
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = kvtier.no_such_thing  # type: ignore[attr-defined]


# -------------------------------------------------------------- precedence


def test_precedence_default_file_env_override(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "chunk_size: 512\nio_threads: 4\ncopy_threads: 3\n")
    env |= {"KVTIER_IO_THREADS": "8", "KVTIER_COPY_THREADS": "5"}
    config, sources = load_config_with_sources({"copy_threads": 7}, environ=env)
    assert (config.chunk_size, config.io_threads, config.copy_threads) == (512, 8, 7)
    assert config.numa_node == -1
    assert sources["chunk_size"] == f"file {tmp_path / 'kvtier.yaml'}"
    assert sources["io_threads"] == "env KVTIER_IO_THREADS"
    assert sources["copy_threads"] == "override"
    assert sources["numa_node"] == "default"


def test_uses_os_environ_when_environ_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_CHUNK_SIZE", "1024")
    assert load_config().chunk_size == 1024


def test_empty_kvtier_config_means_no_file() -> None:
    assert load_config(environ={"KVTIER_CONFIG": ""}) == load_config(environ={})


def test_empty_yaml_file_sets_nothing(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "# only a comment\n")
    assert load_config(environ=env) == load_config(environ={})


def test_unrelated_kvtier_variables_are_ignored() -> None:
    # Tool variables share the prefix; only near misses of keys are errors.
    env = {"KVTIER_WHEEL": "/x.whl", "KVTIER_CUDA": "off", "KVTIER_BENCH_COMPARE": "1"}
    assert load_config(environ=env) == load_config(environ={})


# ------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GB", 20 * 10**9),
        ("512MiB", 512 * MIB),
        ("1.5 GiB", 3 * GIB // 2),
        ("1.5GiB", 3 * GIB // 2),
        ("4gib", 4 * GIB),
        ("100kB", 100_000),
        ("2KiB", 2048),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("123", 123),
        ("7B", 7),
        (" 64 MiB ", 64 * MIB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "1.5", "1.5 B", "-1GB", "12 parsecs", "1e9",
                                 "20 G", True, None, [1], float("inf"), -5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        parse_size(bad)


def test_format_size_round_trips() -> None:
    for n in (0, 1, 1000, 1024, 20 * 10**9, 4 * GIB, 1536 * MIB, 123457):
        assert parse_size(format_size(n)) == n
    assert format_size(4 * GIB) == "4GiB"
    assert format_size(20 * 10**9) == "20GB"


def test_sizes_from_every_layer(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "cpu_capacity: 20GB\ndisk_capacity: 100GiB\n")
    env["KVTIER_DISK_SEGMENT_SIZE"] = "256MiB"
    config = load_config({"cpu_capacity": "1.5 GiB"}, environ=env)
    assert config.cpu_capacity == 3 * GIB // 2
    assert config.disk_capacity == 100 * GIB
    assert config.disk_segment_size == 256 * MIB


# ------------------------------------------------------------ value parsing


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "On"])
def test_bool_true_spellings(text: str) -> None:
    assert load_config(environ={"KVTIER_WRITE_BEHIND": text}).write_behind is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "OFF"])
def test_bool_false_spellings(text: str) -> None:
    assert load_config(environ={"KVTIER_WRITE_BEHIND": text}).write_behind is False


def test_yaml_types(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "write_behind: off\nttl_seconds: 30\n"
                               "eviction_policy: LRU\nnamespace: team-a\n")
    config = load_config(environ=env)
    assert config.write_behind is False
    assert config.ttl_seconds == 30.0 and isinstance(config.ttl_seconds, float)
    assert config.eviction_policy == "lru"
    assert config.namespace == "team-a"


def test_disk_path_expanded_and_disabled(tmp_path: Path) -> None:
    home = os.path.expanduser("~")
    assert load_config({"disk_path": "~/kv"}, environ={}).disk_path == os.path.join(home, "kv")
    for off in ("", "none", "None"):
        config = load_config({"disk_path": off}, environ={})
        assert config.disk_path == "" and not config.disk_enabled
    relative = load_config({"disk_path": "rel/dir"}, environ={}).disk_path
    assert os.path.isabs(relative)


def test_boundaries_accepted() -> None:
    config = load_config(
        {"chunk_size": 16, "cpu_capacity": "16MiB", "cpu_high_watermark": 1.0,
         "cpu_low_watermark": 0.01, "index_capacity": 2**30, "disk_capacity": "64MiB",
         "disk_queue_depth": 4096, "write_behind_queue": 1_000_000, "io_threads": 64,
         "copy_threads": 256, "numa_node": 0, "disk_segment_size": "64MiB"},
        environ={})
    assert config.chunk_size == 16 and config.index_capacity == 2**30
    upper = load_config({"chunk_size": 65536, "index_capacity": 1024}, environ={})
    assert (upper.chunk_size, upper.index_capacity) == (65536, 1024)


def test_to_native_is_plain_scalars(tmp_path: Path) -> None:
    native = load_config({"cpu_capacity": "1GiB", "disk_path": "none"}, environ={}).to_native()
    # cpu_capacity_clamp is applied while loading, in Python,
    # remote_password_file is read into remote_password, and the controller
    # (kvtier.controller) is Python: not engine options.
    assert set(native) == {f.name for f in dataclasses.fields(Config)} - {
        "cpu_capacity_clamp", "remote_password_file", "controller_listen", "controller_token", "controller_token_file",
        "transport", "transport_listen", "transport_timeout_ms", "producer_pin_seconds"}  # kvtier.Engine starts the transport
    assert native["cpu_capacity"] == GIB and native["disk_path"] == ""
    for value in native.values():
        assert type(value) in (int, float, str, bool)
    json.dumps(native)  # a binding or a log line can take it as is


def test_describe_lists_every_key_and_source(tmp_path: Path) -> None:
    config, sources = load_config_with_sources({"chunk_size": 128},
                                               environ={"KVTIER_GDS": "off"})
    text = config.describe(sources)
    for f in dataclasses.fields(Config):
        assert re.search(rf"^{f.name}\s+= ", text, re.MULTILINE), f.name
    assert re.search(r"^chunk_size\s+= 128\s+# override$", text, re.MULTILINE)
    assert re.search(r"^gds\s+= off\s+# env KVTIER_GDS$", text, re.MULTILINE)
    assert re.search(r"^cpu_capacity\s+= 4GiB\s+# default$", text, re.MULTILINE)


# ------------------------------------------------------------------ errors


def test_unknown_override_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"'chunk_sise'.*did you mean 'chunk_size'"):
        load_config({"chunk_sise": 128}, environ={})


def test_unknown_file_key_suggests_closest(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "evicton_policy: lru\n")
    with pytest.raises(ConfigError, match=r"'evicton_policy'.*kvtier.yaml.*'eviction_policy'"):
        load_config(environ=env)


def test_unknown_key_without_close_match_lists_keys() -> None:
    with pytest.raises(ConfigError, match=r"'zzz'.*Known keys: chunk_size") as info:
        load_config({"zzz": 1}, environ={})
    assert "did you mean" not in str(info.value)


def test_env_typo_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"KVTIER_CPU_CAPACTY.*KVTIER_CPU_CAPACITY"):
        load_config(environ={"KVTIER_CPU_CAPACTY": "1GiB"})


def test_thread_affinity_env_is_checked() -> None:
    """KVTIER_THREAD_AFFINITY is read by the C++ core, not a config key; a
    value it does not know is an error here, not a silent default."""
    for ok in ("process", "inherit", ""):
        load_config(environ={"KVTIER_THREAD_AFFINITY": ok})
    with pytest.raises(ConfigError, match=r"KVTIER_THREAD_AFFINITY='inherrit'.*'process'.*'inherit'"):
        load_config(environ={"KVTIER_THREAD_AFFINITY": "inherrit"})


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("chunk_size", 8, r"\[16, 65536\]"),
        ("chunk_size", 65537, r"\[16, 65536\]"),
        ("chunk_size", "big", r"\[16, 65536\]"),
        ("chunk_size", True, r"\[16, 65536\]"),
        ("chunk_size", 12.5, r"\[16, 65536\]"),
        ("partial_chunks", "maybe", "'keep', 'drop'"),
        ("cpu_capacity", "1MiB", r"\[16MiB, 1024TiB\]"),
        ("cpu_capacity", "lots", r"\[16MiB, 1024TiB\]"),
        ("cpu_capacity", "99999999TB", r"\[16MiB, 1024TiB\]"),
        ("cpu_capacity_clamp", "maybe", "true/false"),
        ("cpu_high_watermark", 0, r"\(0, 1\]"),
        ("cpu_high_watermark", 1.5, r"\(0, 1\]"),
        ("cpu_high_watermark", "nan", r"\(0, 1\]"),
        ("cpu_low_watermark", 0, "cpu_high_watermark"),
        ("eviction_policy", "fifo", "'s3fifo', 'lru'"),
        ("ttl_seconds", -1, ">= 0"),
        ("index_capacity", 100, r"\[1024, 1073741824\]"),
        ("index_capacity", 2**30 + 1, r"\[1024, 1073741824\]"),
        ("index_capacity", 2**31, r"\[1024, 1073741824\]"),
        ("huge_pages", "yes", "'auto', 'on', 'off'"),
        ("numa_node", -2, r"\[0, 1023\]"),
        ("disk_path", 5, "directory path"),
        ("disk_capacity", "32MiB", r"\[64MiB, 100000GiB\]"),
        ("disk_capacity", "100001GiB", r"\[64MiB, 100000GiB\]"),
        ("disk_segment_size", "1000", "multiple of 4KiB"),
        ("disk_segment_size", "2GiB", r"\[1MiB, 1GiB\]"),
        ("disk_queue_depth", 0, r"\[1, 4096\]"),
        ("gds", "always", "'auto', 'on', 'off'"),
        ("write_behind", "perhaps", "true/false"),
        ("write_behind", 2, "true/false"),
        ("write_behind_queue", 0, r"\[1, 1000000\]"),
        ("io_threads", 65, r"\[1, 64\]"),
        ("copy_threads", -1, r"\[1, 256\]"),
        ("namespace", 7, "a string"),
        ("log_level", "verbose", "'debug', 'info', 'warning', 'error'"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({key: value}, environ={})
    message = str(info.value)
    assert f"'{key}'" in message
    assert repr(value) in message
    assert "override" in message
    assert re.search(allowed, message), message


def test_bad_env_value_names_variable_source() -> None:
    with pytest.raises(ConfigError, match=r"'io_threads' \(from env KVTIER_IO_THREADS\): 'x'"):
        load_config(environ={"KVTIER_IO_THREADS": "x"})


def test_low_watermark_must_be_below_high() -> None:
    with pytest.raises(ConfigError, match=r"cpu_low_watermark.*must be below cpu_high_watermark"):
        load_config({"cpu_high_watermark": 0.5}, environ={})  # default low is 0.80
    config = load_config({"cpu_high_watermark": 0.5, "cpu_low_watermark": 0.4}, environ={})
    assert (config.cpu_low_watermark, config.cpu_high_watermark) == (0.4, 0.5)


def test_segment_larger_than_disk_rejected_only_with_disk() -> None:
    with pytest.raises(ConfigError, match=r"disk_segment_size.*exceeds disk_capacity"):
        load_config({"disk_capacity": "64MiB", "disk_segment_size": "128MiB"}, environ={})
    load_config({"disk_capacity": "64MiB", "disk_segment_size": "128MiB", "disk_path": "none"},
                environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"not found: KVTIER_CONFIG={re.escape(str(missing))}"):
        load_config(environ={"KVTIER_CONFIG": str(missing)})


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(environ={"KVTIER_CONFIG": str(tmp_path)})


def test_malformed_yaml_reports_position(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "chunk_size: 256\nio_threads: [1, 2\n")
    with pytest.raises(ConfigError, match=r"(?s)malformed YAML.*kvtier.yaml.*line \d+") as info:
        load_config(environ=env)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["- chunk_size\n- 256\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    env = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(environ=env)


def test_nested_value_is_bad_value(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "io_threads:\n  a: 1\n")
    with pytest.raises(ConfigError, match=r"'io_threads'.*allowed"):
        load_config(environ=env)


def test_non_string_yaml_key(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "1: 2\n")
    with pytest.raises(ConfigError, match="unknown configuration key '1'"):
        load_config(environ=env)


# ------------------------------------------------------------------- docs


def test_every_key_is_documented() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(Config):
        assert f"`{f.name}`" in doc, f"{f.name} missing from docs/configuration.md"
        assert f"KVTIER_{f.name.upper()}" in doc, f"KVTIER_{f.name.upper()} not documented"


def test_documented_example_yaml_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The example describes a node with 64 GiB to spare, not this machine.
    monkeypatch.setattr("kvtier.config._memory_limit", lambda: None)
    doc = (REPO / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)
    assert blocks, "docs/configuration.md has no yaml example"
    for block in blocks:
        load_config(environ=write_yaml(tmp_path, block))


# -------------------------------------------------------------------- CLI


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True,
                          text=True, env=clean | (env or {}), timeout=60, check=False)


def test_cli_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kvtier {kvtier.__version__}"


def test_cli_config_shows_sources(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "chunk_size: 512\n") | {"KVTIER_GDS": "off"}
    result = run_cli("config", env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^chunk_size\s+= 512\s+# file .*kvtier.yaml$", result.stdout, re.MULTILINE)
    assert re.search(r"^gds\s+= off\s+# env KVTIER_GDS$", result.stdout, re.MULTILINE)
    assert re.search(r"^io_threads\s+= 2\s+# default$", result.stdout, re.MULTILINE)


def test_cli_config_json(tmp_path: Path) -> None:
    result = run_cli("config", "--json", env={"KVTIER_CPU_CAPACITY": "1GiB", "KVTIER_CPU_CAPACITY_CLAMP": "true"})
    data = json.loads(result.stdout)
    assert data["cpu_capacity"] == {"value": GIB, "source": "env KVTIER_CPU_CAPACITY"}
    # Python-only keys are listed too, not only what the engine takes.
    assert data["cpu_capacity_clamp"] == {"value": True, "source": "env KVTIER_CPU_CAPACITY_CLAMP"}


def test_cli_config_error_exit_code() -> None:
    result = run_cli("config", env={"KVTIER_IO_THREADS": "0"})
    assert result.returncode == 2
    assert "io_threads" in result.stderr and "[1, 64]" in result.stderr


def test_cli_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("cpu_capacity: 1GiB\n")  # checked against this machine's memory
    ok = run_cli("config", "--check", str(good), env={"KVTIER_IO_THREADS": "0"})
    assert ok.returncode == 0, ok.stderr  # the environment does not leak into --check
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("cpu_capasity: 8GiB\n")
    result = run_cli("config", "--check", str(bad))
    assert result.returncode == 2
    assert "cpu_capasity" in result.stderr and "cpu_capacity" in result.stderr
    missing = run_cli("config", "--check", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_cli_bench_dispatch(tmp_path: Path) -> None:
    try:
        import kvtier.bench.cli  # noqa: F401
    except ModuleNotFoundError:
        result = run_cli("bench", "--anything")
        assert result.returncode == 2
        assert "kvtier.bench.cli not found" in result.stderr
    else:
        result = run_cli("bench", "--help")
        assert "not available" not in result.stderr


def test_cli_requires_command() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: kvtier" in result.stderr


def test_cli_gpu_recompute_without_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tools/device_check.sh runs this benchmark")
    for bench in ("gpu-recompute", "gpu-layerwise"):
        result = run_cli("bench", bench, "--tokens", "256")
        assert result.returncode == 2, (bench, result.stderr)
        assert "needs a CUDA GPU" in result.stderr, (bench, result.stderr)


def test_index_capacity_limit_is_the_native_index_limit() -> None:
    # One source of truth: the C++ ChunkIndex::kMaxCapacity, through the
    # extension. Every value the configuration accepts must start an engine.
    from kvtier import _kvtier

    top = _kvtier.index_capacity_max()
    assert top == 2**30
    assert load_config({"index_capacity": top}, environ={}).index_capacity == top
    with pytest.raises(ConfigError, match="index_capacity"):
        load_config({"index_capacity": top + 1}, environ={})
    # ... and the engine itself refuses the first value above it.
    native = load_config({"disk_path": "none"}, environ={}).to_native()
    native["index_capacity"] = top + 1
    with pytest.raises(_kvtier.InvalidArgumentError, match="capacity must be in"):
        _kvtier.Engine(native)
