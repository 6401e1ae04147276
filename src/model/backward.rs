//! A decoder layer's backward pass written out by hand, for full fine-tuning.
//!
//! Why not candle's autograd: for every edge of the graph it allocates a zero tensor and adds the
//! incoming gradient into it (a memset and a full read-read-write pass per activation), it
//! differentiates element-wise functions one primitive at a time (SiLU alone is six kernels), and
//! the only way to choose what the forward keeps is to keep everything. On a GPU those passes, not
//! the matmuls, were most of a layer's backward (measured: 4.6× its forward, where two matmuls per
//! forward matmul make about 2×). Here the chain rule is written out: eighteen matmuls (two per
//! projection, four in attention), the fused kernels of RMSNorm ([`super::norm`]), the q/k norm
//! with RoPE ([`super::norm_rope`]), attention's softmax from its kept probabilities
//! ([`super::fused`]) and SwiGLU ([`crate::kernels::swiglu`]), two residual adds, and the layout changes
//! attention's output needs.
//!
//! [`Qwen3::layer_taped`] runs the same ops in the same order as [`Qwen3::layer`] (so the same
//! values) without a graph and keeps what the backward reads in a [`LayerTape`];
//! [`Qwen3::layer_backward`] consumes it. LoRA adapters are not differentiated here: a model with
//! adapters is an error, and the trainer uses autograd for it. The tests below hold every
//! parameter's gradient and the input's to autograd's, in f32 and bf16, with padding and GQA.

use candle_core::{DType, Result as CandleResult, Tensor};

use super::fused::{attention_backward_from_probs, attention_forward_keeping_probs, rms_norm, rms_norm_backward};
use super::ops::Linear;
use super::qwen3::{DecoderLayer, LayerInputs};
use super::{ModelError, Qwen3};
use crate::kernels::norm_rope::{norm_rope_backward, norm_rope_forward};
use crate::kernels::swiglu::{swiglu_backward, swiglu_forward};

/// What one layer's forward keeps for its backward (all detached, in the compute dtype).
/// Rows are the batch's `B·T` positions.
pub struct LayerTape {
    index: usize,
    dims: (usize, usize),
    /// The layer's input `[rows, H]` and its RMSNorm.
    x: Tensor,
    h1: Tensor,
    /// The q/k projections reshaped to `[B, T, heads, d]`, before their RMSNorm, and the tables
    /// (norm weight, cos, sin) their fused norm and RoPE read.
    q_proj: Tensor,
    k_proj: Tensor,
    q_tables: Tensor,
    k_tables: Tensor,
    /// Attention's inputs `[B, heads, T, d]` (contiguous) and its output as `[rows, heads·d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// What the attention backward needs beyond q, k and v.
    attention: Kept,
    attn: Tensor,
    /// The residual stream after attention, its RMSNorm, the MLP's gate and up projections and
    /// `silu(gate) · up`.
    x2: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// What a layer keeps of its attention for the backward.
#[derive(Debug)]
enum Kept {
    /// The probabilities `[B, heads, T, T]`: kept rather than recomputed, which saves the backward
    /// a matmul and two passes over `T × T` scores and the bias. They are the tape's largest part
    /// (134 MB per Qwen3-0.6B layer at 16 × 512 in bf16); with `recompute` only one layer's tape
    /// exists at a time.
    Probs(Tensor),
    /// The tiled attention's log-sum-exp per row `[B, heads, T]` and the `[B, T]` key mask: one
    /// float a row instead of `T`. Its output is the tape's `attn`, in another layout.
    Flash { lse: Tensor, mask: Tensor },
}

/// One layer's parameter gradients, by Hugging Face name, in the compute dtype.
pub type NamedGrads = Vec<(String, Tensor)>;

fn weight(l: &Linear) -> Tensor {
    l.weight.detach()
}

fn linear(x: &Tensor, l: &Linear) -> CandleResult<Tensor> {
    let y = x.matmul(&weight(l).t()?)?;
    match &l.bias {
        Some(b) => y.broadcast_add(&b.detach()),
        None => Ok(y),
    }
}

/// `(dx, dW, db)` of `y = x Wᵀ + b` for `dy`, all `[rows, ·]`.
fn linear_backward(x: &Tensor, l: &Linear, dy: &Tensor) -> CandleResult<(Tensor, Tensor, Option<Tensor>)> {
    let dx = dy.matmul(&weight(l))?;
    let dw = dy.t()?.matmul(x)?;
    let db = match &l.bias {
        Some(b) => Some(dy.to_dtype(DType::F32)?.sum(0)?.to_dtype(b.dtype())?),
        None => None,
    };
    Ok((dx, dw, db))
}

fn no_lora(layer: &DecoderLayer, index: usize) -> Result<(), ModelError> {
    let a = &layer.self_attn;
    let m = &layer.mlp;
    for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
        if l.lora.is_some() {
            return Err(ModelError::Input(format!(
                "layer {index} has LoRA adapters, which the hand-written backward does not differentiate; use autograd"
            )));
        }
    }
    Ok(())
}

