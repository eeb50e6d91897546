#!/usr/bin/env python3
"""Coverage-guided fuzzing of the configuration loader with atheris.

    tools/fuzz.sh config                   # the usual way (installs atheris)
    PYTHONPATH=<atheris> python tools/config_fuzz_atheris.py -runs=100000 CORPUS

The input grammar and the rule ("only ConfigError may escape load_config,
describe and to_native") are those of tests/python/test_config_fuzz.py; here
atheris chooses every branch of the grammar from its mutated bytes instead of
a seeded random generator. Findings already recorded there (KNOWN_ESCAPES)
are skipped so that the run reaches new ones; anything else is a crash that
atheris saves as crash-<sha1>.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent

with atheris.instrument_imports():
    import kvtier.config  # noqa: F401  # instrumented for coverage before the test module imports it

_spec = importlib.util.spec_from_file_location("test_config_fuzz", ROOT / "tests/python/test_config_fuzz.py")
assert _spec is not None and _spec.loader is not None
grammar = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = grammar  # dataclasses look their module up there
_spec.loader.exec_module(grammar)

_TMP = Path(tempfile.mkdtemp(prefix="kvtier-config-fuzz-"))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)

    def pick(n: int) -> int:
        return fdp.ConsumeIntInRange(0, n - 1) if n > 1 else 0

    case = grammar.build_case(pick)
    try:
        grammar.run_case(case, _TMP)
    except grammar.KnownFinding:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
