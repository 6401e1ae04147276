#!/usr/bin/env bash
# The GPU check (issues 7 and 16): run on the GPU machine from the repository root, with the CUDA
# build of `pipe` gzipped at .gpu/pipe.gz, its commit in .gpu/commit and the liger-kernel wheel in
# .gpu/wheels/ (benches/gpu/prepare.sh writes all three). About 6 minutes on one H100 or H200; prints
# ONE JSON line and writes it to ${OUT:-gpu-out}/result.json, with what produced it (commit, GPU,
# driver, CUDA, torch, transformers and liger-kernel versions, date):
#
#   (a) correctness: `pipe bench parity --device cuda` — the Qwen3 reranker forward and backward on
#       CUDA vs the CPU, f32 within 1e-4, bf16 within bf16 tolerance;
#   (b) speed and memory: `pipe bench train-step` — one training step of the Qwen3-0.6B architecture
#       (random weights) on 16 sequences of 512 tokens in bf16: samples/s, tokens/s, peak memory, MFU;
#   (c) the same step with PyTorch + transformers, two recipes (torch_step.py): `tuned` (torch.compile,
#       Liger RMSNorm/RoPE/SwiGLU, fused AdamW, bf16 autocast, expandable segments) — every headline
#       ratio is against it — and `plain` (SDPA, bf16 autocast, fused AdamW) beside it;
#   (d) long documents: (b) and tuned (c) at 4 × 2048; (b) and (d) again with the tiled attention
#       (`--flash-attention`, src/kernels/flash.rs), which training keeps off until this check passes;
#   (e) memory for speed: pipe's `--recompute` against tuned PyTorch with gradient checkpointing;
#   (f) a short end-to-end `pipe run` of pipelines/gpu_smoke.toml.
#   Optional: GPU_CHECK_AUTOGRAD=1 times (b) with the layers differentiated by candle's autograd;
#   GPU_CHECK_4B=1 a step of the Qwen3-4B architecture (batch 1 × 512, recomputation).
set -uo pipefail
# The device returns at most a few files from $OUT, and only what is there when a step is cut short:
# each step writes into $work, and after every step $work is packed into $OUT/all.tgz.
out=${OUT:-gpu-out}
work=${GPU_WORK:-/tmp/gpu-work}
mkdir -p "$out" "$work"
save() { tar -czf "$out/all.tgz" -C "$work" . 2>/dev/null; }
gunzip -c .gpu/pipe.gz > ./pipe-gpu && chmod +x ./pipe-gpu
commit=$(git rev-parse HEAD 2>/dev/null || cat .gpu/commit 2>/dev/null || echo unknown)
# Liger is not in the GPU image: its wheel (pure Python on Triton) travels in .gpu/wheels.
if ls .gpu/wheels/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
libs=$(python3 - <<'PY'
import glob, os, site
names = ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13")
dirs = {os.path.dirname(p) for sp in site.getsitepackages() for n in names
        for p in glob.glob(f"{sp}/nvidia/**/{n}", recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
{ echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ldd ./pipe-gpu; nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$work/diag.txt" 2>&1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
save

# Peak GPU memory (MiB) and mean utilisation (%) of a command, sampled by nvidia-smi every 50 ms.
peak_of() {
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 50 > "$work/$1.mem" &
  local mon=$!
  shift
  "$@"
  local rc=$?
  kill $mon 2>/dev/null
  save
  return $rc
}
step() { echo "[$(date +%T)] $1" >&2; }

# In order of what matters most, each with a time limit, so that a slow or failing step leaves the rest.
step parity
timeout 90 ./pipe-gpu bench parity --device cuda > "$work/parity.json" 2> "$work/parity.err"
save
# Where a step's time goes: one decoder layer and its parts.
step layer
timeout 90 ./pipe-gpu bench layer --arch qwen3-0.6b --batch 16 --seq 512 --dtype bf16 --device cuda \
  > "$work/layer.json" 2> "$work/layer.err"
save
step pipe_step
peak_of pipe_step timeout 150 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 16 --seq 512 --dtype bf16 \
  --steps 6 --device cuda > "$work/pipe_step.json" 2> "$work/pipe_step.err"
torch_step() {  # NAME, then torch_step.py's arguments
  local name=$1; shift
  step "$name"
  peak_of "$name" timeout 200 python3 benches/gpu/torch_step.py --arch qwen3-0.6b --dtype bf16 --steps 6 \
    --device cuda "$@" > "$work/$name.json" 2> "$work/$name.err"
}
# The same step with the tiled attention (src/kernels/flash.rs; off by default until this check passes).
step pipe_step_flash
peak_of pipe_step_flash timeout 150 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 16 --seq 512 --dtype bf16 \
  --steps 6 --device cuda --flash-attention > "$work/pipe_step_flash.json" 2> "$work/pipe_step_flash.err"
torch_step torch_step_tuned --recipe tuned --batch 16 --seq 512
torch_step torch_step_plain --recipe plain --batch 16 --seq 512
step pipe_step_long
peak_of pipe_step_long timeout 150 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 4 --seq 2048 --dtype bf16 \
  --steps 6 --device cuda > "$work/pipe_step_long.json" 2> "$work/pipe_step_long.err"
step pipe_step_flash_long
peak_of pipe_step_flash_long timeout 150 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 4 --seq 2048 --dtype bf16 \
  --steps 6 --device cuda --flash-attention > "$work/pipe_step_flash_long.json" 2> "$work/pipe_step_flash_long.err"
torch_step torch_step_tuned_long --recipe tuned --batch 4 --seq 2048
step e2e
start=$(date +%s.%N)
timeout 120 ./pipe-gpu run pipelines/gpu_smoke.toml --json > "$work/e2e.json" 2> "$work/e2e.err"
e2e_rc=$?
e2e_secs=$(python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1]),1))" "$start")
save
# (b') the same step with activation recomputation: its peak memory and its cost in speed.
step pipe_step_recompute
peak_of pipe_step_recompute timeout 120 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 16 --seq 512 \
  --dtype bf16 --steps 6 --device cuda --recompute > "$work/pipe_step_recompute.json" 2> "$work/pipe_step_recompute.err"
torch_step torch_step_tuned_ckpt --recipe tuned --grad-checkpointing --batch 16 --seq 512
# (b'') the same step with the decoder layers differentiated by candle's autograd, as before the
# hand-written backward (src/model/backward.rs): what that backward gains, on the same GPU.
if [ "${GPU_CHECK_AUTOGRAD:-0}" = 1 ]; then
  step pipe_step_autograd
  peak_of pipe_step_autograd timeout 120 ./pipe-gpu bench train-step --arch qwen3-0.6b --batch 16 --seq 512 \
    --dtype bf16 --steps 6 --device cuda --autograd-layers > "$work/pipe_step_autograd.json" 2> "$work/pipe_step_autograd.err"
fi
# Optional (GPU_CHECK_4B=1): does a 4B training step fit, with recomputation?
if [ "${GPU_CHECK_4B:-0}" = 1 ]; then
  step pipe_step_4b
  peak_of pipe_step_4b timeout 180 ./pipe-gpu bench train-step --arch qwen3-4b --batch 1 --seq 512 --dtype bf16 \
    --steps 2 --warmup 1 --device cuda --recompute > "$work/pipe_step_4b.json" 2> "$work/pipe_step_4b.err"
fi

python3 - "$work" "$gpu" "$e2e_rc" "$e2e_secs" "$commit" "$driver" <<'PY'
import datetime, json, sys, os
out, gpu, e2e_rc, e2e_secs, commit, driver = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
def load(name):
    try:
        return json.loads(open(os.path.join(out, name)).read().strip().splitlines()[-1])
    except Exception as e:
        err = os.path.join(out, name.replace(".json", ".err"))
        tail = open(err).read()[-600:] if os.path.exists(err) else ""
        return {"error": str(e), "stderr_tail": tail}
def samples(name):
    try:
        return [[int(v) for v in line.split(",")] for line in open(os.path.join(out, name + ".mem")) if line.strip()]
    except Exception:
        return []
def peak(name):
    s = samples(name)
    return max(m for m, _ in s) * 2**20 if s else None
def busy(name):
    s = [u for _, u in samples(name)]
    return round(sum(s) / len(s), 1) if s else None
steps = ("pipe_step", "pipe_step_flash", "torch_step_tuned", "torch_step_plain", "pipe_step_long",
         "pipe_step_flash_long", "torch_step_tuned_long",
         "pipe_step_recompute", "torch_step_tuned_ckpt", "pipe_step_autograd", "pipe_step_4b")
res = {"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "commit": commit, "driver": driver, "parity": load("parity.json"), "layer": load("layer.json")}
for k in steps:
    if os.path.exists(os.path.join(out, k + ".json")):
        res[k] = load(k + ".json")
        res[k]["nvidia_smi_peak_bytes"] = peak(k)
        res[k]["nvidia_smi_mean_utilization_pct"] = busy(k)
t = res.get("torch_step_tuned", {})
res["versions"] = {k: t.get(k) for k in ("torch", "transformers", "liger_kernel", "cuda")}
def ratio(p, t):
    p, t = res.get(p, {}), res.get(t, {})
    if "samples_per_sec" not in p or "samples_per_sec" not in t:
        return None, None
    mem = (p["nvidia_smi_peak_bytes"] or 0) / max(t["nvidia_smi_peak_bytes"] or 1, 1)
    return p["samples_per_sec"] / t["samples_per_sec"], mem
r = {}
for suffix, (p, t) in {"tuned": ("pipe_step", "torch_step_tuned"), "plain": ("pipe_step", "torch_step_plain"),
                       "tuned_long": ("pipe_step_long", "torch_step_tuned_long"),
                       "flash_over_torch_tuned": ("pipe_step_flash", "torch_step_tuned"),
                       "flash_long_over_torch_tuned_long": ("pipe_step_flash_long", "torch_step_tuned_long"),
                       "recompute_over_tuned_ckpt": ("pipe_step_recompute", "torch_step_tuned_ckpt")}.items():
    sp, mem = ratio(p, t)
    r[f"samples_per_sec_pipe_over_torch_{suffix}"] = sp
    r[f"peak_memory_pipe_over_torch_{suffix}"] = mem
res["ratio"] = r
e2e = load("e2e.json")
res["e2e"] = {"rc": e2e_rc, "seconds": e2e_secs, "status": e2e.get("status"),
              "stages": [(s.get("id"), s.get("status")) for s in e2e.get("stages", [])]}
print(json.dumps(res))
open(os.path.join(out, "result.json"), "w").write(json.dumps(res, indent=2))
PY
cp "$out/result.json" "$work/" 2>/dev/null; save
