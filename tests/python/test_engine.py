"""kvtier.Engine end to end over real paged tensors (vLLM CPU layout), with
the CPU and disk tiers, through the installed extension."""

from __future__ import annotations

import threading

import kvtier
import numpy as np
import pytest
import torch
from kvtier import _kvtier
from kvtier.engine import Engine, Namespace

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 4, 32, 2, 16, 64


def make_kv(fill: str = "randn") -> list[torch.Tensor]:
    # vLLM CPU 0.32 allocates [num_blocks, kv_heads, block_size, 2 * head_size].
    gen = torch.Generator().manual_seed(0)
    if fill == "zeros":
        return [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD) for _ in range(LAYERS)]
    return [torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen) for _ in range(LAYERS)]


def engine(tmp_path, **over) -> Engine:
    cfg = {"chunk_size": 32, "cpu_capacity": "64MiB", "disk_path": str(tmp_path / "disk"), "disk_capacity": "256MiB"}
    cfg.update(over)
    return Engine(cfg, Namespace(model="test", dtype="float32"))


def blocks_equal(a: list[torch.Tensor], b: list[torch.Tensor], blocks: range) -> bool:
    return all(torch.equal(x[blocks.start : blocks.stop], y[blocks.start : blocks.stop]) for x, y in zip(a, b))


def test_store_lookup_retrieve_round_trip(tmp_path):
    eng = engine(tmp_path)
    src = make_kv()
    eng.register_kv_caches(src)
    tokens = np.arange(1000, 1100)  # 3 full chunks + a 4-token tail
    slots = np.arange(100) + 2 * BLOCK  # blocks 2..8
    assert eng.lookup(tokens) == 0
    assert eng.store(tokens, slots).wait() == 4
    assert eng.lookup(tokens) == 100

    dst = make_kv("zeros")
    eng.register_kv_caches(dst)
    assert eng.retrieve(tokens, slots) == 100
    # Blocks 2..7 are fully covered; block 8 holds tokens 96..99 only.
    assert blocks_equal(src, dst, range(2, 8))
    for x, y in zip(src, dst):
        # vLLM CPU views each (block, head) plane as K[block][head] then V[block][head].
        xv, yv = x.view(BLOCKS, HEADS, 2 * BLOCK, HEAD), y.view(BLOCKS, HEADS, 2 * BLOCK, HEAD)
        assert torch.equal(xv[8, :, :4], yv[8, :, :4])  # K of tokens 96..99
        assert torch.equal(xv[8, :, BLOCK : BLOCK + 4], yv[8, :, BLOCK : BLOCK + 4])  # their V
        assert float(yv[8, :, 4:BLOCK].abs().sum()) == 0.0  # the rest of block 8 untouched
        assert float(y[0].abs().sum()) == 0.0
    stats = eng.stats()
    assert stats["chunks_loaded_cpu"] == 4 and stats["tokens_loaded"] == 100
    eng.close()


def test_skip_tokens_are_not_written(tmp_path):
    eng = engine(tmp_path)
    src = make_kv()
    eng.register_kv_caches(src)
    tokens = np.arange(64)
    slots = np.arange(64)
    eng.store(tokens, slots).wait()
    dst = make_kv("zeros")
    eng.register_kv_caches(dst)
    assert eng.retrieve(tokens, slots, skip_tokens=32) == 64
    assert all(float(t[0:2].abs().sum()) == 0.0 for t in dst)  # tokens 0..31 skipped
    assert blocks_equal(src, dst, range(2, 4))
    eng.close()


def test_restart_hits_from_disk(tmp_path):
    tokens = np.arange(500, 596)
    slots = np.arange(96)
    src = make_kv()
    eng = engine(tmp_path)
    eng.register_kv_caches(src)
    eng.store(tokens, slots).wait()
    eng.flush()
    assert eng.stats()["write_behind_written"] == 3
    eng.close()

    eng = engine(tmp_path)  # the catalogue is rebuilt from the disk records
    assert eng.lookup(tokens) == 96
    dst = make_kv("zeros")
    eng.register_kv_caches(dst)
    assert eng.retrieve(tokens, slots) == 96
    assert blocks_equal(src, dst, range(6))
    assert eng.stats()["chunks_loaded_disk"] == 3
    eng.close()


