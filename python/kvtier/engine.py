"""kvtier.Engine: the Python face of the C++ engine.

A thin adapter: configuration and namespace in, numpy/torch arguments
normalised, everything else is native code that releases the GIL.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

try:  # installed wheel: the extension sits inside the package
    from kvtier import _kvtier
except ImportError:  # development: bazel-bin/python/src on sys.path
    import _kvtier  # type: ignore[no-redef]
from kvtier.config import Config, load_config
from kvtier.kv_layout import stream_handle

if TYPE_CHECKING:
    import torch

__all__ = [
    "CudaLayerSignal",
    "Engine",
    "KeyExtras",
    "LayerSignal",
    "LayerwiseLoadHandle",
    "MoveTask",
    "Namespace",
    "StoreHandle",
]

StoreHandle = _kvtier.StoreHandle
# Engine.move()'s task: done() -> bool, wait(timeout_s=None) -> bool (True
# once done; releases the GIL), result() -> {"tier", "chunks", "moved",
# "already", "failed", "error" (str or None), "done"} (final once done).
MoveTask = _kvtier.MoveTask
LayerSignal = _kvtier.LayerSignal
LayerwiseLoadHandle = _kvtier.LayerwiseLoadHandle


class CudaLayerSignal:
    """LayerSignal for paged KV on a CUDA device (``Engine.layer_signal``).

    ``layer_ready(i)`` records a CUDA event on ``stream`` (default: torch's
    current stream on the layout's device, where the forward pass runs),
    after the kernels already enqueued there that wrote layer i's KV; a
    layer-wise store gathers layer i on a stream of its own once that event
    has completed, and no host thread waits for the GPU. ``all_ready()``
    records every layer not reported yet; ``abort()`` makes waiting stores
    give up (they store nothing).
    """

    def __init__(self, layout: Any, num_layers: int, timeout_ms: int) -> None:
        native_cls = getattr(_kvtier, "CudaLayerSignal", None)
        if native_cls is None:
            raise _kvtier.FailedPreconditionError(
                "this kvtier build has no CUDA kernels (built without --config=cuda); layout is on " + layout.device
            )
        device = int(str(layout.device).split(":")[1])
        self._layout = layout
        self.native = native_cls(device, int(num_layers), int(timeout_ms))

    @property
    def num_layers(self) -> int:
        return int(self.native.num_layers)

    @property
    def finished(self) -> bool:
        return bool(self.native.finished)

    def layer_ready(self, layer: int, stream: Any = None) -> None:
        self.native.layer_ready(int(layer), stream_handle(self._layout, stream))

    def all_ready(self, stream: Any = None) -> None:
        self.native.all_ready(stream_handle(self._layout, stream))

    def abort(self) -> None:
        self.native.abort()


@dataclass(frozen=True)
class Namespace:
    """What separates caches that must never share KV (part of every key)."""

    model: str = ""
    dtype: str = ""
    layout: str = ""
    rank: int = 0
    world_size: int = 1


_U32 = 1 << 32


@dataclass(frozen=True, init=False)
class KeyExtras:
    """What decides a request's KV besides its token ids (part of its chunk keys).

    ``salt`` (a LoRA adapter, a cache salt, a prompt-embeddings digest, ...)
    changes every key of the request. ``spans`` are ``(begin, end, id)``:
    tokens ``[begin, end)`` stand for ``id`` (e.g. an image's content hash);
    they change the keys from the first chunk they overlap on, so a shared
    prefix before them stays shared. Spans must be sorted by ``begin`` with
    ``0 <= begin < end < 2**32``; anything else raises InvalidArgumentError
    (a ValueError). A ``str`` counts as its UTF-8 bytes
    (``"a"`` and ``b"a"`` are the same identity); an empty salt is a salt,
    unlike None. ``KeyExtras()`` is the same as no extras.
    """

    salt: str | bytes | None
    spans: tuple[tuple[int, int, str | bytes], ...]

    def __init__(self, salt: str | bytes | None = None, spans: Sequence[tuple[int, int, str | bytes]] = ()) -> None:
        if salt is not None and not isinstance(salt, str | bytes):
            raise _kvtier.InvalidArgumentError(f"KeyExtras salt must be str, bytes or None, got {type(salt).__name__}")
        if isinstance(spans, str | bytes) or not isinstance(spans, Sequence):
            raise _kvtier.InvalidArgumentError(f"KeyExtras spans must be a sequence of (begin, end, id), got {type(spans).__name__}")
        norm: list[tuple[int, int, str | bytes]] = []
        for i, span in enumerate(spans):
            if not isinstance(span, tuple | list) or len(span) != 3:
                raise _kvtier.InvalidArgumentError(f"KeyExtras span {i} must be a (begin, end, id) tuple, got {span!r}")
            begin, end, ident = span
            for what, v in (("begin", begin), ("end", end)):
                if not isinstance(v, int | np.integer) or isinstance(v, bool):
                    raise _kvtier.InvalidArgumentError(f"KeyExtras span {i} {what} must be an int, got {type(v).__name__}")
                if not 0 <= int(v) < _U32:
                    raise _kvtier.InvalidArgumentError(f"KeyExtras span {i} {what} must be in [0, 2**32), got {v}")
            if int(begin) >= int(end):
                raise _kvtier.InvalidArgumentError(f"KeyExtras span {i} is empty: begin {begin} >= end {end}")
            if not isinstance(ident, str | bytes):
                raise _kvtier.InvalidArgumentError(f"KeyExtras span {i} id must be str or bytes, got {type(ident).__name__}")
            if norm and int(begin) < norm[-1][0]:
                raise _kvtier.InvalidArgumentError(f"KeyExtras spans must be sorted by begin: span {i} begins at {begin}, before {norm[-1][0]}")
            norm.append((int(begin), int(end), bytes(ident) if isinstance(ident, bytes) else ident))
        object.__setattr__(self, "salt", bytes(salt) if isinstance(salt, bytes) else salt)
        object.__setattr__(self, "spans", tuple(norm))


def _extras(extras: KeyExtras | None) -> KeyExtras | None:
    if extras is not None and not isinstance(extras, KeyExtras):
        raise _kvtier.InvalidArgumentError(f"extras must be a kvtier.KeyExtras or None, got {type(extras).__name__}")
    return extras


def _tokens(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if hasattr(tokens, "numpy") and not isinstance(tokens, np.ndarray):
        tokens = tokens.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence, got shape {arr.shape}")
    # An empty list comes out as float64; anything else must be integer ids
    # (a float array is a caller's bug, never silently truncated).
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and not isinstance(tokens, np.ndarray)):
        raise TypeError(f"tokens must be integer token ids, got an array of dtype {arr.dtype} (not cast)")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids must be in [0, 2**31)")
    return np.ascontiguousarray(arr, dtype=np.int32)


_TIERS = ("cpu", "disk")


def _tier(tier: object) -> str:
    if not isinstance(tier, str) or tier not in _TIERS:
        raise _kvtier.InvalidArgumentError(f"unknown tier {tier!r}: the tiers are {', '.join(_TIERS)} (kvtier never clears or moves into the remote tier)")
    return tier


def _seconds(value: object, what: str, *, positive: bool) -> float:
    # bool is an int: True seconds is a caller's bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (v <= 0 if positive else v < 0):
        raise _kvtier.InvalidArgumentError(f"{what} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _slots(slot_mapping: Sequence[int] | np.ndarray | torch.Tensor, n_tokens: int) -> np.ndarray:
    if hasattr(slot_mapping, "numpy") and not isinstance(slot_mapping, np.ndarray):
        slot_mapping = slot_mapping.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.ascontiguousarray(np.asarray(slot_mapping), dtype=np.int64)
    if arr.ndim != 1 or arr.shape[0] != n_tokens:
        raise ValueError(f"slot_mapping must be 1-D with one slot per token ({n_tokens}), got shape {arr.shape}")
    return arr


TRANSPORT_FAULT_ENV = "KVTIER_TRANSPORT_FAULT"
_NO_TRANSPORT_STATS = dict.fromkeys(
    ("pulls", "chunks_pulled", "bytes_pulled", "chunks_served", "bytes_served", "misses", "corrupt", "timeouts",
     "errors", "connected_peers", "holds", "holds_expired"), 0)


UCX_LIB_DIR_ENV = "KVTIER_UCX_LIB_DIR"


def _pypi_ucx_lib_dir() -> str | None:
    """The lib directory of PyPI's libucx (libucx-cu12 / -cu13 wheels) when
    installed: a newer UCX than Debian's, preferred over the system's."""
    import importlib.util

    spec = importlib.util.find_spec("libucx")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        lib = os.path.join(root, "lib")
        if os.path.exists(os.path.join(lib, "libucp.so.0")):
            return lib
    return None


def _start_transport(native: Any, config: Config, rank: int) -> Any:
    """The peer transport for ``transport: ucx``: serving on transport_listen
    (rank r on PORT + r; PORT 0: ephemeral) when set. UCX is loaded here, not
    at import: a missing UCX is an error of this engine only."""
    host, port = "", 0
    if config.transport_listen:
        h, _, p = config.transport_listen.rpartition(":")
        host, port = h.strip("[]"), int(p)
        if port:
            port += rank
            if port > 65535:
                raise _kvtier.InvalidArgumentError(f"transport_listen {config.transport_listen} + rank {rank} is past port 65535")
    if UCX_LIB_DIR_ENV not in os.environ and (pypi := _pypi_ucx_lib_dir()) is not None:
        os.environ[UCX_LIB_DIR_ENV] = pypi  # read once, by the first UCX load of the process
    fault = os.environ.get(TRANSPORT_FAULT_ENV, "")
    if fault and fault != "none":
        logging.getLogger("kvtier").warning("%s=%s: transport fault injection is ON (tests only)", TRANSPORT_FAULT_ENV, fault)
    return _kvtier.Transport(native, host, port, int(config.transport_timeout_ms), fault)


# Engines alive in this process. A forked child (a fork-started helper of
# the serving process, e.g. one of vLLM's or torch's) inherits their memory
# but none of their threads, and shares their file descriptors, epoll sets,
# sockets and shared-memory names with the parent. Tearing one down in the
# child (its C++ destructor, at garbage collection or interpreter exit)
# would join threads that do not exist there, take the parent's UCX
# listener out of the shared epoll set (the parent's transport then never
# sees another connection), and unlink the parent's shared catalogue. So
# the child disowns them: closed for use, never destroyed.
_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


def _disown_after_fork() -> None:
    for engine in list(_LIVE):
        engine._disown()


os.register_at_fork(after_in_child=_disown_after_fork)


class Engine:
    """Tiered KV cache: lookup / store / retrieve by token prefix.

    ``Engine(config, namespace)``; ``config`` is a :class:`kvtier.Config`, a
    mapping of overrides, or None (defaults + KVTIER_CONFIG + environment).
    """

    def __init__(
        self,
        config: Config | dict[str, Any] | None = None,
        namespace: Namespace | None = None,
        *,
        catalogue_shm_name: str = "",
    ) -> None:
        """``catalogue_shm_name`` ("/name"): keep the catalogue in that POSIX
        shared-memory object, mode 0600, so another process can read it with
        :class:`kvtier.CatalogueView`; removed when the engine closes."""
        if not isinstance(config, Config):
            config = load_config(config)
        self.config = config
        logging.getLogger("kvtier").setLevel(config.log_level.upper())
        self.namespace = namespace or Namespace()
        native = dict(config.to_native())
        native.update(
            model=self.namespace.model,
            dtype=self.namespace.dtype,
            layout=self.namespace.layout,
            rank=int(self.namespace.rank),
            world_size=int(self.namespace.world_size),
            catalogue_shm_name=str(catalogue_shm_name),
        )
        self._native = _kvtier.Engine(native)
        self._transport: Any = None
        if config.transport == "ucx":
            try:
                self._transport = _start_transport(self._native, config, int(self.namespace.rank))
            except BaseException:
                self._native.close()
                raise
        # Scatter threads per retrieve: copy_threads, 0 = the native default.
        self._threads = int(config.copy_threads)
        self._layout: Any = None
        self._lock = threading.Lock()
        self._loader: ThreadPoolExecutor | None = None  # guarded by _lock
        self._closed = False  # guarded by _lock; set once by close()
        self._forked = False  # a forked child's copy: see _disown_after_fork
        _LIVE.add(self)

    def _check_open(self) -> None:
        # The native engine says "closed" too; checking here as well gives
        # methods that start in Python (a missing layout, the loader thread)
        # the same error, and keeps retrieve_async from starting an executor
        # that close() already shut down.
        if self._closed:
            if self._forked:
                raise _kvtier.FailedPreconditionError(
                    "engine belongs to the process that created it (this is a forked child)")
            raise _kvtier.FailedPreconditionError("engine is closed")

    # -- basics ---------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        self._check_open()
        return int(self._native.chunk_size)

    @property
    def layout(self) -> Any:
        """The registered paged-KV layout (None before register_kv_caches)."""
        return self._layout

    def lookup(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        """Leading tokens whose KV is cached (ready) in any tier."""
        self._check_open()
        return int(self._native.lookup(_tokens(tokens), extras=_extras(extras)))

    def chunk_keys(
        self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None
    ) -> list[tuple[str, int, int]]:
        self._check_open()
        return list(self._native.chunk_keys(_tokens(tokens), extras=_extras(extras)))

    # -- raw chunk buffers (no paged layout) ----------------------------
    def store_buffers(
        self,
        tokens: Sequence[int] | np.ndarray,
        buffers: Sequence[Any],
        layout_id: int = 0,
        *,
        extras: KeyExtras | None = None,
    ) -> int:
        """Store finished chunk buffers (C-contiguous), one per chunk; returns chunks stored."""
        self._check_open()
        h = self._native.store_buffers(_tokens(tokens), list(buffers), layout_id, extras=_extras(extras))
        return int(h.wait())

    def retrieve_buffers(
        self,
        tokens: Sequence[int] | np.ndarray,
        buffers: Sequence[Any],
        layout_id: int = 0,
        *,
        extras: KeyExtras | None = None,
    ) -> int:
        """Load cached chunks into writable C-contiguous buffers, one per chunk; returns tokens loaded."""
        self._check_open()
        return int(self._native.retrieve_buffers(_tokens(tokens), list(buffers), layout_id, extras=_extras(extras)))

    def set_chunk_bytes(self, max_chunk_bytes: int) -> None:
        self._check_open()
        self._native.set_chunk_bytes(int(max_chunk_bytes))

    # -- paged KV (the inference engine's own cache) ---------------------
    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor] | dict[str, torch.Tensor], kind: str | None = None) -> Any:
        """Describe the engine's paged KV tensors once; sizes the CPU tier."""
        from kvtier.kv_layout import make_layout

        self._check_open()
        tensors = list(kv_caches.values()) if isinstance(kv_caches, dict) else list(kv_caches)
        layout = make_layout(tensors, kind=kind or "auto")
        self._native.set_chunk_bytes(int(layout.chunk_bytes(self.chunk_size)))
        self._layout = layout
        return layout

    def _require_layout(self) -> Any:
        self._check_open()
        if self._layout is None:
            raise _kvtier.FailedPreconditionError("register_kv_caches() must be called before store/retrieve")
        return self._layout

    def store(
        self,
        tokens: Sequence[int] | np.ndarray,
        slot_mapping: Any,
        skip_tokens: int = 0,
        stream: Any = None,
        *,
        extras: KeyExtras | None = None,
    ) -> StoreHandle:
        """Gather the KV of uncached chunks into kvtier, asynchronously.

        The paged KV blocks named by slot_mapping must stay untouched until
        the returned handle is done. On a CUDA layout the copies start once
        ``stream`` (default: the current stream) has reached this call, so
        the KV its earlier kernels write is what gets stored; the calling
        thread and the stream never wait. (A slot mapping given as a CUDA
        tensor is first copied to the host, which does wait: pass numpy or
        CPU slots on a hot path, as the vLLM connector does.)
        """
        self._check_open()
        toks = _tokens(tokens)
        layout = self._require_layout()
        return self._native.store_paged(
            toks,
            _slots(slot_mapping, toks.shape[0]),
            int(skip_tokens),
            layout,
            stream_handle(layout, stream),
            extras=_extras(extras),
        )

    def retrieve(
        self,
        tokens: Sequence[int] | np.ndarray,
        slot_mapping: Any,
        skip_tokens: int = 0,
        stream: Any = None,
        *,
        extras: KeyExtras | None = None,
    ) -> int:
        """Scatter the cached prefix into the paged KV; returns tokens now valid.

        Returns once the copy is complete (CUDA layouts: enqueued on
        ``stream`` and waited for). See retrieve_on_stream to overlap.
        """
        self._check_open()
        toks = _tokens(tokens)
        layout = self._require_layout()
        return int(
            self._native.retrieve_paged(
                toks,
                _slots(slot_mapping, toks.shape[0]),
                int(skip_tokens),
                layout,
                self._threads,
                stream_handle(layout, stream),
                extras=_extras(extras),
            )
        )

    def layer_signal(self, num_layers: int | None = None, timeout_ms: int = 30000) -> LayerSignal | CudaLayerSignal:
        """A signal for one forward pass's layer-wise stores, of the kind the
        registered layout needs: a LayerSignal on the CPU, a CudaLayerSignal
        (CUDA events on the forward's stream) on a GPU. num_layers defaults
        to the layout's."""
        layout = self._require_layout()
        n = int(layout.num_layers if num_layers is None else num_layers)
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        if layout.device == "cpu":
            return LayerSignal(n, int(timeout_ms))
        return CudaLayerSignal(layout, n, int(timeout_ms))

    def store_layerwise(
        self,
        tokens: Sequence[int] | np.ndarray,
        slot_mapping: Any,
        skip_tokens: int,
        signal: LayerSignal | CudaLayerSignal,
        *,
        extras: KeyExtras | None = None,
    ) -> StoreHandle:
        """store(), but each layer of a chunk is copied once ``signal`` reports
        it final (``signal.layer_ready(i)`` / ``all_ready()``), so the store
        follows a forward pass layer by layer. ``signal`` comes from
        ``layer_signal()`` (a LayerSignal for CPU layouts, a CudaLayerSignal
        for CUDA layouts). A chunk whose layers never all become final
        (``abort()``, the signal's timeout) is not stored."""
        self._check_open()
        toks = _tokens(tokens)
        layout = self._require_layout()
        native_signal = signal.native if isinstance(signal, CudaLayerSignal) else signal
        return self._native.store_paged_layerwise(
            toks, _slots(slot_mapping, toks.shape[0]), int(skip_tokens), layout, native_signal, extras=_extras(extras)
        )

    def load_layerwise(
        self,
        requests: Sequence[tuple[Sequence[int] | np.ndarray, Any, int, KeyExtras | None]],
        stream: Any = None,
    ) -> LayerwiseLoadHandle:
        """Lease the cached prefix of each ``(tokens, slot_mapping, skip_tokens,
        extras)`` and load it into the paged KV layer by layer, layers in
        order. ``valid_tokens`` (one per request) is known on return.

        CPU layouts: a thread of the load's own copies the layers;
        ``wait_layer(i)`` returns once layer i of every request is in place.
        CUDA layouts: the layers are enqueued on a stream of the load's own,
        after the work already on ``stream`` (default: torch's current
        stream); ``wait_layer(i)`` makes that stream (or the one given) wait
        for layer i without blocking the caller, ``done()`` polls and
        ``wait()`` blocks until every layer is in place."""
        self._check_open()
        layout = self._require_layout()
        native = []
        for tokens, slot_mapping, skip_tokens, extras in requests:
            toks = _tokens(tokens)
            native.append((toks, _slots(slot_mapping, toks.shape[0]), int(skip_tokens), _extras(extras)))
        return self._native.load_paged_layerwise(native, layout, stream_handle(layout, stream))

    def retrieve_on_stream(
        self,
        tokens: Sequence[int] | np.ndarray,
        slot_mapping: Any,
        skip_tokens: int = 0,
        stream: Any = None,
        *,
        extras: KeyExtras | None = None,
    ) -> Any:
        """Enqueue the load of the cached prefix on a CUDA stream; returns a LoadHandle at once.

        Kernels queued on ``stream`` afterwards see the KV without any host
        wait; ``handle.valid_tokens`` is known immediately, and the cached
        chunks stay pinned until ``handle.done()`` or ``handle.wait()``. On a
        CPU layout the copy is complete when this returns.
        """
        self._check_open()
        toks = _tokens(tokens)
        layout = self._require_layout()
        return self._native.retrieve_paged_on_stream(
            toks,
            _slots(slot_mapping, toks.shape[0]),
            int(skip_tokens),
            layout,
            stream_handle(layout, stream),
            extras=_extras(extras),
        )

    def retrieve_async(
        self,
        tokens: Sequence[int] | np.ndarray,
        slot_mapping: Any,
        skip_tokens: int = 0,
        *,
        extras: KeyExtras | None = None,
        fetch_remote: bool = False,
    ) -> Future[int]:
        """retrieve() on a loader thread (the native call releases the GIL).
        fetch_remote: first bring what the remote tier holds past the local
        prefix into the CPU tier (fetch_remote()), on the same thread."""
        self._check_open()
        toks = _tokens(tokens)
        key_extras = _extras(extras)
        slots = _slots(slot_mapping, toks.shape[0])
        layout = self._require_layout()
        stream = stream_handle(layout, None)
        with self._lock:
            self._check_open()  # under the lock: close() cannot miss a new loader
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
            loader = self._loader
        native = self._native

        def load() -> int:
            if fetch_remote:
                native.fetch_remote(toks, int(layout.layout_id), extras=key_extras)
            return int(native.retrieve_paged(toks, slots, int(skip_tokens), layout, self._threads, stream, extras=key_extras))

        return loader.submit(load)

    # -- remote tier -----------------------------------------------------
    def lookup_remote(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        """Leading tokens cached locally or, past the local prefix, in the
        remote tier (one pipelined EXISTS round trip, bounded by
        remote_timeout_ms; a remote that is down or slow answers 0)."""
        self._check_open()
        return int(self._native.lookup_remote(_tokens(tokens), extras=_extras(extras)))

    def fetch_remote(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        """Bring the chunks past the local prefix that the remote tier holds
        into the CPU tier, each checked (key, fingerprint, layout, checksums)
        before it counts; returns the leading tokens now cached locally.
        Needs registered KV caches (the layout decides what is valid)."""
        self._check_open()
        layout = self._require_layout()
        return int(self._native.fetch_remote(_tokens(tokens), int(layout.layout_id), extras=_extras(extras)))

    def flush_remote(self) -> None:
        """Wait until every queued upload to the remote tier was attempted."""
        self._check_open()
        self._native.flush_remote()

    # -- peer transport (disaggregated prefill) --------------------------
    def transport_address(self) -> str | None:
        """"host:port" this engine's transport serves on (``transport_listen``),
        or None when it does not serve (``transport: none``, or a consumer)."""
        self._check_open()
        return None if self._transport is None else self._transport.address

    def _require_transport(self) -> Any:
        self._check_open()
        if self._transport is None:
            raise _kvtier.FailedPreconditionError("the peer transport is off: set transport: ucx (KVTIER_TRANSPORT=ucx)")
        return self._transport

    def hold_for_peer(
        self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None, seconds: float | None = None
    ) -> int:
        """Pin the CPU-resident cached prefix of tokens for a consumer: until a
        pull_from_peer of it (with release_hold) or ``seconds`` pass (default
        ``producer_pin_seconds``). Returns the chunks held."""
        transport = self._require_transport()
        secs = float(self.config.producer_pin_seconds if seconds is None else seconds)
        if not secs > 0:
            raise _kvtier.InvalidArgumentError(f"seconds must be > 0, got {seconds!r}")
        return int(transport.hold(_tokens(tokens), secs, extras=_extras(extras)))

    def pull_from_peer(
        self,
        address: str,
        tokens: Sequence[int] | np.ndarray,
        *,
        extras: KeyExtras | None = None,
        layout_id: int | None = None,
        release_hold: bool = True,
    ) -> int:
        """Pull the chunks of tokens past the local cached prefix from the
        producer at ``address`` ("host:port", its transport_address()) into
        the CPU tier and catalogue (write-behind to disk as for a store);
        returns the leading tokens now cached locally. Blocking (releases the
        GIL), bounded by transport_timeout_ms per window of 1024 chunks. A dead,
        slow or garbage peer is a miss (counted in stats()["transport"]),
        never an exception. ``layout_id``: default the registered layout's, or 0
        before register_kv_caches (raw store_buffers). Chunks that fail a
        check (CRC32C, fingerprint, layout) never count."""
        transport = self._require_transport()
        if layout_id is None:
            layout_id = 0 if self._layout is None else int(self._layout.layout_id)
        return int(
            transport.pull(str(address), _tokens(tokens), int(layout_id), extras=_extras(extras), release_hold=bool(release_hold))
        )

    def set_transport_fault(self, spec: str) -> None:
        """Tests only: inject a fault into this engine's pulls: "none", "drop"
        (requests never sent: timeouts), "delay:MS", "corrupt" (a byte of every
        pulled chunk flipped), "truncate" (half of every chunk read). The
        environment variable KVTIER_TRANSPORT_FAULT sets it at start."""
        self._require_transport().set_fault(str(spec))

    # -- management ------------------------------------------------------
    def prefetch(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        """Promote the cached prefix from disk to CPU in the background."""
        self._check_open()
        return int(self._native.prefetch(_tokens(tokens), extras=_extras(extras)))

    def pin(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None, ttl_s: float | None = None) -> int:
        """Pin the cached prefix (pins nest; unpin releases one); returns chunks pinned.

        ``ttl_s``: the pins this call took are released by themselves after
        that many seconds (a background thread of the engine). Pins are
        counts: an unpin before then releases one pin like any other.
        ``expire_pins_now(ahead_s)`` releases the pins due within ``ahead_s``
        at once (tests and tools; no waiting).
        """
        self._check_open()
        toks = _tokens(tokens)
        ttl = None if ttl_s is None else _seconds(ttl_s, "ttl_s", positive=True)
        return int(self._native.pin(toks, extras=_extras(extras), ttl_s=ttl))

    def expire_pins_now(self, ahead_s: float = 0.0) -> int:
        """Release now every TTL pin that is due within ``ahead_s`` seconds
        (0: those already due); returns chunk pins released."""
        self._check_open()
        return int(self._native.expire_pins_now(_seconds(ahead_s, "ahead_s", positive=False)))

    def unpin(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        self._check_open()
        return int(self._native.unpin(_tokens(tokens), extras=_extras(extras)))

    def flush(self) -> None:
        """Wait until every queued store and disk write is finished."""
        self._check_open()
        self._native.flush()

    def clear(
        self,
        *,
        tiers: Sequence[str] | None = None,
        tokens: Sequence[int] | np.ndarray | None = None,
        extras: KeyExtras | None = None,
        older_than_s: float | None = None,
    ) -> int:
        """Drop unpinned chunks; returns the chunks that lost a copy.

        No arguments: every unpinned chunk of every local tier. ``tiers``
        (a subset of "cpu", "disk"): only those copies (a chunk leaves the
        catalogue once no copy is left; the remote tier is never cleared).
        ``tokens`` (with ``extras``): only the cached prefix chunks of these
        tokens. ``older_than_s``: only chunks whose last use (the latest
        store, promotion or read of any copy; a chunk found on disk at start
        counts as used at start) is more than that many seconds ago. Pinned
        chunks are never dropped. Waits for queued stores first. Bad input
        raises (nothing is dropped).
        """
        self._check_open()
        names: list[str] | None = None
        if tiers is not None:
            if isinstance(tiers, str | bytes) or not isinstance(tiers, Sequence | set | frozenset):
                raise _kvtier.InvalidArgumentError(f"tiers must be a sequence of tier names, got {type(tiers).__name__}")
            names = [_tier(t) for t in tiers]
            if not names:
                raise _kvtier.InvalidArgumentError("tiers must name at least one tier (cpu, disk)")
        older = None if older_than_s is None else _seconds(older_than_s, "older_than_s", positive=False)
        if extras is not None and tokens is None:
            raise _kvtier.InvalidArgumentError("extras narrows a clear by tokens: pass tokens too")
        toks = None if tokens is None else _tokens(tokens)
        return int(self._native.clear(tiers=names, tokens=toks, extras=_extras(extras), older_than_s=older))

    def move(self, tokens: Sequence[int] | np.ndarray, tier: str, *, extras: KeyExtras | None = None) -> MoveTask:
        """Move the cached prefix of ``tokens`` to ``tier`` in the background;
        returns at once with a :data:`MoveTask`.

        "cpu": promote every chunk that is only on disk into the CPU tier.
        "disk": write every chunk that is only in CPU to disk, then drop its
        CPU copy (a chunk pinned or being read in CPU keeps it: failed).
        """
        self._check_open()
        name = _tier(tier)
        return self._native.move(_tokens(tokens), name, extras=_extras(extras))

    def lookup_tiers(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> dict[str, Any]:
        """Where the cached prefix is: {"tokens", "chunk_tokens", "chunks": [{"index",
        "tiers": ["cpu", "disk"], "pinned"}], "by_tier": {"cpu": n, "disk": n}}.
        Not a lookup: the hit statistics do not move."""
        self._check_open()
        return dict(self._native.lookup_tiers(_tokens(tokens), extras=_extras(extras)))

    def verify(self, *, deep: bool = False) -> dict[str, Any]:
        """The index-consistency check: {"entries", "checked", "ok", "missing":
        {"cpu", "disk"}, "orphans": {"cpu", "disk"}, "corrupt", "consistent",
        "deep"}. Every ready catalogue entry is checked against the tiers it
        claims; tier contents absent from the catalogue are orphans; ``deep``
        also reads and CRC-checks every catalogued disk record. Read-only and
        safe while stores run (see Engine::Verify in cc/engine/engine.h)."""
        self._check_open()
        if not isinstance(deep, bool):
            raise TypeError(f"deep must be a bool, got {type(deep).__name__}")
        return dict(self._native.verify(deep=deep))

    def health(self) -> dict[str, Any]:
        """{"status": "ok"|"degraded"|"down", "reasons": [...], "tiers": {"cpu" |
        "disk" | "remote": {"status", "reasons", "enabled"}}, "queues":
        {"write_behind", "write_behind_capacity", "remote_upload",
        "remote_upload_capacity", "store", "store_capacity"}}. Disk degraded:
        its directory is not writable (removed, replaced by a file, or no
        permission), or a disk write failed for good / write-behind dropped a
        chunk in the last 60 s. Remote down: its last call failed; degraded:
        timeouts in the last 60 s. A disabled tier is "ok" with enabled False."""
        self._check_open()
        return dict(self._native.health())

    def stats(self) -> dict[str, Any]:
        """Every counter and gauge of the engine, per tier under "tiers" (also
        "cpu" / "disk" at the top level), with evictions by reason
        (``evictions_capacity``, ``_clear``, ``_expired``, ``_layout_mismatch``,
        ``_corrupt``) in each tier's dict.

        ``stats()["histograms"]`` = ``{"load_us": {"cpu", "disk", "remote"},
        "store_us": {"cpu", "disk"}}``, each ``{"bounds": [...], "counts":
        [...], "sum": us, "count": n}``: fixed log-spaced bounds in
        microseconds (10 us .. 10 s, 1-2-5 per decade); ``counts`` has
        ``len(bounds) + 1`` entries, the last +Inf, and is NON-cumulative
        (bucket i counts samples in (bounds[i-1], bounds[i]]). load: one chunk
        of a retrieve from a tier (remote: one fetch's round trips); store:
        one chunk into CPU, one disk write call (see EngineStats in
        cc/engine/engine.h).
        """
        self._check_open()
        out = dict(self._native.stats())
        out["transport"] = dict(_NO_TRANSPORT_STATS) if self._transport is None else dict(self._transport.stats())
        return out

    def _disown(self) -> None:
        # In a forked child, before anything else runs there: no lock (one
        # held by a parent's thread at fork time stays held here). The
        # native objects get a reference no finalizer drops.
        self._forked = True
        self._closed = True
        self._loader = None
        for native in (self._native, self._transport):
            if native is not None:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(native))

    def close(self) -> None:
        """Drain pending work and release the tiers; every later call raises "engine is closed". Idempotent.
        In a forked child it does nothing: the engine is the parent's."""
        if self._forked:
            return
        with self._lock:
            self._closed = True
            loader, self._loader = self._loader, None
        if loader is not None:
            loader.shutdown(wait=True)
        if self._transport is not None:
            self._transport.close()  # before the engine: it serves from the CPU tier
        self._native.close()

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
