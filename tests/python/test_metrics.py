"""kvtier.metrics (kvtier's own exposition) over a real engine, and
kvtier.vllm.metrics (vLLM's /metrics) giving the same families and values."""

from __future__ import annotations

import functools
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kvtier.engine import Engine, Namespace
from kvtier.metrics import VerifyResults, engine_registry, engine_samples, serve_metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 2, 32, 2, 16, 64


def make_engine(tmp_path: Path, **over: object) -> Engine:
    cfg = {"chunk_size": 32, "cpu_capacity": "64MiB", "disk_path": str(tmp_path / "disk"), "disk_capacity": "256MiB"}
    cfg.update(over)
    eng = Engine(cfg, Namespace(model="metrics-test", dtype="float32"))
    gen = torch.Generator().manual_seed(0)
    eng.register_kv_caches([torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen) for _ in range(LAYERS)])
    return eng


def traffic(eng: Engine, first: int, n_tokens: int = 100) -> None:
    """Store, then look up and load, one prefix of n_tokens tokens."""
    tokens = np.arange(first, first + n_tokens)
    slots = np.arange(n_tokens) + 2 * BLOCK
    eng.store(tokens, slots).wait()
    eng.flush()
    eng.lookup(tokens)
    eng.retrieve(tokens, slots)


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(tmp_path)
    yield eng
    eng.close()


def test_exposition_carries_the_engine_stats_and_moves_with_traffic(engine: Engine) -> None:
    registry = engine_registry({0: engine})
    traffic(engine, 1000)
    before, stats = samples(registry), engine.stats()
    assert value(before, "kvtier_up", rank="0") == 1
    assert value(before, "kvtier_lookup_hit_tokens_total", rank="0") == stats["lookup_hit_tokens"] == 100
    assert value(before, "kvtier_lookup_query_tokens_total", rank="0") == stats["lookup_query_tokens"] == 100
    assert value(before, "kvtier_chunks_total", rank="0", operation="store") == stats["chunks_stored"] == 4
    assert value(before, "kvtier_chunks_total", rank="0", operation="load") == stats["chunks_loaded"]
    for tier in ("cpu", "disk"):
        t = stats["tiers"][tier]
        assert value(before, "kvtier_tier_used_bytes", rank="0", tier=tier) == t["used_bytes"] > 0
        assert value(before, "kvtier_tier_capacity_bytes", rank="0", tier=tier) == t["capacity_bytes"]
        assert value(before, "kvtier_tier_entries", rank="0", tier=tier) == t["entries"] == 4
    assert value(before, "kvtier_write_behind_queue_capacity", rank="0") == 1024  # the config's default

    # A miss raises the query tokens only; a hit raises both by its tokens.
    engine.lookup(np.arange(50_000, 50_064))
    traffic(engine, 1000)
    after = samples(registry)
    assert value(after, "kvtier_lookup_query_tokens_total", rank="0") == 100 + 64 + 100
    assert value(after, "kvtier_lookup_hit_tokens_total", rank="0") == 100 + 100
    assert value(after, "kvtier_chunks_total", rank="0", operation="load") > value(
        before, "kvtier_chunks_total", rank="0", operation="load")


