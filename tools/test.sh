#!/usr/bin/env bash
# Runs every kvtier test, from a fresh machine (CI runs it via .ci/run):
#
#   1. tools/setup.sh              Debian packages, ./.venv, pip packages
#   2. bazel test //...            all C++ (and Bazel py) tests; benchmarks build
#   3. bazel test --config=asan    tests tagged "concurrency"
#   4. bazel test --config=tsan    tests tagged "concurrency"
#      tools/fuzz.sh --smoke       every libFuzzer target, briefly
#   5. bazel build //python:wheel  optimised, with CUDA when available
#   6. pip install the wheel       into ./.venv (--force-reinstall --no-deps)
#   7. pytest tests/python tests/gpu tests/e2e, against the INSTALLED package
#      (tests/gpu skips itself without a GPU: see tools/device_check.sh)
#
# Every step runs even if an earlier one failed (except those that need its
# result); the exit status is non-zero if any step failed.
#
# Environment:
#   KVTIER_CUDA=auto|on|off   auto (default): build the wheel with
#                             --config=cuda when nvcc exists and //cuda has
#                             targets; a failed CUDA build then fails the run.
#                             on: require it. off: never.
#   KVTIER_BAZEL_OUTPUT_BASE  Bazel --output_base (default: Bazel's own)
#   KVTIER_PYTEST_ARGS        extra pytest arguments, e.g. "-x -k config"
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV_PY="$ROOT/.venv/bin/python"
T0=$SECONDS

BAZEL=(bazel)
[[ -n "${KVTIER_BAZEL_OUTPUT_BASE:-}" ]] && BAZEL+=("--output_base=$KVTIER_BAZEL_OUTPUT_BASE")
BAZEL_FLAGS=("--repo_env=PYTHON_BIN_PATH=$VENV_PY")
[[ "${CI:-}" == "true" ]] && BAZEL_FLAGS+=(--color=no --curses=no --show_progress_rate_limit=60)
# Debian's Bazel 4.2.3 (a "development version" build) runs linux-sandbox in
# debug mode, which prints ~40 lines per action; build/test/info only.
BUILD_FLAGS=("${BAZEL_FLAGS[@]}" --nosandbox_debug)

SUMMARY=()
FAILED=0
record() {  # record STATUS NAME DETAIL
  SUMMARY+=("$(printf '%-5s %-34s %s' "$1" "$2" "$3")")
  [[ "$1" == FAIL ]] && FAILED=1
  return 0
}
banner() { printf '\n=== %s\n' "$*"; }

# run NAME CMD...: runs a step, records PASS/FAIL with its time.
run() {
  local name=$1 t=$SECONDS rc
  shift
  banner "$name"
  "$@"
  rc=$?
  if ((rc == 0)); then
    record PASS "$name" "$((SECONDS - t))s"
  else
    record FAIL "$name" "exit $rc, $((SECONDS - t))s"
  fi
  return $rc
}

# bazel test where "no test matched" (exit 4) is not a failure: other teams
# tag their stress tests "concurrency" as they land.
bazel_test_tagged() {
  local name=$1 t=$SECONDS rc
  shift
  banner "$name"
  "${BAZEL[@]}" test "${BUILD_FLAGS[@]}" "$@"
  rc=$?
  case $rc in
    0) record PASS "$name" "$((SECONDS - t))s" ;;
    4) record SKIP "$name" "no tests tagged concurrency yet" ;;
    *) record FAIL "$name" "exit $rc, $((SECONDS - t))s" ;;
  esac
}

# Prints the extra flag for the wheel build ("--config=cuda" or nothing) and
# says why on stderr; fails when KVTIER_CUDA=on cannot be honoured or the
# detection itself breaks (never a silent CPU-only fallback on error).
cuda_flags() {
  local mode=${KVTIER_CUDA:-auto} nvcc targets
  case $mode in
    auto | on) ;;
    off) echo "cuda: off (KVTIER_CUDA=off)" >&2; return 0 ;;
    *) echo "cuda: KVTIER_CUDA must be auto, on or off, not '$mode'" >&2; return 2 ;;
  esac
  nvcc=$(command -v nvcc || true)
  if [[ -z $nvcc ]]; then
    [[ $mode == on ]] && { echo "cuda: KVTIER_CUDA=on but nvcc is not on PATH" >&2; return 2; }
    echo "cuda: no nvcc on PATH: CPU-only wheel" >&2
    return 0
  fi
  if [[ ! -f cuda/BUILD.bazel && ! -f cuda/BUILD ]]; then
    [[ $mode == on ]] && { echo "cuda: KVTIER_CUDA=on but cuda/ has no BUILD file" >&2; return 2; }
    echo "cuda: $nvcc found, but cuda/ has no BUILD file yet: CPU-only wheel" >&2
    return 0
  fi
  if ! targets=$("${BAZEL[@]}" query "${BAZEL_FLAGS[@]}" 'kind(rule, //cuda/...)'); then
    echo "cuda: 'bazel query //cuda/...' failed" >&2
    return 2
  fi
  if [[ -z $targets ]]; then
    [[ $mode == on ]] && { echo "cuda: KVTIER_CUDA=on but //cuda has no targets" >&2; return 2; }
    echo "cuda: //cuda has no targets yet: CPU-only wheel" >&2
    return 0
  fi
  echo "cuda: $nvcc and //cuda targets found: building with --config=cuda" >&2
  echo "--config=cuda"
}

