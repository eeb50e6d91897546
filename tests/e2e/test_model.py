"""kvtier.testing.model: the offline random Llama the suite, demo and bench use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvtier.testing.model import (
    NUM_SPECIAL_TOKENS,
    ModelSpec,
    make_model,
    random_tokens,
)

TINY = ModelSpec(hidden_size=128, num_layers=1, num_attention_heads=2, num_kv_heads=1,
                 intermediate_size=128, vocab_words=50, max_position_embeddings=256)


def test_made_once_then_cached(tmp_path: Path) -> None:
    path = make_model(TINY, cache_dir=tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["num_key_value_heads"] == 1
    assert cfg["vocab_size"] == 50 + NUM_SPECIAL_TOKENS
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert make_model(TINY, cache_dir=tmp_path) == path
    assert weights.stat().st_mtime_ns == stamp  # not rewritten
    other = make_model(ModelSpec(**{**TINY.__dict__, "seed": 99}), cache_dir=tmp_path)
    assert other != path
    assert not any(p.name.startswith(".staging-") for p in tmp_path.iterdir())


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_model(TINY, cache_dir=tmp_path))
    ids = random_tokens(20, seed=1, spec=TINY)
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_bad_spec_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_model(ModelSpec(num_attention_heads=8, num_kv_heads=3), cache_dir=tmp_path)
