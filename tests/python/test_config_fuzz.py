"""Fuzz smoke of the configuration loader (issue 13, FUZZING.md).

``kvtier.load_config`` reads a YAML file (``KVTIER_CONFIG``), ``KVTIER_<KEY>``
variables and an overrides mapping (vLLM's ``kv_connector_extra_config``,
JSON). Whatever they hold, the only exception it may raise is
:class:`kvtier.ConfigError` (a message naming the key); anything else would
reach the user as a traceback from inside kvtier. A loaded configuration
must also survive ``describe()`` and ``to_native()``, which the engine calls
next, under the same rule.

Inputs are built by :func:`build_case` from a stream of small choices, so
the same grammar serves two drivers: ``random.Random`` with a fixed seed here
(deterministic, a few seconds, no extra package), and atheris's coverage
guidance in ``tools/config_fuzz_atheris.py`` (``tools/fuzz.sh``). Inputs that
once escaped as another exception are kept in ``REGRESSIONS``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kvtier
import pytest
from kvtier.config import KEYS

# pick(n) -> an int in [0, n). Random or atheris-driven.
Pick = Callable[[int], int]

_SIZES = ["0", "1", "4KiB", "16MiB", "64MiB", "1.5 GiB", "20GB", "1TB", "1024TiB", "99999999TB", ".5MiB",
          "1e3", "-1", "1.", " 8 MiB ", "0x10", "NaN", "inf", "١٢", "1" * 5000, "9" * 40 + "TiB"]
_NUMBERS: list[object] = [0, 1, -1, 16, 256, 65536, 65537, 2**31, 2**63, 2**64 + 1, 10**400, -(10**400), 0.5,
                          1.0, 0.9, 1e308, -0.0, math.inf, -math.inf, math.nan, 1e-320]
_WORDS = ["", "none", "None", "true", "false", "yes", "off", "auto", "on", "keep", "drop", "s3fifo", "lru",
          "debug", "batch", "always", "redis://h:6379", "rediss://:p@h:1/2", "redis+cluster://a:1,b:2",
          "redis://", "redis://@", "redis://u:p@", "redis://[::1", "~", "~nouser/x", "/tmp/kvtier-fuzz",
          "a\x00b", "\udcff", "é" * 3, " ", "\t", "\n", "{", "*", "&", "!!python/object:os.system"]
_KEY_NOISE = ["", "chunk", "chunk_sizee", "CHUNK_SIZE", "disk-path", "kvtier_config", "cpu_capacity ", "é",
              "__class__", "0", "true"]
_YAML_SNIPPETS = ["{", "[", "- ", ": ", "&a ", "*a", "<<: *a\n", "!!binary ", "!!python/tuple [1]",
                  "? ", "---\n", "...\n", "%YAML 1.1\n", "\t", "'", '"', "#", "|\n  ", ">\n  ", "\x00",
                  "\xef\xbb\xbf", "!!int ", "!!float ", "0o17", "1_000", ".inf", ".nan", "~"]


@dataclass
class Case:
    """One input: the YAML file's bytes (None: no file), the environment
    and the overrides."""

    yaml_bytes: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    overrides: dict[object, object] = field(default_factory=dict)


def _scalar(pick: Pick) -> object:
    kind = pick(6)
    if kind == 0:
        return _SIZES[pick(len(_SIZES))]
    if kind == 1:
        return _NUMBERS[pick(len(_NUMBERS))]
    if kind == 2:
        return _WORDS[pick(len(_WORDS))]
    if kind == 3:
        return bool(pick(2))
    if kind == 4:
        return None
    return "".join(chr(pick(0x250)) for _ in range(pick(12)))


def _value(pick: Pick, depth: int = 0) -> object:
    kind = pick(10)
    if kind == 8 and depth < 3:
        return [_value(pick, depth + 1) for _ in range(pick(4))]
    if kind == 9 and depth < 3:
        return {str(_scalar(pick)): _value(pick, depth + 1) for _ in range(pick(3))}
    return _scalar(pick)


def _key(pick: Pick) -> str:
    return KEYS[pick(len(KEYS))] if pick(8) else _KEY_NOISE[pick(len(_KEY_NOISE))]


def _yaml_scalar(v: object) -> str:
    if isinstance(v, str):
        return repr(v) if v and v.isprintable() else '"' + v.encode("unicode_escape").decode("ascii") + '"'
    if isinstance(v, float):
        return ".nan" if math.isnan(v) else (".inf" if v == math.inf else "-.inf" if v == -math.inf else repr(v))
    if v is None:
        return "~"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _yaml_text(pick: Pick) -> bytes:
    lines = []
    for _ in range(pick(6)):
        v = _value(pick)
        if isinstance(v, (list, dict)):
            text = "[" + ", ".join(_yaml_scalar(x) for x in (v if isinstance(v, list) else v.values())) + "]"
        else:
            text = _yaml_scalar(v)
        lines.append(f"{_key(pick)}: {text}")
    text = "\n".join(lines)
    # Structural damage: YAML syntax spliced in anywhere, or deep nesting.
    for _ in range(pick(3)):
        at = pick(len(text) + 1)
        text = text[:at] + _YAML_SNIPPETS[pick(len(_YAML_SNIPPETS))] + text[at:]
    if pick(64) == 0:  # rare: past ~1000 levels one input costs a second (REGRESSIONS pins that case)
        depth = 25 * (1 + pick(48))
        text += f"\n{_key(pick)}: " + "[" * depth + "]" * depth
    data = text.encode("utf-8", "surrogatepass")
    if pick(12) == 0:  # not UTF-8 at all
        data += bytes([0xFF, 0xFE, pick(256)])
    return data


def build_case(pick: Pick) -> Case:
    case = Case()
    if pick(2):
        case.yaml_bytes = _yaml_text(pick)
    for _ in range(pick(4)):
        name = "KVTIER_" + _key(pick).upper() if pick(6) else "KVTIER_" + _key(pick)
        value = _scalar(pick)
        case.env[name] = value if isinstance(value, str) else _yaml_scalar(value)
    for _ in range(pick(4)):
        k: object = _key(pick) if pick(10) else _scalar(pick)
        case.overrides[k] = _value(pick)  # type: ignore[index]  # an unhashable key is a TypeError of ours, not theirs
    return case


# Findings not fixed yet (FUZZING.md, "Findings"): their exception types are
# reported by run_case as KnownFinding, which the random test tolerates and
# the strict xfail regressions below would pin. Every finding so far is
# fixed (config.py turns them into ConfigError), so this is empty and the
# regressions must pass.
KNOWN_ESCAPES: dict[str, str] = {}


class KnownFinding(AssertionError):
    """An escape that KNOWN_ESCAPES describes."""


def _known(exc: BaseException) -> bool:
    if type(exc).__name__ in KNOWN_ESCAPES or str(exc) in KNOWN_ESCAPES:
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "yaml" in KNOWN_ESCAPES and tb is not None and f"{os.sep}yaml{os.sep}" in tb.tb_frame.f_code.co_filename


def run_case(case: Case, tmp: Path) -> None:
    """Loads `case`; raises AssertionError if anything but ConfigError escapes
    (KnownFinding for the types in KNOWN_ESCAPES)."""
    env: dict[str, str] = {k: v.replace("\x00", "") for k, v in case.env.items()}
    if case.yaml_bytes is not None:
        path = tmp / "kvtier.yaml"
        path.write_bytes(case.yaml_bytes)
        env["KVTIER_CONFIG"] = str(path)
    try:
        config = kvtier.load_config(case.overrides, environ=env)
        config.describe()
        config.to_native()
    except kvtier.ConfigError:
        pass
    except Exception as exc:  # the finding itself
        kind = KnownFinding if _known(exc) else AssertionError
        raise kind(f"{type(exc).__name__} escaped load_config: {exc!r:.300}\ninput: {case!r:.400}") from exc


# Inputs that escaped as another exception (FUZZING.md, "Findings").
REGRESSIONS: dict[str, Case] = {
    "float_key_given_a_huge_integer": Case(overrides={"cpu_high_watermark": 10**400}),
    "float_key_given_a_huge_integer_in_yaml": Case(yaml_bytes=b"ttl_seconds: " + b"9" * 400 + b"\n"),
    "deeply_nested_yaml": Case(yaml_bytes=b"chunk_size: " + b"[" * 2000 + b"]" * 2000 + b"\n"),
    "yaml_int_tag_on_a_word": Case(yaml_bytes=b"!!int gds: 1\n"),
    "yaml_empty_float_tag": Case(yaml_bytes=b"!!float "),
    "nul_in_password_file_path": Case(overrides={"remote_password_file": "a\x00b"}),
}


@pytest.fixture(autouse=True)
def _no_kvtier_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every case passes its own environ; the process's must not leak in
    # through anything that reads os.environ directly.
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression(name: str, tmp_path: Path) -> None:
    run_case(REGRESSIONS[name], tmp_path)


def test_random_inputs_raise_only_config_error(tmp_path: Path) -> None:
    rng = random.Random(13)
    cases = int(os.environ.get("KVTIER_CONFIG_FUZZ_CASES", "3000"))
    failures: list[str] = []
    for _ in range(cases):
        case = build_case(rng.randrange)
        try:
            run_case(case, tmp_path)
        except KnownFinding:
            continue
        except AssertionError as exc:
            failures.append(str(exc))
            if len(failures) >= 5:
                break
    assert not failures, "\n\n".join(failures)


def test_the_grammar_reaches_valid_configs(tmp_path: Path) -> None:
    # A fuzzer that only ever produces errors tests the error path alone.
    rng = random.Random(7)
    loaded = 0
    for _ in range(500):
        case = build_case(rng.randrange)
        env = dict(case.env)
        if case.yaml_bytes is not None:
            (tmp_path / "c.yaml").write_bytes(case.yaml_bytes)
            env["KVTIER_CONFIG"] = str(tmp_path / "c.yaml")
        try:
            kvtier.load_config(case.overrides, environ=env)
            loaded += 1
        except Exception:  # noqa: BLE001, S112  # counted, not judged, here
            continue
    assert loaded >= 10, f"only {loaded} of 500 generated inputs were valid configurations"
