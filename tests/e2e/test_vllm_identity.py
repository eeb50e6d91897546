"""Request identity beyond token ids in a real vLLM (issue 14 item 1).

The same token ids under two `cache_salt` values, or under two LoRA
adapters, must never share KV: vLLM's own prefix cache keeps them apart, and
so must kvtier. One in-process vLLM (CPU build) with LoRA enabled and kvtier
as its only cache (vLLM's prefix cache off, so every external hit below is
kvtier's). The adapters are random, written by hand
(kvtier.testing.model.make_lora_adapter), large enough to change the greedy
output, so a hit across adapters would also show up as a wrong output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvtier.testing.model import make_lora_adapter, random_tokens
from kvtier.testing.vllm_runner import VllmRun, kvtier_transfer_config

pytestmark = pytest.mark.usefixtures("native_engine")

MAX_TOKENS = 8
SALTED = random_tokens(800, seed=41)
ADAPTED = random_tokens(800, seed=42)
PLAIN = random_tokens(800, seed=43)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from vllm.lora.request import LoRARequest

    root = tmp_path_factory.mktemp("adapters")
    return {
        name: LoRARequest(name, i + 1, str(make_lora_adapter(Path(root) / name, seed=100 + i)))
        for i, name in enumerate(("sql", "chat"))
    }


@pytest.fixture(scope="module")
def kv(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmRun]:
    extra = {
        "chunk_size": 256,
        "cpu_capacity": "32MiB",
        "disk_path": str(tmp_path_factory.mktemp("kvtier-disk")),
        "disk_capacity": "64MiB",
    }
    run = VllmRun(
        model_path,
        num_blocks=40,
        max_model_len=4096,
        max_num_batched_tokens=2048,
        kv_transfer_config=kvtier_transfer_config(extra),
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
    )
    yield run
    run.close()


def generate(run: VllmRun, prompt: list[int], **kwargs: Any) -> tuple[list[int], float]:
    """(greedy output, kvtier's external hits for it); stores are flushed."""
    before = run.metric("vllm:external_prefix_cache_hits")
    out = run.generate([prompt], MAX_TOKENS, **kwargs)[0][0]
    run.engine().flush()
    return out, run.metric("vllm:external_prefix_cache_hits") - before


def test_cache_salt_never_shares_kv(kv: VllmRun) -> None:
    cold_a, hits = generate(kv, SALTED, cache_salt="tenant-a")
    assert hits == 0
    _, hits = generate(kv, SALTED, cache_salt="tenant-b")
    assert hits == 0, "tenant-b was served tenant-a's KV"
    _, hits = generate(kv, SALTED)
    assert hits == 0, "an unsalted request was served salted KV"
    warm_a, hits = generate(kv, SALTED, cache_salt="tenant-a")
    assert hits >= 768, "the same salt must still hit"
    assert warm_a == cold_a


def test_lora_adapters_never_share_kv(kv: VllmRun, adapters: dict[str, Any]) -> None:
    cold_sql, hits = generate(kv, ADAPTED, lora_request=adapters["sql"])
    assert hits == 0
    cold_chat, hits = generate(kv, ADAPTED, lora_request=adapters["chat"])
    assert hits == 0, "adapter 'chat' was served adapter 'sql''s KV"
    assert cold_chat != cold_sql, "the adapters do not change the output: the test could not see wrong KV"
    base, hits = generate(kv, ADAPTED)
    assert hits == 0, "the base model was served an adapter's KV"
    assert base not in (cold_sql, cold_chat)
    warm_sql, hits = generate(kv, ADAPTED, lora_request=adapters["sql"])
    assert hits >= 768, "the same adapter must still hit"
    assert warm_sql == cold_sql
    warm_chat, hits = generate(kv, ADAPTED, lora_request=adapters["chat"])
    assert hits >= 768
    assert warm_chat == cold_chat


def test_plain_requests_still_hit(kv: VllmRun) -> None:
    cold, hits = generate(kv, PLAIN)
    assert hits == 0
    warm, hits = generate(kv, PLAIN)
    assert hits >= 768 and warm == cold
