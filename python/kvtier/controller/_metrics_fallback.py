"""A minimal kvtier_* collector, used only while kvtier.metrics is absent.

kvtier.metrics.engine_registry is the exposition the project documents;
this stand-in exports engine.stats() as gauges (``kvtier_engine_<key>{rank}``
and ``kvtier_tier_<field>{tier, rank}``) so that the controller's /metrics
serves something in a build without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


class _EngineCollector(Collector):
    def __init__(self, engines: dict[int, Any]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, f"kvtier: {name}", labels=labels)
            return family

        up = GaugeMetricFamily("kvtier_up", "1 when the engine answers stats()", labels=["rank"])
        for rank, engine in self._engines.items():
            try:
                stats = engine.stats()
            except Exception:  # noqa: BLE001 - a closed engine: the scrape must still succeed
                up.add_metric([str(rank)], 0.0)
                continue
            up.add_metric([str(rank)], 1.0)
            for key, value in stats.items():
                if key == "tiers" and isinstance(value, dict):
                    for tier, fields in value.items():
                        for field, v in fields.items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                gauge(f"kvtier_tier_{_name(field)}", ["tier", "rank"]).add_metric([tier, str(rank)], float(v))
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    gauge(f"kvtier_engine_{_name(key)}", ["rank"]).add_metric([str(rank)], float(value))
        yield up
        yield from families.values()


def engine_registry(engines: dict[int, Any]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engines))
    return registry
