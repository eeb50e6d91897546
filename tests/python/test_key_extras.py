"""kvtier.KeyExtras: identity beyond token ids (LoRA, cache salt, images) in the keys.

Issue 14 item 1: requests with the same tokens but another salt or another
image behind the same placeholder tokens must never share KV.
"""

from __future__ import annotations

from typing import Any

import kvtier
import numpy as np
import pytest
import torch
from kvtier import _kvtier
from kvtier.engine import Engine, KeyExtras, Namespace

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 2, 16, 2, 16, 32
CHUNK = 32
TOKENS = np.arange(5000, 5128)  # 4 chunks
SLOTS = np.arange(128)


def make_kv(fill: str = "randn") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if fill == "zeros":
        return [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD) for _ in range(LAYERS)]
    return [torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen) for _ in range(LAYERS)]


@pytest.fixture
def eng() -> Any:
    e = Engine({"chunk_size": CHUNK, "cpu_capacity": "16MiB", "disk_path": "none"}, Namespace(model="m"))
    e.register_kv_caches(make_kv())
    yield e
    e.close()


def test_exported_from_kvtier():
    assert kvtier.KeyExtras is KeyExtras


def test_two_salts_never_share_kv(eng):
    a, b = KeyExtras(salt="lora:a:1"), KeyExtras(salt="lora:b:2")
    assert eng.store(TOKENS, SLOTS, extras=a).wait() == 4
    assert eng.lookup(TOKENS, extras=a) == 128
    assert eng.lookup(TOKENS, extras=b) == 0
    assert eng.lookup(TOKENS) == 0  # no salt is another identity too
    dst = make_kv("zeros")
    eng.register_kv_caches(dst)
    assert eng.retrieve(TOKENS, SLOTS, extras=b) == 0
    assert all(float(t.abs().sum()) == 0.0 for t in dst)
    assert eng.retrieve(TOKENS, SLOTS, extras=a) == 128


def test_two_span_ids_never_share_kv(eng):
    # The same placeholder tokens 40..80 stand for two different images.
    img1, img2 = KeyExtras(spans=[(40, 80, "sha:img1")]), KeyExtras(spans=[(40, 80, b"sha:img2")])
    eng.store(TOKENS, SLOTS, extras=img1).wait()
    assert eng.lookup(TOKENS, extras=img1) == 128
    # The span starts in chunk 1: chunk 0 (tokens 0..31) is still shared.
    assert eng.lookup(TOKENS, extras=img2) == CHUNK
    assert eng.lookup(TOKENS) == CHUNK


def test_a_span_changes_keys_only_from_its_chunk_on(eng):
    plain = eng.chunk_keys(TOKENS)
    for begin, first_changed in ((0, 0), (31, 0), (32, 1), (70, 2), (100, 3)):
        keyed = eng.chunk_keys(TOKENS, extras=KeyExtras(spans=[(begin, begin + 1, "x")]))
        assert [k for k, _, _ in keyed[:first_changed]] == [k for k, _, _ in plain[:first_changed]], begin
        assert all(k != p for (k, _, _), (p, _, _) in zip(keyed[first_changed:], plain[first_changed:])), begin
    # A span past the tokens changes nothing that was hashed.
    assert eng.chunk_keys(TOKENS, extras=KeyExtras(spans=[(500, 600, "x")])) == plain


def test_none_and_empty_extras_are_no_extras(eng):
    assert eng.chunk_keys(TOKENS, extras=KeyExtras()) == eng.chunk_keys(TOKENS)
    assert eng.chunk_keys(TOKENS, extras=None) == eng.chunk_keys(TOKENS)
    eng.store(TOKENS, SLOTS).wait()
    assert eng.lookup(TOKENS, extras=KeyExtras()) == 128
    # An empty salt is a salt, not "no salt".
    assert eng.lookup(TOKENS, extras=KeyExtras(salt="")) == 0


def test_str_is_its_utf8_bytes(eng):
    s = "lora:ü"
    assert eng.chunk_keys(TOKENS, extras=KeyExtras(salt=s)) == eng.chunk_keys(
        TOKENS, extras=KeyExtras(salt=s.encode())
    )
    assert eng.chunk_keys(TOKENS, extras=KeyExtras(spans=[(1, 2, s)])) == eng.chunk_keys(
        TOKENS, extras=KeyExtras(spans=[(1, 2, s.encode())])
    )


