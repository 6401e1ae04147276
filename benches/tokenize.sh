#!/usr/bin/env bash
# Tokenize throughput: pipe's prompt encoder (Rust) vs the Python `tokenizers` library's batch encoding
# of the same prompts, on the same machine, over the full Home Depot train set (74,067 pairs).
# Also checks that both produce identical ids for every pair.
#
# The headline compares whole bodies on both sides: pipe encoding every prompt body whole (as the Python
# side does) against the faster of the library's batch APIs in the same run, `encode_batch_fast` (no
# offsets) or `encode_batch` (both are run and reported). The tokenize stage's shortcut (the
# instruction's ids reused, only the query and document encoded) is reported apart, as pipe with the
# shortcut over pipe without it.
# Writes benches/results/tokenize-<date>.json (benches/provenance.py).
#
#   benches/tokenize.sh [DATA_DIR]      # default ../shared/data/home_depot; needs `pip install tokenizers`
#
# Python is $PYTHON (default python3). Run it on an otherwise idle machine: both sides use every core.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
data=${1:-../shared/data/home_depot}
if [ ! -f "$data/train.csv.gz" ]; then
    echo "skipped: $data/train.csv.gz not found (the full Home Depot data lives in ../shared)"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet                      # `pipe --version` for the provenance
cargo bench --quiet --bench tokenize --no-run
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%FT%TZ)
cargo bench --quiet --bench tokenize -- --data "$data" --ids "$tmp/rust.ids" | tee "$tmp/rust.txt"
"$py" benches/tokenize_python.py --data "$data" --api fast --ids "$tmp/fast.ids" | tee "$tmp/fast.txt"
"$py" benches/tokenize_python.py --data "$data" --api plain --ids "$tmp/plain.ids" | tee "$tmp/plain.txt"
identical=true
for side in fast plain; do
    cmp -s "$tmp/rust.ids" "$tmp/$side.ids" || identical=false
done
"$py" - "$tmp" "$identical" > "$tmp/results.json" <<'PY'
import json, os, re, sys
tmp, identical = sys.argv[1], sys.argv[2] == "true"
def read(name):
    lines = open(os.path.join(tmp, name + ".txt")).read().splitlines()
    vals = {}
    for line in lines:
        if line.startswith("RESULT "):
            k, v = line[7:].split("=", 1)
            try:
                vals[k] = float(v)
            except ValueError:
                vals[k] = v
    return vals, [l for l in lines if not l.startswith("RESULT ")]
rust, rust_log = read("rust")
fast, fast_log = read("fast")
plain, plain_log = read("plain")
whole = rust["rust_whole_bodies_pairs_per_s"]
ref = max(fast, plain, key=lambda r: r["python_pairs_per_s"])
res = {
    "pairs": int(next(re.match(r"rust: (\d+) pairs", l).group(1) for l in rust_log if re.match(r"rust: \d+ pairs", l))),
    "ids_identical": identical,
    "pairs_per_s": {
        "pipe_whole_bodies": whole,
        "pipe_with_shortcut": rust["rust_pairs_per_s"],
        "python_" + fast["python_api"]: fast["python_pairs_per_s"],
        "python_" + fast["python_api"] + "_bodies_alone": fast["python_bodies_only_pairs_per_s"],
        "python_" + plain["python_api"]: plain["python_pairs_per_s"],
        "python_" + plain["python_api"] + "_bodies_alone": plain["python_bodies_only_pairs_per_s"],
    },
    "ratio": {
        # The headline: whole bodies on both sides, against the faster of the library's two batch APIs
        # in this run (encode_batch_fast skips offsets but is not always the faster one).
        "reference": "python_" + ref["python_api"],
        "pipe_whole_bodies_over_python_fastest": round(whole / ref["python_pairs_per_s"], 3),
        "pipe_whole_bodies_over_python_" + fast["python_api"]: round(whole / fast["python_pairs_per_s"], 3),
        "pipe_whole_bodies_over_python_" + plain["python_api"]: round(whole / plain["python_pairs_per_s"], 3),
        "pipe_whole_bodies_over_python_fastest_bodies_alone": round(whole / ref["python_bodies_only_pairs_per_s"], 3),
        # Apart: what the instruction shortcut gains inside pipe.
        "shortcut_gain_pipe_with_over_without": round(rust["rust_pairs_per_s"] / whole, 3),
    },
    "log": {"rust": rust_log, "python_fast": fast_log, "python_plain": plain_log},
}
print(json.dumps(res))
PY
path=$("$py" benches/provenance.py --bench tokenize --started "$started" --load-before "$load_before" \
    --command "benches/tokenize.sh $*" --results "$tmp/results.json" --versions tokenizers)
"$py" - "$path" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k, v in r["results"]["pairs_per_s"].items():
    print(f"{k:45} {v:10.0f} pairs/s")
for k, v in r["results"]["ratio"].items():
    print(f"{k:60} {v:.2f}x" if isinstance(v, float) else f"{k:60} {v}")
print(f"ids identical: {r['results']['ids_identical']}; load average before {r['load_average']['before']}, "
      f"after {r['load_average']['after']}")
print(f"written: {sys.argv[1]}")
PY
[ "$identical" = true ] || { echo "ids: DIFFERENT" >&2; exit 1; }
