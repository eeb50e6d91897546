"""KV on a CUDA device, on a machine that cannot use one (CI): a clear error, nothing moves.

The tensor here only describes GPU memory (what a torch CUDA tensor reports
through data_ptr/shape/stride/dtype/device); no byte of it is ever read,
because the data path must refuse before touching it. The real GPU path is
tested in tests/gpu on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtier import _kvtier
from kvtier.engine import Engine, Namespace

if torch.cuda.is_available():
    pytest.skip("this machine has a usable GPU: tests/gpu covers it", allow_module_level=True)


class _Device:
    type = "cuda"
    index = 0

    def __str__(self) -> str:
        return "cuda:0"


class CudaDescriptor:
    """The tensor protocol kvtier reads, for a [2, blocks, 16, 2, 64] fp16 layer on cuda:0."""

    def __init__(self) -> None:
        self._backing = torch.empty(2, 8, 16, 2, 64, dtype=torch.float16)  # an address that is never read
        self.shape = tuple(self._backing.shape)
        self.dtype = "torch.float16"
        self.device = _Device()

    def data_ptr(self) -> int:
        return self._backing.data_ptr()

    def stride(self) -> tuple[int, ...]:
        return self._backing.stride()

    def element_size(self) -> int:
        return 2


def test_cuda_layout_is_described_without_a_gpu():
    layout = _kvtier.PagedKvLayout([CudaDescriptor(), CudaDescriptor()], "flash_attn")
    assert layout.device == "cuda:0"
    assert layout.chunk_bytes(16) == 2 * 2 * 16 * 2 * 64 * 2


def test_store_and_retrieve_on_cuda_layout_fail_clearly(tmp_path):
    eng = Engine({"chunk_size": 16, "cpu_capacity": "16MiB", "disk_path": "none"}, Namespace(model="m"))
    eng.register_kv_caches([CudaDescriptor(), CudaDescriptor()], kind="flash_attn")
    # CUDA build (the wheel): no device; CPU-only build: no kernels.
    expected = "no usable CUDA device|no CUDA kernels"
    with pytest.raises(_kvtier.FailedPreconditionError, match=expected):
        eng.store(np.arange(32), np.arange(32), stream=0)
    with pytest.raises(_kvtier.FailedPreconditionError, match=expected):
        eng.retrieve(np.arange(32), np.arange(32), stream=0)
    with pytest.raises(_kvtier.FailedPreconditionError, match=expected):
        eng.retrieve_on_stream(np.arange(32), np.arange(32), stream=0)
    stats = eng.stats()
    assert stats["store_requests"] == 0 and stats["retrieve_requests"] == 0
    assert eng.lookup(np.arange(32)) == 0
    eng.close()


def test_cpu_layout_load_handle_is_complete_at_once(tmp_path):
    eng = Engine({"chunk_size": 16, "cpu_capacity": "16MiB", "disk_path": "none"}, Namespace(model="m"))
    src = [torch.randn(8, 2, 16, 128) for _ in range(2)]  # vLLM CPU layout
    eng.register_kv_caches(src)
    eng.store(np.arange(40), np.arange(40)).wait()
    dst = [torch.zeros_like(t) for t in src]
    eng.register_kv_caches(dst)
    h = eng.retrieve_on_stream(np.arange(40), np.arange(40))
    assert h.done() and h.valid_tokens == 40 and h.chunks == 3 and h.wait() == 40
    for x, y in zip(src, dst):
        assert torch.equal(x[:2], y[:2])  # blocks 0, 1: tokens 0..31
    eng.close()
