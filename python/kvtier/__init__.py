"""kvtier: a tiered KV-cache layer for LLM inference engines.

``import kvtier`` needs no third-party package and no native module: the
configuration is pure Python, and :class:`Engine` (which loads the ``_kvtier``
extension) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvtier._version import __version__
from kvtier.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from kvtier.catalogue import CatalogueView
    from kvtier.engine import Engine, KeyExtras, Namespace

__all__ = [
    "CatalogueView",
    "Config",
    "ConfigError",
    "Engine",
    "KeyExtras",
    "LayerSignal",
    "Namespace",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    # Lazy so that `import kvtier` works without the extension (and before
    # kvtier.engine exists); the import error surfaces where Engine is used.
    if name in ("Engine", "KeyExtras", "LayerSignal", "Namespace"):
        from kvtier import engine

        return getattr(engine, name)
    if name == "CatalogueView":
        from kvtier import catalogue

        return catalogue.CatalogueView
    raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
