"""deploy/: the Prometheus rules (promtool), the Grafana dashboard and the
Kubernetes manifests name only metrics that kvtier's expositions carry, and
the manifests hang together.

The expositions are real ones: kvtier.metrics over an in-process
kvtier.Engine with CPU, disk and remote (a redis-server this test starts)
tiers after some traffic, and kvtier.vllm.metrics fed that engine's stats
as vLLM would feed them.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from kvtier.engine import Engine, Namespace
from kvtier.metrics import VerifyResults, engine_registry
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "kvtier-rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "kvtier-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "kvtier.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Families only kvtier's own endpoint has (they need engine.health(),
# engine.verify() or a failing stats() call in the worker process).
OWN_ENDPOINT_ONLY = {
    "kvtier_up", "kvtier_health_status", "kvtier_engine_health_status", "kvtier_queue_depth", "kvtier_queue_capacity",
    "kvtier_index_consistent", "kvtier_index_missing_entries", "kvtier_index_orphan_entries",
    "kvtier_index_corrupt_entries", "kvtier_index_verify_timestamp_seconds",
}
HEALTH = {"kvtier_health_status", "kvtier_engine_health_status", "kvtier_queue_depth", "kvtier_queue_capacity"}
VERIFY = {"kvtier_index_consistent", "kvtier_index_missing_entries", "kvtier_index_orphan_entries",
          "kvtier_index_corrupt_entries", "kvtier_index_verify_timestamp_seconds"}
HISTOGRAMS = {"kvtier_load_latency_seconds", "kvtier_store_latency_seconds"}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian: prometheus; tools/setup.sh)")


# ------------------------------------------------------------ PromQL names

_FUNCTIONS_AND_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "label_values", "abs", "clamp_min",
    "clamp_max", "absent", "time", "vector", "scalar", "sort", "max_over_time", "min_over_time", "avg_over_time",
    "sum_over_time", "humanizePercentage", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression selects."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # dashboard variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word in _FUNCTIONS_AND_KEYWORDS or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names


def test_promql_name_extraction() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, tier) (rate(kvtier_load_latency_seconds_bucket{instance=~"$instance"}[5m])))'
    ) == {"kvtier_load_latency_seconds_bucket"}
    assert promql_metric_names(
        'a_total{x="y"} / on (job) b and ignoring (rank) kvtier:x:ratio > 0.5 or max by (t) (c{tier="cpu"}) == bool 2'
    ) == {"a_total", "b", "kvtier:x:ratio", "c"}


def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rules()["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for g in rules()["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(doc["panels"])
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            exprs.append(re.sub(r"^label_values\((\w+),.*\)$", r"\1", query))
    return exprs


# ------------------------------------------------------------ expositions


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def histogram_families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text) if f.type == "histogram"}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The own endpoint's and vLLM's sample names for one engine after traffic."""
    from kvtier.testing.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (tools/setup.sh): the remote tier's metrics need one")
    tmp = tmp_path_factory.mktemp("deploy")
    with RedisServer() as redis:
        eng = Engine({"chunk_size": 32, "cpu_capacity": "64MiB", "disk_path": str(tmp / "disk"),
                      "disk_capacity": "256MiB", "remote_url": redis.url},
                     Namespace(model="deploy-test", dtype="float32"))
        try:
            gen = torch.Generator().manual_seed(0)
            eng.register_kv_caches([torch.randn(32, 2, 16, 128, generator=gen) for _ in range(2)])
            tokens, slots = np.arange(1000, 1100), np.arange(100) + 32
            eng.store(tokens, slots).wait()
            eng.flush()
            eng.flush_remote()
            eng.lookup(tokens)
            eng.retrieve(tokens, slots)
            verify = VerifyResults()
            if hasattr(eng, "verify"):
                verify.record(0, eng.verify())
            own = generate_latest(engine_registry({0: eng}, verify)).decode()
            stats = eng.stats()
            vllm = vllm_exposition(stats)
            yield {"own": sample_names(own), "own_histograms": histogram_families(own), "vllm": sample_names(vllm),
                   "has_health": hasattr(eng, "health"), "has_verify": hasattr(eng, "verify"),
                   "has_histograms": "histograms" in stats}
        finally:
            eng.close()


