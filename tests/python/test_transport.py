"""The peer transport (cc/transport, UCX) through the installed package:
a producer process serves the chunks of its CPU tier, a consumer pulls them
into its own; dead, garbage, corrupted and truncated transfers are misses,
never exceptions or wrong KV; the extension imports without UCX.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kvtier import _kvtier
from kvtier.config import ConfigError, load_config
from kvtier.engine import Engine, KeyExtras, Namespace

CHUNK, CHUNK_BYTES, NCHUNKS = 16, 8192, 12
UCX_OK, UCX_WHY = _kvtier.ucx_status()
needs_ucx = pytest.mark.skipif(not UCX_OK, reason=f"UCX not loadable: {UCX_WHY}")

PRODUCER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from kvtier.engine import Engine, KeyExtras, Namespace
    chunk, chunk_bytes, n = {chunk}, {chunk_bytes}, {nchunks}
    e = Engine({{"transport": "ucx", "transport_listen": "127.0.0.1:0", "disk_path": "none",
                "cpu_capacity": "32MiB", "chunk_size": chunk}}, Namespace(model="transport-test"))
    e.set_chunk_bytes(chunk_bytes)
    tokens = np.arange(1000, 1000 + chunk * n)
    bufs = [np.random.default_rng(i).integers(0, 256, chunk_bytes, dtype=np.uint8) for i in range(n)]
    assert e.store_buffers(tokens, bufs) == n
    assert e.store_buffers(tokens, bufs, extras=KeyExtras(salt="lora-a")) == n
    print("ADDR", e.transport_address(), e.hold_for_peer(tokens, seconds=600), flush=True)
    for line in sys.stdin:  # "stats": print them; EOF: leave
        print("STATS", e.stats()["transport"], flush=True)
    e.close()
    """
)


def expected_chunks(n: int = NCHUNKS) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, CHUNK_BYTES, dtype=np.uint8) for i in range(n)]


TOKENS = np.arange(1000, 1000 + CHUNK * NCHUNKS)


