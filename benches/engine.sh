#!/usr/bin/env bash
# Wall time of a fully cached `pipe run` and of `pipe status` on the quickstart, against no-op baselines.
# Usage: benches/engine.sh [pipeline]   (default pipelines/quickstart.toml; builds the release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
pipeline=${1:-pipelines/quickstart.toml}
cargo build --release --quiet
bin=target/release/pipe
$bin run "$pipeline" --quiet >/dev/null            # fill the cache (first run does the work)
ms() { python3 - "$@" <<'PY'
import subprocess, sys, time
cmd = sys.argv[1:]
ts = []
for _ in range(20):
    t = time.perf_counter(); subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); ts.append(time.perf_counter() - t)
ts.sort()
print(f"median {1000*ts[len(ts)//2]:.1f} ms, min {1000*ts[0]:.1f} ms over {len(ts)} runs")
PY
}
echo "cached pipe run : $(ms $bin run "$pipeline" --quiet)"
echo "pipe status     : $(ms $bin status "$pipeline")"
echo "pipe --version  : $(ms $bin --version)   (process start-up floor)"
