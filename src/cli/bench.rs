//! `pipe bench`: measurements that need a real device, printed as one JSON line each.
//!
//! `parity` runs the Qwen3 reranker forward and backward on the CPU and on the chosen device with the
//! same random weights and batch, and reports the largest differences (f32 must agree within 1e-4;
//! bf16 within bf16 rounding), the layers differentiated by hand, attention alone at longer rows
//! (every shape of the softmax kernels), and the optimizer's kernels
//! (fused AdamW, sums of squares, master write-back, embedding scatter) against the CPU. It is what
//! `benches/gpu/run.sh` calls on the GPU machine; on a CPU-only build `--device cpu` exercises the
//! same code path.

use candle_core::{DType, Device, Tensor};

use crate::model::device::parse_device;
use crate::model::score::left_pad;
use crate::model::{bce_with_logits, Qwen3Config, Reranker};

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Forward/backward of the Qwen3 reranker on DEVICE vs the CPU, same weights and batch.
    Parity {
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Sequence lengths of the Qwen3-0.6B-shaped layer check (comma-separated; empty: skip it).
        #[arg(long = "real-seqs", value_delimiter = ',', default_value = "512,2048")]
        real_seqs: Vec<usize>,
    },
    /// Time full fine-tuning steps (forward, backward, clipping, AdamW with f32 masters) of a Qwen3
    /// architecture with random weights on left-padded random batches; the PyTorch counterpart is
    /// benches/gpu/torch_step.py.
    TrainStep(TrainStepArgs),
    /// Compile every CUDA kernel pipe builds at run time with NVRTC (needs the CUDA libraries, not
    /// a GPU): catches a kernel that does not compile before a GPU run would.
    Kernels,
    /// Time one decoder layer of an architecture and its parts (forward, forward+backward, the
    /// attention core, the projections' matmuls alone): where a training step's time goes.
    Layer(LayerArgs),
}

/// What is being timed: an architecture at a batch shape, dtype and device.
#[derive(clap::Args, Debug)]
pub struct Workload {
    /// qwen3-0.6b, qwen3-4b, small (8 layers, hidden 256) or tiny (2 layers, hidden 64).
    #[arg(long, default_value = "qwen3-0.6b")]
    arch: String,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value = "cuda")]
    device: String,
}

#[derive(clap::Args, Debug)]
pub struct LayerArgs {
    #[command(flatten)]
    work: Workload,
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

#[derive(clap::Args, Debug)]
pub struct TrainStepArgs {
    #[command(flatten)]
    work: Workload,
    #[arg(long, default_value_t = 6)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Recompute each layer's activations in the backward pass (the train stage's `recompute`).
    #[arg(long)]
    recompute: bool,
    /// Differentiate the decoder layers with candle's autograd instead of by hand (the reference
    /// the hand-written backward is measured against).
    #[arg(long)]
    autograd_layers: bool,
    /// Tiled attention (src/kernels/flash.rs) in the hand-written backward: no `T × T`
    /// probabilities kept (off by default in training until measured on a GPU).
    #[arg(long)]
    flash_attention: bool,
    /// Peak dense bf16 TFLOP/s of the device for MFU; default: looked up from the GPU's name
    /// (`peak_bf16_tflops`), no MFU for a GPU the table lacks.
    #[arg(long)]
    peak_tflops: Option<f64>,
}

/// Training FLOPs per token, counted as benches/gpu/torch_step.py counts them so that both sides'
/// MFU use one formula: 6 × (every non-embedding parameter + the two head rows the reranker
/// computes; the embedding is a lookup and the rest of the vocabulary is never projected) plus
/// attention's 12 × layers × heads × head_dim × T (QKᵀ and PV, forward and backward). Every T × T
/// tile is counted, masked half included: no kernel on either side skips the causal half today, so
/// halving it would flatter both.
pub fn train_flops_per_token(cfg: &Qwen3Config, seq: usize) -> f64 {
    let non_embedding: usize = cfg
        .param_shapes()
        .iter()
        .filter(|(name, _)| name != "model.embed_tokens.weight" && name != "lm_head.weight")
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let head_rows = 2 * cfg.hidden_size;
    let attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq;
    (6 * (non_embedding + head_rows) + attention) as f64
}

/// Dense bf16 peak TFLOP/s from the GPU's name (the vendor's figures without sparsity; the H200
/// has the H100's SMs and clocks, only more and faster memory). None for a GPU not listed here:
/// pass `--peak-tflops` rather than report an MFU against a guessed peak.
pub fn peak_bf16_tflops(gpu_name: &str) -> Option<f64> {
    [("H200", 989.0), ("H100", 989.0), ("A100", 312.0)]
        .iter()
        .find(|(key, _)| gpu_name.contains(key))
        .map(|&(_, peak)| peak)
}

/// The process's peak resident memory (Linux `VmHWM`), the CPU's counterpart of peak GPU memory.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn arch(name: &str) -> anyhow::Result<Qwen3Config> {
    let mut c = match name {
        "qwen3-0.6b" => Qwen3Config::tiny(151_669, 1024, 3072, 28, 16, 8, 128, true),
        "qwen3-4b" => Qwen3Config::tiny(151_669, 2560, 9728, 36, 32, 8, 128, true),
        "small" => Qwen3Config::tiny(151_669, 256, 768, 8, 4, 2, 64, true),
        "tiny" => Qwen3Config::tiny(151_669, 64, 128, 2, 4, 2, 16, true),
        other => anyhow::bail!("unknown arch `{other}`; expected qwen3-0.6b, qwen3-4b, small or tiny"),
    };
    c.rope_theta = 1_000_000.0;
    Ok(c)
}

