"""Fast tests: vLLM's real Scheduler + both KVTierConnector roles + a real engine.

Only the forward pass is faked (kvtier.testing.sched_harness writes a value
derived from each token and its position into its KV slot), so these tests
check the scheduler protocol (matched tokens, allocation, metadata, delayed
frees, load errors, async loads, preemption) and that loaded KV is exactly
the KV stored for the same prefix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kvtier
import pytest
import torch
from kvtier.testing.model import random_tokens
from kvtier.testing.sched_harness import Harness, kv_value, make_configs, make_harness
from kvtier.vllm import connector, registry
from kvtier.vllm.connector import check_vllm_version, slot_mapping, split_extra_config

pytestmark = pytest.mark.usefixtures("native_engine")

CHUNK = 256
BS = 16


@pytest.fixture
def extra(tmp_path: Any) -> dict[str, Any]:
    # A fresh namespace per test keeps engines (and their caches) apart.
    return {"chunk_size": CHUNK, "cpu_capacity": "64MiB", "disk_path": "", "namespace": str(tmp_path)}


@pytest.fixture
def harness(model_path: str, extra: dict[str, Any]) -> Iterator[Harness]:
    h = make_harness(model_path, extra)
    yield h
    h.worker.shutdown()
    h.scheduler.connector.shutdown()


def assert_kv_matches(h: Harness, req_id: str, tokens: list[int], upto: int) -> None:
    for pos in range(upto):
        want = kv_value(tokens[pos], pos)
        k, v = h.read(req_id, pos)
        assert torch.all(k == want), f"K at {pos}: {k.flatten()[:2]} != {want}"
        assert torch.all(v == -want), f"V at {pos}: {v.flatten()[:2]} != {-want}"


def drain(h: Harness, req_id: str, timeout_s: float = 30.0) -> None:
    """Steps until the request leaves the scheduler. Bounded in time, not in
    steps: its blocks are freed only when kvtier's asynchronous save reports
    done, which takes longer on a busy machine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if req_id not in h.scheduler.requests:
            return
        h.step()
        time.sleep(0.002)
    raise AssertionError(f"{req_id} did not finish within {timeout_s} s")


def test_save_then_hit_loads_exact_kv(harness: Harness) -> None:
    h = harness
    prompt = random_tokens(600, seed=5)
    h.add("a", prompt)
    drain(h, "a")
    eng = h.worker.engine
    eng.flush()
    assert eng.lookup(prompt) >= 512
    # Every block came back: the delayed free was released by finished_sending.
    pool = h.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # minus the null block

    req = h.add("b", prompt)
    conn = h.scheduler.connector
    matched, is_async = conn.get_num_new_matched_tokens(req, 0)
    assert not is_async
    assert 512 <= matched <= len(prompt) - 1
    out = h.step()
    assert out.num_scheduled_tokens["b"] == len(prompt) - matched
    assert not h.last_invalid
    assert_kv_matches(h, "b", prompt, matched)
    drain(h, "b")


def test_respects_local_computed_tokens(harness: Harness) -> None:
    h = harness
    prompt = random_tokens(600, seed=6)
    h.add("a", prompt)
    drain(h, "a")
    h.worker.engine.flush()
    req = h.add("b", prompt)
    conn = h.scheduler.connector
    full, _ = conn.get_num_new_matched_tokens(req, 0)
    part, _ = conn.get_num_new_matched_tokens(req, 256)
    assert part == full - 256
    assert conn.get_num_new_matched_tokens(req, full) == (0, False)


def test_short_or_unknown_prompt_is_a_miss(harness: Harness) -> None:
    h = harness
    req = h.add("a", random_tokens(100, seed=7))
    assert h.scheduler.connector.get_num_new_matched_tokens(req, 0) == (0, False)
    drain(h, "a")


