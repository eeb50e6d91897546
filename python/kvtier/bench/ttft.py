"""TTFT benchmark: kvtier vs vLLM's ExampleConnector vs no connector, on a real vLLM.

Workloads (token ids drawn from the model's vocabulary, reproducible):

* long-document QA: `docs` documents of `doc_tokens` tokens; a cold pass asks
  one question per document, then a warm pass asks a different short question
  per document in shuffled order. Only the document prefix can be reused.
* multi-round QA: `users` users share a system prompt; each of `rounds`
  rounds appends the previous answer and a new question to the user's
  history, so round k can reuse round k-1's whole prompt.

Requests go one at a time so each TTFT is a clean prefill measurement
(`RequestOutput.metrics.first_token_latency`). vLLM's own prefix cache is
DISABLED (enable_prefix_caching=False) in every mode, so warm-pass hits can
only come from the connector under test. Each mode runs in a fresh
subprocess (vLLM keeps its connector in process globals), which also gives
each mode its own peak RSS. Outputs are greedy and compared token for token
with the no-connector mode. The JSON summary is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

MODES = ("none", "example", "kvtier")


@dataclasses.dataclass
class Workload:
    docs: int = 4
    doc_tokens: int = 4096
    question_tokens: int = 24
    users: int = 4
    rounds: int = 3
    system_tokens: int = 1024
    turn_tokens: int = 48
    answer_tokens: int = 16
    max_tokens: int = 4
    seed: int = 0


def stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "n": int(arr.size),
    }


def run_mode(mode: str, wl: Workload, model_path: str, workdir: str, progress: bool) -> dict[str, Any]:
    """Runs both workloads under one mode in this process; returns raw results."""
    from kvtier.testing.model import random_tokens
    from kvtier.testing.vllm_runner import (
        VllmRun,
        example_transfer_config,
        kvtier_transfer_config,
    )

    ktc = None
    if mode == "kvtier":
        ktc = kvtier_transfer_config(
            {"cpu_capacity": "2GiB", "disk_path": os.path.join(workdir, "kvtier-disk")}
        )
    elif mode == "example":
        ktc = example_transfer_config(os.path.join(workdir, "example-store"))
    longest = max(wl.doc_tokens + wl.question_tokens,
                  wl.system_tokens + wl.rounds * (wl.turn_tokens + wl.answer_tokens))
    max_len = longest + 256
    run = VllmRun(
        model_path,
        num_blocks=(max_len + 127) // 128 + 8,
        max_model_len=max_len,
        max_num_batched_tokens=max_len,
        kv_transfer_config=ktc,
    )
    bar = _bar(progress, wl.docs * 2 + wl.users * wl.rounds, mode)

    prompt_tokens = 0

    def one(prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
        nonlocal prompt_tokens
        prompt_tokens += len(prompt)
        out, ttft = run.generate([prompt], max_tokens)[0]
        if mode == "kvtier":
            run.engine().flush()
        bar.update(1)
        return out, ttft

    rng = random.Random(wl.seed)
    docs = [random_tokens(wl.doc_tokens, seed=1000 + i) for i in range(wl.docs)]
    questions = [[random_tokens(wl.question_tokens, seed=2000 + 2 * i + j) for j in range(2)]
                 for i in range(wl.docs)]
    result: dict[str, Any] = {"mode": mode, "doc": {"cold": [], "warm": [], "outputs": {}}}
    for i in range(wl.docs):
        out, ttft = one(docs[i] + questions[i][0], wl.max_tokens)
        result["doc"]["cold"].append(ttft)
        result["doc"]["outputs"][f"cold{i}"] = out
    order = list(range(wl.docs))
    rng.shuffle(order)
    for i in order:
        out, ttft = one(docs[i] + questions[i][1], wl.max_tokens)
        result["doc"]["warm"].append(ttft)
        result["doc"]["outputs"][f"warm{i}"] = out

    system = random_tokens(wl.system_tokens, seed=3000)
    histories = [list(system) for _ in range(wl.users)]
    per_round: list[list[float]] = [[] for _ in range(wl.rounds)]
    chat_outputs: dict[str, list[int]] = {}
    for r in range(wl.rounds):
        for u in range(wl.users):
            turn = random_tokens(wl.turn_tokens, seed=4000 + 100 * u + r)
            prompt = histories[u] + turn
            out, ttft = one(prompt, wl.answer_tokens)
            per_round[r].append(ttft)
            chat_outputs[f"u{u}r{r}"] = out
            histories[u] = prompt + out
    bar.close()
    result["chat"] = {"per_round": per_round, "outputs": chat_outputs}
    result["prompt_tokens"] = prompt_tokens
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if mode == "kvtier":
        eng = run.engine()
        eng.flush()
        from kvtier.vllm.connector import flat_engine_stats

        result["engine_stats"] = flat_engine_stats(eng.stats())
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        totals = dict(get_kv_transfer_group().totals)
        result["connector_totals"] = totals
        result["load_vs_memcpy"] = _load_vs_memcpy(totals, model_path)
    result["external_hits"] = run.metric("vllm:external_prefix_cache_hits")
    result["local_prefix_hits"] = run.metric("vllm:prefix_cache_hits")
    run.close()
    return result


def _kv_bytes_per_token(model_path: str) -> int:
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.get("torch_dtype") or cfg.get("dtype"), 4)
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize


def _load_vs_memcpy(totals: dict[str, float], model_path: str) -> dict[str, float]:
    """kvtier's load time against a memcpy of the same bytes, same process."""
    import numpy as np

    tokens = float(totals.get("tokens_loaded", 0))
    seconds = float(totals.get("load_seconds", 0.0))
    nbytes = int(tokens * _kv_bytes_per_token(model_path))
    if nbytes == 0:
        return {"bytes": 0, "load_s": seconds, "memcpy_s": 0.0, "ratio": float("nan")}
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return {"bytes": nbytes, "load_s": seconds, "memcpy_s": best, "ratio": seconds / best}


