"""The controller API (kvtier.controller) and its CLI over an in-process engine.

Each test serves a real kvtier.Engine (CPU and disk tiers) with uvicorn on
a free loopback port and talks to it over HTTP with httpx, as an operator's
tools would. The same API under a real `vllm serve` is
tests/e2e/test_vllm_controller.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kvtier.cli import main as kvtier_main
from kvtier.config import ConfigError, load_config
from kvtier.controller import openapi_schema, serve
from kvtier.controller.auth import resolve_token
from kvtier.engine import Engine

REPO = Path(__file__).resolve().parents[2]
CHUNK = 16
CHUNK_BYTES = 1024
TOKEN = "s3cret-token"


def tokenize(text: str, add_special_tokens: bool) -> list[int]:
    """The test's 'model tokenizer': whitespace-separated integers, a BOS (1) in front."""
    if "refuse" in text:
        raise ValueError("this tokenizer refuses the word 'refuse'")
    ids = [int(w) for w in text.split()]
    return ([1] + ids) if add_special_tokens else ids


def make_engine(tmp_path: Path, **over: Any) -> Engine:
    cfg = {"chunk_size": CHUNK, "cpu_capacity": "64MiB", "disk_path": str(tmp_path / "disk"),
           "disk_capacity": "64MiB", "controller_listen": "127.0.0.1:1"}
    cfg.update(over)
    engine = Engine(load_config(cfg, environ={}))
    engine.set_chunk_bytes(CHUNK_BYTES)
    return engine


def store(engine: Engine, tokens: list[int]) -> None:
    n = len(tokens) // CHUNK
    engine.store_buffers(tokens, [np.full(CHUNK_BYTES, i % 251, np.uint8) for i in range(n)])
    engine.flush()


PREFIX = list(range(100, 100 + 4 * CHUNK))  # 4 whole chunks


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(tmp_path)
    store(e, PREFIX)
    yield e
    if not e.closed:
        e.close()


@pytest.fixture
def controller(engine: Engine) -> Iterator[Any]:
    handle = serve(engine, engine.config, port=0, tokenizer=tokenize)
    yield handle
    handle.stop()


@pytest.fixture
def client(controller: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=controller.url, timeout=60) as c:
        yield c


# ----------------------------------------------------------------- reads


def test_stats_moves_with_traffic(engine: Engine, client: httpx.Client) -> None:
    before = client.get("/v1/stats").json()
    assert before["rank"] == 0
    store(engine, list(range(5000, 5000 + 2 * CHUNK)))
    after = client.get("/v1/stats").json()["stats"]
    assert after["chunks_stored"] == before["stats"]["chunks_stored"] + 2
    assert after["tiers"]["cpu"]["entries"] == before["stats"]["tiers"]["cpu"]["entries"] + 2


