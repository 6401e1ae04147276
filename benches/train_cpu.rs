//! Training throughput on the CPU for a small Qwen3 reranker: full fine-tuning, BCE, AdamW
//! (weight decay 0.01 except norms), global-norm clipping at 1.0, one optimizer step per batch.
//!
//! Two configs (the same in `benches/train_cpu_torch.py`), both with tied embeddings, RoPE θ 1e6 and
//! batches of 8 random prompts of 128 tokens (no padding):
//! - `tiny` (the quickstart's model): vocab 151,669 (the real tokenizer's), hidden 64, intermediate
//!   128, 2 layers, 4 query / 2 key-value heads of dim 16. The embedding (9.7M of its 9.8M parameters)
//!   makes the optimizer a large share of the step.
//! - `layers`: vocab 16,384, hidden 256, intermediate 768, 4 layers, 4 query / 2 key-value heads of
//!   dim 64. The decoder layers' matmuls dominate the step.
//!
//! Run through `benches/train_cpu.sh`, or alone: `cargo bench --bench train_cpu`
//! (PIPE_BENCH_CONFIG picks `tiny` (default) or `layers`; PIPE_BENCH_STEPS and PIPE_BENCH_WARMUP
//! override the number of timed and warm-up steps). Prints one JSON line.

use std::time::Instant;

use candle_core::{DType, Device};
use pipe::model::{self, Qwen3Config};
use pipe::text::TokenStore;
use pipe::train::data::MicroBatch;
use pipe::train::{Learner, TrainConfig};

const BATCH: usize = 8;
const SEQ: usize = 128;
const YES: u32 = 9693;
const NO: u32 = 2152;

fn env(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let steps = env("PIPE_BENCH_STEPS", 30);
    let warmup = env("PIPE_BENCH_WARMUP", 5);
    let name = std::env::var("PIPE_BENCH_CONFIG").unwrap_or_else(|_| "tiny".into());
    let mut cfg = match name.as_str() {
        "tiny" => Qwen3Config::tiny(151_669, 64, 128, 2, 4, 2, 16, true),
        "layers" => Qwen3Config::tiny(16_384, 256, 768, 4, 4, 2, 64, true),
        other => panic!("PIPE_BENCH_CONFIG={other}: expected tiny or layers"),
    };
    let vocab = cfg.vocab_size as u64;
    cfg.rope_theta = 1_000_000.0;
    let base = model::random(&cfg, 0, DType::F32, &Device::Cpu, false).expect("model");

    // Distinct random prompts for every step, as a real epoch would feed.
    let rows = BATCH * (steps + warmup);
    let mut store = TokenStore::default();
    store.offsets.push(0);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..rows {
        for _ in 0..SEQ {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            store.ids.push((state % vocab) as u32);
        }
        store.offsets.push(store.ids.len() as i64);
        store.labels.push((i % 2) as u8);
        store.relevance.push(if i % 2 == 1 { 3.0 } else { 1.0 });
        store.query_ids.push((i / 4) as u32);
        store.pair_ids.push(i as i64);
    }
    store.queries = (0..rows.div_ceil(4)).map(|q| format!("q{q}")).collect();

    let train = TrainConfig { learning_rate: 1e-4, weight_decay: 0.01, max_grad_norm: 1.0, ..TrainConfig::default() };
    let mut learner = Learner::new(base, YES, NO, &train, DType::F32).expect("learner");
    let learner_parameters = learner.trainable_count();
    let (mut elapsed, mut in_optimizer) = (0.0, 0.0);
    let mut last_loss = 0.0;
    for s in 0..steps + warmup {
        let micro = MicroBatch::pointwise((s * BATCH..(s + 1) * BATCH).collect(), BATCH);
        let t = Instant::now();
        last_loss = learner.accumulate(&store, &micro, BATCH, s as u64, false).expect("forward/backward").loss;
        let t_opt = Instant::now();
        learner.apply(1e-4).expect("step");
        if s >= warmup {
            elapsed += t.elapsed().as_secs_f64();
            in_optimizer += t_opt.elapsed().as_secs_f64();
        }
    }
    let sps = (steps * BATCH) as f64 / elapsed;
    println!(
        "{}",
        serde_json::json!({
            "impl": "pipe (candle)",
            "config": name,
            "parameters": learner_parameters,
            "threads": rayon::current_num_threads(),
            "candle_num_threads": std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into()),
            "batch": BATCH,
            "seq": SEQ,
            "steps": steps,
            "ms_per_step": 1000.0 * elapsed / steps as f64,
            "ms_optimizer": 1000.0 * in_optimizer / steps as f64,
            "samples_per_sec": sps,
            "last_loss": last_loss,
        })
    );
}
