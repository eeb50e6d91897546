"""A redeploy of new weights under the same path reads no old KV (issue 14 item 3).

Three in-process vLLM runs over one kvtier disk directory and one model
path: a cold run, a restart over the same weights (which must hit, or the
last step proves nothing), then the test model re-made with another seed at
the same path, same shapes and config: that run must be served nothing
from the disk. The same for a LoRA adapter retrained and redeployed under
the same name, id and path.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
from kvtier.testing.model import ModelSpec, make_lora_adapter, make_model, random_tokens
from kvtier.testing.vllm_runner import VllmRun, kvtier_transfer_config

pytestmark = pytest.mark.usefixtures("native_engine")

PROMPT = random_tokens(800, seed=51)
MAX_TOKENS = 8


def run_once(model: Path, disk: Path, lora_request: Any = None) -> tuple[list[int], float]:
    """(greedy output, kvtier's external hits) of one fresh vLLM over `disk`,
    under `lora_request` when given."""
    extra = {"chunk_size": 256, "cpu_capacity": "16MiB", "disk_path": str(disk), "disk_capacity": "64MiB"}
    lora_kwargs: dict[str, Any] = {}
    if lora_request is not None:
        lora_kwargs = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
    run = VllmRun(
        str(model),
        num_blocks=40,
        max_model_len=4096,
        max_num_batched_tokens=2048,
        kv_transfer_config=kvtier_transfer_config(extra),
        **lora_kwargs,
    )
    try:
        out = run.generate([PROMPT], MAX_TOKENS, lora_request=lora_request)[0][0]
        run.engine().flush()  # on disk before the restart
        return out, run.metric("vllm:external_prefix_cache_hits")
    finally:
        run.close()


def test_new_weights_same_path_serve_nothing_old(model_path: str, tmp_path: Path) -> None:
    other_weights = make_model(dataclasses.replace(ModelSpec(), seed=ModelSpec().seed + 1))
    deployed = tmp_path / "model"
    disk = tmp_path / "kvtier-disk"
    disk.mkdir()
    shutil.copytree(model_path, deployed)

    old, hits = run_once(deployed, disk)
    assert hits == 0
    same, hits = run_once(deployed, disk)
    assert hits >= 768, "a restart over the same weights must hit the disk tier"
    assert same == old

    shutil.rmtree(deployed)
    shutil.copytree(other_weights, deployed)  # the redeploy
    new, hits = run_once(deployed, disk)
    assert hits == 0, "the new weights were served the old weights' KV"
    assert new != old, "the two models agree: the test could not see stale KV"


def test_retrained_lora_adapter_same_path_serves_nothing_old(model_path: str, tmp_path: Path) -> None:
    """kvtier's disk outlives vLLM's process, whose own prefix-cache hash
    keys an adapter by name and path only."""
    from vllm.lora.request import LoRARequest

    adapter = make_lora_adapter(tmp_path / "adapters" / "sql", seed=1)
    lora = LoRARequest("sql", 1, str(adapter))
    disk = tmp_path / "kvtier-disk"
    disk.mkdir()

    old, hits = run_once(Path(model_path), disk, lora)
    assert hits == 0
    same, hits = run_once(Path(model_path), disk, lora)
    assert hits >= 768, "a restart with the same adapter must hit the disk tier"
    assert same == old

    shutil.rmtree(adapter)
    make_lora_adapter(adapter, seed=2)  # the redeploy: same name, id, path, shapes
    new, hits = run_once(Path(model_path), disk, lora)
    assert hits == 0, "the retrained adapter was served the old adapter's KV"
    assert new != old, "the two adapters agree: the test could not see stale KV"
