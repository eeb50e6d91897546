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
