"""Disaggregated prefill: kvtier producers and consumers over the UCX
transport (loopback), vLLM's P/D convention, `kvtier proxy`.

* Fast: the kv_transfer_params kvtier writes and reads (parse, peers,
  namespace), then vLLM's real Scheduler + both connector roles of a
  producer and of a consumer (kvtier.testing.sched_harness, only the
  forward is faked): the consumer's KV after the pull is exactly the
  producer's; a producer gone before the pull is a counted miss and the
  blocks are recomputed, as are corrupted and truncated transfers (the
  transport's fault injection); another deployment's params are refused.
* Real `vllm serve`: 1P1D and 2P1D through `kvtier proxy`, driven by the
  `openai` client: greedy outputs equal a single kv_both instance's token
  for token, and >= 90% of the decode instance's prompt tokens are external
  hits. A prefill instance killed between its prefill and the decode: the
  decode instance recomputes, the output is still right, the failure is
  counted in kvtier_pd_pull_failures_total.

The servers are shared by the module (starting one takes about a minute on
the 2-core CI machine); every test sends prompts of its own, so a decode
instance never has a prompt locally from an earlier test. The test that
kills a prefill instance comes last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kvtier.testing.model import random_tokens
from kvtier.testing.sched_harness import Harness, kv_value, make_harness
from kvtier.testing.vllm_server import VllmServer, free_port

pytestmark = pytest.mark.usefixtures("native_engine")


CHUNK = 256

# ---------------------------------------------------------------- params


def test_parse_peer_source() -> None:
    from kvtier.vllm.connector import PeerSource, parse_peer_source

    good = {"version": 1, "peers": ["127.0.0.1:7000", "[::1]:7001"], "namespace": "abc", "tokens": 512}
    assert parse_peer_source({"kvtier": good, "do_remote_prefill": True}) == PeerSource(
        peers=("127.0.0.1:7000", "[::1]:7001"), namespace="abc", tokens=512
    )
    assert parse_peer_source(None) is None
    assert parse_peer_source({"do_remote_prefill": True, "remote_engine_id": "nixl"}) is None
    for bad in (
        "x",
        {**good, "version": 2},
        {**good, "peers": []},
        {**good, "peers": "127.0.0.1:7000"},
        {**good, "peers": ["127.0.0.1"]},
        {**good, "peers": ["127.0.0.1:0"]},
        {**good, "peers": ["127.0.0.1:99999"]},
        {**good, "peers": [7000]},
        {**good, "namespace": ""},
        {**good, "tokens": -1},
        {**good, "tokens": True},
        {**good, "tokens": "512"},
    ):
        assert isinstance(parse_peer_source({"kvtier": bad}), str), bad


def test_producer_peers() -> None:
    import kvtier
    from kvtier.vllm.connector import producer_peers

    assert producer_peers("10.0.0.5:7000", 2) == ["10.0.0.5:7000", "10.0.0.5:7001"]
    assert producer_peers("[fe80::1]:7000", 1) == ["[fe80::1]:7000"]
    with pytest.raises(kvtier.ConfigError, match="fixed transport_listen port"):
        producer_peers("127.0.0.1:0", 1)
    with pytest.raises(kvtier.ConfigError, match="host:port"):
        producer_peers("127.0.0.1", 1)
    with pytest.raises(kvtier.ConfigError, match="65535"):
        producer_peers("127.0.0.1:65535", 2)
    # A wildcard host is not an address a peer can dial: the producer names
    # its own (VLLM_HOST_IP when set).
    os.environ["VLLM_HOST_IP"] = "10.1.2.3"
    try:
        assert producer_peers("0.0.0.0:7000", 1) == ["10.1.2.3:7000"]
    finally:
        del os.environ["VLLM_HOST_IP"]


# ---------------------------------------------------------------- harness


def pd_extra(tmp: Path, name: str, listen: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "chunk_size": CHUNK,
        "cpu_capacity": "64MiB",
        # Its own directory: its own deployment (catalogue) in this process.
        "disk_path": str(tmp / name),
        "namespace": "pd-harness",
        "transport": "ucx",
        "producer_pin_seconds": 60,
    }
    if listen is not None:
        extra["transport_listen"] = listen
    return extra


def pd_request(req_id: str, prompt: list[int], max_tokens: int, params: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    extra_args = {"kv_transfer_params": params} if params is not None else None
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)
    return Request(req_id, list(prompt), sampling, None)


def record_finished(h: Harness) -> dict[str, Any]:
    """What the scheduler-side connector's request_finished returns, by request."""
    returned: dict[str, Any] = {}
    conn = h.scheduler.connector
    original = conn.request_finished

    def wrapped(request: Any, block_ids: Any) -> Any:
        out = original(request, block_ids)
        returned[request.request_id] = out[1]
        return out

    conn.request_finished = wrapped
    return returned


