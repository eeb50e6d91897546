"""A redeploy of new weights under the same path reads no old KV (issue 14 item 3).

Three in-process vLLM runs over one kvtier disk directory and one model
path: a cold run, a restart over the same weights (which must hit, or the
last step proves nothing), then the test model re-made with another seed at
the same path, same shapes and config: that run must be served nothing
from the disk.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from kvtier.testing.model import ModelSpec, make_model, random_tokens
from kvtier.testing.vllm_runner import VllmRun, kvtier_transfer_config

pytestmark = pytest.mark.usefixtures("native_engine")

PROMPT = random_tokens(800, seed=51)
MAX_TOKENS = 8


def run_once(model: Path, disk: Path) -> tuple[list[int], float]:
    """(greedy output, kvtier's external hits) of one fresh vLLM over `disk`."""
    extra = {"chunk_size": 256, "cpu_capacity": "16MiB", "disk_path": str(disk), "disk_capacity": "64MiB"}
    run = VllmRun(
        str(model),
        num_blocks=40,
        max_model_len=4096,
        max_num_batched_tokens=2048,
        kv_transfer_config=kvtier_transfer_config(extra),
    )
    try:
        out = run.generate([PROMPT], MAX_TOKENS)[0][0]
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
