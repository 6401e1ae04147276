"""The PyTorch + transformers reference for `pipe bench train-step`: the same reranker training step.

Random Qwen3 weights (the real ones cannot be downloaded on the GPU machine), f32 master weights, loss =
BCE on the yes/no logit at the last position of left-padded sequences. Prints one JSON object.

Two recipes, because a claim against PyTorch must be against what a good engineer runs:

  plain  SDPA attention with the padding mask, bf16 autocast, fused AdamW (HF Trainer's `bf16=True`
         with `optim="adamw_torch_fused"`).
  tuned  plain + `torch.compile` of the decoder (compile time excluded: `--warmup` steps run first and
         their time is reported apart), Liger kernels for RMSNorm, RoPE and SwiGLU (what
         `use_liger_kernel=True` switches on; the `liger-kernel` wheel is carried to the GPU machine)
         and `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`.

`--grad-checkpointing` adds HF's non-reentrant activation checkpointing, to set against pipe's
`--recompute`.

    python benches/gpu/torch_step.py --recipe tuned --arch qwen3-0.6b --batch 16 --seq 512 --steps 10
    python benches/gpu/torch_step.py --recipe plain --arch tiny --batch 4 --seq 64 --steps 3 --device cpu

MFU is counted as `pipe bench train-step` counts it (`flops_per_token` below; src/cli/bench.rs):
6 × (non-embedding parameters + the two yes/no rows) per token, plus attention's
12 × layers × heads × head_dim × T per token with every T × T tile counted (neither side's kernel skips
the masked half), against the GPU's dense bf16 peak looked up from its name.
"""
import argparse
import json
import os
import time

ARCHS = {
    # Qwen3-0.6B: 28 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, tied.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
VOCAB = 151669
YES, NO = 9693, 2152
# Dense bf16 peak (TFLOP/s) by GPU name, the same table as pipe's (src/cli/bench.rs, `peak_bf16_tflops`).
PEAKS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops(name):
    return next((p for key, p in PEAKS if key in name), None)


def flops_per_token(arch, seq):
    """Training FLOPs per token, the formula of pipe's `train_flops_per_token`."""
    a = ARCHS[arch]
    h, i, layers = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
    heads, kv, hd = a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    # q, k, v, o, gate/up/down, then the two RMSNorms and the q/k norms: the non-embedding parameters.
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i + 2 * h + 2 * hd
    non_embedding = layers * per_layer + h  # + the final norm
    # The head computes only the yes and no rows of the (tied) embedding.
    return 6 * (non_embedding + 2 * h) + 12 * layers * heads * hd * seq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tuned", choices=["plain", "tuned"])
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--arch", default="qwen3-0.6b", choices=sorted(ARCHS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=None, help="default: 2 (plain), 4 (tuned: compiles)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="default: looked up from the GPU's name")
    a = ap.parse_args()
    tuned = a.recipe == "tuned"
    warmup = a.warmup if a.warmup is not None else (4 if tuned else 2)
    if tuned:
        # Read when CUDA's caching allocator starts, so before torch touches the GPU.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    import torch
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dev = torch.device(a.device)
    liger = None
    if tuned and dev.type == "cuda":
        # Patches the Qwen3 classes, so before the model is built. Our loss reads the last hidden
        # state, so the fused linear cross-entropy (an LM loss) is not used.
        import importlib.metadata

        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
        liger = importlib.metadata.version("liger-kernel")
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, rope_theta=1_000_000.0, max_position_embeddings=40960,
                      attn_implementation="sdpa", use_cache=False, **ARCHS[a.arch])
    model = Qwen3ForCausalLM(cfg).to(dev)  # f32 master weights
    model.train()
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.01, fused=dev.type == "cuda")
    decoder = torch.compile(model.model, dynamic=False) if tuned else model.model
    ids = torch.randint(0, 151000, (a.batch, a.seq), device=dev)
    mask = torch.ones_like(ids)
    for i in range(a.batch):  # left padding of varying length, like real batches (and pipe bench)
        pad = (i * 37) % (a.seq // 4)
        mask[i, :pad] = 0
    labels = (torch.arange(a.batch, device=dev) % 2).float()
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def step():
        with amp:
            h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1, :]
            w = model.lm_head.weight[[YES, NO]]
            logits = h.float() @ w.float().t()
            logit = logits[:, 0] - logits[:, 1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_secs = time.perf_counter() - t
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    secs = (time.perf_counter() - t) / a.steps
    tokens = int(mask.sum())
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    peak = a.peak_tflops or (peak_tflops(gpu) if gpu else None)
    fpt = flops_per_token(a.arch, a.seq)
    out = {
        "impl": "pytorch", "recipe": a.recipe, "grad_checkpointing": a.grad_checkpointing,
        "torch": torch.__version__, "transformers": transformers.__version__, "liger_kernel": liger,
        "cuda": torch.version.cuda, "gpu": gpu, "compiled": tuned,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "arch": a.arch, "params": params, "batch": a.batch, "seq": a.seq, "dtype": a.dtype,
        "device": str(dev), "warmup_steps": warmup, "warmup_seconds": warmup_secs, "step_seconds": secs,
        "samples_per_sec": a.batch / secs, "tokens_per_sec": tokens / secs, "loss": loss.item(),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "flops_per_token": fpt, "peak_tflops": peak,
        "mfu": fpt * tokens / secs / (peak * 1e12) if peak else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
