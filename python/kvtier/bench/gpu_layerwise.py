"""`kvtier bench gpu-layerwise`: a prefix's KV loaded layer by layer under the forward pass, vs loaded whole first.

For each model shape and prefix length N, measured in the same process on
one CUDA stream (torch's current), with S suffix tokens:

- compute: the forward pass of the S suffix tokens alone (Hugging Face
  transformers' Llama decoder stack, SDPA attention, bf16, random weights);
- load: ``Engine.retrieve`` of the prefix's KV (N tokens, layers x KV heads x
  head size, bf16) from kvtier's CPU tier into a vLLM-style paged cache on
  the GPU (flash_attn layout, block size 16), waited for;
- whole: ``Engine.retrieve_on_stream`` of the prefix, then the forward pass
  on the same stream (it starts once every layer is in place);
- layerwise: ``Engine.load_layerwise`` of the prefix (layers enqueued in
  order on a stream of the load's own), then the forward pass, each decoder
  layer i preceded by ``wait_layer(i)`` (a forward pre-hook: the stream waits
  for layer i's copy, the host does not), so layer i's compute overlaps the
  copy of the layers after it.

Prints one JSON line per case in the benchmark comparison format: value =
layerwise ms, baseline = whole ms, ratio = value / baseline (lower is
better), with compute_ms, load_ms and ideal_ms = max(compute, load), the
best any overlap can reach.

What this leaves out: the suffix does not attend to the loaded prefix (the
model keeps its own KV, transformers' cache; the paged cache is only the
load's destination), so attention over the prefix is not computed. This
measures the ordering and overlap of copies and compute, not attention's
cost; an engine's scheduling is not in it either. Shapes are the published
configurations in ``kvtier.bench.gpu_recompute`` (weights are random: only
time matters, and the GPU machine cannot download weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from kvtier.bench.gpu_recompute import (
    BLOCK,
    SHAPES,
    _median_ms,
    build_model,
    start_gpu_bench,
)


def _wait_for(holder: list[Any], fired: list[int], layer: int) -> Any:
    """A forward pre-hook for decoder layer `layer`: while a layer-wise load is
    in holder[0], the stream waits for that layer's copy before the layer's
    kernels are enqueued (the host does not wait)."""

    def hook(module: Any, inputs: Any) -> None:
        handle = holder[0]
        if handle is not None:
            handle.wait_layer(layer)
            fired.append(layer)

    return hook


def _case(
    name: str, shape: dict[str, int], model: Any, holder: list[Any], fired: list[int], n: int, suffix: int, repeats: int
) -> dict[str, Any]:
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
    if eng.lookup(toks) != n:
        raise RuntimeError(f"kvtier holds {eng.lookup(toks)} of the {n} tokens just stored")
    ids = torch.randint(0, shape["vocab_size"], (1, suffix), device="cuda")

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True)

    def load_only() -> None:
        if eng.retrieve(toks, slots) != n:
            raise RuntimeError("kvtier loaded less than the stored prefix")

    def whole() -> None:
        handle = eng.retrieve_on_stream(toks, slots)  # the forward pass is queued behind it
        if handle.valid_tokens != n:
            raise RuntimeError(f"whole load: {handle.valid_tokens} of {n} tokens")
        forward()
        handle.wait()

    def layerwise() -> None:
        handle = eng.load_layerwise([(toks, slots, 0, None)])
        if handle.valid_tokens != [n]:
            raise RuntimeError(f"layer-wise load: {handle.valid_tokens} of {n} tokens")
        fired.clear()
        holder[0] = handle
        try:
            forward()
        finally:
            holder[0] = None
        if fired != list(range(layers)):
            raise RuntimeError(f"the decoder layers' pre-hooks ran for layers {fired}, not 0..{layers - 1}")
        handle.wait_layer(layers - 1)  # the stream covers every layer, whatever the model did
        handle.wait()

    compute_ms = _median_ms(forward, repeats)
    load_ms = _median_ms(load_only, repeats)
    whole_ms = _median_ms(whole, repeats)
    layerwise_ms = _median_ms(layerwise, repeats)
    eng.close()
    del kv
    torch.cuda.empty_cache()
    return {
        "name": f"gpu_layerwise_vs_whole_{name}_{n}",
        "value": round(layerwise_ms, 3),
        "baseline": round(whole_ms, 3),
        "ratio": round(layerwise_ms / whole_ms, 4),
        "metric": "real_time_ms",
        "higher_is_better": False,
        "compute_ms": round(compute_ms, 3),
        "load_ms": round(load_ms, 3),
        "ideal_ms": round(max(compute_ms, load_ms), 3),
        "suffix_tokens": suffix,
        "kv_bytes": kv_bytes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier bench gpu-layerwise", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384], help="prefix lengths")
    ap.add_argument("--suffix", type=int, default=256, help="tokens computed after the prefix")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.suffix < 1 or min(args.tokens) < 1 or args.repeats < 1:
        ap.error("--suffix, --tokens and --repeats must be >= 1")
    if not start_gpu_bench("gpu-layerwise"):
        return 2
    import torch

    for name in args.models:
        shape = SHAPES[name]
        model = build_model(shape, max(args.tokens) + args.suffix)
        holder: list[Any] = [None]  # the layer-wise load the forward pass waits on, if any
        fired: list[int] = []  # layers whose pre-hook ran during a layer-wise pass

        hooks = [layer.register_forward_pre_hook(_wait_for(holder, fired, i)) for i, layer in enumerate(model.layers)]
        try:
            for n in args.tokens:
                print(json.dumps(_case(name, shape, model, holder, fired, n, args.suffix, args.repeats)), flush=True)
        finally:
            for h in hooks:
                h.remove()
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
