"""kvtier.CatalogueView: every rank's catalogue, read from shared memory.

A worker engine created with ``catalogue_shm_name`` keeps its catalogue in a
POSIX shared-memory object. A process that must know what the workers hold
without asking them (the vLLM scheduler) maps those objects read-only and
asks how long a prefix of a prompt every rank holds. The answer is a hint:
a worker re-checks each chunk when it loads, so a stale answer costs a miss,
never wrong KV. See cc/engine/catalogue_view.h for the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvtier.config import Config, load_config
from kvtier.engine import KeyExtras, Namespace, _extras, _kvtier, _tokens

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CatalogueView", "catalogue_shm_name", "reclaim_stale_catalogues"]


def catalogue_shm_name(deployment: str, rank: int, world_size: int) -> str:
    """The shm name of ``rank``'s catalogue in ``deployment`` (any string
    every process of the deployment derives alike; it is hashed)."""
    return str(_kvtier.catalogue_shm_name(str(deployment), int(rank), int(world_size)))


def reclaim_stale_catalogues() -> int:
    """Unlinks this user's shared catalogues whose owner process is gone
    (vLLM's shutdown kills its workers before they can unlink theirs).
    Live owners' catalogues are left alone. Returns how many went."""
    return int(_kvtier.reclaim_stale_catalogues())


class CatalogueView:
    """``CatalogueView([(shm_name, namespace), ...], config)``: one entry per
    rank, each the name and namespace that rank's Engine was created with;
    ``config`` supplies chunk_size, partial_chunks and the ``namespace`` key
    exactly as the engines saw them. Ranks need not exist yet: a rank whose
    catalogue is missing counts 0 and is looked for again once a second."""

    def __init__(
        self,
        ranks: Sequence[tuple[str, Namespace]],
        config: Config | dict[str, Any] | None = None,
        *,
        recheck_ms: int = 1000,
    ) -> None:
        if not isinstance(config, Config):
            config = load_config(config)
        native = [
            (
                str(name),
                {
                    "model": ns.model,
                    "dtype": ns.dtype,
                    "layout": ns.layout,
                    "rank": int(ns.rank),
                    "world_size": int(ns.world_size),
                    "namespace": config.namespace,
                },
            )
            for name, ns in ranks
        ]
        remote: dict[str, Any] = {}
        if config.remote_enabled:
            options = config.to_native()
            remote = {k: options[k] for k in ("remote_url", "remote_timeout_ms", "remote_username",
                                               "remote_password", "remote_tls_ca_file")}
        self._native = _kvtier.CatalogueView(
            native, int(config.chunk_size), str(config.partial_chunks), int(recheck_ms), remote
        )

    @property
    def num_ranks(self) -> int:
        return int(self._native.num_ranks)

    def lookup(self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        """Leading tokens of ``tokens`` cached on every rank."""
        return int(self._native.lookup(_tokens(tokens), extras=_extras(extras)))

    @property
    def has_remote(self) -> bool:
        return bool(self._native.has_remote)

    def lookup_with_remote(
        self, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None
    ) -> tuple[int, int]:
        """(tokens cached as a prefix on every rank, locally or past that in
        the remote tier; of which cached locally). Without a remote tier
        both are lookup()."""
        total, local = self._native.lookup_with_remote(_tokens(tokens), extras=_extras(extras))
        return int(total), int(local)

    def lookup_rank(self, rank: int, tokens: Sequence[int] | np.ndarray, *, extras: KeyExtras | None = None) -> int:
        """Leading tokens cached on one rank (0 for an unknown rank)."""
        return int(self._native.lookup_rank(int(rank), _tokens(tokens), extras=_extras(extras)))

    def ranks_open(self) -> int:
        """Ranks whose catalogue is mapped now."""
        return int(self._native.ranks_open())
