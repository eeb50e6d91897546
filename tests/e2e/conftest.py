"""Shared fixtures for the end-to-end suite (real vLLM on CPU, real kvtier).

vLLM's environment must be set before it is imported, hence the early
`setup_env()`. One process can hold only one vLLM engine at a time (vLLM keeps
the KV connector in a global), so the suite builds them one after another:
first the no-connector reference, then the kvtier engine.
"""

from __future__ import annotations

from kvtier.testing.vllm_runner import setup_env

setup_env()

import pytest
from kvtier.testing.model import make_model


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(make_model())


def _engine_import_error() -> str | None:
    try:
        import kvtier.engine  # noqa: F401  (loads the native extension)
    except (ImportError, AttributeError) as exc:
        return f"kvtier's native engine is not available: {exc}"
    return None


@pytest.fixture(scope="session")
def native_engine() -> None:
    """Skips (with the reason) where the extension has no engine bindings."""
    error = _engine_import_error()
    if error is not None:
        pytest.skip(error)
