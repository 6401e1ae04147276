//! The Qwen3 decoder, differentiable end to end, for left-padded batches.
//!
//! Unlike candle-transformers' `qwen3` (fused ops without backward, a KV cache, no padding mask),
//! this model recomputes the whole sequence each call, takes an attention mask, and builds every
//! op from [`super::ops`], so `loss.backward()` reaches every parameter.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor, Var};

use super::config::Qwen3Config;
use super::fused::{attention, qk_norm_rope, rms_norm, swiglu};
use super::ops::{attention_bias, Linear, RopeTables};
use super::ModelError;

/// The model's parameters by Hugging Face tensor name (`model.layers.0.self_attn.q_proj.weight`…).
///
/// A tensor that is a candle variable is trainable; [`ParamMap::vars`] hands those to an optimizer
/// and `GradStore::get(var.as_tensor())` finds each one's gradient. The modules hold clones of the
/// same tensors (shared storage, same id), so `Var::set` by an optimizer updates the model in place.
#[derive(Debug, Clone, Default)]
pub struct ParamMap {
    tensors: BTreeMap<String, Tensor>,
}

impl ParamMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// In name order, which is the order checkpoints are written in.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The trainable parameters (those held as variables), by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.tensors
            .iter()
            .filter(|(_, t)| t.is_variable())
            .map(|(k, t)| (k.clone(), Var::from_tensor(t).expect("a variable converts to Var without copying")))
            .collect()
    }

    /// Turns every parameter into a variable. This copies each tensor once (candle cannot adopt
    /// a plain tensor's storage as a variable), one at a time, so peak memory grows by one tensor.
    pub fn into_trainable(self) -> Result<Self, ModelError> {
        let mut out = BTreeMap::new();
        for (k, t) in self.tensors {
            let v = Var::from_tensor(&t)?;
            drop(t);
            out.insert(k, v.as_tensor().clone());
        }
        Ok(Self { tensors: out })
    }

    /// The same storage without gradient tracking: for evaluation during training, so the forward
    /// pass does not keep its whole graph alive. Costs no copy; sees later optimizer updates.
    pub fn detached(&self) -> Self {
        Self { tensors: self.tensors.iter().map(|(k, t)| (k.clone(), t.detach())).collect() }
    }

    /// Casts every parameter (a copy for each one whose dtype differs).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ModelError> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.tensors {
            out.insert(k.clone(), t.to_dtype(dtype)?.detach());
        }
        Ok(Self { tensors: out })
    }
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
    pub(super) q_norm: Tensor,
    pub(super) k_norm: Tensor,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) eps: f64,
}

impl Attention {
    /// `x: [B, T, H]` → `[B, T, H]`. RMSNorm, RoPE and the attention core are the fused ops of
    /// [`super::fused`], whose backward passes recompute instead of keeping `T × T` tensors.
    fn forward(&self, x: &Tensor, rope: &RopeTables, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = qk_norm_rope(&self.q_proj.forward(x)?.reshape((b, t, nh, d))?, &self.q_norm, rope, self.eps)?;
        let k = qk_norm_rope(&self.k_proj.forward(x)?.reshape((b, t, nkv, d))?, &self.k_norm, rope, self.eps)?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, d))?.transpose(1, 2)?.contiguous()?;
        let out = attention(&q, &k, &v, bias, (d as f64).powf(-0.5))?;
        self.o_proj.forward(&out.transpose(1, 2)?.reshape((b, t, nh * d))?)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gated = swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    pub(super) input_layernorm: Tensor,
    pub(super) post_attention_layernorm: Tensor,
    pub(super) self_attn: Attention,
    pub(super) mlp: Mlp,
    pub(super) eps: f64,
}

impl DecoderLayer {
    fn forward(&self, x: &Tensor, rope: &RopeTables, bias: &Tensor) -> candle_core::Result<Tensor> {
        let h = rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&h, rope, bias)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        x + self.mlp.forward(&h)?
    }
}