def run_to_end(h: Harness, req_id: str, timeout_s: float = 60) -> None:
    # Async loads finish on kvtier's threads: step until the request is
    # done (bounded in time, not steps: a busy machine needs more steps).
    deadline = time.monotonic() + timeout_s
    while req_id in h.scheduler.requests:
        assert time.monotonic() < deadline, f"{req_id} did not finish"
        h.step()
        time.sleep(0.002)


def stepped_until_output(h: Harness, req: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while req.num_output_tokens == 0:
        assert time.monotonic() < deadline, f"{req.request_id} never ran"
        h.step()
        time.sleep(0.002)


@dataclasses.dataclass
class Pair:
    producer: Harness
    consumer: Harness
    finished: dict[str, Any]
    listen: str


@pytest.fixture
def pair(model_path: str, tmp_path: Path) -> Iterator[Pair]:
    listen = f"127.0.0.1:{free_port()}"
    producer = make_harness(model_path, pd_extra(tmp_path, "p", listen), kv_role="kv_producer")
    consumer = make_harness(model_path, pd_extra(tmp_path, "c"), kv_role="kv_consumer")
    try:
        yield Pair(producer, consumer, record_finished(producer), listen)
    finally:
        for h in (consumer, producer):
            h.worker.shutdown()
            h.scheduler.connector.shutdown()


def prefill(pair: Pair, req_id: str, prompt: list[int]) -> dict[str, Any]:
    pair.producer.scheduler.add_request(pd_request(req_id, prompt, 1, {"do_remote_decode": True}))
    run_to_end(pair.producer, req_id)
    params = pair.finished[req_id]
    assert params is not None
    return params


def assert_kv_matches(h: Harness, req_id: str, tokens: list[int], upto: int) -> None:
    for pos in range(upto):
        want = kv_value(tokens[pos], pos)
        k, v = h.read(req_id, pos)
        assert torch.all(k == want) and torch.all(v == -want), f"KV at {pos} is not the producer's"


def test_harness_pull_is_the_producers_kv(pair: Pair) -> None:
    prompt = random_tokens(700, seed=31)
    params = prefill(pair, "p1", prompt)
    pd = params["kvtier"]
    assert params["do_remote_prefill"] is True
    assert pd["version"] == 1 and pd["peers"] == [pair.listen] and pd["tokens"] == 512
    assert pair.producer.worker.totals["pd_holds"] == 1

    req = pd_request("d1", prompt, 2, json.loads(json.dumps(params)))  # as it crosses HTTP
    pair.consumer.scheduler.add_request(req)
    stepped_until_output(pair.consumer, req)
    assert not pair.consumer.last_invalid
    assert_kv_matches(pair.consumer, "d1", prompt, 512)
    run_to_end(pair.consumer, "d1")
    totals = pair.consumer.worker.totals
    assert totals["pd_pulls"] == 1 and totals["pd_pull_failures"] == 0
    assert pair.consumer.worker.engine.lookup(prompt) == 512  # filed locally too


def test_harness_dead_producer_is_recomputed(pair: Pair) -> None:
    prompt = random_tokens(700, seed=32)
    params = prefill(pair, "p2", prompt)
    # The producer is gone by the time the decode pulls: nothing listens
    # at its address any more (a killed `vllm serve` is test_prefill_killed_before_decode).
    params["kvtier"]["peers"] = [f"127.0.0.1:{free_port()}"]
    req = pd_request("d2", prompt, 2, params)
    pair.consumer.scheduler.add_request(req)
    stepped_until_output(pair.consumer, req)
    assert pair.consumer.last_invalid  # reported to vLLM, which recomputed them
    run_to_end(pair.consumer, "d2")
    assert pair.consumer.worker.totals["pd_pull_failures"] == 1


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_harness_bad_transfer_is_a_miss(pair: Pair, fault: str) -> None:
    prompt = random_tokens(700, seed=34)
    params = prefill(pair, f"p-{fault}", prompt)
    # The transport's fault injection on the consumer's pulls: every chunk
    # arrives with a flipped byte / half its bytes; none may count.
    pair.consumer.worker.engine.set_transport_fault(fault)
    req = pd_request(f"d-{fault}", prompt, 2, params)
    pair.consumer.scheduler.add_request(req)
    stepped_until_output(pair.consumer, req)
    assert pair.consumer.last_invalid  # the blocks were recomputed
    run_to_end(pair.consumer, f"d-{fault}")
    assert pair.consumer.worker.totals["pd_pull_failures"] == 1
    assert pair.consumer.worker.engine.lookup(prompt) == 0  # nothing bad was filed
    stats = pair.consumer.worker.engine.stats()["transport"]
    assert stats["corrupt"] + stats["misses"] + stats["errors"] > 0, stats


def test_harness_refuses_other_deployments_params(pair: Pair) -> None:
    prompt = random_tokens(700, seed=33)
    params = prefill(pair, "p3", prompt)
    bad = json.loads(json.dumps(params))
    bad["kvtier"]["namespace"] = "0" * 32  # e.g. another model's producer
    req = pd_request("d3", prompt, 2, bad)
    conn = pair.consumer.scheduler.connector
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    assert conn.totals["pd_params_refused"] == 1
    pair.consumer.scheduler.add_request(req)
    run_to_end(pair.consumer, "d3")
    assert pair.consumer.worker.totals["pd_pulls"] == 0


# ---------------------------------------------------------------- vllm serve

MAX_TOKENS = 6
PROMPT_TOKENS = 1400
HITS = "vllm:external_prefix_cache_hits_total"


def kv_config(role: str, disk: Path, listen: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"cpu_capacity": "256MiB", "disk_path": str(disk)}
    if role != "kv_both":
        extra["transport"] = "ucx"
        extra["transport_timeout_ms"] = 10000
    if listen is not None:
        extra["transport_listen"] = listen
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": role,
        "kv_connector_extra_config": extra,
    }


