"""Layer-wise transfer (`layerwise: true`) inside a real vLLM (CPU build,
in-process): loads run one layer ahead of the forward pass, stores follow it
layer by layer. Outputs are compared token for token with vLLM alone, and the
worker connector's counters show which path moved the KV. The same option
under `vllm serve` is in test_vllm_serve.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from kvtier.testing.model import random_tokens
from kvtier.testing.vllm_runner import VllmRun, kvtier_transfer_config
from kvtier.vllm.connector import KVTierConnectorMetadata, SaveSpec, slot_mapping

pytestmark = pytest.mark.usefixtures("native_engine")

MAX_TOKENS = 8
# 3000 tokens with 2048 tokens per step: the prompt is prefilled in two
# passes, so a store spans passes and a load meets a chunked prefill.
DOCS = [random_tokens(3000, seed=700 + i) for i in range(2)]


@pytest.fixture(scope="module")
def reference(model_path: str) -> list[list[int]]:
    run = VllmRun(model_path, num_blocks=64, max_model_len=4096, max_num_batched_tokens=2048)
    try:
        return [out for out, _ in run.generate(DOCS, MAX_TOKENS)]
    finally:
        run.close()


@pytest.fixture(scope="module")
def kv(model_path: str, reference: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmRun]:
    extra = {
        "chunk_size": 256,
        "cpu_capacity": "64MiB",
        "disk_path": str(tmp_path_factory.mktemp("kvtier-disk")),
        "layerwise": True,
    }
    run = VllmRun(
        model_path,
        num_blocks=64,
        max_model_len=4096,
        max_num_batched_tokens=2048,
        kv_transfer_config=kvtier_transfer_config(extra),
    )
    yield run
    run.close()


def worker_connector() -> Any:
    """The worker-side connector (in-process: this process)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def test_layerwise_store_then_load_equals_vllm_alone(kv: VllmRun, reference: list[list[int]]) -> None:
    conn = worker_connector()
    assert conn._layerwise and len(conn._layer_index) > 1
    totals0 = dict(conn.totals)
    cold = [out for out, _ in kv.generate(DOCS, MAX_TOKENS)]
    assert cold == reference
    kv.engine().flush()
    assert conn.totals["layerwise_store_passes"] > totals0["layerwise_store_passes"]
    for doc in DOCS:
        assert kv.engine().lookup(doc) >= 2816  # 11 whole chunks of 256

    hits0 = kv.metric("vllm:external_prefix_cache_hits")
    warm = [out for out, _ in kv.generate(DOCS, MAX_TOKENS)]
    hits = kv.metric("vllm:external_prefix_cache_hits") - hits0
    assert warm == reference
    assert hits >= 0.9 * sum(len(d) for d in DOCS)
    assert conn.totals["layerwise_loads"] - totals0["layerwise_loads"] >= len(DOCS)
    assert conn.totals["tokens_loaded"] - totals0["tokens_loaded"] >= 0.9 * sum(len(d) for d in DOCS)
    assert conn.totals["layerwise_stores_aborted"] == totals0["layerwise_stores_aborted"]
    assert conn.totals["load_errors"] == totals0["load_errors"]


def test_pass_that_skips_a_layer_stores_nothing(kv: VllmRun) -> None:
    """A forward pass that never reports a layer (it failed part-way) must
    not store a chunk: its stores are aborted, counted, and the connector
    falls back to whole-chunk stores after the pass. Driven through the
    worker connector's own hooks, as vLLM calls them."""
    conn = worker_connector()
    eng = kv.engine()
    tokens = np.asarray(random_tokens(512, seed=4242), dtype=np.int64)
    block_size = conn._block_size
    blocks = list(range(512 // block_size))
    meta = KVTierConnectorMetadata(
        saves=[SaveSpec(req_id="skip-a-layer", tokens=tokens, slots=slot_mapping(blocks, block_size, 512), skip_tokens=0)]
    )
    aborted0 = conn.totals["layerwise_stores_aborted"]
    conn.bind_connector_metadata(meta)
    names = list(conn._layer_index)
    for name in names[:-1]:  # the last layer never reports
        conn.save_kv_layer(name, None, None)
    conn.wait_for_save()
    conn.clear_connector_metadata()
    for handle, _ in conn._saves_in_flight.pop("skip-a-layer", []):
        with pytest.raises(Exception, match="aborted"):
            handle.wait()
    conn._saved_reqs.discard("skip-a-layer")
    eng.flush()
    assert eng.lookup(tokens) == 0
    assert conn.totals["layerwise_stores_aborted"] == aborted0 + 1
    assert conn._layerwise_store_broken
    conn._layerwise_store_broken = False  # leave the module's connector as it was
