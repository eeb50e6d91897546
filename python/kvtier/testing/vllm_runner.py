"""Build and tear down in-process vLLM engines for tests, the demo and benchmarks.

vLLM keeps the KV connector and the distributed state in process globals, so
two LLM objects cannot live side by side in one process: `VllmRun` builds one,
and `close()` shuts it down and resets those globals before the next.
In-process mode (VLLM_ENABLE_V1_MULTIPROCESSING=0) starts in seconds and puts
the scheduler, the worker and kvtier's engine registry in this process, so
callers can read the connector and the engine directly.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

# Must be set before vLLM is imported anywhere in the process.
_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": str(max(1, os.cpu_count() or 1)),
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


def setup_env() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


setup_env()


def kvtier_transfer_config(extra: dict[str, Any], role: str = "kv_both") -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="KVTierConnector",
        kv_connector_module_path="kvtier.vllm",
        kv_role=role,
        kv_connector_extra_config=dict(extra),
        kv_load_failure_policy="recompute",
    )


def example_transfer_config(path: str) -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="ExampleConnector",
        kv_role="kv_both",
        kv_connector_extra_config={"shared_storage_path": path},
    )


class VllmRun:
    """One in-process vLLM engine over `model_path`; greedy generation by token ids."""

    def __init__(
        self,
        model_path: str,
        *,
        num_blocks: int = 64,
        max_model_len: int = 8192,
        max_num_batched_tokens: int = 8192,
        kv_transfer_config: Any = None,
        enable_prefix_caching: bool = False,
        max_num_seqs: int = 16,
        enforce_eager: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype="float32",
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            num_gpu_blocks_override=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=0.3,
            kv_transfer_config=kv_transfer_config,
            disable_log_stats=False,
            seed=0,
            enforce_eager=enforce_eager,
            **llm_kwargs,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int = 8,
        *,
        cache_salt: str | None = None,
        lora_request: Any = None,
    ) -> list[tuple[list[int], float]]:
        """Greedy outputs and TTFT (seconds) per prompt, in order; every
        prompt under `cache_salt` and `lora_request` when given."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        inputs = []
        for p in prompts:
            prompt = TokensPrompt(prompt_token_ids=list(p))
            if cache_salt is not None:
                prompt["cache_salt"] = cache_salt
            inputs.append(prompt)
        outs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=lora_request)
        return [(list(o.outputs[0].token_ids), ttft(o)) for o in outs]

    def scheduler(self) -> Any:
        core = self.llm.llm_engine.engine_core
        return core.engine_core.scheduler

    def connector(self) -> Any:
        return self.scheduler().connector

    def engine(self) -> Any:
        """The worker's kvtier engine (in-process mode has one worker, so one engine)."""
        from kvtier.vllm import registry

        engines = registry.engines()
        if len(engines) != 1:
            raise RuntimeError(f"expected one kvtier engine in this process, found {len(engines)}")
        return engines[0]

    def metric(self, name: str) -> float:
        total = 0.0
        for m in self.llm.get_metrics():
            if m.name == name:
                total += float(getattr(m, "value", 0) or 0)
        return total

    def close(self) -> None:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        core = self.llm.llm_engine.engine_core
        shutdown = getattr(core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()
        try:
            from vllm.distributed.kv_transfer.kv_transfer_state import (
                ensure_kv_transfer_shutdown,
            )

            ensure_kv_transfer_shutdown()
        except ImportError:
            pass


def ttft(output: Any) -> float:
    metrics = getattr(output, "metrics", None)
    value = getattr(metrics, "first_token_latency", None) if metrics is not None else None
    return float(value) if value is not None else float("nan")
