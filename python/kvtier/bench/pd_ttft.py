"""Disaggregated prefill TTFT: a decode instance that pulls the prompt's KV
from a prefill instance over kvtier's transport, against the same request
recomputed on one instance and served from one instance's own CPU tier.

Three `vllm serve` instances on the same machine, vLLM's own prefix cache
off in all: a kv_both instance (kvtier, CPU tier) and a P/D pair, a
kv_producer (`transport: ucx`, fixed `transport_listen`) and a kv_consumer
(`transport: ucx`), plus `kvtier proxy` in front of the pair. One request
at a time, streamed through the `openai` client, greedy; TTFT is the
client's time to the first streamed token.

* recompute: the kv_both instance, first sight of each document.
* local_cpu_hit: the same documents again on the kv_both instance (its own
  CPU tier, no transfer).
* pd_decode: the decode instance alone, with the KV pulled from the prefill
  instance: the proxy's first leg (max_tokens=1, do_remote_decode) is sent
  to the prefill instance by hand and untimed, then the request with the
  returned kv_transfer_params is timed against the decode instance.
* pd_end_to_end: other documents through `kvtier proxy` (the prefill, the
  transfer and the decode's first token), as a client sees a 1P1D
  deployment.

Outputs are compared with the kv_both instance's; the JSON summary is
printed last.

    kvtier bench pd-ttft --docs 3 --doc-tokens 3072
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvtier.bench.serve_ttft import stream


def prefill_leg(url: str, model: str, prompt: list[int]) -> dict[str, Any]:
    """What the proxy sends a prefill instance; its kv_transfer_params."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0.0,
                                  extra_body={"kv_transfer_params": {"do_remote_decode": True,
                                                                     "do_remote_prefill": False}})
    params = (r.model_extra or {}).get("kv_transfer_params")
    if not params:
        raise RuntimeError(f"the prefill instance returned no kv_transfer_params: {r}")
    return dict(params)


def kv_config(role: str, disk: Path, cpu_capacity: str, listen: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"cpu_capacity": cpu_capacity, "disk_path": str(disk)}
    if role != "kv_both":
        extra["transport"] = "ucx"
    if listen:
        extra["transport_listen"] = listen
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm", "kv_role": role,
            "kv_connector_extra_config": extra}


def start_proxy(prefill: str, decode: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    from kvtier.testing.vllm_server import free_port

    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "proxy", "--prefill", prefill, "--decode", decode,
                                 "--port", str(port), "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvtier proxy exited; log {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise TimeoutError("kvtier proxy did not become healthy")


def run(args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    from kvtier.testing.model import random_tokens
    from kvtier.testing.vllm_server import VllmServer, free_port

    max_len = args.doc_tokens + 256
    docs = [random_tokens(args.doc_tokens, seed=5000 + i) for i in range(2 * args.docs)]
    decode_docs, e2e_docs = docs[: args.docs], docs[args.docs :]
    out: dict[str, Any] = {k: [] for k in ("recompute", "local_cpu_hit", "pd_decode", "pd_end_to_end")}
    texts: dict[str, list[str]] = {k: [] for k in out}
    warm = random_tokens(16, seed=7)

    print(f"[pd-ttft] kv_both instance (logs in {workdir})", file=sys.stderr, flush=True)
    with VllmServer(model, kv_transfer_config=kv_config("kv_both", workdir / "both", args.cpu_capacity),
                    max_model_len=max_len, log_path=workdir / "both.log") as one:
        stream(one.url, model, warm, 1)  # one-off warm-up, outside every pass
        reference = []
        for d in docs:
            ttft, text = stream(one.url, model, d, args.max_tokens)
            out["recompute"].append(ttft)
            reference.append(text)
        for d in decode_docs:
            ttft, text = stream(one.url, model, d, args.max_tokens)
            out["local_cpu_hit"].append(ttft)
            texts["local_cpu_hit"].append(text)
    texts["recompute"] = reference

    print("[pd-ttft] prefill + decode instances", file=sys.stderr, flush=True)
    listen = f"127.0.0.1:{free_port()}"
    p = VllmServer(model, kv_transfer_config=kv_config("kv_producer", workdir / "p", args.cpu_capacity, listen),
                   max_model_len=max_len, log_path=workdir / "prefill.log")
    d = VllmServer(model, kv_transfer_config=kv_config("kv_consumer", workdir / "d", args.cpu_capacity),
                   max_model_len=max_len, log_path=workdir / "decode.log")
    proxy = None
    try:
        p.start()
        d.start()
        stream(p.url, model, warm, 1)
        stream(d.url, model, warm, 1)
        for doc in decode_docs:
            params = prefill_leg(p.url, model, doc)
            ttft, text = stream(d.url, model, doc, args.max_tokens, kv_transfer_params=params)
            out["pd_decode"].append(ttft)
            texts["pd_decode"].append(text)
        proxy, url = start_proxy(p.url, d.url, workdir / "proxy.log")
        for doc in e2e_docs:
            ttft, text = stream(url, model, doc, args.max_tokens)
            out["pd_end_to_end"].append(ttft)
            texts["pd_end_to_end"].append(text)
        metrics = d.metrics()
        out["decode_external_hits"] = metrics.get("vllm:external_prefix_cache_hits_total", 0.0)
        out["decode_pd_pulls"] = metrics.get("kvtier_pd_pulls_total", 0.0)
        out["decode_pd_pull_failures"] = metrics.get("kvtier_pd_pull_failures_total", 0.0)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        d.stop()
        p.stop()
    out["outputs_equal"] = (
        texts["local_cpu_hit"] == reference[: args.docs]
        and texts["pd_decode"] == reference[: args.docs]
        and texts["pd_end_to_end"] == reference[args.docs :]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtier bench pd-ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the random test Llama)")
    p.add_argument("--docs", type=int, default=3, help="documents per pass")
    p.add_argument("--doc-tokens", type=int, default=3072)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--cpu-capacity", default="1GiB")
    p.add_argument("--json", default=None, help="also write the summary and raw results here")
    args = p.parse_args(argv)
    from kvtier.testing.model import make_model

    model = args.model or str(make_model())
    with tempfile.TemporaryDirectory(prefix="kvtier-pd-ttft-") as tmp:
        r = run(args, model, Path(tmp))
    means = {k: statistics.mean(r[k]) for k in ("recompute", "local_cpu_hit", "pd_decode", "pd_end_to_end")}
    summary: dict[str, Any] = {
        **{f"{k}_mean_s": v for k, v in means.items()},
        "pd_decode_vs_recompute": means["recompute"] / means["pd_decode"],
        "pd_decode_vs_local_cpu_hit": means["pd_decode"] / means["local_cpu_hit"],
        "pd_end_to_end_vs_recompute": means["recompute"] / means["pd_end_to_end"],
        "decode_external_hits": r["decode_external_hits"],
        "decode_pd_pulls": r["decode_pd_pulls"],
        "decode_pd_pull_failures": r["decode_pd_pull_failures"],
        "outputs_equal": r["outputs_equal"],
        "workload": {k: v for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "raw": r}, f, indent=2)
    print(f"recompute {means['recompute']:.3f}s, local CPU hit {means['local_cpu_hit']:.3f}s, "
          f"P/D decode {means['pd_decode']:.3f}s (x{summary['pd_decode_vs_recompute']:.1f} below recompute, "
          f"x{summary['pd_decode_vs_local_cpu_hit']:.2f} of a local hit), P/D end to end "
          f"{means['pd_end_to_end']:.3f}s; outputs equal={r['outputs_equal']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