def _bar(enabled: bool, total: int, desc: str) -> Any:
    class _NoBar:
        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr)


def run_in_subprocess(mode: str, wl: Workload, model_path: str, workdir: str, progress: bool) -> dict[str, Any]:
    out_path = os.path.join(workdir, f"{mode}.json")
    cmd = [
        sys.executable, "-m", "kvtier.bench.ttft", "--_worker", mode,
        "--_workload", json.dumps(dataclasses.asdict(wl)),
        "--model", model_path, "--_workdir", workdir, "--_out", out_path,
    ]
    if progress:
        cmd.append("--progress")
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL if progress else None)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark mode {mode!r} failed with exit code {proc.returncode}")
    with open(out_path) as f:
        return json.load(f)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ref = results.get("none")
    summary: dict[str, Any] = {
        "vllm_prefix_cache": "disabled (enable_prefix_caching=False)",
        "modes": {},
    }
    for mode, r in results.items():
        cold, warm = stats(r["doc"]["cold"]), stats(r["doc"]["warm"])
        rounds = [stats(x)["mean"] for x in r["chat"]["per_round"]]
        later = [t for x in r["chat"]["per_round"][1:] for t in x]
        entry: dict[str, Any] = {
            "long_doc": {"cold": cold, "warm": warm, "speedup": cold["mean"] / warm["mean"]},
            "multi_round": {
                "ttft_mean_per_round": rounds,
                "round1": stats(r["chat"]["per_round"][0]),
                "later_rounds": stats(later),
                "speedup": rounds[0] / stats(later)["mean"] if later else float("nan"),
            },
            "peak_rss_mb": r["peak_rss_mb"],
            "external_hit_tokens": r.get("external_hits", 0),
            "vllm_local_prefix_hits": r.get("local_prefix_hits", 0),
        }
        if ref is not None:
            entry["outputs_equal_none"] = (
                r["doc"]["outputs"] == ref["doc"]["outputs"]
                and r["chat"]["outputs"] == ref["chat"]["outputs"]
            )
        if "engine_stats" in r:
            es = r["engine_stats"]
            entry["bytes_stored"] = {k: v for k, v in es.items() if "bytes" in k}
            entry["engine_stats"] = es
            entry["load_vs_memcpy"] = r["load_vs_memcpy"]
        summary["modes"][mode] = entry
    if "kvtier" in summary["modes"] and "example" in summary["modes"]:
        k = summary["modes"]["kvtier"]["long_doc"]["warm"]["mean"]
        e = summary["modes"]["example"]["long_doc"]["warm"]["mean"]
        summary["kvtier_warm_vs_example_warm"] = k / e
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvtier bench ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the random test Llama)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of none,example,kvtier")
    for f in dataclasses.fields(Workload):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars on stderr")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_workload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from kvtier.testing.model import make_model

    wl = Workload(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)})
    model_path = args.model or str(make_model())
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as workdir:
        for mode in modes:
            print(f"[ttft] running mode {mode} ...", file=sys.stderr, flush=True)
            results[mode] = run_in_subprocess(mode, wl, model_path, workdir, args.progress)
    summary = summarize(results)
    summary["workload"] = dataclasses.asdict(wl)
    summary["raw"] = results
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        from kvtier.testing.vllm_runner import setup_env

        setup_env()
        wl = Workload(**json.loads(args._workload))
        result = run_mode(args._worker, wl, args.model, args._workdir, args.progress)
        with open(args._out, "w") as f:
            json.dump(result, f)
        return 0
    summary = run_all(args)
    raw = summary.pop("raw")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "raw": raw}, f, indent=2)
    for mode, entry in summary["modes"].items():
        ld, mr = entry["long_doc"], entry["multi_round"]
        print(
            f"{mode:>8}: doc cold {ld['cold']['mean']:.3f}s warm {ld['warm']['mean']:.3f}s "
            f"(x{ld['speedup']:.1f}); chat rounds "
            + " ".join(f"{t:.3f}s" for t in mr["ttft_mean_per_round"])
            + f"; equal={entry.get('outputs_equal_none')}; rss {entry['peak_rss_mb']:.0f} MiB"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
