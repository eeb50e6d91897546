"""Two `vllm serve` instances sharing KV through Redis (one node, then a
3-master Redis Cluster), driven over HTTP by the `openai` client.

Instance A (its own CPU tier and disk directory) serves long prompts and
uploads their chunks; instance B (another process, another disk directory,
nothing local) serves the same prompts from what A stored: at least 90% of
B's prompt tokens are external hits, and B's greedy outputs equal vLLM
alone's token for token. vLLM's own prefix cache is off everywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kvtier.testing.model import random_tokens
from kvtier.testing.redis_server import RedisCluster, RedisServer
from kvtier.testing.vllm_server import VllmServer

pytestmark = pytest.mark.usefixtures("native_engine")

MAX_TOKENS = 6
PROMPTS = [random_tokens(3000, seed=800 + i) for i in range(2)]
HITS = "vllm:external_prefix_cache_hits_total"
CHUNKS = sum(len(p) // 256 for p in PROMPTS)  # whole 256-token chunks stored


def config(disk: Path, url: str) -> dict[str, Any]:
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_capacity": "256MiB", "disk_path": str(disk), "remote_url": url},
    }


@pytest.fixture(scope="module")
def reference(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    log = tmp_path_factory.mktemp("ref") / "serve.log"
    with VllmServer(model_path, log_path=log) as server:
        return [server.complete(p, MAX_TOKENS) for p in PROMPTS]


def share_through(store: Any, model_path: str, reference: list[list[int]], tmp_path: Path) -> None:
    with VllmServer(model_path, kv_transfer_config=config(tmp_path / "a", store.url), log_path=tmp_path / "a.log") as a:
        assert [a.complete(p, MAX_TOKENS) for p in PROMPTS] == reference
        # Uploads run behind the responses: wait (bounded) until they landed.
        deadline = time.monotonic() + 60
        while store.dbsize() < CHUNKS:
            assert time.monotonic() < deadline, (store.dbsize(), (tmp_path / "a.log").read_text()[-3000:])
            time.sleep(0.2)
    with VllmServer(model_path, kv_transfer_config=config(tmp_path / "b", store.url), log_path=tmp_path / "b.log") as b:
        outputs, hits = [], []
        for p in PROMPTS:
            before = b.metrics().get(HITS, 0.0)
            outputs.append(b.complete(p, MAX_TOKENS))
            hits.append(b.metrics().get(HITS, 0.0) - before)
    assert outputs == reference
    for p, n in zip(PROMPTS, hits):
        assert n >= 0.9 * len(p), (hits, (tmp_path / "b.log").read_text()[-3000:])
        # Counted once: a remote load that failed and was retried would count again.
        assert n <= len(p) - 1, hits


def test_second_instance_serves_from_redis(model_path: str, reference: list[list[int]], tmp_path: Path) -> None:
    with RedisServer() as redis:
        share_through(redis, model_path, reference, tmp_path)
        url = redis.url
    # The remote is gone: a third instance serves every request correctly
    # by recomputing (its lookups fail fast and are misses), and says so.
    log = tmp_path / "c.log"
    with VllmServer(model_path, kv_transfer_config=config(tmp_path / "c", url), log_path=log) as c:
        assert [c.complete(p, MAX_TOKENS) for p in PROMPTS] == reference
        assert c.metrics().get(HITS, 0.0) == 0


def test_second_instance_serves_from_redis_cluster(
    model_path: str, reference: list[list[int]], tmp_path: Path
) -> None:
    with RedisCluster(3) as cluster:
        share_through(cluster, model_path, reference, tmp_path)
        # The chunks spread over the masters.
        assert sum(1 for n in cluster.nodes if n.dbsize() > 0) == 3
