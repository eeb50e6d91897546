"""kvtier inside a real vLLM (CPU build, in-process), checked against vLLM alone.

Every output is compared token for token with a run of the same vLLM build
without any connector. vLLM's own prefix cache is off, so every hit counted
here was served by kvtier. The kvtier engine is deliberately small (16 MiB
CPU tier over a 64 MiB disk tier) and so is vLLM's KV space (40 blocks of
128 tokens), so both evict during the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kvtier.testing.model import random_tokens
from kvtier.testing.vllm_runner import VllmRun, kvtier_transfer_config
from kvtier.vllm.connector import flat_engine_stats

pytestmark = pytest.mark.usefixtures("native_engine")

MAX_TOKENS = 8
DOC = random_tokens(1000, seed=1)
SYSTEM = random_tokens(300, seed=2)
QUESTIONS = [random_tokens(60, seed=10 + k) for k in range(3)]
BATCH = [random_tokens(600, seed=100 + i) for i in range(8)]
BATCH_MAX_TOKENS = 48  # pushes each request past its 5th block: preemptions
FRAGILE = random_tokens(900, seed=3)


def chat_prompts(answers: list[list[int]]) -> list[list[int]]:
    """Round k's prompt: system + (question, answer) of rounds < k + question k."""
    prompts, history = [], list(SYSTEM)
    for k, question in enumerate(QUESTIONS):
        prompts.append(history + question)
        if k < len(answers):
            history = history + question + answers[k]
    return prompts


@pytest.fixture(scope="module")
def reference(model_path: str) -> dict[str, Any]:
    run = VllmRun(model_path, num_blocks=40, max_model_len=4096, max_num_batched_tokens=2048)
    try:
        ref: dict[str, Any] = {"doc": run.generate([DOC], MAX_TOKENS)[0][0]}
        answers: list[list[int]] = []
        for k in range(len(QUESTIONS)):
            prompt = chat_prompts(answers)[k]
            answers.append(run.generate([prompt], MAX_TOKENS)[0][0])
        ref["chat"] = answers
        ref["batch"] = [out for out, _ in run.generate(BATCH, BATCH_MAX_TOKENS)]
        ref["fragile"] = run.generate([FRAGILE], MAX_TOKENS)[0][0]
        return ref
    finally:
        run.close()


@pytest.fixture(scope="module")
def kv(model_path: str, reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmRun]:
    extra = {
        "chunk_size": 256,
        "cpu_capacity": "16MiB",
        "disk_path": str(tmp_path_factory.mktemp("kvtier-disk")),
        "disk_capacity": "64MiB",
    }
    run = VllmRun(
        model_path,
        num_blocks=40,
        max_model_len=4096,
        max_num_batched_tokens=2048,
        kv_transfer_config=kvtier_transfer_config(extra),
    )
    yield run
    run.close()


def engine(run: VllmRun) -> Any:
    return run.engine()


def external_hits(run: VllmRun, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    before = run.metric("vllm:external_prefix_cache_hits")
    outs = run.generate(prompts, max_tokens)
    engine(run).flush()  # saves are write-behind; the next request may rely on them
    return [o for o, _ in outs], run.metric("vllm:external_prefix_cache_hits") - before


def test_save_then_hit(kv: VllmRun, reference: dict[str, Any]) -> None:
    eng = engine(kv)
    cold, cold_hits = external_hits(kv, [DOC], MAX_TOKENS)
    assert cold == [reference["doc"]]
    assert cold_hits == 0
    assert eng.lookup(DOC) >= 768  # three whole chunks stored
    loaded_before = eng.stats().get("tokens_loaded", 0)
    warm, warm_hits = external_hits(kv, [DOC], MAX_TOKENS)
    assert warm == [reference["doc"]]
    assert warm_hits >= 768
    assert warm_hits <= len(DOC) - 1  # the last token is always recomputed
    assert eng.stats().get("tokens_loaded", 0) - loaded_before >= 768


def test_multi_round_chat_hits_previous_round(kv: VllmRun, reference: dict[str, Any]) -> None:
    prompts = chat_prompts(reference["chat"])
    for k, prompt in enumerate(prompts):
        outs, hits = external_hits(kv, [prompt], MAX_TOKENS)
        assert outs == [reference["chat"][k]], f"round {k}"
        if k == 0:
            continue
        previous = len(prompts[k - 1])
        assert hits >= previous - previous % 256, f"round {k} missed round {k - 1}'s prefix"


def test_small_kv_space_many_requests(kv: VllmRun, reference: dict[str, Any]) -> None:
    eng = engine(kv)
    preempt_before = kv.metric("vllm:num_preemptions")
    first, _ = external_hits(kv, BATCH, BATCH_MAX_TOKENS)
    assert first == reference["batch"]
    second, hits = external_hits(kv, BATCH, BATCH_MAX_TOKENS)
    assert second == reference["batch"]
    assert hits > 0
    assert kv.metric("vllm:num_preemptions") > preempt_before, "vLLM never ran out of KV space"
    stats = flat_engine_stats(eng.stats())
    evictions = sum(v for k, v in stats.items() if k.endswith("cpu_evictions"))
    assert evictions > 0, f"kvtier never evicted: {stats}"


def test_chunks_vanish_between_lookup_and_load(kv: VllmRun, reference: dict[str, Any]) -> None:
    """The scheduler counts on cached chunks; they are gone when the worker loads."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    eng = engine(kv)
    outs, _ = external_hits(kv, [FRAGILE], MAX_TOKENS)
    assert outs == [reference["fragile"]]
    assert eng.lookup(FRAGILE) >= 768

    scheduler_side = kv.connector()
    worker_side = get_kv_transfer_group()
    original_meta = scheduler_side.build_connector_meta
    original_errors = worker_side.get_block_ids_with_load_errors
    cleared: list[int] = []
    reported: set[int] = set()

    def build_and_clear(scheduler_output: Any) -> Any:
        meta = original_meta(scheduler_output)
        if meta.loads:  # after the lookup promised tokens, before the load
            eng.clear()
            cleared.append(len(meta.loads))
        return meta

    def record_errors() -> set[int]:
        errors = original_errors()
        reported.update(errors)
        return errors

    scheduler_side.build_connector_meta = build_and_clear
    worker_side.get_block_ids_with_load_errors = record_errors
    try:
        outs = [o for o, _ in kv.generate([FRAGILE], MAX_TOKENS)]
    finally:
        del scheduler_side.build_connector_meta
        del worker_side.get_block_ids_with_load_errors
    assert cleared, "the scheduler never planned a load"
    assert reported, "the lost chunks were not reported as load errors"
    assert outs == [reference["fragile"]]
