"""kvtier configuration: one frozen, validated :class:`Config` per process.

Precedence, lowest to highest:

1. the documented defaults (``docs/configuration.md``),
2. the YAML file named by ``KVTIER_CONFIG``,
3. environment variables ``KVTIER_<KEY>`` (key in upper case),
4. an explicit overrides mapping (e.g. vLLM's ``kv_connector_extra_config``).

Everything is checked once, at start-up: an unknown key fails with the
closest known key as a suggestion, a bad value fails naming the key, the value,
where it came from and what is allowed. A process never runs on a half-valid
configuration. Every size has a range, and cpu_capacity is also checked
against the memory this process may use (physical memory or its cgroup's
limit): refused above it, or clamped with a logged warning when
cpu_capacity_clamp is set.

Sizes accept plain integers (bytes) or a number with a unit: decimal units
(``kB``, ``MB``, ``GB``, ``TB``; powers of 10) and binary units (``KiB``,
``MiB``, ``GiB``, ``TiB``; powers of 2), so ``"20GB"`` is 20 * 10**9 bytes and
``"1.5 GiB"`` is 1.5 * 2**30 bytes.

PyYAML is imported only when a file is actually read, so ``import kvtier``
needs no third-party package.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "format_size",
    "load_config",
    "load_config_with_sources",
    "parse_size",
]

ENV_PREFIX = "KVTIER_"
ENV_CONFIG_FILE = "KVTIER_CONFIG"

_log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid kvtier configuration: unknown key, bad value or bad file."""


# --------------------------------------------------------------------------
# Sizes

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_SIZE_HELP = (
    "a byte count or a number with a unit: B, kB, MB, GB, TB (powers of 10) "
    "or KiB, MiB, GiB, TiB (powers of 2), e.g. 512MiB, 20GB, '1.5 GiB'"
)


def parse_size(value: object) -> int:
    """Parses a size in bytes. Raises ``TypeError`` / ``ValueError`` (not
    ConfigError: the caller adds the key) when the value is not a whole,
    non-negative size."""
    if isinstance(value, bool):
        raise TypeError(f"expected a size, got a boolean; {_SIZE_HELP}")
    if isinstance(value, int):
        number, scale = Decimal(value), 1
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite size; {_SIZE_HELP}")
        number, scale = Decimal(repr(value)), 1
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(f"not a size; {_SIZE_HELP}")
        unit = match.group(2).lower() or "b"
        if unit not in _SIZE_UNITS:
            raise ValueError(f"unknown unit {match.group(2)!r}; {_SIZE_HELP}")
        try:
            number = Decimal(match.group(1))
        except InvalidOperation as exc:  # the regex should make this unreachable
            raise ValueError(f"not a size; {_SIZE_HELP}") from exc
        scale = _SIZE_UNITS[unit]
    else:
        raise TypeError(f"expected a size, got {type(value).__name__}; {_SIZE_HELP}")
    total = number * scale
    if total < 0:
        raise ValueError("a size cannot be negative")
    if total != total.to_integral_value():
        raise ValueError(f"{total} is not a whole number of bytes")
    return int(total)


