"""Token arrays must be integers (issue 13).

The native bindings took tokens as a force-cast int32 array, so a float32
array (or [1.5, 2.0]) was silently truncated to ids, hashed, stored and
served as some other prefix. Now any integer dtype is accepted and
converted, anything else is a TypeError naming the argument and the dtype,
and an integer outside int32 is a ValueError (InvalidArgumentError). These
tests call the native ``_kvtier.Engine`` directly: the Python wrapper's own
conversion (kvtier.engine._tokens) is not what they check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from kvtier import _kvtier
from kvtier.engine import Engine, Namespace

CHUNK = 16
CHUNK_BYTES = 4096
TOKENS = np.arange(1000, 1000 + 2 * CHUNK)


@pytest.fixture
def native() -> Iterator[Any]:
    e = Engine({"chunk_size": CHUNK, "cpu_capacity": "16MiB", "disk_path": "none"}, Namespace(model="m"))
    e.set_chunk_bytes(CHUNK_BYTES)
    yield e._native
    e.close()


def bufs(n: int = 2) -> list[np.ndarray]:
    return [np.full(CHUNK_BYTES, i + 1, dtype=np.uint8) for i in range(n)]


CALLS: dict[str, Callable[[Any, Any], object]] = {
    "lookup": lambda e, t: e.lookup(t),
    "chunk_keys": lambda e, t: e.chunk_keys(t),
    "store_buffers": lambda e, t: e.store_buffers(t, bufs(), 0).wait(),
    "retrieve_buffers": lambda e, t: e.retrieve_buffers(t, bufs(), 0),
    "prefetch": lambda e, t: e.prefetch(t),
    "pin": lambda e, t: e.pin(t),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.bool_, np.complex64])
def test_non_integer_dtype_is_a_type_error(native: Any, call: str, dtype: Any) -> None:
    tokens = TOKENS.astype(dtype)
    with pytest.raises(TypeError, match=rf"tokens must be integer token ids.*dtype {np.dtype(dtype).name}"):
        CALLS[call](native, tokens)
    assert native.lookup(TOKENS) == 0, "nothing was stored under the truncated ids"


def test_float_list_and_object_array_are_type_errors(native: Any) -> None:
    with pytest.raises(TypeError, match="a sequence of dtype float64"):
        native.lookup([1000.0, 1001.5])
    with pytest.raises(TypeError, match="dtype object"):
        native.lookup(np.array([1, 2**70], dtype=object))


def test_a_float_store_cannot_pose_as_the_integer_prefix(native: Any) -> None:
    # Before: these float ids truncated to TOKENS and stored 2 chunks under them.
    with pytest.raises(TypeError):
        native.store_buffers(TOKENS.astype(np.float32) + 0.25, bufs(), 0)
    assert native.lookup(TOKENS) == 0


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                   np.uint32, np.uint64, np.intp])
def test_every_integer_width_is_accepted(native: Any, dtype: Any) -> None:
    tokens = (TOKENS % 120).astype(dtype)  # fits int8
    expected = native.chunk_keys((TOKENS % 120).astype(np.int32))
    assert native.chunk_keys(tokens) == expected
    assert native.store_buffers(tokens, bufs(), 0).wait() in (0, 2)  # 0 once an earlier width stored them
    assert native.lookup(tokens) == 2 * CHUNK
    assert native.retrieve_buffers(tokens, bufs(), 0) == 2 * CHUNK


def test_lists_tuples_strided_and_empty_are_accepted(native: Any) -> None:
    expected = native.chunk_keys(TOKENS.astype(np.int32))
    assert native.chunk_keys(TOKENS.tolist()) == expected
    assert native.chunk_keys(tuple(TOKENS.tolist())) == expected
    strided = np.repeat(TOKENS.astype(np.int64), 2)[::2]
    assert not strided.flags.c_contiguous
    assert native.chunk_keys(strided) == expected
    assert native.lookup([]) == 0
    assert native.chunk_keys([]) == []


@pytest.mark.parametrize(
    ("values", "dtype", "shown"),
    [
        ([2**31], np.int64, "2147483648"),
        ([5, -(2**31) - 1], np.int64, "-2147483649"),
        ([2**31], np.uint32, "2147483648"),
        ([2**40], np.uint64, "1099511627776"),
    ],
)
def test_values_outside_int32_are_value_errors(native: Any, values: list[int], dtype: Any,
                                               shown: str) -> None:
    tokens = np.array(values, dtype=dtype)
    with pytest.raises(ValueError, match=rf"tokens of dtype {np.dtype(dtype).name} hold {shown}, outside"):
        native.lookup(tokens)
    with pytest.raises(_kvtier.InvalidArgumentError):
        native.store_buffers(tokens, bufs(1), 0)


def test_int32_extremes_are_accepted(native: Any) -> None:
    bounds = np.array([-(2**31), 2**31 - 1] * CHUNK, dtype=np.int64)
    assert native.chunk_keys(bounds) == native.chunk_keys(bounds.astype(np.int32))


def test_python_engine_refuses_float_tokens_instead_of_casting(tmp_path: Any) -> None:
    """kvtier.Engine normalises tokens (kvtier.engine._tokens) before the
    bindings see them: a float array must fail there too, not be truncated."""
    e = Engine({"chunk_size": CHUNK, "cpu_capacity": "16MiB", "disk_path": "none"}, Namespace(model="m"))
    try:
        with pytest.raises(TypeError, match="dtype float32"):
            e.lookup(np.arange(32, dtype=np.float32))
        with pytest.raises(TypeError, match="dtype float64"):
            e.lookup(np.array([1.5, 2.0]))
        assert e.lookup([]) == 0
        assert e.lookup(np.arange(32, dtype=np.uint16)) == 0
    finally:
        e.close()
