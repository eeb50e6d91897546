"""KVTierConnector: kvtier as a vLLM v1 KV connector (vLLM 0.32).

Enable with::

    --kv-transfer-config '{"kv_connector": "KVTierConnector",
                           "kv_connector_module_path": "kvtier.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"cpu_capacity": "4GiB"}}'

Contract with vLLM
------------------
* Scheduler side. `get_num_new_matched_tokens` asks the engine's index
  (`Engine.lookup`, no round trip to the worker) how long a prefix of the
  request's tokens is cached, subtracts what vLLM already holds locally
  (`num_computed_tokens`) and never claims the last token: on a full-prompt
  hit vLLM must still compute one token to sample from. The answer is only
  what the index holds *ready*; anything that disappears before the worker
  loads it is reported back as a load error (below).
* Loads. The scheduler puts, per request, the tokens, the slot mapping of
  the blocks vLLM allocated and the number of tokens it relies on into the
  step's metadata. The worker calls `Engine.retrieve` (sync, before the
  forward; on a GPU `Engine.retrieve_on_stream`, which enqueues the copy on
  the forward's stream and returns without a host wait) or
  `Engine.retrieve_async` (when `async_load` is on; the request waits in
  WAITING_FOR_REMOTE_KVS and is released through `get_finished`).
  When fewer tokens arrive than promised, the blocks past the loaded prefix
  are returned by `get_block_ids_with_load_errors`; this connector sets
  vLLM's `kv_load_failure_policy` to "recompute" (a cache miss is never
  fatal), so vLLM recomputes them. Wrong KV is never served: the engine
  checks each chunk's fingerprint and treats a mismatch as a miss.
* Saves. After each forward (`wait_for_save`) the worker hands the prompt
  chunks that became complete in that step to `Engine.store`, which gathers
  them asynchronously. `request_finished` returns delay_free=True for every
  request that had a save scheduled, so vLLM keeps its blocks; the worker
  reports it in `finished_sending` once all its stores are done. Preempted
  requests have their in-flight stores waited for in `handle_preemptions`,
  before vLLM reuses their blocks.
* Layers. The engine moves all layers of a chunk together, so
  `wait_for_layer_load` / `save_kv_layer` are no-ops; a per-layer engine
  call would slot into them without changing the scheduler side.
* Request identity. vLLM's own prefix-cache hash mixes more than token ids
  into a block's key: the LoRA adapter, multimodal inputs (identical
  placeholder tokens, different images), prompt embeddings and
  `cache_salt`. `request_key_extras` folds the same identity into kvtier's
  chunk keys (`kvtier.KeyExtras`: a salt for the whole request, one span
  per multimodal item) on the lookup, the load and the save. A LoRA
  adapter also counts by a digest of its files: kvtier's disk outlives the
  process, so a retrained adapter under the same name and path must not
  read the old one's KV after a restart. A request
  carrying an identity this connector does not understand (one of vLLM's
  block-hash extra keys it has no rule for) is neither looked up nor
  stored: it is counted in the `unsupported_requests` stat and logged once.
* Roles: kv_both loads and saves, kv_producer only saves, kv_consumer only
  loads.
* Disaggregated prefill (vLLM's P/D convention; docs/disaggregated.md).
  With `transport: ucx`, a request whose `kv_transfer_params` carry
  `do_remote_decode` (the proxy's prefill leg) is a P/D prefill: the
  scheduler flags its last save, the worker waits for that save and holds
  the request's chunks for a peer (`Engine.hold_for_peer`, for
  `producer_pin_seconds`), and `request_finished` returns
  `kv_transfer_params` {"do_remote_prefill": true, "kvtier": {"version": 1,
  "peers": [one transport address per rank], "namespace": a digest of what
  keys the KV, "tokens": the prompt tokens held}}. The decode instance's
  scheduler reads them from the request: it claims the tokens past its own
  prefix (at most the prompt less one) and loads them asynchronously; its
  worker of rank r pulls them from peers[r] (`Engine.pull_from_peer`, which
  files them in the local CPU tier) and loads them, and `get_finished`
  reports the request. A peer that is gone, refuses, or sends bad chunks
  is a miss: the blocks not loaded are reported and vLLM recomputes them
  (counted in `pd_pull_failures`). Params from another model, dtype,
  layout, parallel size or chunk size are refused (`pd_params_refused`).
* Processes and ranks (ranks.py): every worker rank (tensor and pipeline
  parallel) owns the engine holding its shard of every chunk, under a
  namespace carrying its rank, with its own disk directory and its
  catalogue in shared memory. The scheduler opens no tiers: it maps every
  rank's catalogue read-only (`kvtier.CatalogueView`) and counts a prefix
  only when every rank holds it. This holds whether the scheduler and the
  workers share a process (the `LLM` class in-process) or not
  (`vllm serve`).

Extra config
------------
`kv_connector_extra_config` holds kvtier configuration keys (validated by
`kvtier.load_config`; an unknown key is a `kvtier.ConfigError`) plus these
connector keys:

* `async_load` (bool, default False): load through `retrieve_async` and
  `get_finished` instead of blocking before the forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.core.sched.output import SchedulerOutput

import kvtier
from kvtier.vllm import ranks, registry

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# Only what has run under this connector's tests. vLLM 0.33 exists on PyPI
# only as a CUDA build, which needs a GPU to serve and cannot run in CI
# here; its KV layouts are covered (kv_layout.py), the connector API is not,
# so it is refused until a test has run it.
SUPPORTED_VLLM = ("0.32.",)
CONNECTOR_KEYS = {"async_load": bool, "layerwise": bool}

# A layer-wise store gives up (stores nothing) when its forward pass has not
# reported every layer by then; bounds how long a pass that died holds the
# engine's copy threads.
LAYERWISE_TIMEOUT_MS = 300_000


def check_vllm_version(version: str = vllm.__version__) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise ImportError(
            f"kvtier.vllm supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"found {version}. The KVConnectorBase_V1 API changes between minor "
            "releases, so versions no test has run are refused rather than guessed at."
        )


check_vllm_version()


def split_extra_config(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits extra config into (connector options, kvtier overrides)."""
    connector: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in extra.items():
        if key in CONNECTOR_KEYS:
            if not isinstance(value, CONNECTOR_KEYS[key]):
                raise kvtier.ConfigError(
                    f"kv_connector_extra_config[{key!r}] must be "
                    f"{CONNECTOR_KEYS[key].__name__}, got {value!r}"
                )
            connector[key] = value
        else:
            overrides[key] = value
    return connector, overrides


