#!/usr/bin/env bash
# Builds the libFuzzer targets (bazel --config=fuzz: clang, ASan, UBSan) and
# runs each, then prints one table row per target: executions, executions/s,
# seconds and the result. FUZZING.md describes the targets and keeps the
# measured table.
#
#   tools/fuzz.sh                      every target, 10^6 executions each
#   tools/fuzz.sh --runs 200000 --time 300 disk_segment catalogue
#   tools/fuzz.sh --smoke              CI (tools/test.sh): the C++ targets,
#                                      5000 executions or 5 s each, from
#                                      the seeds only (the config loader's
#                                      smoke is tests/python/test_config_fuzz.py)
#
# Environment: KVTIER_BAZEL_OUTPUT_BASE  Bazel --output_base, as tools/test.sh
#
# Targets: every C++ libFuzzer target (disk_record_header, disk_segment,
# catalogue, redis_url, remote_record, ...: found by bazel query) and config
# (Python, atheris: installed on first use into .kvtier-cache/, outside the
# venv). A run stops at --runs executions or
# --time seconds, whichever comes first. New inputs go to
# .kvtier-cache/fuzz/<target>/corpus (kept between runs, not checked in);
# a crash leaves .kvtier-cache/fuzz/<target>/crash-* and fails the script.
# A reproducer, once its bug is fixed, is copied into the target's checked-in
# corpus (cc/.../fuzz/corpus/<target>/crash_*), where its *_corpus_test
# replays it in `bazel test //...`.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV_PY="$ROOT/.venv/bin/python"
BAZEL=(bazel)
[[ -n "${KVTIER_BAZEL_OUTPUT_BASE:-}" ]] && BAZEL+=("--output_base=$KVTIER_BAZEL_OUTPUT_BASE")
BAZEL_FLAGS=("--repo_env=PYTHON_BIN_PATH=$VENV_PY" --nosandbox_debug --config=fuzz)
[[ "${CI:-}" == "true" ]] && BAZEL_FLAGS+=(--color=no --curses=no --show_progress_rate_limit=60)
ATHERIS_VERSION=3.0.0
ATHERIS_DIR="$ROOT/.kvtier-cache/atheris-$ATHERIS_VERSION"

# Every cc_binary tagged "fuzzer" (kvtier_fuzz_target in cc/fuzz/fuzz.bzl):
# //pkg:<name>_fuzzer, seeds in pkg/corpus/<name>.
declare -A LABEL=() SEEDS=([config]="")
CXX_TARGETS=()
query=$("${BAZEL[@]}" query "--repo_env=PYTHON_BIN_PATH=$VENV_PY" 'attr(tags, "\bfuzzer\b", kind(cc_binary, //cc/...))' 2>/dev/null) ||
  { echo "fuzz.sh: bazel query for the fuzz targets failed" >&2; exit 1; }
for label in $query; do
  pkg=${label%%:*} name=${label##*:}
  name=${name%_fuzzer}
  LABEL[$name]=$label
  SEEDS[$name]=${pkg#//}/corpus/$name
  CXX_TARGETS+=("$name")
done

RUNS=1000000
TIME=3600
SMOKE=0
TARGETS=()
while (($#)); do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --time) TIME=$2; shift 2 ;;
    --smoke) SMOKE=1; RUNS=5000; TIME=5; shift ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
if ((${#TARGETS[@]} == 0)); then
  TARGETS=("${CXX_TARGETS[@]}")
  ((SMOKE)) || TARGETS+=(config)
fi
for t in "${TARGETS[@]}"; do
  [[ -v SEEDS[$t] ]] || { echo "fuzz.sh: unknown target $t (known: ${!SEEDS[*]})" >&2; exit 2; }
done

# --- build ------------------------------------------------------------------
labels=()
for t in "${TARGETS[@]}"; do [[ -v LABEL[$t] ]] && labels+=("${LABEL[$t]}"); done
if ((${#labels[@]})); then
  command -v clang >/dev/null || { echo "fuzz.sh: clang not found (tools/setup.sh installs it)" >&2; exit 1; }
  "${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" "${labels[@]}" || { echo "fuzz.sh: build failed" >&2; exit 1; }
  BIN=$("${BAZEL[@]}" info "${BAZEL_FLAGS[@]}" bazel-bin 2>/dev/null)
fi
if [[ " ${TARGETS[*]} " == *" config "* ]] && ! PYTHONPATH=$ATHERIS_DIR "$VENV_PY" -c 'import atheris' 2>/dev/null; then
  echo "fuzz.sh: installing atheris==$ATHERIS_VERSION into $ATHERIS_DIR"
  "$VENV_PY" -m pip install --quiet --target "$ATHERIS_DIR" "atheris==$ATHERIS_VERSION" 2>&1 |
    { grep -v 'is ignored: it is neither a file nor a directory' || true; }
fi

# --- run --------------------------------------------------------------------
OUT="$ROOT/.kvtier-cache/fuzz"
ROWS=()
FAILED=0
for t in "${TARGETS[@]}"; do
  work="$OUT/$t"
  mkdir -p "$work"
  if ((SMOKE)); then
    corpus=$(mktemp -d)  # the seeds only: a smoke pass must not depend on earlier runs
  else
    corpus="$work/corpus"
    mkdir -p "$corpus"
  fi
  log="$work/last_run.log"
  # libFuzzer adds new inputs to the first corpus directory only: the
  # checked-in seeds (second) stay as they are.
  args=(-runs="$RUNS" -max_total_time="$TIME" -print_final_stats=1 -artifact_prefix="$work/"
        -timeout=30 -rss_limit_mb=4096 "$corpus")
  [[ -n ${SEEDS[$t]} ]] && args+=("$ROOT/${SEEDS[$t]}")
  echo "fuzz.sh: $t: up to $RUNS executions or ${TIME}s (log: ${log#"$ROOT"/})"
  t0=$(date +%s.%N)
  if [[ $t == config ]]; then
    (cd "$work" && PYTHONPATH=$ATHERIS_DIR "$VENV_PY" "$ROOT/tools/config_fuzz_atheris.py" "${args[@]}") >"$log" 2>&1
  else
    exe=${LABEL[$t]#//}
    (cd "$work" && "$BIN/${exe/://}" "${args[@]}") >"$log" 2>&1
  fi
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
  ((SMOKE)) && rm -rf "$corpus"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$')
  # Over the whole run, start-up included (libFuzzer's own average counts
  # whole seconds and says 0 for a short run).
  rate=$(awk -v n="${execs:-0}" -v s="$secs" 'BEGIN { printf "%d", (s > 0 ? n / s : 0) }')
  if ((rc == 0)); then
    result=ok
  else
    FAILED=1
    crash=$(grep -o "Test unit written to [^ ]*" "$log" | tail -n 1 | sed 's/Test unit written to //')
    result="FAILED (exit $rc${crash:+, reproducer ${crash#"$ROOT"/}})"
    grep -E 'FUZZ_CHECK|ERROR: |runtime error|escaped load_config' "$log" | head -n 5 >&2
  fi
  ROWS+=("| $t | ${execs:-?} | ${rate:-?} | $secs | $result |")
done

printf '\n| target | executions | executions/s | seconds | result |\n|---|---:|---:|---:|---|\n'
printf '%s\n' "${ROWS[@]}"
echo "($(date -u +%Y-%m-%d), $(nproc) cores, runs<=$RUNS, time<=${TIME}s per target)"
exit $FAILED
