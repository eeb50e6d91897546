"""kvtier's Prometheus metrics: one naming scheme for every endpoint.

``engine_registry({rank: engine})`` returns a prometheus_client registry whose
collector reads ``engine.stats()`` (and ``engine.health()`` where the engine
has it) at every scrape; the controller's ``/metrics`` and
``serve_metrics`` serve it. ``kvtier.vllm.metrics`` puts the same families,
from the same ``engine_samples`` mapping, on ``vllm serve``'s ``/metrics``,
so one set of alert rules (deploy/prometheus) and one dashboard
(deploy/grafana) work on both. docs/operations.md lists the families.

Naming (every family carries ``rank``; per tier ``tier`` = cpu | disk |
remote; ``operation`` = load | store where one quantity exists for both):

- engine counters (cumulative since the engine started, so true counters):
  ``kvtier_lookups_total``, ``kvtier_lookup_query_tokens_total``,
  ``kvtier_lookup_hit_tokens_total`` (hit rate = hit / query),
  ``kvtier_requests_total{operation}``, ``kvtier_chunks_total{operation}``,
  ``kvtier_tokens_total{operation}``, ``kvtier_bytes_total{operation}``,
  ``kvtier_errors_total{operation}``, ``kvtier_write_behind_*_total``, ...
- engine gauges: ``kvtier_write_behind_queue_depth``,
  ``kvtier_write_behind_queue_capacity``, ``kvtier_catalogue_entries``, ...
- per tier: gauges ``kvtier_tier_capacity_bytes``, ``kvtier_tier_used_bytes``,
  ``kvtier_tier_entries``; counters ``kvtier_tier_puts_total``,
  ``kvtier_tier_get_hits_total``, ``kvtier_tier_errors_total``,
  ``kvtier_tier_evictions_total{reason}``, ``kvtier_tier_chunks_loaded_total``.
- remote tier: ``kvtier_remote_*_total`` counters, gauges
  ``kvtier_remote_connected`` and ``kvtier_remote_upload_queue_depth``.
- peer transport (P/D): ``kvtier_transport_*_total`` counters, gauges
  ``kvtier_transport_connected_peers`` and ``kvtier_transport_holds``.
- histograms (seconds, cumulative ``le`` buckets):
  ``kvtier_load_latency_seconds{tier}``, ``kvtier_store_latency_seconds{tier}``.
- health (controller / own endpoint only: it needs ``engine.health()``):
  ``kvtier_health_status{tier}`` and ``kvtier_engine_health_status``
  (0 ok, 1 degraded, 2 down), ``kvtier_queue_depth{queue}`` and
  ``kvtier_queue_capacity{queue}``; ``kvtier_up`` (1 when stats() answered).
- index consistency, from the last ``engine.verify()`` result handed in:
  ``kvtier_index_consistent``, ``kvtier_index_missing_entries{tier}``,
  ``kvtier_index_orphan_entries{tier}``, ``kvtier_index_corrupt_entries``,
  ``kvtier_index_verify_timestamp_seconds``.

A stat this table does not know yet is still exported, as the gauge
``kvtier_stat_<path>`` (a number; cumulative or not is unknown here).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

HEALTH_VALUES = {"ok": 0.0, "degraded": 1.0, "down": 2.0}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One value of one family; kind is "counter", "gauge" or "histogram".

    For a counter ``name`` has no ``_total`` suffix (prometheus_client adds
    it). A histogram carries ``buckets`` [(upper bound in seconds, cumulative
    count)], the last bound +Inf, and ``sum`` in seconds; ``value`` is its
    count.
    """

    name: str
    kind: str
    doc: str
    labels: tuple[tuple[str, str], ...]
    value: float
    buckets: tuple[tuple[float, float], ...] = ()
    sum: float = 0.0