/// The rotary tables and attention bias of one forward pass: built once per batch, not per layer.
#[derive(Debug, Clone)]
pub struct LayerInputs {
    pub(super) rope: RopeTables,
    pub(super) bias: Tensor,
    /// The `[B, T]` mask (1 = real token) as given: what the tiled attention reads instead of `bias`.
    pub(super) key_mask: Tensor,
    /// Whether the hand-written backward's layers use the tiled attention
    /// ([`crate::kernels::flash`]), which keeps one log-sum-exp per row instead of the `T × T`
    /// probabilities. Off by default until it is measured on a GPU; see [`Self::with_flash`].
    pub(super) flash: bool,
}

impl LayerInputs {
    /// Switches the tiled attention on for [`Qwen3::layer_taped`] where it applies (a CUDA
    /// device with bf16 or f16 and head_dim 64 or 128, or the CPU); elsewhere the layers keep
    /// the materialising attention.
    pub fn with_flash(mut self, on: bool) -> Self {
        self.flash = on;
        self
    }
}

/// A Qwen3 decoder (`Qwen3ForCausalLM` without the full-vocabulary head).
#[derive(Debug, Clone)]
pub struct Qwen3 {
    cfg: Qwen3Config,
    params: ParamMap,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `lm_head.weight`, or the embedding when `tie_word_embeddings`.
    lm_head: Tensor,
}

