"""Request identity beyond token ids (issue 14 item 1), at the Request level.

`request_key_extras` turns a real vLLM Request into kvtier.KeyExtras
arguments. These tests need no native engine: they build Request objects
the way vLLM's engine core does (LoRARequest, MultiModalFeatureSpec with a
PlaceholderRange, prompt_embeds tensors, cache_salt) and check that every
identity vLLM's own prefix-cache hash distinguishes is distinguished here,
and that what the connector cannot fold in is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from kvtier.testing.model import make_lora_adapter
from kvtier.vllm import connector
from kvtier.vllm.connector import Unsupported, request_key_extras

TOKENS = list(range(10, 610))


def make_request(tokens: list[int] | None = TOKENS, **kwargs: Any) -> Any:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(temperature=0.0, max_tokens=4)
    return Request("r", None if tokens is None else list(tokens), params, None, **kwargs)


def lora(name: str, int_id: int, path: str = "/adapters/x") -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path)


def image(identifier: Any, offset: int = 100, length: int = 64) -> Any:
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(
        data=None,
        modality="image",
        identifier=identifier,
        mm_position=PlaceholderRange(offset=offset, length=length),
    )


def test_plain_request_has_no_extras() -> None:
    assert request_key_extras(make_request()) is None


def test_cache_salt() -> None:
    a = request_key_extras(make_request(cache_salt="tenant-a"))
    b = request_key_extras(make_request(cache_salt="tenant-b"))
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["salt"] != b["salt"] and not a["spans"]
    assert request_key_extras(make_request(cache_salt="tenant-a")) == a
    # vLLM treats an empty salt as none.
    assert request_key_extras(make_request(cache_salt="")) is None


def test_lora_adapters() -> None:
    one = request_key_extras(make_request(lora_request=lora("sql", 1)))
    two = request_key_extras(make_request(lora_request=lora("chat", 2, "/adapters/y")))
    assert isinstance(one, dict) and isinstance(two, dict)
    assert one["salt"] != two["salt"]
    assert request_key_extras(make_request(lora_request=lora("sql", 1))) == one
    # Same name re-pointed at other files (vLLM keys by the path too).
    moved = request_key_extras(make_request(lora_request=lora("sql", 1, "/adapters/v2")))
    assert isinstance(moved, dict) and moved["salt"] != one["salt"]
    # LoRA and salt together differ from either alone.
    both = request_key_extras(make_request(lora_request=lora("sql", 1), cache_salt="tenant-a"))
    assert isinstance(both, dict) and both["salt"] not in (one["salt"], None)


def test_multimodal_items_same_placeholder_tokens() -> None:
    cat = request_key_extras(make_request(mm_features=[image("hash-cat")]))
    dog = request_key_extras(make_request(mm_features=[image("hash-dog")]))
    assert cat == {"salt": None, "spans": [(100, 164, "hash-cat")]}
    assert dog == {"salt": None, "spans": [(100, 164, "hash-dog")]}
    # Several items come out sorted by offset, whatever the input order.
    two = request_key_extras(make_request(mm_features=[image("b", 300, 10), image("a", 20, 10)]))
    assert isinstance(two, dict)
    assert two["spans"] == [(20, 30, "a"), (300, 310, "b")]


def test_multimodal_item_without_identifier_is_unsupported() -> None:
    assert isinstance(request_key_extras(make_request(mm_features=[image(None)])), Unsupported)
    assert isinstance(request_key_extras(make_request(mm_features=[image("x", 10, 0)])), Unsupported)


def test_prompt_embeds() -> None:
    gen = torch.Generator().manual_seed(0)
    e1 = torch.randn(600, 32, generator=gen)
    e2 = e1.clone()
    e2[599, 0] += 1.0  # one value in the last position
    r1 = request_key_extras(make_request(None, prompt_embeds=e1))
    r2 = request_key_extras(make_request(None, prompt_embeds=e2))
    assert isinstance(r1, dict) and isinstance(r2, dict)
    assert r1["salt"] != r2["salt"]
    assert request_key_extras(make_request(None, prompt_embeds=e1.clone())) == r1
    # Every position's token id is 0 in both: only the embeddings tell them apart.
    tokens_1 = list(make_request(None, prompt_embeds=e1).all_token_ids)
    assert tokens_1 == list(make_request(None, prompt_embeds=e2).all_token_ids) == [0] * 600


def test_identity_unknown_to_the_connector_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block-hash identity kind that vLLM adds and this connector has no
    rule for must not be silently dropped."""
    import vllm.v1.core.kv_cache_utils as kcu

    monkeypatch.setattr(kcu, "generate_block_hash_extra_keys", lambda *a: ((("adapter_v2", "x"),), 0))
    result = request_key_extras(make_request())
    assert isinstance(result, Unsupported) and "adapter_v2" in result.reason

    def broken(*args: Any) -> Any:
        raise AssertionError("cannot hash")

    monkeypatch.setattr(kcu, "generate_block_hash_extra_keys", broken)
    assert isinstance(request_key_extras(make_request()), Unsupported)


def test_key_extras_of_none_is_none() -> None:
    assert connector.key_extras(None) is None


def lora_salt(path: Path, memo: dict[Any, str] | None = None) -> str:
    extras = request_key_extras(make_request(lora_request=lora("sql", 1, str(path))), memo)
    assert isinstance(extras, dict) and extras["salt"]
    return str(extras["salt"])


def test_lora_adapter_retrained_at_the_same_path(tmp_path: Path) -> None:
    """kvtier's disk outlives the process: an adapter retrained and
    redeployed under the same name, id and path gets other keys after a
    restart (a fresh connector, so a fresh memo)."""
    path = make_lora_adapter(tmp_path / "sql", seed=1)
    before = lora_salt(path)
    assert lora_salt(path) == before  # same files: same keys
    copy = make_lora_adapter(tmp_path / "copy", seed=1)
    assert connector.adapter_digest(lora("sql", 1, str(copy))) == connector.adapter_digest(lora("sql", 1, str(path)))
    memo: dict[Any, str] = {}
    assert lora_salt(path, memo) == before
    shutil.rmtree(path)
    make_lora_adapter(path, seed=2)  # same shapes and config, other weights
    assert lora_salt(path) != before
    # One engine keeps the digest of what it first saw, as vLLM keeps
    # computing with the adapter it loaded for that id.
    assert lora_salt(path, memo) == before


def test_lora_adapter_config_is_part_of_its_digest(tmp_path: Path) -> None:
    path = make_lora_adapter(tmp_path / "sql", seed=1)
    before = connector.adapter_digest(lora("sql", 1, str(path)))
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config["lora_alpha"]  # scales every delta
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert connector.adapter_digest(lora("sql", 1, str(path))) != before


def test_lora_adapter_not_found_is_unknown_and_not_memoized(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "later"
    memo: dict[Any, str] = {}
    with caplog.at_level("WARNING", logger="kvtier.vllm.connector"):
        assert connector.adapter_digest(lora("sql", 1, str(path)), memo) == "unknown"
        assert connector.adapter_digest(lora("sql", 1, str(path)), memo) == "unknown"
    assert caplog.text.count("cannot read LoRA adapter") == 1 and not memo
    make_lora_adapter(path, seed=1)  # e.g. the worker downloaded it
    assert connector.adapter_digest(lora("sql", 1, str(path)), memo) not in ("unknown", "")
    assert memo