fn train_step(args: &TrainStepArgs) -> anyhow::Result<()> {
    let TrainStepArgs { ref work, steps, warmup, recompute, autograd_layers, flash_attention, peak_tflops } = *args;
    let Workload { ref arch, batch, seq, ref dtype, ref device } = *work;
    let arch_name = arch.as_str();
    use crate::train::data::MicroBatch;
    use crate::train::{Learner, TrainConfig};
    let cfg = self::arch(arch_name)?;
    let dev = parse_device(device)?;
    let dt = crate::model::device::parse_dtype(dtype)?;
    let model = crate::model::random(&cfg, 0, DType::F32, &dev, false)?;
    let params: usize = cfg.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let tc = TrainConfig { batch_size: batch, grad_accum: 1, learning_rate: 5e-6, recompute, ..TrainConfig::default() };
    let mut learner = Learner::new(model, 9693, 2152, &tc, dt)?;
    learner.set_autograd_layers(autograd_layers);
    learner.set_flash_attention(flash_attention);
    // Left padding of varying length, like real batches (the same pattern as torch_step.py).
    let mut store = crate::text::TokenStore::default();
    store.offsets.push(0);
    let mut tokens = 0usize;
    for i in 0..batch {
        let len = seq - (i * 37) % (seq / 4);
        tokens += len;
        store.ids.extend((0..len).map(|j| ((i * 7919 + j * 104_729) % 151_000) as u32));
        store.offsets.push(store.ids.len() as i64);
        store.labels.push((i % 2) as u8);
        store.relevance.push(if i % 2 == 1 { 3.0 } else { 1.0 });
        store.query_ids.push(0);
        store.pair_ids.push(i as i64);
    }
    store.queries.push("bench".into());
    let micro = MicroBatch::pointwise((0..batch).collect(), batch);
    let sync = |d: &Device| -> anyhow::Result<()> {
        d.synchronize()?;
        Ok(())
    };
    let mut last_loss = 0.0;
    // A CUDA out-of-memory error becomes the trainer's, which says what to change.
    for k in 0..warmup {
        learner.accumulate(&store, &micro, batch, 0, false).map_err(|e| e.at_step(k as u64))?;
        learner.apply(5e-6)?;
    }
    sync(&dev)?;
    // Phases, each ended by a device sync, so that where the time goes is visible.
    let (mut t_acc, mut t_apply) = (0.0, 0.0);
    let t = std::time::Instant::now();
    for k in 0..steps {
        let t0 = std::time::Instant::now();
        let r = learner.accumulate(&store, &micro, batch, k as u64, false).map_err(|e| e.at_step(k as u64))?;
        sync(&dev)?;
        t_acc += t0.elapsed().as_secs_f64();
        last_loss = r.loss;
        let t0 = std::time::Instant::now();
        learner.apply(5e-6)?;
        sync(&dev)?;
        t_apply += t0.elapsed().as_secs_f64();
    }
    sync(&dev)?;
    let secs = t.elapsed().as_secs_f64() / steps.max(1) as f64;
    let t0 = std::time::Instant::now();
    learner.logits(&store, &micro.rows, batch)?;
    sync(&dev)?;
    let t_forward = t0.elapsed().as_secs_f64();
    let n = steps.max(1) as f64;
    let flops_per_token = train_flops_per_token(&cfg, seq);
    let flops = flops_per_token * tokens as f64;
    let gpu = !dev.is_cpu();
    let hardware = crate::model::device::hardware(&dev);
    let peak_tflops = peak_tflops.or_else(|| if gpu { peak_bf16_tflops(&hardware) } else { None });
    println!(
        "{}",
        serde_json::json!({
            "impl": "pipe", "arch": arch_name, "params": params, "batch": batch, "seq": seq, "dtype": dtype,
            "device": format!("{dev:?}"), "step_seconds": secs, "samples_per_sec": batch as f64 / secs,
            "tokens_per_sec": tokens as f64 / secs, "loss": last_loss, "recompute": recompute,
            "layers_differentiated": if autograd_layers { "autograd" } else { "by hand" },
            "attention": if flash_attention && !autograd_layers { "tiled (flash)" } else { "materialised probabilities" },
            "phase_seconds": {"forward_backward": t_acc / n, "optimizer": t_apply / n, "forward_only": t_forward},
            "hardware": hardware, "flops_per_token": flops_per_token, "peak_tflops": peak_tflops,
            "mfu": peak_tflops.filter(|_| gpu).map(|p| flops / secs / (p * 1e12)),
            "peak_rss_bytes": if gpu { None } else { peak_rss_bytes() },
        })
    );
    Ok(())
}

/// Six fused AdamW steps (the last from a bf16 gradient) on DEVICE against the CPU's flat-buffer loop, same state and gradients:
/// the largest difference of master, m or v (the kernel rounds like the loop, so about 0).
fn fused_adamw_diff(dev: &Device) -> anyhow::Result<f64> {
    use crate::kernels::adamw::FusedAdamW;
    use crate::train::config::AdamConfig;
    use crate::train::optim::{adamw_dense, StepScalars};
    let n = 100_003; // not a multiple of the block size
    let mut p: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 700.0).collect();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let state = Tensor::from_vec([p.clone(), m.clone(), v.clone()].concat(), 3 * n, dev)?;
    // Five steps from f32 gradients, then one from a bf16 gradient (read as it is on the device,
    // widened on the CPU).
    for step in 1..=6u64 {
        let g: Vec<f32> = (0..n).map(|i| (((i as u64 * 104_729 + step * 31) % 4001) as f32 - 2000.0) / 900.0).collect();
        let s = StepScalars::new(&AdamConfig::default(), 3e-3, 0.01, step, 0.8);
        let grad = Tensor::from_vec(g, n, dev)?;
        let grad = if step == 6 { grad.to_dtype(DType::BF16)? } else { grad };
        let host: Vec<f32> = grad.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1()?;
        adamw_dense(&mut p, &mut m, &mut v, &host, &s);
        state.inplace_op2(&grad, &FusedAdamW(s))?;
    }
    let got: Vec<f32> = state.to_device(&Device::Cpu)?.to_vec1()?;
    let want = [p, m, v].concat();
    Ok(got.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max))
}

