"""The controller API under a real `vllm serve` (TP=1), driven over HTTP.

One server for the module (starting one takes a minute): kvtier with a
small CPU tier (24MiB: ten 2MiB chunks of the test model), a disk tier, and
`controller_listen` on a free port, so the worker process serves its
engine's controller. vLLM's own prefix cache is off, so every external hit
on vLLM's /metrics was served by kvtier. The tests run in file order and
share the server: stats and lookup first, then clear, then the eviction
storm (pin, move), and last /health with the disk tier broken.

Prompts are 1100 tokens: four whole 256-token chunks (on CPU kvtier moves
whole blocks, so the partial fifth is not stored), 1024 tokens a hit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvtier.testing.model import NUM_SPECIAL_TOKENS, random_tokens, word
from kvtier.testing.vllm_server import VllmServer, free_port

pytestmark = pytest.mark.usefixtures("native_engine")

MAX_TOKENS = 2
PROMPT_LEN = 1100
CHUNKS = 4
HIT_TOKENS = CHUNKS * 256
HITS = "vllm:external_prefix_cache_hits_total"


def prompt(seed: int) -> list[int]:
    return random_tokens(PROMPT_LEN, seed=7000 + seed)


class Served:
    def __init__(self, server: VllmServer, controller: str, disk: Path, log: Path) -> None:
        self.server = server
        self.url = controller
        self.disk = disk
        self.log = log
        self.http = httpx.Client(base_url=controller, timeout=120)
        self.state: dict[str, Any] = {}

    def stats(self) -> dict[str, Any]:
        r = self.http.get("/v1/stats")
        assert r.status_code == 200, r.text
        return dict(r.json()["stats"])

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(path, json=body)

    def hits(self) -> float:
        return self.server.metrics().get(HITS, 0.0)

    def complete(self, tokens: list[int]) -> float:
        """Serves the prompt; returns the tokens kvtier served it."""
        before = self.hits()
        self.server.complete(tokens, MAX_TOKENS)
        return self.hits() - before

    def wait_for(self, what: str, cond: Callable[[dict[str, Any]], bool], timeout_s: float = 180.0) -> dict[str, Any]:
        """Polls /v1/stats until cond holds: stores and write-behind finish
        after the response, on the worker's threads."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if cond(stats):
                return stats
            assert time.monotonic() < deadline, (what, json.dumps(stats)[:2000], self.log_tail())
            time.sleep(0.2)

    def stored(self, at_least: int) -> dict[str, Any]:
        return self.wait_for(f"chunks_stored >= {at_least}", lambda s: s["chunks_stored"] >= at_least)

    def written_behind(self) -> dict[str, Any]:
        return self.wait_for("write-behind drained", lambda s: s["write_behind_queue_depth"] == 0
                             and s.get("copies_pending", 0) == 0)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def served(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("controller")
    port = free_port()
    config = {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "cpu_capacity": "24MiB",
            "disk_path": str(root / "disk"),
            "disk_capacity": "256MiB",
            "controller_listen": f"127.0.0.1:{port}",
        },
    }
    log = root / "serve.log"
    server = VllmServer(model_path, kv_transfer_config=config, log_path=log).start()
    try:
        s = Served(server, f"http://127.0.0.1:{port}", root / "disk", log)
        yield s
        s.http.close()
    finally:
        server.stop()


def kvtier_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *argv], check=False, capture_output=True, text=True, timeout=300)


