"""Cross-instance TTFT through a shared Redis: what instance B gains from
what instance A stored, as a client of `vllm serve` sees it.

For each store (one redis-server, then a 3-master Redis Cluster), the
benchmark starts the OpenAI server as instance A (kvtier with the remote
tier, its own disk directory) and sends the long-document workload once:
A's TTFT is the recompute baseline. A stops once its uploads have landed.
Then instance B (another process, another disk directory, nothing local)
serves the same prompts twice: the first pass is served from the remote
(fetched, checked, filed in B's CPU tier, loaded), the second from B's own
CPU tier. Outputs are greedy and compared with A's. TTFT is the client's
time to the first streamed token. The JSON summary is printed last.

    kvtier bench remote-ttft --docs 3 --doc-tokens 3072 --stores redis,cluster
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.bench.serve_ttft import stream_ttft


def kv_config(disk: Path, url: str, cpu_capacity: str) -> dict[str, Any]:
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_capacity": cpu_capacity, "disk_path": str(disk), "remote_url": url},
    }


def run_store(kind: str, args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    from kvtier.testing.model import random_tokens
    from kvtier.testing.redis_server import RedisCluster, RedisServer
    from kvtier.testing.vllm_server import VllmServer

    docs = [random_tokens(args.doc_tokens, seed=3000 + i) for i in range(args.docs)]
    store: Any = RedisServer() if kind == "redis" else RedisCluster(3)
    out: dict[str, Any] = {"a": [], "b_remote": [], "b_cpu": [], "outputs": {}}
    with store:
        log = workdir / f"{kind}-a.log"
        print(f"[remote-ttft] {kind}: instance A (log {log})", file=sys.stderr, flush=True)
        config = kv_config(workdir / f"{kind}-a", store.url, args.cpu_capacity)
        with VllmServer(model, kv_transfer_config=config, max_model_len=args.doc_tokens + 256, log_path=log) as a:
            stream_ttft(a, random_tokens(16, seed=7), 1)  # one-off warm-up
            for i, d in enumerate(docs):
                ttft, text = stream_ttft(a, d, args.max_tokens)
                out["a"].append(ttft)
                out["outputs"][f"a{i}"] = text
            deadline = time.monotonic() + 120
            while store.dbsize() < args.docs * (args.doc_tokens // 256) and time.monotonic() < deadline:
                time.sleep(0.2)
        out["keys"] = store.dbsize()
        log = workdir / f"{kind}-b.log"
        print(f"[remote-ttft] {kind}: instance B (log {log})", file=sys.stderr, flush=True)
        config = kv_config(workdir / f"{kind}-b", store.url, args.cpu_capacity)
        with VllmServer(model, kv_transfer_config=config, max_model_len=args.doc_tokens + 256, log_path=log) as b:
            stream_ttft(b, random_tokens(16, seed=7), 1)
            for phase in ("b_remote", "b_cpu"):
                for i, d in enumerate(docs):
                    ttft, text = stream_ttft(b, d, args.max_tokens)
                    out[phase].append(ttft)
                    out["outputs"][f"{phase}{i}"] = text
            out["external_hits"] = b.metrics().get("vllm:external_prefix_cache_hits_total", 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtier bench remote-ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the random test Llama)")
    p.add_argument("--stores", default="redis,cluster", help="comma list of redis,cluster")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=3072)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--cpu-capacity", default="1GiB")
    p.add_argument("--json", default=None, help="also write the summary and raw results here")
    args = p.parse_args(argv)
    from kvtier.testing.model import make_model

    model = args.model or str(make_model())
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-remote-ttft-") as tmp:
        for kind in (s for s in args.stores.split(",") if s):
            if kind not in ("redis", "cluster"):
                raise SystemExit(f"unknown store {kind!r}; choose from redis, cluster")
            results[kind] = run_store(kind, args, model, Path(tmp))
    summary: dict[str, Any] = {}
    for kind, r in results.items():
        a, br, bc = (statistics.mean(r[k]) for k in ("a", "b_remote", "b_cpu"))
        outs = r["outputs"]
        summary[kind] = {
            "a_recompute_mean_s": a,
            "b_from_remote_mean_s": br,
            "b_from_own_cpu_mean_s": bc,
            "remote_vs_recompute": a / br,
            "remote_vs_own_cpu": br / bc,
            "external_hits": r["external_hits"],
            "outputs_equal": all(outs[f"b_remote{i}"] == outs[f"a{i}"] == outs[f"b_cpu{i}"] for i in range(args.docs)),
        }
    summary["workload"] = {k: v for k, v in vars(args).items() if k != "json"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "raw": results}, f, indent=2)
    for kind, s in summary.items():
        if kind == "workload":
            continue
        print(f"{kind}: A recompute {s['a_recompute_mean_s']:.3f}s, B from remote {s['b_from_remote_mean_s']:.3f}s "
              f"(x{s['remote_vs_recompute']:.1f} below recompute), B from own CPU {s['b_from_own_cpu_mean_s']:.3f}s; "
              f"outputs equal={s['outputs_equal']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
