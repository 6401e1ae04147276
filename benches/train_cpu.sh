#!/usr/bin/env bash
# Training samples/s on the CPU: pipe (candle) vs PyTorch + transformers, same Qwen3 reranker config,
# batch (8 × 128 tokens), loss, optimizer, clipping and machine, on two configs in the same run
# (see benches/train_cpu.rs): `tiny` (the quickstart's model, where the 151,669-row embedding makes the
# optimizer a large share of the step) and `layers` (vocab 16,384, hidden 256, 4 layers: the decoder
# layers dominate). For each config, in this order: pipe, PyTorch with fused AdamW (the headline
# reference), PyTorch with its default AdamW, and PyTorch with fused AdamW and torch.compile.
# Writes benches/results/train_cpu-<date>.json (benches/provenance.py) and prints the ratios.
#
#   benches/train_cpu.sh [TINY_STEPS] [LAYERS_STEPS]     # timed steps; default 100 and 20
#
# Everything runs twice: with each library's default threads (every core) and with one thread on both
# sides (CANDLE_NUM_THREADS, RAYON_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS = 1), the comparison
# that a busy machine distorts least (both libraries' thread pools spin-wait and lose most when other
# processes take their cores). TRAIN_CPU_THREADS="default 1" picks the settings.
# Needs python with torch and transformers ($PYTHON, default python3). TRAIN_CPU_COMPILE lists the thread
# settings that also get a torch.compile run (default "1": its compilation takes minutes on 2 cores;
# "" skips it). Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
tiny_steps=${1:-100}
layers_steps=${2:-20}
thread_settings=${TRAIN_CPU_THREADS:-default 1}
if ! "$py" -c "import torch, transformers" 2>/dev/null; then
    echo "train_cpu: $py cannot import torch and transformers (pip install torch transformers; or set PYTHON)" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet                      # `pipe --version` for the provenance
cargo bench --quiet --bench train_cpu --no-run
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%FT%TZ)

# One side's JSON line into $tmp/<config>.<side>.json, or {"error": ...} if it failed.
side() {
    local out=$tmp/$1.$2.json
    shift 2
    if "$@" > "$tmp/raw" 2> "$tmp/err"; then
        tail -1 "$tmp/raw" > "$out"
    else
        "$py" -c 'import json,sys; print(json.dumps({"error": open(sys.argv[1]).read()[-2000:]}))' "$tmp/err" > "$out"
    fi
    echo "$(basename "$out" .json): $(cat "$out")" >&2
}
for threads in $thread_settings; do
    if [ "$threads" = default ]; then
        tenv=()
    else
        tenv=(CANDLE_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads)
    fi
    for config in tiny layers; do
        steps=$tiny_steps
        [ "$config" = layers ] && steps=$layers_steps
        warmup=5
        key=$config.threads_$threads
        side "$key" pipe env "${tenv[@]}" PIPE_BENCH_CONFIG=$config PIPE_BENCH_STEPS=$steps PIPE_BENCH_WARMUP=$warmup \
            cargo bench --quiet --bench train_cpu
        torch=(env "${tenv[@]}" "$py" benches/train_cpu_torch.py --config $config --steps "$steps" --warmup $warmup)
        side "$key" torch_fused "${torch[@]}" --fused
        side "$key" torch "${torch[@]}"
        if [[ " ${TRAIN_CPU_COMPILE-1} " == *" $threads "* ]]; then
            side "$key" torch_compile timeout 900 "${torch[@]}" --fused --compile
        fi
    done
done

"$py" - "$tmp" > "$tmp/results.json" <<'PY'
import json, os, sys
tmp = sys.argv[1]
res = {"batch": 8, "seq": 128, "configs": {}}
keys = sorted({f.rsplit(".", 2)[0] for f in os.listdir(tmp) if f.endswith(".json") and ".threads_" in f})
for config in keys:
    sides = {}
    for side in ("pipe", "torch_fused", "torch", "torch_compile"):
        path = os.path.join(tmp, f"{config}.{side}.json")
        if os.path.exists(path):
            sides[side] = json.load(open(path))
    p = sides.get("pipe", {}).get("samples_per_sec")
    ratios = {}
    for ref in ("torch_fused", "torch", "torch_compile"):
        r = sides.get(ref, {}).get("samples_per_sec")
        if p and r:
            ratios[f"pipe_over_{ref}"] = round(p / r, 3)
    res["configs"][config] = {**sides, "ratio": ratios}
print(json.dumps(res))
PY
path=$("$py" benches/provenance.py --bench train_cpu --started "$started" --load-before "$load_before" \
    --command "benches/train_cpu.sh $*" --results "$tmp/results.json" --versions torch,transformers)
"$py" - "$path" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for config, c in r["results"]["configs"].items():
    sps = lambda side: c.get(side, {}).get("samples_per_sec", float("nan"))
    print(f"{config:22}: samples/s pipe {sps('pipe'):.1f} | torch fused AdamW {sps('torch_fused'):.1f}, "
          f"default AdamW {sps('torch'):.1f}, fused + compile {sps('torch_compile'):.1f} | ratios {c['ratio']}")
print(f"load average before {r['load_average']['before']}, after {r['load_average']['after']}")
print(f"written: {sys.argv[1]}")
PY
