"""kvtier's metrics on the /metrics page of `vllm serve`.

vLLM collects each step's connector stats (KVTierConnectorStats: the
connector's counters since the last step, summed over the workers, plus
each worker engine's statistics) and hands them to the connector's
KVConnectorPromMetrics in the process that serves /metrics. This module
turns them into Prometheus metrics named ``kvtier_*``:

- ``kvtier_<counter>_total``: the connector's counters (lookups,
  hit_requests, hit_tokens, tokens_loaded, load_errors, chunks_saved, ...),
  incremented by each step's delta.
- ``kvtier_tier_<field>{tier, rank}``: per tier (cpu, disk, remote) of each
  worker rank's engine: capacity and used bytes, entries, puts, gets, hits,
  evictions, errors; for the remote tier uploads, fetches, corrupt values,
  dropped uploads, timeouts, connected. The engine's own values as it
  reports them (cumulative counts are exported as gauges of their current
  value, so they reset when a worker restarts).
- ``kvtier_engine_<field>{rank}``: the rest of each rank's engine
  statistics (lookups, chunks stored and loaded, write-behind queue depth,
  catalogue entries, latency totals ...).

Metric objects are created on first sight of a key and cached for the
process: Prometheus' registry is process-wide, and one process may build
several vLLM engines (the in-process `LLM` class, tests), each with its own
KVTierPromMetrics, which must share the metrics rather than register them
twice.
"""

from __future__ import annotations

import re
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

# Engine statistics arrive as "engine.r<rank>.<flat key>" (see
# KVTierConnector.get_kv_connector_stats).
_ENGINE_KEY = re.compile(r"^engine\.r(\d+)\.(.+)$")
_TIERS = ("cpu", "disk")


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


# (name, label names) -> the metric registered for it in this process.
_METRICS: dict[tuple[str, tuple[str, ...]], Any] = {}


class KVTierPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
        counters: tuple[str, ...],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counter_names = set(counters)

    def _counter(self, key: str, engine_idx: int) -> Any:
        name = f"kvtier_{_metric_name(key)}"  # the client library appends _total
        labelnames = tuple(self._labelnames)
        metric = _METRICS.get((name, labelnames))
        if metric is None:
            metric = self._counter_cls(
                name=name,
                documentation=f"kvtier connector: {key.replace('_', ' ')}",
                labelnames=list(labelnames),
            )
            _METRICS[(name, labelnames)] = metric
        return metric.labels(*self.per_engine_labelvalues[engine_idx])

    def _gauge(self, name: str, extra: dict[str, str], engine_idx: int) -> Any:
        labelnames = (*self._labelnames, *extra)
        metric = _METRICS.get((name, labelnames))
        if metric is None:
            metric = self._gauge_cls(
                name=name,
                documentation=f"kvtier engine: {name.removeprefix('kvtier_').replace('_', ' ')}",
                multiprocess_mode="mostrecent",
                labelnames=list(labelnames),
            )
            _METRICS[(name, labelnames)] = metric
        return metric.labels(*self.per_engine_labelvalues[engine_idx], *extra.values())

    def observe(self, transfer_stats_data: dict[str, Any] | None, engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        for key, value in transfer_stats_data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in self._counter_names:
                if value > 0:
                    self._counter(key, engine_idx).inc(float(value))
                continue
            m = _ENGINE_KEY.match(key)
            if m is None:
                continue
            rank, field = m.group(1), m.group(2)
            tier = next((t for t in _TIERS if field.startswith(f"tiers_{t}_")), None)
            if tier is not None:
                self._gauge(f"kvtier_tier_{_metric_name(field[len('tiers_') + len(tier) + 1:])}",
                            {"tier": tier, "rank": rank}, engine_idx).set(float(value))
            elif field.startswith("remote_"):
                self._gauge(f"kvtier_tier_{_metric_name(field[len('remote_'):])}",
                            {"tier": "remote", "rank": rank}, engine_idx).set(float(value))
            else:
                self._gauge(f"kvtier_engine_{_metric_name(field)}", {"rank": rank}, engine_idx).set(float(value))
