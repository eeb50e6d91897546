"""The connector's cache namespace follows the weights, not the name (issue 14 item 3).

New weights deployed under the same model name or path must not read the
old run's KV back from disk. `model_identity` (the namespace's model string)
carries the revision and a digest of config.json, the weight index and a few
KiB of every tensor. No native engine needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kvtier.vllm.connector import model_identity, model_weights_digest
from safetensors.torch import save_file


def write_model(out: Path, seed: int, config: dict[str, object] | None = None) -> Path:
    """A small fake checkpoint: config.json and one safetensors file of
    random tensors with fixed shapes (so a new seed changes only the bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config or {"hidden_size": 64, "num_hidden_layers": 2}))
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.w": torch.randn(256, 64, generator=gen) for i in range(2)}
    tensors["lm_head.weight"] = torch.randn(100, 64, generator=gen)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_same_directory_same_identity(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", seed=1)
    assert model_identity(str(model)) == model_identity(str(model))
    # A copy elsewhere has the same weights digest (only the name differs).
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert model_weights_digest(copy) == model_weights_digest(model)


def test_new_weights_same_path_new_identity(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", seed=1)
    before = model_identity(str(model))
    shutil.rmtree(model)
    write_model(model, seed=2)  # same shapes, same header, other bytes
    assert model_identity(str(model)) != before


def test_one_changed_value_in_a_tensor_tail_changes_identity(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", seed=1)
    before = model_weights_digest(model)
    from safetensors.torch import load_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.1.w"][-1, -1] += 1.0
    save_file(tensors, str(model / "model.safetensors"))
    assert model_weights_digest(model) != before


def test_config_change_changes_identity(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", seed=1)
    before = model_identity(str(model))
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "rope_theta": 1e6}))
    assert model_identity(str(model)) != before


def test_revision_is_part_of_identity(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", seed=1)
    assert model_identity(str(model), "v1") != model_identity(str(model), "v2")


def test_hub_snapshot_resolved_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit, seed in (("a" * 40, 1), ("b" * 40, 2)):
        write_model(repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    first = model_identity("org/tiny", None, str(cache))
    assert "a" * 40 in first and "weights=unknown" not in first
    (repo / "refs" / "main").write_text("b" * 40)  # a redeploy: main moved
    second = model_identity("org/tiny", None, str(cache))
    assert second != first and "b" * 40 in second


def test_unresolvable_hub_id_keeps_revision_and_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING", logger="kvtier.vllm.connector"):
        identity = model_identity("org/absent", "v3", str(tmp_path / "empty-hub"))
    assert identity == "org/absent|revision=v3|weights=unknown"
    assert "cannot find org/absent locally" in caplog.text


def test_load_time_changes_to_the_computation_are_part_of_identity(tmp_path: Path) -> None:
    """The same files compute other KV under another remote-code revision, a
    quantization applied at load, or config / model class overrides."""
    model = str(write_model(tmp_path / "m", seed=1))
    base = model_identity(model)
    variants = [
        model_identity(model, code_revision="c1"),
        model_identity(model, code_revision="c2"),
        model_identity(model, quantization="fp8"),
        model_identity(model, hf_overrides={"rope_theta": 1e6}),
        model_identity(model, hf_overrides={"rope_theta": 2e6}),
        model_identity(model, model_class_overrides={"LlamaForCausalLM": "pkg.mod:Other"}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Unset or empty adds nothing; dict order does not matter.
    assert model_identity(model, code_revision=None, quantization=None, hf_overrides={}) == base
    assert model_identity(model, hf_overrides={"a": 1, "b": 2}) == model_identity(model, hf_overrides={"b": 2, "a": 1})


@pytest.mark.usefixtures("native_engine")
def test_namespace_passes_the_model_configs_load_time_changes(model_path: str) -> None:
    from kvtier.testing.sched_harness import make_configs
    from kvtier.vllm.connector import _namespace

    vllm_config, kv_cache_config = make_configs(model_path, {"chunk_size": 128, "cpu_capacity": "16MiB"})
    base = _namespace(vllm_config, kv_cache_config, 0).model
    assert "|code_revision=" not in base and "|hf_overrides=" not in base
    seen = {base}
    model_config = vllm_config.model_config
    for field, value in (
        ("code_revision", "c1"),
        ("quantization", "fp8"),
        ("hf_overrides", {"rope_theta": 1e6}),
        ("model_class_overrides", {"LlamaForCausalLM": "pkg.mod:Other"}),
    ):
        saved = getattr(model_config, field)
        setattr(model_config, field, value)
        try:
            model = _namespace(vllm_config, kv_cache_config, 0).model
        finally:
            setattr(model_config, field, saved)
        assert model not in seen, field
        seen.add(model)
