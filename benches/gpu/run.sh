#!/usr/bin/env bash
# The GPU check (issue 7): run on the GPU machine from the repository root, with the CUDA build of
# `pipe` gzipped at .gpu/pipe.gz (see README, "GPU"). Takes a few minutes on one H100 and prints ONE
# JSON line: {gpu, parity: {...}, pipe_step: {...}, torch_step: {...}, ratio: {...}, e2e: {...}}.
# Everything it produces is also written under ${OUT:-gpu-out}/.
#
#   (a) correctness: `pipe bench parity --device cuda` — the Qwen3 reranker forward and backward on
#       CUDA vs the CPU, f32 within 1e-4, bf16 within bf16 tolerance;
#   (b) speed and memory: `pipe bench train-step` — one training step of the Qwen3-0.6B architecture
#       (random weights) on 16 sequences of 512 tokens in bf16: samples/s, tokens/s, peak memory, MFU;
#   (c) the same step with PyTorch + transformers (SDPA, bf16 autocast, fused AdamW): torch_step.py;
#   (d) a short end-to-end `pipe run` of pipelines/gpu_smoke.toml.
#   Also: (b) again with activation recomputation (`--recompute`), and with GPU_CHECK_4B=1 a step of the
#   Qwen3-4B architecture (batch 1 × 512, recomputation) to see whether it fits.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
gunzip -c .gpu/pipe.gz > ./pipe-gpu && chmod +x ./pipe-gpu
libs=$(python3 - <<'PY'
import glob, os, site
names = ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13")
dirs = {os.path.dirname(p) for sp in site.getsitepackages() for n in names
        for p in glob.glob(f"{sp}/nvidia/**/{n}", recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
ldd ./pipe-gpu | grep "not found" > "$out/ldd-missing.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

# Peak GPU memory of a command, sampled by nvidia-smi every 50 ms (MiB).
peak_of() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$out/$1.mem" &
  local mon=$!
  shift
  "$@"
  local rc=$?
  kill $mon 2>/dev/null
  return $rc
}

timeout 120 ./pipe-gpu bench parity --device cuda > "$out/parity.json" 2> "$out/parity.err"
peak_of pipe_step timeout 240 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 16 --seq 512 --dtype bf16 \
  --steps 6 --device cuda > "$out/pipe_step.json" 2> "$out/pipe_step.err"
peak_of torch_step timeout 240 python3 benches/gpu/torch_step.py --arch qwen3-0.6b --batch 16 --seq 512 \
  --dtype bf16 --steps 6 --device cuda > "$out/torch_step.json" 2> "$out/torch_step.err"
# (b') the same step with activation recomputation: its peak memory and its cost in speed.
peak_of pipe_step_recompute timeout 240 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 16 --seq 512 \
  --dtype bf16 --steps 6 --device cuda --recompute > "$out/pipe_step_recompute.json" 2> "$out/pipe_step_recompute.err"
# Optional (GPU_CHECK_4B=1, a few more minutes): does a 4B training step fit, with recomputation?
if [ "${GPU_CHECK_4B:-0}" = 1 ]; then
  peak_of pipe_step_4b timeout 420 ./pipe-gpu bench train-step --arch qwen3-4b --batch 1 --seq 512 --dtype bf16 \
    --steps 2 --warmup 1 --device cuda --recompute > "$out/pipe_step_4b.json" 2> "$out/pipe_step_4b.err"
fi
start=$(date +%s.%N)
timeout 240 ./pipe-gpu run pipelines/gpu_smoke.toml --json > "$out/e2e.json" 2> "$out/e2e.err"
e2e_rc=$?
e2e_secs=$(python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1]),1))" "$start")

python3 - "$out" "$gpu" "$e2e_rc" "$e2e_secs" <<'PY'
import json, sys, os
out, gpu, e2e_rc, e2e_secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def load(name):
    try:
        return json.loads(open(os.path.join(out, name)).read().strip().splitlines()[-1])
    except Exception as e:
        err = os.path.join(out, name.replace(".json", ".err"))
        tail = open(err).read()[-600:] if os.path.exists(err) else ""
        return {"error": str(e), "stderr_tail": tail}
def peak(name):
    try:
        return max(int(x) for x in open(os.path.join(out, name + ".mem")).read().split()) * 2**20
    except Exception:
        return None
res = {"gpu": gpu, "parity": load("parity.json"), "pipe_step": load("pipe_step.json"), "torch_step": load("torch_step.json"),
       "pipe_step_recompute": load("pipe_step_recompute.json")}
if os.path.exists(os.path.join(out, "pipe_step_4b.json")):
    res["pipe_step_4b"] = load("pipe_step_4b.json")
for k in ("pipe_step", "torch_step", "pipe_step_recompute", "pipe_step_4b"):
    if k in res:
        res[k]["nvidia_smi_peak_bytes"] = peak(k)
p, t = res["pipe_step"], res["torch_step"]
if "samples_per_sec" in p and "samples_per_sec" in t:
    res["ratio"] = {
        "samples_per_sec_pipe_over_torch": p["samples_per_sec"] / t["samples_per_sec"],
        "peak_memory_pipe_over_torch": (p["nvidia_smi_peak_bytes"] or 0) / max(t["nvidia_smi_peak_bytes"] or 1, 1),
    }
e2e = load("e2e.json")
res["e2e"] = {"rc": e2e_rc, "seconds": e2e_secs, "status": e2e.get("status"),
              "stages": [(s.get("id"), s.get("status")) for s in e2e.get("stages", [])]}
print(json.dumps(res))
open(os.path.join(out, "result.json"), "w").write(json.dumps(res, indent=2))
PY
