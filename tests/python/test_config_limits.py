"""Sizes checked against their ranges and against what exists (issue 13).

``cpu_capacity: 99999999TB`` passed validation and failed inside the engine
with "has the wrong type"; ``cpu_capacity: 1TB`` on a 23 GiB machine started
without a word. Now every size has a range that the error names, the CPU
tier is refused above the memory this process may use (physical memory or
the cgroup's limit), or clamped with a warning when cpu_capacity_clamp is
set. The memory probe is replaced where a test needs a given limit, and its
cgroup parsing runs over fake /proc and /sys trees.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from kvtier import ConfigError, _kvtier, load_config
from kvtier.config import _cgroup_memory_limit, load_config_with_sources

GIB = 1 << 30
MIB = 1 << 20


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture
def limit_8gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtier.config._memory_limit",
                        lambda: (8 * GIB, "the cgroup memory limit (/fake/memory.max)"))


# ------------------------------------------------------------------ ranges


def test_absurd_cpu_capacity_is_a_config_error_not_an_engine_type_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"cpu_capacity": "99999999TB", "disk_path": "none"}, environ={})
    message = str(info.value)
    assert "'cpu_capacity'" in message and "'99999999TB'" in message
    assert "out of range" in message and "[16MiB, 1024TiB]" in message


def test_every_size_key_names_its_range_at_both_ends() -> None:
    cases = {
        "cpu_capacity": ("16MiB", "1024TiB", 16 * MIB - 1, 2**50 + 1),
        "disk_capacity": ("64MiB", "100000GiB", 64 * MIB - 1, 100000 * GIB + 1),
        "disk_segment_size": ("1MiB", "1GiB", MIB - 4096, GIB + 4096),
    }
    for key, (lo, hi, below, above) in cases.items():
        for value in (below, above):
            with pytest.raises(ConfigError) as info:
                load_config({key: value, "disk_capacity": "100000GiB"} if key == "disk_segment_size"
                            else {key: value}, environ={})
            assert f"'{key}'" in str(info.value) and f"[{lo}, {hi}]" in str(info.value), str(info.value)


def test_disk_capacity_beyond_100000_explicit_segments_names_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"'disk_capacity'.*100000 segments of disk_segment_size = 1MiB"):
        load_config({"disk_capacity": "100GiB", "disk_segment_size": "1MiB"}, environ={})
    config = load_config({"disk_capacity": "100000MiB", "disk_segment_size": "1MiB"}, environ={})
    assert config.disk_capacity == 100000 * MIB
    # Auto segments grow with the capacity instead (cc/tiers/disk).
    assert load_config({"disk_capacity": "100000GiB"}, environ={}).disk_capacity == 100000 * GIB


def test_largest_accepted_cpu_capacity_reaches_the_engine_as_a_number(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound exists so that the engine's size_t always holds the value
    # (checked where no memory limit is known).
    monkeypatch.setattr("kvtier.config._memory_limit", lambda: None)
    native = load_config({"cpu_capacity": 2**50, "disk_path": "none"}, environ={}).to_native()
    assert native["cpu_capacity"] == 2**50 < 2**64


# ------------------------------------------------------- memory of the machine


def test_cpu_capacity_above_physical_memory_is_refused_on_this_machine() -> None:
    too_big = physical_memory() + GIB
    with pytest.raises(ConfigError) as info:
        load_config({"cpu_capacity": too_big, "disk_path": "none"}, environ={})
    message = str(info.value)
    assert "'cpu_capacity'" in message and "exceeds" in message
    assert "physical memory" in message or "cgroup memory limit" in message
    assert "cpu_capacity_clamp: true" in message


def test_cpu_capacity_within_the_limit_is_kept(limit_8gib: None) -> None:
    assert load_config({"cpu_capacity": "8GiB"}, environ={}).cpu_capacity == 8 * GIB


def test_cpu_capacity_above_the_limit_names_it_and_the_range(limit_8gib: None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"KVTIER_CPU_CAPACITY": "1TB"})
    message = str(info.value)
    assert "'cpu_capacity' (from env KVTIER_CPU_CAPACITY)" in message
    assert "1TB exceeds the cgroup memory limit (/fake/memory.max), 8.00GiB" in message
    assert "allowed: a size in [16MiB, 8.00GiB (8589934592 bytes)]" in message


def test_clamp_uses_three_quarters_of_the_limit_and_warns(limit_8gib: None,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvtier.config"):
        config, sources = load_config_with_sources(
            {"cpu_capacity": "1TB", "cpu_capacity_clamp": True}, environ={})
    assert config.cpu_capacity == 6 * GIB
    assert sources["cpu_capacity"] == "override, clamped to 3/4 of the cgroup memory limit (/fake/memory.max)"
    assert "cpu_capacity_clamp" not in config.to_native()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1TB" in warnings[0] and "6GiB" in warnings[0], warnings


def test_clamp_leaves_a_fitting_capacity_alone(limit_8gib: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvtier.config"):
        config = load_config({"cpu_capacity": "7GiB", "cpu_capacity_clamp": "yes"}, environ={})
    assert config.cpu_capacity == 7 * GIB
    assert caplog.records == []


def test_clamped_config_starts_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtier.config._memory_limit", lambda: (64 * MIB, "physical memory"))
    config = load_config({"cpu_capacity": "1TB", "cpu_capacity_clamp": True, "disk_path": "none"},
                         environ={})
    assert config.cpu_capacity == 48 * MIB
    engine = _kvtier.Engine(config.to_native())  # the engine refuses unknown options
    engine.close()


# ---------------------------------------------------------- cgroup parsing


def fake_cgroups(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[str, str]:
    proc_file = tmp_path / "cgroup"
    proc_file.write_text(proc)
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(proc_file), str(root)


def test_cgroup_v2_takes_the_tightest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    proc, root = fake_cgroups(tmp_path, "0::/a/b\n", {
        "a/b/memory.max": "max\n",
        "a/memory.max": str(3 * GIB) + "\n",
        "memory.max": str(5 * GIB) + "\n",
    })
    limit = _cgroup_memory_limit(proc, root)
    assert limit == (3 * GIB, f"the cgroup memory limit ({root}/a/memory.max)")


def test_cgroup_v2_in_a_namespace_reads_the_root(tmp_path: Path) -> None:
    proc, root = fake_cgroups(tmp_path, "0::/\n", {"memory.max": "2147483648\n"})
    assert _cgroup_memory_limit(proc, root) == (2 * GIB, f"the cgroup memory limit ({root}/memory.max)")


def test_cgroup_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    proc, root = fake_cgroups(tmp_path, "0::/a\n", {"a/memory.max": "max\n", "memory.max": "max\n"})
    assert _cgroup_memory_limit(proc, root) is None


def test_cgroup_v1_memory_controller(tmp_path: Path) -> None:
    proc, root = fake_cgroups(tmp_path, "5:cpu,cpuacct:/x\n4:memory:/job/7\n0::/\n", {
        "memory/job/7/memory.limit_in_bytes": str(GIB),
        "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
    })
    assert _cgroup_memory_limit(proc, root) == (GIB, f"the cgroup memory limit ({root}/memory/job/7/memory.limit_in_bytes)")


def test_no_cgroup_file_is_no_limit(tmp_path: Path) -> None:
    assert _cgroup_memory_limit(str(tmp_path / "absent"), str(tmp_path)) is None