def flat_engine_stats(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Engine.stats() with per-tier dicts flattened: {"cpu": {"evictions": 1}} -> cpu_evictions."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(flat_engine_stats(value, f"{prefix}{key}_"))
        elif isinstance(value, (bool, int, float)):
            out[prefix + key] = float(value)
    return out


def handle_result(handle: Any) -> int:
    """Result of a store handle (wait) or a retrieve future (result)."""
    if hasattr(handle, "wait"):
        return int(handle.wait())
    return int(handle.result())


def slot_mapping(block_ids: list[int], block_size: int, num_tokens: int) -> np.ndarray:
    """Slot of each of the first num_tokens tokens; -1 where no block exists."""
    blocks = np.asarray(block_ids, dtype=np.int64)
    slots = (blocks[:, None] * block_size + np.arange(block_size, dtype=np.int64)).ravel()
    if slots.size >= num_tokens:
        return slots[:num_tokens].copy()
    return np.concatenate([slots, np.full(num_tokens - slots.size, -1, dtype=np.int64)])


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """A request whose identity cannot be folded into kvtier's keys."""

    reason: str


# What vLLM 0.32's block hash mixes in besides token ids, by the tag of its
# extra keys (kv_cache_utils.generate_block_hash_extra_keys). A tag not here
# is an identity this connector does not know how to fold in.
_KNOWN_IDENTITY_TAGS = frozenset({"lora", "mm", "cache_salt", "prompt_embeds"})


def request_key_extras(
    request: Request, adapter_digests: AdapterDigests | None = None
) -> dict[str, Any] | None | Unsupported:
    """What decides the request's KV besides its token ids, as keyword
    arguments of `kvtier.KeyExtras` (salt, spans); None when nothing does.

    * salt: a canonical JSON string of the LoRA adapter (name, id, path and
      a digest of its files, see `adapter_digest`), `cache_salt`, and the digest vLLM takes of the prompt embeddings (plus
      the token/embedding mask of a mixed prompt). A salt changes every key
      of the request, so prompt-embeds requests share KV only when all their
      embeddings are equal (vLLM shares per block; this is coarser, never
      wrong).
    * spans: one (offset, offset + length, identifier) per multimodal item,
      sorted by offset: the chunks that item's placeholder tokens touch, and
      every chunk after them, get keys of their own.

    The request is cross-checked against vLLM's own block-hash extra keys
    over its whole prompt; an identity kind not understood here, a
    multimodal item without an identifier or with an empty placeholder, or
    a failure inside vLLM's derivation returns `Unsupported`.
    """
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    try:
        vllm_keys, _ = generate_block_hash_extra_keys(request, 0, request.num_prompt_tokens, 0)
    except (AssertionError, AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        # vLLM asserts on what it cannot hash either.
        return Unsupported(f"vLLM's block-hash extra keys failed: {exc!r}")
    embeds_digest: str | None = None
    for key in vllm_keys or ():
        tag = key[0] if isinstance(key, tuple) and key else None
        if tag not in _KNOWN_IDENTITY_TAGS:
            return Unsupported(f"unknown block-hash identity {key!r}")
        if tag == "prompt_embeds":
            embeds_digest = bytes(key[1]).hex()

    parts: list[list[Any]] = []
    lora = request.lora_request
    if lora is not None:
        parts.append(
            ["lora", str(lora.lora_name), int(lora.lora_int_id), str(lora.lora_path or ""), adapter_digest(lora, adapter_digests)]
        )
    if request.cache_salt:
        parts.append(["cache_salt", str(request.cache_salt)])
    if request.prompt_embeds is not None:
        if embeds_digest is None:
            return Unsupported("prompt embeddings without vLLM's digest of them")
        embeds = request.prompt_embeds
        part: list[Any] = ["prompt_embeds", embeds_digest, str(embeds.dtype), list(embeds.shape)]
        mask = getattr(request, "prompt_is_token_ids", None)
        if mask is not None:
            part.append("".join("t" if is_token else "e" for is_token in mask))
        parts.append(part)

    spans: list[tuple[int, int, str]] = []
    for feature in request.mm_features or ():
        identifier = getattr(feature, "identifier", None)
        position = getattr(feature, "mm_position", None)
        if not isinstance(identifier, str) or not identifier or position is None:
            return Unsupported(f"multimodal item without an identifier or position: {feature!r}")
        begin, length = int(position.offset), int(position.length)
        if begin < 0 or length <= 0:
            return Unsupported(f"multimodal item {identifier!r} at [{begin}, {begin + length})")
        spans.append((begin, begin + length, identifier))
    spans.sort(key=lambda span: (span[0], span[1]))

    if not parts and not spans:
        return None
    salt = json.dumps(parts, separators=(",", ":")) if parts else None
    return {"salt": salt, "spans": spans}


def key_extras(args: dict[str, Any] | None) -> Any:
    """`kvtier.KeyExtras` from `request_key_extras`' arguments (None stays None)."""
    if args is None:
        return None
    from kvtier.engine import KeyExtras  # loads the native extension

    return KeyExtras(salt=args["salt"], spans=[tuple(span) for span in args["spans"]])


@dataclasses.dataclass
class LoadSpec:
    req_id: str
    tokens: np.ndarray  # int64, the tokens whose cached prefix is loaded
    slots: np.ndarray  # int64, one per token, -1 = not written
    skip_tokens: int  # vLLM's own computed prefix: never overwritten
    need_tokens: int  # local + external tokens the scheduler counted on
    block_ids: list[int]
    is_async: bool
    extras: dict[str, Any] | None = None  # request_key_extras(request)
    # Part of the promised prefix is in the remote tier only: the worker
    # fetches it (asynchronously) before it loads.
    remote: bool = False
    # P/D decode: the prefill instance's transport address per rank; the
    # worker pulls from its rank's before it loads.
    peers: tuple[str, ...] = ()


@dataclasses.dataclass
class SaveSpec:
    req_id: str
    tokens: np.ndarray
    slots: np.ndarray
    skip_tokens: int
    extras: dict[str, Any] | None = None  # request_key_extras(request)
    # P/D prefill: the request's last save; once it is stored the worker
    # holds the request's chunks for the decode instance.
    hold: bool = False


@dataclasses.dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    preempted: set[str] = dataclasses.field(default_factory=set)


_COUNTERS = (
    "lookups",
    "hit_requests",
    "miss_requests",
    "hit_tokens",
    # Tokens past vLLM's own prefix cache that a lookup asked kvtier for
    # (the hit rate's denominator; hit_tokens is its numerator).
    "query_tokens",
    "tokens_loaded",
    "load_errors",
    "load_seconds",
    "save_requests",
    "chunks_saved",
    "save_seconds",
    "unsupported_requests",
    "remote_lookups",
    "layerwise_loads",
    "layerwise_store_passes",
    "layerwise_stores_aborted",
    "pd_holds",
    "pd_chunks_held",
    "pd_pulls",
    "pd_pull_failures",
    "pd_params_refused",
)


@dataclasses.dataclass
class KVTierConnectorStats(KVConnectorStats):
    """Counters since the last collection; gauges from the engine ride along."""

    def __post_init__(self) -> None:
        for name in _COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = {name: 0 for name in _COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if key in _COUNTERS:
                self.data[key] = self.data.get(key, 0) + value
            else:
                self.data[key] = value  # engine gauges: latest wins
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if isinstance(v, (int, float))}

    def is_empty(self) -> bool:
        return all(not self.data.get(name) for name in _COUNTERS)


@dataclasses.dataclass
class _ReqState:
    request: Request
    block_ids: list[int] = dataclasses.field(default_factory=list)
    saved_tokens: int = 0
    has_save: bool = False


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_INDEX_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_SAMPLE_BYTES = 4096  # read from each end of each tensor (or weight file)
_MAX_SAFETENSORS_HEADER = 100 << 20


def _update(h: Any, label: str, data: bytes) -> None:
    h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)


def _sample_range(f: Any, begin: int, end: int) -> bytes:
    """Up to _SAMPLE_BYTES from each end of [begin, end) of an open file."""
    if end - begin <= 2 * _SAMPLE_BYTES:
        f.seek(begin)
        return f.read(end - begin)
    f.seek(begin)
    head = f.read(_SAMPLE_BYTES)
    f.seek(end - _SAMPLE_BYTES)
    return head + f.read(_SAMPLE_BYTES)


def _digest_weight_file(h: Any, path: Path) -> None:
    """Name, size, where a hub cache keeps it (its blob is named by content
    hash), the safetensors header, and a few KiB from each end of every
    tensor: weights retrained at the same shapes have the same header and
    index, so some bytes of every tensor must be read, but never all of
    them (a 70B model reads about 6 MB)."""
    size = path.stat().st_size
    _update(h, "file", f"{path.name}:{size}".encode())
    real = path.resolve()
    if real.name != path.name:
        _update(h, "blob", real.name.encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 0 < header_len <= min(_MAX_SAFETENSORS_HEADER, size - 8):
                header = f.read(header_len)
                _update(h, "header", header)
                try:
                    tensors = json.loads(header)
                except ValueError:
                    tensors = None
                if isinstance(tensors, dict):
                    base = 8 + header_len
                    for name in sorted(tensors):
                        entry = tensors[name]
                        if name == "__metadata__" or not isinstance(entry, dict):
                            continue
                        begin, end = (int(x) for x in entry.get("data_offsets", (0, 0)))
                        _update(h, name, _sample_range(f, base + begin, min(base + end, size)))
                    return
        _update(h, "sample", _sample_range(f, 0, size))


def model_weights_digest(path: str | os.PathLike[str]) -> str:
    """A cheap digest of what a local model directory (or single weight
    file) computes: config.json, the weight index files, and every weight
    file (see _digest_weight_file). Equal for the same files at another
    path or after a copy; different when config or weights change."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        _digest_weight_file(h, root)
        return h.hexdigest()[:32]
    for name in _INDEX_FILES:
        f = root / name
        if f.is_file():
            _update(h, name, f.read_bytes())
    for f in sorted(root.iterdir()):
        if f.name.endswith(_WEIGHT_SUFFIXES) and f.is_file():
            _digest_weight_file(h, f)
    return h.hexdigest()[:32]


def _local_model_dir(model: str, revision: str | None, download_dir: str | None) -> Path | None:
    """The directory vLLM loads `model` from: itself if local, else the hub
    cache's snapshot of `revision` (offline: never downloads)."""
    if os.path.exists(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not resolvable offline"
        logger.warning(
            "KVTierConnector: cannot find %s locally (%s); the cache namespace carries its name "
            "and revision only, so new weights under the same name and revision would read "
            "old KV: clear the cache after such a redeploy",
            model,
            exc,
        )
        return None


AdapterDigests = dict[tuple[str, int, str], str]  # (name, id, path) -> digest
_MAX_ADAPTER_DIGESTS = 4096
_unfound_adapters_logged: set[str] = set()


def _local_adapter_path(path: str) -> Path | None:
    """Where vLLM loads a LoRA adapter from (vllm.lora.utils.
    get_adapter_absolute_path: a local path, else a hub id), offline."""
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        return Path(expanded)
    if not path or os.path.isabs(expanded):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not resolvable offline"
        return None


def adapter_digest(lora: Any, memo: AdapterDigests | None = None) -> str:
    """A digest of a LoRA adapter's files: adapter_config.json and the
    weights, read as `model_weights_digest` reads a model's. kvtier's disk
    outlives the process, so an adapter retrained and redeployed under the
    same name and path must not read the old adapter's KV after a restart
    (vLLM's own hash, name and path, lives only as long as the process).

    With a `memo` (the connector keeps one per vLLM engine) it is taken
    once per (name, id, path), as vLLM loads an adapter once per id and
    keeps computing with what it loaded. "unknown" where the files cannot
    be found offline (a hub id not downloaded yet, which the worker
    downloads when it loads the adapter): logged once per path, not
    memoized, so a later request sees the files once they are there."""
    key = (str(lora.lora_name), int(lora.lora_int_id), str(lora.lora_path or ""))
    digest = memo.get(key) if memo is not None else None
    if digest is not None:
        return digest
    local = _local_adapter_path(key[2])
    try:
        if local is None:
            raise FileNotFoundError(key[2])
        h = hashlib.sha256()
        config = local / "adapter_config.json"
        if local.is_dir() and config.is_file():
            _update(h, "adapter_config.json", config.read_bytes())
        _update(h, "weights", model_weights_digest(local).encode())
        digest = h.hexdigest()[:32]
    except OSError as exc:
        if key[2] not in _unfound_adapters_logged:
            _unfound_adapters_logged.add(key[2])
            logger.warning(
                "KVTierConnector: cannot read LoRA adapter %r at %r (%s); its KV is keyed by name, id "
                "and path only until its files are found, so a retrained adapter there would read "
                "old KV: clear the cache after such a redeploy",
                key[0],
                key[2],
                exc,
            )
        return "unknown"
    if memo is not None:
        if len(memo) >= _MAX_ADAPTER_DIGESTS:
            memo.clear()
        memo[key] = digest
    return digest


def _canonical_overrides(overrides: Any) -> str:
    """hf_overrides / model_class_overrides as a stable string. A callable is
    named by module and qualified name: a changed body under the same name
    is not seen (set a new `namespace` then)."""
    if callable(overrides):
        return f"{getattr(overrides, '__module__', '?')}.{getattr(overrides, '__qualname__', type(overrides).__name__)}"
    return json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=repr)


def model_identity(
    model: str,
    revision: str | None = None,
    download_dir: str | None = None,
    *,
    code_revision: str | None = None,
    quantization: str | None = None,
    hf_overrides: Any = None,
    model_class_overrides: Any = None,
) -> str:
    """The namespace's model string: name, revision and a digest of the
    config and weights, so a redeploy of other weights under the same name
    never reads the old run's KV from disk; plus, where set, what changes
    what the same files compute: the remote code's revision, a quantization
    applied at load, config overrides and model class overrides. Unset ones
    add nothing, so the default deployment's keys do not depend on them."""
    local = _local_model_dir(model, revision, download_dir)
    weights = model_weights_digest(local) if local is not None else "unknown"
    if local is not None and local.parent.name == "snapshots":
        revision = f"{revision or ''}@{local.name}"  # the hub commit
    identity = f"{model}|revision={revision or ''}|weights={weights}"
    if code_revision:
        identity += f"|code_revision={code_revision}"
    if quantization:
        identity += f"|quantization={quantization}"
    if hf_overrides:
        identity += f"|hf_overrides={_canonical_overrides(hf_overrides)}"
    if model_class_overrides:
        identity += f"|model_class_overrides={_canonical_overrides(model_class_overrides)}"
    return identity


def _attention_backend(vllm_config: VllmConfig) -> str:
    attention = getattr(vllm_config, "attention_config", None)
    backend = getattr(attention, "backend", None)
    return getattr(backend, "name", None) or (str(backend) if backend else "auto")


def _cpu_attention_isa(vllm_config: VllmConfig, spec: Any) -> str:
    """vLLM CPU orders a block's bytes by the attention ISA it picks (vec,
    vec16, amx, neon...): blocks stored under one are garbage under another."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return str(
            _get_attn_isa(
                vllm_config.model_config.dtype,
                spec.block_size,
                spec.head_size,
                vllm_config.cache_config.cache_dtype,
            )
        )
    except Exception:  # noqa: BLE001 - a private vLLM helper; unknown keys apart too
        return "unknown"


def _namespace(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, rank: int) -> Any:
    """What keys this run's KV apart from any other's, in every tier:
    model (name, revision, digest of config and weights), dtype, and the
    layout (device, block shape, the kind of KV tensors register_kv_caches
    describes, the attention backend; on CPU the ISA that orders a block)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"KVTierConnector supports one KV cache group (full attention); "
            f"this model has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    num_kv_heads = getattr(spec, "num_kv_heads", 0)
    head_size = getattr(spec, "head_size", 0)
    device = vllm_config.device_config.device_type
    # The layout kind passed to register_kv_caches: fixed on CPU; on a GPU
    # detected from the tensors, which the scheduler never sees (the engine
    # checks each chunk's layout_id and treats a mismatch as a miss).
    kind = "flash_infer" if device == "cpu" else "auto"
    layout = (
        f"vllm-paged:{device}:bs{spec.block_size}"
        f":h{num_kv_heads}:d{head_size}:l{len(groups[0].layer_names)}"
        f":kind={kind}:attn={_attention_backend(vllm_config)}"
        f":kv_dtype={vllm_config.cache_config.cache_dtype}"
    )
    if device == "cpu":
        layout += f":isa={_cpu_attention_isa(vllm_config, spec)}"
    from kvtier.engine import Namespace  # loads the native extension

    model_config = vllm_config.model_config
    return Namespace(
        model=model_identity(
            str(model_config.model),
            getattr(model_config, "revision", None),
            getattr(vllm_config.load_config, "download_dir", None),
            code_revision=getattr(model_config, "code_revision", None),
            quantization=getattr(model_config, "quantization", None),
            hf_overrides=getattr(model_config, "hf_overrides", None),
            model_class_overrides=getattr(model_config, "model_class_overrides", None),
        ),
        dtype=str(spec.dtype).removeprefix("torch."),
        layout=layout,
        rank=rank,
        world_size=vllm_config.parallel_config.world_size,
    )


def _cpu_whole_blocks(config: Any, block_size: int) -> Any:
    """vLLM CPU keeps a block's K in an ISA-specific order ("vec": K stored
    [head_size, block_size], V [block_size, head_size]; "amx" packs
    differently), so a token's KV is not a fixed slice of the block. kvtier
    therefore moves whole blocks on CPU: chunks must be whole blocks and
    partial tail chunks are dropped (a partial block is never copied)."""
    if config.chunk_size % block_size:
        raise kvtier.ConfigError(
            f"chunk_size ({config.chunk_size}) must be a multiple of vLLM's block size "
            f"({block_size}) on CPU, where kvtier moves whole blocks"
        )
    if config.partial_chunks != "drop":
        logger.info("KVTierConnector: partial_chunks='drop' on CPU (whole blocks only)")
        config = dataclasses.replace(config, partial_chunks="drop")
    return config


def _cpu_block_view(t: torch.Tensor) -> torch.Tensor:
    """A [blocks, 2, block_size, heads, head] view of a vLLM CPU layer tensor
    [blocks, heads, block_size, 2 * head] whose slot i covers the i-th 1/bs of
    both halves of the block's bytes: moving every slot of a block moves the
    block exactly, whatever order the attention kernel keeps inside it."""
    if t.dim() != 4 or not t.is_contiguous():
        raise ValueError(f"unexpected vLLM CPU KV tensor: shape {tuple(t.shape)}, strides {t.stride()}")
    blocks, heads, block_size, two_head = t.shape
    return t.view(blocks, 2, block_size, heads, two_head // 2)


PD_VERSION = 1
# Hosts a producer listens on that a peer cannot dial: it advertises its
# own address (vLLM's get_ip: VLLM_HOST_IP, else the default route's).
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclasses.dataclass(frozen=True)
class PeerSource:
    """Where a prefill instance holds a request's KV: the "kvtier" entry of
    the kv_transfer_params its request_finished returned."""

    peers: tuple[str, ...]  # transport address of each rank
    namespace: str  # pd_namespace_digest of the producer
    tokens: int  # prompt tokens held (whole chunks)


def _valid_address(address: Any) -> bool:
    if not isinstance(address, str) or len(address) > 300:
        return False
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def parse_peer_source(params: Any) -> PeerSource | str | None:
    """The PeerSource in a request's kv_transfer_params; None when there is
    none; a reason string when there is one this connector cannot use. The
    params come from a client, through the proxy: every field is checked."""
    if not isinstance(params, dict) or "kvtier" not in params:
        return None
    pd = params["kvtier"]
    if not isinstance(pd, dict):
        return f"kvtier params are not an object: {pd!r:.80}"
    if pd.get("version") != PD_VERSION:
        return f"kvtier params version {pd.get('version')!r:.20}, this connector speaks {PD_VERSION}"
    peers, namespace, tokens = pd.get("peers"), pd.get("namespace"), pd.get("tokens")
    if not isinstance(peers, list) or not peers or not all(_valid_address(a) for a in peers):
        return f"kvtier params peers are not a list of host:port: {peers!r:.200}"
    if not isinstance(namespace, str) or not namespace:
        return "kvtier params have no namespace"
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        return f"kvtier params tokens must be a count: {tokens!r:.40}"
    return PeerSource(peers=tuple(peers), namespace=namespace, tokens=tokens)


def pd_namespace_digest(namespace: Any, config: Any) -> str:
    """What must be equal for a consumer to use a producer's chunks: the
    model identity, dtype, layout (rank aside: each rank pulls its own
    shard), parallel size, chunk size and the configured namespace."""
    identity = [namespace.model, namespace.dtype, namespace.layout, int(namespace.world_size),
                int(config.chunk_size), str(config.namespace)]
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()[:32]


def producer_peers(listen: str, world_size: int) -> list[str]:
    """The transport address of each rank of a producer configured with
    `transport_listen: host:port` (rank r listens on port + r). A port of 0
    (any free port) is refused: the scheduler, which names the peers in
    kv_transfer_params, is another process and cannot learn the ports the
    workers bound."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise kvtier.ConfigError(f"transport_listen must be host:port, got {listen!r}")
    base = int(port)
    if base == 0:
        raise kvtier.ConfigError(
            "a P/D producer (kv_role kv_producer with transport: ucx) needs a fixed transport_listen "
            "port: its scheduler names rank r's address (port + r) in kv_transfer_params and cannot "
            "learn a port the worker picked"
        )
    if base + world_size - 1 > 65535:
        raise kvtier.ConfigError(f"transport_listen port {base} + {world_size - 1} ranks exceeds 65535")
    if host in _WILDCARD_HOSTS:
        from vllm.utils.network_utils import get_ip

        host = get_ip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return [f"{host}:{base + r}" for r in range(world_size)]


class KVTierConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        options, overrides = split_extra_config(dict(ktc.kv_connector_extra_config or {}))
        self._config = kvtier.load_config(overrides)
        self._async_load: bool = options.get("async_load", False)
        self._layerwise: bool = options.get("layerwise", False)
        self._loads_enabled = bool(ktc.is_kv_consumer)
        self._saves_enabled = bool(ktc.is_kv_producer)
        if ktc.kv_load_failure_policy != "recompute":
            # A cache miss discovered late is still just a miss: "fail"
            # would turn an evicted chunk into a failed request.
            logger.info("KVTierConnector: kv_load_failure_policy set to 'recompute'")
            ktc.kv_load_failure_policy = "recompute"
        self._block_size = vllm_config.cache_config.block_size
        self._cpu = vllm_config.device_config.device_type == "cpu"
        if self._cpu:
            self._config = _cpu_whole_blocks(self._config, self._block_size)
        self._chunk_size: int = int(self._config.chunk_size)
        # Disaggregated prefill (see the module docstring).
        self._transport = getattr(self._config, "transport", "none") == "ucx"
        self._pin_seconds = float(getattr(self._config, "producer_pin_seconds", 60.0))
        self._pd_namespace = ""
        self._pd_peers: list[str] = []  # this producer's addresses, one per rank
        self._world_size = ranks.world_size(vllm_config)
        # Worker: this rank's engine, its catalogue in shared memory.
        # Scheduler: no tiers, only every rank's catalogue mapped read-only
        # (see ranks.py): a prefix counts when every rank holds it.
        self.engine: Any = None
        self._controller: Any = None  # worker: kvtier.controller.ControllerHandle
        self._view: Any = None
        self._rank = 0
        self._registry_key: str | None = None
        if role == KVConnectorRole.SCHEDULER:
            placements = ranks.scheduler_placements(vllm_config)
            # Ranks differ only in `rank`: the model identity (which reads
            # the weight files' headers) is derived once.
            first = _namespace(vllm_config, kv_cache_config, 0)
            namespaces = [dataclasses.replace(first, rank=p.rank) for p in placements]
            deployment = ranks.deployment_name(self._config, vllm_config, namespaces[0].model)
            from kvtier.catalogue import CatalogueView, catalogue_shm_name

            self._view = CatalogueView(
                [(catalogue_shm_name(deployment, p.rank, p.world_size), ns) for p, ns in zip(placements, namespaces)],
                self._config,
            )
            self._pd_namespace = pd_namespace_digest(first, self._config)
            listen = str(getattr(self._config, "transport_listen", "") or "")
            if self._transport and self._saves_enabled and (listen or ktc.kv_role == "kv_producer"):
                try:
                    self._pd_peers = producer_peers(listen, len(placements))
                except kvtier.ConfigError:
                    if ktc.kv_role == "kv_producer":
                        raise
                    logger.warning(
                        "KVTierConnector: transport_listen %r has no fixed port; this kv_both instance "
                        "answers P/D prefill requests without kv_transfer_params (decode recomputes)",
                        listen,
                    )
        else:
            placement = ranks.worker_placement(vllm_config)
            self._rank = placement.rank
            namespace = _namespace(vllm_config, kv_cache_config, placement.rank)
            deployment = ranks.deployment_name(self._config, vllm_config, namespace.model)
            from kvtier.catalogue import catalogue_shm_name, reclaim_stale_catalogues

            # Catalogues of workers killed earlier (vLLM's shutdown kills its
            # workers) would otherwise pile up in /dev/shm.
            reclaimed = reclaim_stale_catalogues()
            if reclaimed:
                logger.info("KVTierConnector: removed %d shared catalogue(s) left by dead processes", reclaimed)
            config = dataclasses.replace(
                self._config, disk_path=ranks.rank_disk_path(self._config.disk_path, placement)
            )
            self._registry_key, self.engine = registry.acquire(
                config,
                namespace,
                catalogue_shm_name=catalogue_shm_name(deployment, placement.rank, placement.world_size),
            )
            if self._config.controller_listen:
                # This rank's controller API on PORT + rank (docs/controller.md);
                # a port in use or an open bind without a token fails start-up.
                from kvtier.controller import start_for_vllm_worker

                try:
                    self._controller = start_for_vllm_worker(self.engine, self._config, vllm_config, placement.rank)
                except BaseException:
                    registry.release(self._registry_key)
                    raise
        self._stats = KVTierConnectorStats()
        self._stats_lock = threading.Lock()
        # Never reset (vLLM drains _stats every step): for benchmarks/demo.
        self.totals: dict[str, float] = dict.fromkeys(_COUNTERS, 0)

        # Scheduler state.
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: list[LoadSpec] = []
        self._lookup_local: dict[str, int] = {}
        # Requests whose promised prefix needs the remote tier.
        self._needs_remote: set[str] = set()
        self._remote_tried: set[str] = set()
        # P/D decode: requests whose promised prefix is pulled from a
        # prefill instance (one attempt each, like the remote tier's).
        self._needs_peer: dict[str, PeerSource] = {}
        self._pd_tried: set[str] = set()
        self._pd_refused_logged = False
        # Requests counted in unsupported_requests (once each); logged once.
        self._unsupported: set[str] = set()
        self._unsupported_logged = False
        # LoRA adapters' digests, taken once per adapter for this engine's life.
        self._adapter_digests: AdapterDigests = {}

        # Worker state.
        self._async_loads: dict[str, tuple[Any, LoadSpec, float]] = {}
        # GPU: loads enqueued on the forward's stream (no host wait); each
        # handle pins its chunks until the copy is done, then is dropped.
        self._stream_loads: list[Any] = []
        self._saves_in_flight: dict[str, list[tuple[Any, float]]] = {}
        self._saved_reqs: set[str] = set()
        self._finished_waiting: set[str] = set()
        self._load_errors: set[int] = set()
        self._finished_recving: set[str] = set()
        # P/D decode: pulls from peers run here, off the forward's thread.
        self._pull_pool: ThreadPoolExecutor | None = None
        # Layer-wise transfer (CPU): layer name -> index in the registered
        # caches; this step's load (with its specs) and store signal.
        self._layer_index: dict[str, int] = {}
        self._layer_load: tuple[Any, list[LoadSpec]] | None = None
        self._layer_signal: Any = None
        self._layers_reported: set[int] = set()
        self._layerwise_store_broken = False

    # ------------------------------------------------------------ metrics

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for key, delta in deltas.items():
                self._stats.data[key] = self._stats.data.get(key, 0) + delta
                self.totals[key] = self.totals.get(key, 0) + delta

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            out = self._stats
            self._stats = KVTierConnectorStats()
        if self.role == KVConnectorRole.WORKER:
            # Per rank, the engine's stats() as is (kvtier/vllm/metrics.py
            # exports them); the workers' stats are merged, latest wins.
            out.data[f"engine.r{self._rank}"] = self.engine.stats()
        return out

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """layerwise: true needs vLLM's PIECEWISE CUDA graphs on a GPU (vLLM
        asks this and overrides a FULL mode): wait_for_layer_load and
        save_kv_layer run around each attention layer, between the graph's
        pieces. A full graph replays the layers without them, so a layer
        would read KV still in flight and a store would never hear of its
        layers."""
        return (extra_config or {}).get("layerwise") is True

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVTierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        """kvtier_* metrics on vLLM's /metrics (kvtier/vllm/metrics.py)."""
        from kvtier.vllm.metrics import KVTierPromMetrics

        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues, _COUNTERS)

    # ------------------------------------------------------------ scheduler

    def _request_extras(self, request: Request) -> dict[str, Any] | None | Unsupported:
        """request_key_extras, counting and logging an unsupported request."""
        extras = request_key_extras(request, self._adapter_digests)
        if isinstance(extras, Unsupported) and request.request_id not in self._unsupported:
            self._unsupported.add(request.request_id)
            self._count(unsupported_requests=1)
            if not self._unsupported_logged:
                self._unsupported_logged = True
                logger.warning(
                    "KVTierConnector: request %s is neither looked up nor stored (%s); "
                    "further such requests are only counted in unsupported_requests",
                    request.request_id,
                    extras.reason,
                )
        return extras

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self._loads_enabled:
            return 0, False
        # vLLM sets request.num_computed_tokens only after allocation, so the
        # local prefix length the load must skip is remembered here.
        extras = self._request_extras(request)
        if isinstance(extras, Unsupported):
            return 0, False
        self._lookup_local[request.request_id] = num_computed_tokens
        tokens = request.all_token_ids
        source = self._peer_source(request)
        if source is not None:
            return self._match_from_peer(request, source, extras, num_computed_tokens)
        # vLLM samples from the last token's logits, so it must compute it.
        if self._view.has_remote and request.request_id not in self._remote_tried:
            # Past every rank's local prefix, the remote tier (one pipelined
            # round trip, bounded by remote_timeout_ms). A prefix that needs
            # the remote loads asynchronously: the request waits in
            # WAITING_FOR_REMOTE_KVS while its workers fetch, and a slow
            # remote never holds up the step of the other requests.
            total, local = self._view.lookup_with_remote(tokens, extras=key_extras(extras))
            hit = min(total, len(tokens) - 1)
            needs_remote = hit > local
        else:
            hit = min(int(self._view.lookup(tokens, extras=key_extras(extras))), len(tokens) - 1)
            needs_remote = False
        external = hit - num_computed_tokens
        if external <= 0:
            self._needs_remote.discard(request.request_id)
            return 0, False
        if needs_remote:
            self._needs_remote.add(request.request_id)
            # One remote attempt per request: a load that fails (remote gone
            # or slow) sends the request back here, and it then takes what
            # the attempt filed locally and recomputes the rest instead of
            # waiting on the remote again.
            self._remote_tried.add(request.request_id)
        else:
            self._needs_remote.discard(request.request_id)
        return external, self._async_load or needs_remote

    def _peer_source(self, request: Request) -> PeerSource | None:
        """The prefill instance holding this request's KV, from its
        kv_transfer_params; None when there is none, it was tried already
        (what it filed locally is then a local hit), or it is refused."""
        if request.request_id in self._pd_tried:
            return None
        parsed = parse_peer_source(request.kv_transfer_params)
        if parsed is None:
            return None
        reason = parsed if isinstance(parsed, str) else None
        if isinstance(parsed, PeerSource):
            if not self._transport:
                reason = "this instance has transport: none"
            elif parsed.namespace != self._pd_namespace:
                reason = "the producer's namespace differs (model, dtype, layout, parallel size or chunk size)"
            elif len(parsed.peers) != self._world_size:
                reason = f"{len(parsed.peers)} producer ranks for {self._world_size} here"
        if reason is None:
            assert isinstance(parsed, PeerSource)
            return parsed
        self._pd_tried.add(request.request_id)
        self._count(pd_params_refused=1)
        if not self._pd_refused_logged:
            self._pd_refused_logged = True
            logger.warning(
                "KVTierConnector: request %s's kv_transfer_params are not used (%s); it is computed "
                "here. Further refusals are only counted in pd_params_refused",
                request.request_id,
                reason,
            )
        return None

    def _match_from_peer(
        self, request: Request, source: PeerSource, extras: dict[str, Any] | None, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = request.all_token_ids
        local = int(self._view.lookup(tokens, extras=key_extras(extras)))
        # vLLM samples from the last token's logits, so it must compute it.
        hit = min(max(source.tokens, local), len(tokens) - 1)
        external = hit - num_computed_tokens
        if external <= 0:
            return 0, False
        if source.tokens <= local:
            return external, self._async_load  # all of it here already
        self._needs_peer[request.request_id] = source
        return external, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._reqs.setdefault(request.request_id, _ReqState(request=request))
        if not self._loads_enabled:
            return
        local = self._lookup_local.pop(request.request_id, None)
        remote = request.request_id in self._needs_remote
        self._needs_remote.discard(request.request_id)
        source = self._needs_peer.pop(request.request_id, None)
        if num_external_tokens <= 0:
            if local is not None:
                self._count(lookups=1, miss_requests=1, query_tokens=max(len(request.all_token_ids) - local, 0))
            return
        extras = self._request_extras(request)
        if isinstance(extras, Unsupported):  # the lookup promised nothing
            return
        if source is not None:
            # One pull per request: if it fails the request comes back to
            # get_num_new_matched_tokens and takes what the pull filed
            # locally, recomputing the rest.
            self._pd_tried.add(request.request_id)
        block_ids = list(blocks.get_block_ids()[0])
        state.block_ids = block_ids
        local = local or 0
        need = local + num_external_tokens
        tokens = np.asarray(request.all_token_ids, dtype=np.int64)
        self._pending_loads.append(
            LoadSpec(
                req_id=request.request_id,
                tokens=tokens,
                slots=slot_mapping(block_ids, self._block_size, len(tokens)),
                skip_tokens=local,
                need_tokens=need,
                block_ids=block_ids,
                is_async=self._async_load or remote or source is not None,
                extras=extras,
                remote=remote and source is None,
                peers=source.peers if source is not None else (),
            )
        )
        if remote:
            self._count(remote_lookups=1)
        self._count(lookups=1, hit_requests=1, hit_tokens=num_external_tokens,
                    query_tokens=max(len(tokens) - local, 0))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVTierConnectorMetadata(
            loads=self._pending_loads,
            preempted=set(scheduler_output.preempted_req_ids or ()),
        )
        self._pending_loads = []
        for new_req in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new_req.req_id)
            if state is None:
                continue
            state.block_ids = list(new_req.block_ids[0])
            end = new_req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(
                new_req.req_id, 0
            )
            self._maybe_save(meta, state, end)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # After preemption vLLM sends the request's whole block list.
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            end = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(
                req_id, 0
            )
            self._maybe_save(meta, state, end)
        return meta

    def _maybe_save(self, meta: KVTierConnectorMetadata, state: _ReqState, end: int) -> None:
        if not self._saves_enabled:
            return
        prompt_len = state.request.num_prompt_tokens
        end = min(end, prompt_len)
        # Mid-prompt only whole chunks are final; at the prompt's end the
        # engine decides (partial_chunks) whether the tail is kept.
        if end < prompt_len:
            end -= end % self._chunk_size
        if end <= state.saved_tokens:
            return
        extras = self._request_extras(state.request)
        if isinstance(extras, Unsupported):
            return
        tokens = np.asarray(state.request.all_token_ids[:end], dtype=np.int64)
        meta.saves.append(
            SaveSpec(
                req_id=state.request.request_id,
                tokens=tokens,
                slots=slot_mapping(state.block_ids, self._block_size, end),
                skip_tokens=state.saved_tokens - state.saved_tokens % self._chunk_size,
                extras=extras,
                hold=end >= prompt_len and self._is_pd_prefill(state.request),
            )
        )
        state.saved_tokens = end
        state.has_save = True

    def _is_pd_prefill(self, request: Request) -> bool:
        """A P/D prefill request (vLLM's convention: the router marks it
        do_remote_decode) on an instance that can serve its KV to peers."""
        params = request.kv_transfer_params
        return bool(self._pd_peers and isinstance(params, dict) and params.get("do_remote_decode"))

    def _pd_params(self, request: Request) -> dict[str, Any] | None:
        """kv_transfer_params naming this producer, for the decode instance."""
        from vllm.v1.request import RequestStatus

        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return None  # aborted: nothing was held
        extras = self._request_extras(request)
        if isinstance(extras, Unsupported):
            return None
        prompt = request.all_token_ids[: request.num_prompt_tokens]
        # The worker stored and held the prompt's chunks before this step's
        # output left it (wait_for_save), so every rank's catalogue has them.
        held = min(int(self._view.lookup(prompt, extras=key_extras(extras))), request.num_prompt_tokens)
        if held <= 0:
            return None
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "kvtier": {"version": PD_VERSION, "peers": list(self._pd_peers), "namespace": self._pd_namespace,
                       "tokens": held},
        }

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._lookup_local.pop(request.request_id, None)
        self._needs_remote.discard(request.request_id)
        self._remote_tried.discard(request.request_id)
        self._needs_peer.pop(request.request_id, None)
        self._pd_tried.discard(request.request_id)
        self._unsupported.discard(request.request_id)
        state = self._reqs.pop(request.request_id, None)
        params = self._pd_params(request) if state is not None and self._is_pd_prefill(request) else None
        # The worker reports finished_sending for exactly these requests.
        return bool(state is not None and state.has_save), params

    # ------------------------------------------------------------ worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        tensors = list(kv_caches.values())
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        if self._cpu:
            self.engine.register_kv_caches([_cpu_block_view(t) for t in tensors], kind="flash_infer")
        else:
            self.engine.register_kv_caches(tensors)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._reap_stream_loads()
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        if self._layerwise:
            self._start_layerwise_load([spec for spec in meta.loads if not spec.is_async])
        for spec in meta.loads:
            if self._layerwise and not spec.is_async:
                continue
            started = time.perf_counter()
            if spec.is_async:
                try:
                    if spec.peers:
                        handle = self._start_pull(spec)
                    else:
                        handle = self.engine.retrieve_async(
                            spec.tokens,
                            spec.slots,
                            skip_tokens=spec.skip_tokens,
                            extras=key_extras(spec.extras),
                            fetch_remote=spec.remote,
                        )
                except Exception:
                    logger.exception("kvtier retrieve_async failed for %s", spec.req_id)
                    self._finish_load(spec, 0, started)
                    self._finished_recving.add(spec.req_id)
                    continue
                self._async_loads[spec.req_id] = (handle, spec, started)
                continue
            try:
                extras = key_extras(spec.extras)
                if self._cpu:
                    loaded = int(
                        self.engine.retrieve(spec.tokens, spec.slots, skip_tokens=spec.skip_tokens, extras=extras)
                    )
                else:
                    # Ordered before the forward on the current stream; the
                    # count is known now, the copy completes on the GPU.
                    handle = self.engine.retrieve_on_stream(
                        spec.tokens, spec.slots, skip_tokens=spec.skip_tokens, extras=extras
                    )
                    loaded = int(handle.valid_tokens)
                    self._stream_loads.append(handle)
            except Exception:
                logger.exception("kvtier retrieve failed for %s", spec.req_id)
                loaded = 0
            self._finish_load(spec, loaded, started)

    def _start_pull(self, spec: LoadSpec) -> Future[int]:
        if self._pull_pool is None:
            self._pull_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvtier-pd-pull")
        return self._pull_pool.submit(self._pull_and_load, spec)

    def _pull_and_load(self, spec: LoadSpec) -> int:
        """P/D decode, on a pull thread: bring the chunks past the local
        prefix from this rank's peer into the CPU tier, then load the
        prefix. Tokens short of the promise are reported by _finish_load
        (get_finished) and recomputed by vLLM."""
        extras = key_extras(spec.extras)
        cached = 0
        peer = spec.peers[self._rank] if self._rank < len(spec.peers) else ""
        try:
            cached = int(self.engine.pull_from_peer(peer, spec.tokens, extras=extras))
        except Exception:  # the transport answers a dead peer with a miss; anything else is one too
            logger.exception("kvtier: pull of %s from %s failed", spec.req_id, peer)
        self._count(pd_pulls=1)
        if cached < spec.need_tokens:
            self._count(pd_pull_failures=1)
            logger.warning(
                "kvtier: %s: the prefill instance %s gave %d of %d tokens; vLLM recomputes the rest",
                spec.req_id,
                peer,
                cached,
                spec.need_tokens,
            )
        return int(
            self.engine.retrieve_async(spec.tokens, spec.slots, skip_tokens=spec.skip_tokens, extras=extras).result()
        )

    def _reap_stream_loads(self) -> None:
        """Drop finished GPU loads (releasing their chunks); log any that failed on the GPU."""
        pending = []
        for handle in self._stream_loads:
            if not handle.done():
                pending.append(handle)
                continue
            try:
                handle.wait()  # returns at once; raises if the copy failed
            except Exception:
                logger.exception("kvtier: a GPU load failed after it was enqueued")
                self._count(load_errors=1)
        self._stream_loads = pending

    def _finish_load(self, spec: LoadSpec, loaded: int, started: float) -> None:
        loaded = max(loaded, spec.skip_tokens)
        self._count(
            tokens_loaded=max(0, min(loaded, spec.need_tokens) - spec.skip_tokens),
            load_seconds=time.perf_counter() - started,
        )
        if loaded >= spec.need_tokens:
            return
        self._mark_blocks_failed(spec, loaded)
        self._count(load_errors=1)
        logger.info(
            "kvtier: %s loaded %d of %d tokens; vLLM recomputes the rest",
            spec.req_id,
            loaded,
            spec.need_tokens,
        )

    # ------------------------------------------------------------ layer-wise
    #
    # Ordering contract (layerwise: true), per forward pass. On the CPU:
    # - loads: start_load_kv leases every synchronous load's prefix and a
    #   thread scatters it layer by layer; wait_for_layer_load(layer l), which
    #   vLLM calls before layer l's attention, returns once layer l of every
    #   load is in the paged KV, so layer l+1's copy overlaps layer l's
    #   compute. wait_for_save waits for the rest before the step ends.
    # - stores: the first save_kv_layer of the pass (vLLM calls it after each
    #   layer's attention, whose KV is then written) starts the step's stores
    #   on a LayerSignal; each save_kv_layer(layer l) lets them copy layer l.
    #   wait_for_save ends the pass: when every registered layer was reported
    #   the stores complete; otherwise (the pass failed part-way, or a layer
    #   never reports) they are aborted and store nothing, so a layer that was
    #   never written is never stored. A model whose layers do not all report
    #   falls back to whole-chunk stores (logged once).
    # On a GPU the same calls order the forward's stream, and no host thread
    # waits for the GPU: the load's layers are enqueued on a stream of its
    # own, after the work already on the forward's stream, each followed by
    # an event; wait_for_layer_load(l) makes the forward's stream wait for
    # layer l's event. save_kv_layer(l) records an event on the forward's
    # stream, and the stores gather layer l on their own streams once it has
    # completed. wait_for_save orders the forward's stream after the last
    # layer of the load, whose chunks are released once the GPU is done with
    # them (_reap_stream_loads, as for whole-chunk GPU loads).

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._layer_signal = None
        self._layers_reported = set()

    def _start_layerwise_load(self, specs: list[LoadSpec]) -> None:
        self._finish_layerwise_load()  # a previous step's, if its pass had no layers
        if not specs:
            return
        started = time.perf_counter()
        try:
            handle = self.engine.load_layerwise(
                [(spec.tokens, spec.slots, spec.skip_tokens, key_extras(spec.extras)) for spec in specs]
            )
        except Exception:
            logger.exception("kvtier layer-wise load failed to start")
            for spec in specs:
                self._finish_load(spec, 0, started)
            return
        for spec, valid in zip(specs, handle.valid_tokens, strict=True):
            self._finish_load(spec, int(valid), started)
        self._layer_load = (handle, specs)
        self._count(layerwise_loads=len(specs))

    def _mark_blocks_failed(self, spec: LoadSpec, valid_tokens: int) -> None:
        """Reports to vLLM (get_block_ids_with_load_errors) every block of the
        load from the one holding token valid_tokens on: it recomputes them."""
        first = valid_tokens // self._block_size
        last = (spec.need_tokens - 1) // self._block_size
        self._load_errors.update(spec.block_ids[first : last + 1])

    def _fail_layerwise_load(self, specs: list[LoadSpec]) -> None:
        """A scatter failed after the counts were reported: every block the
        load was to fill is reported to vLLM, which recomputes it."""
        for spec in specs:
            self._mark_blocks_failed(spec, spec.skip_tokens)
        self._count(load_errors=1)

    def _finish_layerwise_load(self) -> None:
        if self._layer_load is None:
            return
        handle, specs = self._layer_load
        self._layer_load = None
        try:
            if self._cpu:
                handle.wait()
            else:
                # The forward's stream waits for the last layer (so for all);
                # the chunks stay leased until the GPU is done with them.
                handle.wait_layer(len(self._layer_index) - 1)
                self._stream_loads.append(handle)
        except Exception:
            logger.exception("kvtier layer-wise load failed")
            self._fail_layerwise_load(specs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layer_load is None:
            return
        index = self._layer_index.get(layer_name)
        if index is None:
            return
        handle, specs = self._layer_load
        try:
            handle.wait_layer(index)
        except Exception:
            logger.exception("kvtier layer-wise load failed at %s", layer_name)
            self._layer_load = None
            self._fail_layerwise_load(specs)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        if not self._layerwise or self._layerwise_store_broken:
            return
        index = self._layer_index.get(layer_name)
        if index is None:
            return
        if self._layer_signal is None:
            meta = self._get_connector_metadata()
            assert isinstance(meta, KVTierConnectorMetadata)
            if not meta.saves:
                return
            self._layer_signal = self.engine.layer_signal(len(self._layer_index), LAYERWISE_TIMEOUT_MS)
            self._issue_saves(meta.saves, self._layer_signal)
            self._count(layerwise_store_passes=1)
        self._layers_reported.add(index)
        self._layer_signal.layer_ready(index)

    def _issue_saves(self, saves: list[SaveSpec], signal: Any = None) -> None:
        for spec in saves:
            started = time.perf_counter()
            # The scheduler delays the free of every request it scheduled a
            # save for, so record it even if the store fails right away.
            self._saved_reqs.add(spec.req_id)
            try:
                extras = key_extras(spec.extras)
                if signal is None:
                    handle = self.engine.store(spec.tokens, spec.slots, skip_tokens=spec.skip_tokens, extras=extras)
                else:
                    handle = self.engine.store_layerwise(
                        spec.tokens, spec.slots, spec.skip_tokens, signal, extras=extras
                    )
            except Exception:  # a failed save is only a future miss
                logger.exception("kvtier store failed for %s", spec.req_id)
                continue
            self._saves_in_flight.setdefault(spec.req_id, []).append((handle, started))
            self._count(save_requests=1)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, KVTierConnectorMetadata)
        for req_id in kv_connector_metadata.preempted:
            # vLLM is about to hand these blocks to other requests.
            for handle, _ in self._saves_in_flight.pop(req_id, []):
                self._wait_store(handle)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        # The pass is over: loads still copying must finish before the step ends.
        self._finish_layerwise_load()
        signal, self._layer_signal = self._layer_signal, None
        if signal is None:
            self._issue_saves(meta.saves)
            self._hold_for_peers(meta.saves)
            return
        missing = set(range(len(self._layer_index))) - self._layers_reported
        if not missing:
            signal.all_ready()
            self._hold_for_peers(meta.saves)
            return
        # Some layer's KV may never have been written: store nothing of it.
        signal.abort()
        self._hold_for_peers(meta.saves)
        self._count(layerwise_stores_aborted=len(meta.saves))
        names = sorted((n for n, i in self._layer_index.items() if i in missing), key=self._layer_index.__getitem__)
        if not self._layerwise_store_broken:
            self._layerwise_store_broken = True
            logger.warning(
                "KVTierConnector: the forward pass did not report layers %s to save_kv_layer; this step's "
                "layer-wise stores were aborted and later steps store whole chunks after the pass",
                ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""),
            )

    def _hold_for_peers(self, saves: list[SaveSpec]) -> None:
        """P/D prefill: the decode instance asks for the chunks as soon as
        this step's output leaves (the request finished with its one
        token), so its stores complete here, before the step ends, and the
        chunks are held for a peer for producer_pin_seconds."""
        for spec in saves:
            if not spec.hold:
                continue
            for handle, started in self._saves_in_flight.pop(spec.req_id, []):
                self._wait_store(handle, started)
            try:
                held = int(
                    self.engine.hold_for_peer(spec.tokens, extras=key_extras(spec.extras), seconds=self._pin_seconds)
                )
            except Exception:  # the decode instance then recomputes
                logger.exception("kvtier: holding %s for a peer failed", spec.req_id)
                continue
            self._count(pd_holds=1, pd_chunks_held=held)

    def _wait_store(self, handle: Any, started: float | None = None) -> None:
        try:
            chunks = handle_result(handle)
        except Exception:
            logger.exception("kvtier store failed")
            return
        self._count(chunks_saved=chunks)
        if started is not None:
            self._count(save_seconds=time.perf_counter() - started)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Saves: reap completed handles; report requests vLLM holds for us.
        self._finished_waiting |= finished_req_ids & self._saved_reqs
        for req_id in list(self._saves_in_flight):
            pending = []
            for handle, started in self._saves_in_flight[req_id]:
                if handle.done():
                    self._wait_store(handle, started)
                else:
                    pending.append((handle, started))
            if pending:
                self._saves_in_flight[req_id] = pending
            else:
                del self._saves_in_flight[req_id]
        sending = {r for r in self._finished_waiting if r not in self._saves_in_flight}
        self._finished_waiting -= sending
        self._saved_reqs -= sending

        # Async loads.
        recving, self._finished_recving = self._finished_recving, set()
        for req_id, (handle, spec, started) in list(self._async_loads.items()):
            if not handle.done():
                continue
            del self._async_loads[req_id]
            try:
                loaded = handle_result(handle)
            except Exception:
                logger.exception("kvtier async load failed for %s", req_id)
                loaded = 0
            self._finish_load(spec, loaded, started)
            recving.add(req_id)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._controller is not None:  # first: no API call during teardown
            self._controller.stop()
            self._controller = None
        if self._layer_signal is not None:
            self._layer_signal.abort()
            self._layer_signal = None
        self._finish_layerwise_load()
        for handles in self._saves_in_flight.values():
            for handle, _ in handles:
                self._wait_store(handle)
        self._saves_in_flight.clear()
        if self._pull_pool is not None:
            self._pull_pool.shutdown(wait=True, cancel_futures=True)
            self._pull_pool = None
        if self._registry_key is not None:
            registry.release(self._registry_key)