# Engine top-level stats: field -> (family, kind, extra labels, scale, doc).
_US = 1e-6
_TOP: dict[str, tuple[str, str, dict[str, str], float, str]] = {
    "lookups": ("kvtier_lookups", "counter", {}, 1, "Prefix lookups"),
    "lookup_hit_tokens": ("kvtier_lookup_hit_tokens", "counter", {}, 1, "Tokens of looked-up prefixes found cached"),
    "lookup_query_tokens": ("kvtier_lookup_query_tokens", "counter", {}, 1, "Tokens of looked-up prefixes"),
    "store_requests": ("kvtier_requests", "counter", {"operation": "store"}, 1, "Store and retrieve calls"),
    "retrieve_requests": ("kvtier_requests", "counter", {"operation": "load"}, 1, "Store and retrieve calls"),
    "chunks_stored": ("kvtier_chunks", "counter", {"operation": "store"}, 1, "Chunks stored and loaded"),
    "chunks_loaded": ("kvtier_chunks", "counter", {"operation": "load"}, 1, "Chunks stored and loaded"),
    "tokens_stored": ("kvtier_tokens", "counter", {"operation": "store"}, 1, "Tokens stored and loaded"),
    "tokens_loaded": ("kvtier_tokens", "counter", {"operation": "load"}, 1, "Tokens stored and loaded"),
    "bytes_stored": ("kvtier_bytes", "counter", {"operation": "store"}, 1, "KV bytes stored and loaded"),
    "bytes_loaded": ("kvtier_bytes", "counter", {"operation": "load"}, 1, "KV bytes stored and loaded"),
    "store_errors": ("kvtier_errors", "counter", {"operation": "store"}, 1, "Failed stores and loads"),
    "load_errors": ("kvtier_errors", "counter", {"operation": "load"}, 1, "Failed stores and loads"),
    "store_latency_us_total": ("kvtier_latency_seconds", "counter", {"operation": "store"}, _US,
                               "Seconds spent in store and retrieve calls"),
    "retrieve_latency_us_total": ("kvtier_latency_seconds", "counter", {"operation": "load"}, _US,
                                  "Seconds spent in store and retrieve calls"),
    "chunks_skipped_present": ("kvtier_chunks_skipped_present", "counter", {}, 1,
                               "Chunks not stored because they were cached already"),
    "retrieve_misses": ("kvtier_load_misses", "counter", {}, 1, "Chunks a retrieve found missing"),
    "layout_mismatches": ("kvtier_layout_mismatches", "counter", {}, 1, "Chunks stored from another KV layout"),
    "internal_errors": ("kvtier_internal_errors", "counter", {}, 1, "Internal errors (bugs): should stay 0"),
    "write_behind_written": ("kvtier_write_behind_written", "counter", {}, 1, "Chunks written behind to disk"),
    "write_behind_retries": ("kvtier_write_behind_retries", "counter", {}, 1, "Write-behind retries"),
    "write_behind_failed": ("kvtier_write_behind_failed", "counter", {}, 1, "Write-behind writes given up"),
    "write_behind_dropped": ("kvtier_write_behind_dropped", "counter", {}, 1,
                             "Chunks not written behind because the queue was full"),
    "write_behind_queue_depth": ("kvtier_write_behind_queue_depth", "gauge", {}, 1, "Chunks waiting to be written behind"),
    "catalogue_entries": ("kvtier_catalogue_entries", "gauge", {}, 1, "Entries in the shared catalogue (index)"),
    "catalogue_capacity": ("kvtier_catalogue_capacity", "gauge", {}, 1, "Capacity of the shared catalogue (entries)"),
    "chunks_loaded_cpu": ("kvtier_tier_chunks_loaded", "counter", {"tier": "cpu"}, 1, "Chunks served by each tier"),
    "chunks_loaded_disk": ("kvtier_tier_chunks_loaded", "counter", {"tier": "disk"}, 1, "Chunks served by each tier"),
    "chunks_fetched_remote": ("kvtier_tier_chunks_loaded", "counter", {"tier": "remote"}, 1,
                              "Chunks served by each tier"),
    "pins_with_ttl": ("kvtier_pins_with_ttl", "gauge", {}, 1, "Chunks pinned with a TTL, not yet released"),
    "pins_expired": ("kvtier_pins_expired", "counter", {}, 1, "Chunk pins released by their TTL"),
    "store_queue_depth": ("kvtier_store_queue_depth", "gauge", {}, 1, "Store copy tasks queued or running"),
    "moves_started": ("kvtier_moves", "counter", {}, 1, "Move tasks started"),
    "moves_chunks_moved": ("kvtier_move_chunks", "counter", {"result": "moved"}, 1, "Chunks moved between tiers"),
    "moves_chunks_failed": ("kvtier_move_chunks", "counter", {"result": "failed"}, 1, "Chunks moved between tiers"),
}