impl Qwen3 {
    /// Layer `index` on `x: [B, T, H]` without a graph: its output and what
    /// [`Self::layer_backward`] needs. The output equals [`Self::layer`]'s bit for bit.
    pub fn layer_taped(
        &self,
        index: usize,
        x: &Tensor,
        shared: &LayerInputs,
    ) -> Result<(Tensor, LayerTape), ModelError> {
        let layer = self.decoder_layer(index)?;
        no_lora(layer, index)?;
        let (b, t, hd) = x.dims3()?;
        let a = &layer.self_attn;
        let (nh, nkv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let rows = b * t;
        let x = x.detach().contiguous()?.reshape((rows, hd))?;
        let h1 = rms_norm(&x, &layer.input_layernorm.detach(), layer.eps)?;
        let q_proj = linear(&h1, &a.q_proj)?.reshape((b, t, nh, d))?;
        let q_tables = shared.rope.norm_rope_tables(&a.q_norm)?;
        let q = norm_rope_forward(&q_proj, &q_tables, a.eps)?;
        let k_proj = linear(&h1, &a.k_proj)?.reshape((b, t, nkv, d))?;
        let k_tables = shared.rope.norm_rope_tables(&a.k_norm)?;
        let k = norm_rope_forward(&k_proj, &k_tables, a.eps)?;
        let v = linear(&h1, &a.v_proj)?.reshape((b, t, nkv, d))?.transpose(1, 2)?.contiguous()?;
        let scale = (d as f64).powf(-0.5);
        let flash = shared.flash && (x.device().is_cpu() || crate::kernels::flash::cuda_supports(x.dtype(), d));
        let (out, attention) = if flash {
            let (out, lse) = crate::kernels::flash::attention_forward(&q, &k, &v, &shared.key_mask, scale)?;
            (out, Kept::Flash { lse, mask: shared.key_mask.clone() })
        } else {
            let (out, probs) = attention_forward_keeping_probs(&q, &k, &v, &shared.bias.contiguous()?, scale)?;
            (out, Kept::Probs(probs))
        };
        let attn = out.transpose(1, 2)?.reshape((rows, nh * d))?;
        let x2 = (&x + linear(&attn, &a.o_proj)?)?;
        let h2 = rms_norm(&x2, &layer.post_attention_layernorm.detach(), layer.eps)?;
        let m = &layer.mlp;
        let gate = linear(&h2, &m.gate_proj)?;
        let up = linear(&h2, &m.up_proj)?;
        let act = swiglu_forward(&gate, &up)?;
        let y = (&x2 + linear(&act, &m.down_proj)?)?.reshape((b, t, hd))?;
        let tape = LayerTape {
            index,
            dims: (b, t),
            x,
            h1,
            q_proj,
            k_proj,
            q_tables,
            k_tables,
            q,
            k,
            v,
            attention,
            attn,
            x2,
            h2,
            gate,
            up,
            act,
        };
        Ok((y, tape))
    }

    /// The gradient of the layer's input and of each of its parameters, given `dy`, the gradient
    /// of its output `[B, T, H]` (in the compute dtype). Consumes the tape: each activation is
    /// freed as soon as the backward has read it for the last time.
    pub fn layer_backward(&self, tape: LayerTape, dy: &Tensor) -> Result<(Tensor, NamedGrads), ModelError> {
        // Fields are moved out one by one below, so each activation is freed after its last use.
        let (index, (b, t)) = (tape.index, tape.dims);
        // `layer_taped` refused a layer with adapters; the tape comes from there.
        let layer = self.decoder_layer(index)?;
        let a = &layer.self_attn;
        let m = &layer.mlp;
        let (nh, nkv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let (rows, hd) = tape.x.dims2()?;
        if dy.dims() != [b, t, hd] {
            return Err(ModelError::Input(format!("layer {index}: dy is {:?}, expected {:?}", dy.dims(), [b, t, hd])));
        }
        let pre = format!("model.layers.{index}");
        let mut grads: NamedGrads = Vec::with_capacity(13);
        let mut push = |name: &str, dw: Tensor, db: Option<Tensor>| {
            grads.push((format!("{pre}.{name}.weight"), dw));
            if let Some(db) = db {
                grads.push((format!("{pre}.{name}.bias"), db));
            }
        };
        let dy = dy.contiguous()?.reshape((rows, hd))?;

        // MLP: y = x2 + down(silu(gate(h2)) · up(h2)), h2 = norm(x2).
        let (dact, dw, _) = linear_backward(&tape.act, &m.down_proj, &dy)?;
        push("mlp.down_proj", dw, None);
        drop(tape.act);
        let (dgate, dup) = swiglu_backward(&tape.gate, &tape.up, &dact)?;
        drop((tape.gate, tape.up, dact));
        let (dh2_gate, dw, _) = linear_backward(&tape.h2, &m.gate_proj, &dgate)?;
        push("mlp.gate_proj", dw, None);
        let (dh2_up, dw, _) = linear_backward(&tape.h2, &m.up_proj, &dup)?;
        push("mlp.up_proj", dw, None);
        drop((tape.h2, dgate, dup));
        let (dx2, dw) =
            rms_norm_backward(&tape.x2, &layer.post_attention_layernorm.detach(), &(dh2_gate + dh2_up)?, layer.eps)?;
        push("post_attention_layernorm", dw, None);
        drop(tape.x2);
        let dx2 = (dy + dx2)?;

        // Attention: x2 = x + o(attention(rope(norm(q(h1))), rope(norm(k(h1))), v(h1))), h1 = norm(x).
        let (dattn, dw, db) = linear_backward(&tape.attn, &a.o_proj, &dx2)?;
        push("self_attn.o_proj", dw, db);
        // The tiled backward reads attention's output in its own layout (one copy, short-lived).
        let out = match tape.attention {
            Kept::Flash { .. } => Some(tape.attn.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?),
            Kept::Probs(_) => None,
        };
        drop(tape.attn);
        let dout = dattn.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?;
        let scale = (d as f64).powf(-0.5);
        let (dq, dk, dv) = match tape.attention {
            Kept::Probs(probs) => attention_backward_from_probs(&tape.q, &tape.k, &tape.v, &probs, scale, &dout)?,
            Kept::Flash { lse, mask } => {
                let out = out.as_ref().expect("set above for Kept::Flash");
                crate::kernels::flash::attention_backward(&tape.q, &tape.k, &tape.v, &mask, out, &lse, &dout, scale)?
            }
        };
        drop((tape.q, tape.k, tape.v, dout, out));
        let (dq, dqn) = norm_rope_backward(&tape.q_proj, &tape.q_tables, &dq, a.eps)?;
        push("self_attn.q_norm", dqn, None);
        let (dk, dkn) = norm_rope_backward(&tape.k_proj, &tape.k_tables, &dk, a.eps)?;
        push("self_attn.k_norm", dkn, None);
        drop((tape.q_proj, tape.k_proj, tape.q_tables, tape.k_tables));
        let dv = dv.transpose(1, 2)?.reshape((rows, nkv * d))?;
        let (dh1_q, dw, db) = linear_backward(&tape.h1, &a.q_proj, &dq.reshape((rows, nh * d))?)?;
        push("self_attn.q_proj", dw, db);
        let (dh1_k, dw, db) = linear_backward(&tape.h1, &a.k_proj, &dk.reshape((rows, nkv * d))?)?;
        push("self_attn.k_proj", dw, db);
        let (dh1_v, dw, db) = linear_backward(&tape.h1, &a.v_proj, &dv)?;
        push("self_attn.v_proj", dw, db);
        drop(tape.h1);
        let dh1 = ((dh1_q + dh1_k)? + dh1_v)?;
        let (dx, dw) = rms_norm_backward(&tape.x, &layer.input_layernorm.detach(), &dh1, layer.eps)?;
        push("input_layernorm", dw, None);
        let dx = (dx2 + dx)?.reshape((b, t, hd))?;
        Ok((dx, grads))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{Device, Var};

    use super::*;
    use crate::model::ops::tests::{max_rel, sample};
    use crate::model::{ParamMap, Qwen3Config};

    fn config() -> Qwen3Config {
        Qwen3Config::tiny(50, 32, 48, 2, 4, 2, 16, true)
    }

    /// A model whose every parameter is a variable with non-trivial values (norm weights near 1).
    fn model(cfg: &Qwen3Config, dtype: DType) -> Qwen3 {
        let mut map = ParamMap::new();
        for (i, (name, shape)) in cfg.param_shapes().into_iter().enumerate() {
            let t = sample(&shape, 100 + i as u64);
            let t = if shape.len() == 1 { (t * 0.3).unwrap() + 1.0 } else { t * 0.3 }.unwrap();
            map.insert(name, Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap().as_tensor().clone());
        }
        Qwen3::new(cfg.clone(), map).unwrap()
    }

    /// Every parameter's gradient and the input's, by hand and by autograd, through both layers
    /// and a projection of the output, on a left-padded batch with GQA.
    fn agrees_with_autograd(dtype: DType, bias: bool, tol: f32) {
        agrees_with_autograd_using(dtype, bias, false, tol)
    }

    /// [`agrees_with_autograd`], the by-hand layers' attention tiled when `flash`.
    fn agrees_with_autograd_using(dtype: DType, bias: bool, flash: bool, tol: f32) {
        let mut cfg = config();
        cfg.attention_bias = bias;
        let model = model(&cfg, dtype);
        let (b, t) = (2, 5);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
        let shared = model.layer_inputs(t, &mask).unwrap();
        let x0 = (sample(&[b, t, cfg.hidden_size], 7) * 2.0).unwrap().to_dtype(dtype).unwrap();
        let proj = sample(&[b, t, cfg.hidden_size], 8).to_dtype(dtype).unwrap();

        // Autograd.
        let xv = Var::from_tensor(&x0).unwrap();
        let mut h = xv.as_tensor().clone();
        for l in 0..cfg.num_hidden_layers {
            h = model.layer(l, &h, &shared).unwrap();
        }
        let reference_out = h.clone();
        let reference = (h * &proj).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();

        // By hand.
        let mut tapes = Vec::new();
        let mut h = x0.clone();
        let taped_inputs = shared.clone().with_flash(flash);
        for l in 0..cfg.num_hidden_layers {
            let (out, tape) = model.layer_taped(l, &h, &taped_inputs).unwrap();
            assert_eq!(matches!(tape.attention, Kept::Flash { .. }), flash, "layer {l}: which attention ran");
            tapes.push(tape);
            h = out;
        }
        if flash {
            // Tiled: the same sums in another order.
            let e = max_rel(&h, &reference_out);
            assert!(e <= tol, "the tiled taped forward differs from the plain one by {e}");
        } else {
            assert_eq!(max_rel(&h, &reference_out), 0.0, "the taped forward must equal the plain one");
        }
        let mut dy = proj.clone();
        let mut ours = BTreeMap::new();
        while let Some(tape) = tapes.pop() {
            let (dx, grads) = model.layer_backward(tape, &dy).unwrap();
            for (name, g) in grads {
                assert!(ours.insert(name.clone(), g).is_none(), "{name} twice");
            }
            dy = dx;
        }

        let layer_params: Vec<(String, Tensor)> = model
            .params()
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers."))
            .map(|(n, t)| (n.into(), t.clone()))
            .collect();
        assert_eq!(ours.len(), layer_params.len(), "one gradient per layer parameter");
        for (name, p) in &layer_params {
            let g = &ours[name];
            assert_eq!(g.dims(), p.dims(), "{name}");
            assert_eq!(g.dtype(), dtype, "{name}");
            let r = reference.get(p).unwrap_or_else(|| panic!("autograd gave {name} no gradient"));
            let e = max_rel(g, r);
            assert!(e <= tol, "{dtype:?} {name}: relative error {e} > {tol}");
        }
        let e = max_rel(&dy, reference.get(xv.as_tensor()).unwrap());
        assert!(e <= tol, "{dtype:?} input gradient: relative error {e} > {tol}");
    }

    #[test]
    fn hand_written_backward_equals_autograd_f32() {
        agrees_with_autograd(DType::F32, false, 1e-5);
    }

    #[test]
    fn hand_written_backward_with_tiled_attention_equals_autograd() {
        // The tiled attention's CPU twin (src/kernels/flash.rs) in place of the kept
        // probabilities, padded rows included. In bf16 the twin keeps scores and probabilities in
        // f32 where autograd rounds them to bf16, so the two differ by a little more than two
        // bf16 computations do (3e-2 above).
        agrees_with_autograd_using(DType::F32, false, true, 1e-5);
        agrees_with_autograd_using(DType::BF16, true, true, 5e-2);
    }

    #[test]
    fn hand_written_backward_equals_autograd_with_attention_biases() {
        agrees_with_autograd(DType::F32, true, 1e-5);
    }

    #[test]
    fn hand_written_backward_equals_autograd_bf16() {
        agrees_with_autograd(DType::BF16, false, 3e-2);
    }

    #[test]
    fn a_layer_with_lora_is_refused() {
        let cfg = config();
        let mut model = model(&cfg, DType::F32);
        let lin = model.linear_mut("model.layers.1.mlp.up_proj").unwrap();
        lin.lora = Some(crate::model::LoraAdapter {
            a: sample(&[2, cfg.hidden_size], 1),
            b: sample(&[cfg.intermediate_size, 2], 2),
            scale: 1.0,
        });
        let mask = Tensor::ones((1, 3), DType::U32, &Device::Cpu).unwrap();
        let shared = model.layer_inputs(3, &mask).unwrap();
        let x = sample(&[1, 3, cfg.hidden_size], 3);
        assert!(model.layer_taped(0, &x, &shared).is_ok());
        let err = model.layer_taped(1, &x, &shared).err().unwrap().to_string();
        assert!(err.contains("layer 1 has LoRA adapters"), "{err}");
    }
}
