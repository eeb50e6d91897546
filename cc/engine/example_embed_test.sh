#!/usr/bin/env bash
# The embedding example must run end to end, with and without the disk tier.
set -euo pipefail
bin="cc/engine/example_embed"
out=$("$bin")
echo "$out"
grep -q "retrieved 1000 tokens, 0 mismatching" <<<"$out"
dir=$(mktemp -d "${TEST_TMPDIR:-/tmp}/kvt-example.XXXXXX")
out=$("$bin" "$dir")
echo "$out"
grep -q "retrieved 1000 tokens, 0 mismatching" <<<"$out"
grep -q "disk tier: 4 entries, 4 chunks written behind" <<<"$out"
