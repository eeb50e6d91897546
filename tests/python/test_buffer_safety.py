"""Buffers handed to the bindings: C-contiguous only, exports held while used.

Issue 14 item 5: store_buffers / retrieve_buffers copied size*itemsize bytes
from a buffer's pointer whatever its strides (a reversed view overflowed the
heap, a [::2] view stored the wrong bytes), and released the buffer export
before copying without the GIL. A layout built from buffers held no export
either, so its memory could be reallocated under it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from kvtier import _kvtier, kv_layout
from kvtier.engine import Engine, Namespace

CHUNK = 16
CHUNK_BYTES = 4096


@pytest.fixture
def eng() -> Any:
    e = Engine({"chunk_size": CHUNK, "cpu_capacity": "16MiB", "disk_path": "none"}, Namespace(model="m"))
    e.set_chunk_bytes(CHUNK_BYTES)
    yield e
    e.close()


def chunks(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8) for _ in range(n)]


def strided_views() -> list[tuple[str, np.ndarray]]:
    base = (np.arange(2 * CHUNK_BYTES) % 251).astype(np.uint8)
    grid = np.zeros((64, 128), dtype=np.uint8)
    return [
        ("reversed", base[:CHUNK_BYTES][::-1]),  # pointer at the last byte: reading forward overflows
        ("every other byte", base[::2]),  # CHUNK_BYTES elements spread over twice the bytes
        ("2-D column slice", grid[:, :64]),  # rows not adjacent
    ]


@pytest.mark.parametrize("i", range(3))
def test_strided_buffers_are_refused_by_store_buffers(eng, i):
    name, view = strided_views()[i]
    assert view.nbytes == CHUNK_BYTES, name
    good = chunks(1)[0]
    with pytest.raises(ValueError, match=r"buffers\[1\] must be C-contiguous"):
        eng.store_buffers(np.arange(2 * CHUNK), [good, view])
    assert eng.lookup(np.arange(2 * CHUNK)) == 0  # nothing stored, not even chunk 0


@pytest.mark.parametrize("i", range(3))
def test_strided_buffers_are_refused_by_retrieve_buffers(eng, i):
    _, view = strided_views()[i]
    src = chunks(2)
    assert eng.store_buffers(np.arange(2 * CHUNK), src) == 2
    before = view.copy()
    with pytest.raises(ValueError, match=r"buffers\[0\] must be C-contiguous"):
        eng.retrieve_buffers(np.arange(2 * CHUNK), [view, np.zeros(CHUNK_BYTES, dtype=np.uint8)])
    np.testing.assert_array_equal(view, before)  # nothing written through the bad view


def test_read_only_destination_is_refused(eng):
    eng.store_buffers(np.arange(CHUNK), chunks(1))
    with pytest.raises(ValueError, match=r"buffers\[0\]"):
        eng.retrieve_buffers(np.arange(CHUNK), [bytes(CHUNK_BYTES)])


def test_contiguous_buffers_round_trip_byte_exact(eng):
    src = chunks(3, seed=7)
    # Any contiguous buffer works: numpy of another dtype and shape, bytes, bytearray.
    inputs: list[Any] = [src[0].view(np.float32).reshape(32, 32), bytes(src[1]), bytearray(src[2])]
    assert eng.store_buffers(np.arange(3 * CHUNK), inputs) == 3
    out: list[Any] = [np.zeros((64, 64), dtype=np.uint8), bytearray(CHUNK_BYTES), memoryview(bytearray(CHUNK_BYTES))]
    assert eng.retrieve_buffers(np.arange(3 * CHUNK), out) == 3 * CHUNK
    for want, got in zip(src, out):
        assert bytes(memoryview(got).cast("B")) == want.tobytes()


def test_a_layout_holds_the_export_of_its_buffers():
    # A layout keeps raw pointers into its tensors: a buffer it was built
    # from must not be released or reallocated while the layout lives.
    store = bytearray(2 * 4 * 16 * 2 * 8 * 4)
    view = memoryview(store).cast("f", (2, 4, 16, 2, 8))
    lay = kv_layout.make_layout([view])
    view.release()  # the caller's own view goes; the layout's export stays
    with pytest.raises(BufferError):
        store.extend(bytes(1 << 20))  # would move the bytes the layout points at
    out = bytearray(lay.chunk_bytes(2))
    _kvtier.gather(lay, np.array([0, 1], dtype=np.int64), out)
    del lay
    gc.collect()
    store.extend(b"x")  # the layout is gone: so is its export


def test_datapath_refuses_strided_buffers():
    arr = np.zeros((2, 4, 16, 2, 8), dtype=np.float32)
    lay = kv_layout.make_layout([arr])
    slots = np.arange(2, dtype=np.int64)
    n = lay.chunk_bytes(2)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        _kvtier.gather(lay, slots, np.zeros(2 * n, dtype=np.uint8)[::2])
    with pytest.raises(ValueError, match="src must be C-contiguous"):
        _kvtier.scatter(lay, slots, np.zeros(n, dtype=np.uint8)[::-1])
    with pytest.raises(ValueError, match="slot_mapping must be C-contiguous"):
        _kvtier.gather(lay, np.arange(4, dtype=np.int64)[::2], np.zeros(n, dtype=np.uint8))


# -- exports held through the copy without the GIL ---------------------------
#
# The bindings copy with the GIL released. Another Python thread can run
# then, and a bytearray refuses to be resized (BufferError) only while an
# export of it is held. A resize refused during the call therefore proves
# that the call still holds its export while it copies. Before the fix the
# export was dropped before the GIL was: a resizer could never be refused
# (it ran only while no export was held) and moved the bytes under the copy.


def resize_refused_during(call: Callable[[], object], target: bytearray, attempts: int = 500) -> bool:
    """Repeat ``call`` while another thread keeps trying to resize ``target``.

    True as soon as one resize attempt is refused with BufferError. Between
    calls the resizer succeeds; it refills ``target`` with its own bytes, so
    the calls keep seeing the same contents.
    """
    fill = bytes(target)
    refused = threading.Event()
    stop = threading.Event()

    def resizer() -> None:
        while not stop.is_set():
            try:
                # One C call: shrink to 0 (what an export forbids), then refill.
                target.__init__(fill)  # type: ignore[misc]
            except BufferError:
                refused.set()
                return

    thread = threading.Thread(target=resizer)
    thread.start()
    try:
        for _ in range(attempts):
            call()
            if refused.is_set():
                break
    finally:
        stop.set()
        thread.join()
    return refused.is_set()


BIG_CHUNK = 4 << 20  # long enough a copy for the resizer to get the GIL in it


@pytest.fixture
def big() -> Any:
    e = Engine({"chunk_size": CHUNK, "cpu_capacity": "64MiB", "disk_path": "none"}, Namespace(model="m"))
    e.set_chunk_bytes(BIG_CHUNK)
    yield e
    e.close()


def test_retrieve_buffers_holds_the_export_while_it_copies(big):
    src = bytes(np.random.default_rng(3).integers(0, 256, BIG_CHUNK, dtype=np.uint8))
    tokens = np.arange(CHUNK)
    assert big.store_buffers(tokens, [src]) == 1
    dst = bytearray(BIG_CHUNK)
    assert resize_refused_during(lambda: big.retrieve_buffers(tokens, [dst]), dst)
    assert big.retrieve_buffers(tokens, [dst]) == CHUNK
    assert dst == src


def test_store_buffers_holds_the_export_until_stored(big):
    # store_buffers no longer copies the buffers first: the copy threads read
    # them until the store is done, so the export must be held that long.
    src = bytearray(np.random.default_rng(4).integers(0, 256, BIG_CHUNK, dtype=np.uint8).tobytes())
    tokens = np.arange(CHUNK)

    def store() -> None:
        big.clear()
        assert big.store_buffers(tokens, [src]) == 1

    assert resize_refused_during(store, src)
    out = bytearray(BIG_CHUNK)
    assert big.retrieve_buffers(tokens, [out]) == CHUNK
    assert out == src


def big_layout() -> tuple[Any, np.ndarray]:
    kv = np.random.default_rng(5).random((2, 64, 16, 8, 128), dtype=np.float32)  # 8 MiB
    slots = np.arange(64 * 16, dtype=np.int64)
    return kv_layout.make_layout([kv]), slots


def test_gather_holds_the_out_export_while_it_copies():
    lay, slots = big_layout()
    out = bytearray(lay.chunk_bytes(len(slots)))
    assert resize_refused_during(lambda: _kvtier.gather(lay, slots, out), out)
    want = bytearray(len(out))
    _kvtier.gather(lay, slots, want)
    _kvtier.gather(lay, slots, out)
    assert out == want


def test_scatter_holds_the_src_export_while_it_copies():
    lay, slots = big_layout()
    src = bytearray(np.random.default_rng(6).integers(0, 256, lay.chunk_bytes(len(slots)), dtype=np.uint8).tobytes())
    assert resize_refused_during(lambda: _kvtier.scatter(lay, slots, src), src)
    back = bytearray(len(src))
    _kvtier.gather(lay, slots, back)
    assert back == src
