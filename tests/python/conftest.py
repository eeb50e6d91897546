"""Shared pytest set-up for tests/python (and, in the same session, tests/e2e).

tools/test.sh runs these tests against the kvtier wheel installed in the venv,
so a test can never pass because it picked up python/kvtier from the source
tree instead. Set KVTIER_TEST_SOURCE_TREE=1 to run against a source checkout
on purpose (e.g. PYTHONPATH=python while iterating).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import kvtier
import pytest


def _installed_location() -> Path:
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("KVTIER_TEST_SOURCE_TREE") == "1":
        return
    package = Path(kvtier.__file__).resolve()
    site = _installed_location()
    if not (package.is_relative_to(site) or "site-packages" in package.parts):
        raise pytest.UsageError(
            f"kvtier was imported from {package}, not from the installed wheel in {site}; "
            "run tools/test.sh, or set KVTIER_TEST_SOURCE_TREE=1 to test the source tree")


def pytest_report_header(config: pytest.Config) -> str:
    return f"kvtier {kvtier.__version__} from {Path(kvtier.__file__).parent}"