def test_async_retrieve_and_prefix_divergence(tmp_path):
    eng = engine(tmp_path)
    src = make_kv()
    eng.register_kv_caches(src)
    tokens = np.arange(2000, 2128)
    eng.store(tokens, np.arange(128)).wait()
    other = tokens.copy()
    other[70] += 1  # chunk 2 differs
    assert eng.lookup(other) == 64
    dst = make_kv("zeros")
    eng.register_kv_caches(dst)
    assert eng.retrieve_async(other, np.arange(128)).result(timeout=30) == 64
    eng.close()


def test_chunk_from_another_layout_is_not_scattered(tmp_path):
    eng = engine(tmp_path, disk_path="none")
    eng.register_kv_caches(make_kv())
    tokens = np.arange(64)
    eng.store(tokens, np.arange(64)).wait()
    # fp16 with twice the head size: the same bytes per chunk, another layout.
    other = [torch.zeros(BLOCKS, HEADS, BLOCK, 4 * HEAD, dtype=torch.float16) for _ in range(LAYERS)]
    eng.register_kv_caches(other)
    assert eng.retrieve(tokens, np.arange(64)) == 0
    assert all(float(t.abs().sum()) == 0.0 for t in other)
    stats = eng.stats()
    assert stats["load_errors"] == 1
    assert stats["layout_mismatches"] == 2  # both chunks, dropped as stale
    assert stats["internal_errors"] == 0
    # A layout whose chunks have another size cannot share the CPU tier.
    small = [torch.zeros(BLOCKS, HEADS, BLOCK, HEAD) for _ in range(LAYERS)]
    with pytest.raises(_kvtier.FailedPreconditionError, match="chunks of"):
        eng.register_kv_caches(small)
    eng.close()


def test_bad_inputs_fail_clearly(tmp_path):
    eng = engine(tmp_path, disk_path="none")
    with pytest.raises(_kvtier.FailedPreconditionError, match="register_kv_caches"):
        eng.store(np.arange(32), np.arange(32))
    eng.register_kv_caches(make_kv())
    with pytest.raises(ValueError, match="one slot per token"):
        eng.store(np.arange(32), np.arange(31))
    with pytest.raises(ValueError, match="out of range"):
        eng.retrieve(np.arange(32), np.arange(32) + BLOCKS * BLOCK)
    with pytest.raises(ValueError, match="1-D"):
        eng.lookup(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="token ids"):
        eng.lookup([-1, 2, 3])
    # Padding (-1) slots inside a chunk cannot be stored: the handle reports it.
    slots = np.arange(32)
    slots[5] = -1
    with pytest.raises(ValueError, match="padding"):
        eng.store(np.arange(32), slots).wait()
    assert eng.lookup(np.arange(32)) == 0
    with pytest.raises(kvtier.ConfigError, match="chunk_size"):
        Engine({"chunk_sise": 32})
    eng.close()
    with pytest.raises(_kvtier.FailedPreconditionError, match="closed"):
        eng.lookup(np.arange(4))
    eng.close()  # idempotent


def test_corrupt_disk_record_between_lookup_and_load_is_a_miss(tmp_path):
    tokens = np.arange(700, 796)  # 3 chunks
    slots = np.arange(96)
    src = make_kv()
    eng = engine(tmp_path)
    eng.register_kv_caches(src)
    eng.store(tokens, slots).wait()
    eng.flush()
    eng.close()

    eng = engine(tmp_path)
    assert eng.lookup(tokens) == 96  # the records verified at rebuild
    # Now damage every record's payload on disk (bypassing the page cache the
    # tier does not use: O_DIRECT reads go to the file).
    segs = sorted((tmp_path / "disk").glob("seg_*.kvt"))
    assert segs
    for seg in segs:
        with open(seg, "r+b") as f:
            data = bytearray(f.read())
            for off in range(2 * 4096, len(data), 4096):  # inside payloads and headers alike
                data[off + 17] ^= 0xFF
            f.seek(0)
            f.write(data)
            f.flush()
            import os

            os.fsync(f.fileno())
    dst = make_kv("zeros")
    eng.register_kv_caches(dst)
    loaded = eng.retrieve(tokens, slots)
    assert loaded == 0  # the first chunk fails its checksum: nothing after it is trusted
    assert all(float(t.abs().sum()) == 0.0 for t in dst)  # no byte of bad KV was scattered
    assert eng.lookup(tokens) == 0  # and the catalogue no longer promises it
    eng.close()