# Per-tier stats (stats["tiers"][tier]).
_TIER: dict[str, tuple[str, str, float, str]] = {
    "capacity_bytes": ("kvtier_tier_capacity_bytes", "gauge", 1, "Bytes the tier may hold"),
    "used_bytes": ("kvtier_tier_used_bytes", "gauge", 1, "Bytes the tier holds"),
    "entries": ("kvtier_tier_entries", "gauge", 1, "Chunks the tier holds"),
    "puts": ("kvtier_tier_puts", "counter", 1, "Chunks put into the tier"),
    "put_bytes": ("kvtier_tier_put_bytes", "counter", 1, "Bytes put into the tier"),
    "gets": ("kvtier_tier_gets", "counter", 1, "Reads asked of the tier"),
    "get_hits": ("kvtier_tier_get_hits", "counter", 1, "Reads the tier served"),
    "get_bytes": ("kvtier_tier_get_bytes", "counter", 1, "Bytes the tier served"),
    "evicted_bytes": ("kvtier_tier_evicted_bytes", "counter", 1, "Bytes evicted from the tier"),
    "errors": ("kvtier_tier_errors", "counter", 1, "I/O and other errors of the tier"),
}
_EVICTIONS_DOC = "Chunks that left the tier, by reason"

# The remote tier's stats (stats["remote"]).
_REMOTE: dict[str, tuple[str, str, dict[str, str], float, str]] = {
    "lookups": ("kvtier_remote_lookup_calls", "counter", {}, 1, "Remote lookups (round trips)"),
    "lookup_chunks": ("kvtier_remote_lookup_chunks", "counter", {}, 1, "Chunks asked of the remote"),
    "lookup_hit_chunks": ("kvtier_remote_lookup_hit_chunks", "counter", {}, 1, "Chunks the remote had"),
    "fetches": ("kvtier_remote_fetches", "counter", {}, 1, "Chunks fetched from the remote"),
    "fetch_hits": ("kvtier_remote_fetch_hits", "counter", {}, 1, "Fetches that returned a good value"),
    "fetch_misses": ("kvtier_remote_fetch_misses", "counter", {}, 1, "Fetches that found nothing usable"),
    "bytes_in": ("kvtier_remote_bytes_in", "counter", {}, 1, "Bytes read from the remote"),
    "bytes_out": ("kvtier_remote_bytes_out", "counter", {}, 1, "Bytes written to the remote"),
    "corrupt": ("kvtier_remote_corrupt", "counter", {}, 1, "Remote values that failed their checks"),
    "layout_mismatches": ("kvtier_remote_layout_mismatches", "counter", {}, 1, "Remote values of another layout"),
    "uploads": ("kvtier_remote_uploads", "counter", {}, 1, "Chunks uploaded"),
    "upload_present": ("kvtier_remote_upload_present", "counter", {}, 1, "Uploads skipped: already there"),
    "upload_dropped": ("kvtier_remote_upload_dropped", "counter", {}, 1, "Uploads dropped: queue full"),
    "upload_skipped": ("kvtier_remote_upload_skipped", "counter", {}, 1, "Uploads skipped"),
    "upload_failed": ("kvtier_remote_upload_failed", "counter", {}, 1, "Uploads that failed"),
    "upload_queue_depth": ("kvtier_remote_upload_queue_depth", "gauge", {}, 1, "Chunks waiting for upload"),
    "errors": ("kvtier_tier_errors", "counter", {"tier": "remote"}, 1, "I/O and other errors of the tier"),
    "timeouts": ("kvtier_remote_timeouts", "counter", {}, 1, "Remote operations past remote_timeout_ms"),
    "lookup_latency_us_total": ("kvtier_remote_latency_seconds", "counter", {"operation": "lookup"}, _US,
                                "Seconds spent in remote operations"),
    "fetch_latency_us_total": ("kvtier_remote_latency_seconds", "counter", {"operation": "fetch"}, _US,
                               "Seconds spent in remote operations"),
    "upload_latency_us_total": ("kvtier_remote_latency_seconds", "counter", {"operation": "upload"}, _US,
                                "Seconds spent in remote operations"),
    "connected": ("kvtier_remote_connected", "gauge", {}, 1, "1 while the remote answers"),
}