def prompts(seed: int, n: int) -> list[list[int]]:
    return [random_tokens(PROMPT_TOKENS, seed=seed + i) for i in range(n)]


SEEDS = {"1p1d": 900, "2p1d": 920, "killed": 940, "stream": 960}
COUNTS = {"1p1d": 2, "2p1d": 4, "killed": 1, "stream": 1}


@dataclasses.dataclass
class Deployment:
    p0: VllmServer
    p1: VllmServer
    d: VllmServer
    reference: dict[str, list[list[int]]]
    logs: Path


@pytest.fixture(scope="module")
def deployment(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("pd")
    with VllmServer(model_path, kv_transfer_config=kv_config("kv_both", logs / "ref"),
                    log_path=logs / "ref.log") as ref:
        reference = {name: [ref.complete(p, MAX_TOKENS) for p in prompts(SEEDS[name], COUNTS[name])]
                     for name in SEEDS}
    servers = [
        VllmServer(model_path, kv_transfer_config=kv_config("kv_producer", logs / "p0", f"127.0.0.1:{free_port()}"),
                   log_path=logs / "p0.log"),
        VllmServer(model_path, kv_transfer_config=kv_config("kv_producer", logs / "p1", f"127.0.0.1:{free_port()}"),
                   log_path=logs / "p1.log"),
        VllmServer(model_path, kv_transfer_config=kv_config("kv_consumer", logs / "d"), log_path=logs / "d.log"),
    ]
    try:
        for s in servers:
            s.start()
        yield Deployment(*servers, reference=reference, logs=logs)
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def start_proxy() -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(prefill: list[VllmServer], decode: list[VllmServer]) -> str:
        port = free_port()
        args = [sys.executable, "-m", "kvtier.cli", "proxy", "--port", str(port), "--log-level", "warning"]
        args += [a for s in prefill for a in ("--prefill", s.url)]
        args += [a for s in decode for a in ("--decode", s.url)]
        proc = subprocess.Popen(args)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # start-up: until /health answers (every backend up)
            assert proc.poll() is None, "kvtier proxy exited"
            try:
                with urllib.request.urlopen(url + "/health", timeout=10) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            assert time.monotonic() < deadline, "kvtier proxy did not become healthy"
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def complete(
    url: str, model: str, prompt: list[int], max_tokens: int = MAX_TOKENS, **extra_body: Any
) -> tuple[list[int], Any]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                  extra_body={"return_token_ids": True, **extra_body})
    choice = r.choices[0]
    ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
    assert ids is not None, r
    return [int(t) for t in ids], r


