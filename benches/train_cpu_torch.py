"""PyTorch + transformers reference for benches/train_cpu.rs: the same Qwen3 reranker config, batch,
loss, optimizer and clipping, on the CPU. Prints one JSON line.

Configs (as in benches/train_cpu.rs), tied embeddings, RoPE theta 1e6, batches of 8 random prompts of
128 tokens (no padding):
  tiny:   vocab 151,669, hidden 64, intermediate 128, 2 layers, 4 query / 2 key-value heads of dim 16
  layers: vocab 16,384, hidden 256, intermediate 768, 4 layers, 4 query / 2 key-value heads of dim 64
The reranker logit is h_last . (W_yes - W_no) with h_last the final-normed hidden state at the last
position; loss BCE; torch.optim.AdamW (lr 1e-4, weight decay 0.01 except norm weights; --fused for
its fused CPU kernel, else torch's default implementation for CPU tensors); clip_grad_norm_(1.0); one
optimizer step per batch. --compile wraps the forward and loss in torch.compile (inductor; the backward
is compiled with it); its compilation happens in the warm-up steps and is reported as compile_seconds.

Usage: python3 benches/train_cpu_torch.py [--config tiny|layers] [--steps 30] [--warmup 5]
                                          [--attn sdpa|eager] [--fused] [--compile]
"""

import argparse
import json
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

BATCH, SEQ, YES, NO = 8, 128, 9693, 2152
CONFIGS = {
    "tiny": dict(vocab_size=151_669, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "layers": dict(vocab_size=16_384, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--fused", action="store_true", help="torch.optim.AdamW(fused=True) (CPU fused kernel)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward and loss")
    args = ap.parse_args()

    torch.manual_seed(0)
    vocab = CONFIGS[args.config]["vocab_size"]
    cfg = Qwen3Config(
        **CONFIGS[args.config],
        tie_word_embeddings=True,
        rope_theta=1e6,
        attn_implementation=args.attn,
    )
    model = Qwen3ForCausalLM(cfg).float().train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or n.endswith(".bias")]
    kw = {"fused": True} if args.fused else {}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, **kw
    )
    total = args.steps + args.warmup
    ids = torch.randint(0, vocab, (total, BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    labels = torch.tensor([float(i % 2) for i in range(BATCH)])
    head = torch.tensor([YES, NO])
    bce = torch.nn.BCEWithLogitsLoss()

    def forward(batch):
        h = model.model(input_ids=batch, attention_mask=mask).last_hidden_state[:, -1]
        w = model.lm_head.weight[head]
        return bce(h @ (w[0] - w[1]), labels)

    if args.compile:
        forward = torch.compile(forward)
    elapsed, warm, loss = 0.0, 0.0, None
    for s in range(total):
        t = time.perf_counter()
        loss = forward(ids[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= args.warmup:
            elapsed += time.perf_counter() - t
        else:
            warm += time.perf_counter() - t
    print(
        json.dumps(
            {
                "impl": "pytorch+transformers"
                + (" (fused AdamW)" if args.fused else "")
                + (" + torch.compile" if args.compile else ""),
                "config": args.config,
                "parameters": sum(p.numel() for p in model.parameters()),
                "fused_adamw": args.fused,
                "compile": args.compile,
                "compile_seconds": warm if args.compile else None,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "attn": args.attn,
                "batch": BATCH,
                "seq": SEQ,
                "steps": args.steps,
                "ms_per_step": 1000 * elapsed / args.steps,
                "samples_per_sec": args.steps * BATCH / elapsed,
                "last_loss": loss.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
