"""The kvtier demo: multi-round chat and long-document QA through vLLM, with and without kvtier.

Runs the TTFT benchmark's workloads in two modes (no connector, kvtier with
its default CPU + local disk tiers), prints TTFT per request side by side,
kvtier's hit rate and bytes per tier, and writes a PNG of TTFT per round.
It ends with what an operator reads off the metrics endpoint: the kvtier
mode's process serves its Prometheus registry (what `vllm serve` puts on
/metrics) over HTTP, scrapes it once, and the demo prints the hit rate and
the per-tier lines from that page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from typing import Any

from kvtier.bench import ttft


def _table(none: dict[str, Any], kv: dict[str, Any]) -> list[str]:
    lines = [f"{'request':<22}{'no kvtier':>12}{'kvtier':>12}{'speedup':>9}"]

    def row(name: str, a: float, b: float) -> None:
        lines.append(f"{name:<22}{a * 1000:>10.0f}ms{b * 1000:>10.0f}ms{a / b:>8.1f}x")

    for i, (a, b) in enumerate(zip(none["doc"]["cold"], kv["doc"]["cold"])):
        row(f"doc {i} (cold)", a, b)
    for i, (a, b) in enumerate(zip(none["doc"]["warm"], kv["doc"]["warm"])):
        row(f"doc question {i} (warm)", a, b)
    for r, (ra, rb) in enumerate(zip(none["chat"]["per_round"], kv["chat"]["per_round"])):
        for u, (a, b) in enumerate(zip(ra, rb)):
            row(f"chat user {u} round {r + 1}", a, b)
    return lines


def plot(none: dict[str, Any], kv: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = list(range(1, len(none["chat"]["per_round"]) + 1))
    for label, res in (("vLLM alone", none), ("vLLM + kvtier", kv)):
        means = [1000 * sum(x) / len(x) for x in res["chat"]["per_round"]]
        ax1.plot(rounds, means, marker="o", label=label)
    ax1.set_xlabel("chat round")
    ax1.set_ylabel("mean TTFT (ms)")
    ax1.set_title("Multi-round chat")
    ax1.set_xticks(rounds)
    ax1.legend()
    names = ["cold pass", "warm pass"]
    width = 0.35
    for k, (label, res) in enumerate((("vLLM alone", none), ("vLLM + kvtier", kv))):
        vals = [1000 * sum(res["doc"][p]) / len(res["doc"][p]) for p in ("cold", "warm")]
        ax2.bar([x + k * width for x in range(2)], vals, width, label=label)
    ax2.set_xticks([x + width / 2 for x in range(2)], names)
    ax2.set_ylabel("mean TTFT (ms)")
    ax2.set_title("Long-document QA")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scrape_metrics() -> tuple[str, str]:
    """This process's Prometheus registry (vLLM's metrics and kvtier's, as
    `vllm serve` exposes them on /metrics), served on a free local port and
    fetched once over HTTP. Returns (url, page)."""
    from prometheus_client import start_http_server

    started = start_http_server(0, addr="127.0.0.1")
    server = started[0] if isinstance(started, tuple) else started
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return url, r.read().decode()
    finally:
        server.shutdown()


def metrics_lines(page: str) -> list[str]:
    """The hit rate and per-tier lines an operator reads off a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[str, float] = {}
    tiers: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if not s.name.startswith("kvtier_"):
                continue
            total[s.name] = total.get(s.name, 0.0) + s.value
            tier = s.labels.get("tier")
            if tier is not None:
                tiers.setdefault(tier, {})
                tiers[tier][s.name] = tiers[tier].get(s.name, 0.0) + s.value
    hit, query = total.get("kvtier_lookup_hit_tokens_total", 0.0), total.get("kvtier_lookup_query_tokens_total", 0.0)
    lines = [(f"kvtier hit rate: {hit / query if query else 0.0:.1%} "
              f"({int(hit)} hit / {int(query)} query tokens: kvtier_lookup_hit_tokens_total / "
              "kvtier_lookup_query_tokens_total)")]
    mib = 1 << 20
    for tier in ("cpu", "disk", "remote"):
        t = tiers.get(tier)
        if not t or "kvtier_tier_capacity_bytes" not in t:
            continue
        evictions = t.get("kvtier_tier_evictions_total", 0.0)
        lines.append(
            f"kvtier tier {tier:<5} {t.get('kvtier_tier_used_bytes', 0.0) / mib:8.1f} MiB of "
            f"{t['kvtier_tier_capacity_bytes'] / mib:.0f} MiB, {int(t.get('kvtier_tier_entries', 0))} entries, "
            f"{int(t.get('kvtier_tier_chunks_loaded_total', 0))} chunks served, "
            f"{int(t.get('kvtier_tier_puts_total', 0))} puts, {int(evictions)} evictions")
    return lines


