"""Real redis-server processes for tests and benchmarks: one node, or a
Redis Cluster of several masters made with ``redis-cli --cluster create``.
Debian's redis-server and redis-tools (tools/setup.sh installs them). Each
server lives in its own directory, binds 127.0.0.1 on a free port, keeps
nothing on disk, and is killed by stop() (or the context manager)."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self


def free_port(bus_too: bool = False) -> int:
    """A free local port (with port + 10000 free too, for a cluster's bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not bus_too:
            return port
        if port + 10000 >= 65536:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


class RedisServer:
    def __init__(self, *extra: str, port: int | None = None, workdir: str | Path | None = None) -> None:
        self.port = port or free_port(bus_too="--cluster-enabled" in extra)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="kvtier-redis-")
        self.dir = Path(workdir) if workdir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Self:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while self.cli("ping") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def cli(self, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    def dbsize(self) -> int:
        out = self.cli("dbsize")
        return int(out) if out.isdigit() else 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisCluster:
    """``masters`` redis-server processes in cluster mode, slots spread evenly."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                  "--cluster-node-timeout", "2000") for _ in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes)

    def start(self, timeout_s: float = 60.0) -> Self:
        for n in self.nodes:
            n.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.addr for n in self.nodes), "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, text=True, check=True,
        )
        deadline = time.monotonic() + timeout_s
        while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def dbsize(self) -> int:
        return sum(n.dbsize() for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
