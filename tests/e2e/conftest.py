"""Shared fixtures for the end-to-end suite (real vLLM on CPU, real kvtier).

vLLM's environment must be set before it is imported, hence the early
`setup_env()`. One process can hold only one vLLM engine at a time (vLLM keeps
the KV connector in a global), so the suite builds them one after another:
first the no-connector reference, then the kvtier engine.
"""

from __future__ import annotations

import os

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
    """Fails where the extension has no engine: a missing engine must not pass
    as a skipped suite. KVTIER_ALLOW_NO_ENGINE=1 turns it into a skip for
    working on the pure-Python parts alone."""
    error = _engine_import_error()
    if error is not None:
        if os.environ.get("KVTIER_ALLOW_NO_ENGINE") == "1":
            pytest.skip(error)
        pytest.fail(error)