/// The embedding-gradient scatter and the in-place master write-back on DEVICE against the CPU, on
/// the same inputs (repeated ids, bf16 rows): the largest difference (both sum in the same order,
/// so about 0).
fn scatter_and_write_diff(dev: &Device) -> anyhow::Result<f64> {
    use crate::kernels::adamw::WriteMaster;
    use crate::kernels::scatter::Plan;
    let (rows, cols, n) = (1000, 96, 3000);
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % 997 + (i % 3)) as u32).collect();
    let g: Vec<f32> = (0..n * cols).map(|i| ((i * 104_729 % 4001) as f32 - 2000.0) / 900.0).collect();
    let state: Vec<f32> = (0..3 * rows * cols).map(|i| ((i * 31 % 2003) as f32 - 1001.0) / 70.0).collect();
    let run = |d: &Device| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let acc = Tensor::zeros((rows, cols), DType::F32, d)?;
        let g = Tensor::from_slice(&g, (n, cols), d)?.to_dtype(DType::BF16)?;
        Plan::new(&ids, d)?.add_into(&acc, &g)?;
        let param = Tensor::zeros((rows, cols), DType::BF16, d)?;
        param.inplace_op2(&Tensor::from_slice(&state, 3 * rows * cols, d)?, &WriteMaster)?;
        let f = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
        };
        Ok((f(&acc)?, f(&param)?))
    };
    let (a, b) = (run(&Device::Cpu)?, run(dev)?);
    let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64).fold(0.0, f64::max);
    Ok(diff(&a.0, &b.0).max(diff(&a.1, &b.1)))
}

/// The gradient norm's partial sums of squares on DEVICE against the CPU's (different partitions,
/// so equal to f32 rounding): the relative difference of the total.
fn sum_squares_rel_diff(dev: &Device) -> anyhow::Result<f64> {
    use crate::kernels::adamw::SumSquaresInto;
    let n = 3 * 1024 * 1024 + 17;
    let g: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 4001) as f32 - 2000.0) / 900.0).collect();
    let total = |d: &Device| -> anyhow::Result<f64> {
        let partials = Tensor::zeros(2 * SumSquaresInto::PARTS, DType::F32, d)?;
        partials.inplace_op2(&Tensor::from_slice(&g, n, d)?, &SumSquaresInto { slot: 1 })?;
        let v: Vec<f32> = partials.to_device(&Device::Cpu)?.to_vec1()?;
        if v[..SumSquaresInto::PARTS].iter().any(|&x| x != 0.0) {
            anyhow::bail!("sum of squares wrote outside its slot");
        }
        Ok(v.iter().map(|&x| x as f64).sum())
    };
    let (a, b) = (total(&Device::Cpu)?, total(dev)?);
    Ok((a - b).abs() / a)
}

fn batch(device: &Device) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    // Six left-padded rows of different lengths with ids spread over the whole vocabulary.
    let lens = [37usize, 64, 12, 50, 64, 5];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(r, &n)| (0..n).map(|i| ((r * 7919 + i * 104_729) % 151_669) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (ids, mask) = left_pad(&refs, 0, device)?;
    let targets = Tensor::new(&[1f32, 0., 1., 0., 0., 1.], device)?;
    Ok((ids, mask, targets))
}

/// Per-parameter gradients by name, in f32.
type Grads = Vec<(String, Vec<f32>)>;

/// (logits, gradients), both copied to the CPU in f32.
fn run_once(cfg: &Qwen3Config, seed: u64, dtype: DType, device: &Device) -> anyhow::Result<(Vec<f32>, Grads)> {
    let model = crate::model::random(cfg, seed, dtype, device, true)?;
    let vars = model.vars();
    let reranker = Reranker::new(model, 9693, 2152)?;
    let (ids, mask, targets) = batch(device)?;
    let out = reranker.forward(&ids, &mask)?;
    let loss = bce_with_logits(&out.logit.to_dtype(DType::F32)?, &targets)?;
    let grads = loss.backward()?;
    let logits: Vec<f32> = out.logit.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1()?;
    let mut g = Vec::new();
    for (name, var) in vars {
        let t = grads.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
        g.push((name, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?));
    }
    Ok((logits, g))
}

