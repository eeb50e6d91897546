#!/usr/bin/env bash
# Crash loop (issue 13): a writer storing chunks through the real engine with
# a disk tier is killed with SIGKILL at a random moment, restarted, and
# checked, N times over the same directory.
#
#   tools/crash_loop.sh [N] [--sync none|batch|always] [--dir DIR] [--self-test]
#
# N (default 100) kills. Each round: crash_loop_worker write (stores under
# read load, acknowledging chunks in DIR/acks only once they are on disk),
# SIGKILL after a random 0.2-2.0 s, then crash_loop_worker check, which
# restarts the engine (index rebuild, timed) and checks every acknowledged
# chunk: a hit with the right bytes, or gone by eviction (counted); any lost
# or wrong chunk fails the round (see cc/tiers/disk/crash_loop_worker.cc).
# Prints one JSON line per round, then a summary; exits non-zero if any round
# failed. Results and the command that produced them: RELIABILITY.md.
#
# --sync: disk_sync of the writer (default none, the engine's default).
# --dir: where the disk tier and the acks live (default: a fresh directory
#        under /var/tmp, removed at the end; never a tmpfs: O_DIRECT).
# --self-test: the writer acknowledges each window before storing it; the
#        loop must then report lost chunks (exit 0 only if it does).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

N=100
SYNC=none
DIR=""
SELF_TEST=0
while (($#)); do
  case $1 in
    --sync) SYNC=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --self-test) SELF_TEST=1; shift ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *[!0-9]* | "") echo "crash_loop.sh: unknown argument '$1'" >&2; exit 2 ;;
    *) N=$1; shift ;;
  esac
done

BAZEL=(bazel)
[[ -n ${KVTIER_BAZEL_OUTPUT_BASE:-} ]] && BAZEL+=("--output_base=$KVTIER_BAZEL_OUTPUT_BASE")
FLAGS=("--repo_env=PYTHON_BIN_PATH=$ROOT/.venv/bin/python" --config=opt)
"${BAZEL[@]}" build "${FLAGS[@]}" //cc/tiers/disk:crash_loop_worker >&2
WORKER="$("${BAZEL[@]}" info "${FLAGS[@]}" bazel-bin 2>/dev/null)/cc/tiers/disk/crash_loop_worker"

CLEANUP=0
if [[ -z $DIR ]]; then
  DIR=$(mktemp -d /var/tmp/kvtier_crash_loop.XXXXXX)
  CLEANUP=1
fi
mkdir -p "$DIR"
RESULTS="$DIR/results.jsonl"
: >"$RESULTS"
WRITER_MODE=write
((SELF_TEST)) && WRITER_MODE=write-ack-first

failed=0
for ((round = 1; round <= N; round++)); do
  "$WORKER" "$WRITER_MODE" "$DIR" "$SYNC" &
  pid=$!
  # A random moment: 0.2 to 2.0 s after the start (open + rebuild included).
  delay_ms=$((200 + RANDOM % 1801))
  sleep "$((delay_ms / 1000)).$(printf '%03d' $((delay_ms % 1000)))"
  if ! kill -KILL "$pid" 2>/dev/null; then
    echo "round $round: the writer exited before the kill" >&2
  fi
  rc=0
  { wait "$pid"; } 2>/dev/null || rc=$?  # (bash's "Killed" notice is expected)
  if ((rc != 137)); then
    echo "round $round: the writer ended with status $rc, not SIGKILL (3: it read a wrong byte)" >&2
    failed=1
  fi
  if line=$("$WORKER" check "$DIR" "$SYNC"); then
    :
  else
    failed=1
  fi
  line=${line:-"{}"}
  echo "${line%\}}, \"round\": $round, \"kill_after_ms\": $delay_ms}" | tee -a "$RESULTS"
done

SUMMARY=$("$ROOT/.venv/bin/python" - "$RESULTS" "$N" "$SYNC" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "acked" in r]
def mmm(key, scale=1.0, fmt="{:.1f}"):
    v = sorted(r[key] * scale for r in rows)
    return {"min": round(v[0], 3), "median": round(statistics.median(v), 3), "max": round(v[-1], 3)}
out = {
    "rounds": int(sys.argv[2]), "checked": len(rows), "disk_sync": sys.argv[3],
    "acked_total": rows[-1]["acked"] if rows else 0,
    "hits_per_check": mmm("hits") if rows else None,
    "evicted_at_last_check": rows[-1]["evicted"] if rows else 0,
    "lost_total": sum(r["lost"] for r in rows),
    "corrupt_total": sum(r["corrupt"] for r in rows),
    "unacked_served_total": sum(r["unacked_served"] for r in rows),
    "torn_refused_total": sum(r["torn_refused"] for r in rows),
    "corrupt_headers_total": sum(r["corrupt_headers"] for r in rows),
    "rebuild_ms": mmm("rebuild_s", 1000) if rows else None,
    "open_ms": mmm("open_s", 1000) if rows else None,
    "rebuild_chunks": mmm("rebuild_chunks") if rows else None,
}
print(json.dumps(out))
EOF
)
echo "summary: $SUMMARY"
((CLEANUP)) && rm -rf "$DIR"

if ((SELF_TEST)); then
  if ((failed)) && [[ $SUMMARY != *'"lost_total": 0,'* ]]; then
    echo "crash_loop.sh: self-test OK: acknowledgements before the disk write were caught"
    exit 0
  fi
  echo "crash_loop.sh: self-test FAILED: the check did not catch early acknowledgements" >&2
  exit 1
fi
if ((failed)); then
  echo "crash_loop.sh: FAILED" >&2
  exit 1
fi
echo "crash_loop.sh: OK ($N kills)"