def through_proxy(dep: Deployment, url: str, name: str) -> None:
    d_before = dep.d.metrics()
    outputs, hits = [], []
    for p in prompts(SEEDS[name], COUNTS[name]):
        before = dep.d.metrics().get(HITS, 0.0)
        outputs.append(complete(url, dep.d.model, p)[0])
        hits.append(dep.d.metrics().get(HITS, 0.0) - before)
    assert outputs == dep.reference[name]
    for n in hits:
        assert n >= 0.9 * PROMPT_TOKENS, (hits, (dep.logs / "d.log").read_text()[-3000:])
    d_after = dep.d.metrics()
    assert d_after.get("kvtier_pd_pulls_total", 0.0) - d_before.get("kvtier_pd_pulls_total", 0.0) == COUNTS[name]
    assert d_after.get("kvtier_pd_pull_failures_total", 0.0) == d_before.get("kvtier_pd_pull_failures_total", 0.0)


def test_1p1d(deployment: Deployment, start_proxy: Any) -> None:
    url = start_proxy([deployment.p0], [deployment.d])
    through_proxy(deployment, url, "1p1d")


def test_2p1d(deployment: Deployment, start_proxy: Any) -> None:
    holds = [s.metrics().get("kvtier_pd_holds_total", 0.0) for s in (deployment.p0, deployment.p1)]
    url = start_proxy([deployment.p0, deployment.p1], [deployment.d])
    through_proxy(deployment, url, "2p1d")
    # Round robin: each prefill instance prefilled and held half of them.
    after = [s.metrics().get("kvtier_pd_holds_total", 0.0) for s in (deployment.p0, deployment.p1)]
    assert [a - b for a, b in zip(after, holds)] == [2, 2]


def test_stream_through_proxy(deployment: Deployment, start_proxy: Any) -> None:
    import openai

    url = start_proxy([deployment.p0], [deployment.d])
    [prompt] = prompts(SEEDS["stream"], 1)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    ids: list[int] = []
    chunks = 0
    for chunk in client.completions.create(model=deployment.d.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0.0, stream=True, extra_body={"return_token_ids": True}):
        chunks += 1
        for choice in chunk.choices:
            ids += (choice.model_extra or {}).get("token_ids") or []
    assert chunks >= 2  # streamed, not one body
    assert ids == deployment.reference["stream"][0]


def test_prefill_killed_before_decode(deployment: Deployment) -> None:
    """Last in the file: it kills p1."""
    [prompt] = prompts(SEEDS["killed"], 1)
    # The proxy's first leg, by hand, against p1.
    _, r = complete(deployment.p1.url, deployment.p1.model, prompt, max_tokens=1,
                    kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
    params = (r.model_extra or {}).get("kv_transfer_params")
    assert params and params["kvtier"]["tokens"] >= 1024, r
    assert deployment.p1.proc is not None
    os.killpg(deployment.p1.proc.pid, signal.SIGKILL)
    deployment.p1.proc.wait(60)
    before = deployment.d.metrics()
    ids, _ = complete(deployment.d.url, deployment.d.model, prompt, kv_transfer_params=params)
    assert ids == deployment.reference["killed"][0]
    after = deployment.d.metrics()
    assert after.get("kvtier_pd_pull_failures_total", 0.0) - before.get("kvtier_pd_pull_failures_total", 0.0) == 1
