//! `pipe bench`: measurements that need a real device, printed as one JSON line each.
//!
//! `parity` runs the Qwen3 reranker forward and backward on the CPU and on the chosen device with the
//! same random weights and batch, and reports the largest differences (f32 must agree within 1e-4;
//! bf16 within bf16 rounding). It is what `benches/gpu/run.sh` calls on the GPU machine; on a CPU-only
//! build `--device cpu` exercises the same code path.

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
    },
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

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Parity { device, seed } => {
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
                report[name] = serde_json::json!({
                    "max_abs_logit_diff": logit_err, "max_rel_grad_diff": grad_err,
                    "tolerance": {"logit": tol_logit, "grad": tol_grad},
                    "pass": logit_err <= tol_logit && grad_err <= tol_grad,
                });
            }
            let pass = report["f32"]["pass"] == true && report["bf16"]["pass"] == true;
            report["pass"] = pass.into();
            println!("{report}");
            if !pass {
                anyhow::bail!("device results differ from the CPU beyond tolerance");
            }
            Ok(())
        }
    }
}
