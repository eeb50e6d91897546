"""Drive vLLM's real Scheduler and a real KVTierConnector pair without a model.

The scheduler, its KV cache manager and both connector roles are vLLM's and
kvtier's own code; only the forward pass is replaced by `_fake_forward`, which
writes a recognisable value into each computed slot (a function of the token
and its position, the same in every layer), so a test can check that what a
load scattered is exactly the KV that an earlier request produced for the
same prefix. KV tensors use vLLM CPU's layout:
[num_blocks, num_kv_heads, block_size, 2 * head_size], where each (block,
head) plane is really [2 * block_size, head_size]: the block's K rows, then
its V rows (vLLM's CPU attention views it that way). K gets +value, V -value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def kv_value(token: int, position: int) -> float:
    """What the fake forward writes for `token` at `position` (exact in fp32)."""
    return float(token % 4096) + float(position % 4096) / 4096.0


@dataclasses.dataclass
class Harness:
    scheduler: Any
    worker: Any  # KVTierConnector, WORKER role
    kv_caches: dict[str, torch.Tensor]
    block_size: int
    sampled_token: int = 7
    # req_id -> block ids, as the worker's model runner would track them.
    _blocks: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    last_invalid: set[int] = dataclasses.field(default_factory=set)

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 2, **request_kwargs: Any) -> Any:
        """Adds a request; `request_kwargs` go to vLLM's Request (cache_salt...)."""
        from vllm import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        request = Request(req_id, list(prompt), params, None, **request_kwargs)
        self.scheduler.add_request(request)
        return request

    def step(self, before_load: Any = None) -> Any:
        """One engine step; `before_load()` runs between lookup and load."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        if before_load is not None:
            before_load()
        w = self.worker
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        sampled = self._fake_forward(out)
        w.wait_for_save()
        results = w.get_transfer_results(out.finished_req_ids)
        invalid = w.get_block_ids_with_load_errors()
        self.last_invalid |= invalid
        kv_out = KVConnectorOutput(
            finished_sending=results.finished_sending or None,
            finished_recving=results.finished_recving or None,
            invalid_block_ids=invalid,
            kv_connector_stats=w.get_kv_connector_stats(),
        )
        w.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        runner_out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[sampled.get(r, []) for r in req_ids],
            kv_connector_output=kv_out,
        )
        self.scheduler.update_from_output(out, runner_out)
        return out

    def _fake_forward(self, out: Any) -> dict[str, list[int]]:
        for new in out.scheduled_new_reqs:
            self._blocks[new.req_id] = list(new.block_ids[0])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._blocks[req_id] = list(blocks[0]) if blocks else []
            elif blocks is not None:
                self._blocks.setdefault(req_id, []).extend(blocks[0])
        computed: dict[str, int] = {n.req_id: n.num_computed_tokens for n in out.scheduled_new_reqs}
        for i, req_id in enumerate(cached.req_ids):
            computed[req_id] = cached.num_computed_tokens[i]
        sampled: dict[str, list[int]] = {}
        for req_id, n in out.num_scheduled_tokens.items():
            start = computed[req_id]
            # The scheduler's own token list: it drops samples it rejects
            # (e.g. after a load error), so a copy here would drift.
            tokens = self.scheduler.requests[req_id].all_token_ids
            for pos in range(start, min(start + n, len(tokens))):
                self.write(req_id, pos, kv_value(tokens[pos], pos))
            if start + n >= len(tokens):
                sampled[req_id] = [self.sampled_token]
        return sampled

    def slot(self, req_id: str, pos: int) -> tuple[int, int]:
        return self._blocks[req_id][pos // self.block_size], pos % self.block_size

    def _planes(self, t: torch.Tensor) -> torch.Tensor:
        nb, heads, bs, two_hd = t.shape
        return t.view(nb, heads, 2 * bs, two_hd // 2)

    def write(self, req_id: str, pos: int, value: float) -> None:
        block, off = self.slot(req_id, pos)
        for t in self.kv_caches.values():
            planes = self._planes(t)
            planes[block, :, off, :] = value
            planes[block, :, self.block_size + off, :] = -value

    def read(self, req_id: str, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of the token at `pos`, stacked over layers."""
        block, off = self.slot(req_id, pos)
        planes = [self._planes(t) for t in self.kv_caches.values()]
        k = torch.stack([p[block, :, off, :] for p in planes])
        v = torch.stack([p[block, :, self.block_size + off, :] for p in planes])
        return k, v


def make_configs(
    model_path: str,
    extra_config: dict[str, Any],
    kv_role: str = "kv_both",
    num_blocks: int = 64,
    block_size: int = 16,
    num_layers: int = 2,
    max_num_batched_tokens: int = 1024,
) -> tuple[Any, Any]:
    """(VllmConfig, KVCacheConfig) of a CPU engine over `model_path` whose
    KV cache is `num_layers` full-attention layers of 2 heads x 64."""
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )

    max_len = 4096
    model_config = ModelConfig(model=model_path, dtype="float32", max_model_len=max_len, seed=0)
    vllm_config = VllmConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=False),
        scheduler_config=SchedulerConfig(
            max_model_len=max_len,
            is_encoder_decoder=False,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=16,
            enable_chunked_prefill=True,
        ),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role=kv_role,
            kv_connector_extra_config=dict(extra_config),
            # One deployment per (disk_path, namespace): harnesses built
            # with the same extra config in one process share the worker
            # engine, as connector objects of one vLLM deployment do.
            engine_id="kvtier-sched-harness",
        ),
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                layers,
                FullAttentionSpec(
                    block_size=block_size,
                    num_kv_heads=_NUM_KV_HEADS,
                    head_size=_HEAD_SIZE,
                    dtype=torch.float32,
                ),
            )
        ],
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return vllm_config, kv_cache_config


_NUM_KV_HEADS, _HEAD_SIZE = 2, 64


def make_harness(
    model_path: str,
    extra_config: dict[str, Any],
    kv_role: str = "kv_both",
    num_blocks: int = 64,
    block_size: int = 16,
    num_layers: int = 2,
    max_num_batched_tokens: int = 1024,
) -> Harness:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from kvtier.vllm import KVTierConnector

    vllm_config, kv_cache_config = make_configs(
        model_path, extra_config, kv_role, num_blocks, block_size, num_layers, max_num_batched_tokens
    )
    scheduler = Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=True,
    )
    worker = KVTierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    kv_caches = {
        name: torch.zeros(num_blocks, _NUM_KV_HEADS, block_size, 2 * _HEAD_SIZE)
        for name in kv_cache_config.kv_cache_groups[0].layer_names
    }
    worker.register_kv_caches(kv_caches)
    return Harness(scheduler=scheduler, worker=worker, kv_caches=kv_caches, block_size=block_size)