# --- 1. setup ---------------------------------------------------------------
if ! run "setup (tools/setup.sh)" bash tools/setup.sh; then
  banner "summary"
  printf '%s\n' "${SUMMARY[@]}"
  echo "test.sh: FAILED: setup did not complete"
  exit 1
fi

# --- 2-4. C++ ---------------------------------------------------------------
run "C++ tests (bazel test //...)" "${BAZEL[@]}" test "${BUILD_FLAGS[@]}" //...
# Bazel 4 names output directories after the compilation mode only, so asan,
# tsan and plain builds would overwrite each other's objects and rebuild
# everything on every run; a platform suffix gives each its own directory.
bazel_test_tagged "concurrency tests under asan" --config=asan --platform_suffix=asan \
  --build_tests_only --test_tag_filters=concurrency //...
bazel_test_tagged "concurrency tests under tsan" --config=tsan --platform_suffix=tsan \
  --build_tests_only --test_tag_filters=concurrency //...
# Each libFuzzer target for 5000 executions or 5 s from its seeds (clang,
# ASan, UBSan): the fuzzers build and find nothing quickly. Long runs:
# tools/fuzz.sh (FUZZING.md).
run "fuzz smoke (tools/fuzz.sh --smoke)" bash tools/fuzz.sh --smoke

# Crash loop (issue 13, RELIABILITY.md): 5 SIGKILLs of a writer through the
# real engine and disk tier, each checked after a restart, plus the loop's
# self-test (a writer that acknowledges too early must be caught). ~20 s.
run "crash loop (tools/crash_loop.sh 5; --self-test)" \
  bash -c 'tools/crash_loop.sh 5 && tools/crash_loop.sh 3 --self-test'

# --- 5-6. wheel -------------------------------------------------------------
WHEEL=""
if CUDA=$(cuda_flags); then
  WHEEL_FLAGS=(--config=opt ${CUDA:+"$CUDA"})
  if run "wheel (${WHEEL_FLAGS[*]})" "${BAZEL[@]}" build "${BUILD_FLAGS[@]}" "${WHEEL_FLAGS[@]}" //python:wheel; then
    BIN=$("${BAZEL[@]}" info "${BUILD_FLAGS[@]}" "${WHEEL_FLAGS[@]}" bazel-bin 2>/dev/null)
    WHEEL=$(ls -t "$BIN"/python/kvtier-*.whl 2>/dev/null | head -n 1)
    [[ -n $WHEEL ]] || record FAIL "wheel" "built, but no kvtier-*.whl under $BIN/python"
  fi
else
  record FAIL "wheel" "CUDA detection: see the message above"
fi

# The GPU test and benchmark binaries (tagged manual: they need a GPU to run)
# must at least compile wherever the wheel has CUDA; the probe test runs
# anywhere and checks the no-GPU path. tools/device_check.sh runs the rest.
if [[ -n $WHEEL && " ${WHEEL_FLAGS[*]} " == *" --config=cuda "* ]]; then
  run "CUDA GPU binaries compile; probe test (${WHEEL_FLAGS[*]})" "${BAZEL[@]}" test "${BUILD_FLAGS[@]}" \
    "${WHEEL_FLAGS[@]}" --build_tests_only=false //cuda:kv_copy_probe_test //cuda:kv_copy_cuda_test \
    //cuda:paged_io_test //cuda:kv_copy_cuda_benchmark //cuda:paged_io_benchmark \
    --test_tag_filters=-requires-gpu
fi

if [[ -n $WHEEL ]]; then
  echo "wheel: $WHEEL"
  run "install wheel into .venv" "$VENV_PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
  INSTALLED=$?
else
  record SKIP "install wheel into .venv" "no wheel"
  INSTALLED=1
fi

# --- 7. Python tests against the installed package ----------------------------
TEST_DIRS=()
for d in tests/python tests/gpu tests/e2e; do
  [[ -d $d ]] && TEST_DIRS+=("$ROOT/$d")
done
if ((INSTALLED != 0)); then
  record SKIP "pytest" "the wheel is not installed"
elif ((${#TEST_DIRS[@]} == 0)); then
  record FAIL "pytest" "no tests/python or tests/e2e"
else
  # From an empty directory with PYTHONPATH unset, so `import kvtier` can only
  # find the installed wheel (tests/python/conftest.py asserts it).
  WORK=$(mktemp -d)
  t=$SECONDS
  # shellcheck disable=SC2086  # KVTIER_PYTEST_ARGS is a list of words
  (cd "$WORK" && env -u PYTHONPATH KVTIER_WHEEL="$WHEEL" \
     "$VENV_PY" -m pytest -p no:cacheprovider -ra --rootdir="$ROOT" \
     ${KVTIER_PYTEST_ARGS:-} "${TEST_DIRS[@]}")
  rc=$?
  rm -rf "$WORK"
  if ((rc == 0)); then
    record PASS "pytest (${TEST_DIRS[*]#"$ROOT"/})" "$((SECONDS - t))s"
  elif ((rc == 5)); then
    record FAIL "pytest" "no tests were collected"
  else
    record FAIL "pytest (${TEST_DIRS[*]#"$ROOT"/})" "exit $rc, $((SECONDS - t))s"
  fi
fi

banner "summary ($((SECONDS - T0))s)"
printf '%s\n' "${SUMMARY[@]}"
if ((FAILED)); then
  echo "test.sh: FAILED"
  exit 1
fi
echo "test.sh: OK"
