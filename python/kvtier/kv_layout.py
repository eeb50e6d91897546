"""Paged-KV layouts and the CPU gather/scatter, over engine tensors without copies.

An engine (vLLM) hands over its per-layer KV cache tensors once; a
:class:`PagedKvLayout` describes them (pointers, shapes, strides, dtype,
device) and keeps them alive. :func:`gather` copies the KV of a request's slots
into one chunk buffer; :func:`scatter` copies a chunk back into the paged
cache. Chunk buffer format (layer-major): for each layer, K[tokens][heads *
head_size] then V[tokens][heads * head_size] (MLA: the latent only),
contiguous, ``layout.chunk_bytes(n)`` bytes; ``layout.layer_offset(l, n)`` is
where layer ``l`` starts.

Layout kinds: ``flash_attn`` [2, blocks, block, heads, head], ``flash_infer``
[blocks, 2, block, heads, head], ``packed_kv`` (vLLM 0.33 GPU) [blocks, heads,
block, 2 * head] with any strides, ``vllm_cpu`` (vLLM CPU 0.32) [blocks, heads,
block, 2 * head] whose (block, head) plane is K rows then V rows, ``mla``
[blocks, block, head]; ``auto`` picks by rank and device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

try:  # installed wheel: the extension sits inside the package
    from kvtier import _kvtier
except ImportError:  # bazel-bin/python/src on sys.path
    import _kvtier  # type: ignore[no-redef]

__all__ = [
    "PagedKvLayout",
    "cuda_runtime_available",
    "gather",
    "make_layout",
    "scatter",
    "stream_handle",
]

PagedKvLayout = _kvtier.PagedKvLayout
cuda_runtime_available = _kvtier.cuda_runtime_available


def _layers(kv_caches: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
    # vLLM passes {layer_name: tensor}; dict order is the model's layer order.
    if isinstance(kv_caches, Mapping):
        return list(kv_caches.values())
    return list(kv_caches)


def make_layout(
    kv_caches: Mapping[str, Any] | Sequence[Any], kind: str = "auto"
) -> Any:
    """Describes the engine's per-layer KV tensors (no copy; keeps them alive)."""
    return _kvtier.PagedKvLayout(_layers(kv_caches), kind)


def _slots(slot_mapping: Any, layout: Any = None) -> Any:
    # The slot mapping is small (one int per token): converting it is cheap,
    # unlike the KV itself, which is never copied here. On a CUDA layout a
    # CUDA slot tensor stays on the device (the kernels read it in place).
    if hasattr(slot_mapping, "data_ptr"):
        import torch

        on_gpu = layout is not None and layout.device != "cpu" and slot_mapping.device.type == "cuda"
        device = slot_mapping.device if on_gpu else "cpu"
        return slot_mapping.to(device=device, dtype=torch.int64).contiguous()
    import numpy as np

    return np.ascontiguousarray(slot_mapping, dtype=np.int64)


def stream_handle(layout: Any, stream: Any) -> int:
    """cudaStream_t of ``stream`` as an int for a CUDA layout; 0 for a CPU layout.

    None means torch's current stream on the layout's device (where the
    engine's forward pass runs). Accepts a torch.cuda.Stream, anything with
    ``cuda_stream``, or a raw int handle.
    """
    if layout.device == "cpu":
        return 0
    if stream is None:
        import torch

        stream = torch.cuda.current_stream(torch.device(layout.device))
    handle = getattr(stream, "cuda_stream", stream)
    if not isinstance(handle, int):
        raise TypeError(f"stream must be a torch.cuda.Stream or an int handle, got {type(stream).__name__}")
    return int(handle)


def gather(layout: Any, slot_mapping: Any, out: Any = None, num_threads: int = 1, stream: Any = None) -> Any:
    """Paged KV -> chunk buffer. Allocates a uint8 torch tensor when ``out`` is None.

    Bytes of padding tokens (slot < 0) in ``out`` are left as they were. For
    a CUDA layout, ``out`` is a CUDA tensor or pinned host memory (allocated
    on the layout's device when None); the copy runs on ``stream`` (default:
    the current stream) with the CUDA kernels and is complete on return.
    """
    slots = _slots(slot_mapping, layout)
    if out is None:
        import torch

        device = "cpu" if layout.device == "cpu" else layout.device
        out = torch.empty(layout.chunk_bytes(len(slots)), dtype=torch.uint8, device=device)
    _kvtier.gather(layout, slots, out, num_threads, stream_handle(layout, stream))
    return out


def scatter(
    layout: Any,
    slot_mapping: Any,
    src: Any,
    chunk_layout_id: int | None = None,
    num_threads: int = 1,
    stream: Any = None,
) -> None:
    """Chunk buffer -> paged KV. With ``chunk_layout_id``, a chunk gathered from
    another layout raises InvalidArgumentError instead of corrupting the cache.
    CUDA layouts: as :func:`gather`."""
    _kvtier.scatter(layout, _slots(slot_mapping, layout), src, num_threads, chunk_layout_id, stream_handle(layout, stream))
