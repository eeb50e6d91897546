"""Layer-wise transfer through the installed extension: Engine.store_layerwise
on a LayerSignal and Engine.load_layerwise, over real paged tensors (vLLM CPU
layout). The C++ ordering contract itself is cc/engine/layerwise_test."""

from __future__ import annotations

import threading

import kvtier
import numpy as np
import pytest
import torch
from kvtier import _kvtier
from kvtier.engine import Engine, LayerSignal, Namespace

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 4, 32, 2, 16, 64


def make_kv(seed: int | None = 0) -> list[torch.Tensor]:
    if seed is None:
        return [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD) for _ in range(LAYERS)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen) for _ in range(LAYERS)]


def engine(tmp_path) -> Engine:
    cfg = {"chunk_size": 32, "cpu_capacity": "64MiB", "disk_path": str(tmp_path / "disk"), "disk_capacity": "256MiB"}
    return Engine(cfg, Namespace(model="test", dtype="float32"))


def test_store_follows_the_pass_and_load_runs_ahead(tmp_path):
    eng = engine(tmp_path)
    kv = make_kv(None)
    final = make_kv(1)
    eng.register_kv_caches(kv)
    tokens = np.arange(500, 596)  # 3 chunks
    slots = np.arange(96) + 3 * BLOCK
    signal = LayerSignal(LAYERS)
    handle = eng.store_layerwise(tokens, slots, 0, signal)
    for layer in range(LAYERS):
        assert not handle.done()  # the last layer is not final yet
        kv[layer].copy_(final[layer])  # "the forward pass writes layer l"
        signal.layer_ready(layer)
    assert handle.wait() == 3
    assert eng.lookup(tokens) == 96

    # Load two requests layer-wise into fresh tensors: one cached, one not.
    dst = make_kv(None)
    eng.register_kv_caches(dst)
    other = np.arange(9000, 9064)
    load = eng.load_layerwise([(tokens, slots, 0, None), (other, np.arange(64), 0, None)])
    assert load.valid_tokens == [96, 0]
    assert load.chunks == 3
    assert load.request_error(1) is None  # a miss, not an error
    for layer in range(LAYERS):
        load.wait_layer(layer)
        assert torch.equal(dst[layer][3:9], final[layer][3:9])
    load.wait()
    assert load.done()
    assert float(dst[0][0:3].abs().sum()) == 0.0  # request 1's blocks never written
    eng.close()


def test_aborted_signal_stores_nothing_and_the_engine_closes(tmp_path):
    eng = engine(tmp_path)
    eng.register_kv_caches(make_kv())
    tokens = np.arange(64)
    signal = LayerSignal(LAYERS, timeout_ms=60_000)
    handle = eng.store_layerwise(tokens, np.arange(64), 0, signal)
    signal.layer_ready(0)
    signal.abort()
    assert signal.finished
    with pytest.raises(_kvtier.UnavailableError, match="aborted"):
        handle.wait()
    assert eng.lookup(tokens) == 0
    # A signal that never finishes would hold close() until its timeout:
    # here it ends at its deadline.
    late = LayerSignal(LAYERS, timeout_ms=200)
    eng.store_layerwise(np.arange(100, 164), np.arange(64, 128), 0, late)
    eng.close()
    assert not late.finished


def test_bad_arguments(tmp_path):
    eng = engine(tmp_path)
    eng.register_kv_caches(make_kv())
    with pytest.raises(ValueError, match="num_layers"):
        LayerSignal(-1)
    with pytest.raises(ValueError, match="timeout_ms"):
        LayerSignal(2, timeout_ms=0)
    signal = LayerSignal(LAYERS)
    with pytest.raises(ValueError, match="layer 4 is not one of"):
        signal.layer_ready(LAYERS)
    with pytest.raises(ValueError, match="signal has 3 layers"):
        eng.store_layerwise(np.arange(32), np.arange(32), 0, LayerSignal(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        eng.load_layerwise([(np.arange(32), np.array([BLOCKS * BLOCK] * 32), 0, None)])
    with pytest.raises(ValueError, match="tuple"):
        eng._native.load_paged_layerwise([[np.arange(4), np.arange(4), 0]], eng.layout)
    load = eng.load_layerwise([])
    with pytest.raises(ValueError, match="layer 9"):
        load.wait_layer(9)
    # The signal must match the layout's device: a CPU layout takes a
    # LayerSignal, and nothing is stored on a wrong one.
    with pytest.raises(ValueError, match="CPU layout's layer-wise store takes a LayerSignal"):
        eng._native.store_paged_layerwise(np.arange(32), np.arange(32), 0, eng.layout, object())
    assert eng.lookup(np.arange(32)) == 0
    with pytest.raises(ValueError, match="timeout_ms"):
        eng.layer_signal(timeout_ms=0)
    eng.close()


def test_layer_signal_follows_the_layout(tmp_path):
    """Engine.layer_signal gives the kind of signal the registered layout
    needs; on the CPU a LayerSignal of the layout's layer count."""
    eng = engine(tmp_path)
    with pytest.raises(_kvtier.FailedPreconditionError, match="register_kv_caches"):
        eng.layer_signal()
    eng.register_kv_caches(make_kv())
    signal = eng.layer_signal()
    assert isinstance(signal, LayerSignal)
    assert signal.num_layers == LAYERS
    assert eng.layer_signal(2).num_layers == 2
    eng.close()


@pytest.mark.skipif(not hasattr(_kvtier, "CudaLayerSignal"), reason="this build has no CUDA path")
def test_cuda_layer_signal_without_a_device_is_a_clear_error():
    if _kvtier.cuda_runtime_available():
        pytest.skip("a CUDA device is usable here; tests/gpu covers the signal")
    with pytest.raises(OSError, match="cudaSetDevice|cudaEventCreate"):
        _kvtier.CudaLayerSignal(0, LAYERS)


def test_many_threads_store_and_load_layerwise(tmp_path):
    eng = engine(tmp_path)
    kv = make_kv(2)
    eng.register_kv_caches(kv)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(20):
                tokens = np.arange(64) + 10_000 * t + 100 * i
                slots = np.arange(64) + (t % 4) * 64
                signal = LayerSignal(LAYERS)
                h = eng.store_layerwise(tokens, slots, 0, signal)
                for layer in reversed(range(LAYERS)):
                    signal.layer_ready(layer)
                h.wait()
                load = eng.load_layerwise([(tokens, slots, 0, None)])
                assert load.valid_tokens == [64]
                load.wait()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert kvtier.LayerSignal is LayerSignal
    eng.close()