def test_stats_and_metrics_move_with_traffic(served: Served) -> None:
    r = served.http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    before = served.stats()
    a = prompt(0)
    assert served.complete(a) == 0
    after = served.stored(before["chunks_stored"] + CHUNKS)
    assert after["store_requests"] > before["store_requests"]
    assert served.complete(a) == HIT_TOKENS
    loaded = served.wait_for("chunks loaded", lambda s: s["chunks_loaded"] >= before["chunks_loaded"] + CHUNKS)
    assert loaded["tokens_loaded"] >= before["tokens_loaded"] + HIT_TOKENS
    # The controller's /metrics: the same engine, Prometheus text.
    from prometheus_client.parser import text_string_to_metric_families

    page = served.http.get("/metrics")
    assert page.status_code == 200
    samples = [s for f in text_string_to_metric_families(page.text) for s in f.samples]
    assert samples and all(s.name.startswith("kvtier_") for s in samples)
    assert [s.value for s in samples if (s.name, s.labels.get("operation")) == ("kvtier_chunks_total", "load")] \
        == [loaded["chunks_loaded"]], page.text[:3000]
    # The CLI reads the same controller.
    out = kvtier_cli("stats", "--url", served.url)
    assert out.returncode == 0 and "rank 0" in out.stdout and "cpu used / capacity" in out.stdout, out.stderr
    out = kvtier_cli("health", "--url", served.url, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["status"] == "ok", out.stderr


def test_lookup_by_text_uses_the_served_models_tokenizer(served: Served) -> None:
    text = " ".join(word(t - NUM_SPECIAL_TOKENS) for t in prompt(1))
    before = served.stats()["chunks_stored"]
    import openai

    client = openai.OpenAI(base_url=served.server.url + "/v1", api_key="unused", timeout=600)
    client.completions.create(model=served.server.model, prompt=text, max_tokens=MAX_TOKENS, temperature=0.0)
    served.stored(before + CHUNKS)
    r = served.post("/v1/lookup", {"text": text})
    assert r.status_code == 200, r.text
    assert r.json()["cached_tokens"] == HIT_TOKENS, r.json()


def test_lookup_with_the_requests_cache_salt(served: Served) -> None:
    """A request's cache_salt is part of its chunk keys (the connector's
    request_key_extras); the API's cache_salt names the same keys."""
    tokens = prompt(5)
    before = served.stats()["chunks_stored"]
    import openai

    client = openai.OpenAI(base_url=served.server.url + "/v1", api_key="unused", timeout=600)
    client.completions.create(model=served.server.model, prompt=tokens, max_tokens=MAX_TOKENS, temperature=0.0,
                              extra_body={"cache_salt": "tenant-a"})
    served.stored(before + CHUNKS)
    assert served.post("/v1/lookup", {"tokens": tokens, "cache_salt": "tenant-a"}).json()["cached_tokens"] == HIT_TOKENS
    assert served.post("/v1/lookup", {"tokens": tokens}).json()["cached_tokens"] == 0
    assert served.post("/v1/lookup", {"tokens": tokens, "cache_salt": "tenant-b"}).json()["cached_tokens"] == 0


def test_clear_makes_the_next_request_a_miss(served: Served) -> None:
    b = prompt(2)
    before = served.stats()["chunks_stored"]
    served.complete(b)
    served.stored(before + CHUNKS)
    assert served.post("/v1/lookup", {"tokens": b}).json()["cached_tokens"] == HIT_TOKENS
    other = served.post("/v1/lookup", {"tokens": prompt(0)}).json()["cached_tokens"]
    r = served.post("/v1/clear", {"tokens": b})
    assert r.status_code == 200 and r.json()["cleared"] == CHUNKS, r.text
    assert served.post("/v1/lookup", {"tokens": b}).json()["cached_tokens"] == 0
    assert served.complete(b) == 0, served.log_tail()
    # Only that prefix went.
    assert served.post("/v1/lookup", {"tokens": prompt(0)}).json()["cached_tokens"] == other == HIT_TOKENS


def test_pin_survives_an_eviction_storm(served: Served) -> None:
    pinned, bystander = prompt(3), prompt(4)
    before = served.stats()
    for p in (bystander, pinned):
        served.complete(p)
    served.stored(before["chunks_stored"] + 2 * CHUNKS)
    served.written_behind()
    r = served.post("/v1/pin", {"tokens": pinned})
    assert r.status_code == 200 and r.json()["pinned"] == CHUNKS, r.text
    # The storm: 24 chunks of other prompts through a 10-chunk CPU tier.
    evictions = served.stats()["tiers"]["cpu"]["evictions"]
    stored = served.stats()["chunks_stored"]
    for i in range(6):
        served.complete(prompt(100 + i))
    served.stored(stored + 6 * CHUNKS)
    stats = served.written_behind()
    assert stats["tiers"]["cpu"]["evictions"] >= evictions + 6 * CHUNKS - 10, stats["tiers"]
    # The pinned prefix is still in CPU: a hit served from the CPU tier.
    cpu0, disk0 = stats["chunks_loaded_cpu"], stats["chunks_loaded_disk"]
    assert served.complete(pinned) == HIT_TOKENS
    stats = served.wait_for("pinned loaded", lambda s: s["chunks_loaded_cpu"] + s["chunks_loaded_disk"] >= cpu0 + disk0 + CHUNKS)
    assert (stats["chunks_loaded_cpu"] - cpu0, stats["chunks_loaded_disk"] - disk0) == (CHUNKS, 0)
    # The bystander, stored just before it and not pinned, left the CPU
    # tier (the disk still has it): the storm did evict.
    found = served.post("/v1/lookup", {"tokens": bystander}).json()
    assert found["cached_tokens"] == HIT_TOKENS
    assert found["by_tier"] == {"cpu": 0, "disk": CHUNKS}, found
    assert [c["pinned"] for c in served.post("/v1/lookup", {"tokens": pinned}).json()["chunks"]] == [True] * CHUNKS
    assert served.post("/v1/unpin", {"tokens": pinned}).json()["unpinned"] == CHUNKS
    served.state["disk_resident"] = bystander


def test_move_to_cpu_makes_a_disk_resident_prefix_a_cpu_hit(served: Served) -> None:
    prefix = served.state.get("disk_resident")
    if prefix is None:
        pytest.skip("needs the disk-resident prefix test_pin_survives_an_eviction_storm leaves")
    r = served.post("/v1/move", {"tokens": prefix, "tier": "cpu"})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 120
    while not (task := served.http.get(f"/v1/tasks/{task_id}").json())["done"]:
        assert time.monotonic() < deadline, task
        time.sleep(0.1)
    assert task["error"] is None and task["result"]["moved"] == CHUNKS, task
    found = served.post("/v1/lookup", {"tokens": prefix}).json()
    assert found["by_tier"] == {"cpu": CHUNKS, "disk": CHUNKS}, found
    stats = served.stats()
    cpu0, disk0 = stats["chunks_loaded_cpu"], stats["chunks_loaded_disk"]
    assert served.complete(prefix) == HIT_TOKENS
    stats = served.wait_for("moved loaded", lambda s: s["chunks_loaded_cpu"] + s["chunks_loaded_disk"] >= cpu0 + disk0 + CHUNKS)
    assert (stats["chunks_loaded_cpu"] - cpu0, stats["chunks_loaded_disk"] - disk0) == (CHUNKS, 0)


def test_verify_and_async(served: Served) -> None:
    r = served.http.get("/v1/async")
    assert r.status_code == 200 and "write_behind" in json.dumps(r.json()["queues"]), r.text
    r = served.post("/v1/verify", {"deep": True})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["consistent"] is True and report["corrupt"] == 0 and report["entries"] > 0, report


def test_profile_of_the_worker(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "worker.speedscope.json"
    done = kvtier_cli("profile", "--url", served.url, "--duration", "1s", "-o", str(out))
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = doc["shared"]["frames"]
    assert len(doc["profiles"]) >= 2
    for p in doc["profiles"]:
        assert p["type"] == "sampled" and len(p["samples"]) == len(p["weights"]) > 0
        assert all(0 <= i < len(frames) for stack in p["samples"] for i in stack)
    # The worker's own Python threads and the engine's native ones.
    names = " ".join(p["name"] for p in doc["profiles"])
    assert "MainThread" in names and "native" in names, names


def test_health_reports_a_broken_disk_tier_as_degraded(served: Served) -> None:
    """Last: the disk directory is removed under the running engine (as a
    wiped or unmounted volume would be)."""
    assert served.http.get("/health").json()["status"] == "ok"
    shutil.rmtree(served.disk)
    r = served.http.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "degraded", body
    assert body["tiers"]["disk"]["status"] == "degraded" and any("disk" in reason for reason in body["reasons"]), body
    out = kvtier_cli("health", "--url", served.url)
    assert out.returncode == 0 and "degraded" in out.stdout, out.stderr
    # Still serving: a degraded disk is not an outage.
    assert served.server.complete(prompt(3), MAX_TOKENS)
