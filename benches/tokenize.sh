#!/usr/bin/env bash
# Tokenize throughput: pipe's prompt encoder (Rust) vs the Python `tokenizers` library's batch encoding
# of the same prompts, on the same machine, over the full Home Depot train set (74,067 pairs).
# Also checks that both produce identical ids for every pair.
#
#   benches/tokenize.sh [DATA_DIR]      # default ../shared/data/home_depot; needs `pip install tokenizers`
#
# Run it on an otherwise idle machine: both sides use every core.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/home_depot}
if [ ! -f "$data/train.csv.gz" ]; then
    echo "skipped: $data/train.csv.gz not found (the full Home Depot data lives in ../shared)"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo bench --quiet --bench tokenize -- --data "$data" --ids "$tmp/rust.ids" | tee "$tmp/rust.txt"
python3 benches/tokenize_python.py --data "$data" --ids "$tmp/python.ids" | tee "$tmp/python.txt"
if cmp -s "$tmp/rust.ids" "$tmp/python.ids"; then
    echo "ids: identical for every pair"
else
    echo "ids: DIFFERENT"
    exit 1
fi
value() { sed -n "s/^RESULT $1=//p" "$tmp"/*.txt; }
rust=$(value rust_pairs_per_s)
rust_whole=$(value rust_whole_bodies_pairs_per_s)
py=$(value python_pairs_per_s)
py_bodies=$(value python_bodies_only_pairs_per_s)
awk -v r="$rust" -v w="$rust_whole" -v p="$py" -v b="$py_bodies" 'BEGIN {
    printf "pairs/s: rust %.0f (whole bodies %.0f) | python %.0f (encode_batch of bodies alone %.0f)\n", r, w, p, b
    printf "rust/python: %.2fx (whole bodies %.2fx; vs python bodies alone %.2fx)\n", r / p, w / p, r / b
}'
