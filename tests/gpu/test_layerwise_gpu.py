"""Layer-wise transfer with paged KV in GPU memory, through the Python API:
Engine.layer_signal / store_layerwise (a CudaLayerSignal: CUDA events on the
forward pass's stream) and Engine.load_layerwise (wait_layer makes a stream
wait for one layer, no host wait). The contracts are cuda/layerwise_io.h.

Needs a CUDA build of the extension and a GPU; skipped without them, and
turned into failures by KVTIER_REQUIRE_GPU=1 (tools/device_check.sh), as in
test_cuda_engine.py.

A store or load that ignored the ordering would read or expose KV that is
not there yet; the tests make that window wide by holding the stream with
torch.cuda._sleep while the host enqueues everything, then check bytes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kvtier import _kvtier
from kvtier.engine import CudaLayerSignal, Engine, LayerSignal, Namespace

REQUIRE = os.environ.get("KVTIER_REQUIRE_GPU") == "1"
_missing = None
if not torch.cuda.is_available():
    _missing = "torch sees no CUDA device"
elif not _kvtier.cuda_runtime_available():
    _missing = "this kvtier build has no CUDA kernels or cannot use the device"
if _missing is not None:
    if REQUIRE:
        raise RuntimeError(f"KVTIER_REQUIRE_GPU=1 but {_missing}")
    pytestmark = pytest.mark.skip(reason=_missing)

KIND = "flash_attn"
LAYERS, BLOCKS, BLOCK, HEADS, HEAD = 4, 64, 16, 4, 128
CHUNK = 256
N = 700  # two full chunks and a partial one; the last block is partial too
FIRST = 4  # the request's blocks start here, not at 0
USED = list(range(FIRST, FIRST + (N + BLOCK - 1) // BLOCK))
TAIL = N - (len(USED) - 1) * BLOCK  # tokens in the last used block
# Keeps the stream busy for tens of milliseconds, long after the host has
# enqueued (and reported) everything that follows it.
SLEEP_CYCLES = 100_000_000


def make_engine() -> Engine:
    cfg = {"chunk_size": CHUNK, "cpu_capacity": "512MiB", "disk_path": "none"}
    return Engine(cfg, Namespace(model="gpu-layerwise-test", dtype="bfloat16"))


def make_kv(seed: int | None) -> list[torch.Tensor]:
    """flash_attn paged KV, layers x [2, blocks, block, heads, head], bf16; zeros for seed None."""
    shape = (2, BLOCKS, BLOCK, HEADS, HEAD)
    if seed is None:
        return [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]


def request(start: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.arange(start, start + N)
    slots = np.arange(N) + FIRST * BLOCK  # contiguous blocks FIRST..
    return tokens, slots


def block_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes with the block axis first (a view): [blocks, 2, block, heads, bytes]."""
    return t.view(torch.uint8).transpose(0, 1)


def same_tokens(x: torch.Tensor, y: torch.Tensor, first_token: int = 0) -> bool:
    """Layer x equals y (byte-exact) on the request's tokens from first_token on."""
    bx, by = block_view(x), block_view(y)
    for i, b in enumerate(USED):
        lo = max(first_token - i * BLOCK, 0)
        hi = TAIL if b == USED[-1] else BLOCK
        if lo >= hi:
            continue
        if not torch.equal(bx[b].narrow(1, lo, hi - lo), by[b].narrow(1, lo, hi - lo)):
            return False
    return True


def zero_outside(x: torch.Tensor, first_token: int = 0) -> bool:
    """Layer x is zero everywhere but the request's tokens from first_token on."""
    keep = torch.zeros(BLOCKS * BLOCK, dtype=torch.bool, device="cuda")
    keep[FIRST * BLOCK + first_token : FIRST * BLOCK + N] = True
    rest = block_view(x).transpose(1, 2).reshape(BLOCKS * BLOCK, -1)  # one row per slot
    return int(rest[~keep].count_nonzero()) == 0


