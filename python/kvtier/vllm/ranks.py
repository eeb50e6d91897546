"""Where each vLLM process's kvtier state lives: ranks, disk directories,
shared catalogues.

Process layout (vLLM 0.32, `vllm serve`): an API process, an engine-core
process running the scheduler (and the scheduler-side connector), and one
worker process per parallel rank (worker-side connectors), even at
tensor_parallel_size=1. The in-process `LLM` class with
VLLM_ENABLE_V1_MULTIPROCESSING=0 folds the engine core and its one worker into
the caller's process; nothing below depends on which.

The rule this module implements:

* Each worker rank owns one engine, holding its shard of every chunk, under
  a namespace carrying its rank (so shards never mix), with its own disk
  directory derived from the configured `disk_path` (one config serves every
  rank), and its catalogue in a POSIX shm object named for the deployment
  and the rank.
* The scheduler opens no tiers. It answers "how many tokens are cached" from
  every rank's catalogue mapped read-only (`kvtier.CatalogueView`): a prefix
  counts only when every rank holds it.

A deployment is named by what makes two processes belong together: the disk
directory when there is one (its lock already makes it exclusive, and the
name stays the same across restarts, so a restarted deployment reclaims the
shm objects a killed one left), else vLLM's `engine_id` (the same in every
process of one deployment, a new one per deployment). The data-parallel
rank and the `namespace` key are part of it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class RankPlacement:
    """One engine's place in the deployment."""

    rank: int  # pp_rank * tensor_parallel_size + tp_rank
    world_size: int  # tensor_parallel_size * pipeline_parallel_size
    dp_rank: int = 0
    dp_size: int = 1


def world_size(vllm_config: Any) -> int:
    pc = vllm_config.parallel_config
    return int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size)


def worker_placement(vllm_config: Any) -> RankPlacement:
    """The calling worker's placement (from vLLM's process groups)."""
    pc = vllm_config.parallel_config
    tp_size = int(pc.tensor_parallel_size)
    try:
        from vllm.distributed.parallel_state import (
            get_pipeline_model_parallel_rank,
            get_tensor_model_parallel_rank,
        )

        tp_rank = int(get_tensor_model_parallel_rank())
        pp_rank = int(get_pipeline_model_parallel_rank())
    except (AssertionError, RuntimeError, ImportError):
        # Process groups not initialised: only possible with one rank.
        if world_size(vllm_config) != 1:
            raise
        tp_rank = pp_rank = 0
    return RankPlacement(
        rank=pp_rank * tp_size + tp_rank,
        world_size=world_size(vllm_config),
        dp_rank=int(getattr(pc, "data_parallel_rank", 0) or 0),
        dp_size=int(getattr(pc, "data_parallel_size", 1) or 1),
    )


def scheduler_placements(vllm_config: Any) -> list[RankPlacement]:
    """Every worker rank the scheduler of this engine core serves."""
    pc = vllm_config.parallel_config
    world = world_size(vllm_config)
    dp_rank = int(getattr(pc, "data_parallel_rank", 0) or 0)
    dp_size = int(getattr(pc, "data_parallel_size", 1) or 1)
    return [RankPlacement(r, world, dp_rank, dp_size) for r in range(world)]


def rank_disk_path(disk_path: str, placement: RankPlacement) -> str:
    """The rank's own disk directory. One rank (and no data parallelism)
    keeps `disk_path` itself, so a single-process cache stays where it was;
    otherwise each rank gets a subdirectory."""
    if not disk_path:
        return disk_path
    if placement.world_size == 1 and placement.dp_size == 1:
        return disk_path
    name = f"rank{placement.rank}of{placement.world_size}"
    if placement.dp_size > 1:
        name = f"dp{placement.dp_rank}-{name}"
    return os.path.join(disk_path, name)


def deployment_name(config: Any, vllm_config: Any, model: str) -> str:
    """The string every process of one deployment derives alike (see the
    module docstring); hashed into the shm names."""
    if config.disk_path:
        anchor = "disk:" + os.path.realpath(os.path.expanduser(config.disk_path))
    else:
        anchor = "engine:" + str(vllm_config.kv_transfer_config.engine_id)
    pc = vllm_config.parallel_config
    return json.dumps(
        {
            "anchor": anchor,
            "namespace": config.namespace,
            "model": model,
            "dp_rank": int(getattr(pc, "data_parallel_rank", 0) or 0),
        },
        sort_keys=True,
    )
