"""`kvtier bench gpu-recompute`: load a prefix's KV from kvtier, or recompute it, on a GPU.

For each model shape and prompt length, measured in the same process:

- recompute: the prefill of N tokens by Hugging Face transformers' Llama
  (SDPA attention, bf16, ``use_cache=True`` so the KV is materialised; the
  decoder stack only: an engine computes logits for the last token alone);
- load: ``Engine.retrieve`` of the same N tokens' KV (layers x KV heads x
  head size, bf16) from kvtier's CPU tier into a vLLM-style paged cache on
  the GPU (flash_attn layout, block size 16), waited for.

Shapes are the published configurations of Llama 3.2 1B and Llama 3.1 8B;
the weights are random (only time matters here, and the GPU machine cannot
download weights). Prints one JSON line per case, in the benchmark
comparison format (value = load ms, baseline = recompute ms, ratio =
value / baseline, lower is better) plus ``speedup`` = recompute / load.

What this leaves out: an engine's scheduling and the compute of the tokens
after the cached prefix. TTFT end to end is ``kvtier bench ttft`` (vLLM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "llama-3.2-1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    },
    "llama-3.1-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    },
}
BLOCK = 16


def _median_ms(fn: Any, repeats: int) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_model(shape: dict[str, int], max_positions: int) -> Any:
    """Hugging Face's Llama decoder stack of `shape`, random weights, bf16, on the GPU."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(max_position_embeddings=max_positions, **shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return LlamaModel(cfg).eval()
    finally:
        torch.set_default_dtype(old)


def start_gpu_bench(prog: str) -> bool:
    """Checks for torch with CUDA, a GPU and a CUDA build of kvtier (says what
    is missing on stderr: False), then prints the environment line."""
    try:
        import torch
    except ImportError:
        print(f"{prog}: needs torch with CUDA", file=sys.stderr)
        return False
    from kvtier.kv_layout import cuda_runtime_available

    if not torch.cuda.is_available() or not cuda_runtime_available():
        print(f"{prog}: needs a CUDA GPU and a kvtier build with CUDA (the wheel)", file=sys.stderr)
        return False
    import transformers

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"env": env}), flush=True)
    return True


def _recompute_ms(shape: dict[str, int], tokens: list[int], repeats: int) -> dict[int, float]:
    import torch

    model = build_model(shape, max(tokens))
    out = {}
    for n in tokens:
        ids = torch.randint(0, shape["vocab_size"], (1, n), device="cuda")

        def prefill(model: Any = model, ids: Any = ids) -> None:
            with torch.inference_mode():
                model(input_ids=ids, use_cache=True)

        out[n] = _median_ms(prefill, repeats)
    del model
    torch.cuda.empty_cache()
    return out


def _load_ms(name: str, shape: dict[str, int], n: int, repeats: int) -> tuple[float, int]:
    import numpy as np
    import torch

    from kvtier.engine import Engine, Namespace

    layers, kvh, hd = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    blocks = (n + BLOCK - 1) // BLOCK
    kv_bytes = n * layers * 2 * kvh * hd * 2
    eng = Engine(
        {"chunk_size": 256, "cpu_capacity": int(kv_bytes * 1.25) + (64 << 20), "disk_path": "none"},
        Namespace(model=name, dtype="bfloat16"),
    )
    kv = [torch.randn(2, blocks, BLOCK, kvh, hd, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    eng.register_kv_caches(kv, kind="flash_attn")
    toks, slots = np.arange(n), np.arange(n)
    eng.store(toks, slots).wait()
    assert eng.lookup(toks) == n

    def load() -> None:
        if eng.retrieve(toks, slots) != n:
            raise RuntimeError("kvtier loaded less than the stored prefix")

    ms = _median_ms(load, repeats)
    eng.close()
    del kv
    torch.cuda.empty_cache()
    return ms, kv_bytes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier bench gpu-recompute", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not start_gpu_bench("gpu-recompute"):
        return 2
    for name in args.models:
        shape = SHAPES[name]
        recompute = _recompute_ms(shape, args.tokens, args.repeats)
        for n in args.tokens:
            load, kv_bytes = _load_ms(name, shape, n, args.repeats)
            print(json.dumps({
                "name": f"gpu_load_vs_recompute_{name}_{n}",
                "value": round(load, 3),
                "baseline": round(recompute[n], 3),
                "ratio": round(load / recompute[n], 4),
                "metric": "real_time_ms",
                "higher_is_better": False,
                "speedup": round(recompute[n] / load, 2),
                "kv_bytes": kv_bytes,
                "load_gb_per_s": round(kv_bytes / load / 1e6, 1),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
