"""Process-wide registry of kvtier engines shared by connector instances.

A worker process opens one engine per (configuration, namespace, shared
catalogue name); connector objects that ask for the same one (a test that
builds two, a connector rebuilt after an error) share it, reference
counted, and the last `release` closes it. Scheduler-side connectors open no
engine at all: they read the workers' catalogues through shared memory (see
ranks.py), so sharing an engine between roles is never needed, and the same
code serves `vllm serve` (scheduler and workers in separate processes) and
the in-process `LLM` class.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import kvtier

_lock = threading.Lock()
_engines: dict[str, tuple[Any, int]] = {}


def _key(config: Any, namespace: Any) -> str:
    def canon(obj: Any) -> Any:
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        if hasattr(obj, "__dict__"):
            return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return obj

    return json.dumps([canon(config), canon(namespace)], sort_keys=True, default=repr)


def acquire(config: Any, namespace: Any, catalogue_shm_name: str = "") -> tuple[str, Any]:
    """Returns (key, engine); the engine is created on first use."""
    key = _key(config, namespace) + "|" + catalogue_shm_name
    with _lock:
        entry = _engines.get(key)
        if entry is None:
            engine = kvtier.Engine(config, namespace=namespace, catalogue_shm_name=catalogue_shm_name)
            _engines[key] = (engine, 1)
            return key, engine
        engine, refs = entry
        _engines[key] = (engine, refs + 1)
        return key, engine


def release(key: str) -> None:
    with _lock:
        entry = _engines.get(key)
        if entry is None:
            return
        engine, refs = entry
        if refs > 1:
            _engines[key] = (engine, refs - 1)
            return
        del _engines[key]
    engine.close()


def engines() -> list[Any]:
    """Live engines in this process (tests and the demo read their stats)."""
    with _lock:
        return [engine for engine, _ in _engines.values()]
