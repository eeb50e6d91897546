"""An engine inherited by a forked child stays the parent's.

A fork-started helper of a serving process (vLLM, torch and Python's
multiprocessing all fork) shares the engine's file descriptors, epoll sets,
sockets and shared-memory names with the parent but has none of its
threads. If the child tore its copy down, the parent's UCX listener would
leave the shared epoll set (no peer could connect again) and the parent's
shared catalogue would be unlinked. The child must find the engine closed
for use and must never destroy it.
"""

from __future__ import annotations

import gc
import os
import signal
import time
import uuid

import numpy as np
import pytest
from kvtier import _kvtier
from kvtier.engine import Engine, Namespace

UCX_OK, UCX_WHY = _kvtier.ucx_status()
CHUNK, CHUNK_BYTES, NCHUNKS = 16, 4096, 4
TOKENS = np.arange(500, 500 + CHUNK * NCHUNKS)


def _fork_and_drop(engine: Engine) -> int:
    """A child that tries the engine, closes it and lets it be collected,
    as a helper does when it ends; returns the child's exit code."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            try:
                engine.lookup(TOKENS)
                code = 3  # the parent's engine answered in the child
            except _kvtier.FailedPreconditionError as exc:
                if "forked child" not in str(exc):
                    code = 4
            engine.close()
            del engine
            gc.collect()
        except BaseException:  # noqa: BLE001 - any failure is the exit code
            code = 5
        finally:
            os._exit(code)
    # Bounded: a child that tears the engine down waits forever for threads
    # that only the parent has.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung tearing down the parent's engine")


def test_forked_child_keeps_the_parents_shared_catalogue() -> None:
    name = f"/kvtier-forktest-{uuid.uuid4().hex[:12]}"
    e = Engine(
        {"disk_path": "none", "cpu_capacity": "16MiB", "chunk_size": CHUNK},
        Namespace(model="fork"),
        catalogue_shm_name=name,
    )
    try:
        e.set_chunk_bytes(CHUNK_BYTES)
        assert e.store_buffers(TOKENS, [np.full(CHUNK_BYTES, i, np.uint8) for i in range(NCHUNKS)]) == NCHUNKS
        assert _fork_and_drop(e) == 0
        assert os.path.exists("/dev/shm" + name), "the child unlinked the parent's catalogue"
        assert e.lookup(TOKENS) == len(TOKENS)  # the parent's engine still works
    finally:
        e.close()
    assert not os.path.exists("/dev/shm" + name)  # the parent's close still removes it


@pytest.mark.skipif(not UCX_OK, reason=f"UCX not loadable: {UCX_WHY}")
def test_forked_child_leaves_the_parents_transport_serving() -> None:
    cfg = {"disk_path": "none", "cpu_capacity": "16MiB", "chunk_size": CHUNK, "transport": "ucx"}
    producer = Engine({**cfg, "transport_listen": "127.0.0.1:0"}, Namespace(model="fork"))
    consumer = Engine(cfg, Namespace(model="fork"))
    try:
        producer.set_chunk_bytes(CHUNK_BYTES)
        consumer.set_chunk_bytes(CHUNK_BYTES)
        bufs = [np.full(CHUNK_BYTES, 7 + i, np.uint8) for i in range(NCHUNKS)]
        assert producer.store_buffers(TOKENS, bufs) == NCHUNKS
        assert _fork_and_drop(producer) == 0
        # Before the fix the child's teardown took the listener out of the
        # shared epoll set: this pull timed out.
        assert consumer.pull_from_peer(producer.transport_address(), TOKENS) == len(TOKENS)
        out = [np.zeros(CHUNK_BYTES, np.uint8) for _ in range(NCHUNKS)]
        assert consumer.retrieve_buffers(TOKENS, out) == len(TOKENS)
        for got, want in zip(out, bufs, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        consumer.close()
        producer.close()