# The instance-to-instance transport's stats (stats["transport"]; P/D).
_TRANSPORT: dict[str, tuple[str, str, str]] = {
    "pulls": ("kvtier_transport_pulls", "counter", "Pulls from a peer instance"),
    "chunks_pulled": ("kvtier_transport_chunks_pulled", "counter", "Chunks pulled from peers, checked and filed"),
    "bytes_pulled": ("kvtier_transport_bytes_pulled", "counter", "Bytes pulled from peers"),
    "chunks_served": ("kvtier_transport_chunks_served", "counter", "Chunks served to peers"),
    "bytes_served": ("kvtier_transport_bytes_served", "counter", "Bytes served to peers"),
    "misses": ("kvtier_transport_misses", "counter", "Pulls that ended before the end of the prompt"),
    "corrupt": ("kvtier_transport_corrupt", "counter", "Pulled chunks that failed their checksum"),
    "timeouts": ("kvtier_transport_timeouts", "counter", "Transfer windows that ran out of time"),
    "errors": ("kvtier_transport_errors", "counter", "Refused or failed peer endpoints, bad messages"),
    "connected_peers": ("kvtier_transport_connected_peers", "gauge", "Live peer endpoints"),
    "holds": ("kvtier_transport_holds", "gauge", "Chunk holds for peers live now"),
    "holds_expired": ("kvtier_transport_holds_expired", "counter", "Holds that ran out of time unclaimed"),
}

