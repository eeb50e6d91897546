"""The operations API of kvtier.Engine (clear by filter, pin TTL, move,
lookup_tiers, verify, health, stats histograms and evictions by reason)
through the installed extension. No sleeps: TTLs are released with
expire_pins_now(ahead_s), moves are waited for."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
from kvtier import _kvtier
from kvtier.engine import Engine, KeyExtras, MoveTask, Namespace

CHUNK = 16
CHUNK_BYTES = 4096


def make(tmp_path: Any, disk: bool = True, **over: Any) -> Engine:
    cfg: dict[str, Any] = {"chunk_size": CHUNK, "cpu_capacity": "16MiB"}
    # No disk: an empty disk_path (the default is a directory under ~/.cache).
    cfg.update(disk_path=str(tmp_path / "disk") if disk else "", disk_capacity="64MiB")
    cfg.update(over)
    eng = Engine(cfg, Namespace(model="ops", dtype="float32"))
    eng.set_chunk_bytes(CHUNK_BYTES)
    return eng


def tokens(n_chunks: int, first: int) -> np.ndarray:
    return np.arange(first, first + n_chunks * CHUNK, dtype=np.int32)


def payload(toks: np.ndarray, i: int) -> bytes:
    return bytes((int(toks[i * CHUNK]) * 7 + j) & 0xFF for j in range(CHUNK_BYTES))


def store(eng: Engine, toks: np.ndarray) -> None:
    n = len(toks) // CHUNK
    assert eng.store_buffers(toks, [payload(toks, i) for i in range(n)]) == n
    eng.flush()


def retrieve_ok(eng: Engine, toks: np.ndarray) -> int:
    n = len(toks) // CHUNK
    bufs = [bytearray(CHUNK_BYTES) for _ in range(n)]
    got = eng.retrieve_buffers(toks, bufs)
    for i in range(got // CHUNK):
        assert bytes(bufs[i]) == payload(toks, i)
    return got


def tiers_of(eng: Engine, toks: np.ndarray) -> list[list[str]]:
    return [c["tiers"] for c in eng.lookup_tiers(toks)["chunks"]]


# -- clear ---------------------------------------------------------------


def test_clear_no_args_drops_everything_and_counts(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(3, 1)
        store(eng, a)
        assert eng.clear() == 3
        assert eng.lookup(a) == 0


def test_clear_by_tier(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(3, 1)
        store(eng, a)
        assert eng.clear(tiers=["cpu"]) == 3
        assert eng.lookup(a) == len(a)
        assert tiers_of(eng, a) == [["disk"]] * 3
        s = eng.stats()
        assert s["cpu"]["evictions_clear"] == 3
        assert s["tiers"]["cpu"]["evictions_clear"] == 3
        assert s["disk"]["evictions_clear"] == 0
        assert eng.clear(tiers=("disk",)) == 3
        assert eng.lookup(a) == 0
        assert eng.stats()["catalogue_entries"] == 0


def test_clear_by_tokens_and_pins(tmp_path):
    with make(tmp_path) as eng:
        a, b, c = tokens(2, 1), tokens(2, 5000), tokens(2, 9000)
        for t in (a, b, c):
            store(eng, t)
        assert eng.pin(c) == 2
        assert eng.clear(tokens=a) == 2
        assert eng.lookup(a) == 0 and eng.lookup(b) == len(b)
        assert eng.clear() == 2  # b; c is pinned
        assert eng.lookup(c) == len(c)
        assert retrieve_ok(eng, c) == len(c)


def test_clear_older_than(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(2, 1)
        store(eng, a)
        assert eng.clear(older_than_s=3600) == 0  # just stored
        assert eng.clear(older_than_s=0) == 2
        assert eng.lookup(a) == 0


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"tiers": ["remote"]}, ValueError),
        ({"tiers": ["cpu", "gpu"]}, ValueError),
        ({"tiers": "cpu"}, ValueError),
        ({"tiers": []}, ValueError),
        ({"tiers": [1]}, ValueError),
        ({"older_than_s": -1}, ValueError),
        ({"older_than_s": float("nan")}, ValueError),
        ({"older_than_s": "10"}, TypeError),
        ({"older_than_s": True}, TypeError),
        ({"tokens": [1.5, 2.5]}, TypeError),
        ({"tokens": [[1, 2]]}, ValueError),
        ({"tokens": [1], "extras": "salt"}, ValueError),
        ({"extras": KeyExtras(salt="a")}, ValueError),
    ],
)
def test_clear_bad_input_changes_nothing(tmp_path, kwargs, exc):
    with make(tmp_path) as eng:
        a = tokens(2, 1)
        store(eng, a)
        with pytest.raises(exc):
            eng.clear(**kwargs)
        assert eng.lookup(a) == len(a)
        assert tiers_of(eng, a) == [["cpu", "disk"]] * 2


def test_invalid_tier_is_the_kvtier_invalid_argument_error(tmp_path):
    with make(tmp_path) as eng, pytest.raises(_kvtier.InvalidArgumentError, match="unknown tier 'remote'"):
        eng.clear(tiers=["remote"])


# -- pin with TTL -------------------------------------------------------


def test_pin_ttl_released_when_due(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(3, 1)
        store(eng, a)
        assert eng.pin(a, ttl_s=30) == 3
        assert eng.stats()["pins_with_ttl"] == 3
        assert all(c["pinned"] for c in eng.lookup_tiers(a)["chunks"])
        assert eng.expire_pins_now() == 0  # not due
        assert eng.clear() == 0
        assert eng.expire_pins_now(ahead_s=29) == 0
        assert eng.expire_pins_now(ahead_s=31) == 3
        assert eng.stats()["pins_expired"] == 3
        assert not any(c["pinned"] for c in eng.lookup_tiers(a)["chunks"])
        assert eng.unpin(a) == 0
        assert eng.clear() == 3


@pytest.mark.parametrize(("ttl", "exc"), [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("5", TypeError)])
def test_pin_bad_ttl_pins_nothing(tmp_path, ttl, exc):
    with make(tmp_path) as eng:
        a = tokens(1, 1)
        store(eng, a)
        with pytest.raises(exc):
            eng.pin(a, ttl_s=ttl)
        assert eng.clear() == 1


# -- move ----------------------------------------------------------------


def test_move_to_cpu_then_disk(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(3, 1)
        store(eng, a)
        eng.clear(tiers=["cpu"])
        task = eng.move(a, "cpu")
        assert isinstance(task, MoveTask)
        assert task.wait(timeout_s=60)
        assert task.done()
        r = task.result()
        assert r["chunks"] == 3 and r["moved"] == 3 and r["already"] == 0 and r["failed"] == 0 and r["error"] is None
        assert tiers_of(eng, a) == [["cpu", "disk"]] * 3
        disk_loads = eng.stats()["chunks_loaded_disk"]
        assert retrieve_ok(eng, a) == len(a)
        assert eng.stats()["chunks_loaded_disk"] == disk_loads  # CPU hits

        eng.clear(tiers=["disk"])  # CPU-only now: the move must write them
        task = eng.move(a, "disk")
        assert task.wait()
        r = task.result()
        assert r["moved"] == 3, r
        assert tiers_of(eng, a) == [["disk"]] * 3
        assert retrieve_ok(eng, a) == len(a)


def test_move_pinned_chunk_to_disk_fails_that_chunk(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(1, 1)
        store(eng, a)
        eng.pin(a)
        task = eng.move(a, "disk")
        task.wait()
        r = task.result()
        assert r["failed"] == 1 and "pinned" in r["error"]
        eng.unpin(a)


@pytest.mark.parametrize(("tier", "exc"), [("remote", ValueError), ("CPU", ValueError), (1, ValueError)])
def test_move_bad_tier(tmp_path, tier, exc):
    with make(tmp_path) as eng:
        a = tokens(1, 1)
        store(eng, a)
        with pytest.raises(exc):
            eng.move(a, tier)
        assert tiers_of(eng, a) == [["cpu", "disk"]]


def test_move_to_disk_without_disk_tier(tmp_path):
    with make(tmp_path, disk=False) as eng, pytest.raises(_kvtier.FailedPreconditionError):
        eng.move(tokens(1, 1), "disk")


# -- lookup_tiers ----------------------------------------------------------


def test_lookup_tiers_shape_and_no_hit_stats(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(4, 1)
        store(eng, a)
        eng.clear(tiers=["cpu"], tokens=a[: 2 * CHUNK])
        before = eng.stats()
        out = eng.lookup_tiers(np.concatenate([a, np.arange(90000, 90000 + CHUNK, dtype=np.int32)]))
        assert out["tokens"] == len(a)
        assert out["chunk_tokens"] == CHUNK
        assert [c["index"] for c in out["chunks"]] == [0, 1, 2, 3]
        assert [c["tiers"] for c in out["chunks"]] == [["disk"], ["disk"], ["cpu", "disk"], ["cpu", "disk"]]
        assert out["by_tier"] == {"cpu": 2, "disk": 4}
        after = eng.stats()
        for k in ("lookups", "lookup_hit_tokens", "lookup_query_tokens"):
            assert after[k] == before[k]


# -- verify --------------------------------------------------------------


def test_verify_consistent_and_counts(tmp_path):
    with make(tmp_path) as eng:
        store(eng, tokens(3, 1))
        v = eng.verify(deep=True)
        assert v == {
            "entries": 3, "checked": 3, "ok": 3, "missing": {"cpu": 0, "disk": 0},
            "orphans": {"cpu": 0, "disk": 0}, "corrupt": 0, "consistent": True, "deep": True,
        }
        with pytest.raises(TypeError):
            eng.verify(deep="yes")  # type: ignore[arg-type]


# -- health --------------------------------------------------------------


def test_health_ok_then_degraded_when_disk_dir_replaced_by_file(tmp_path):
    with make(tmp_path) as eng:
        h = eng.health()
        assert h["status"] == "ok" and h["reasons"] == []
        assert set(h["tiers"]) == {"cpu", "disk", "remote"}
        assert h["tiers"]["remote"] == {"status": "ok", "reasons": [], "enabled": False}
        assert h["queues"]["write_behind_capacity"] == 1024
        assert {"write_behind", "remote_upload", "remote_upload_capacity"} <= set(h["queues"])
        # Root ignores chmod 0500; a directory replaced by a file fails every
        # new segment file for root too.
        disk = tmp_path / "disk"
        shutil.rmtree(disk)
        disk.write_text("not a directory")
        h = eng.health()
        assert h["status"] == "degraded"
        assert h["tiers"]["disk"]["status"] == "degraded"
        assert any(str(disk) in r for r in h["tiers"]["disk"]["reasons"])
        assert any(r.startswith("disk: ") for r in h["reasons"])


# -- stats additions ---------------------------------------------------------


def test_stats_histograms_and_evictions(tmp_path):
    with make(tmp_path) as eng:
        a = tokens(2, 1)
        store(eng, a)
        assert retrieve_ok(eng, a) == len(a)
        s = eng.stats()
        h = s["histograms"]
        assert set(h) == {"load_us", "store_us"}
        assert set(h["load_us"]) == {"cpu", "disk", "remote"} and set(h["store_us"]) == {"cpu", "disk"}
        cpu_load = h["load_us"]["cpu"]
        assert cpu_load["bounds"][0] == 10 and cpu_load["bounds"][-1] == 10_000_000
        assert cpu_load["bounds"] == sorted(cpu_load["bounds"])
        assert len(cpu_load["counts"]) == len(cpu_load["bounds"]) + 1
        assert cpu_load["count"] == 2 and sum(cpu_load["counts"]) == 2  # non-cumulative
        assert h["store_us"]["cpu"]["count"] == 2
        assert h["store_us"]["disk"]["count"] >= 1
        for tier in ("cpu", "disk"):
            for reason in ("capacity", "clear", "expired", "layout_mismatch", "corrupt"):
                assert s[tier][f"evictions_{reason}"] == 0
        assert s["catalogue_capacity"] >= s["catalogue_entries"] == 2
        # Another layout id: both copies dropped as layout mismatches.
        assert eng.retrieve_buffers(a, [bytearray(CHUNK_BYTES)] * 2, layout_id=99) == 0
        s = eng.stats()
        assert s["cpu"]["evictions_layout_mismatch"] == 2
        assert s["disk"]["evictions_layout_mismatch"] == 2
