#!/usr/bin/env bash
# The engine's overhead: wall time of a fully cached `pipe run` and of `pipe status` on the quickstart's
# 7 stages, with process start-up as the floor; beside them, when `dvc` is installed, `dvc repro` and
# `dvc status` of an equivalent 7-stage no-op DVC pipeline (the same DAG: load → normalize → split →
# tokenize → train → evaluate → analyze, the same two input files, one params section per stage, each
# stage's command writing one small file), fully cached too; and the engine's file hasher on 1 GiB
# (`cargo bench --bench hash`). Writes benches/results/engine-<date>.json (benches/provenance.py).
#
#   benches/engine.sh [PIPELINE]   # default pipelines/quickstart.toml; builds the release binary
#
# ENGINE_RUNS (default 20) sets the timed runs of each command; DVC runs with analytics and update
# checks off. Python is $PYTHON (default python3). Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pipeline=${1:-pipelines/quickstart.toml}
runs=${ENGINE_RUNS:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet
cargo bench --quiet --bench hash --no-run
bin=target/release/pipe
$bin run "$pipeline" --quiet >/dev/null            # fill the cache (the first run does the work)

# The no-op DVC pipeline, filled once.
have_dvc=false
if command -v dvc >/dev/null; then
    have_dvc=true
    export DVC_NO_ANALYTICS=1
    dvcdir=$tmp/dvc
    mkdir -p "$dvcdir"
    cp data/train.csv data/product_descriptions.csv "$dvcdir"/
    "$py" - "$dvcdir" <<'PY'
import sys
d = sys.argv[1]
stages = [("load", ["train.csv", "product_descriptions.csv"]), ("normalize", ["load.out"]),
          ("split", ["normalize.out"]), ("tokenize", ["split.out"]), ("train", ["tokenize.out"]),
          ("evaluate", ["train.out", "tokenize.out", "split.out"]), ("analyze", ["evaluate.out", "split.out", "train.out"])]
with open(f"{d}/params.yaml", "w") as f:
    for name, _ in stages:
        f.write(f"{name}:\n  seed: 42\n")
with open(f"{d}/dvc.yaml", "w") as f:
    f.write("stages:\n")
    for name, deps in stages:
        f.write(f"  {name}:\n    cmd: echo {name} > {name}.out\n    deps: [{', '.join(deps)}]\n"
                f"    params: [{name}]\n    outs: [{name}.out]\n")
PY
    (cd "$dvcdir" && dvc init --no-scm --quiet && dvc config core.analytics false \
        && dvc config core.check_update false && dvc repro --quiet >/dev/null)
fi

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%FT%TZ)
# Wall times (ms) of N runs of a command in a directory: {"runs", "median_ms", "min_ms", "max_ms", "ms"}.
times() {
    local dir=$1
    shift
    "$py" - "$dir" "$runs" "$@" <<'PY'
import json, subprocess, sys, time
d, n, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ts = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd, cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ts.append(1000 * (time.perf_counter() - t))
s = sorted(ts)
print(json.dumps({"runs": n, "median_ms": round(s[n // 2], 2), "min_ms": round(s[0], 2),
                  "max_ms": round(s[-1], 2), "ms": [round(x, 2) for x in ts]}))
PY
}
root=$PWD
times "$root" "$root/$bin" run "$pipeline" --quiet > "$tmp/pipe_run.json"
times "$root" "$root/$bin" status "$pipeline" > "$tmp/pipe_status.json"
times "$root" "$root/$bin" --version > "$tmp/pipe_version.json"
if $have_dvc; then
    times "$dvcdir" dvc repro --quiet > "$tmp/dvc_repro.json"
    times "$dvcdir" dvc status --quiet > "$tmp/dvc_status.json"
    times "$dvcdir" dvc --version > "$tmp/dvc_version.json"
fi
cargo bench --quiet --bench hash | tee "$tmp/hash.txt"

"$py" - "$tmp" "$pipeline" "$have_dvc" > "$tmp/results.json" <<'PY'
import json, os, re, sys
tmp, pipeline, have_dvc = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
load = lambda name: json.load(open(os.path.join(tmp, name + ".json")))
res = {"pipeline": pipeline, "cached_pipe_run": load("pipe_run"), "pipe_status": load("pipe_status"),
       "pipe_version": load("pipe_version")}
if have_dvc:
    res["dvc"] = {"pipeline": "7 no-op stages, the quickstart's DAG, inputs and one params section each",
                  "cached_dvc_repro": load("dvc_repro"), "dvc_status": load("dvc_status"),
                  "dvc_version": load("dvc_version")}
    res["ratio"] = {
        "dvc_repro_over_pipe_run_median": round(res["dvc"]["cached_dvc_repro"]["median_ms"] / res["cached_pipe_run"]["median_ms"], 2),
        "dvc_status_over_pipe_status_median": round(res["dvc"]["dvc_status"]["median_ms"] / res["pipe_status"]["median_ms"], 2),
    }
else:
    res["dvc"] = None
m = re.search(r"hash: (\d+) MiB in ([\d.]+) s = ([\d.]+) GiB/s.*?(\d+) threads", open(os.path.join(tmp, "hash.txt")).read())
if m:
    res["hash"] = {"mib": int(m.group(1)), "seconds": float(m.group(2)), "gib_per_s": float(m.group(3)),
                   "threads": int(m.group(4)), "note": "best of 3, warm page cache"}
print(json.dumps(res))
PY
path=$("$py" benches/provenance.py --bench engine --started "$started" --load-before "$load_before" \
    --command "benches/engine.sh $*" --results "$tmp/results.json" --versions dvc)
"$py" - "$path" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
res = r["results"]
line = lambda k, t: print(f"{k:22} median {t['median_ms']:8.1f} ms, min {t['min_ms']:8.1f} ms over {t['runs']} runs")
line("cached pipe run", res["cached_pipe_run"]); line("pipe status", res["pipe_status"])
line("pipe --version", res["pipe_version"])
if res["dvc"]:
    line("cached dvc repro", res["dvc"]["cached_dvc_repro"]); line("dvc status", res["dvc"]["dvc_status"])
    line("dvc --version", res["dvc"]["dvc_version"]); print("ratios", res["ratio"])
if "hash" in res:
    print(f"hash: {res['hash']['gib_per_s']} GiB/s")
print(f"load average before {r['load_average']['before']}, after {r['load_average']['after']}")
print(f"written: {sys.argv[1]}")
PY