class Producer:
    def __init__(self) -> None:
        script = PRODUCER.format(chunk=CHUNK, chunk_bytes=CHUNK_BYTES, nchunks=NCHUNKS)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self._line("ADDR").split()
        self.address, self.held = line[0], int(line[1])

    def _line(self, tag: str) -> str:
        # UCX may log to stdout too: the producer tags its own lines.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return line[len(tag) + 1 :]
        raise AssertionError(f"producer exited (rc {self.proc.poll()}) before printing {tag}")

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(ast.literal_eval(self._line("STATS")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def producer() -> Iterator[Producer]:
    p = Producer()
    try:
        yield p
    finally:
        p.stop()
        if p.proc.poll() is None:
            p.proc.kill()


def consumer(**over: object) -> Engine:
    cfg: dict[str, object] = {"transport": "ucx", "disk_path": "none", "cpu_capacity": "32MiB", "chunk_size": CHUNK}
    cfg.update(over)
    e = Engine(cfg, Namespace(model="transport-test"))
    e.set_chunk_bytes(CHUNK_BYTES)
    return e


def retrieved(e: Engine, tokens: np.ndarray, extras: KeyExtras | None = None) -> list[np.ndarray]:
    n = len(tokens) // CHUNK
    out = [np.zeros(CHUNK_BYTES, dtype=np.uint8) for _ in range(n)]
    got = e.retrieve_buffers(tokens, out, extras=extras)
    return out[: got // CHUNK]


@needs_ucx
def test_two_processes_share_chunks(producer: Producer) -> None:
    assert producer.held == NCHUNKS
    c = consumer()
    try:
        assert c.transport_address() is None  # a consumer does not serve
        assert c.pull_from_peer(producer.address, TOKENS) == len(TOKENS)
        want = expected_chunks()
        got = retrieved(c, TOKENS)
        assert len(got) == NCHUNKS and all((g == w).all() for g, w in zip(got, want, strict=True))
        s = c.stats()["transport"]
        assert (s["pulls"], s["chunks_pulled"], s["bytes_pulled"]) == (1, NCHUNKS, NCHUNKS * CHUNK_BYTES)
        assert s["misses"] == s["corrupt"] == s["timeouts"] == s["errors"] == 0
        ps = producer.stats()
        assert ps["chunks_served"] == NCHUNKS
        assert ps["holds"] == 0  # the pull released the producer's hold
        # Another identity (extras) is other chunks: pulled separately.
        lora = KeyExtras(salt="lora-a")
        assert c.lookup(TOKENS, extras=lora) == 0
        assert c.pull_from_peer(producer.address, TOKENS, extras=lora) == len(TOKENS)
        assert c.lookup(TOKENS, extras=lora) == len(TOKENS)
    finally:
        c.close()


@needs_ucx
@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_corrupted_and_truncated_transfers_are_misses(producer: Producer, fault: str) -> None:
    c = consumer()
    try:
        c.set_transport_fault(fault)
        assert c.pull_from_peer(producer.address, TOKENS) == 0
        assert c.lookup(TOKENS) == 0  # nothing unchecked was filed
        s = c.stats()["transport"]
        assert s["corrupt"] == 1 and s["misses"] == 1 and s["chunks_pulled"] == 0
        c.set_transport_fault("none")
        assert c.pull_from_peer(producer.address, TOKENS) == len(TOKENS)
        assert all((g == w).all() for g, w in zip(retrieved(c, TOKENS), expected_chunks(), strict=True))
    finally:
        c.close()


@needs_ucx
def test_fault_from_the_environment_in_another_process(producer: Producer) -> None:
    """KVTIER_TRANSPORT_FAULT reaches engines a test cannot call (vllm serve workers)."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from kvtier.engine import Engine, Namespace
        e = Engine({{"transport": "ucx", "disk_path": "none", "cpu_capacity": "32MiB", "chunk_size": {CHUNK}}},
                   Namespace(model="transport-test"))
        e.set_chunk_bytes({CHUNK_BYTES})
        print("RESULT", e.pull_from_peer("{producer.address}", np.arange(1000, {1000 + CHUNK * NCHUNKS})),
              e.stats()["transport"]["corrupt"])
        """
    )
    env = dict(os.environ, KVTIER_TRANSPORT_FAULT="corrupt")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")] == ["RESULT 0 1"]


@needs_ucx
def test_dropped_request_is_a_timeout_not_a_hang(producer: Producer) -> None:
    c = consumer(transport_timeout_ms=300)
    try:
        c.set_transport_fault("drop")
        assert c.pull_from_peer(producer.address, TOKENS) == 0
        s = c.stats()["transport"]
        assert s["timeouts"] == 1 and s["misses"] == 1
        c.set_transport_fault("none")  # the next pull reconnects and works
        assert c.pull_from_peer(producer.address, TOKENS) == len(TOKENS)
    finally:
        c.close()


@needs_ucx
def test_dead_or_absent_peer_is_a_miss(producer: Producer) -> None:
    c = consumer(transport_timeout_ms=2000)
    try:
        half = TOKENS[: CHUNK * 4]
        assert c.pull_from_peer(producer.address, half) == len(half)
        producer.proc.kill()
        producer.proc.wait()
        # The local prefix stays; the rest is a miss, not an exception.
        assert c.pull_from_peer(producer.address, TOKENS) == len(half)
        assert c.pull_from_peer("127.0.0.1:1", TOKENS) == len(half)
        assert c.pull_from_peer("no such address", TOKENS) == len(half)
        s = c.stats()["transport"]
        assert s["misses"] == 3 and s["errors"] + s["timeouts"] >= 3
    finally:
        c.close()


def _ucx_at_least(major: int, minor: int) -> bool:
    parts = _kvtier.ucx_version().split(".")
    return len(parts) >= 2 and (int(parts[0]), int(parts[1])) >= (major, minor)


@needs_ucx
def test_garbage_on_the_listen_port_does_not_hurt_the_producer(producer: Producer) -> None:
    host, port = producer.address.rsplit(":", 1)
    payloads = [b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b"\x00" * 8]
    # UCX 1.13's TCP connection manager aborts the process on a zeroed
    # 64-byte preamble (an assertion in uct_tcp_sockcm_ep_recv; UCX 1.22
    # survives it). See cc/transport/README.md "UCX version".
    if _ucx_at_least(1, 14):
        payloads.append(b"\x00" * 64)
    for payload in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
    c = consumer()
    try:
        assert c.pull_from_peer(producer.address, TOKENS) == len(TOKENS)
    finally:
        c.close()
    assert producer.proc.poll() is None


@needs_ucx
def test_hold_expires_without_a_pull() -> None:
    p = consumer(transport_listen="127.0.0.1:0")
    try:
        tokens = np.arange(CHUNK * 3)
        p.store_buffers(tokens, [np.full(CHUNK_BYTES, i, dtype=np.uint8) for i in range(3)])
        assert p.hold_for_peer(tokens, seconds=0.05) == 3
        assert p.stats()["transport"]["holds"] in (0, 3)
        deadline = time.monotonic() + 30
        while p.stats()["transport"]["holds_expired"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the producer's sweep, an event with no hook to wait on
        s = p.stats()["transport"]
        assert s["holds_expired"] == 3 and s["holds"] == 0
        with pytest.raises(_kvtier.InvalidArgumentError):
            p.hold_for_peer(tokens, seconds=0)
    finally:
        p.close()


@needs_ucx
def test_hold_stages_chunks_found_on_disk_only(tmp_path: Path) -> None:
    """A producer's store skips chunks already filed; after a restart or a CPU
    eviction those are on disk only. The hold promotes them into the CPU tier
    (pulls serve from CPU), so the consumer still gets every chunk, exactly."""
    p = consumer(transport_listen="127.0.0.1:0", disk_path=str(tmp_path / "p"))
    c = consumer()
    try:
        tokens = np.arange(CHUNK * 4)
        bufs = [np.random.default_rng(i).integers(0, 256, CHUNK_BYTES, dtype=np.uint8) for i in range(4)]
        p.store_buffers(tokens, bufs)
        task = p.move(tokens, "disk")
        assert task.wait(30) and task.result()["moved"] == 4
        assert p.lookup_tiers(tokens)["by_tier"] == {"cpu": 0, "disk": 4}
        assert p.hold_for_peer(tokens, seconds=600) == 4
        assert p.lookup_tiers(tokens)["by_tier"]["cpu"] == 4
        assert c.pull_from_peer(p.transport_address(), tokens) == len(tokens)
        got = retrieved(c, tokens)
        assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, bufs))
        assert p.stats()["transport"]["holds"] == 0  # the pull released them
    finally:
        c.close()
        p.close()


AFFINITY = textwrap.dedent(
    """
    import json, os, threading
    from kvtier.engine import Engine, Namespace
    a, b = sorted(os.sched_getaffinity(0))[:2]
    pinned, stop = threading.Event(), threading.Event()
    def omp_thread():  # as vLLM's CPU worker binds its OpenMP threads, one per core
        os.sched_setaffinity(0, {{b}})
        pinned.set()
        stop.wait()
    threading.Thread(target=omp_thread, daemon=True).start()
    pinned.wait()
    os.sched_setaffinity(0, {{a}})  # the main thread, which creates the engine
    e = Engine({{"transport": "ucx", "transport_listen": "127.0.0.1:0", "disk_path": "none",
                "cpu_capacity": "16MiB", "chunk_size": 16}}, Namespace(model="affinity"))
    e.set_chunk_bytes(8192)
    threads = {{}}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{{tid}}/comm") as f:
            threads.setdefault(f.read().strip(), []).append(sorted(os.sched_getaffinity(int(tid))))
    print(json.dumps({{"a": a, "b": b, "main": sorted(os.sched_getaffinity(0)), "threads": threads}}))
    e.close()
    """
)


@needs_ucx
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("mode", ["default", "inherit"])
def test_threads_run_on_the_process_cpus_not_the_creators_core(mode: str) -> None:
    """vLLM's CPU worker pins its main thread to one core. Threads kvtier starts
    there (copy pool, UCX's async thread, which accepts peers' connections)
    used to inherit that one core and, under load, stayed runnable for seconds
    without running: a producer never accepted a consumer in time. They run on
    every core the process's threads use; KVTIER_THREAD_AFFINITY=inherit keeps
    the old behaviour."""
    import json

    env = dict(os.environ)
    env.pop("KVTIER_THREAD_AFFINITY", None)
    if mode == "inherit":
        env["KVTIER_THREAD_AFFINITY"] = "inherit"
    out = subprocess.run([sys.executable, "-c", AFFINITY.format()], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    a, b, threads = r["a"], r["b"], r["threads"]
    assert r["main"] == [a]  # the creator keeps its own
    ours = threads["async"] + [m for name, ms in threads.items() if name.startswith("kvt-copy") for m in ms]
    assert len(ours) >= 2, threads
    want = [a] if mode == "inherit" else sorted({a, b})
    assert all(m == want for m in ours), threads


def test_transport_off_by_default_and_its_methods_say_so() -> None:
    e = Engine({"disk_path": "none", "cpu_capacity": "16MiB"})
    try:
        assert e.transport_address() is None
        assert e.stats()["transport"]["pulls"] == 0
        with pytest.raises(_kvtier.FailedPreconditionError, match="transport: ucx"):
            e.pull_from_peer("127.0.0.1:1", [1, 2, 3])
        with pytest.raises(_kvtier.FailedPreconditionError):
            e.hold_for_peer([1, 2, 3], seconds=1)
    finally:
        e.close()


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"transport": "rdma"}, "'transport'"),
        ({"transport_listen": "127.0.0.1:7000"}, "only with transport: ucx"),
        ({"transport": "ucx", "transport_listen": "127.0.0.1:70000"}, "[0, 65535]"),
        ({"transport": "ucx", "transport_listen": "7000"}, "HOST:PORT"),
        ({"transport_timeout_ms": 0}, "'transport_timeout_ms'"),
        ({"producer_pin_seconds": 0}, "'producer_pin_seconds'"),
    ],
)
def test_config_is_validated(over: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(over)
    assert needle in str(err.value)


def test_config_defaults_and_canonical_listen() -> None:
    c = load_config({})
    assert (c.transport, c.transport_listen, c.transport_timeout_ms, c.producer_pin_seconds) == ("none", "", 5000, 60.0)
    c = load_config({"transport": "ucx", "transport_listen": " [::1]:0 "})
    assert c.transport_listen == "[::1]:0"


def test_extension_does_not_need_libucx(tmp_path: Path) -> None:
    """UCX is dlopen'ed when a transport starts: the extension names no UCX
    library, and with every libucp/libucs of this machine hidden (a private
    mount namespace binds /dev/null over them) kvtier imports and runs with
    transport: none, and transport: ucx fails with a clear error."""
    ext = Path(_kvtier.__file__)
    needed = subprocess.run(["readelf", "-d", str(ext)], capture_output=True, text=True, check=True).stdout
    assert "NEEDED" in needed
    assert not any(lib in needed for lib in ("libucp", "libucs", "libuct", "libucm"))
    libs = sorted(
        str(p) for d in ("/usr/lib", "/lib", "/usr/local/lib") for p in Path(d).rglob("libuc[pst]*.so*") if p.is_file()
    )
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to hide the system's libucx")
    script = textwrap.dedent(
        """
        import numpy as np
        from kvtier import _kvtier
        from kvtier.engine import Engine
        ok, why = _kvtier.ucx_status()
        assert not ok and "UCX not found: install libucx0" in why, why
        e = Engine({"disk_path": "none", "cpu_capacity": "16MiB", "chunk_size": 16})
        e.set_chunk_bytes(4096)
        assert e.store_buffers(np.arange(16), [np.full(4096, 7, dtype=np.uint8)]) == 1
        assert e.lookup(np.arange(16)) == 16
        e.close()
        try:
            Engine({"transport": "ucx", "disk_path": "none", "cpu_capacity": "16MiB"})
        except _kvtier.FailedPreconditionError as exc:
            assert "UCX not found" in str(exc), exc
        else:
            raise AssertionError("transport: ucx started without UCX")
        print("ok")
        """
    )
    (tmp_path / "probe.py").write_text(script)
    hide = " && ".join(f"mount --bind /dev/null {lib}" for lib in libs) or "true"
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_UCX_LIB_DIR"}
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{hide} && exec {sys.executable} {tmp_path / 'probe.py'}"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.splitlines()[-1:] == ["ok"], r.stdout + r.stderr
