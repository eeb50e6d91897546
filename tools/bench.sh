#!/usr/bin/env bash
# kvtier benchmarks.
#   tools/bench.sh micro   build every C++ target tagged "benchmark" with
#                          --config=opt, run each, print the JSON comparison
#                          lines each prints last (see cc/common/bench_main.h)
#   tools/bench.sh ttft [ttft options]
#                          TTFT on a real vLLM: kvtier vs ExampleConnector vs
#                          no connector (python -m kvtier.bench.ttft --help)
# Environment: BAZEL_OUTPUT_BASE (passed as --output_base when set),
#              KVTIER_BENCH_SCOPE (query scope, default //cc/...),
#              KVTIER_BENCH_ARGS (extra args for each C++ benchmark binary)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BAZEL=(bazel)
[[ -n ${BAZEL_OUTPUT_BASE:-} ]] && BAZEL+=("--output_base=$BAZEL_OUTPUT_BASE")

micro() {
  local targets
  # //... would descend into the bazel-* convenience symlinks; the C++
  # benchmarks live under cc/ (override with KVTIER_BENCH_SCOPE).
  local scope=${KVTIER_BENCH_SCOPE:-//cc/...}
  targets=$("${BAZEL[@]}" query "attr(tags, '\bbenchmark\b', kind('cc_binary', $scope))" 2>/dev/null)
  if [[ -z $targets ]]; then
    echo "bench.sh: no C++ benchmark targets" >&2
    return 1
  fi
  # shellcheck disable=SC2086
  "${BAZEL[@]}" build --config=opt $targets
  local bin_dir lines=() failed=0 t path out
  bin_dir=$("${BAZEL[@]}" info --config=opt bazel-bin 2>/dev/null)
  for t in $targets; do
    path="$bin_dir/${t#//}"
    path="${path/://}"
    echo "== $t" >&2
    # bench_main turns colour off itself; trace_replay takes no benchmark flags.
    # shellcheck disable=SC2086
    if ! out=$("$path" ${KVTIER_BENCH_ARGS:-} 2>&1); then
      echo "$out" >&2
      echo "bench.sh: $t failed" >&2
      failed=1
      continue
    fi
    echo "$out" >&2
    # One JSON object per comparison, each on its own line, printed last.
    while IFS= read -r line; do lines+=("$line"); done < <(sed 's/\x1b\[[0-9;]*m//g' <<<"$out" | grep '^{"name"' || true)
  done
  echo "== comparisons"
  printf '%s\n' "${lines[@]}"
  return $failed
}

ttft() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  local py="$ROOT/.venv/bin/python"
  if "$py" -c 'import kvtier._kvtier' 2>/dev/null; then
    "$py" -m kvtier.bench.ttft "$@"
  else
    # Not installed: use the source tree and the extension built here.
    "${BAZEL[@]}" build --config=opt //python/src:extension
    PYTHONPATH="$ROOT/python:$("${BAZEL[@]}" info --config=opt bazel-bin)/python/src" \
      "$py" -m kvtier.bench.ttft "$@"
  fi
}

case ${1:-} in
  micro) shift; micro "$@" ;;
  ttft) shift; ttft "$@" ;;
  *) echo "usage: tools/bench.sh {micro|ttft} [args]" >&2; exit 2 ;;
esac
