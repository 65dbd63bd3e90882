#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20) with libFuzzer, from the corpus in
# fuzz/corpus. New inputs go to a scratch copy, so the committed corpus changes only by hand
# (`cargo fuzz cmin` then commit). Exits non-zero on the first crash, leak of memory past the
# limits, or timeout; the crashing input is left in fuzz/artifacts/TARGET/.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Runs on the stable toolchain: no
# sanitizer (-s none); coverage instrumentation, debug assertions and overflow checks are on.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
targets=(search_query resource_intake bundle cursor)
cargo fuzz build -s none
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"; rm -f target/cursor-*.sqlite*' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "fuzz: $t for ${seconds}s"
  set +e
  cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|==|SUMMARY|Done|thread .* panicked|.*ERROR)'
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $t failed; the input is under fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "fuzz: every target ran ${seconds}s without a failure"