impl Qwen3 {
    /// Builds the model over `params`, which must hold exactly the tensors
    /// [`Qwen3Config::param_shapes`] lists, with those shapes and one float dtype.
    pub fn new(cfg: Qwen3Config, params: ParamMap) -> Result<Self, ModelError> {
        let expected = cfg.param_shapes();
        let dtype = params.get("model.embed_tokens.weight").map(|t| t.dtype()).unwrap_or(DType::F32);
        for (name, shape) in &expected {
            let t = params.get(name).ok_or_else(|| ModelError::MissingTensor {
                name: name.clone(),
                location: "the parameter map".into(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: t.dims().to_vec(),
                });
            }
            if t.dtype() != dtype {
                return Err(ModelError::Input(format!(
                    "parameter `{name}` is {:?} but the embedding is {dtype:?}; cast all to one dtype",
                    t.dtype()
                )));
            }
        }
        if params.len() != expected.len() {
            let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
            let extra: Vec<&str> = params.iter().map(|(n, _)| n).filter(|n| !known.contains(n)).collect();
            return Err(ModelError::Input(format!("parameters not used by this config: {extra:?}")));
        }
        let p = |name: &str| params.get(name).cloned().expect("checked above");
        let linear = |name: &str| {
            Linear::new(
                p(&format!("{name}.weight")),
                cfg.attention_bias.then(|| params.get(&format!("{name}.bias")).cloned()).flatten(),
            )
        };
        let plain = |name: &str| Linear::new(p(&format!("{name}.weight")), None);
        let eps = cfg.rms_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let pre = format!("model.layers.{l}");
                DecoderLayer {
                    input_layernorm: p(&format!("{pre}.input_layernorm.weight")),
                    post_attention_layernorm: p(&format!("{pre}.post_attention_layernorm.weight")),
                    self_attn: Attention {
                        q_proj: linear(&format!("{pre}.self_attn.q_proj")),
                        k_proj: linear(&format!("{pre}.self_attn.k_proj")),
                        v_proj: linear(&format!("{pre}.self_attn.v_proj")),
                        o_proj: linear(&format!("{pre}.self_attn.o_proj")),
                        q_norm: p(&format!("{pre}.self_attn.q_norm.weight")),
                        k_norm: p(&format!("{pre}.self_attn.k_norm.weight")),
                        num_heads: cfg.num_attention_heads,
                        num_kv_heads: cfg.num_key_value_heads,
                        head_dim: cfg.head_dim,
                        eps,
                    },
                    mlp: Mlp {
                        gate_proj: plain(&format!("{pre}.mlp.gate_proj")),
                        up_proj: plain(&format!("{pre}.mlp.up_proj")),
                        down_proj: plain(&format!("{pre}.mlp.down_proj")),
                    },
                    eps,
                }
            })
            .collect();
        let embed_tokens = p("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings { embed_tokens.clone() } else { p("lm_head.weight") };
        Ok(Self { norm: p("model.norm.weight"), embed_tokens, layers, lm_head, params, cfg })
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    pub fn params(&self) -> &ParamMap {
        &self.params
    }

    /// Trainable parameters by HF name; see [`ParamMap::vars`].
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.params.vars()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// A copy of the model that shares all weights (LoRA adapters included) but records no
    /// gradient graph.
    pub fn detached(&self) -> Result<Self, ModelError> {
        let mut m = Self::new(self.cfg.clone(), self.params.detached())?;
        m.copy_lora_from(self, true);
        Ok(m)
    }

    /// Every base parameter turned into a trainable variable (one copy per tensor); attached LoRA
    /// adapters are kept as they are.
    pub fn into_trainable(self) -> Result<Self, ModelError> {
        let mut m = Self::new(self.cfg.clone(), self.params.clone().into_trainable()?)?;
        m.copy_lora_from(&self, false);
        Ok(m)
    }

    fn copy_lora_from(&mut self, src: &Self, detach: bool) {
        for (dst, src) in self.layers.iter_mut().zip(&src.layers) {
            for (d, s) in dst.linears_mut().into_iter().zip(src.linears()) {
                d.lora = s.lora.as_ref().map(|l| super::ops::LoraAdapter {
                    a: if detach { l.a.detach() } else { l.a.clone() },
                    b: if detach { l.b.detach() } else { l.b.clone() },
                    scale: l.scale,
                });
            }
        }
    }

    /// The linear layer called `module` in HF naming (e.g. `model.layers.3.self_attn.q_proj`,
    /// `model.layers.0.mlp.down_proj`), for attaching a LoRA adapter.
    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        let rest = module.strip_prefix("model.layers.")?;
        let (idx, name) = rest.split_once('.')?;
        let layer = self.layers.get_mut(idx.parse::<usize>().ok()?)?;
        let a = &mut layer.self_attn;
        let m = &mut layer.mlp;
        match name {
            "self_attn.q_proj" => Some(&mut a.q_proj),
            "self_attn.k_proj" => Some(&mut a.k_proj),
            "self_attn.v_proj" => Some(&mut a.v_proj),
            "self_attn.o_proj" => Some(&mut a.o_proj),
            "mlp.gate_proj" => Some(&mut m.gate_proj),
            "mlp.up_proj" => Some(&mut m.up_proj),
            "mlp.down_proj" => Some(&mut m.down_proj),
            _ => None,
        }
    }

    /// Checks the inputs and brings them to the forms the forward pass needs: ids as u32 (any
    /// integer dtype accepted), and the mask's shape.
    fn check_inputs(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t) =
            ids.dims2().map_err(|_| ModelError::Input(format!("ids must be [batch, seq], got {:?}", ids.dims())))?;
        if b == 0 || t == 0 {
            return Err(ModelError::Input("empty batch".into()));
        }
        if attention_mask.dims() != ids.dims() {
            return Err(ModelError::Input(format!(
                "attention_mask {:?} must have the shape of ids {:?}",
                attention_mask.dims(),
                ids.dims()
            )));
        }
        if ids.dtype().is_float() {
            return Err(ModelError::Input("ids must be an integer tensor".into()));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(self.device())?;
        let max = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        Ok(ids)
    }

    /// Hidden states after the last decoder layer, BEFORE the final norm: `[B, T, hidden]`.
    ///
    /// `ids: [B, T]` integer token ids; `attention_mask: [B, T]` with 1 for real tokens and 0 for
    /// padding (any dtype). Positions are `0..T-1` for every row (see the module docs).
    pub fn hidden_states(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let ids = self.check_inputs(ids, attention_mask)?;
        let (b, t) = ids.dims2()?;
        let h = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        self.decode(h, attention_mask)
    }

    /// [`Self::hidden_states`] from input embeddings `[B, T, hidden]` (in the model's dtype) instead
    /// of token ids. A trainer gathers the embedding rows a batch uses into a variable of its own
    /// and passes them through here, so that the backward pass yields a gradient for those rows
    /// only rather than a dense `[vocab, hidden]` one (151,669 rows for Qwen3).
    pub fn hidden_states_from_embeds(&self, embeds: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t, h) = embeds
            .dims3()
            .map_err(|_| ModelError::Input(format!("embeds must be [batch, seq, hidden], got {:?}", embeds.dims())))?;
        if h != self.cfg.hidden_size || attention_mask.dims() != [b, t] || b == 0 || t == 0 {
            return Err(ModelError::Input(format!(
                "embeds {:?} and attention_mask {:?} must be [B, T, {}] and [B, T] with B, T > 0",
                embeds.dims(),
                attention_mask.dims(),
                self.cfg.hidden_size
            )));
        }
        if embeds.dtype() != self.dtype() {
            return Err(ModelError::Input(format!("embeds are {:?}, the model is {:?}", embeds.dtype(), self.dtype())));
        }
        self.decode(embeds.clone(), attention_mask)
    }

    fn decode(&self, mut h: Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let shared = self.layer_inputs(h.dim(1)?, attention_mask)?;
        for layer in &self.layers {
            h = layer.forward(&h, &shared.rope, &shared.bias)?;
        }
        Ok(h)
    }

    /// Decoder layers, for callers that run them one at a time ([`Self::layer`]).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// What every layer of one forward pass over `seq_len` positions shares, for [`Self::layer`].
    pub fn layer_inputs(&self, seq_len: usize, attention_mask: &Tensor) -> Result<LayerInputs, ModelError> {
        let rope = RopeTables::new(seq_len, self.cfg.head_dim, self.cfg.rope_theta, self.dtype(), self.device())?;
        let key_mask = attention_mask.to_device(self.device())?;
        let bias = attention_bias(&key_mask)?;
        Ok(LayerInputs { rope, bias, key_mask, flash: false })
    }

    /// Decoder layer `index` alone: `[B, T, hidden]` → `[B, T, hidden]`. Chaining every layer over
    /// the embeddings is exactly [`Self::hidden_states_from_embeds`]; a trainer that recomputes
    /// activations runs them one by one, keeping only each layer's input between passes.
    pub fn layer(&self, index: usize, h: &Tensor, shared: &LayerInputs) -> Result<Tensor, ModelError> {
        Ok(self.decoder_layer(index)?.forward(h, &shared.rope, &shared.bias)?)
    }

    pub(super) fn decoder_layer(&self, index: usize) -> Result<&DecoderLayer, ModelError> {
        self.layers.get(index).ok_or_else(|| {
            ModelError::Input(format!("layer {index} does not exist; the model has {}", self.layers.len()))
        })
    }

    /// The final RMSNorm, applied to any `[..., hidden]` slice of [`Self::hidden_states`] (the
    /// reranker applies it to the last position only).
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor, ModelError> {
        Ok(rms_norm(h, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// Final-normed hidden states `[B, T, hidden]`: what transformers calls `last_hidden_state`.
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let h = self.hidden_states(ids, attention_mask)?;
        self.final_norm(&h)
    }

    /// Rows of the output projection (`lm_head`, or the embedding when tied) for the given token
    /// ids: `[n, hidden]`. Gathered rather than projecting onto the whole vocabulary.
    pub fn lm_head_rows(&self, token_ids: &[u32]) -> Result<Tensor, ModelError> {
        if let Some(bad) = token_ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let idx = Tensor::new(token_ids, self.device())?;
        Ok(self.lm_head.index_select(&idx, 0)?)
    }
}

impl DecoderLayer {
    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }
}
