"""Process-wide registry of kvtier engines shared by connector instances.

vLLM builds two connector objects per engine core: one with the SCHEDULER
role and one with the WORKER role. The scheduler answers "how many tokens are
cached" from the engine's index, and that index must be the one the worker
fills, so both objects must reach the same `kvtier.Engine`. The registry hands
out one engine per (configuration, namespace) and reference-counts it; the
last `release` closes it.

Where this holds: with one worker (`tensor_parallel_size == 1`) vLLM runs the
scheduler and the worker in the same process whether or not
VLLM_ENABLE_V1_MULTIPROCESSING is set (multiprocessing only moves the pair
out of the API process), so they share the engine. With tensor parallelism,
workers are separate processes: each rank opens its own engine under its own
namespace (rank in the namespace), and the scheduler's engine only sees what
is visible through shared tiers (disk, remote). A scheduler that sees less
than the workers just misses; one that sees more is caught on the worker as a
load error and vLLM recomputes, so the mismatch costs hits, never
correctness. A shared-memory index (DESIGN.md) removes the gap.
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


def acquire(config: Any, namespace: Any) -> tuple[str, Any]:
    """Returns (key, engine); the engine is created on first use."""
    key = _key(config, namespace)
    with _lock:
        entry = _engines.get(key)
        if entry is None:
            engine = kvtier.Engine(config, namespace=namespace)
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