def _kvtier_worker(args: argparse.Namespace) -> int:
    """The kvtier mode (ttft.run_mode), then one scrape of this process's
    metrics endpoint; both go to the result file."""
    from kvtier.testing.vllm_runner import setup_env

    setup_env()
    wl = ttft.Workload(**json.loads(args._workload))
    result = ttft.run_mode("kvtier", wl, args._model, args._workdir, progress=True)
    result["metrics_url"], result["metrics_page"] = scrape_metrics()
    with open(args._out, "w") as f:
        json.dump(result, f)
    return 0


def _run_kvtier(wl: ttft.Workload, model_path: str, workdir: str) -> dict[str, Any]:
    out = os.path.join(workdir, "kvtier-demo.json")
    cmd = [sys.executable, "-m", "kvtier.bench.demo", "--_kvtier-worker", "--_workload",
           json.dumps(dataclasses.asdict(wl)), "--_model", model_path, "--_workdir", workdir, "--_out", out]
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"the kvtier mode failed with exit code {proc.returncode}")
    with open(out) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtier bench demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="kvtier-demo")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--_kvtier-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--_workload", "--_model", "--_workdir", "--_out"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._kvtier_worker:
        return _kvtier_worker(args)

    from kvtier.testing.model import make_model

    os.makedirs(args.out_dir, exist_ok=True)
    print("[demo] making the random-init Llama (cached after the first run) ...", flush=True)
    model_path = str(make_model())
    wl = ttft.Workload(docs=args.docs, doc_tokens=args.doc_tokens, users=args.users,
                       rounds=args.rounds, system_tokens=1024, turn_tokens=64, answer_tokens=16)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as workdir:
        for mode in ("none", "kvtier"):
            print(f"[demo] serving the workload with {'kvtier' if mode == 'kvtier' else 'vLLM alone'} ...",
                  flush=True)
            if mode == "kvtier":
                results[mode] = _run_kvtier(wl, model_path, workdir)
            else:
                results[mode] = ttft.run_in_subprocess(mode, wl, model_path, workdir, progress=True)
    none, kv = results["none"], results["kvtier"]
    print("\n".join(_table(none, kv)))
    summary = ttft.summarize(results)
    k = summary["modes"]["kvtier"]
    es = kv.get("engine_stats", {})
    served = float(kv.get("external_hits", 0))
    prompt_tokens = float(kv.get("prompt_tokens", 0)) or 1.0
    print(f"\nkvtier served {served / prompt_tokens:.0%} of all prompt tokens "
          f"({int(served)} of {int(prompt_tokens)}; vLLM's external prefix cache hits), "
          f"{int(es.get('chunks_loaded_cpu', 0))} chunks loaded from CPU, "
          f"{int(es.get('chunks_loaded_disk', 0))} from disk")
    mib = 1 << 20
    print(f"CPU tier:  {es.get('tiers_cpu_used_bytes', 0) / mib:8.1f} MiB in {int(es.get('tiers_cpu_entries', 0))} chunks "
          f"(capacity {es.get('tiers_cpu_capacity_bytes', 0) / mib:.0f} MiB, "
          f"{int(es.get('tiers_cpu_evictions', 0))} evictions)")
    if "tiers_disk_used_bytes" in es:
        print(f"disk tier: {es.get('tiers_disk_used_bytes', 0) / mib:8.1f} MiB in {int(es.get('tiers_disk_entries', 0))} chunks "
              f"({int(es.get('write_behind_written', 0))} written behind, "
              f"{int(es.get('write_behind_failed', 0))} failed)")
    print(f"outputs identical to vLLM alone: {k.get('outputs_equal_none')}")
    png = os.path.join(args.out_dir, "ttft_per_round.png")
    try:
        plot(none, kv, png)
        print(f"plot: {png}")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    page = kv.get("metrics_page", "")
    with open(os.path.join(args.out_dir, "metrics.txt"), "w") as f:
        f.write(page)
    print(f"\nFrom the metrics endpoint ({kv.get('metrics_url')}; saved as {os.path.join(args.out_dir, 'metrics.txt')}),"
          " as an operator reads it (docs/operations.md):")
    print("\n".join(metrics_lines(page)))
    return 0 if k.get("outputs_equal_none") else 1


if __name__ == "__main__":
    sys.exit(main())
