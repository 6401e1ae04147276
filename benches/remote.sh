#!/usr/bin/env bash
# The remote artifact store: wall time of the quickstart fully fetched from a local S3 server (moto on
# 127.0.0.1) into a fresh project with an empty store, against the same run computing every stage.
# Writes benches/results/remote-<date>.json (benches/provenance.py).
#
#   benches/remote.sh [--set S.P=V]...   # extra overrides for every run; default the full quickstart
#
# PROFILE=release (default) or debug picks the build (the debug build compiles pipe's own code, the
# model and training loop included, without optimisation, so computing is slower there than in release);
# FETCH_RUNS (default 3) sets the fetched runs,
# each into its own fresh project. Needs `pip install 'moto[server]'`. Python is $PYTHON (default
# python3). Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
profile=${PROFILE:-release}
fetch_runs=${FETCH_RUNS:-3}
tmp=$(mktemp -d)
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$py" -m moto.server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null; rm -rf "$tmp"' EXIT
if [ "$profile" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
bin=$PWD/target/$profile/pipe
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
for _ in $(seq 100); do "$py" -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break; sleep 0.2; done
"$py" -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').create_bucket(Bucket='bench')"
remote=s3://bench/quickstart

project() {  # a fresh copy of the quickstart with an empty store
    local d=$tmp/$1
    mkdir -p "$d/data" "$d/pipelines"
    cp data/train.csv data/product_descriptions.csv "$d/data/"
    cp pipelines/quickstart.toml "$d/pipelines/"
    echo "$d"
}
# One timed run: its JSON report with the wall time added.
timed() {
    local d=$1
    shift
    "$py" - "$d" "$bin" "$@" <<'PY'
import json, subprocess, sys, time
d, cmd = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
out = subprocess.run(cmd + ["--json"], cwd=d, check=True, capture_output=True, text=True)
wall = time.perf_counter() - t
r = json.loads(out.stdout)
print(json.dumps({"wall_s": round(wall, 3), "statuses": [s["status"] for s in r["stages"]]}))
PY
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%FT%TZ)
timed "$(project compute)" run pipelines/quickstart.toml "$@" > "$tmp/compute.json"
timed "$(project upload)" run pipelines/quickstart.toml --remote "$remote" "$@" > "$tmp/upload.json"
: > "$tmp/fetch.jsonl"
for i in $(seq "$fetch_runs"); do
    timed "$(project "fetch$i")" run pipelines/quickstart.toml --remote "$remote" "$@" >> "$tmp/fetch.jsonl"
done
bytes=$(du -sb "$tmp/upload/artifacts" --exclude=runs --exclude=.tmp --exclude=.scratch --exclude=.locks | cut -f1)

"$py" - "$tmp" "$profile" "$bytes" "$*" > "$tmp/results.json" <<'PY'
import json, os, sys
tmp, profile, size, sets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
load = lambda n: json.load(open(os.path.join(tmp, n)))
fetch = [json.loads(l) for l in open(os.path.join(tmp, "fetch.jsonl"))]
assert all(s == "ran" for s in load("compute.json")["statuses"]), load("compute.json")
assert all(s == "fetched" for r in fetch for s in r["statuses"]), fetch
walls = sorted(r["wall_s"] for r in fetch)
res = {"pipeline": "pipelines/quickstart.toml", "overrides": sets, "build": profile,
       "server": "moto (S3 REST API) on 127.0.0.1, same machine", "store_bytes": size,
       "computed_everything": load("compute.json"), "computed_and_uploaded": load("upload.json"),
       "fully_fetched": {"runs": len(fetch), "median_s": walls[len(walls) // 2], "min_s": walls[0],
                         "max_s": walls[-1], "each": fetch}}
res["compute_over_fetch_median"] = round(res["computed_everything"]["wall_s"] / res["fully_fetched"]["median_s"], 1)
print(json.dumps(res))
PY
path=$("$py" benches/provenance.py --bench remote --started "$started" --load-before "$load_before" \
    --command "benches/remote.sh $*" --results "$tmp/results.json" --versions moto,boto3)
"$py" - "$path" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
res = r["results"]
print(f"computing every stage: {res['computed_everything']['wall_s']} s ({res['build']} build)")
print(f"computing and uploading: {res['computed_and_uploaded']['wall_s']} s")
print(f"fully fetched: median {res['fully_fetched']['median_s']} s over {res['fully_fetched']['runs']} runs "
      f"({res['store_bytes']} bytes); {res['compute_over_fetch_median']}x")
print(f"load average before {r['load_average']['before']}, after {r['load_average']['after']}")
print(f"written: {sys.argv[1]}")
PY