def _numeric_leaves(d: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numeric_leaves(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield prefix + k


def test_every_stat_has_a_named_family(engine: Engine) -> None:
    """No stat of this engine falls back to the catch-all kvtier_stat_*
    gauge: each has a family with its kind, unit and labels."""
    traffic(engine, 1000)
    stats = engine.stats()
    names = {s.name for s in engine_samples(stats)}
    assert not {n for n in names if n.startswith(("kvtier_stat_", "kvtier_tier_stat_", "kvtier_remote_stat_", "kvtier_transport_stat_"))}
    # And every numeric leaf is exported (histograms as whole families).
    aliases = {f"{t}." for t in stats["tiers"]}  # stats()["cpu"] is stats()["tiers"]["cpu"]
    leaves = [k for k in _numeric_leaves(stats) if not k.startswith(("histograms.", *aliases))]
    exported = [s for s in engine_samples(stats) if s.kind != "histogram"]
    evictions_split = sum(1 for k in leaves if k.endswith(".evictions_capacity"))
    assert len(exported) == len(leaves) - evictions_split, (sorted(leaves), sorted(s.name for s in exported))


def test_unknown_stats_are_still_exported() -> None:
    got = {(s.name, s.kind, s.value) for s in engine_samples({"new_thing": 3, "tiers": {"cpu": {"odd": 2}},
                                                              "nested": {"x": 1.5}})}
    assert got == {("kvtier_stat_new_thing", "gauge", 3.0), ("kvtier_tier_stat_odd", "gauge", 2.0),
                   ("kvtier_stat_nested_x", "gauge", 1.5)}


def test_histograms_become_cumulative_seconds() -> None:
    stats = {"histograms": {"load_us": {"disk": {"bounds": [10, 20, 50], "counts": [1, 2, 0, 3], "sum": 400, "count": 6}},
                            "store_us": {"cpu": {"bounds": [10], "counts": [0, 0], "sum": 0, "count": 0}}}}

    class Fake:
        def stats(self) -> dict[str, Any]:
            return stats

    got = samples(engine_registry({3: Fake()}))
    le = {"rank": "3", "tier": "disk"}
    assert [value(got, "kvtier_load_latency_seconds_bucket", **le, le=b) for b in ("1e-05", "2e-05", "5e-05", "+Inf")] == [
        1, 3, 3, 6]
    assert value(got, "kvtier_load_latency_seconds_count", **le) == 6
    assert value(got, "kvtier_load_latency_seconds_sum", **le) == pytest.approx(400e-6)
    assert value(got, "kvtier_store_latency_seconds_count", rank="3", tier="cpu") == 0


def test_engine_histograms_are_exported(engine: Engine) -> None:
    traffic(engine, 1000)
    stats = engine.stats()
    if "histograms" not in stats:
        pytest.skip("this engine build has no stats()['histograms'] yet")
    got = samples(engine_registry({0: engine}))
    h = stats["histograms"]["load_us"]["cpu"]
    assert value(got, "kvtier_load_latency_seconds_count", rank="0", tier="cpu") == h["count"] > 0
    assert value(got, "kvtier_load_latency_seconds_bucket", rank="0", tier="cpu", le="+Inf") == h["count"]


def test_evictions_by_reason() -> None:
    class Fake:
        def stats(self) -> dict[str, Any]:
            return {"tiers": {"cpu": {"evictions": 7, "evictions_capacity": 7, "evictions_expired": 2, "evictions_clear": 1},
                              "disk": {"evictions": 4}}}

    got = samples(engine_registry({0: Fake()}))
    ev = "kvtier_tier_evictions_total"
    assert value(got, ev, rank="0", tier="cpu", reason="capacity") == 7
    assert value(got, ev, rank="0", tier="cpu", reason="expired") == 2
    assert value(got, ev, rank="0", tier="cpu", reason="clear") == 1
    assert value(got, ev, rank="0", tier="disk", reason="capacity") == 4  # no breakdown: `evictions` is capacity
    assert sum(v for (n, lbl), v in got.items() if n == ev and ("tier", "cpu") in lbl) == 10


def test_health_and_verify(engine: Engine) -> None:
    class WithHealth:
        def __init__(self, inner: Engine) -> None:
            self.inner = inner
            self.config = inner.config

        def stats(self) -> dict[str, Any]:
            return self.inner.stats()

        def health(self) -> dict[str, Any]:
            return {"status": "degraded", "tiers": {"cpu": {"status": "ok"}, "disk": {"status": "degraded"},
                                                    "remote": {"status": "ok", "enabled": False}},
                    "queues": {"write_behind": 3, "write_behind_capacity": 1024}}

    verify = VerifyResults()
    registry = engine_registry({0: WithHealth(engine)}, verify)
    got = samples(registry)
    assert value(got, "kvtier_engine_health_status", rank="0") == 1
    assert value(got, "kvtier_health_status", rank="0", tier="cpu") == 0
    assert value(got, "kvtier_health_status", rank="0", tier="disk") == 1
    assert ("kvtier_health_status", frozenset({("rank", "0"), ("tier", "remote")})) not in got  # not configured
    assert value(got, "kvtier_queue_depth", rank="0", queue="write_behind") == 3
    assert value(got, "kvtier_queue_capacity", rank="0", queue="write_behind") == 1024
    assert not any(n.startswith("kvtier_index_") for n, _ in got)  # no verify yet: nothing made up
    verify.record(0, {"consistent": False, "missing": {"cpu": 0, "disk": 2}, "orphans": {"disk": 1}, "corrupt": 1},
                  at=1234.0)
    got = samples(registry)
    assert value(got, "kvtier_index_consistent", rank="0") == 0
    assert value(got, "kvtier_index_missing_entries", rank="0", tier="disk") == 2
    assert value(got, "kvtier_index_orphan_entries", rank="0", tier="disk") == 1
    assert value(got, "kvtier_index_corrupt_entries", rank="0") == 1
    assert value(got, "kvtier_index_verify_timestamp_seconds", rank="0") == 1234.0


def test_real_engine_health_when_present(engine: Engine) -> None:
    if not hasattr(engine, "health"):
        pytest.skip("this engine build has no Engine.health() yet")
    got = samples(engine_registry({0: engine}))
    assert value(got, "kvtier_engine_health_status", rank="0") == 0
    assert value(got, "kvtier_health_status", rank="0", tier="disk") == 0


def test_closed_engine_is_down_and_the_scrape_still_works(tmp_path: Path) -> None:
    a, b = make_engine(tmp_path / "a"), make_engine(tmp_path / "b")
    b.close()
    got = samples(engine_registry({0: a, 1: b}))
    assert value(got, "kvtier_up", rank="0") == 1 and value(got, "kvtier_up", rank="1") == 0
    assert ("kvtier_tier_used_bytes", frozenset({("rank", "1"), ("tier", "cpu")})) not in got
    a.close()


def test_serve_metrics_over_http(engine: Engine) -> None:
    traffic(engine, 1000)
    server = serve_metrics({0: engine}, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as r:
            page = r.read().decode()
    finally:
        server.shutdown()
    assert 'kvtier_lookup_hit_tokens_total{rank="0"} 100.0' in page


# ---------------------------------------------------------------- vLLM side


def vllm_prom_metrics(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> Any:
    """KVTierPromMetrics with prometheus_client's classes on a private registry
    (vLLM passes its own classes; the process-wide cache is emptied)."""
    import kvtier.vllm.metrics as vm
    from kvtier.vllm.connector import _COUNTERS
    from prometheus_client import Counter, Gauge, Histogram

    monkeypatch.setattr(vm, "_METRICS", {})

    class Config:
        kv_transfer_config = None

    def gauge(**kw: Any) -> Gauge:
        kw.pop("multiprocess_mode", None)
        return Gauge(registry=registry, **kw)

    types = {Gauge: gauge, Counter: functools.partial(Counter, registry=registry),
             Histogram: functools.partial(Histogram, registry=registry)}
    return vm.KVTierPromMetrics(Config(), types, ["model_name", "engine"], {0: ["m", "0"]}, _COUNTERS)


def test_vllm_side_has_the_same_families_and_values(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    prom = vllm_prom_metrics(registry, monkeypatch)

    def with_cpu_load_histogram(stats: dict[str, Any], h: dict[str, Any]) -> dict[str, Any]:
        # A known load_us.cpu histogram in place of the engine's (the others stay).
        hists = dict(stats.get("histograms", {}))
        hists["load_us"] = {**hists.get("load_us", {}), "cpu": h}
        return {**stats, "histograms": hists}

    traffic(engine, 1000)
    prom.observe({"lookups": 1, "hit_tokens": 96, "query_tokens": 100, "chunks_saved": 4,
                  "engine.r0": with_cpu_load_histogram(
                      engine.stats(), {"bounds": [10, 20], "counts": [1, 0, 0], "sum": 5, "count": 1})})
    traffic(engine, 2000)
    last = with_cpu_load_histogram(engine.stats(), {"bounds": [10, 20], "counts": [1, 2, 1], "sum": 95, "count": 4})
    prom.observe({"lookups": 1, "hit_tokens": 0, "query_tokens": 50, "engine.r0": last})

    class Frozen:  # the engine as the last step saw it
        config = engine.config

        def stats(self) -> dict[str, Any]:
            return last

    own = samples(engine_registry({0: Frozen()}))
    got = samples(registry)
    vl = {"model_name": "m", "engine": "0"}
    # The connector's counters (step deltas summed), under the hit-rate names too.
    assert value(got, "kvtier_lookup_hit_tokens_total", **vl) == value(got, "kvtier_hit_tokens_total", **vl) == 96
    assert value(got, "kvtier_lookup_query_tokens_total", **vl) == 150
    assert value(got, "kvtier_lookups_total", **vl) == 2
    # The engine's cumulative counters arrive as counters with the engine's value.
    for name, labels in (("kvtier_chunks_total", {"operation": "store"}), ("kvtier_tier_puts_total", {"tier": "disk"}),
                         ("kvtier_tier_used_bytes", {"tier": "cpu"}), ("kvtier_write_behind_queue_capacity", {}),
                         ("kvtier_bytes_total", {"operation": "load"})):
        assert value(got, name, **vl, rank="0", **labels) == value(own, name, rank="0", **labels) > 0, name
    # The histogram is a real one: the engine's buckets, sum and count.
    h = {**vl, "rank": "0", "tier": "cpu"}
    assert [value(got, "kvtier_load_latency_seconds_bucket", **h, le=b) for b in ("1e-05", "2e-05", "+Inf")] == [1, 3, 4]
    assert value(got, "kvtier_load_latency_seconds_count", **h) == 4
    assert value(got, "kvtier_load_latency_seconds_sum", **h) == pytest.approx(95e-6)
    # Same family names, kinds aside from vLLM's extra labels (the engine's
    # lookup counters are the connector's here; health/verify are the
    # controller's).
    own_only = ("kvtier_up", "kvtier_health_status", "kvtier_engine_health_status", "kvtier_queue_", "kvtier_index_")
    own_names = {n for n, _ in own if not n.startswith(own_only)}
    assert own_names - {n for n, _ in got} == set(), own_names - {n for n, _ in got}


def test_vllm_side_counter_reset_and_idle_steps(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    prom = vllm_prom_metrics(registry, monkeypatch)
    stats = engine.stats()
    prom.observe({"engine.r0": {**stats, "chunks_stored": 10}})
    prom.observe({"engine.r0": {**stats, "chunks_stored": 10}})  # nothing new
    prom.observe({"engine.r0": {**stats, "chunks_stored": 3}})  # a restarted worker
    prom.observe(None)
    got = samples(registry)
    assert value(got, "kvtier_chunks_total", model_name="m", engine="0", rank="0", operation="store") == 13


def test_demo_reads_hit_rate_and_tiers_off_the_page(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's ending: the lines an operator reads off vLLM's /metrics."""
    from kvtier.bench.demo import metrics_lines

    registry = CollectorRegistry()
    prom = vllm_prom_metrics(registry, monkeypatch)
    traffic(engine, 1000)
    prom.observe({"lookups": 2, "hit_tokens": 96, "query_tokens": 128, "engine.r0": engine.stats()})
    lines = metrics_lines(generate_latest(registry).decode())
    assert lines[0].startswith("kvtier hit rate: 75.0% (96 hit / 128 query tokens")
    cpu, disk = engine.stats()["tiers"]["cpu"], engine.stats()["tiers"]["disk"]
    assert lines[1].startswith("kvtier tier cpu ") and f"{cpu['entries']} entries" in lines[1]
    assert f"{cpu['used_bytes'] / (1 << 20):.1f} MiB of 64 MiB" in lines[1]
    assert lines[2].startswith("kvtier tier disk ") and f"{disk['entries']} entries" in lines[2]
    assert len(lines) == 3  # no remote tier configured: no remote line


def test_vllm_side_histogram_without_bucket_counters(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A histogram class without prometheus_client's per-bucket counters (vLLM
    may pass another): each new sample is observed at its bucket's upper
    bound, so the buckets and the count stay exact."""
    from prometheus_client import Histogram

    registry = CollectorRegistry()
    prom = vllm_prom_metrics(registry, monkeypatch)

    class ObserveOnly:
        def __init__(self, **kw: Any) -> None:
            self._h = Histogram(registry=registry, **kw)

        def labels(self, *values: Any) -> Any:
            child = self._h.labels(*values)
            return type("Child", (), {"observe": staticmethod(child.observe)})()

    prom._histogram_cls = ObserveOnly
    h = {"bounds": [10, 20], "counts": [2, 0, 1], "sum": 70, "count": 3}
    prom.observe({"engine.r0": {"histograms": {"store_us": {"disk": h}}}})
    got = samples(registry)
    lbl = {"model_name": "m", "engine": "0", "rank": "0", "tier": "disk"}
    assert [value(got, "kvtier_store_latency_seconds_bucket", **lbl, le=b) for b in ("1e-05", "2e-05", "+Inf")] == [
        2, 2, 3]
    assert value(got, "kvtier_store_latency_seconds_count", **lbl) == 3
