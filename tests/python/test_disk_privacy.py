"""Nothing private is left behind (issue 13), with the real engine.

An engine with a disk tier and a shared-memory catalogue runs in a child
process under umask 000 (the loosest). After a clean close, and after
kill -9 followed by a restart, the disk directory holds only LOCK and
segment files, all mode 0600 in a 0700 directory (no temporary files), and
the catalogue is gone from /dev/shm: removed by close, or reclaimed by the
restart that reuses its name. The KV stored before the kill is served after
it. cc/tiers/disk/disk_tier_privacy_test.cc covers the refusals (planted
links, other users' directories).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kvtier.catalogue import catalogue_shm_name

CHUNK = 16
CHUNK_BYTES = 4096
CHILD = """
import os, sys, time
import numpy as np
from kvtier.engine import Engine, Namespace
os.umask(0)
disk, shm, mode = sys.argv[1], sys.argv[2], sys.argv[3]
e = Engine({{"chunk_size": {chunk}, "cpu_capacity": "16MiB", "disk_path": disk,
            "disk_capacity": "64MiB", "disk_segment_size": "1MiB"}},
           Namespace(model="m"), catalogue_shm_name=shm)
e.set_chunk_bytes({chunk_bytes})
tokens = np.arange(4 * {chunk})
if mode == "store":
    bufs = [np.full({chunk_bytes}, i + 1, dtype=np.uint8) for i in range(4)]
    assert e.store_buffers(tokens, bufs) == 4
    e.flush()  # written behind to the disk tier
    assert e.stats()["tiers"]["disk"]["entries"] == 4, e.stats()
print("hits", e.lookup(tokens), flush=True)
print("ready", flush=True)
if sys.argv[4] == "hang":
    time.sleep(600)
e.close()
"""
SEGMENT = re.compile(r"seg_\d{5}\.kvt")


def child(disk: Path, shm: str, mode: str, then: str) -> subprocess.Popen[str]:
    code = CHILD.format(chunk=CHUNK, chunk_bytes=CHUNK_BYTES)
    return subprocess.Popen([sys.executable, "-c", code, str(disk), shm, mode, then],
                            stdout=subprocess.PIPE, text=True)


def read_hits(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "hits", f"child failed (exit {proc.poll()})"
    assert proc.stdout.readline().strip() == "ready"
    return int(line[1])


def assert_only_private_tier_files(disk: Path) -> None:
    assert stat.S_IMODE(disk.stat().st_mode) == 0o700
    names = sorted(p.name for p in disk.iterdir())
    assert "LOCK" in names
    strays = [n for n in names if n != "LOCK" and not SEGMENT.fullmatch(n)]
    assert strays == [], f"files other than LOCK and segments left in {disk}: {strays}"
    assert len(names) >= 2, names
    for name in names:
        st = (disk / name).lstat()
        assert stat.S_ISREG(st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{name}: {oct(st.st_mode)}"


def shm_entries(tag: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if tag in n]


@pytest.fixture
def names(tmp_path: Path) -> tuple[Path, str, str]:
    deployment = f"privacy-{uuid.uuid4()}"
    shm = catalogue_shm_name(deployment, 0, 1)
    return tmp_path / "fresh" / "disk", shm, shm.lstrip("/")


def test_clean_exit_leaves_only_private_tier_files(names: tuple[Path, str, str]) -> None:
    disk, shm, tag = names
    proc = child(disk, shm, "store", "exit")
    assert read_hits(proc) == 4 * CHUNK
    assert proc.wait(timeout=120) == 0
    assert_only_private_tier_files(disk)
    assert stat.S_IMODE(disk.parent.stat().st_mode) == 0o700, "a parent the tier created"
    assert shm_entries(tag) == [], "the catalogue outlived a clean close"


def test_kill_9_then_restart_leaves_only_private_tier_files(names: tuple[Path, str, str]) -> None:
    disk, shm, tag = names
    proc = child(disk, shm, "store", "hang")
    try:
        assert read_hits(proc) == 4 * CHUNK
        shm_stat = os.stat("/dev/shm" + shm)
        assert stat.S_IMODE(shm_stat.st_mode) == 0o600, "the catalogue is private under umask 000"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert_only_private_tier_files(disk)  # no temporary files even mid-run
    assert shm_entries(tag) == [tag], "kill -9 leaves the catalogue for the restart to reclaim"

    restart = child(disk, shm, "lookup", "exit")
    assert read_hits(restart) == 4 * CHUNK, "the KV written before the kill is served"
    assert restart.wait(timeout=120) == 0
    assert_only_private_tier_files(disk)
    assert shm_entries(tag) == [], "the restart reclaimed the killed owner's catalogue, then removed its own"
