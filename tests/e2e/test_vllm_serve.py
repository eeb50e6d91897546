"""kvtier under `vllm serve`: the OpenAI server, engine core and workers in
separate processes, driven over HTTP by the `openai` client.

This is the deployment users run. The scheduler (engine-core process) reads
the workers' catalogues from shared memory; each worker rank owns its
engine and its own disk directory. Every output is compared with the same
server without kvtier; vLLM's own prefix cache is off, so every external hit
on /metrics was served by kvtier.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kvtier.testing.model import random_tokens
from kvtier.testing.vllm_server import VllmServer

pytestmark = pytest.mark.usefixtures("native_engine")

MAX_TOKENS = 6
PROMPTS = [random_tokens(3000, seed=500 + i) for i in range(2)]
HITS = "vllm:external_prefix_cache_hits_total"


def kvtier_config(disk_path: Path) -> dict[str, Any]:
    """The README's --kv-transfer-config, with small tiers."""
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_capacity": "256MiB", "disk_path": str(disk_path)},
    }


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free (the controller listens on PORT+rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no run of {n} free ports")


def controller_get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def controller_post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def shm_objects() -> set[str]:
    return {os.path.basename(p) for p in glob.glob("/dev/shm/kvtier-*")}


def assert_no_catalogue_survives(before: set[str]) -> None:
    """After the server exits, nothing of it may stay in /dev/shm past the
    sweep the next start runs. A worker that gets through vLLM's shutdown
    unlinks its catalogue itself; vLLM's API server force-kills what has not
    exited within its grace period (5 s), and such a worker's catalogue is
    stale (no live owner) and swept."""
    from kvtier.catalogue import reclaim_stale_catalogues

    reclaim_stale_catalogues()
    assert shm_objects() - before == set()


def records_on_disk(disk: Path) -> int:
    """Record headers (magic "KVTREC01" at a 4096-byte boundary) in the disk
    tier's segments: what has reached the disk, read as plain bytes."""
    n = 0
    for seg in glob.glob(str(disk / "**" / "seg_*.kvt"), recursive=True):
        with open(seg, "rb") as f:
            data = f.read()
        n += sum(1 for off in range(4096, len(data), 4096) if data[off : off + 8] == b"KVTREC01")
    return n


def serve_and_repeat(server: VllmServer) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Each prompt once (cold), then again (warm); external hits per warm request."""
    cold = [server.complete(p, MAX_TOKENS) for p in PROMPTS]
    warm, hits = [], []
    for p in PROMPTS:
        before = server.metrics().get(HITS, 0.0)
        warm.append(server.complete(p, MAX_TOKENS))
        hits.append(server.metrics().get(HITS, 0.0) - before)
    return cold, warm, hits


@pytest.fixture(scope="module")
def reference(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[list[int]]]:
    """Greedy outputs of the same server without kvtier, TP=1 and TP=2."""
    logs = tmp_path_factory.mktemp("ref-logs")
    out: dict[int, list[list[int]]] = {}
    for tp in (1, 2):
        with VllmServer(model_path, tensor_parallel_size=tp, log_path=logs / f"tp{tp}.log") as server:
            out[tp] = [server.complete(p, MAX_TOKENS) for p in PROMPTS]
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_repeats_are_served_by_kvtier(
    model_path: str, reference: dict[int, list[list[int]]], tmp_path: Path, tp: int
) -> None:
    before = shm_objects()
    config = kvtier_config(tmp_path / "disk")
    # The operator's API too: each worker rank serves it at PORT+rank.
    port = free_port_run(tp)
    config["kv_connector_extra_config"]["controller_listen"] = f"127.0.0.1:{port}"
    controllers = [f"http://127.0.0.1:{port + r}" for r in range(tp)]
    server = VllmServer(
        model_path,
        kv_transfer_config=config,
        tensor_parallel_size=tp,
        log_path=tmp_path / "serve.log",
    )
    with server:
        # One catalogue per rank, mode 0600, owned by us.
        mine = shm_objects() - before
        assert len(mine) == tp, (mine, (tmp_path / "serve.log").read_text()[-3000:])
        for name in mine:
            st = os.stat("/dev/shm/" + name)
            assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
        cold, warm, hits = serve_and_repeat(server)
        metrics = server.metrics()
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            page = r.read().decode()
        # Each rank's controller answers for its own engine: its rank, its
        # stored shards, and every prompt's whole chunks cached there.
        for r, url in enumerate(controllers):
            st = controller_get(url, "/v1/stats")
            assert st["rank"] == r and st["stats"]["chunks_stored"] > 0, st
            for prompt in PROMPTS:
                found = controller_post(url, "/v1/lookup", {"tokens": prompt})
                assert found["rank"] == r and found["cached_tokens"] >= len(prompt) // 256 * 256, found
        cli = subprocess.run(
            [sys.executable, "-m", "kvtier.cli", "stats", *[a for u in controllers for a in ("--url", u)]],
            check=False, capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 0 and all(f"rank {r}" in cli.stdout for r in range(tp)), (cli.stdout, cli.stderr)
    assert cold == reference[tp]
    assert warm == reference[tp]
    for prompt, n in zip(PROMPTS, hits):
        # Whole 256-token chunks (the last token is always computed): 2816 of 3000.
        assert n >= 0.9 * len(prompt), (hits, (tmp_path / "serve.log").read_text()[-3000:])
    # kvtier's own metrics on the same page: the connector's counters, and
    # every rank's engine and tiers.
    assert metrics["kvtier_hit_tokens_total"] >= sum(hits), metrics
    assert metrics["kvtier_chunks_saved_total"] >= len(PROMPTS) * (len(PROMPTS[0]) // 256)
    # The hit-rate inputs, under the names kvtier's own endpoint uses too.
    assert metrics["kvtier_lookup_hit_tokens_total"] >= sum(hits), metrics
    assert metrics["kvtier_lookup_query_tokens_total"] >= metrics["kvtier_lookup_hit_tokens_total"], metrics
    for r in range(tp):
        for tier in ("cpu", "disk"):
            line = next((x for x in page.splitlines() if x.startswith("kvtier_tier_used_bytes{")
                         and f'tier="{tier}"' in x and f'rank="{r}"' in x), None)
            assert line is not None and float(line.rsplit(" ", 1)[1]) > 0, (r, tier)
        stored = [x for x in page.splitlines() if x.startswith("kvtier_chunks_total{")
                  and 'operation="store"' in x and f'rank="{r}"' in x]
        assert stored and float(stored[0].rsplit(" ", 1)[1]) > 0, (r, stored)
    # Each rank filed its shard in its own directory.
    if tp == 1:
        assert glob.glob(str(tmp_path / "disk" / "seg_*.kvt"))
    else:
        for r in range(tp):
            assert glob.glob(str(tmp_path / "disk" / f"rank{r}of{tp}" / "seg_*.kvt")), r
    assert_no_catalogue_survives(before)


def test_killed_worker_then_restart(model_path: str, reference: dict[int, list[list[int]]], tmp_path: Path) -> None:
    """A worker killed with SIGKILL leaves its shared catalogue behind; the
    restarted deployment reclaims it, serves from the disk tier the dead one
    filled, and serves nothing wrong."""
    before = shm_objects()
    config = kvtier_config(tmp_path / "disk")
    first = VllmServer(model_path, kv_transfer_config=config, log_path=tmp_path / "first.log").start()
    try:
        assert first.complete(PROMPTS[0], MAX_TOKENS) == reference[1][0]
        workers = first.worker_pids()
        assert workers, "no VLLM::Worker process found"
        # Write-behind files chunks after the response: wait until the disk
        # holds the prompt's 11 whole chunks (the point here is the restart,
        # not the loss of writes in flight, which the disk tier's own tests
        # cover).
        deadline = time.monotonic() + 120
        while records_on_disk(tmp_path / "disk") < len(PROMPTS[0]) // 256:
            assert time.monotonic() < deadline, records_on_disk(tmp_path / "disk")
            time.sleep(0.2)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while first.proc is not None and first.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        first.stop()
    leftovers = shm_objects() - before
    assert leftovers, "the killed worker's catalogue was expected to stay behind"

    with VllmServer(model_path, kv_transfer_config=config, log_path=tmp_path / "second.log") as second:
        hits0 = second.metrics().get(HITS, 0.0)
        assert second.complete(PROMPTS[0], MAX_TOKENS) == reference[1][0]
        served = second.metrics().get(HITS, 0.0) - hits0
        assert second.complete(PROMPTS[1], MAX_TOKENS) == reference[1][1]
        # The same names were reclaimed, not joined by new ones.
        assert shm_objects() - before == leftovers
    assert served >= 0.9 * len(PROMPTS[0]), json.dumps({"served": served})
    assert_no_catalogue_survives(before)


def test_layerwise_with_tensor_parallelism(
    model_path: str, reference: dict[int, list[list[int]]], tmp_path: Path
) -> None:
    """`layerwise: true` under `vllm serve` with TP=2: each rank's worker
    loads one layer ahead of its forward pass and stores layer by layer
    (the counters that show the path is taken are checked in-process, in
    test_vllm_layerwise.py). Outputs equal TP=2 without kvtier."""
    config = kvtier_config(tmp_path / "disk")
    config["kv_connector_extra_config"]["layerwise"] = True
    log = tmp_path / "serve.log"
    with VllmServer(model_path, kv_transfer_config=config, tensor_parallel_size=2, log_path=log) as server:
        cold, warm, hits = serve_and_repeat(server)
    assert cold == reference[2]
    assert warm == reference[2]
    for prompt, n in zip(PROMPTS, hits):
        assert n >= 0.9 * len(prompt), (hits, log.read_text()[-3000:])
    text = log.read_text()
    assert "layer-wise stores were aborted" not in text
    assert "layer-wise load failed" not in text


def test_pipeline_parallelism(model_path: str, reference: dict[int, list[list[int]]], tmp_path: Path) -> None:
    """`pipeline_parallel_size=2`: each stage's worker holds its own layers'
    KV (ranks pp x tp, disk rank<r>of2). Splitting the layers over two
    processes does not change the arithmetic, so the outputs equal TP=1
    without kvtier."""
    log = tmp_path / "serve.log"
    server = VllmServer(
        model_path,
        kv_transfer_config=kvtier_config(tmp_path / "disk"),
        pipeline_parallel_size=2,
        log_path=log,
    )
    with server:
        cold, warm, hits = serve_and_repeat(server)
    assert cold == reference[1]
    assert warm == reference[1]
    for prompt, n in zip(PROMPTS, hits):
        assert n >= 0.9 * len(prompt), (hits, log.read_text()[-3000:])
    for r in range(2):
        assert glob.glob(str(tmp_path / "disk" / f"rank{r}of2" / "seg_*.kvt")), r
