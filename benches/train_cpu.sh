#!/usr/bin/env bash
# Training samples/s on the CPU: pipe (candle) vs PyTorch + transformers, same tiny Qwen3 reranker,
# same batch (8 × 128 tokens), loss, optimizer, clipping and machine. See benches/train_cpu.rs for
# the config. Needs python3 with torch and transformers.
# Usage: benches/train_cpu.sh [steps]   (default 30 timed steps after 5 warm-up steps)
# Run it on an otherwise idle machine: both sides use every core.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
pipe_json=$(PIPE_BENCH_STEPS=$steps cargo bench --quiet --bench train_cpu | tail -1)
torch_json=$(python3 benches/train_cpu_torch.py --steps "$steps" 2>/dev/null | tail -1)
echo "pipe : $pipe_json"
echo "torch: $torch_json"
python3 - "$pipe_json" "$torch_json" <<'PY'
import json, sys
p, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"samples/s  pipe {p['samples_per_sec']:.1f}  torch {t['samples_per_sec']:.1f}  "
      f"ratio pipe/torch {p['samples_per_sec'] / t['samples_per_sec']:.2f}x")
PY