def vllm_exposition(stats: dict[str, Any]) -> str:
    """What kvtier.vllm.metrics puts on vLLM's /metrics for these stats (a
    private registry with prometheus_client's classes, as vLLM passes them)."""
    import kvtier.vllm.metrics as vm
    from kvtier.vllm.connector import _COUNTERS
    from prometheus_client import Counter, Gauge, Histogram

    registry = CollectorRegistry()

    def gauge(**kw: Any) -> Gauge:
        kw.pop("multiprocess_mode", None)
        return Gauge(registry=registry, **kw)

    saved, vm._METRICS = vm._METRICS, {}
    try:
        # The connector's extra config, as vLLM holds it.
        transfer = types.SimpleNamespace(kv_connector_extra_config={"remote_url": "redis://127.0.0.1:1"})
        config = types.SimpleNamespace(kv_transfer_config=transfer)

        prom = vm.KVTierPromMetrics(
            config, {Gauge: gauge, Counter: functools.partial(Counter, registry=registry),
                       Histogram: functools.partial(Histogram, registry=registry)},
            ["model_name", "engine"], {0: ["m", "0"]}, _COUNTERS)
        prom.observe({**dict.fromkeys(_COUNTERS, 1), "engine.r0": stats})
    finally:
        vm._METRICS = saved
    return generate_latest(registry).decode()


def missing_names(names: set[str], exposed: dict[str, Any], side: str) -> set[str]:
    """Names not on that side's exposition (recording rules resolved)."""
    have = exposed[side]
    missing = set()
    for n in names:
        if ":" in n:
            if n not in recorded_names():
                missing.add(n)
            continue
        family = re.sub(r"_(bucket|sum|count|total)$", "", n)
        if side == "vllm" and family in OWN_ENDPOINT_ONLY:
            continue
        if (not exposed["has_health"] and family in HEALTH) or (not exposed["has_verify"] and family in VERIFY) or (
                not exposed["has_histograms"] and family in HISTOGRAMS):
            continue  # the engine build does not have it yet (asserted once it does)
        if n not in have:
            missing.add(n)
    return missing


def test_rules_name_only_exposed_metrics(exposed: dict[str, Any]) -> None:
    names = set().union(*(promql_metric_names(e) for e in rule_exprs()))
    assert len(names) > 15
    assert missing_names(names, exposed, "own") == set()
    assert missing_names(names, exposed, "vllm") == set()


def test_dashboard_names_only_exposed_metrics(exposed: dict[str, Any]) -> None:
    names = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    assert len(names) > 20
    assert missing_names(names, exposed, "own") == set()
    assert missing_names(names, exposed, "vllm") == set()
    # histogram_quantile is over real histograms.
    if exposed["has_histograms"]:
        assert HISTOGRAMS <= exposed["own_histograms"]


def test_name_check_catches_a_wrong_name(exposed: dict[str, Any]) -> None:
    assert missing_names({"kvtier_tier_used_byte", "kvtier:nope"}, exposed, "own") == {
        "kvtier_tier_used_byte", "kvtier:nope"}


# ------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_rules() -> None:
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_fire_and_do_not_fire() -> None:
    out = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    doc = yaml.safe_load(RULES_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        instances = {re.search(r'instance="([^"]+)"', s["series"]).group(1) for s in test["input_series"]}  # type: ignore[union-attr]
        for case in test.get("alert_rule_test", []):
            fired = {a["exp_labels"]["instance"] for a in case["exp_alerts"]}
            if fired:
                firing.add(case["alertname"])
            if instances - fired:
                quiet.add(case["alertname"])  # an input that must not fire
    assert alerts == firing, alerts ^ firing
    assert alerts == quiet, alerts ^ quiet


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rules file with a looser threshold fails the same tests."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("kvtier:hit_rate:ratio_rate5m < 0.2",
                                                                  "kvtier:hit_rate:ratio_rate5m < 0.05"))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    out = subprocess.run([promtool, "test", "rules", str(tmp_path / RULES_TEST.name)], capture_output=True, text=True,
                         check=False)
    assert out.returncode != 0 and "KVTierLowHitRate" in out.stdout + out.stderr


def test_every_alert_has_a_runbook_section() -> None:
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), flags=re.MULTILINE)}
    for g in rules()["groups"]:
        for r in g["rules"]:
            if "alert" not in r:
                continue
            ann = r["annotations"]
            assert ann.get("summary") and ann.get("description"), r["alert"]
            page, _, anchor = ann["runbook_url"].partition("#")
            assert page == "docs/operations.md" and anchor == r["alert"].lower(), ann["runbook_url"]
            assert anchor in anchors, (r["alert"], sorted(anchors))


# ------------------------------------------------------------ Kubernetes

K8S = DEPLOY / "k8s"


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == one("Namespace", "kvtier")["metadata"]["name"]