/// The decoder layers' gradients (by name, f32, on the CPU) of the same loss as [`run_once`], with
/// each layer differentiated by hand ([`crate::model::backward`]) as full fine-tuning does.
fn layer_grads_by_hand(cfg: &Qwen3Config, seed: u64, dtype: DType, device: &Device) -> anyhow::Result<Grads> {
    use candle_core::Var;
    let model = crate::model::random(cfg, seed, dtype, device, true)?;
    let (ids, mask, targets) = batch(device)?;
    let (b, t) = ids.dims2()?;
    let embed = model.params().get("model.embed_tokens.weight").expect("every Qwen3 has one").detach();
    let mut h = embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, cfg.hidden_size))?;
    let shared = model.layer_inputs(t, &mask)?;
    let mut tapes = Vec::new();
    for l in 0..model.num_layers() {
        let (out, tape) = model.layer_taped(l, &h, &shared)?;
        tapes.push(tape);
        h = out;
    }
    let top = Var::from_tensor(&h)?;
    let logit = crate::model::reranker::score_last(&model, top.as_tensor(), &model.lm_head_rows(&[9693, 2152])?)?.logit;
    let grads = bce_with_logits(&logit.to_dtype(DType::F32)?, &targets)?.backward()?;
    let mut dy =
        grads.get(top.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient reached the top layer"))?.clone();
    let mut out = Vec::new();
    while let Some(tape) = tapes.pop() {
        let (dx, layer) = model.layer_backward(tape, &dy)?;
        for (name, g) in layer {
            out.push((name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?));
        }
        dy = dx;
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Attention alone on DEVICE against the CPU in the same dtype, at row lengths that take each of
/// the softmax kernels' shapes (warp per row with 4, 8, 16 and 32 columns per lane; a block per row
/// past 1,024), over a left-padded GQA batch: the output, the kept probabilities and the gradients
/// of both backward variants (from the kept probabilities, and recomputing them). Returns the
/// largest difference relative to each tensor's largest value. The model parity above only reaches
/// rows of 64.
fn attention_rel_diff(dtype: DType, dev: &Device) -> anyhow::Result<f64> {
    use crate::model::fused;
    let (b, nh, nkv, d) = (2, 4, 2, 16);
    let scale = 1.0 / (d as f64).sqrt();
    let mut worst = 0f64;
    for t in [37usize, 200, 512, 700, 1100] {
        let run = |dv: &Device| -> anyhow::Result<Vec<Vec<f32>>> {
            let sample = |shape: (usize, usize, usize, usize), salt: usize| -> anyhow::Result<Tensor> {
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                Ok(Tensor::from_vec(pattern(n, salt, 1.0), shape, dv)?.to_dtype(dtype)?)
            };
            let (q, k, v) = (sample((b, nh, t, d), 1)?, sample((b, nkv, t, d), 2)?, sample((b, nkv, t, d), 3)?);
            let g = sample((b, nh, t, d), 4)?;
            // The second sequence is left-padded by five tokens.
            let mask: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= (i / t) * 5)).collect();
            let bias = crate::model::ops::attention_bias(&Tensor::from_vec(mask, (b, t), dv)?)?;
            let (out, p) = fused::attention_forward_keeping_probs(&q, &k, &v, &bias, scale)?;
            let (dq, dk, dv_) = fused::attention_backward_from_probs(&q, &k, &v, &p, scale, &g)?;
            let (dq2, dk2, dv2) = fused::attention_backward(&q, &k, &v, &bias, scale, &g)?;
            [out, p, dq, dk, dv_, dq2, dk2, dv2]
                .iter()
                .map(|x| Ok(x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?))
                .collect()
        };
        let (want, got) = (run(&Device::Cpu)?, run(dev)?);
        worst = want.iter().zip(&got).map(|(a, b)| max_rel(a, b)).fold(worst, f64::max);
    }
    Ok(worst)
}

/// Deterministic values in [-scale, scale] (no RNG, so every device gets the same inputs).
fn pattern(n: usize, salt: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 1001.0 * scale).collect()
}

/// What [`real_shape_diff`] measured at one sequence length: each figure is the largest difference
/// relative to the reference tensor's largest value.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct RealShapeDiff {
    seq: usize,
    /// The layer's output in the compute dtype against the CPU in f32.
    layer_output: f64,
    /// The input's and all 11 parameters' gradients (hand-written backward, as training runs).
    layer_grads: f64,
    /// Attention alone in f32 on the device against the CPU: output, kept probabilities and the
    /// gradients of both backward variants.
    attention_f32: f64,
    /// The tiled attention (src/kernels/flash.rs) in the layer's dtype on the device against the
    /// materialising attention on the CPU in f32: output and the three input gradients. On a CUDA
    /// device, the tensor-core kernels; None where they do not apply (f32, another head_dim).
    flash: Option<f64>,
}

