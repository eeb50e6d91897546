"""TTFT as a client of `vllm serve` sees it: kvtier vs vLLM alone, same run.

For each tensor-parallel size asked for, the benchmark starts the OpenAI
server twice with the same flags (vLLM's own prefix cache off in both, so
warm hits can only come from kvtier): once without a connector, once with
kvtier on the README's configuration (CPU + disk tiers). Against each it
sends, one request at a time through the `openai` client with streaming on,
the long-document workload of `kvtier bench ttft`: a cold pass (one
question per document) and a warm pass (another question per document,
shuffled). TTFT is the wall time from sending the request to the first
streamed token. Outputs are greedy and compared between the two servers.
The JSON summary is printed last.

    kvtier bench serve-ttft --tp 1,2 --docs 4 --doc-tokens 3072
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def stream(url: str, model: str, prompt: list[int], max_tokens: int, **extra_body: Any) -> tuple[float, str]:
    """(seconds to the first streamed token, the whole greedy text) of one
    completion from the OpenAI server at url; extra_body: vLLM's extra
    request fields (kv_transfer_params)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    started = time.perf_counter()
    first: float | None = None
    text = []
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True, extra_body=extra_body or None
    ):
        piece = chunk.choices[0].text if chunk.choices else ""
        if piece and first is None:
            first = time.perf_counter() - started
        text.append(piece)
    if first is None:
        raise RuntimeError("the server streamed no token")
    return first, "".join(text)


def stream_ttft(server: Any, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    """(seconds to the first streamed token, the whole greedy text)."""
    return stream(server.url, server.model, prompt, max_tokens)


def run_server(mode: str, tp: int, args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    from kvtier.testing.model import random_tokens
    from kvtier.testing.vllm_server import VllmServer

    kv = None
    if mode in ("kvtier", "kvtier-layerwise"):
        kv = {
            "kv_connector": "KVTierConnector",
            "kv_connector_module_path": "kvtier.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "cpu_capacity": args.cpu_capacity,
                "disk_path": str(workdir / f"disk-tp{tp}-{mode}"),
            },
        }
        if mode == "kvtier-layerwise":
            kv["kv_connector_extra_config"]["layerwise"] = True
    docs = [random_tokens(args.doc_tokens, seed=1000 + i) for i in range(args.docs)]
    questions = [[random_tokens(args.question_tokens, seed=2000 + 2 * i + j) for j in range(2)] for i in range(args.docs)]
    order = list(range(args.docs))
    random.Random(args.seed).shuffle(order)
    out: dict[str, Any] = {"cold": [], "warm": [], "outputs": {}}
    log = workdir / f"{mode}-tp{tp}.log"
    print(f"[serve-ttft] tp={tp} {mode}: starting vllm serve (log {log})", file=sys.stderr, flush=True)
    with VllmServer(model, kv_transfer_config=kv, tensor_parallel_size=tp,
                    max_model_len=args.doc_tokens + 256, log_path=log) as server:
        # One short request first: the first request of a fresh server pays
        # one-off warm-up costs that belong to neither pass.
        stream_ttft(server, random_tokens(16, seed=7), 1)
        for i in range(args.docs):
            ttft, text = stream_ttft(server, docs[i] + questions[i][0], args.max_tokens)
            out["cold"].append(ttft)
            out["outputs"][f"cold{i}"] = text
        for i in order:
            ttft, text = stream_ttft(server, docs[i] + questions[i][1], args.max_tokens)
            out["warm"].append(ttft)
            out["outputs"][f"warm{i}"] = text
        metrics = server.metrics()
    out["external_hits"] = metrics.get("vllm:external_prefix_cache_hits_total", 0.0)
    out["prompt_tokens"] = metrics.get("vllm:prompt_tokens_total", 0.0)
    return out


def summarize(results: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for tp, modes in results.items():
        entry: dict[str, Any] = {}
        for mode, r in modes.items():
            entry[mode] = {
                "cold_mean_s": statistics.mean(r["cold"]),
                "warm_mean_s": statistics.mean(r["warm"]),
                "external_hits": r["external_hits"],
            }
        for kv_mode in ("kvtier", "kvtier-layerwise"):
            if "none" in modes and kv_mode in modes:
                suffix = "" if kv_mode == "kvtier" else "_layerwise"
                entry["warm_speedup_vs_none" + suffix] = entry["none"]["warm_mean_s"] / entry[kv_mode]["warm_mean_s"]
                entry["outputs_equal" + suffix] = modes["none"]["outputs"] == modes[kv_mode]["outputs"]
        summary[f"tp{tp}"] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtier bench serve-ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the random test Llama)")
    p.add_argument("--tp", default="1,2", help="comma list of tensor-parallel sizes")
    p.add_argument("--modes", default="none,kvtier", help="comma list of none,kvtier,kvtier-layerwise")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=3072)
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--cpu-capacity", default="1GiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the summary and raw results here")
    args = p.parse_args(argv)
    from kvtier.testing.model import make_model

    model = args.model or str(make_model())
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("none", "kvtier", "kvtier-layerwise"):
            raise SystemExit(f"unknown mode {m!r}; choose from none, kvtier, kvtier-layerwise")
    results: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-serve-ttft-") as tmp:
        for tp in (int(t) for t in args.tp.split(",") if t):
            results[tp] = {m: run_server(m, tp, args, model, Path(tmp)) for m in modes}
    summary = summarize(results)
    summary["workload"] = {k: v for k, v in vars(args).items() if k not in ("json",)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "raw": results}, f, indent=2)
    for tp, entry in summary.items():
        if not tp.startswith("tp"):
            continue
        line = " ".join(
            f"{m}: cold {e['cold_mean_s']:.3f}s warm {e['warm_mean_s']:.3f}s" for m, e in entry.items() if isinstance(e, dict)
        )
        extra = ""
        if "warm_speedup_vs_none" in entry:
            extra = f"; warm x{entry['warm_speedup_vs_none']:.2f} vs none, outputs equal={entry['outputs_equal']}"
        print(f"{tp}: {line}{extra}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
