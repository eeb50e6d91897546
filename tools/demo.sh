#!/usr/bin/env bash
# The kvtier demo, from a fresh machine: set up, build and install the wheel,
# make the model, then serve a multi-round chat and a long-document workload
# through vLLM (CPU) with and without kvtier (CPU + local disk tiers).
# Prints TTFT per request, hit rate and bytes per tier; writes
# kvtier-demo/ttft_per_round.png and kvtier-demo/summary.json. Ends with the
# hit-rate and per-tier lines read off the metrics endpoint, as an operator
# reads them (the page is saved as kvtier-demo/metrics.txt).
#
# Usage: tools/demo.sh [--skip-setup] [demo options, see `kvtier bench demo -h`]
# Environment: KVTIER_DEMO_OUT (output folder, default ./kvtier-demo)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV_PY="$ROOT/.venv/bin/python"

SKIP_SETUP=0
if [[ ${1:-} == "--skip-setup" ]]; then SKIP_SETUP=1; shift; fi

step() { printf '\n== %s\n' "$*"; }

if ((SKIP_SETUP == 0)); then
  step "setup (apt packages, .venv)"
  bash tools/setup.sh
fi

step "build the wheel (bazel --config=opt //python:wheel)"
bazel build --config=opt //python:wheel
WHEEL=$(ls -t bazel-bin/python/kvtier-*.whl | head -1)

step "install $WHEEL"
"$VENV_PY" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"

# Run from outside the source tree so the installed wheel is what is imported.
OUT=${KVTIER_DEMO_OUT:-$ROOT/kvtier-demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
step "serve the workloads (vLLM alone, then vLLM + kvtier)"
cd "$(mktemp -d)"
env -u PYTHONPATH "$VENV_PY" -m kvtier.bench.demo --out-dir "$OUT" "$@"
