"""Long engine operations (a move) as tasks the API can be asked about.

The engine returns a task object (``done()``, ``wait(timeout_s)``,
``result()``); the controller keeps it under a random id so that
``GET /v1/tasks/{id}`` and ``/v1/async`` can report on it. Finished tasks are
forgotten oldest first beyond ``keep``; running ones are never forgotten.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class TaskEntry:
    task_id: str
    kind: str
    task: Any
    started: float  # time.monotonic()

    def report(self) -> dict[str, Any]:
        done = bool(self.task.done())
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "kind": self.kind,
            "done": done,
            "age_s": round(time.monotonic() - self.started, 3),
            "result": None,
            "error": None,
        }
        if done:
            try:
                result = self.task.result()
            except Exception as exc:  # noqa: BLE001 - the engine's error is the task's outcome
                out["error"] = f"{type(exc).__name__}: {exc}"
            else:
                out["result"] = dict(result) if result is not None else {}
        return out


class TaskRegistry:
    def __init__(self, keep: int = 1024) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._tasks: OrderedDict[str, TaskEntry] = OrderedDict()

    def add(self, kind: str, task: Any) -> str:
        task_id = secrets.token_hex(8)
        with self._lock:
            self._tasks[task_id] = TaskEntry(task_id, kind, task, time.monotonic())
            self._forget_finished()
        return task_id

    def get(self, task_id: str) -> TaskEntry | None:
        with self._lock:
            return self._tasks.get(task_id)

    def entries(self) -> list[TaskEntry]:
        with self._lock:
            return list(self._tasks.values())

    def _forget_finished(self) -> None:
        excess = len(self._tasks) - self._keep
        if excess <= 0:
            return
        for task_id in [t for t, e in self._tasks.items() if e.task.done()][:excess]:
            del self._tasks[task_id]
