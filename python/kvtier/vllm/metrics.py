"""kvtier's metrics on the /metrics page of `vllm serve`.

vLLM collects each step's connector stats (KVTierConnectorStats: the
connector's counters since the last step, summed over the workers, plus
each worker rank's ``engine.stats()`` under ``engine.r<rank>``) and hands
them to the connector's KVConnectorPromMetrics in the process that serves
/metrics. This module exports them with the families, names and labels of
kvtier/metrics.py (the controller's and ``serve_metrics``' exposition), so
the alert rules in deploy/prometheus and the dashboard in deploy/grafana
work on either page; every family here also carries vLLM's own labels
(model_name, engine):

- ``kvtier_<counter>_total``: the connector's counters (lookups,
  hit_requests, hit_tokens, tokens_loaded, load_errors, chunks_saved, ...),
  incremented by each step's delta. The scheduler answers lookups from the
  shared catalogue, not through the worker's engine, so the hit-rate inputs
  ``kvtier_lookup_hit_tokens_total`` and ``kvtier_lookup_query_tokens_total``
  come from the connector here (its ``hit_tokens`` and ``query_tokens``: the
  tokens past vLLM's own prefix cache that kvtier served, and that it was
  asked for), and the engine's own lookup counters are not exported.
- every other engine statistic, per ``rank`` (and ``tier``, ``operation``,
  ``reason``), as kvtier/metrics.py names it. The engine's cumulative
  counts become Prometheus counters: each step adds the growth since the
  value last seen from that rank (a drop, i.e. a restarted worker, adds the
  new value, as a counter reset would).
- the engine's latency histograms as Prometheus histograms with the
  engine's bucket bounds (``kvtier_load_latency_seconds{tier}``,
  ``kvtier_store_latency_seconds{tier}``): each step adds each bucket's
  growth and the sum's growth to the histogram child, so ``_bucket``,
  ``_sum`` and ``_count`` equal the engine's own and histogram_quantile
  works. Where vLLM's histogram class is not prometheus_client's (no
  per-bucket counters to add to), each new sample is observed at its
  bucket's upper bound instead: the buckets stay exact, ``_sum`` is then an
  upper bound.
- not here: ``kvtier_health_status`` and the index-consistency families,
  which need ``engine.health()`` / ``engine.verify()`` in the worker; the
  controller's /metrics (``controller_listen``) serves them.

Metric objects are created on first sight of a key and cached for the
process: Prometheus' registry is process-wide, and one process may build
several vLLM engines (the in-process `LLM` class, tests), each with its own
KVTierPromMetrics, which must share the metrics rather than register them
twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from kvtier.metrics import Sample, config_samples, engine_samples

# Each rank's engine.stats() arrives as "engine.r<rank>" (see
# KVTierConnector.get_kv_connector_stats).
_ENGINE_KEY = re.compile(r"^engine\.r(\d+)$")
# Answered by the scheduler's catalogue view in vLLM, not the worker engine.
_ENGINE_SKIP = ("lookups", "lookup_hit_tokens", "lookup_query_tokens")
# Connector counters exported under the engine's family names as well.
_CONNECTOR_ALIASES = {"hit_tokens": "kvtier_lookup_hit_tokens", "query_tokens": "kvtier_lookup_query_tokens"}


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
        # (engine_idx, rank, name, labels) -> the engine's value (counters) or
        # (counts, sum) (histograms) as last seen.
        self._last: dict[tuple[int, str, str, tuple[tuple[str, str], ...]], Any] = {}
        self._config_seen: set[tuple[int, str]] = set()
        self._kvtier_config = _kvtier_config(vllm_config)

    def _metric(self, kind: str, name: str, doc: str, extra: tuple[str, ...], buckets: list[float] | None = None) -> Any:
        labelnames = (*self._labelnames, *extra)
        metric = _METRICS.get((name, labelnames))
        if metric is None:
            kwargs: dict[str, Any] = {"name": name, "documentation": f"kvtier: {doc}", "labelnames": list(labelnames)}
            if kind == "counter":
                metric = self._counter_cls(**kwargs)
            elif kind == "gauge":
                metric = self._gauge_cls(multiprocess_mode="mostrecent", **kwargs)
            else:
                metric = self._histogram_cls(buckets=buckets, **kwargs)
            _METRICS[(name, labelnames)] = metric
        return metric

    def _child(self, kind: str, name: str, doc: str, labels: Mapping[str, str], engine_idx: int,
               buckets: list[float] | None = None) -> Any:
        metric = self._metric(kind, name, doc, tuple(labels), buckets)
        return metric.labels(*self.per_engine_labelvalues[engine_idx], *labels.values())

    def observe(self, transfer_stats_data: dict[str, Any] | None, engine_idx: int = 0) -> None:
        if not transfer_stats_data:
            return
        for key, value in transfer_stats_data.items():
            if key in self._counter_names:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    continue
                alias = _CONNECTOR_ALIASES.get(key)
                if alias is not None:
                    self._child("counter", alias, key.replace("_", " "), {}, engine_idx).inc(float(value))
                if key != "query_tokens":  # exported under its alias only
                    self._child("counter", f"kvtier_{key}", f"connector {key.replace('_', ' ')}",
                                {}, engine_idx).inc(float(value))
                continue
            m = _ENGINE_KEY.match(key)
            if m is None or not isinstance(value, Mapping):
                continue
            rank = m.group(1)
            for sample in engine_samples(value, skip=_ENGINE_SKIP):
                self._record(sample, rank, engine_idx)
            if (engine_idx, rank) not in self._config_seen and self._kvtier_config is not None:
                self._config_seen.add((engine_idx, rank))
                for sample in config_samples(self._kvtier_config):
                    self._record(sample, rank, engine_idx)

    def _record(self, s: Sample, rank: str, engine_idx: int) -> None:
        labels = {"rank": rank, **dict(s.labels)}
        state_key = (engine_idx, rank, s.name, s.labels)
        if s.kind == "gauge":
            self._child("gauge", s.name, s.doc, labels, engine_idx).set(s.value)
        elif s.kind == "counter":
            last = self._last.get(state_key, 0.0)
            delta = s.value - last if s.value >= last else s.value
            self._last[state_key] = s.value
            # Created at 0 on first sight, as kvtier's own endpoint shows it.
            child = self._child("counter", s.name, s.doc, labels, engine_idx)
            if delta > 0:
                child.inc(delta)
        else:
            self._record_histogram(s, labels, state_key, engine_idx)

    def _record_histogram(self, s: Sample, labels: dict[str, str], state_key: Any, engine_idx: int) -> None:
        bounds = [b for b, _ in s.buckets[:-1]]
        counts: list[float] = []
        prev = 0.0
        for _, cumulative in s.buckets:  # back to per-bucket counts
            counts.append(cumulative - prev)
            prev = cumulative
        last_counts, last_sum = self._last.get(state_key, ([0.0] * len(counts), 0.0))
        if len(last_counts) != len(counts) or any(c < lc for c, lc in zip(counts, last_counts)):
            last_counts, last_sum = [0.0] * len(counts), 0.0  # a restarted worker
        self._last[state_key] = (counts, s.sum)
        deltas = [c - lc for c, lc in zip(counts, last_counts)]
        child = self._child("histogram", s.name, s.doc, labels, engine_idx, buckets=bounds)
        if not any(deltas):
            return
        buckets, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
        if buckets is not None and total is not None and len(buckets) == len(deltas):
            # prometheus_client keeps per-bucket (non-cumulative) counters and
            # cumulates them on collection: add the engine's growth as is.
            for bucket, d in zip(buckets, deltas):
                if d:
                    bucket.inc(d)
            total.inc(max(s.sum - last_sum, 0.0))
            return
        for i, d in enumerate(deltas):
            at = bounds[i] if i < len(bounds) else (bounds[-1] * 2 if bounds else 1.0)
            for _ in range(int(d)):
                child.observe(at)


def _kvtier_config(vllm_config: Any) -> Any:
    """kvtier's configuration as the connector loads it (for queue capacities)."""
    try:
        from kvtier.config import load_config
        from kvtier.vllm.connector import split_extra_config

        extra = getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_connector_extra_config", None)
        return load_config(split_extra_config(dict(extra or {}))[1])
    except Exception:  # noqa: BLE001 (metrics must never fail the server)
        return None
