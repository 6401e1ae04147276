"""The PyTorch + transformers reference for `pipe bench train-step`: the same reranker training step.

Random Qwen3 weights (the real ones cannot be downloaded on the GPU machine), SDPA attention, bf16
autocast, fused AdamW with f32 master weights, loss = BCE on the yes/no logit at the last position of
left-padded sequences. Prints one JSON object.

    python benches/gpu/torch_step.py --arch qwen3-0.6b --batch 16 --seq 512 --steps 10 --device cuda
    python benches/gpu/torch_step.py --arch tiny --batch 4 --seq 64 --steps 3 --device cpu   # smoke test
"""
import argparse
import json
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

ARCHS = {
    # Qwen3-0.6B: 28 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, tied.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
YES, NO = 9693, 2152
# Peak dense bf16 throughput used for MFU (H100 SXM); override with --peak-tflops.
H100_BF16_TFLOPS = 989.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen3-0.6b", choices=sorted(ARCHS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151669, rope_theta=1_000_000.0, max_position_embeddings=40960,
                      attn_implementation="sdpa", **ARCHS[a.arch])
    dev = torch.device(a.device)
    model = Qwen3ForCausalLM(cfg).to(dev)  # f32 master weights
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.01, fused=dev.type == "cuda")
    ids = torch.randint(0, 151000, (a.batch, a.seq), device=dev)
    mask = torch.ones_like(ids)
    for i in range(a.batch):  # left padding of varying length, like real batches
        pad = (i * 37) % (a.seq // 4)
        mask[i, :pad] = 0
    labels = (torch.arange(a.batch, device=dev) % 2).float()
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def step():
        with amp:
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1, :]
            w = model.lm_head.weight[[YES, NO]]
            logits = h.float() @ w.float().t()
            logit = logits[:, 0] - logits[:, 1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t) / a.steps
    tokens = int(mask.sum())
    # 6 N per token for a training step (forward + backward) plus attention's 12 L H T per token.
    flops = 6 * params * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq * tokens
    out = {
        "impl": "pytorch", "torch": torch.__version__, "arch": a.arch, "params": params, "batch": a.batch,
        "seq": a.seq, "dtype": a.dtype, "device": str(dev), "step_seconds": secs,
        "samples_per_sec": a.batch / secs, "tokens_per_sec": tokens / secs, "loss": float(loss),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "mfu": flops / secs / (a.peak_tflops * 1e12) if dev.type == "cuda" else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
