#!/usr/bin/env bash
# Runs one fuzz target for a while, growing a scratch corpus in fuzz/work/<target>/ from the
# committed seeds in fuzz/corpus/<target>/ (which it never writes to).
#
#   fuzz/run.sh <target> [seconds] [extra libFuzzer flags...]
#
# Crashes land in fuzz/artifacts/<target>/. Uses the nightly toolchain (fuzz/rust-toolchain.toml)
# and cargo-fuzz's default build: release, debug assertions and overflow checks on, ASan.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?target}
secs=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "work/$target" "corpus/$target"
dict=()
[[ -f "dict/$target.dict" ]] && dict=("-dict=dict/$target.dict")
exec cargo +nightly fuzz run "$target" "work/$target" "corpus/$target" -- \
    -max_total_time="$secs" -print_final_stats=1 "${dict[@]}" "$@"