def test_core_manifests_match_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (tools/requirements.txt)")
    version = kubernetes_validate.latest_version()
    core = [d for d in k8s_docs() if d["apiVersion"] in ("v1", "apps/v1")]
    assert {d["kind"] for d in core} == {"Namespace", "ConfigMap", "Secret", "Deployment", "Service"}
    for d in core:
        kubernetes_validate.validate(d, version, strict=True)  # raises ValidationError
    bad = {**one("Service", "kvtier-vllm"), "spec": {"ports": [{"port": "eighty"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def container(deployment: str, name: str) -> dict[str, Any]:
    pod = one("Deployment", deployment)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def kvtier_config_text() -> str:
    return one("ConfigMap", "kvtier-config")["data"]["kvtier.yaml"]


def test_kvtier_config_is_valid_and_fits_the_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ConfigMap's file passes kvtier's own validation, with the
    container's memory limit as the machine's memory."""
    import kvtier
    import kvtier.config

    limit = kvtier.config.parse_size(container("kvtier-vllm", "vllm")["resources"]["limits"]["memory"].replace("Gi", "GiB"))
    monkeypatch.setattr(kvtier.config, "_memory_limit", lambda: (limit, "the pod's memory limit"))
    path = tmp_path / "kvtier.yaml"
    path.write_text(kvtier_config_text())
    env = {"KVTIER_CONFIG": str(path), "KVTIER_CONTROLLER_TOKEN": "x" * 32}
    cfg = kvtier.load_config(environ=env)
    assert cfg.remote_url and cfg.disk_path and cfg.controller_listen


def test_deployment_wires_config_ports_volumes_and_token() -> None:
    import kvtier

    cfg_text = kvtier_config_text()
    cfg = yaml.safe_load(cfg_text)
    c = container("kvtier-vllm", "vllm")
    pod = one("Deployment", "kvtier-vllm")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The controller's port is the config's (rank 0 at TP=1) and vLLM's is --port.
    assert ports["controller"] == int(cfg["controller_listen"].rsplit(":", 1)[1])
    assert f"--port={ports['http']}" in c["args"]
    # The connector is kvtier's.
    ktc = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
    assert ktc["kv_connector"] == "KVTierConnector" and ktc["kv_connector_module_path"] == "kvtier.vllm"
    # The config file is mounted where KVTIER_CONFIG points; the disk tier's
    # directory is a volume; /dev/shm is memory.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir, config_file = env["KVTIER_CONFIG"]["value"].rsplit("/", 1)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "kvtier-config"
    assert config_file in one("ConfigMap", "kvtier-config")["data"]
    assert cfg["disk_path"] in mounts
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    disk_limit = kvtier.config.parse_size(volumes[mounts[cfg["disk_path"]]]["emptyDir"]["sizeLimit"].replace("Gi", "GiB"))
    assert kvtier.config.parse_size(cfg["disk_capacity"]) < disk_limit
    # Off loopback the controller needs its token: from the Secret.
    ref = env["KVTIER_CONTROLLER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in one("Secret", ref["name"])["stringData"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_select_their_pods_and_ports() -> None:
    for svc in by_kind("Service"):
        pods = [d for d in by_kind("Deployment")
                if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(pods) == 1, svc["metadata"]["name"]
        deployment = pods[0]
        assert selects(deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
        named = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named, (svc["metadata"]["name"], port)
    # The remote tier's URL names the Redis Service and its port.
    url = yaml.safe_load(kvtier_config_text())["remote_url"]
    host, port = url.removeprefix("redis://").split(":")
    assert [p["port"] for p in one("Service", host)["spec"]["ports"]] == [int(port)]


def test_servicemonitor_scrapes_vllm_and_the_controller() -> None:
    (sm,) = by_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one("Service", "kvtier-vllm")
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    endpoints = {e["port"]: e for e in sm["spec"]["endpoints"]}
    assert set(endpoints) == {p["name"] for p in svc["spec"]["ports"]} == {"http", "controller"}
    assert all(e["path"] == "/metrics" for e in endpoints.values())
    token = endpoints["controller"]["bearerTokenSecret"]
    assert token["key"] in one("Secret", token["name"])["stringData"]


def test_prometheusrule_is_the_rules_file() -> None:
    import importlib.util

    (rule,) = by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == rules()
    spec = importlib.util.spec_from_file_location("render_prometheusrule", K8S / "render_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (K8S / "prometheusrule.yaml").read_text() == module.render(), "run deploy/k8s/render_prometheusrule.py"