def test_every_tokens_taking_method_uses_the_extras(eng):
    x = KeyExtras(salt="s", spans=[(0, 10, "a")])
    eng.store(TOKENS, SLOTS, extras=x).wait()
    assert eng.pin(TOKENS) == 0 and eng.pin(TOKENS, extras=x) == 4
    assert eng.unpin(TOKENS) == 0 and eng.unpin(TOKENS, extras=x) == 4
    assert eng.prefetch(TOKENS, extras=x) == 0  # already in the CPU tier: nothing to promote
    assert eng.retrieve_async(TOKENS, SLOTS, extras=x).result(timeout=60) == 128
    assert eng.retrieve_async(TOKENS, SLOTS).result(timeout=60) == 0
    assert eng.retrieve_on_stream(TOKENS, SLOTS, extras=x).valid_tokens == 128
    assert eng.retrieve_on_stream(TOKENS, SLOTS).valid_tokens == 0

    nbytes = eng.layout.chunk_bytes(CHUNK)
    toks = np.arange(9000, 9064)
    bufs = [np.full(nbytes, i + 1, dtype=np.uint8) for i in range(2)]
    assert eng.store_buffers(toks, bufs, extras=x) == 2
    out = [np.zeros(nbytes, dtype=np.uint8) for _ in range(2)]
    assert eng.retrieve_buffers(toks, out) == 0
    assert eng.retrieve_buffers(toks, out, extras=x) == 64
    assert all(np.array_equal(a, b) for a, b in zip(bufs, out))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"salt": 3}, "salt must be str, bytes or None"),
        ({"spans": "abc"}, "sequence of"),
        ({"spans": [(0, 1)]}, "tuple"),
        ({"spans": [(0, 1.5, "a")]}, "end must be an int"),
        ({"spans": [(-1, 2, "a")]}, r"\[0, 2\*\*32\)"),
        ({"spans": [(0, 2**32, "a")]}, r"\[0, 2\*\*32\)"),
        ({"spans": [(5, 5, "a")]}, "begin 5 >= end 5"),
        ({"spans": [(6, 5, "a")]}, "begin 6 >= end 5"),
        ({"spans": [(0, 5, 7)]}, "id must be str or bytes"),
        ({"spans": [(10, 20, "a"), (5, 8, "b")]}, "sorted"),
    ],
)
def test_bad_extras_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        KeyExtras(**args)


def test_bad_extras_reaching_the_binding_raise_value_error(eng):
    # The binding validates on its own, whatever object it is handed.
    class Fake:
        def __init__(self, salt: Any, spans: Any) -> None:
            self.salt, self.spans = salt, spans

    native = eng._native
    tokens = np.asarray(TOKENS, dtype=np.int32)
    for fake, match in (
        (Fake(None, [(10, 20, "a"), (5, 8, "b")]), "sorted"),
        (Fake(None, [(5, 5, "a")]), "span 0"),
        (Fake(None, [(-1, 5, "a")]), r"\[0, 2\*\*32\)"),
        (Fake(1.0, []), "salt must be str or bytes"),
        (Fake(None, [[0, 5, "a"]]), "tuple"),
        (object(), "kvtier.KeyExtras or None"),
    ):
        with pytest.raises(ValueError, match=match):
            native.lookup(tokens, extras=fake)
        with pytest.raises(_kvtier.InvalidArgumentError):
            native.pin(tokens, extras=fake)
    with pytest.raises(ValueError, match="kvtier.KeyExtras or None"):
        eng.lookup(TOKENS, extras=("salt",))  # type: ignore[arg-type]


def test_immutable_and_hashable():
    x = KeyExtras(salt="s", spans=[[1, 2, "a"]])  # type: ignore[list-item]
    assert x.spans == ((1, 2, "a"),)
    assert x == KeyExtras(salt="s", spans=[(1, 2, "a")]) and hash(x) == hash(KeyExtras("s", [(1, 2, "a")]))
    with pytest.raises(AttributeError):
        x.salt = "t"  # type: ignore[misc]
