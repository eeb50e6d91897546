"""`kvtier bench SUBCOMMAND ...`: entry point used by kvtier.cli."""

from __future__ import annotations

import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "ttft": "kvtier.bench.ttft",
    "serve-ttft": "kvtier.bench.serve_ttft",
    "remote-ttft": "kvtier.bench.remote_ttft",
    "pd-ttft": "kvtier.bench.pd_ttft",
    "demo": "kvtier.bench.demo",
    "gpu-recompute": "kvtier.bench.gpu_recompute",
    "gpu-layerwise": "kvtier.bench.gpu_layerwise",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in SUBCOMMANDS:
        print("usage: kvtier bench {" + ",".join(SUBCOMMANDS) + "} [options]", file=sys.stderr)
        print("  ttft  TTFT of long-document and multi-round QA on a real vLLM "
              "(kvtier vs ExampleConnector vs none)", file=sys.stderr)
        print("  serve-ttft  TTFT through `vllm serve` (streaming, OpenAI client), kvtier vs vLLM alone, "
              "TP=1 and TP=2", file=sys.stderr)
        print("  remote-ttft  TTFT of a second `vllm serve` instance served through Redis / a Redis "
              "Cluster from what the first stored", file=sys.stderr)
        print("  pd-ttft  disaggregated prefill: a decode instance's TTFT with the KV pulled from a "
              "prefill instance vs recompute vs a local CPU-tier hit", file=sys.stderr)
        print("  demo  the demo workload with per-request TTFT and a PNG plot", file=sys.stderr)
        print("  gpu-recompute  on a GPU: loading a prefix's KV from kvtier vs recomputing it "
              "(Llama shapes, transformers)", file=sys.stderr)
        print("  gpu-layerwise  on a GPU: a prefix's KV loaded layer by layer under the forward pass "
              "vs loaded whole before it (Llama shapes, transformers)", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(SUBCOMMANDS[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