def test_gds_on_without_cufile_fails_at_start(tmp_path):
    # This machine has no GPU and no libcufile: a required GDS must refuse to start.
    with pytest.raises(_kvtier.NotImplementedByBuildError, match="gds=on"):
        engine(tmp_path, gds="on")
    engine(tmp_path, gds="off").close()  # the same directory opens fine without it


def test_close_drains_a_store_in_flight(tmp_path):
    # A store big enough to be still copying when close() is called (64
    # chunks of 8 MiB on one copy thread): close() must wait for it, not
    # cancel it or free the tier under it.
    layers, blocks, heads, block, head = 4, 1024, 8, 16, 128
    kv = [torch.full((blocks, heads, block, 2 * head), float(i + 1)) for i in range(layers)]
    eng = engine(tmp_path, disk_path="none", cpu_capacity="1GiB", chunk_size=256, copy_threads=1)
    eng.register_kv_caches(kv)
    tokens = np.arange(blocks * block)
    h = eng.store(tokens, np.arange(blocks * block))
    assert h.chunks_total == 64
    assert not h.done()  # observably in flight when close() starts
    eng.close()
    assert h.done()
    assert h.wait() == 64 and h.chunks_stored == 64  # drained to the end, nothing dropped
    assert eng.closed


def test_every_method_after_close_says_closed(tmp_path):
    eng = engine(tmp_path, disk_path="none")
    eng.register_kv_caches(make_kv())
    tokens, slots = np.arange(64), np.arange(64)
    assert eng.retrieve_async(tokens, slots).result(timeout=60) == 0  # a loader exists now
    eng.close()
    calls = {
        "lookup": lambda: eng.lookup(tokens),
        "chunk_keys": lambda: eng.chunk_keys(tokens),
        "store": lambda: eng.store(tokens, slots),
        "retrieve": lambda: eng.retrieve(tokens, slots),
        "retrieve_on_stream": lambda: eng.retrieve_on_stream(tokens, slots),
        "retrieve_async": lambda: eng.retrieve_async(tokens, slots),
        "store_buffers": lambda: eng.store_buffers(tokens, [bytes(16)]),
        "retrieve_buffers": lambda: eng.retrieve_buffers(tokens, [bytearray(16)]),
        "prefetch": lambda: eng.prefetch(tokens),
        "pin": lambda: eng.pin(tokens),
        "unpin": lambda: eng.unpin(tokens),
        "flush": eng.flush,
        "clear": eng.clear,
        "stats": eng.stats,
        "set_chunk_bytes": lambda: eng.set_chunk_bytes(1 << 20),
        "register_kv_caches": lambda: eng.register_kv_caches(make_kv()),
        "chunk_size": lambda: eng.chunk_size,
    }
    for name, call in calls.items():
        with pytest.raises(_kvtier.FailedPreconditionError, match="^engine is closed$"):
            call()
        assert eng._loader is None, name  # retrieve_async started no executor that nobody shuts down
    eng.close()  # idempotent


def test_close_while_other_threads_store_and_retrieve(tmp_path):
    # close() waits for calls already inside the engine, drains their copies
    # and only then lets the tensors go; later calls fail "closed". Every
    # call therefore either completes or raises that error.
    eng = engine(tmp_path, disk_path="none", cpu_capacity="256MiB")
    src = make_kv()
    eng.register_kv_caches(src)
    errors: list[BaseException] = []
    done = threading.Event()
    # close() runs only once every worker has finished a round, so the
    # workers are provably mid-loop (not yet started or already gone would
    # test nothing).
    warmed = threading.Barrier(5)
    rounds = [0] * 4

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not done.is_set():
            tokens = rng.integers(0, 50_000, size=96)
            slots = rng.permutation(BLOCKS * BLOCK)[:96]
            try:
                eng.store(tokens, slots).wait()
                eng.retrieve(tokens, slots)
            except _kvtier.FailedPreconditionError as e:
                if "closed" not in str(e):
                    errors.append(e)
                return
            except BaseException as e:  # noqa: BLE001 - any other error is the defect under test
                errors.append(e)
                return
            finally:
                rounds[seed] += 1
                if rounds[seed] == 1:
                    warmed.wait(timeout=60)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    warmed.wait(timeout=60)
    eng.close()
    done.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert errors == []
    assert all(r >= 1 for r in rounds)
    assert eng.closed
    with pytest.raises(_kvtier.FailedPreconditionError, match="closed"):
        eng.store(np.arange(32), np.arange(32))
