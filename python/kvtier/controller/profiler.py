"""A sampling profile of this process's threads, as a speedscope file.

Why in-process: py-spy (on PyPI) reads another process's memory through
ptrace, which containers usually forbid (no CAP_SYS_PTRACE, yama); the
controller already runs inside the engine's process, so it samples
``sys._current_frames()`` there and needs no privilege and no extra package.

What it shows: every Python thread's stack at each sample (the vLLM worker's
forward loop, the connector, the controller itself), and every native
thread that has no Python frames (the engine's I/O, write-behind and copy
threads) as a two-frame stack ``<thread name> / <scheduler state>`` read from
/proc/self/task, so a busy native thread shows up as time spent
"running". Native stacks themselves are not read.

The output is speedscope's file format
(https://www.speedscope.app/file-format-schema.json): one "sampled" profile
per thread, weights in seconds. Open it at https://www.speedscope.app or
with the ``speedscope`` command.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from kvtier._version import __version__

SCHEMA = "https://www.speedscope.app/file-format-schema.json"
_STATES = {"R": "running", "S": "sleeping", "D": "disk wait", "T": "stopped", "t": "traced", "Z": "zombie", "I": "idle"}


class _Frames:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self._index: dict[tuple[str, str, int], int] = {}

    def index(self, name: str, file: str = "", line: int = 0) -> int:
        key = (name, file, line)
        found = self._index.get(key)
        if found is None:
            found = len(self.frames)
            frame: dict[str, Any] = {"name": name}
            if file:
                frame["file"] = file
            if line:
                frame["line"] = line
            self.frames.append(frame)
            self._index[key] = found
        return found


def _python_stack(frame: Any, frames: _Frames) -> list[int]:
    stack = []
    while frame is not None:
        code = frame.f_code
        stack.append(frames.index(code.co_qualname, code.co_filename, frame.f_lineno or 0))
        frame = frame.f_back
    stack.reverse()  # speedscope: root first
    return stack


def _native_threads(skip: set[int]) -> dict[int, tuple[str, str]]:
    """tid -> (name, state) of this process's threads not in ``skip``."""
    out: dict[int, tuple[str, str]] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for entry in tids:
        try:
            tid = int(entry)
            if tid in skip:
                continue
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except (ValueError, OSError):
            continue  # the thread ended in between
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        state = stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]
        out[tid] = (name, _STATES.get(state, state))
    return out


class _Thread:
    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[list[int]] = []
        self.weights: list[float] = []


def sample(duration_s: float, interval_s: float = 0.01, *, name: str = "kvtier") -> dict[str, Any]:
    """Samples every thread but the caller's for ``duration_s``; returns the speedscope document."""
    me = threading.get_ident()
    my_native = threading.get_native_id()
    frames = _Frames()
    threads: dict[tuple[str, int], _Thread] = {}
    start = time.perf_counter()
    last = start
    end = start + duration_s
    while True:
        now = time.perf_counter()
        weight = now - last
        last = now
        python_natives = {my_native}
        by_ident = {t.ident: t for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            t = by_ident.get(ident)
            native_id = getattr(t, "native_id", None) if t is not None else None
            if native_id is not None:
                python_natives.add(native_id)
            label = f"{t.name if t is not None else 'thread'} (tid {native_id if native_id is not None else ident})"
            thread = threads.setdefault(("py", ident), _Thread(label))
            thread.samples.append(_python_stack(frame, frames))
            thread.weights.append(weight)
        for tid, (comm, state) in _native_threads(python_natives).items():
            thread = threads.setdefault(("native", tid), _Thread(f"{comm} (tid {tid}, native)"))
            thread.samples.append([frames.index(comm), frames.index(state)])
            thread.weights.append(weight)
        if now >= end:
            break
        # The sampling cadence, not a synchronisation: nothing waits on it.
        time.sleep(min(interval_s, max(0.0, end - time.perf_counter())))
    total = last - start
    profiles = []
    for thread in sorted(threads.values(), key=lambda t: t.name):
        profiles.append({
            "type": "sampled",
            "name": thread.name,
            "unit": "seconds",
            "startValue": 0,
            "endValue": total,
            "samples": thread.samples,
            "weights": thread.weights,
        })
    return {
        "$schema": SCHEMA,
        "name": name,
        "exporter": f"kvtier {__version__}",
        "activeProfileIndex": 0,
        "shared": {"frames": frames.frames},
        "profiles": profiles,
    }


def merge(documents: list[tuple[str, dict[str, Any]]], *, name: str = "kvtier") -> dict[str, Any]:
    """One speedscope document from several (one per controller): each
    profile's name is prefixed with its source, frame indices renumbered."""
    frames: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    for source, doc in documents:
        offset = len(frames)
        frames.extend(doc["shared"]["frames"])
        for p in doc["profiles"]:
            profiles.append({**p, "name": f"{source}: {p['name']}",
                             "samples": [[i + offset for i in s] for s in p["samples"]]})
    return {
        "$schema": SCHEMA,
        "name": name,
        "exporter": f"kvtier {__version__}",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": profiles,
    }
