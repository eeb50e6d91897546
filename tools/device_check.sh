#!/usr/bin/env bash
# One prepared check for a lent GPU machine (CUDA driver, Python 3 with torch
# and pytest, no Bazel, no network). Runs what tools/prepare_device_check.sh
# staged: the CUDA kernel tests against the CPU reference, the engine's GPU
# data path tests (also under compute-sanitizer memcheck), both bandwidth
# benchmarks, the GDS probe on each file system at hand and, when the
# Python package was staged, tests/gpu through the Python API with torch and
# the Python GPU benchmarks (kvtier.bench.gpu_recompute, gpu_layerwise).
# Writes under $OUT (few files: the device tool returns at most 8):
#   summary.json          one object: gpu, ok, steps (rc, seconds), comparisons
#   device_check.log      each step's command, the tail of its output, rc
#   device_out.tgz        every step's full log, gtest and benchmark JSON
# Exit status: 0 when every step passed.
#
# Hook: every executable in build/device/extra/ is run too (its own step,
# same timeout), so other teams can ship GPU binaries in the same visit.
# Env: OUT (default ./device_out), KVTIER_DEVICE_DIR (default build/device),
# KVTIER_STEP_TIMEOUT seconds per step (default 240).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEV=${KVTIER_DEVICE_DIR:-$ROOT/build/device}
FINAL=${OUT:-$ROOT/device_out}
STEP_TIMEOUT=${KVTIER_STEP_TIMEOUT:-240}
mkdir -p "$FINAL"
OUT=$(mktemp -d /tmp/kvtier-device.XXXXXX)  # packed into $FINAL at the end
export LD_LIBRARY_PATH="$DEV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Prefer the machine's C++ runtime; ours (lib/fallback) may need a newer glibc.
# --benchmark_list_tests loads the binary without touching the GPU.
if ! "$DEV/bin/kv_copy_cuda_benchmark" --benchmark_list_tests > /dev/null 2>&1; then
  export LD_LIBRARY_PATH="$DEV/lib/fallback:$LD_LIBRARY_PATH"
  echo "using carried libstdc++ from $DEV/lib/fallback"
fi
export KVTIER_REQUIRE_GPU=1  # GPU tests fail instead of skipping without a device
STEPS="$OUT/steps.tsv"
: > "$STEPS"

step() {  # step NAME CMD...
  local name=$1; shift
  local t0 t1 rc
  echo "=== $name: $*" | tee -a "$OUT/device_check.log"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  tail -n 25 "$OUT/$name.log" | tee -a "$OUT/device_check.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( (t1 - t0) / 1000000 ))" >> "$STEPS"
  echo "=== $name: rc=$rc" | tee -a "$OUT/device_check.log"
}

[[ -f "$DEV/MANIFEST" ]] && cp "$DEV/MANIFEST" "$OUT/MANIFEST"
step nvidia_smi nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
step kv_copy_probe_test "$DEV/bin/kv_copy_probe_test"
step kv_copy_cuda_test "$DEV/bin/kv_copy_cuda_test" --gtest_output="json:$OUT/kv_copy_cuda_test.json"
step paged_io_test "$DEV/bin/paged_io_test" --gtest_output="json:$OUT/paged_io_test.json"
# The same tests under compute-sanitizer's memcheck (out-of-bounds and
# misaligned device accesses, including to mapped host memory).
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$SANITIZER" ]]; then
  for t in kv_copy_cuda_test paged_io_test; do
    step "memcheck_$t" "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no "$DEV/bin/$t"
  done
else
  echo "compute-sanitizer not found: memcheck steps skipped" | tee -a "$OUT/device_check.log"
fi
: > "$OUT/comparisons.jsonl"
for b in kv_copy_cuda_benchmark paged_io_benchmark; do
  step "$b" "$DEV/bin/$b" --benchmark_min_time=0.3 \
    --benchmark_out="$OUT/$b.json" --benchmark_out_format=json
  grep -h '^{"name"' "$OUT/$b.log" >> "$OUT/comparisons.jsonl" 2>/dev/null || true
done
# GPUDirect Storage: libcufile from the machine, else from pip's nvidia-cufile.
CUFILE_LIB=$(python3 -c 'import nvidia.cufile as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
# Probed on each file system at hand (cuFile's verdict depends on it); its
# own log (cufile.log, written to the working directory) is kept.
gds_dirs=(/tmp/kvtier-gds "$ROOT/build/kvtier-gds" /dev/shm/kvtier-gds)
mkdir -p "${gds_dirs[@]}" 2>/dev/null
i=0
for d in "${gds_dirs[@]}"; do
  [[ -d "$d" ]] || continue
  (cd "$OUT" && LD_LIBRARY_PATH="$LD_LIBRARY_PATH${CUFILE_LIB:+:$CUFILE_LIB}" \
    step "gds_check_$i" "$DEV/bin/gds_check" "$d")
  echo "$d: $(df -T "$d" 2>/dev/null | awk 'NR==2 {print $2}')" >> "$OUT/gds_filesystems.txt"
  i=$((i + 1))
done
if [[ -d "$DEV/python/kvtier" ]]; then
  PYTHONPATH="$DEV/python" KVTIER_TEST_SOURCE_TREE=1 PYTHONDONTWRITEBYTECODE=1 \
    step python_gpu_tests python3 -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUT/python_gpu_tests.xml" "$DEV/python/tests/gpu"
  PYTHONPATH="$DEV/python" PYTHONDONTWRITEBYTECODE=1 \
    step gpu_recompute_bench python3 -m kvtier.bench.gpu_recompute
  grep -h '^{"name"' "$OUT/gpu_recompute_bench.log" >> "$OUT/comparisons.jsonl" 2>/dev/null || true
  # Layer-wise loads overlapped with the forward pass vs whole loads before
  # it, same run (two prefix lengths per model).
  PYTHONPATH="$DEV/python" PYTHONDONTWRITEBYTECODE=1 \
    step gpu_layerwise_bench python3 -m kvtier.bench.gpu_layerwise \
    --models llama-3.2-1b llama-3.1-8b --tokens 4096 16384 --repeats 5
  grep -h '^{"name"' "$OUT/gpu_layerwise_bench.log" >> "$OUT/comparisons.jsonl" 2>/dev/null || true
fi

if [[ -d "$DEV/extra" ]]; then
  for x in "$DEV"/extra/*; do
    [[ -f "$x" && -x "$x" ]] || continue
    step "extra_$(basename "$x")" "$x"
    grep -h '^{"name"' "$OUT/extra_$(basename "$x").log" >> "$OUT/comparisons.jsonl" 2>/dev/null || true
  done
fi

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, ms = line.split("\t")
    steps.append({"name": name, "rc": int(rc), "seconds": round(int(ms) / 1000, 2)})
comparisons = []
p = out / "comparisons.jsonl"
if p.exists():
    for line in p.read_text().splitlines():
        try:
            comparisons.append(json.loads(line))
        except ValueError:
            pass
smi = (out / "nvidia_smi.log").read_text().strip().splitlines() if (out / "nvidia_smi.log").exists() else []
summary = {
    "gpu": smi[1] if len(smi) > 1 else None,
    "ok": all(s["rc"] == 0 for s in steps),
    "steps": steps,
    "comparisons": comparisons,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
cp "$OUT/summary.json" "$OUT/device_check.log" "$FINAL/"
[[ -f "$OUT/MANIFEST" ]] && cp "$OUT/MANIFEST" "$FINAL/"
tar czf "$FINAL/device_out.tgz" -C "$OUT" .
python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$FINAL/summary.json"
