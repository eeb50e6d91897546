"""disk_sync (issue 13): the config key reaches the disk tier.

Where each mode issues its fdatasyncs is tested in C++
(cc/tiers/disk/disk_tier_sync_test.cc); here: the key's values, default and
errors, and that an engine opened with each mode stores through the disk tier
and serves the chunks again after a restart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kvtier import _kvtier
from kvtier.config import ConfigError, load_config
from kvtier.engine import Engine, Namespace

CHUNK = 16
CHUNK_BYTES = 4096


def test_default_is_none_and_values_parse() -> None:
    assert load_config({}).disk_sync == "none"
    assert load_config({"disk_sync": "BATCH"}).disk_sync == "batch"
    assert load_config({"disk_sync": "always"}).to_native()["disk_sync"] == "always"
    with pytest.raises(ConfigError, match=r"disk_sync.*none.*batch.*always"):
        load_config({"disk_sync": "fsync"})


def test_native_engine_refuses_an_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(_kvtier.InvalidArgumentError, match="disk_sync must be one of none, batch, always"):
        _kvtier.Engine({"disk_path": str(tmp_path / "d"), "disk_capacity": 64 << 20, "disk_sync": "fsync"})


@pytest.mark.parametrize("mode", ["none", "batch", "always"])
def test_each_mode_stores_to_disk_and_serves_after_restart(tmp_path: Path, mode: str) -> None:
    config = {"chunk_size": CHUNK, "cpu_capacity": "16MiB", "disk_path": str(tmp_path / "d"),
              "disk_capacity": "64MiB", "disk_segment_size": "1MiB", "disk_sync": mode}
    tokens = np.arange(4 * CHUNK)
    e = Engine(config, Namespace(model="m"))
    e.set_chunk_bytes(CHUNK_BYTES)
    bufs = [np.full(CHUNK_BYTES, i + 1, dtype=np.uint8) for i in range(4)]
    assert e.store_buffers(tokens, bufs) == 4
    e.flush()
    assert e.stats()["tiers"]["disk"]["entries"] == 4
    e.close()

    e = Engine(config, Namespace(model="m"))
    e.set_chunk_bytes(CHUNK_BYTES)
    assert e.lookup(tokens) == 4 * CHUNK
    out = [np.zeros(CHUNK_BYTES, dtype=np.uint8) for _ in range(4)]
    assert e.retrieve_buffers(tokens, out) == 4 * CHUNK
    for i, b in enumerate(out):
        assert (b == i + 1).all()
    e.close()
