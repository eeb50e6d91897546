"""uvicorn on a daemon thread of the process that owns the engine.

The listening socket is bound on the caller's thread before the server
thread starts, so a port in use or a bad address fails ``start()`` at once
(a vLLM worker then fails its start-up with the reason), and connections
that arrive before uvicorn's loop runs wait in the socket's backlog.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Self

import uvicorn

_log = logging.getLogger("kvtier.controller")


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (config.py's canonical form) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ControllerServer:
    """Serves a FastAPI app on (host, port); port 0 takes a free port."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        # A wildcard bind is reached on loopback from this machine.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{url_host(host)}:{self.port}"

    def start(self) -> Self:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the host process (vLLM) owns logging
            access_log=False,
            lifespan="off",
            loop="asyncio",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"kvtier-controller:{self.port}", daemon=True)
        self._thread.start()
        _log.info("kvtier controller listening on %s", self.url)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