_HISTOGRAMS = {
    "load_us": ("kvtier_load_latency_seconds", "Per chunk load latency by tier (seconds)"),
    "store_us": ("kvtier_store_latency_seconds", "Per chunk (disk: per write) store latency by tier (seconds)"),
}


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _ident(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(kv.items())


def histogram_sample(name: str, doc: str, labels: tuple[tuple[str, str], ...], h: Mapping[str, Any]) -> Sample | None:
    """An engine histogram (bounds in us, NON-cumulative counts with a last
    +Inf bucket, sum in us) as a Prometheus one (seconds, cumulative)."""
    bounds, counts = list(h.get("bounds", ())), list(h.get("counts", ()))
    if len(counts) != len(bounds) + 1:
        return None
    buckets: list[tuple[float, float]] = []
    running = 0.0
    for bound, count in zip([*[b / 1e6 for b in bounds], float("inf")], counts):
        running += float(count)
        buckets.append((bound, running))
    count = float(h.get("count", running))
    # The snapshot is not atomic across fields (LatencyHistogram): keep the
    # exposition self-consistent, +Inf == _count.
    buckets[-1] = (buckets[-1][0], max(running, count))
    return Sample(name, "histogram", doc, labels, max(running, count), tuple(buckets), float(h.get("sum", 0)) / 1e6)


def engine_samples(stats: Mapping[str, Any], skip: Iterable[str] = ()) -> Iterator[Sample]:
    """Every number of one engine's stats() as samples (no rank label).

    skip: top-level fields not to export (the vLLM side answers lookups in
    the scheduler, so it exports the connector's lookup counts instead).
    """
    skipped = set(skip)
    tiers = stats.get("tiers")
    if isinstance(tiers, Mapping):
        # stats()["cpu"] / ["disk"] are the same dicts as stats()["tiers"][...].
        skipped.update(k for k in tiers if isinstance(stats.get(k), Mapping))
    for key, value in stats.items():
        if key in skipped:
            continue
        if key == "tiers" and isinstance(value, Mapping):
            for tier, fields in value.items():
                if isinstance(fields, Mapping):
                    yield from _tier_samples(str(tier), fields)
        elif key == "remote" and isinstance(value, Mapping):
            yield from _remote_samples(value)
        elif key == "transport" and isinstance(value, Mapping):
            for field, v in value.items():
                n = _num(v)
                if n is None:
                    continue
                if field in _TRANSPORT:
                    name, kind, doc = _TRANSPORT[field]
                    yield Sample(name, kind, doc, (), n)
                else:
                    yield Sample(f"kvtier_transport_stat_{_ident(field)}", "gauge", f"transport stat {field}", (), n)
        elif key == "histograms" and isinstance(value, Mapping):
            for op, by_tier in value.items():
                name, doc = _HISTOGRAMS.get(op, (f"kvtier_{_ident(str(op)).removesuffix('_us')}_latency_seconds",
                                                 f"{op} latency (seconds)"))
                if not isinstance(by_tier, Mapping):
                    continue
                for tier, h in by_tier.items():
                    if isinstance(h, Mapping):
                        s = histogram_sample(name, doc, _labels(tier=str(tier)), h)
                        if s is not None:
                            yield s
        elif key in _TOP:
            v = _num(value)
            if v is not None:
                name, kind, extra, scale, doc = _TOP[key]
                yield Sample(name, kind, doc, tuple(extra.items()), v * scale)
        else:
            yield from _fallback(key, value)


def _tier_samples(tier: str, fields: Mapping[str, Any]) -> Iterator[Sample]:
    reasons = {k.removeprefix("evictions_"): v for k, v in fields.items()
               if k.startswith("evictions_") and _num(v) is not None}
    for field, value in fields.items():
        v = _num(value)
        if v is None:
            continue
        if field in _TIER:
            name, kind, scale, doc = _TIER[field]
            yield Sample(name, kind, doc, _labels(tier=tier), v * scale)
        elif field == "evictions":
            # Before the by-reason breakdown, `evictions` counted the policy's
            # (capacity) evictions; with it, each reason has its own field.
            if "capacity" not in reasons:
                yield Sample("kvtier_tier_evictions", "counter", _EVICTIONS_DOC, _labels(tier=tier, reason="capacity"), v)
        elif field.startswith("evictions_"):
            reason = _ident(field.removeprefix("evictions_"))
            yield Sample("kvtier_tier_evictions", "counter", _EVICTIONS_DOC, _labels(tier=tier, reason=reason), v)
        else:
            yield Sample(f"kvtier_tier_stat_{_ident(field)}", "gauge", f"tier stat {field}", _labels(tier=tier), v)


def _remote_samples(fields: Mapping[str, Any]) -> Iterator[Sample]:
    for field, value in fields.items():
        v = _num(value)
        if v is None:
            continue
        if field in _REMOTE:
            name, kind, extra, scale, doc = _REMOTE[field]
            yield Sample(name, kind, doc, tuple(extra.items()), v * scale)
        else:
            yield Sample(f"kvtier_remote_stat_{_ident(field)}", "gauge", f"remote stat {field}", (), v)


def _fallback(key: str, value: Any, prefix: str = "") -> Iterator[Sample]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _fallback(str(k), v, f"{prefix}{key}_")
        return
    v = _num(value)
    if v is not None:
        name = f"kvtier_stat_{_ident(prefix + key)}"
        yield Sample(name, "gauge", f"engine stat {prefix}{key}", (), v)


def health_samples(report: Mapping[str, Any]) -> Iterator[Sample]:
    """engine.health(): overall and per-tier status as 0 ok / 1 degraded / 2 down."""
    status = HEALTH_VALUES.get(str(report.get("status")))
    if status is not None:
        yield Sample("kvtier_engine_health_status", "gauge", "Engine health: 0 ok, 1 degraded, 2 down", (), status)
    tiers = report.get("tiers")
    if isinstance(tiers, Mapping):
        for tier, t in tiers.items():
            if not isinstance(t, Mapping) or t.get("enabled") is False:
                continue
            s = HEALTH_VALUES.get(str(t.get("status")))
            if s is not None:
                yield Sample("kvtier_health_status", "gauge", "Tier health: 0 ok, 1 degraded, 2 down",
                             _labels(tier=str(tier)), s)
    queues = report.get("queues")
    if isinstance(queues, Mapping):
        # {"write_behind": depth, "write_behind_capacity": n, "store": ...}
        for key, q in queues.items():
            v = _num(q)
            if v is None:
                continue
            queue, capacity = str(key).removesuffix("_capacity"), str(key).endswith("_capacity")
            yield Sample("kvtier_queue_capacity" if capacity else "kvtier_queue_depth", "gauge",
                         "Background queue capacity (engine.health())" if capacity
                         else "Background queue depth (engine.health())", _labels(queue=queue), v)


def verify_samples(result: Mapping[str, Any], at: float | None = None) -> Iterator[Sample]:
    """The last engine.verify(): 1 consistent / 0 not, and the counts."""
    consistent = result.get("consistent")
    if isinstance(consistent, bool):
        yield Sample("kvtier_index_consistent", "gauge", "1 if the last verify found the index consistent",
                     (), float(consistent))
    for key, family, doc in (("missing", "kvtier_index_missing_entries", "Index entries whose tier lacks the chunk"),
                             ("orphans", "kvtier_index_orphan_entries", "Tier chunks the index does not know")):
        value = result.get(key)
        if isinstance(value, Mapping):
            for tier, n in value.items():
                v = _num(n) if not isinstance(n, (list, tuple)) else float(len(n))
                if v is not None:
                    yield Sample(family, "gauge", doc, _labels(tier=str(tier)), v)
        elif isinstance(value, (list, tuple)):
            yield Sample(family, "gauge", doc, _labels(tier="all"), float(len(value)))
        elif _num(value) is not None:
            yield Sample(family, "gauge", doc, _labels(tier="all"), float(value))
    corrupt = result.get("corrupt")
    if _num(corrupt) is not None:
        yield Sample("kvtier_index_corrupt_entries", "gauge", "Chunks that failed their checks in the last verify",
                     (), float(corrupt))
    if at is not None:
        yield Sample("kvtier_index_verify_timestamp_seconds", "gauge", "Unix time of the last verify", (), at)


def config_samples(config: Any) -> Iterator[Sample]:
    """Queue capacities from the engine's configuration (for backlog ratios)."""
    for key, family, doc in (("write_behind_queue", "kvtier_write_behind_queue_capacity",
                              "write_behind_queue: chunks the write-behind queue holds"),
                             ("remote_queue", "kvtier_remote_upload_queue_capacity",
                              "remote_queue: chunks the upload queue holds")):
        v = _num(getattr(config, key, None) if not isinstance(config, Mapping) else config.get(key))
        if v is not None:
            if key == "remote_queue" and not (getattr(config, "remote_url", None) if not isinstance(config, Mapping)
                                               else config.get("remote_url")):
                continue
            yield Sample(family, "gauge", doc, (), v)


class VerifyResults:
    """The last engine.verify() per rank, for the collector (thread-safe).

    Whoever runs verify (the controller's /v1/verify, a periodic job) calls
    record(rank, result); each scrape exports the latest.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: dict[int, tuple[dict[str, Any], float]] = {}

    def record(self, rank: int, result: Mapping[str, Any], at: float | None = None) -> None:
        with self._lock:
            self._results[rank] = (dict(result), time.time() if at is None else at)

    def get(self, rank: int) -> tuple[dict[str, Any], float] | None:
        with self._lock:
            return self._results.get(rank)


class _Families:
    """Groups samples into metric families (one per name)."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}
        self._labelnames: dict[str, tuple[str, ...]] = {}

    def add(self, s: Sample, rank: str) -> None:
        labels = (("rank", rank), *s.labels)
        names = tuple(k for k, _ in labels)
        values = [v for _, v in labels]
        family = self._families.get(s.name)
        if family is None:
            cls: Callable[..., Metric] = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                                          "histogram": HistogramMetricFamily}[s.kind]
            family = self._families[s.name] = cls(s.name, s.doc, labels=list(names))
            self._labelnames[s.name] = names
        if self._labelnames[s.name] != names:
            # Prometheus allows one label set per family: a stat that does not
            # fit (only possible for kvtier_stat_* fallbacks) is left out.
            return
        if s.kind == "histogram":
            assert isinstance(family, HistogramMetricFamily)
            family.add_metric(values, [(_le(b), c) for b, c in s.buckets], s.sum)
        else:
            family.add_metric(values, s.value)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class EngineCollector(Collector):
    """Reads each engine at scrape time; a closed or failing engine is kvtier_up 0."""

    def __init__(self, engines: Mapping[int, Any], verify: VerifyResults | None = None) -> None:
        self._engines = engines
        self._verify = verify

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        up = GaugeMetricFamily("kvtier_up", "1 when the engine answers stats()", labels=["rank"])
        for rank, engine in sorted(self._engines.items()):
            r = str(rank)
            try:
                stats = engine.stats()
            except Exception:  # noqa: BLE001 (a closed engine: the scrape itself must still succeed)
                up.add_metric([r], 0.0)
                continue
            up.add_metric([r], 1.0)
            for s in engine_samples(stats):
                families.add(s, r)
            config = getattr(engine, "config", None)
            if config is not None:
                for s in config_samples(config):
                    families.add(s, r)
            health = getattr(engine, "health", None)
            if callable(health):
                try:
                    report = health()
                except Exception:  # noqa: BLE001 (an engine that cannot answer is down)
                    report = {"status": "down"}
                for s in health_samples(report):
                    families.add(s, r)
            last = self._verify.get(rank) if self._verify is not None else None
            if last is not None:
                for s in verify_samples(*last):
                    families.add(s, r)
        yield up
        yield from families


def engine_registry(engines: Mapping[int, Any], verify: VerifyResults | None = None) -> CollectorRegistry:
    """A registry exporting every engine's statistics (rank -> kvtier.Engine)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engines, verify))
    return registry


def serve_metrics(engines: Mapping[int, Any], host: str = "127.0.0.1", port: int = 9400,
                  verify: VerifyResults | None = None) -> Any:
    """Serve engine_registry(engines) at http://host:port/metrics in a daemon
    thread, for processes without vLLM or the controller. port 0 picks a
    free port. Returns the server (``server.server_port``; ``shutdown()``)."""
    from prometheus_client import start_http_server

    started = start_http_server(port, addr=host, registry=engine_registry(engines, verify))
    # prometheus_client >= 0.20 returns (server, thread).
    return started[0] if isinstance(started, tuple) else started