def test_chunks_lost_before_load_are_recomputed(harness: Harness) -> None:
    h = harness
    prompt = random_tokens(600, seed=8)
    h.add("a", prompt)
    drain(h, "a")
    eng = h.worker.engine
    eng.flush()
    h.add("b", prompt)
    h.step(before_load=eng.clear)  # lookup done, chunks gone
    assert h.last_invalid, "lost chunks must be reported"
    req = h.scheduler.requests["b"]
    # Nothing was loaded: vLLM rolls the request back to the start, drops the
    # token sampled from the bad prefix and recomputes everything.
    assert req.num_computed_tokens == 0
    assert req.num_output_tokens == 0
    drain(h, "b")
    assert_kv_matches(h, "b", prompt, len(prompt))


def test_async_load(model_path: str, extra: dict[str, Any]) -> None:
    h = make_harness(model_path, {**extra, "async_load": True})
    try:
        prompt = random_tokens(700, seed=9)
        h.add("a", prompt)
        drain(h, "a")
        h.worker.engine.flush()
        req = h.add("b", prompt)
        matched, is_async = h.scheduler.connector.get_num_new_matched_tokens(req, 0)
        assert is_async and matched >= 512
        # The load runs on kvtier's loader thread: step until it reports done
        # (bounded in time, not in steps: a busy machine needs more steps).
        deadline = time.monotonic() + 30
        while req.num_output_tokens == 0 and time.monotonic() < deadline:
            h.step()
            time.sleep(0.005)
        assert req.num_output_tokens > 0
        assert not h.last_invalid
        assert_kv_matches(h, "b", prompt, matched)
        drain(h, "b")
    finally:
        h.worker.shutdown()
        h.scheduler.connector.shutdown()


@pytest.mark.parametrize("role, loads, saves", [("kv_producer", False, True), ("kv_consumer", True, False)])
def test_roles(model_path: str, extra: dict[str, Any], role: str, loads: bool, saves: bool) -> None:
    prompt = random_tokens(600, seed=11)
    # Seed the cache through a kv_both pair sharing the engine (same config and
    # namespace), then build the pair under test: it registers its own tensors.
    seeder = make_harness(model_path, extra)
    seeder.add("seed", prompt)
    drain(seeder, "seed")
    seeder.worker.engine.flush()
    h = make_harness(model_path, extra, kv_role=role)
    try:
        assert h.worker.engine is seeder.worker.engine
        req = h.add("x", prompt)
        matched, _ = h.scheduler.connector.get_num_new_matched_tokens(req, 0)
        assert (matched > 0) == loads
        drain(h, "x")
        if loads:
            assert_kv_matches(h, "x", prompt, matched)
        other = random_tokens(600, seed=12)
        h.add("y", other)
        drain(h, "y")
        h.worker.engine.flush()
        assert (h.worker.engine.lookup(other) > 0) == saves
    finally:
        h.worker.shutdown()
        h.scheduler.connector.shutdown()
        seeder.worker.shutdown()
        seeder.scheduler.connector.shutdown()


def assert_running_kv_exact(h: Harness) -> None:
    """Every token a running request has computed (or loaded) has, in its
    paged block, the KV of that token at that position."""
    for req in h.scheduler.running:
        tokens = list(req.all_token_ids)
        assert_kv_matches(h, req.request_id, tokens, min(req.num_computed_tokens, len(tokens)))


def test_preemption_waits_for_saves_and_resumes(model_path: str, extra: dict[str, Any]) -> None:
    # 24 usable blocks of 16 tokens: three 120-token prompts growing by 40
    # tokens each cannot all stay resident, so vLLM preempts. 32-token chunks:
    # each prompt stores three whole chunks, which a resumed request loads.
    h = make_harness(model_path, {**extra, "chunk_size": 32}, num_blocks=25, max_num_batched_tokens=512)
    try:
        prompts = {f"r{i}": random_tokens(120, seed=20 + i) for i in range(3)}
        for rid, p in prompts.items():
            h.add(rid, p, max_tokens=40)
        preempted: set[str] = set()
        resumed_loads = 0
        for _ in range(400):
            out = h.step()
            preempted |= set(out.preempted_req_ids or ())
            meta = out.kv_connector_metadata
            resumed_loads += sum(1 for spec in meta.loads if spec.req_id in preempted)
            assert not h.last_invalid
            assert_running_kv_exact(h)
            if not h.scheduler.requests:
                break
        assert preempted
        assert resumed_loads > 0, "no preempted request resumed from kvtier: the check saw only recomputed KV"
        assert not h.scheduler.requests
    finally:
        h.worker.shutdown()
        h.scheduler.connector.shutdown()