def test_lookup_by_tokens_and_by_text(engine: Engine, client: httpx.Client) -> None:
    r = client.post("/v1/lookup", json={"tokens": PREFIX + [7, 7, 7]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["query_tokens"], body["cached_tokens"], body["chunk_tokens"]) == (4 * CHUNK + 3, 4 * CHUNK, CHUNK)
    # Text goes through the served model's tokenizer: with its BOS the
    # tokens differ from PREFIX, without it they are PREFIX.
    text = " ".join(map(str, PREFIX))
    assert client.post("/v1/lookup", json={"text": text}).json()["cached_tokens"] == 0
    r = client.post("/v1/lookup", json={"text": text, "add_special_tokens": False})
    assert r.json()["cached_tokens"] == 4 * CHUNK
    assert [c["index"] for c in body["chunks"]] == [0, 1, 2, 3]
    assert all(set(c["tiers"]) == {"cpu", "disk"} and not c["pinned"] for c in body["chunks"])
    assert body["by_tier"] == {"cpu": 4, "disk": 4}
    # A lookup through the API is not a lookup the hit rate counts.
    assert engine.stats()["lookups"] == 0


def test_cache_salt_is_part_of_the_key(engine: Engine, client: httpx.Client) -> None:
    salted = list(range(9000, 9000 + 2 * CHUNK))
    from kvtier.engine import KeyExtras

    # What KVTierConnector derives for a request carrying only cache_salt.
    extras = KeyExtras(salt=json.dumps([["cache_salt", "tenant-a"]], separators=(",", ":")))
    engine.store_buffers(salted, [np.zeros(CHUNK_BYTES, np.uint8)] * 2, extras=extras)
    assert client.post("/v1/lookup", json={"tokens": salted}).json()["cached_tokens"] == 0
    assert client.post("/v1/lookup", json={"tokens": salted, "cache_salt": "tenant-a"}).json()["cached_tokens"] == 2 * CHUNK


def test_text_without_a_tokenizer_is_a_400(engine: Engine) -> None:
    handle = serve(engine, engine.config, port=0)
    try:
        r = httpx.post(handle.url + "/v1/lookup", json={"text": "1 2 3"})
        assert r.status_code == 400 and "tokenizer" in r.json()["detail"]
    finally:
        handle.stop()


def test_health_ok_then_down_when_the_engine_is_closed(engine: Engine, client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] in ("ok", "degraded"), r.text
    engine.close()
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "down" and r.json()["reasons"]


def test_health_degraded_when_the_disk_directory_is_gone(tmp_path: Path, engine: Engine, client: httpx.Client) -> None:
    import shutil

    shutil.rmtree(tmp_path / "disk")
    r = client.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "degraded" and body["tiers"]["disk"]["status"] == "degraded", body
    assert body["reasons"], body


def test_metrics_are_prometheus_text(engine: Engine, client: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = [s for f in text_string_to_metric_families(r.text) for s in f.samples]
    assert samples and all(s.name.startswith("kvtier_") for s in samples), {s.name for s in samples}
    assert {s.labels.get("rank") for s in samples} == {"0"}  # this engine's rank on every series
    stored = [s.value for s in samples if (s.name, s.labels.get("operation")) == ("kvtier_chunks_total", "store")]
    assert stored == [engine.stats()["chunks_stored"]] == [4]
    # The index-consistency SLI appears once a verify ran, with its result.
    assert "kvtier_index_consistent" not in r.text
    assert client.post("/v1/verify", json={}).json()["consistent"] is True
    samples = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
    assert [(s.labels["rank"], s.value) for s in samples if s.name == "kvtier_index_consistent"] == [("0", 1.0)]


def test_async_reports_queues(client: httpx.Client) -> None:
    body = client.get("/v1/async").json()
    assert body["tasks_running"] == [] and isinstance(body["queues"], dict) and body["queues"]


# ----------------------------------------------------------------- writes


def pinned(engine: Engine) -> list[bool]:
    return [c["pinned"] for c in engine.lookup_tiers(PREFIX)["chunks"]]


def test_pin_then_unpin(engine: Engine, client: httpx.Client) -> None:
    r = client.post("/v1/pin", json={"tokens": PREFIX})
    assert r.status_code == 200 and r.json()["pinned"] == 4, r.text
    assert pinned(engine) == [True] * 4
    assert client.post("/v1/clear", json={"all": True}).json()["cleared"] == 0  # pinned: kept
    r = client.post("/v1/unpin", json={"tokens": PREFIX})
    assert r.status_code == 200 and r.json()["unpinned"] == 4, r.text
    assert pinned(engine) == [False] * 4


def test_pin_with_ttl(engine: Engine, client: httpx.Client) -> None:
    r = client.post("/v1/pin", json={"tokens": PREFIX, "ttl_s": 3600})
    assert r.status_code == 200 and r.json()["pinned"] == 4, r.text
    assert pinned(engine) == [True] * 4
    assert engine.expire_pins_now(ahead_s=3599) == 0  # not due yet
    assert engine.expire_pins_now(ahead_s=3601) == 4  # the engine's clock moved past the TTL
    assert pinned(engine) == [False] * 4


def test_clear_all_makes_the_prefix_a_miss(engine: Engine, client: httpx.Client) -> None:
    r = client.post("/v1/clear", json={"all": True})
    assert r.status_code == 200 and r.json()["cleared"] == 4, r.text
    assert engine.lookup(PREFIX) == 0


def test_clear_by_prefix_and_tier(engine: Engine, client: httpx.Client) -> None:
    other = list(range(7000, 7000 + 2 * CHUNK))
    store(engine, other)
    r = client.post("/v1/clear", json={"tokens": PREFIX})
    assert r.status_code == 200 and r.json()["cleared"] >= 4, r.text
    assert engine.lookup(PREFIX) == 0 and engine.lookup(other) == 2 * CHUNK
    r = client.post("/v1/clear", json={"tiers": ["cpu"]})
    assert r.status_code == 200 and r.json()["cleared"] == 2, r.text
    assert engine.lookup_tiers(other)["by_tier"] == {"cpu": 0, "disk": 2}  # still on disk
    r = client.post("/v1/clear", json={"older_than_s": 3600})
    assert r.status_code == 200 and r.json()["cleared"] == 0, r.text  # all used just now


def wait_task(client: httpx.Client, task_id: str) -> dict[str, Any]:
    while not (task := client.get(f"/v1/tasks/{task_id}").json())["done"]:
        time.sleep(0.02)  # polling the engine's move thread, which finishes it
    return dict(task)


def test_move_between_tiers(engine: Engine, client: httpx.Client) -> None:
    r = client.post("/v1/move", json={"tokens": PREFIX, "tier": "disk"})
    assert r.status_code == 202, r.text
    task = wait_task(client, r.json()["task_id"])
    assert task["kind"] == "move" and task["error"] is None and task["result"]["moved"] == 4, task
    assert engine.lookup_tiers(PREFIX)["by_tier"] == {"cpu": 0, "disk": 4}
    r = client.post("/v1/move", json={"text": " ".join(map(str, PREFIX)), "add_special_tokens": False, "tier": "cpu"})
    task = wait_task(client, r.json()["task_id"])
    assert task["result"]["moved"] == 4, task
    assert engine.lookup_tiers(PREFIX)["by_tier"] == {"cpu": 4, "disk": 4}


def test_verify_reports_consistency(engine: Engine, client: httpx.Client) -> None:
    r = client.post("/v1/verify", json={"deep": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["consistent"] is True and body["entries"] >= 4 and body["corrupt"] == 0


class _Task:
    """An engine task whose end the test decides."""

    def __init__(self) -> None:
        self.finished = threading.Event()

    def done(self) -> bool:
        return self.finished.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.finished.wait(timeout_s)

    def result(self) -> dict[str, Any]:
        return {"chunks_moved": 4}


class _MovingEngine:
    """A real engine with a move() the test controls: the controller's task
    plumbing is tested on its own."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.task = _Task()
        self.moves: list[tuple[list[int], str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def move(self, tokens: list[int], tier: str, *, extras: Any = None) -> _Task:
        self.moves.append((list(tokens), tier))
        return self.task


def test_task_lifecycle(engine: Engine) -> None:
    fake = _MovingEngine(engine)
    handle = serve(fake, engine.config, port=0)
    try:
        with httpx.Client(base_url=handle.url) as c:
            r = c.post("/v1/move", json={"tokens": PREFIX, "tier": "cpu"})
            assert r.status_code == 202, r.text
            task_id = r.json()["task_id"]
            assert fake.moves == [(PREFIX, "cpu")]
            running = c.get("/v1/async").json()["tasks_running"]
            assert [t["task_id"] for t in running] == [task_id] and running[0]["done"] is False
            assert c.get(f"/v1/tasks/{task_id}").json()["result"] is None
            fake.task.finished.set()
            task = c.get(f"/v1/tasks/{task_id}").json()
            assert task["done"] is True and task["result"] == {"chunks_moved": 4} and task["error"] is None
            assert c.get("/v1/async").json()["tasks_running"] == []
    finally:
        handle.stop()


class _SlowVerifyEngine:
    """A real engine whose verify() waits until the test releases it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def verify(self, *, deep: bool = False) -> dict[str, Any]:
        self.entered.set()
        self.release.wait()
        return dict(self._engine.verify(deep=deep))


def test_a_long_engine_call_does_not_block_the_others(engine: Engine) -> None:
    slow = _SlowVerifyEngine(engine)
    handle = serve(slow, engine.config, port=0)
    answers: list[int] = []
    try:
        caller = threading.Thread(target=lambda: answers.append(httpx.post(handle.url + "/v1/verify", timeout=60).status_code))
        caller.start()
        slow.entered.wait()
        # The verify holds a worker thread; the event loop still serves.
        assert httpx.get(handle.url + "/health").status_code == 200
        assert httpx.get(handle.url + "/v1/stats").status_code == 200
        assert answers == []  # still in the engine
        slow.release.set()
        caller.join()
        assert answers == [200]
    finally:
        slow.release.set()
        handle.stop()


def test_a_port_in_use_fails_at_start(engine: Engine) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError):
            serve(engine, engine.config, port=taken.getsockname()[1])


# ----------------------------------------------------------------- bad input


BAD_INPUT: list[tuple[str, str, Any, int]] = [
    ("POST", "/v1/lookup", {}, 422),
    ("POST", "/v1/lookup", {"tokens": []}, 422),
    ("POST", "/v1/lookup", {"tokens": [-1]}, 422),
    ("POST", "/v1/lookup", {"tokens": [2**31]}, 422),
    ("POST", "/v1/lookup", {"tokens": ["1"]}, 422),
    ("POST", "/v1/lookup", {"tokens": [1.5]}, 422),
    ("POST", "/v1/lookup", {"tokens": [True]}, 422),
    ("POST", "/v1/lookup", {"tokens": [1], "text": "1"}, 422),
    ("POST", "/v1/lookup", {"tokns": [1]}, 422),
    ("POST", "/v1/lookup", "not json", 422),
    ("POST", "/v1/lookup", {"text": "refuse this"}, 400),
    ("POST", "/v1/lookup", {"text": ""}, 422),
    ("POST", "/v1/clear", {}, 422),
    ("POST", "/v1/clear", {"tier": ["cpu"]}, 422),
    ("POST", "/v1/clear", {"tiers": ["gpu"]}, 422),
    ("POST", "/v1/clear", {"tiers": []}, 422),
    ("POST", "/v1/clear", {"tiers": ["remote"]}, 422),
    ("POST", "/v1/clear", {"older_than_s": -1}, 422),
    ("POST", "/v1/clear", {"older_than_s": 0}, 422),
    ("POST", "/v1/clear", {"all": "yes"}, 422),
    ("POST", "/v1/clear", {"all": True, "tokens": PREFIX}, 422),
    ("POST", "/v1/clear", {"tokens": PREFIX, "text": "1"}, 422),
    ("POST", "/v1/clear", {"text": "refuse"}, 400),
    ("POST", "/v1/clear", {"tiers": ["cpu"], "cache_salt": "a"}, 422),
    ("POST", "/v1/pin", {}, 422),
    ("POST", "/v1/pin", {"tokens": PREFIX, "ttl_s": -5}, 422),
    ("POST", "/v1/pin", {"tokens": PREFIX, "ttl_s": "10"}, 422),
    ("POST", "/v1/pin", {"tokens": PREFIX, "ttl": 10}, 422),
    ("POST", "/v1/unpin", {"tokens": None}, 422),
    ("POST", "/v1/unpin", {"tokens": PREFIX, "cache_salt": 5}, 422),
    ("POST", "/v1/move", {"tokens": PREFIX}, 422),
    ("POST", "/v1/move", {"tokens": PREFIX, "tier": "gpu"}, 422),
    ("POST", "/v1/move", {"tokens": PREFIX, "tier": "remote"}, 422),
    ("POST", "/v1/move", {"tier": "cpu"}, 422),
    ("GET", "/v1/tasks/no-such-task", None, 404),
    ("POST", "/v1/verify", {"deep": "yes"}, 422),
    ("POST", "/v1/verify", {"deeep": True}, 422),
    ("GET", "/v1/profile?duration_s=0", None, 422),
    ("GET", "/v1/profile?duration_s=-1", None, 422),
    ("GET", "/v1/profile?duration_s=100000", None, 422),
    ("GET", "/v1/profile?duration_s=1&interval_ms=0", None, 422),
    ("GET", "/v1/profile?duration_s=abc", None, 422),
    ("GET", "/v1/nothing-here", None, 404),
    ("DELETE", "/v1/stats", None, 405),
]


def snapshot(engine: Engine) -> dict[str, Any]:
    """What a bad request must leave as it was: every statistic (a request
    that reached the engine would move at least one), and the data."""
    return {"stats": engine.stats(), "tiers": engine.lookup_tiers(PREFIX)}


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_INPUT,
                         ids=[f"{m} {p} {json.dumps(b)[:40]}" for m, p, b, _ in BAD_INPUT])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    engine: Engine, client: httpx.Client, method: str, path: str, body: Any, status: int
) -> None:
    before = snapshot(engine)
    if isinstance(body, str):
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.request(method, path, json=body) if body is not None else client.request(method, path)
    assert r.status_code == status, r.text
    assert r.json()["detail"], r.text  # says what is wrong
    assert snapshot(engine) == before
    assert engine.lookup(PREFIX) == 4 * CHUNK


# ----------------------------------------------------------------- auth


def non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.fixture
def open_controller(engine: Engine) -> Iterator[str]:
    """The controller bound to a non-loopback address, with a token."""
    ip = non_loopback_ip() or "0.0.0.0"
    config = dataclasses.replace(engine.config, controller_listen=f"{ip}:1", controller_token=TOKEN)
    handle = serve(engine, config, port=0)
    yield handle.url if ip == "0.0.0.0" else f"http://{ip}:{handle.server.port}"
    handle.stop()


GUARDED = [("GET", "/v1/stats", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
           ("POST", "/v1/lookup", {"tokens": PREFIX}), ("POST", "/v1/clear", {"all": True}),
           ("POST", "/v1/pin", {"tokens": PREFIX}), ("POST", "/v1/unpin", {"tokens": PREFIX}),
           ("POST", "/v1/move", {"tokens": PREFIX, "tier": "cpu"}), ("GET", "/v1/tasks/x", None),
           ("GET", "/v1/async", None), ("POST", "/v1/verify", {}), ("GET", "/v1/profile?duration_s=1", None)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
                         ids=["none", "wrong", "longer", "basic", "bare"])
def test_off_localhost_without_the_token_is_refused(
    engine: Engine, open_controller: str, headers: dict[str, str]
) -> None:
    before = snapshot(engine)
    with httpx.Client(base_url=open_controller, headers=headers) as c:
        for method, path, body in GUARDED:
            r = c.request(method, path, json=body) if body is not None else c.request(method, path)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        # /health answers (probes carry no token) but says only the status.
        h = c.get("/health").json()
        assert h["detail_hidden"] is True and h["reasons"] == [] and h["tiers"] == {}
    assert snapshot(engine) == before
    assert engine.lookup(PREFIX) == 4 * CHUNK


def test_off_localhost_with_the_token_is_served(engine: Engine, open_controller: str) -> None:
    with httpx.Client(base_url=open_controller, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get("/v1/stats").status_code == 200
        assert c.post("/v1/lookup", json={"tokens": PREFIX}).json()["cached_tokens"] == 4 * CHUNK
        assert c.get("/health").json()["detail_hidden"] is False
        assert c.get("/openapi.json").status_code == 200


def test_off_localhost_without_a_token_does_not_start(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="controller_token"):
        load_config({"controller_listen": "0.0.0.0:8199"}, environ={})
    # A Config built by hand is checked again before anything listens.
    config = dataclasses.replace(engine.config, controller_listen="0.0.0.0:1")
    with pytest.raises(ConfigError, match="not a loopback address"):
        serve(engine, config, port=0)


def test_token_sources(tmp_path: Path) -> None:
    env = load_config({"controller_listen": "0.0.0.0:8199"}, environ={"KVTIER_CONTROLLER_TOKEN": "from-env"})
    assert resolve_token(env) == "from-env"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    cfg = load_config({"controller_listen": "0.0.0.0:8199", "controller_token_file": str(path)}, environ={})
    assert resolve_token(cfg) == "from-file"
    assert "from-env" not in repr(env) and "from-env" not in env.describe()
    missing = load_config({"controller_token_file": str(tmp_path / "nope")}, environ={})
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_token(missing)
    # `kvtier config --json` never prints it.
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "config", "--json"], capture_output=True, text=True,
                         env={**os.environ, "KVTIER_CONTROLLER_TOKEN": "from-env", "KVTIER_CPU_CAPACITY": "64MiB"},
                         check=True).stdout
    assert "from-env" not in out and json.loads(out)["controller_token"]["value"] == "***"


def test_controller_listen_values() -> None:
    def listen(v: str) -> str:
        return load_config({"controller_listen": v}, environ={}).controller_listen

    assert listen("8199") == "127.0.0.1:8199"
    assert listen("localhost:9000") == "localhost:9000"
    assert listen("[::1]:9000") == "[::1]:9000"
    assert listen("none") == ""
    for bad in ("0", "65536", "host:", ":80", "::1:80", "a b:80", "127.0.0.1:x"):
        with pytest.raises(ConfigError, match="controller_listen"):
            listen(bad)


def test_rank_r_serves_on_port_plus_r(engine: Engine) -> None:
    from kvtier.testing.vllm_server import free_port

    base = free_port()
    config = dataclasses.replace(engine.config, controller_listen=f"127.0.0.1:{base}")
    handle = serve(engine, config, rank=1)
    try:
        assert handle.url == f"http://127.0.0.1:{base + 1}"
        assert httpx.get(handle.url + "/v1/stats").json()["rank"] == 1
    finally:
        handle.stop()
    with pytest.raises(ConfigError, match="65535"):
        serve(engine, dataclasses.replace(engine.config, controller_listen="127.0.0.1:65535"), rank=1)


def test_one_controller_per_address_and_engine(engine: Engine, tmp_path: Path) -> None:
    first = serve(engine, engine.config, port=0)
    port = first.server.port
    again = serve(engine, engine.config, port=port)  # a second connector sharing the engine
    assert again.server is first.server
    other = make_engine(tmp_path / "other")
    try:
        with pytest.raises(ConfigError, match="another engine"):
            serve(other, other.config, port=port)
        first.stop()
        assert httpx.get(again.url + "/health").status_code == 200  # still one reference
        again.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(again.url + "/health")
    finally:
        other.close()


# ----------------------------------------------------------------- schema


def test_served_openapi_is_the_checked_in_one(client: httpx.Client) -> None:
    served = client.get("/openapi.json").json()
    checked_in = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == checked_in == openapi_schema(), "regenerate: kvtier controller-openapi -o docs/openapi.json"
    paths = set(served["paths"])
    assert {"/health", "/metrics", "/v1/stats", "/v1/lookup", "/v1/clear", "/v1/pin", "/v1/unpin", "/v1/move",
            "/v1/tasks/{task_id}", "/v1/async", "/v1/verify", "/v1/profile"} <= paths


# ----------------------------------------------------------------- profile


def check_speedscope(doc: dict[str, Any]) -> None:
    """The required parts of speedscope's file-format schema
    (https://www.speedscope.app/file-format-schema.json) for sampled profiles."""
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = doc["shared"]["frames"]
    assert isinstance(frames, list) and all(isinstance(f["name"], str) for f in frames)
    for f in frames:
        assert set(f) <= {"name", "file", "line", "col"}
    assert doc["profiles"]
    for p in doc["profiles"]:
        assert p["type"] == "sampled" and isinstance(p["name"], str)
        assert p["unit"] in ("none", "nanoseconds", "microseconds", "milliseconds", "seconds", "bytes")
        assert isinstance(p["startValue"], (int, float)) and isinstance(p["endValue"], (int, float))
        assert len(p["samples"]) == len(p["weights"])
        for stack in p["samples"]:
            assert all(isinstance(i, int) and 0 <= i < len(frames) for i in stack)
        assert all(isinstance(w, (int, float)) and w >= 0 for w in p["weights"])


def _busy_marker_function(stop: threading.Event, running: threading.Event) -> None:
    running.set()
    while not stop.is_set():
        sum(range(1000))


@pytest.fixture
def busy_thread() -> Iterator[None]:
    stop, running = threading.Event(), threading.Event()
    t = threading.Thread(target=_busy_marker_function, args=(stop, running), name="busy-marker")
    t.start()
    running.wait()
    yield
    stop.set()
    t.join()


def test_profile_is_a_speedscope_file_with_every_thread(client: httpx.Client, busy_thread: None) -> None:
    r = client.get("/v1/profile", params={"duration_s": 0.3, "interval_ms": 5})
    assert r.status_code == 200, r.text
    doc = r.json()
    check_speedscope(doc)
    busy = next(p for p in doc["profiles"] if p["name"].startswith("busy-marker"))
    names = {doc["shared"]["frames"][i]["name"] for stack in busy["samples"] for i in stack}
    assert "_busy_marker_function" in names
    # The engine's native threads (no Python frames) are there by name.
    assert any(p["name"].endswith(", native)") for p in doc["profiles"])


# ----------------------------------------------------------------- CLI


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = kvtier_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_commands(engine: Engine, controller: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = controller.url
    code, out, _ = cli(capsys, "stats", "--url", url)
    assert code == 0 and "hit rate (tokens)" in out and "cpu used / capacity" in out and f"rank 0 {url}" in out
    code, out, _ = cli(capsys, "stats", "--url", url, "--json")
    assert code == 0 and json.loads(out)[0]["stats"]["chunks_stored"] == 4
    code, out, _ = cli(capsys, "health", "--url", url)
    assert code == 0 and ("ok" in out or "degraded" in out)
    tokens = ",".join(map(str, PREFIX))
    code, out, _ = cli(capsys, "lookup", "--url", url, "--tokens", tokens, "--json")
    assert code == 0 and json.loads(out)[0]["cached_tokens"] == 4 * CHUNK
    (tmp_path / "ids.json").write_text(json.dumps(PREFIX))
    code, out, _ = cli(capsys, "lookup", "--url", url, "--tokens", f"@{tmp_path / 'ids.json'}")
    assert code == 0 and f"{4 * CHUNK} of {4 * CHUNK}" in out
    code, out, _ = cli(capsys, "lookup", "--url", url, "--text", " ".join(map(str, PREFIX)), "--no-special-tokens", "--json")
    assert code == 0 and json.loads(out)[0]["cached_tokens"] == 4 * CHUNK
    code, out, _ = cli(capsys, "pin", "--url", url, "--tokens", tokens, "--json")
    assert code == 0 and json.loads(out)[0]["pinned"] == 4
    code, out, _ = cli(capsys, "unpin", "--url", url, "--tokens", tokens)
    assert code == 0 and "4" in out
    code, _, err = cli(capsys, "clear", "--url", url)
    assert code == 2 and "nothing selected" in err
    code, _, err = cli(capsys, "lookup", "--url", url, "--tokens", "1,-2")
    assert code == 1 and "422" in err  # the server's refusal, passed on
    code, out, _ = cli(capsys, "top", "--url", url, "--iterations", "2", "--interval", "10ms")
    assert code == 0 and out.count("kvtier top") == 2 and "lookups/s" in out
    code, out, _ = cli(capsys, "move", "--url", url, "--tokens", tokens, "--tier", "disk", "--wait", "--json")
    assert code == 0 and json.loads(out)[0]["result"]["moved"] == 4
    assert engine.lookup_tiers(PREFIX)["by_tier"] == {"cpu": 0, "disk": 4}
    code, out, _ = cli(capsys, "verify", "--url", url, "--deep")
    assert code == 0 and "true" in out
    code, out, _ = cli(capsys, "clear", "--url", url, "--tier", "disk", "--json")
    assert code == 0 and json.loads(out)[0]["cleared"] == 4
    store(engine, PREFIX)
    code, out, _ = cli(capsys, "clear", "--url", url, "--all", "--json")
    assert code == 0 and json.loads(out)[0]["cleared"] == 4
    assert engine.lookup(PREFIX) == 0


def test_cli_several_controllers(engine: Engine, controller: Any, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    other = make_engine(tmp_path / "rank1")
    handle = serve(other, other.config, rank=1, port=0)
    try:
        code, out, _ = cli(capsys, "stats", "--url", controller.url, "--url", handle.url)
        assert code == 0 and f"rank 0 {controller.url}" in out and f"rank 1 {handle.url}" in out
        code, out, _ = cli(capsys, "lookup", "--url", controller.url, "--url", handle.url, "--tokens",
                           ",".join(map(str, PREFIX)), "--json")
        assert [a["cached_tokens"] for a in json.loads(out)] == [4 * CHUNK, 0]
    finally:
        handle.stop()
        other.close()
    # One controller gone: the others still answer, the exit status says so.
    code, out, err = cli(capsys, "stats", "--url", controller.url, "--url", handle.url)
    assert code == 1 and f"rank 0 {controller.url}" in out and "cannot reach" in err


def test_cli_token(engine: Engine, open_controller: str, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli(capsys, "stats", "--url", open_controller, "--token", "wrong")
    assert code == 1 and "401" in err
    code, _, _ = cli(capsys, "stats", "--url", open_controller, "--token", TOKEN)
    assert code == 0
    monkeypatch.setenv("KVTIER_CONTROLLER_TOKEN", TOKEN)
    code, _, _ = cli(capsys, "health", "--url", open_controller, "--json")
    assert code == 0


def test_cli_profile_writes_speedscope(controller: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       busy_thread: None) -> None:
    out_file = tmp_path / "p.speedscope.json"
    code, _, err = cli(capsys, "profile", "--url", controller.url, "--duration", "300ms", "-o", str(out_file))
    assert code == 0, err
    doc = json.loads(out_file.read_text())
    check_speedscope(doc)
    assert any("busy-marker" in p["name"] for p in doc["profiles"])


def test_cli_openapi_regenerates_the_docs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = cli(capsys, "controller-openapi", "-o", str(tmp_path / "openapi.json"))
    assert code == 0
    assert json.loads((tmp_path / "openapi.json").read_text()) == json.loads((REPO / "docs" / "openapi.json").read_text())


def test_durations_and_token_lists() -> None:
    from kvtier.controller.cli import parse_duration, parse_tokens

    assert [parse_duration(x) for x in ("60s", "2m", "500ms", "1h", "90", "1.5s")] == [60, 120, 0.5, 3600, 90, 1.5]
    assert parse_tokens("1,2, 3 4") == [1, 2, 3, 4]
    import argparse

    for bad in ("0s", "-1s", "5x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_tokens("1,a")
