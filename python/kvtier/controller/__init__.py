"""kvtier's controller: an HTTP API served by the process that owns an engine.

    from kvtier.controller import serve
    handle = serve(engine, engine.config, rank=0)   # config.controller_listen
    ...
    handle.stop()

Endpoints, auth and errors: docs/controller.md; the schema: docs/openapi.json
(``kvtier controller-openapi`` regenerates it). Under vLLM,
KVTierConnector's worker starts one per rank (``start_for_vllm_worker``) on
``PORT + rank`` when ``controller_listen`` is set, and stops it in shutdown.

Engines shared by several connectors in one process (kvtier.vllm.registry)
share their controller too: ``serve`` for an address this process already
serves for the same engine returns another reference to that server.
"""

from __future__ import annotations

import threading
from typing import Any

from kvtier.config import Config, ConfigError

__all__ = ["ControllerHandle", "openapi_schema", "serve", "start_for_vllm_worker"]

_lock = threading.Lock()
# (host, port) -> (server, engine, references)
_servers: dict[tuple[str, int], tuple[Any, Any, int]] = {}


class ControllerHandle:
    """One reference to a running controller; ``stop()`` drops it, and the
    last reference stops the server. Idempotent."""

    def __init__(self, key: tuple[str, int], server: Any) -> None:
        self._key: tuple[str, int] | None = key
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.url)

    def stop(self) -> None:
        with _lock:
            if self._key is None:
                return
            server, engine, refs = _servers[self._key]
            if refs > 1:
                _servers[self._key] = (server, engine, refs - 1)
                self._key = None
                return
            del _servers[self._key]
            self._key = None
        server.stop()


def serve(engine: Any, config: Config, *, rank: int = 0, tokenizer: Any = None, port: int | None = None) -> ControllerHandle:
    """Starts the controller for ``engine`` on ``config.controller_listen``,
    port + rank (``port`` overrides the configured one; 0 takes a free
    port). Raises ConfigError when the address is not loopback and no token
    is configured, or the port is out of range; OSError when it cannot bind."""
    from kvtier.controller.app import create_app
    from kvtier.controller.auth import check_bind, resolve_token
    from kvtier.controller.server import ControllerServer, split_listen

    if not config.controller_listen:
        raise ConfigError("controller_listen is not set")
    host, base = split_listen(config.controller_listen)
    if port is None:
        port = base + rank
        if port > 65535:
            raise ConfigError(f"controller_listen {config.controller_listen!r}: rank {rank} would serve on port {port} > 65535")
    token = resolve_token(config)
    check_bind(config.controller_listen, token)
    with _lock:
        key = (host, port)
        found = _servers.get(key) if port else None
        if found is not None:
            server, served, refs = found
            if served is not engine:
                raise ConfigError(f"controller {host}:{port} already serves another engine in this process")
            _servers[key] = (server, served, refs + 1)
            return ControllerHandle(key, server)
        app = create_app(engine, rank=rank, token=token, tokenizer=tokenizer)
        server = ControllerServer(app, host, port).start()
        key = (host, server.port)
        _servers[key] = (server, engine, 1)
        return ControllerHandle(key, server)


def start_for_vllm_worker(engine: Any, config: Config, vllm_config: Any, rank: int) -> ControllerHandle:
    """The controller of a vLLM worker rank's engine; request text is
    tokenized with the served model's tokenizer, loaded on first use."""

    def tokenize(text: str, add_special_tokens: bool) -> list[int]:
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        if tokenizer is None:
            raise ValueError("the server runs with skip_tokenizer_init: send tokens")
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=add_special_tokens)]

    return serve(engine, config, rank=rank, tokenizer=tokenize)


def openapi_schema() -> dict[str, Any]:
    """The controller's OpenAPI document (what /openapi.json serves)."""
    from kvtier.controller.app import create_app

    return create_app(None).openapi()