def test_layerwise_store_reads_each_layer_after_its_event():
    eng = make_engine()
    kv = make_kv(1)  # what the KV holds before the pass: a store must not see it
    new = make_kv(2)  # what the pass writes
    assert not any(torch.equal(a, b) for a, b in zip(kv, new))
    eng.register_kv_caches(kv, kind=KIND)
    tokens, slots = request()
    torch.cuda.synchronize()  # kv and new are ready before the side stream uses them
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        signal = eng.layer_signal()
        assert isinstance(signal, CudaLayerSignal)
        assert signal.num_layers == LAYERS
        handle = eng.store_layerwise(tokens, slots, 0, signal)
        # The "forward pass" runs on `side` behind a long sleep: every
        # layer_ready below reaches the store's threads (host side) long
        # before the GPU has written that layer. A store that gathered on
        # the host report alone, without waiting for the layer's event,
        # would copy the old values.
        torch.cuda._sleep(SLEEP_CYCLES)
        for layer in range(LAYERS):
            assert not handle.done()  # the last layer is not final yet
            kv[layer].copy_(new[layer])
            signal.layer_ready(layer)  # current stream: side
        signal.all_ready()  # every layer reported already: records nothing more
    assert handle.wait() == 3
    assert signal.finished
    assert eng.lookup(tokens) == N

    side.synchronize()
    for x in kv:
        x.zero_()
    assert eng.retrieve(tokens, slots) == N  # complete on return
    for layer in range(LAYERS):
        assert same_tokens(kv[layer], new[layer]), f"layer {layer} holds what the KV held before the pass"
        assert zero_outside(kv[layer])
    eng.close()


def test_aborted_signal_stores_nothing():
    eng = make_engine()
    eng.register_kv_caches(make_kv(1), kind=KIND)
    tokens, slots = request()
    signal = eng.layer_signal(timeout_ms=60_000)
    handle = eng.store_layerwise(tokens, slots, 0, signal)
    signal.layer_ready(0)
    signal.abort()
    assert signal.finished
    with pytest.raises(_kvtier.UnavailableError, match="aborted"):
        handle.wait()
    assert eng.lookup(tokens) == 0
    eng.close()


def test_layerwise_load_orders_each_layer_on_the_stream():
    eng = make_engine()
    kv = make_kv(1)
    eng.register_kv_caches(kv, kind=KIND)
    tokens, slots = request()
    eng.store(tokens, slots).wait()
    assert eng.lookup(tokens) == N
    src = [x.clone() for x in kv]
    for x in kv:
        x.zero_()
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # The load's stream starts after this sleep (it waits for the work
        # already on `side`), and the host enqueues the whole loop before
        # the sleep ends: a wait_layer that did not order `side` would let
        # each clone run as soon as the sleep ends, beside the copy.
        torch.cuda._sleep(SLEEP_CYCLES)
        load = eng.load_layerwise([(tokens, slots, 0, None)])  # stream: side
        assert load.valid_tokens == [N]
        assert load.chunks == 3
        snapshots = []
        for layer in range(LAYERS):
            load.wait_layer(layer)  # default: the stream the load started on
            snapshots.append(kv[layer].clone())  # queued on side after the wait
    load.wait()
    assert load.done()
    side.synchronize()
    for layer in range(LAYERS):
        assert same_tokens(snapshots[layer], src[layer]), f"layer {layer} was read before it was loaded"
        assert zero_outside(snapshots[layer])
    del load

    # skip_tokens: the blocks of the first 256 tokens are never written.
    for x in kv:
        x.zero_()
    torch.cuda.synchronize()
    load = eng.load_layerwise([(tokens, slots, 256, None)])
    assert load.valid_tokens == [N]
    for layer in range(LAYERS):
        load.wait_layer(layer)
    load.wait()
    assert load.done()
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        assert same_tokens(kv[layer], src[layer], first_token=256)
        assert zero_outside(kv[layer], first_token=256)
    eng.close()


def test_layerwise_bad_input_on_gpu_fails_clearly():
    eng = make_engine()
    kv = make_kv(1)
    eng.register_kv_caches(kv, kind=KIND)
    tokens, slots = request()
    # A CPU signal on a CUDA layout: kvtier's InvalidArgumentError, a ValueError.
    with pytest.raises(ValueError, match="CudaLayerSignal"):
        eng.store_layerwise(tokens, slots, 0, LayerSignal(LAYERS))
    with pytest.raises(ValueError, match="layers"):
        eng.store_layerwise(tokens, slots, 0, eng.layer_signal(num_layers=LAYERS - 1))
    signal = eng.layer_signal()
    with pytest.raises(ValueError, match="not one of"):
        signal.layer_ready(LAYERS)
    signal.abort()
    assert eng.lookup(tokens) == 0

    eng.store(tokens, slots).wait()
    load = eng.load_layerwise([(tokens, slots, 0, None)])
    assert load.valid_tokens == [N]
    with pytest.raises(ValueError, match="not one of"):
        load.wait_layer(LAYERS)
    with pytest.raises(ValueError, match="not one of"):
        load.wait_layer(-1)
    load.wait()
    with pytest.raises(ValueError, match="not one of"):
        load.wait_layer(LAYERS)  # also once the load is finished
    with pytest.raises(ValueError, match="out of range"):
        eng.load_layerwise([(tokens, slots + BLOCKS * BLOCK, 0, None)])  # checked before anything is enqueued
    eng.close()