def test_cache_salt_keys_apart(harness: Harness) -> None:
    """Same tokens, two cache_salt values: no shared KV; same salt: exact KV."""
    h = harness
    prompt = random_tokens(600, seed=30)
    h.add("a", prompt, cache_salt="tenant-a")
    drain(h, "a")
    eng = h.worker.engine
    eng.flush()
    conn = h.scheduler.connector
    assert conn.get_num_new_matched_tokens(h.add("b", prompt, cache_salt="tenant-b"), 0) == (0, False)
    assert conn.get_num_new_matched_tokens(h.add("c", prompt), 0) == (0, False)
    req = h.add("d", prompt, cache_salt="tenant-a")
    matched, _ = conn.get_num_new_matched_tokens(req, 0)
    assert matched >= 512
    for rid in ("b", "c", "d"):
        drain(h, rid)
    assert_kv_matches(h, "d", prompt, matched)


def test_unsupported_identity_is_neither_looked_up_nor_stored(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    original = connector.request_key_extras

    def only_u_unsupported(request: Any, *args: Any) -> Any:
        if request.request_id.startswith("u"):
            return connector.Unsupported("an identity the test made up")
        return original(request, *args)

    monkeypatch.setattr(connector, "request_key_extras", only_u_unsupported)
    prompt = random_tokens(600, seed=31)
    eng = h.worker.engine
    h.add("u1", prompt)
    drain(h, "u1")
    eng.flush()
    assert eng.lookup(prompt) == 0, "an unsupported request was stored"
    h.add("p", prompt)
    drain(h, "p")
    eng.flush()
    assert eng.lookup(prompt) >= 512
    conn = h.scheduler.connector
    assert conn.get_num_new_matched_tokens(h.add("u2", prompt), 0) == (0, False)
    drain(h, "u2")
    assert conn.totals["unsupported_requests"] == 2


def test_multimodal_and_prompt_embeds_extras_key_apart(harness: Harness) -> None:
    """Extras built from Request objects give the engine different keys for
    identical token ids (vLLM's scheduler is not driven with images or
    embeddings here: the text-only test model has no encoder)."""
    from vllm import SamplingParams
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.request import Request

    eng = harness.worker.engine
    prompt = random_tokens(600, seed=32)
    slots = list(range(len(prompt)))
    params = SamplingParams(max_tokens=1)

    def image_request(identifier: str, offset: int) -> Any:
        feature = MultiModalFeatureSpec(
            data=None,
            modality="image",
            identifier=identifier,
            mm_position=PlaceholderRange(offset=offset, length=64),
        )
        return Request("r", prompt, params, None, mm_features=[feature])

    def extras(request: Any) -> Any:
        args = connector.request_key_extras(request)
        assert isinstance(args, dict)
        return connector.key_extras(args)

    cat = extras(image_request("hash-cat", 100))
    eng.store(prompt, slots, extras=cat).wait()
    assert eng.lookup(prompt, extras=cat) >= 512
    assert eng.lookup(prompt, extras=extras(image_request("hash-dog", 100))) == 0
    assert eng.lookup(prompt) == 0
    # An image in the second chunk leaves the first chunk's key alone.
    late_cat = extras(image_request("hash-cat", 300))
    eng.store(prompt, slots, extras=late_cat).wait()
    assert eng.lookup(prompt, extras=extras(image_request("hash-dog", 300))) == CHUNK

    embeds = torch.randn(len(prompt), 32, generator=torch.Generator().manual_seed(0))
    other = embeds.clone()
    other[-1, 0] += 1.0
    e1 = extras(Request("e", None, params, None, prompt_embeds=embeds))
    e2 = extras(Request("e", None, params, None, prompt_embeds=other))
    zeros = [0] * len(prompt)  # vLLM's token ids for an all-embeddings prompt
    eng.store(zeros, slots, extras=e1).wait()
    assert eng.lookup(zeros, extras=e1) >= 512
    assert eng.lookup(zeros, extras=e2) == 0
    assert eng.lookup(zeros) == 0


def test_namespace_layout_carries_kind_backend_and_isa(
    model_path: str, extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart with another attention backend, or on a CPU whose attention
    ISA orders a block's bytes differently, must not reuse the old keys."""
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_config, kv_cache_config = make_configs(model_path, extra)
    base = connector._namespace(vllm_config, kv_cache_config, 0)
    assert ":kind=flash_infer:" in base.layout and ":attn=auto:" in base.layout
    assert ":isa=" in base.layout and ":isa=unknown" not in base.layout
    vllm_config.attention_config.backend = AttentionBackendEnum.CPU_ATTN
    named = connector._namespace(vllm_config, kv_cache_config, 0)
    assert named.layout != base.layout and ":attn=CPU_ATTN:" in named.layout
    isa = base.layout.rsplit(":isa=", 1)[1]
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *a, **k: "amx" if isa != "amx" else "vec")
    assert connector._namespace(vllm_config, kv_cache_config, 0).layout.rsplit(":isa=", 1)[1] != isa


def test_unknown_extra_config_key_is_a_clear_error(model_path: str, extra: dict[str, Any]) -> None:
    with pytest.raises(kvtier.ConfigError, match="chunk_sise"):
        make_harness(model_path, {**extra, "chunk_sise": 128})


def test_connector_option_type_is_checked() -> None:
    with pytest.raises(kvtier.ConfigError, match="async_load"):
        split_extra_config({"async_load": "yes"})
    options, overrides = split_extra_config({"async_load": True, "chunk_size": 64})
    assert options == {"async_load": True} and overrides == {"chunk_size": 64}


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs() -> None:
    """vLLM (config/vllm.py) asks the connector class, found through its own
    factory, whether full CUDA graphs must give way to PIECEWISE: with
    layerwise: true the per-layer hooks have to run between graph pieces."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    def ask(extra: dict[str, Any]) -> bool:
        ktc = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
        cls = KVConnectorFactory.get_connector_class(ktc)
        return bool(cls.requires_piecewise_for_cudagraph(ktc.kv_connector_extra_config))

    assert ask({"layerwise": True}) is True
    assert ask({"layerwise": False}) is False
    assert ask({"async_load": True, "chunk_size": 256}) is False


def test_version_check() -> None:
    check_vllm_version("0.32.0")
    for untested in ("0.31.2", "0.33.1"):
        with pytest.raises(ImportError, match=untested):
            check_vllm_version(untested)


def test_slot_mapping() -> None:
    slots = slot_mapping([3, 1], 4, 6)
    assert slots.tolist() == [12, 13, 14, 15, 4, 5]
    assert slot_mapping([2], 4, 6).tolist() == [8, 9, 10, 11, -1, -1]


def test_registry_shares_and_closes(extra: dict[str, Any]) -> None:
    config = kvtier.load_config({k: v for k, v in extra.items()})
    from kvtier.engine import Namespace

    ns = Namespace(model="m", dtype="float32", layout="x", rank=0, world_size=1)
    k1, e1 = registry.acquire(config, ns)
    k2, e2 = registry.acquire(config, ns)
    assert e1 is e2 and k1 == k2
    k3, e3 = registry.acquire(config, Namespace(model="m", dtype="float32", layout="x", rank=1, world_size=2))
    assert e3 is not e1
    registry.release(k1)
    assert not e1.closed
    registry.release(k2)
    assert e1.closed
    registry.release(k3)
    assert e3.closed
