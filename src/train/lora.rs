//! LoRA adapters as PEFT makes them (A Kaiming-uniform, B zero, scale `alpha / r`), and merging
//! them into the base weights for export: `W' = W + scale · B A`.

use candle_core::{DType, Device, Tensor};

use super::TrainError;
use crate::model::{Qwen3, Qwen3Config};
use crate::util::rng::SplitMix64;

/// The linear layers an adapter can target, by their name inside a decoder layer.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One adapter: the module it wraps (`model.layers.3.self_attn.q_proj`) and its shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
}

impl AdapterSpec {
    /// PEFT's names for the two matrices, used in checkpoints.
    pub fn a_name(&self) -> String {
        format!("{}.lora_A.weight", self.module)
    }
    pub fn b_name(&self) -> String {
        format!("{}.lora_B.weight", self.module)
    }
}

/// Every adapter the targets ask for, in layer order then [`MODULES`] order.
pub fn adapter_specs(cfg: &Qwen3Config, targets: &[String]) -> Vec<AdapterSpec> {
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for name in MODULES {
            if !targets.iter().any(|t| t == name) {
                continue;
            }
            let block = if is_mlp(name) { "mlp" } else { "self_attn" };
            let weight = format!("model.layers.{l}.{block}.{name}.weight");
            let shape = cfg
                .param_shapes()
                .into_iter()
                .find(|(n, _)| *n == weight)
                .map(|(_, s)| s)
                .expect("every module of MODULES exists in a Qwen3 layer");
            out.push(AdapterSpec {
                module: weight.trim_end_matches(".weight").to_string(),
                in_features: shape[1],
                out_features: shape[0],
            });
        }
    }
    out
}

fn is_mlp(name: &str) -> bool {
    matches!(name, "gate_proj" | "up_proj" | "down_proj")
}

/// A's initial values: uniform in `±1/√in` (PEFT's `kaiming_uniform_(a=√5)`), from a stream keyed
/// by (seed, adapter name) so they do not depend on which other modules are targeted.
pub fn init_a(seed: u64, spec: &AdapterSpec, r: usize) -> Vec<f32> {
    let bound = 1.0 / (spec.in_features as f64).sqrt();
    let mut rng = SplitMix64::keyed(seed, &spec.a_name());
    (0..r * spec.in_features).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect()
}

/// `W + scale · B A` in f32, for export.
pub fn merge(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor, TrainError> {
    let w = weight.to_dtype(DType::F32)?;
    let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
    Ok((w + delta.affine(scale, 0.0)?)?)
}

/// Whether `model` has a linear layer at every module the specs name.
pub fn check_modules(model: &mut Qwen3, specs: &[AdapterSpec]) -> Result<(), TrainError> {
    for s in specs {
        if model.linear_mut(&s.module).is_none() {
            return Err(TrainError::Config(format!("the model has no linear layer `{}`", s.module)));
        }
    }
    Ok(())
}

/// A zero tensor of B's shape.
pub fn zeros_b(spec: &AdapterSpec, r: usize, device: &Device) -> Result<Tensor, TrainError> {
    Ok(Tensor::zeros((spec.out_features, r), DType::F32, device)?)
}
