#!/usr/bin/env bash
# Measures the suite's strength on the device model with cargo-mutants on a seeded random sample
# of host-device's mutants (CONFORMANCE.md, "Suite strength").
#   host-device/mutants-sample.sh [N=200] [SEED=2026] [OUT=target/mutants-sample]
# Needs `cargo install cargo-mutants` (27.x) and cargo-nextest. What runs against each mutant is
# set in .cargo/mutants.toml: the device model's tests and the in-process conformance suite.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
seed=${2:-2026}
out=${3:-target/mutants-sample}
mkdir -p "$out"
cargo mutants -p virtio-iommu-device --list 2>/dev/null >"$out/all.txt"
python3 - "$n" "$seed" "$out/all.txt" >"$out/sample.txt" <<'PY'
import random, sys
n, seed, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
names = [l.rstrip("\n") for l in open(path) if l.strip()]
random.seed(seed)
print("\n".join(sorted(random.sample(names, min(n, len(names))))))
PY
args=()
while IFS= read -r name; do
    args+=(-F "^$(python3 -c 'import re, sys; print(re.escape(sys.argv[1]))' "$name")\$")
done <"$out/sample.txt"
echo "sampled $(wc -l <"$out/sample.txt") of $(wc -l <"$out/all.txt") mutants (seed $seed)"
cargo mutants -j 2 -p virtio-iommu-device "${args[@]}" -o "$out"