def format_size(n: int) -> str:
    """The shortest exact spelling: '4GiB', '20GB', '1536MiB' or plain bytes."""
    if n == 0:
        return "0"
    exact = [(n // scale, unit) for unit, scale in _DISPLAY_UNITS if n % scale == 0]
    if not exact:
        return str(n)
    count, unit = min(exact)  # the fewest digits reads best: 20GB, not 19531250KiB
    return f"{count}{unit}"


_DISPLAY_UNITS = (("TiB", 2**40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB),
                  ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


# --------------------------------------------------------------------------
# Scalar parsers. Each returns the typed value or raises TypeError /
# ValueError with the reason; _parse_value turns that into a ConfigError naming key and source.

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValueError("expected a boolean: true/false, 1/0, yes/no or on/off")


def _parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    raise ValueError("expected an integer")


def _parse_float(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("expected a number, got a boolean")
    result: float | None = None
    if isinstance(value, (int, float)):
        try:
            result = float(value)
        except OverflowError:  # an int beyond float range (10**400)
            result = None
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            result = None
    if result is None or not math.isfinite(result):
        raise ValueError("expected a finite number")
    return result


def _parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} (quote it in YAML)")
    return value


def _parse_disk_path(value: object) -> str:
    text = _parse_str(value).strip()
    if text.lower() in ("", "none"):
        return ""  # disables the disk tier
    return os.path.abspath(os.path.expanduser(text))


@dataclass(frozen=True)
class _Key:
    """How one key is parsed, bounded and documented."""

    parse: Callable[[object], Any]
    allowed: str  # human-readable allowed values, used in every error message
    check: Callable[[Any], bool] = lambda _value: True
    choices: tuple[str, ...] = ()


def _choice(*options: str) -> _Key:
    def parse(value: object) -> str:
        text = _parse_str(value).strip().lower()
        if text not in options:
            raise ValueError("not one of the allowed values")
        return text

    return _Key(parse, "one of " + ", ".join(repr(o) for o in options), choices=options)


def _int_range(lo: int, hi: int, allowed: str | None = None) -> _Key:
    return _Key(_parse_int, allowed or f"an integer in [{lo}, {hi}]", lambda v: lo <= v <= hi)


def _size_in(lo: int, hi: int) -> _Key:
    return _Key(parse_size, f"a size in [{format_size(lo)}, {format_size(hi)}] ({_SIZE_HELP})",
                lambda v: lo <= v <= hi)


# Upper bounds of the size keys. The CPU tier is further bounded by the
# memory of the machine it starts on (_check_memory); 1024TiB only keeps an
# absurd value from reaching the engine as a number it cannot hold.
_MAX_CPU_CAPACITY = 2**50
# The disk tier's own limits (cc/tiers/disk/disk_tier.cc: kMaxSegments,
# kMaxSegmentBytes): at most 100000 segments of at most 1GiB.
_MAX_DISK_SEGMENTS = 100_000
_MAX_SEGMENT_SIZE = GIB
_MAX_DISK_CAPACITY = _MAX_DISK_SEGMENTS * _MAX_SEGMENT_SIZE


# --------------------------------------------------------------------------
# The configuration. Field order is the order of docs/configuration.md.


@dataclass(frozen=True)
class Config:
    """The effective kvtier configuration. Sizes are in bytes, paths expanded."""

    chunk_size: int = 256
    partial_chunks: str = "keep"
    cpu_capacity: int = 4 * GIB
    cpu_capacity_clamp: bool = False
    cpu_high_watermark: float = 0.90
    cpu_low_watermark: float = 0.80
    eviction_policy: str = "s3fifo"
    ttl_seconds: float = 0.0
    index_capacity: int = 0
    huge_pages: str = "auto"
    numa_node: int = -1
    disk_path: str = "~/.cache/kvtier/disk"
    disk_capacity: int = 16 * GIB
    disk_segment_size: int = 0
    disk_queue_depth: int = 64
    gds: str = "auto"
    disk_sync: str = "none"
    write_behind: bool = True
    write_behind_queue: int = 1024
    io_threads: int = 2
    copy_threads: int = 0
    namespace: str = ""
    log_level: str = "info"
    remote_url: str = ""
    remote_ttl_seconds: int = 0
    remote_timeout_ms: int = 200
    remote_write: bool = True
    remote_queue: int = 256
    remote_username: str = ""
    remote_password: str = dataclasses.field(default="", repr=False)
    remote_password_file: str = ""
    remote_tls_ca_file: str = ""
    controller_listen: str = ""
    controller_token: str = dataclasses.field(default="", repr=False)
    controller_token_file: str = ""
    transport: str = "none"
    transport_listen: str = ""
    transport_timeout_ms: int = 5000
    producer_pin_seconds: float = 60.0

    @property
    def disk_enabled(self) -> bool:
        return self.disk_path != ""

    @property
    def remote_enabled(self) -> bool:
        return self.remote_url != ""

    def to_native(self) -> dict[str, int | float | str | bool]:
        """Plain Python scalars, keyed by field name, for the C++ engine
        (less the keys applied here, in Python, which it does not take).
        remote_password_file is read here: the engine gets the password."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _PYTHON_ONLY_KEYS}
        if self.remote_password_file and not self.remote_password:
            out["remote_password"] = _read_secret_file(self.remote_password_file)
        return out

    def describe(self, sources: Mapping[str, str] | None = None) -> str:
        """One ``key = value`` line per key; with ``sources``, where it came from."""
        lines = []
        width = max(len(f.name) for f in dataclasses.fields(self))
        for f in dataclasses.fields(self):
            line = f"{f.name:<{width}} = {_display(f.name, getattr(self, f.name))}"
            if sources is not None:
                line = f"{line:<{width + 28}} # {sources.get(f.name, 'default')}"
            lines.append(line)
        return "\n".join(lines)


_SIZE_KEYS = frozenset({"cpu_capacity", "disk_capacity", "disk_segment_size"})
# Applied while loading (cpu_capacity is already clamped), or read into
# another key by to_native: not engine options.
_PYTHON_ONLY_KEYS = frozenset({"cpu_capacity_clamp", "remote_password_file"}) | frozenset(
    {"controller_listen", "controller_token", "controller_token_file"})  # kvtier.controller
# The peer transport is started by kvtier.Engine (Python), not by the native engine.
_PYTHON_ONLY_KEYS |= frozenset({"transport", "transport_listen", "transport_timeout_ms", "producer_pin_seconds"})
# Never shown: describe(), `kvtier config` and errors print "***".
_SECRET_KEYS = frozenset({"remote_password", "controller_token"})


def _read_secret_file(path: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise ConfigError(f"remote_password_file {path!r} cannot be read: {exc.strerror}") from None
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(f"remote_password_file {path!r} cannot be read: {exc}") from None


_REMOTE_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")


def _parse_remote_url(value: object) -> str:
    text = _parse_str(value).strip()
    if text.lower() in ("", "none"):
        return ""
    if not text.startswith(_REMOTE_SCHEMES):
        raise ValueError("not a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL")
    hosts = text.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    if not hosts or any(not h.strip() for h in hosts.split(",")):
        raise ValueError("no host in the URL")
    return text


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    cred, host = rest.split("@", 1)
    user = cred.split(":", 1)[0] if ":" in cred else ""
    return f"{scheme}://{user}:***@{host}" if ":" in cred else f"{scheme}://***@{host}"


def _display(name: str, value: object) -> str:
    if name in _SECRET_KEYS:
        return "***" if value else "''"
    if name == "remote_url" and isinstance(value, str) and value:
        return redact_url(value)
    if name == "remote_url" and value == "":
        return "none (remote tier disabled)"
    if name in _SIZE_KEYS and isinstance(value, int):
        return format_size(value)
    if name == "disk_path" and value == "":
        return "none (disk tier disabled)"
    if name == "controller_listen" and value == "":
        return "none (no controller)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def _index_capacity_max() -> int | None:
    """The index's own limit (ChunkIndex::kMaxCapacity, through the extension).

    One source of truth: the number lives in C++ only. Without the extension
    (configuration read where no engine runs) the upper bound is left to
    the engine, which refuses the same values at start.
    """
    try:
        from kvtier import _kvtier
    except ImportError:
        try:
            import _kvtier  # type: ignore[no-redef]  # development: bazel-bin/python/src on sys.path
        except ImportError:
            return None
    return int(_kvtier.index_capacity_max())


def _parse_index_capacity(value: object) -> int:
    v = _parse_int(value)
    if v == 0:
        return v
    top = _index_capacity_max()
    if v < 1024 or (top is not None and v > top):
        raise ValueError(f"not 0 and not in [1024, {top if top is not None else '...'}]")
    return v


def _parse_controller_listen(value: object) -> str:
    """'' (off) or a canonical HOST:PORT; a bare PORT binds 127.0.0.1."""
    text = _parse_str(value).strip()
    if text.lower() in ("", "none"):
        return ""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be an integer in [1, 65535]")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]  # [::1]:8199
    if not host or any(c.isspace() or c in "/[]" for c in host) or (":" in host and not (bracketed and _is_ip(host))):
        raise ValueError("not a host: an IP address or a host name (IPv6 in brackets: [::1]:8199)")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def _parse_transport_listen(value: object) -> str:
    """'' (consumer only) or a canonical HOST:PORT; PORT 0 binds an ephemeral port."""
    text = _parse_str(value).strip()
    if text.lower() in ("", "none"):
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("HOST:PORT is needed (e.g. 0.0.0.0:7301 or 10.0.0.5:0)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("the port must be an integer in [0, 65535]")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host or any(c.isspace() or c in "/[]" for c in host) or (":" in host and not (bracketed and _is_ip(host))):
        raise ValueError("not a host: an IP address or a host name (IPv6 in brackets: [::1]:7301)")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def controller_is_loopback(listen: str) -> bool:
    """Whether a canonical controller_listen binds only this machine's
    loopback: 'localhost' or a loopback address (names are not resolved)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _segment_ok(v: int) -> bool:
    return v == 0 or (MIB <= v <= _MAX_SEGMENT_SIZE and v % (4 * KIB) == 0)


_KEYS: dict[str, _Key] = {
    "chunk_size": _int_range(16, 65536, "an integer number of tokens in [16, 65536]"),
    "partial_chunks": _choice("keep", "drop"),
    "cpu_capacity": _size_in(16 * MIB, _MAX_CPU_CAPACITY),
    "cpu_capacity_clamp": _Key(_parse_bool, "a boolean: true/false, 1/0, yes/no, on/off"),
    "cpu_high_watermark": _Key(_parse_float, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    # The upper bound depends on cpu_high_watermark: checked in _check_cross_keys.
    "cpu_low_watermark": _Key(_parse_float, "a number in (0, cpu_high_watermark)",
                              lambda v: 0.0 < v < 1.0),
    "eviction_policy": _choice("s3fifo", "lru"),
    "ttl_seconds": _Key(_parse_float, "a number of seconds >= 0 (0 = never expire)",
                        lambda v: v >= 0.0),
    "index_capacity": _Key(_parse_index_capacity,
                           "0 (auto) or an integer in [1024, kvtier._kvtier.index_capacity_max()]"),
    "huge_pages": _choice("auto", "on", "off"),
    "numa_node": _int_range(-1, 1023, "-1 (no binding) or a NUMA node in [0, 1023]"),
    "disk_path": _Key(_parse_disk_path,
                      "a directory path, or '' / 'none' to disable the disk tier"),
    "disk_capacity": _size_in(64 * MIB, _MAX_DISK_CAPACITY),
    "disk_segment_size": _Key(parse_size,
                              "0 (auto) or a size in [1MiB, 1GiB] that is a multiple of 4KiB",
                              _segment_ok),
    "disk_queue_depth": _int_range(1, 4096),
    "gds": _choice("auto", "on", "off"),
    "disk_sync": _choice("none", "batch", "always"),
    "write_behind": _Key(_parse_bool, "a boolean: true/false, 1/0, yes/no, on/off"),
    "write_behind_queue": _int_range(1, 1_000_000, "an integer number of chunks in [1, 1000000]"),
    "io_threads": _int_range(1, 64),
    "copy_threads": _int_range(0, 256, "0 (auto) or an integer in [1, 256]"),
    "namespace": _Key(_parse_str, "a string"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "remote_url": _Key(_parse_remote_url,
                       "'' / 'none' (no remote tier), redis://[user:pass@]host:port[/db], rediss://... (TLS), "
                       "redis+cluster://host:port[,host:port...]"),
    "remote_ttl_seconds": _int_range(0, 10 * 365 * 86400, "0 (no expiry) or seconds in [1, 315360000]"),
    "remote_timeout_ms": _int_range(1, 60_000),
    "remote_write": _Key(_parse_bool, "a boolean: true/false, 1/0, yes/no, on/off"),
    "remote_queue": _int_range(1, 1_000_000, "an integer number of chunks in [1, 1000000]"),
    "remote_username": _Key(_parse_str, "a string (ACL user; empty: the default user)"),
    "remote_password": _Key(_parse_str, "a string"),
    "remote_password_file": _Key(_parse_str, "a path to a file holding the password"),
    "remote_tls_ca_file": _Key(_parse_str, "a path to a PEM CA file (rediss://)"),
    "controller_listen": _Key(_parse_controller_listen,
                              "'' / 'none' (no controller), PORT or HOST:PORT with PORT in [1, 65535] "
                              "(rank r serves on PORT + r)"),
    "controller_token": _Key(_parse_str, "a string (the controller's bearer token)"),
    "controller_token_file": _Key(_parse_str, "a path to a file holding the controller's bearer token"),
    "transport": _choice("none", "ucx"),
    "transport_listen": _Key(_parse_transport_listen,
                             "'' / 'none' (do not serve), HOST:PORT or [IPv6]:PORT with PORT in [0, 65535] "
                             "(0: ephemeral; rank r serves on PORT + r)"),
    "transport_timeout_ms": _int_range(1, 600_000),
    "producer_pin_seconds": _Key(_parse_float, "a number of seconds in (0, 86400]", lambda v: 0.0 < v <= 86400.0),
}

KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
# A key added to Config without a parser (or the reverse) is a programming error.
assert set(KEYS) == set(_KEYS), "Config fields and _KEYS must list the same keys"


# --------------------------------------------------------------------------
# Loading


def _unknown_key_error(key: object, source: str) -> ConfigError:
    text = str(key)
    close = difflib.get_close_matches(text.lower(), KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown configuration key {text!r} (from {source}){hint} "
                       f"Known keys: {', '.join(KEYS)}")


def _parse_value(key: str, raw: object, source: str) -> object:
    spec = _KEYS[key]
    # Secrets never reach an error message (nor the log it may end up in).
    shown = "'***'" if key in _SECRET_KEYS else (
        repr(redact_url(raw)) if key == "remote_url" and isinstance(raw, str) else repr(raw))
    try:
        value = spec.parse(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value for {key!r} (from {source}): {shown}: {exc}; "
                          f"allowed: {spec.allowed}") from None
    if not spec.check(value):
        raise ConfigError(f"bad value for {key!r} (from {source}): {shown} is out of range; "
                          f"allowed: {spec.allowed}")
    return value


def _read_yaml(path: str) -> Mapping[object, object]:
    source = f"{ENV_CONFIG_FILE}={path}"
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {source}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file is not a regular file: {source}")
    try:
        import yaml
    except ImportError as exc:
        raise ConfigError(f"reading {source} needs PyYAML (pip install pyyaml)") from exc
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in config file {path}: {exc}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"malformed YAML in config file {path}: nested too deeply") from None
    except (ValueError, IndexError, TypeError, OverflowError) as exc:
        # PyYAML's constructors raise these (not YAMLError) for tags such as
        # "!!int word" or an empty "!!float".
        raise ConfigError(f"malformed YAML in config file {path}: {type(exc).__name__}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if data is None:  # an empty file (or only comments) sets nothing
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, "
                          f"got a {type(data).__name__}")
    return data


def _check_cross_keys(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    low, high = values["cpu_low_watermark"], values["cpu_high_watermark"]
    if not low < high:
        raise ConfigError(
            f"bad value for 'cpu_low_watermark' (from {sources['cpu_low_watermark']}): {low!r} "
            f"must be below cpu_high_watermark = {high!r} (from {sources['cpu_high_watermark']}); "
            "allowed: a number in (0, cpu_high_watermark)")
    segment, capacity = values["disk_segment_size"], values["disk_capacity"]
    if values["disk_path"] and segment > capacity:
        raise ConfigError(
            f"bad value for 'disk_segment_size' (from {sources['disk_segment_size']}): "
            f"{format_size(segment)} exceeds disk_capacity = {format_size(capacity)}; "
            "allowed: 0 (auto) or a size up to disk_capacity")
    if values["disk_path"] and segment and capacity // segment > _MAX_DISK_SEGMENTS:
        raise ConfigError(
            f"bad value for 'disk_capacity' (from {sources['disk_capacity']}): "
            f"{format_size(capacity)} is more than {_MAX_DISK_SEGMENTS} segments of "
            f"disk_segment_size = {format_size(segment)} (from {sources['disk_segment_size']}); "
            f"allowed: a size up to {format_size(_MAX_DISK_SEGMENTS * segment)} with that segment "
            "size (a larger disk_segment_size, or 0 for auto, allows more)")


def _check_controller(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """The controller can clear and pin the cache: off this machine's
    loopback it is refused without a bearer token."""
    listen = values["controller_listen"]
    if listen and not controller_is_loopback(listen) and not (
            values["controller_token"] or values["controller_token_file"]):
        raise ConfigError(
            f"bad value for 'controller_listen' (from {sources['controller_listen']}): {listen!r} "
            "is not a loopback address and no controller_token or controller_token_file is set; "
            "allowed: 127.0.0.1:PORT, or any address with a token (KVTIER_CONTROLLER_TOKEN)")


def _check_transport(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    listen = values["transport_listen"]
    if listen and values["transport"] != "ucx":
        raise ConfigError(
            f"bad value for 'transport_listen' (from {sources['transport_listen']}): {listen!r} is set but "
            f"transport = {values['transport']!r} (from {sources['transport']}); "
            "allowed: transport_listen only with transport: ucx")


# --------------------------------------------------------------------------
# What exists: the CPU tier against the memory this process may use.

# cpu_capacity_clamp: true sets a too large cpu_capacity to this share of
# the limit, not to all of it, leaving the rest to the inference process.
_CLAMP_NUM, _CLAMP_DEN = 3, 4


def _read_limit(path: str) -> int | None:
    """A cgroup memory limit file: bytes, or None for none or unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_memory_limit(proc_self_cgroup: str = "/proc/self/cgroup",
                         cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str] | None:
    """The tightest memory limit of this process's cgroup and its ancestors:
    ``memory.max`` (cgroup v2) or ``memory.limit_in_bytes`` (v1). None when
    there is none (v1 writes "no limit" as a huge number; the caller's
    ``min`` with physical memory drops it)."""
    try:
        with open(proc_self_cgroup, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        # From the process's cgroup up to the root of the mount: a parent's
        # limit binds its children. In a cgroup namespace path is "/".
        rel = path.strip("/")
        while True:
            file = os.path.join(base, rel, name) if rel else os.path.join(base, name)
            limit = _read_limit(file)
            if limit is not None and (best is None or limit < best[0]):
                best = (limit, f"the cgroup memory limit ({file})")
            if not rel:
                break
            rel = os.path.dirname(rel)
    return best


def _memory_limit() -> tuple[int, str] | None:
    """Bytes of memory this process may use and what sets it: physical
    memory, or the cgroup's limit where that is lower. None if unknown."""
    limits: list[tuple[int, str]] = []
    try:
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                       "physical memory"))
    except (ValueError, OSError):
        pass
    cgroup = _cgroup_memory_limit()
    if cgroup is not None:
        limits.append(cgroup)
    return min(limits) if limits else None


def _bytes_text(n: int) -> str:
    return f"{n / GIB:.2f}GiB ({n} bytes)"


def _check_memory(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Refuses a CPU tier larger than the memory this process may use, or,
    with cpu_capacity_clamp, shrinks it (a logged warning)."""
    found = _memory_limit()
    if found is None:
        return
    limit, what = found
    capacity = values["cpu_capacity"]
    if capacity <= limit:
        return
    clamped = max(16 * MIB, limit * _CLAMP_NUM // _CLAMP_DEN // MIB * MIB)
    if not values["cpu_capacity_clamp"]:
        raise ConfigError(
            f"bad value for 'cpu_capacity' (from {sources['cpu_capacity']}): "
            f"{format_size(capacity)} exceeds {what}, {_bytes_text(limit)}; allowed: a size in "
            f"[16MiB, {_bytes_text(limit)}] here, or set cpu_capacity_clamp: true to use "
            f"{format_size(clamped)} ({_CLAMP_NUM}/{_CLAMP_DEN} of it) instead")
    _log.warning("cpu_capacity %s (from %s) exceeds %s, %s; cpu_capacity_clamp is set: using %s "
                 "(%d/%d of it)", format_size(capacity), sources["cpu_capacity"], what,
                 _bytes_text(limit), format_size(clamped), _CLAMP_NUM, _CLAMP_DEN)
    values["cpu_capacity"] = clamped
    sources["cpu_capacity"] = f"{sources['cpu_capacity']}, clamped to {_CLAMP_NUM}/{_CLAMP_DEN} of {what}"


# Read by the C++ core itself (cc/common/cpu_affinity.h), not a config key;
# checked here so a typo is an error rather than the default.
ENV_THREAD_AFFINITY = "KVTIER_THREAD_AFFINITY"
THREAD_AFFINITY_VALUES = ("", "process", "inherit")


def _env_layer(environ: Mapping[str, str]) -> Iterable[tuple[str, object, str]]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        if name == ENV_THREAD_AFFINITY:
            if raw not in THREAD_AFFINITY_VALUES:
                raise ConfigError(f"{name}={raw!r}: allowed values are 'process' (the default) and 'inherit'")
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in _KEYS:
            yield key, raw, f"env {name}"
            continue
        # The KVTIER_ prefix is shared with tool variables (KVTIER_WHEEL,
        # KVTIER_CUDA ...), so only a near miss of a key is an error: that is
        # almost certainly a typo whose silent loss would be worse.
        close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"unknown configuration variable {name}; did you mean "
                              f"{ENV_PREFIX}{close[0].upper()}?")


def load_config_with_sources(
    overrides: Mapping[str, object] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Like :func:`load_config`, also returning where each value came from:
    ``"default"``, ``"file <path>"``, ``"env KVTIER_<KEY>"`` or ``"override"``."""
    env = os.environ if environ is None else environ
    defaults = Config()
    values: dict[str, Any] = {k: getattr(defaults, k) for k in KEYS}
    # The default disk_path is spelled with '~' for the docs; expand it like a set one.
    values["disk_path"] = _parse_disk_path(values["disk_path"])
    sources = dict.fromkeys(KEYS, "default")

    layers: list[tuple[str, object, str]] = []
    path = env.get(ENV_CONFIG_FILE, "")
    if path:
        for key, raw in _read_yaml(path).items():
            if not isinstance(key, str) or key not in _KEYS:
                raise _unknown_key_error(key, f"file {path}")
            layers.append((key, raw, f"file {path}"))
    layers.extend(_env_layer(env))
    for key, raw in (overrides or {}).items():
        if not isinstance(key, str) or key not in _KEYS:
            raise _unknown_key_error(key, "overrides")
        layers.append((key, raw, "override"))

    for key, raw, source in layers:  # later layers win
        values[key] = _parse_value(key, raw, source)
        sources[key] = source
    _check_cross_keys(values, sources)
    _check_controller(values, sources)
    _check_transport(values, sources)
    _check_memory(values, sources)
    return Config(**values), sources


def load_config(
    overrides: Mapping[str, object] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Builds the effective configuration: defaults < ``KVTIER_CONFIG`` YAML
    file < ``KVTIER_<KEY>`` environment variables < ``overrides``.

    ``environ`` defaults to ``os.environ``. Raises :class:`ConfigError` on an
    unknown key, a bad value, or a missing, malformed or non-mapping file.
    """
    return load_config_with_sources(overrides, environ=environ)[0]
