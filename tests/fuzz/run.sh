#!/bin/sh
# Runs one fuzz target: tests/fuzz/run.sh <target> [seconds, default 600]
# From the repository root. One libFuzzer process (-jobs=1 -workers=1, at low
# priority); its log goes to fuzz-0.log, the corpus it grows to
# tests/fuzz/corpus/<target>, crashes to tests/fuzz/artifacts/<target>.
set -eu
target="$1"
seconds="${2:-600}"
dir="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$dir/corpus/$target"
RUSTC_BOOTSTRAP=1 exec nice -n 10 cargo fuzz run --fuzz-dir tests/fuzz -s none -a "$target" \
  "$dir/corpus/$target" "$dir/seeds/$target" -- \
  -dict="$dir/dict/$target.dict" -max_total_time="$seconds" \
  -jobs=1 -workers=1 -print_final_stats=1