/// One Qwen3-0.6B-shaped decoder layer (hidden 1024, 16 heads × 128, 8 KV heads, intermediate
/// 3072) on a left-padded batch of two sequences of SEQ tokens, on DEVICE in DTYPE against the CPU
/// in f32. The model parity uses head_dim 16 and rows of 64, where a kernel that breaks at
/// head_dim 128, at a long row or in bf16 accumulation over 2,048 keys cannot show; and it compares
/// every gradient, not a loss, since a saturated loss hides a gradient bug.
fn real_shape_diff(seq: usize, dtype: DType, dev: &Device) -> anyhow::Result<RealShapeDiff> {
    let mut cfg = arch("qwen3-0.6b")?;
    cfg.num_hidden_layers = 1;
    cfg.vocab_size = 16; // the layer never reads the embedding
    let (b, t, h) = (2usize, seq, cfg.hidden_size);
    let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    // The second sequence is left-padded by a quarter of its length.
    let mask: Vec<u32> = (0..b * t).map(|i| u32::from(i % t >= (i / t) * (t / 4))).collect();
    let layer = |dv: &Device, dt: DType| -> anyhow::Result<Vec<Vec<f32>>> {
        let model = crate::model::random(&cfg, 7, dt, dv, false)?;
        let shared = model.layer_inputs(t, &Tensor::from_vec(mask.clone(), (b, t), dv)?)?;
        let x = Tensor::from_vec(pattern(b * t * h, 1, 1.0), (b, t, h), dv)?.to_dtype(dt)?;
        let g = Tensor::from_vec(pattern(b * t * h, 2, 1e-2), (b, t, h), dv)?.to_dtype(dt)?;
        let (y, tape) = model.layer_taped(0, &x, &shared)?;
        let (dx, mut grads) = model.layer_backward(tape, &g)?;
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = vec![y, dx];
        out.extend(grads.into_iter().map(|(_, g)| g));
        out.iter().map(|x| Ok(x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)).collect()
    };
    let (want, got) = (layer(&Device::Cpu, DType::F32)?, layer(dev, dtype)?);
    if want.len() != 13 || got.len() != 13 {
        anyhow::bail!(
            "the layer backward returned {} and {} gradients, expected 11 each",
            want.len() - 2,
            got.len() - 2
        );
    }
    let layer_output = max_rel(&want[0], &got[0]);
    let layer_grads = want[1..].iter().zip(&got[1..]).map(|(a, b)| max_rel(a, b)).fold(0.0, f64::max);
    let attention = |dv: &Device| -> anyhow::Result<Vec<Vec<f32>>> {
        use crate::model::fused;
        let scale = 1.0 / (d as f64).sqrt();
        let q = Tensor::from_vec(pattern(b * nh * t * d, 3, 1.0), (b, nh, t, d), dv)?;
        let k = Tensor::from_vec(pattern(b * nkv * t * d, 4, 1.0), (b, nkv, t, d), dv)?;
        let v = Tensor::from_vec(pattern(b * nkv * t * d, 5, 1.0), (b, nkv, t, d), dv)?;
        let g = Tensor::from_vec(pattern(b * nh * t * d, 6, 1.0), (b, nh, t, d), dv)?;
        let bias = crate::model::ops::attention_bias(&Tensor::from_vec(mask.clone(), (b, t), dv)?)?;
        let (out, p) = fused::attention_forward_keeping_probs(&q, &k, &v, &bias, scale)?;
        let (dq, dk, dv_) = fused::attention_backward_from_probs(&q, &k, &v, &p, scale, &g)?;
        let (dq2, dk2, dv2) = fused::attention_backward(&q, &k, &v, &bias, scale, &g)?;
        [out, p, dq, dk, dv_, dq2, dk2, dv2]
            .iter()
            .map(|x| Ok(x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?))
            .collect()
    };
    let (want, got) = (attention(&Device::Cpu)?, attention(dev)?);
    let attention_f32 = want.iter().zip(&got).map(|(a, b)| max_rel(a, b)).fold(0.0, f64::max);
    let flash_applies = dev.is_cpu() || crate::kernels::flash::cuda_supports(dtype, d);
    let flash = if flash_applies {
        let scale = 1.0 / (d as f64).sqrt();
        let q = Tensor::from_vec(pattern(b * nh * t * d, 3, 1.0), (b, nh, t, d), dev)?.to_dtype(dtype)?;
        let k = Tensor::from_vec(pattern(b * nkv * t * d, 4, 1.0), (b, nkv, t, d), dev)?.to_dtype(dtype)?;
        let v = Tensor::from_vec(pattern(b * nkv * t * d, 5, 1.0), (b, nkv, t, d), dev)?.to_dtype(dtype)?;
        let g = Tensor::from_vec(pattern(b * nh * t * d, 6, 1.0), (b, nh, t, d), dev)?.to_dtype(dtype)?;
        let m = Tensor::from_vec(mask.clone(), (b, t), dev)?;
        let (out, lse) = crate::kernels::flash::attention_forward(&q, &k, &v, &m, scale)?;
        let (dq, dk, dv) = crate::kernels::flash::attention_backward(&q, &k, &v, &m, &out, &lse, &g, scale)?;
        let got: Vec<Vec<f32>> = [out, dq, dk, dv]
            .iter()
            .map(|x| Ok(x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?))
            .collect::<anyhow::Result<_>>()?;
        // want: out, p, dq, dk, dv (from the kept probabilities), ...
        let pairs = [(&want[0], &got[0]), (&want[2], &got[1]), (&want[3], &got[2]), (&want[4], &got[3])];
        Some(pairs.iter().map(|(a, b)| max_rel(a, b)).fold(0.0, f64::max))
    } else {
        None
    };
    Ok(RealShapeDiff { seq, layer_output, layer_grads, attention_f32, flash })
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// Mean seconds of `f` over `iters` runs after one warm-up, each ended by a device sync.
fn time_it(dev: &Device, iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    dev.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

fn layer(args: &LayerArgs) -> anyhow::Result<()> {
    use candle_core::Var;
    let work = &args.work;
    let mut cfg = arch(&work.arch)?;
    let layers = cfg.num_hidden_layers;
    cfg.num_hidden_layers = 1;
    let dev = parse_device(&work.device)?;
    let dt = crate::model::device::parse_dtype(&work.dtype)?;
    let (b, t, h) = (work.batch, work.seq, cfg.hidden_size);
    let m = crate::model::random(&cfg, 0, DType::F32, &dev, false)?;
    let model = crate::model::Qwen3::new(cfg.clone(), m.params().to_dtype(dt)?)?.into_trainable()?;
    let frozen = model.detached()?;
    let mask: Vec<u32> = (0..b).flat_map(|i| (0..t).map(move |j| u32::from(j >= (i * 37) % (t / 4)))).collect();
    let mask = Tensor::from_vec(mask, (b, t), &dev)?;
    let shared = model.layer_inputs(t, &mask)?;
    let x = (Tensor::randn(0f32, 1.0, (b, t, h), &dev)?).to_dtype(dt)?;
    let g = (Tensor::randn(0f32, 1e-3, (b, t, h), &dev)?).to_dtype(dt)?;
    let forward = time_it(&dev, args.iters, || {
        frozen.layer(0, &x, &shared)?;
        Ok(())
    })?;
    let forward_backward = time_it(&dev, args.iters, || {
        let xv = Var::from_tensor(&x)?;
        let out = model.layer(0, xv.as_tensor(), &shared)?;
        out.mul(&g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let forward_backward_by_hand = time_it(&dev, args.iters, || {
        let (_, tape) = frozen.layer_taped(0, &x, &shared)?;
        frozen.layer_backward(tape, &g)?;
        Ok(())
    })?;
    // The seven projections' forward matmuls alone: the floor a layer's forward cannot beat.
    let (nh, nkv, d, inter) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
    let ws: Vec<(Tensor, Tensor)> =
        [(nh * d, h), (nkv * d, h), (nkv * d, h), (h, nh * d), (inter, h), (inter, h), (h, inter)]
            .iter()
            .map(|&(o, i)| -> anyhow::Result<(Tensor, Tensor)> {
                let w = Tensor::randn(0f32, 0.02, (o, i), &dev)?.to_dtype(dt)?;
                let input = Tensor::randn(0f32, 1.0, (b * t, i), &dev)?.to_dtype(dt)?;
                Ok((w, input))
            })
            .collect::<anyhow::Result<_>>()?;
    let matmuls = time_it(&dev, args.iters, || {
        for (w, input) in &ws {
            input.matmul(&w.t()?)?;
        }
        Ok(())
    })?;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?.to_dtype(dt)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nkv, t, d), &dev)?.to_dtype(dt)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, nkv, t, d), &dev)?.to_dtype(dt)?)?;
    let go = Tensor::randn(0f32, 1e-3, (b, nh, t, d), &dev)?.to_dtype(dt)?;
    let bias = crate::model::ops::attention_bias(&mask)?;
    let scale = (d as f64).powf(-0.5);
    let attention = time_it(&dev, args.iters, || {
        let out = crate::model::fused::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale)?;
        out.mul(&go)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let attention_primitive = time_it(&dev, args.iters, || {
        let out = crate::model::ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale)?;
        out.mul(&go)?.sum_all()?.backward()?;
        Ok(())
    })?;
    // The other parts of a layer, forward + backward each: its two RMSNorms, the q/k norm with RoPE
    // and the move to attention's layout (one fused op), and the SwiGLU MLP.
    let var = |shape: &[usize], std: f32| -> anyhow::Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(0f32, std, shape, &dev)?.to_dtype(dt)?)?)
    };
    let (xv, wn) = (var(&[b, t, h], 1.0)?, var(&[h], 1.0)?);
    let norms = time_it(&dev, args.iters, || {
        for _ in 0..2 {
            let y = crate::model::fused::rms_norm(xv.as_tensor(), wn.as_tensor(), 1e-6)?;
            y.mul(&g)?.sum_all()?.backward()?;
        }
        Ok(())
    })?;
    let rope = crate::model::ops::RopeTables::new(t, d, cfg.rope_theta, dt, &dev)?;
    let (qv, qn) = (var(&[b, t, nh, d], 1.0)?, var(&[d], 1.0)?);
    let (kv, kn) = (var(&[b, t, nkv, d], 1.0)?, var(&[d], 1.0)?);
    let gk = Tensor::randn(0f32, 1e-3, (b, nkv, t, d), &dev)?.to_dtype(dt)?;
    let qk_norm_rope = time_it(&dev, args.iters, || {
        for (x, w, g) in [(&qv, &qn, &go), (&kv, &kn, &gk)] {
            let y = crate::model::fused::qk_norm_rope(x.as_tensor(), w.as_tensor(), &rope, 1e-6)?;
            y.mul(g)?.sum_all()?.backward()?;
        }
        Ok(())
    })?;
    let linear = |o: usize, i: usize| -> anyhow::Result<(Var, crate::model::Linear)> {
        let w = var(&[o, i], 0.02)?;
        let l = crate::model::Linear::new(w.as_tensor().clone(), None);
        Ok((w, l))
    };
    let ((_wg, gate), (_wu, up), (_wd, down)) = (linear(inter, h)?, linear(inter, h)?, linear(h, inter)?);
    let mlp = time_it(&dev, args.iters, || {
        use candle_core::Module;
        let y =
            down.forward(&crate::model::fused::swiglu(&gate.forward(xv.as_tensor())?, &up.forward(xv.as_tensor())?)?)?;
        y.mul(&g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    // The hand-written backward's parts on the layer's shapes (no graph anywhere): the projections'
    // fourteen matmuls, SwiGLU's kernel, the two RMSNorm backward passes, attention's backward (recomputing;
    // the layer's reads the kept probabilities: its parts are below), and the q/k norm with RoPE.
    let rows = b * t;
    let dys: Vec<Tensor> = ws
        .iter()
        .map(|(w, _)| Ok(Tensor::randn(0f32, 1e-3, (rows, w.dim(0)?), &dev)?.to_dtype(dt)?))
        .collect::<anyhow::Result<_>>()?;
    let backward_matmuls = time_it(&dev, args.iters, || {
        for ((w, input), dy) in ws.iter().zip(&dys) {
            dy.matmul(w)?;
            dy.t()?.matmul(input)?;
        }
        Ok(())
    })?;
    let (gate_t, up_t, da_t) = (
        Tensor::randn(0f32, 1.0, (rows, inter), &dev)?.to_dtype(dt)?,
        Tensor::randn(0f32, 1.0, (rows, inter), &dev)?.to_dtype(dt)?,
        Tensor::randn(0f32, 1e-3, (rows, inter), &dev)?.to_dtype(dt)?,
    );
    let swiglu_backward = time_it(&dev, args.iters, || {
        crate::kernels::swiglu::swiglu_backward(&gate_t, &up_t, &da_t)?;
        Ok(())
    })?;
    let rms_norm_backwards = time_it(&dev, args.iters, || {
        use crate::model::fused::rms_norm_backward;
        for _ in 0..2 {
            rms_norm_backward(xv.as_tensor(), wn.as_tensor(), &g, 1e-6)?;
        }
        Ok(())
    })?;
    let attention_backward = time_it(&dev, args.iters, || {
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        crate::model::fused::attention_backward(q, k, v, &bias, scale, &go)?;
        Ok(())
    })?;
    // Attention's own parts (forward, then what its backward adds): which of the `T × T` passes
    // and matmuls cost what.
    let group_rows = nh / nkv * t;
    let (qg, kt, vt) = (q.as_tensor().reshape((b, nkv, group_rows, d))?, k.as_tensor().t()?, v.as_tensor().clone());
    let att_scores = time_it(&dev, args.iters, || {
        qg.matmul(&kt)?;
        Ok(())
    })?;
    let s_att = qg.matmul(&kt)?.reshape((b, nh, t, t))?;
    let softmax_op = crate::kernels::softmax::MaskedSoftmax { scale };
    let att_softmax = time_it(&dev, args.iters, || {
        s_att.apply_op2_no_bwd(&bias, &softmax_op)?;
        Ok(())
    })?;
    let p_att = s_att.apply_op2_no_bwd(&bias, &softmax_op)?.reshape((b, nkv, group_rows, t))?;
    let att_pv = time_it(&dev, args.iters, || {
        p_att.matmul(&vt)?;
        Ok(())
    })?;
    let go_g = go.reshape((b, nkv, group_rows, d))?;
    let att_dv_dp = time_it(&dev, args.iters, || {
        p_att.t()?.matmul(&go_g)?;
        go_g.matmul(&vt.t()?)?;
        Ok(())
    })?;
    let dp_att = go_g.matmul(&vt.t()?)?.reshape((b, nh, t, t))?;
    let softmax_bwd_op = crate::kernels::softmax::MaskedSoftmaxBackward { scale };
    let att_softmax_backward = time_it(&dev, args.iters, || {
        s_att.apply_op3_no_bwd(&bias, &dp_att, &softmax_bwd_op)?;
        Ok(())
    })?;
    let ds_att = s_att.apply_op3_no_bwd(&bias, &dp_att, &softmax_bwd_op)?.reshape((b, nkv, group_rows, t))?;
    let k_plain = k.as_tensor().clone();
    let att_dq_dk = time_it(&dev, args.iters, || {
        ds_att.matmul(&k_plain)?;
        ds_att.t()?.matmul(&qg)?;
        Ok(())
    })?;
    let qk_norm_rope_backward = time_it(&dev, args.iters, || {
        use crate::kernels::norm_rope::norm_rope_backward;
        for (x, w, g) in [(&qv, &qn, &go), (&kv, &kn, &gk)] {
            norm_rope_backward(x.as_tensor(), &rope.norm_rope_tables(w.as_tensor())?, g, 1e-6)?;
        }
        Ok(())
    })?;
    let flops_fwd = 2.0 * (b * t) as f64 * (ws.iter().map(|(w, _)| w.elem_count()).sum::<usize>()) as f64;
    println!(
        "{}",
        serde_json::json!({
            "arch": work.arch, "batch": b, "seq": t, "dtype": work.dtype, "device": format!("{dev:?}"),
            "seconds": {
                "layer_forward": forward, "layer_forward_backward": forward_backward,
                "layer_forward_backward_by_hand": forward_backward_by_hand,
                "projection_matmuls_forward": matmuls,
                "attention_core_forward_backward": attention,
                "attention_core_forward_backward_primitive_ops": attention_primitive,
                "two_rms_norms_forward_backward": norms,
                "qk_norm_rope_forward_backward": qk_norm_rope,
                "mlp_forward_backward": mlp,
            },
            "by_hand_backward_parts_seconds": {
                "matmuls": backward_matmuls, "swiglu": swiglu_backward, "rms_norms": rms_norm_backwards,
                "attention": attention_backward, "qk_norm_rope": qk_norm_rope_backward,
            },
            "attention_parts_seconds": {
                "scores_matmul": att_scores, "softmax": att_softmax, "probs_times_v": att_pv,
                "dv_and_dp_matmuls": att_dv_dp, "softmax_backward": att_softmax_backward,
                "dq_and_dk_matmuls": att_dq_dk,
            },
            "projection_matmul_tflops": flops_fwd / matmuls / 1e12,
            "layers": layers,
            "estimated_step_body_seconds": forward_backward_by_hand * layers as f64,
        })
    );
    Ok(())
}

/// Compiles every module of [`crate::kernels::MODULES`] and finds each kernel its launchers can ask
/// for in the PTX, printing `{kernels: {module: ptx_bytes}, entries: {module: kernels}}`; fails on
/// the first error.
#[cfg(feature = "cuda")]
fn kernels() -> anyhow::Result<()> {
    let (mut sizes, mut entries) = (serde_json::Map::new(), serde_json::Map::new());
    for module in crate::kernels::MODULES {
        let (bytes, kernels) = module.check()?;
        sizes.insert(module.name.into(), bytes.into());
        entries.insert(module.name.into(), kernels.into());
    }
    println!("{}", serde_json::json!({ "kernels": sizes, "entries": entries }));
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn kernels() -> anyhow::Result<()> {
    anyhow::bail!("`pipe bench kernels` needs a build with the `cuda` feature (cargo build --features cuda)")
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Kernels => kernels(),
        BenchCommand::TrainStep(args) => train_step(&args),
        BenchCommand::Layer(args) => layer(&args),
        BenchCommand::Parity { device, seed, real_seqs } => {
            let dev = parse_device(&device)?;
            // Small enough to run anywhere, large enough for GQA, several layers and the real vocabulary.
            let cfg = Qwen3Config::tiny(151_669, 64, 128, 3, 4, 2, 16, false);
            let (cpu_logits, cpu_grads) = run_once(&cfg, seed, DType::F32, &Device::Cpu)?;
            let mut report = serde_json::json!({"device": format!("{dev:?}")});
            for (name, dtype, tol_logit, tol_grad) in
                [("f32", DType::F32, 1e-4, 1e-4), ("bf16", DType::BF16, 5e-2, 1e-1)]
            {
                let (logits, grads) = run_once(&cfg, seed, dtype, &dev)?;
                let logit_err = cpu_logits.iter().zip(&logits).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
                let grad_err = cpu_grads.iter().zip(&grads).map(|((_, a), (_, b))| max_rel(a, b)).fold(0.0, f64::max);
                // The layers differentiated by hand on the device, against autograd on the CPU.
                let by_hand = layer_grads_by_hand(&cfg, seed, dtype, &dev)?;
                let reference: std::collections::HashMap<&str, &Vec<f32>> =
                    cpu_grads.iter().map(|(n, g)| (n.as_str(), g)).collect();
                if by_hand.len() != cfg.num_hidden_layers * 11 {
                    anyhow::bail!("the hand-written backward returned {} gradients", by_hand.len());
                }
                let by_hand_err = by_hand.iter().map(|(n, g)| max_rel(reference[n.as_str()], g)).fold(0.0, f64::max);
                let attention_err = attention_rel_diff(dtype, &dev)?;
                report[name] = serde_json::json!({
                    "max_abs_logit_diff": logit_err, "max_rel_grad_diff": grad_err,
                    "max_rel_layer_grad_diff_by_hand": by_hand_err,
                    "max_rel_attention_diff_t37_to_1100": attention_err,
                    "tolerance": {"logit": tol_logit, "grad": tol_grad},
                    "pass": logit_err <= tol_logit && grad_err <= tol_grad && by_hand_err <= tol_grad
                        && attention_err <= tol_grad,
                });
            }
            // Qwen3-0.6B's shapes: the layer in bf16 within bf16 tolerance, attention in f32 within 1e-4.
            let (tol_out, tol_grads, tol_attention) = (5e-2, 1e-1, 1e-4);
            let mut real = Vec::new();
            for seq in real_seqs {
                let r = real_shape_diff(seq, DType::BF16, &dev)?;
                let pass = r.layer_output <= tol_out
                    && r.layer_grads <= tol_grads
                    && r.attention_f32 <= tol_attention
                    && r.flash.is_none_or(|e| e <= tol_grads);
                real.push(serde_json::json!({"diff": r, "pass": pass}));
            }
            let real_pass = real.iter().all(|r| r["pass"] == true);
            report["real_shapes"] = serde_json::json!({
                "layer": "hidden 1024, 16 heads x 128, 8 KV heads, intermediate 3072; batch 2, second left-padded by T/4",
                "layer_dtype": "bf16", "reference": "CPU f32",
                "tolerance": {"layer_output": tol_out, "layer_grads": tol_grads, "attention_f32": tol_attention,
                              "flash_bf16": tol_grads},
                "runs": real, "pass": real_pass,
            });
            let adamw_err = fused_adamw_diff(&dev)?;
            report["fused_adamw"] = serde_json::json!({
                "max_abs_diff": adamw_err, "tolerance": 1e-6, "pass": adamw_err <= 1e-6,
            });
            let scatter_err = scatter_and_write_diff(&dev)?;
            report["scatter_and_write_back"] = serde_json::json!({
                "max_abs_diff": scatter_err, "tolerance": 1e-5, "pass": scatter_err <= 1e-5,
            });
            let squares_err = sum_squares_rel_diff(&dev)?;
            report["sum_squares"] = serde_json::json!({
                "rel_diff": squares_err, "tolerance": 1e-5, "pass": squares_err <= 1e-5,
            });
            let pass = report["sum_squares"]["pass"] == true
                && report["f32"]["pass"] == true
                && report["bf16"]["pass"] == true
                && report["fused_adamw"]["pass"] == true
                && report["scatter_and_write_back"]["pass"] == true
                && real_pass;
            report["pass"] = pass.into();
            println!("{report}");
            if !pass {
                anyhow::bail!("device results differ from the CPU beyond tolerance");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_flops_count_non_embedding_parameters_the_head_rows_and_full_attention() {
        // Qwen3-0.6B: 440,467,456 non-embedding parameters (its model card says 0.44B), tied head.
        let cfg = arch("qwen3-0.6b").unwrap();
        let attention = 12.0 * 28.0 * 16.0 * 128.0 * 512.0;
        assert_eq!(train_flops_per_token(&cfg, 512), 6.0 * (440_467_456.0 + 2048.0) + attention);
        // The same figure benches/gpu/torch_step.py's flops_per_token("qwen3-0.6b", 512) prints.
        assert_eq!(train_flops_per_token(&cfg, 512), 2_995_138_560.0);
        // An untied head is not counted either: only the yes/no rows are projected.
        let mut untied = cfg.clone();
        untied.tie_word_embeddings = false;
        assert_eq!(train_flops_per_token(&untied, 512), train_flops_per_token(&cfg, 512));
        // Attention grows with T, the rest does not.
        let d = train_flops_per_token(&cfg, 2048) - train_flops_per_token(&cfg, 512);
        assert_eq!(d, 12.0 * 28.0 * 16.0 * 128.0 * 1536.0);
    }

    #[test]
    fn the_peak_is_looked_up_from_the_gpu_name_and_unknown_gpus_get_none() {
        assert_eq!(peak_bf16_tflops("NVIDIA H200 (cuda:0), host CPU x"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak_bf16_tflops("Tesla T4"), None);
    }

    #[test]
    fn the_real_shape_check_measures_bf16_against_f32_within_its_tolerance() {
        // On the CPU the device side is the CPU itself: in f32 the figures must be exactly 0, in bf16
        // they must be non-zero (something was compared) and within the tolerance the GPU is held to.
        let f32 = real_shape_diff(16, DType::F32, &Device::Cpu).unwrap();
        assert_eq!((f32.layer_output, f32.layer_grads, f32.attention_f32), (0.0, 0.0, 0.0));
        let bf16 = real_shape_diff(16, DType::BF16, &Device::Cpu).unwrap();
        assert!(bf16.layer_output > 1e-4 && bf16.layer_output <= 5e-2, "{bf16:?}");
        assert!(bf16.layer_grads > 1e-4 && bf16.layer_grads <= 1e-1, "{bf16:?}");
        assert_eq!(bf16.attention_f32, 0.0);
        // On the CPU the tiled attention computes in f32 whatever the dtype: bf16 rounding of its
        // inputs and outputs only, well inside the GPU's tolerance.
        let flash = bf16.flash.expect("the tiled attention runs on the CPU");
        assert!(flash > 0.0 && flash <= 1e-1, "{bf16:?}");
        assert!(f32.flash.unwrap() < 1e-5, "{f32:?}");
    }
}
