//! One model being trained: its trainable parameters, their f32 master copies and AdamW moments,
//! gradient accumulation, clipping and the update. The loop around it lives in
//! [`super::trainer`].
//!
//! # Where the numbers live
//!
//! The model computes in `dtype` (f32, bf16 or f16) and reads each trainable parameter from a
//! candle `Var`. The optimizer keeps an f32 master copy of every trainable parameter plus both
//! Adam moments, whatever the compute dtype:
//!
//! - on the CPU, as flat `Vec<f32>` buffers updated by the loops of [`super::optim`] (for f32
//!   compute the `Var`'s own storage is the master, updated in place through a candle in-place
//!   op, so nothing is copied);
//! - on a GPU, as one f32 tensor per parameter (master | m | v) updated in place by one fused
//!   kernel ([`crate::kernels::adamw`]).
//!
//! After each update the master is written back into the `Var` in the compute dtype.
//!
//! # The embedding
//!
//! A batch touches a few hundred of the embedding's rows (151,669 for Qwen3). Left to autograd,
//! `index_select`'s backward would build a dense `[vocab, hidden]` gradient (twice with tied
//! embeddings). Instead each micro-batch gathers the rows it uses (plus the yes/no rows of the
//! head) into a small leaf variable and feeds the decoder embeddings
//! ([`Qwen3::hidden_states_from_embeds`]); the leaf's gradient (with the hand-written layer
//! backward: each position's gradient directly, [`crate::kernels::scatter`] on a device) is scattered into
//! the accumulation buffer and the touched rows are remembered, which is also what lets
//! [`super::optim::adamw_rows`] skip the Adam arithmetic on rows whose moments are still zero.
//! On the CPU in f32, rows never touched do not even get their weight decay each step: the
//! factors are recorded and applied, in order, when the row is next read (a batch gathers it,
//! or [`Learner::sync`] before validation, checkpoints and export) — bit for bit the eager result.
//!
//! # The backward pass
//!
//! In full mode the decoder layers are differentiated by hand ([`crate::model::backward`]): the
//! forward keeps each layer's tape (with `recompute`, only its input, and re-runs the layer in the
//! backward pass), autograd runs only from the top hidden states through the head and the loss,
//! and the layers' gradients come back by parameter name. LoRA, whose adapters the hand-written
//! backward does not cover, uses autograd throughout; so does [`Learner::set_autograd_layers`].
//!
//! # Accumulation
//!
//! Each micro-batch's loss is the SUM of its per-unit losses divided by the number of units in the
//! whole accumulation group, so that the accumulated gradient is that of the group's mean loss:
//! `batch_size × grad_accum` rows in micro-batches behave as one batch of that size.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::HostTensor;
use super::config::{Mode, OptimizerBackend, TrainConfig};
use super::data::{pad_left, MicroBatch};
use super::lora::{adapter_specs, check_modules, init_a, merge, AdapterSpec};
use super::optim::{adamw_dense, adamw_rows, apply_pending_decay, clip_factor, sum_squares, RowState, StepScalars};
use super::TrainError;
use crate::kernels::adamw::{FusedAdamW, SumSquaresInto, WriteMaster};
use crate::kernels::{contiguous_range, write_f32};
use crate::model::backward::LayerTape;
use crate::model::{LoraAdapter, LoraDropout, ParamMap, Qwen3, Reranker};
use crate::text::TokenStore;
use crate::util::rng::stream;

const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Weight decay applies to matrices, not to norm weights or biases (transformers' Trainer rule).
pub fn takes_weight_decay(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

struct HostState {
    /// `None`: the `Var` is f32 on the CPU and its storage is the master.
    master: Option<Vec<f32>>,
    m: Vec<f32>,
    v: Vec<f32>,
    grad: Vec<f32>,
    has_grad: bool,
    /// Row-sparse parameters only: rows that ever had a gradient, and rows touched this step.
    live: Vec<bool>,
    touched: Vec<bool>,
    touched_rows: Vec<usize>,
    /// Deferred weight decay of never-live rows (row-sparse parameters whose master is the `Var`).
    lazy: Option<LazyDecay>,
}

/// Decay factors of the steps since the last full catch-up, and how many of them each row has had.
struct LazyDecay {
    factors: Vec<f32>,
    applied: Vec<u32>,
}

/// Optimizer state on the compute device: master weights and both moments in one f32 buffer
/// `[3 × n]` (master | m | v), so that [`FusedAdamW`] updates all three in one in-place pass.
struct DeviceState {
    packed: Tensor,
    shape: Vec<usize>,
    grad: Option<Tensor>,
}

impl DeviceState {
    fn new(master: &Tensor) -> candle_core::Result<Self> {
        let flat = master.to_dtype(DType::F32)?.flatten_all()?;
        let zeros = flat.zeros_like()?;
        Ok(Self { packed: Tensor::cat(&[&flat, &zeros, &zeros], 0)?, shape: master.dims().to_vec(), grad: None })
    }

    /// Part `k` (0 master, 1 m, 2 v) as a flat view.
    fn part(&self, k: usize) -> candle_core::Result<Tensor> {
        let n = self.packed.dim(0)? / 3;
        self.packed.narrow(0, k * n, n)
    }
}

enum State {
    Host(HostState),
    Device(DeviceState),
}

struct Param {
    name: String,
    shape: Vec<usize>,
    var: Var,
    decay: bool,
    /// Gradient arrives as rows (embedding, untied head) rather than from autograd on the `Var`.
    rows: bool,
    state: State,
}

/// Dynamic loss scaling for f16 (as torch.amp.GradScaler): multiply the loss so small gradients
/// survive f16, skip steps whose gradients overflow and halve the scale, double it after 2000
/// clean steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub good_steps: u32,
}

impl LossScaler {
    const GROWTH_INTERVAL: u32 = 2000;
    fn new() -> Self {
        Self { scale: 65536.0, good_steps: 0 }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The f16 loss scaler found an overflow and skipped the update.
    pub skipped: bool,
}

type Kernel<'a> = &'a mut dyn FnMut(&mut [f32]);

/// In-place update of an f32 CPU storage (the master itself) by a closure.
struct UpdateInPlace<'a>(RefCell<Kernel<'a>>);

impl InplaceOp1 for UpdateInPlace<'_> {
    fn name(&self) -> &'static str {
        "pipe-adamw-in-place"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let range = contiguous_range(layout, "in-place AdamW", "the parameter")?;
        match storage {
            CpuStorage::F32(data) => {
                (self.0.borrow_mut())(&mut data[range]);
                Ok(())
            }
            _ => Err(candle_core::Error::Msg("in-place AdamW needs f32 storage".into())),
        }
    }
}

/// Copies an f32 master into a CPU storage of any float dtype.
struct WriteBack<'a>(&'a [f32]);

impl InplaceOp1 for WriteBack<'_> {
    fn name(&self) -> &'static str {
        "pipe-write-back"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let range = contiguous_range(layout, "write-back", "the parameter")?;
        if range.len() != self.0.len() {
            return Err(candle_core::Error::Msg("write-back length mismatch".into()));
        }
        write_f32(storage, range.start, self.0)
    }
}

/// The trainable state of one model.
pub struct Learner {
    model: Qwen3,
    yes: u32,
    no: u32,
    params: Vec<Param>,
    embed: Option<usize>,
    head: Option<usize>,
    adapters: Vec<AdapterSpec>,
    lora_scale: f64,
    dropout: Option<Arc<AtomicU64>>,
    cfg: TrainConfig,
    step: u64,
    dtype: DType,
    device: Device,
    scaler: Option<LossScaler>,
    matching: Option<super::Matching>,
    /// Index into `params` by name.
    by_name: HashMap<String, usize>,
    /// Differentiate the decoder layers with autograd even where the hand-written backward
    /// applies (the reference the tests and `pipe bench` compare it with).
    autograd_layers: bool,
}

/// What the forward pass keeps of one layer for the hand-written backward.
enum Saved {
    Tape(LayerTape),
    /// With recomputation: only the input, from which the backward re-runs the layer.
    Input(Tensor),
}

/// The result of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroReport {
    /// This micro-batch's share of the group's mean loss (sum of its losses / group units).
    pub loss: f64,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Padded positions computed (batch × longest prompt).
    pub padded_tokens: usize,
    /// This micro-batch's share of the group's mean token-matching loss (unweighted; 0 when off).
    pub match_loss: f64,
}

impl Learner {
    /// Takes a loaded model (any dtype; f32 keeps the master weights exact) and prepares it for
    /// training in `dtype` on the model's device. `yes`/`no` are the head's token ids.
    pub fn new(model: Qwen3, yes: u32, no: u32, cfg: &TrainConfig, dtype: DType) -> Result<Self, TrainError> {
        cfg.validate()?;
        super::tune_allocator();
        let vocab = model.config().vocab_size;
        if yes as usize >= vocab || no as usize >= vocab || yes == no {
            return Err(TrainError::Config(format!(
                "yes/no token ids {yes}/{no} do not fit the model's vocabulary of {vocab}"
            )));
        }
        let device = model.device().clone();
        let host = match cfg.backend {
            OptimizerBackend::Auto => device.is_cpu(),
            OptimizerBackend::Host if !device.is_cpu() => {
                return Err(TrainError::Config("the host optimizer backend needs a CPU model".into()))
            }
            OptimizerBackend::Host => true,
            OptimizerBackend::Tensor => false,
        };
        let qcfg = model.config().clone();
        let full = matches!(cfg.mode, Mode::Full);
        let mut map = ParamMap::new();
        let mut params = Vec::new();
        for (name, t) in model.params().iter() {
            let trainable = full && !(cfg.freeze_embeddings && name == EMBED);
            let compute = t.to_dtype(dtype)?.detach();
            if !trainable {
                map.insert(name, compute);
                continue;
            }
            let var = Var::from_tensor(&compute)?;
            map.insert(name, var.as_tensor().clone());
            let rows = name == EMBED || name == LM_HEAD;
            params.push(Param {
                name: name.to_string(),
                shape: t.dims().to_vec(),
                decay: takes_weight_decay(name),
                rows,
                state: new_state(t, rows, host, dtype)?,
                var,
            });
        }
        drop(model);
        let mut model = Qwen3::new(qcfg.clone(), map)?;

        let (mut adapters, mut lora_scale, mut dropout) = (Vec::new(), 0.0, None);
        if let Mode::Lora(l) = &cfg.mode {
            adapters = adapter_specs(&qcfg, &l.target_modules);
            check_modules(&mut model, &adapters)?;
            lora_scale = l.scale();
            let stream = (l.dropout > 0.0).then(|| Arc::new(AtomicU64::new(0)));
            for spec in &adapters {
                let a = Tensor::from_vec(init_a(cfg.seed, spec, l.r), (l.r, spec.in_features), &device)?;
                let b = Tensor::zeros((spec.out_features, l.r), DType::F32, &device)?;
                let mut vars = Vec::new();
                for (name, t) in [(spec.a_name(), a), (spec.b_name(), b)] {
                    let var = Var::from_tensor(&t.to_dtype(dtype)?.detach())?;
                    vars.push(var.as_tensor().clone());
                    params.push(Param {
                        shape: t.dims().to_vec(),
                        state: new_state(&t, false, host, dtype)?,
                        name,
                        var,
                        decay: true,
                        rows: false,
                    });
                }
                let linear = model.linear_mut(&spec.module).expect("checked above");
                linear.lora = Some(LoraAdapter { a: vars[0].clone(), b: vars[1].clone(), scale: lora_scale });
                linear.lora_dropout = stream.as_ref().map(|s| LoraDropout { p: l.dropout, stream: s.clone() });
            }
            dropout = stream;
        }
        let embed = params.iter().position(|p| p.name == EMBED);
        let head = params.iter().position(|p| p.name == LM_HEAD);
        let by_name = params.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        Ok(Self {
            model,
            yes,
            no,
            params,
            embed,
            head,
            adapters,
            lora_scale,
            dropout,
            cfg: cfg.clone(),
            step: 0,
            dtype,
            device,
            scaler: (dtype == DType::F16).then(LossScaler::new),
            matching: None,
            by_name,
            autograd_layers: false,
        })
    }

    /// Differentiates the decoder layers with candle's autograd instead of the hand-written
    /// backward (which full fine-tuning uses by default; LoRA always uses autograd). Same
    /// gradients up to rounding; for comparisons.
    pub fn set_autograd_layers(&mut self, on: bool) {
        self.autograd_layers = on;
    }

    /// Switches on the auxiliary token-matching loss, weighted by the config's `match_loss`.
    pub fn set_matching(&mut self, matching: super::Matching) {
        self.matching = Some(matching);
    }

    /// The model as it computes now (trainable tensors are views of the current weights). Rows of
    /// the embedding a batch has not used lately may lack their latest weight decay until
    /// [`Self::sync`].
    pub fn model(&self) -> &Qwen3 {
        &self.model
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Names of the trainable parameters (LoRA adapters as `<module>.lora_A.weight` / `lora_B`).
    pub fn trainable(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    pub fn trainable_count(&self) -> usize {
        self.params.iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }

    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.scaler
    }

    /// Forward and backward of one micro-batch; its gradient is added to the accumulation
    /// buffers. `denom` is the number of loss units in the whole accumulation group;
    /// `micro_key` numbers the micro-batch within the run (it seeds LoRA dropout masks).
    pub fn accumulate(
        &mut self,
        store: &TokenStore,
        micro: &MicroBatch,
        denom: usize,
        micro_key: u64,
        inject_nan: bool,
    ) -> Result<MicroReport, TrainError> {
        let padded = pad_left(store, &micro.rows, &self.device)?;
        let (b, t) = (micro.rows.len(), padded.seq_len);
        let hidden = self.model.config().hidden_size;
        if let Some(s) = &self.dropout {
            s.store(stream(self.cfg.seed, "lora dropout", micro_key), Ordering::SeqCst);
        }
        let tied = self.model.config().tie_word_embeddings;
        let head_ids = [self.yes, self.no];

        // Gather the embedding rows this batch uses into a leaf of its own (see the module docs).
        let mut embed_leaf: Option<(Var, Vec<u32>)> = None;
        if let Some(h) = self.head {
            self.catch_up(h, Some(&head_ids))?;
        }
        let embeds = match self.embed {
            Some(e) => {
                let mut uniq = padded.flat_ids.clone();
                if tied {
                    uniq.extend(head_ids);
                }
                uniq.sort_unstable();
                uniq.dedup();
                self.catch_up(e, Some(&uniq))?;
                let table = self.params[e].var.as_tensor().detach();
                let leaf =
                    Var::from_tensor(&table.index_select(&Tensor::from_slice(&uniq, uniq.len(), &self.device)?, 0)?)?;
                let local: Vec<u32> =
                    padded.flat_ids.iter().map(|id| uniq.binary_search(id).expect("id is in uniq") as u32).collect();
                let x = leaf.as_tensor().index_select(&Tensor::from_vec(local, b * t, &self.device)?, 0)?;
                embed_leaf = Some((leaf, uniq));
                x.reshape((b, t, hidden))?
            }
            None => {
                let table = self.model.params().get(EMBED).expect("every Qwen3 has an embedding");
                table.index_select(&padded.ids.flatten_all()?, 0)?.reshape((b, t, hidden))?
            }
        };
        let mut head_leaf: Option<Var> = None;
        let head = match (&embed_leaf, self.head) {
            (Some((leaf, uniq)), _) if tied => {
                let pos: Vec<u32> = head_ids.iter().map(|id| uniq.binary_search(id).expect("added") as u32).collect();
                leaf.as_tensor().index_select(&Tensor::from_vec(pos, 2, &self.device)?, 0)?
            }
            (_, Some(h)) => {
                let table = self.params[h].var.as_tensor().detach();
                let leaf = Var::from_tensor(&table.index_select(&Tensor::new(&head_ids, &self.device)?, 0)?)?;
                let x = leaf.as_tensor().clone();
                head_leaf = Some(leaf);
                x
            }
            _ => self.model.lm_head_rows(&head_ids)?,
        };

        // The loss of the group's mean, scaled for f16, from the last layer's hidden states.
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        let step = self.step + 1;
        let matching = match &self.matching {
            Some(m) if self.cfg.match_loss > 0.0 => Some(m.batch(store, &micro.rows, t, &self.device)?),
            _ => None,
        };
        let match_value = std::cell::Cell::new(0.0f64);
        let head_loss = |model: &Qwen3, h: &Tensor| -> Result<(Tensor, f64), TrainError> {
            let mut sum = if let Some((y, w)) = &matching {
                // The same yes/no head read at every position: "is this document token in the
                // query" shares the direction of "is this document relevant" (see super::matching).
                let all = model.final_norm(h)?.reshape((b * t, hidden))?;
                let logits = all.matmul(&head.t()?)?;
                let z = (logits.narrow(1, 0, 1)? - logits.narrow(1, 1, 1)?)?.reshape((b, t))?;
                let aux = super::matching::weighted_bce_sum(&z, y, w)?;
                match_value.set(aux.to_scalar::<f32>()? as f64 / denom.max(1) as f64);
                let logit = z.narrow(1, t - 1, 1)?.squeeze(1)?;
                let main = super::loss::micro_loss(self.cfg.loss, &logit, store, &micro.rows)?;
                (main + aux.affine(self.cfg.match_loss, 0.0)?)?
            } else {
                let last = model.final_norm(&h.narrow(1, t - 1, 1)?.squeeze(1)?)?;
                let logits = last.matmul(&head.t()?)?;
                let logit = (logits.narrow(1, 0, 1)? - logits.narrow(1, 1, 1)?)?.squeeze(1)?;
                super::loss::micro_loss(self.cfg.loss, &logit, store, &micro.rows)?
            };
            if inject_nan {
                sum = sum.affine(f64::NAN, 0.0)?;
            }
            let scaled = sum.affine(scale / denom.max(1) as f64, 0.0)?;
            // Reported: the training objective alone, comparable with the validation loss.
            let value = scaled.to_scalar::<f32>()? as f64 / scale - self.cfg.match_loss * match_value.get();
            if !value.is_finite() {
                return Err(TrainError::NonFinite { step, what: "loss", value, last_checkpoint: None });
            }
            Ok((scaled, value))
        };

        // Gradients of the gathered rows, summed over the backward passes that reach them.
        let (value, embed_grad, head_grad) = if self.adapters.is_empty() && !self.autograd_layers {
            // Full fine-tuning: each layer's backward by hand (crate::model::backward); autograd
            // only from the top hidden states to the loss. With recomputation the forward keeps
            // each layer's input and the backward re-runs the layer to get its tape.
            let shared = self.model.layer_inputs(t, &padded.mask)?;
            let n = self.model.num_layers();
            let mut saved = Vec::with_capacity(n);
            let mut h = embeds.detach();
            for l in 0..n {
                let (out, tape) = self.model.layer_taped(l, &h, &shared)?;
                saved.push(if self.cfg.recompute { Saved::Input(h) } else { Saved::Tape(tape) });
                h = out;
            }
            let top = Var::from_tensor(&h)?;
            drop(h);
            let (scaled, value) = head_loss(&self.model, top.as_tensor())?;
            let [embed_grad, head_grad, mut g] =
                self.backward_to_top(&scaled, &top, embed_leaf.as_ref().map(|(leaf, _)| leaf), head_leaf.as_ref())?;
            for l in (0..n).rev() {
                let Some(dy) = g.take() else { break };
                let tape = match saved.pop().expect("one entry per layer") {
                    Saved::Tape(tape) => tape,
                    Saved::Input(x) => self.model.layer_taped(l, &x, &shared)?.1,
                };
                let (dx, layer_grads) = self.model.layer_backward(tape, &dy)?;
                for (name, grad) in layer_grads {
                    if let Some(&i) = self.by_name.get(&name) {
                        add_dense(&mut self.params[i].state, &grad)?;
                    }
                }
                g = Some(dx);
            }
            // The embedding lookup's backward: each position's gradient goes straight into its
            // row of the accumulator (with the gathered rows' own gradient, from a tied head,
            // added below).
            if let (Some(e), Some(dx)) = (self.embed, &g) {
                add_rows(
                    &mut self.params[e].state,
                    &padded.flat_ids,
                    &dx.reshape((b * t, hidden))?,
                    hidden,
                    &self.device,
                )?;
            }
            (value, embed_grad, head_grad)
        } else if !self.cfg.recompute {
            let h = self.model.hidden_states_from_embeds(&embeds, &padded.mask)?;
            let (scaled, value) = head_loss(&self.model, &h)?;
            let grads = scaled.backward()?;
            self.add_param_grads(&grads)?;
            let embed_grad = embed_leaf.as_ref().and_then(|(leaf, _)| grads.get(leaf.as_tensor()).cloned());
            let head_grad = head_leaf.as_ref().and_then(|leaf| grads.get(leaf.as_tensor()).cloned());
            (value, embed_grad, head_grad)
        } else {
            // Activation recomputation: the forward pass keeps only each layer's input; the
            // backward pass re-runs one layer at a time and back-propagates the gradient of its
            // output through it (the gradient of Σ out ⊙ g with respect to anything upstream of
            // `out` is exactly what the full graph would deliver). Same ops, same order: the
            // same gradients as without recomputation, for one layer's activations of memory.
            let shared = self.model.layer_inputs(t, &padded.mask)?;
            let n = self.model.num_layers();
            let mut inputs = Vec::with_capacity(n);
            // LoRA dropout draws from a counter: replay each layer with the masks it drew.
            let mut counters = Vec::with_capacity(n);
            let mut h = embeds.detach();
            for l in 0..n {
                counters.push(self.dropout.as_ref().map(|s| s.load(Ordering::SeqCst)));
                let out = self.model.layer(l, &h, &shared)?.detach();
                inputs.push(h);
                h = out;
            }
            let top = Var::from_tensor(&h)?;
            drop(h);
            let (scaled, value) = head_loss(&self.model, top.as_tensor())?;
            let [mut embed_grad, head_grad, mut g] =
                self.backward_to_top(&scaled, &top, embed_leaf.as_ref().map(|(leaf, _)| leaf), head_leaf.as_ref())?;
            for l in (0..n).rev() {
                let Some(grad_out) = g.take() else { break };
                let input = inputs.pop().expect("one input per layer");
                let leaf = if l > 0 { Some(Var::from_tensor(&input)?) } else { None };
                let x = match &leaf {
                    Some(v) => v.as_tensor().clone(),
                    None => embeds.clone(),
                };
                if let (Some(s), Some(c)) = (&self.dropout, counters[l]) {
                    s.store(c, Ordering::SeqCst);
                }
                let out = self.model.layer(l, &x, &shared)?;
                // Summed over the hidden size first: candle's CUDA reduction gives each output one
                // block, so a whole-tensor sum would run on one; the gradient is the same.
                let grads = out.mul(&grad_out)?.sum(candle_core::D::Minus1)?.sum_all()?.backward()?;
                self.add_param_grads(&grads)?;
                match &leaf {
                    Some(v) => g = grads.get(v.as_tensor()).cloned(),
                    None => {
                        if let Some((e, _)) = &embed_leaf {
                            if let Some(ge) = grads.get(e.as_tensor()) {
                                // Addition commutes exactly: the same sum autograd forms.
                                embed_grad = Some(match embed_grad.take() {
                                    Some(acc) => (acc + ge)?,
                                    None => ge.clone(),
                                });
                            }
                        }
                    }
                }
            }
            (value, embed_grad, head_grad)
        };
        if let (Some(e), Some((_, uniq)), Some(g)) = (self.embed, &embed_leaf, &embed_grad) {
            add_rows(&mut self.params[e].state, uniq, g, hidden, &self.device)?;
        }
        if let (Some(h), Some(g)) = (self.head, &head_grad) {
            add_rows(&mut self.params[h].state, &head_ids, g, hidden, &self.device)?;
        }
        Ok(MicroReport { loss: value, tokens: padded.tokens, padded_tokens: b * t, match_loss: match_value.get() })
    }

    /// Autograd from the loss down to `top`, the last layer's output (a leaf): adds the final norm's
    /// and the head's gradients, and returns those of the gathered embedding rows, of the head's
    /// rows, and of `top` (which the layers' backward starts from).
    fn backward_to_top(
        &mut self,
        loss: &Tensor,
        top: &Var,
        embed_leaf: Option<&Var>,
        head_leaf: Option<&Var>,
    ) -> Result<[Option<Tensor>; 3], TrainError> {
        let grads = loss.backward()?;
        self.add_param_grads(&grads)?;
        let of = |v: Option<&Var>| v.and_then(|v| grads.get(v.as_tensor()).cloned());
        Ok([of(embed_leaf), of(head_leaf), of(Some(top))])
    }

    /// Adds the gradient of every dense trainable parameter that `grads` holds.
    fn add_param_grads(&mut self, grads: &candle_core::backprop::GradStore) -> Result<(), TrainError> {
        for p in self.params.iter_mut().filter(|p| !p.rows) {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                add_dense(&mut p.state, g)?;
            }
        }
        Ok(())
    }

    /// The accumulated gradients in f32 (after removing the loss scale), by parameter name.
    pub fn gradients(&self) -> Result<BTreeMap<String, Vec<f32>>, TrainError> {
        let inv = 1.0 / self.scaler.map_or(1.0, |s| s.scale) as f32;
        let mut out = BTreeMap::new();
        for p in &self.params {
            let g: Vec<f32> = match &p.state {
                State::Host(h) => h.grad.clone(),
                State::Device(d) => match &d.grad {
                    Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                    None => vec![0.0; p.shape.iter().product()],
                },
            };
            out.insert(p.name.clone(), g.into_iter().map(|x| x * inv).collect());
        }
        Ok(out)
    }

    /// Clips the accumulated gradient to `max_grad_norm` (global norm), applies AdamW with `lr`,
    /// writes the new weights back into the model and clears the gradients.
    pub fn apply(&mut self, lr: f64) -> Result<StepReport, TrainError> {
        let loss_scale = self.scaler.map_or(1.0, |s| s.scale);
        let mut sq = 0.0f64;
        // Device-held gradients: each parameter's partial sums of squares go into its slot of one
        // device buffer, read back in one transfer at the end (one sync per step instead of one
        // per parameter) and added in parameter order, in f64.
        let device_grads: Vec<&Tensor> = self
            .params
            .iter()
            .filter_map(|p| match &p.state {
                State::Device(d) => d.grad.as_ref(),
                State::Host(_) => None,
            })
            .collect();
        if !device_grads.is_empty() {
            let parts = SumSquaresInto::PARTS;
            let partials = Tensor::zeros(device_grads.len() * parts, DType::F32, &self.device)?;
            for (slot, g) in device_grads.iter().enumerate() {
                partials.inplace_op2(&g.flatten_all()?.contiguous()?, &SumSquaresInto { slot })?;
            }
            for slot in partials.to_vec1::<f32>()?.chunks(parts) {
                sq += slot.iter().map(|&x| x as f64).sum::<f64>();
            }
        }
        for p in &self.params {
            sq += match &p.state {
                State::Host(h) if p.rows => {
                    let cols = p.shape[1];
                    h.touched_rows.iter().map(|&r| sum_squares(&h.grad[r * cols..(r + 1) * cols])).sum()
                }
                State::Host(h) => sum_squares(&h.grad),
                State::Device(_) => 0.0,
            };
        }
        let grad_norm = sq.sqrt() / loss_scale;
        if !grad_norm.is_finite() {
            if let Some(s) = &mut self.scaler {
                s.scale /= 2.0;
                s.good_steps = 0;
                self.zero_grad();
                return Ok(StepReport { grad_norm, skipped: true });
            }
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                what: "gradient norm",
                value: grad_norm,
                last_checkpoint: None,
            });
        }
        let grad_scale = clip_factor(grad_norm, self.cfg.max_grad_norm) / loss_scale as f32;
        self.step += 1;
        let (adam, wd, step) = (self.cfg.adam, self.cfg.weight_decay, self.step);
        for p in &mut self.params {
            let s = StepScalars::new(&adam, lr, if p.decay { wd } else { 0.0 }, step, grad_scale);
            let Param { var, state, rows, shape, .. } = p;
            match state {
                State::Host(h) => {
                    if !h.has_grad {
                        // torch skips parameters without a gradient.
                        continue;
                    }
                    let cols = if *rows { shape[1] } else { 0 };
                    let HostState { master, m, v, grad, live, touched, lazy, .. } = h;
                    if let Some(l) = lazy {
                        if s.decay != 1.0 {
                            l.factors.push(s.decay);
                        }
                    }
                    let lazy = lazy.is_some();
                    let mut kernel = |w: &mut [f32]| {
                        if *rows {
                            adamw_rows(w, m, v, grad, RowState { cols, live, touched, lazy }, &s);
                        } else {
                            adamw_dense(w, m, v, grad, &s);
                        }
                    };
                    match master {
                        None => var.as_tensor().inplace_op1(&UpdateInPlace(RefCell::new(&mut kernel)))?,
                        Some(w) => {
                            kernel(w);
                            var.as_tensor().inplace_op1(&WriteBack(w))?;
                        }
                    }
                }
                State::Device(d) => {
                    let Some(g) = d.grad.take() else { continue };
                    d.packed.inplace_op2(&g.flatten_all()?.contiguous()?, &FusedAdamW(s))?;
                    var.as_tensor().inplace_op2(&d.packed, &WriteMaster)?;
                }
            }
        }
        self.zero_grad();
        if let Some(s) = &mut self.scaler {
            s.good_steps += 1;
            if s.good_steps >= LossScaler::GROWTH_INTERVAL {
                s.scale *= 2.0;
                s.good_steps = 0;
            }
        }
        Ok(StepReport { grad_norm, skipped: false })
    }

    /// Applies every deferred weight decay, so that the weights the model holds are exact.
    pub fn sync(&mut self) -> Result<(), TrainError> {
        for i in 0..self.params.len() {
            self.catch_up(i, None)?;
        }
        Ok(())
    }

    /// Brings `rows` (all rows when `None`) of a lazily decayed parameter up to date.
    fn catch_up(&mut self, idx: usize, rows: Option<&[u32]>) -> Result<(), TrainError> {
        let p = &mut self.params[idx];
        let State::Host(HostState { lazy: Some(l), live, .. }) = &mut p.state else { return Ok(()) };
        if l.factors.is_empty() {
            return Ok(());
        }
        let cols = p.shape[1];
        let n = l.factors.len();
        let LazyDecay { factors, applied } = l;
        let mut fix = |w: &mut [f32]| match rows {
            Some(rows) => {
                for &r in rows {
                    let r = r as usize;
                    if !live[r] && (applied[r] as usize) < n {
                        apply_pending_decay(&mut w[r * cols..(r + 1) * cols], &factors[applied[r] as usize..]);
                        applied[r] = n as u32;
                    }
                }
            }
            None => {
                w.par_chunks_mut(cols).zip(applied.par_iter_mut()).zip(live.par_iter()).with_min_len(1024).for_each(
                    |((row, a), &is_live)| {
                        if !is_live && (*a as usize) < n {
                            apply_pending_decay(row, &factors[*a as usize..]);
                        }
                        *a = 0;
                    },
                );
            }
        };
        p.var.as_tensor().inplace_op1(&UpdateInPlace(RefCell::new(&mut fix)))?;
        if rows.is_none() {
            factors.clear();
        }
        Ok(())
    }

    /// Drops the accumulated gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            match &mut p.state {
                State::Host(h) => {
                    if p.rows {
                        let cols = p.shape[1];
                        for &r in &h.touched_rows {
                            h.grad[r * cols..(r + 1) * cols].fill(0.0);
                            h.touched[r] = false;
                        }
                        h.touched_rows.clear();
                    } else if h.has_grad {
                        h.grad.fill(0.0);
                    }
                    h.has_grad = false;
                }
                State::Device(d) => d.grad = None,
            }
        }
    }

    /// Reranker logits (`yes − no`) of `rows`, without recording a graph, in batches of
    /// `batch_size` rows taken in order of length (to limit padding), returned in `rows` order.
    pub fn logits(&mut self, store: &TokenStore, rows: &[usize], batch_size: usize) -> Result<Vec<f32>, TrainError> {
        self.sync()?;
        let frozen = Reranker::new(self.model.detached()?, self.yes, self.no)?;
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&k| store.sequence(rows[k]).len());
        let mut out = vec![0.0f32; rows.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<usize> = chunk.iter().map(|&k| rows[k]).collect();
            let padded = pad_left(store, &batch, &self.device)?;
            let logit = frozen.forward(&padded.ids, &padded.mask)?.logit;
            let values: Vec<f32> = logit.to_dtype(DType::F32)?.to_vec1()?;
            for (&k, v) in chunk.iter().zip(values) {
                out[k] = v;
            }
        }
        Ok(out)
    }

    /// The f32 master weights of the trainable parameters.
    pub fn masters(&mut self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        self.sync()?;
        let mut out = BTreeMap::new();
        for p in &self.params {
            let data = match &p.state {
                State::Host(HostState { master: Some(w), .. }) => w.clone(),
                State::Host(_) => p.var.as_tensor().flatten_all()?.to_vec1()?,
                State::Device(d) => d.part(0)?.to_vec1()?,
            };
            out.insert(p.name.clone(), HostTensor { shape: p.shape.clone(), data });
        }
        Ok(out)
    }

    /// Everything an exact resume needs: masters and both moments (`master/`, `m/`, `v/` + name).
    pub fn state_tensors(&mut self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        let mut out = BTreeMap::new();
        for (name, t) in self.masters()? {
            out.insert(format!("master/{name}"), t);
        }
        for p in &self.params {
            let (m, v) = match &p.state {
                State::Host(h) => (h.m.clone(), h.v.clone()),
                State::Device(d) => (d.part(1)?.to_vec1()?, d.part(2)?.to_vec1()?),
            };
            out.insert(format!("m/{}", p.name), HostTensor { shape: p.shape.clone(), data: m });
            out.insert(format!("v/{}", p.name), HostTensor { shape: p.shape.clone(), data: v });
        }
        Ok(out)
    }

    /// Restores [`Self::state_tensors`] and the step counter (and the f16 loss scale).
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        step: u64,
        scaler: Option<LossScaler>,
    ) -> Result<(), TrainError> {
        let get = |kind: &str, p: &Param| -> Result<&HostTensor, TrainError> {
            let key = format!("{kind}/{}", p.name);
            let t = tensors.get(&key).ok_or_else(|| TrainError::Config(format!("checkpoint lacks `{key}`")))?;
            if t.shape != p.shape {
                return Err(TrainError::Config(format!(
                    "checkpoint `{key}` has shape {:?}, expected {:?}",
                    t.shape, p.shape
                )));
            }
            Ok(t)
        };
        for i in 0..self.params.len() {
            let (w, m, v) = {
                let p = &self.params[i];
                (get("master", p)?.data.clone(), get("m", p)?.data.clone(), get("v", p)?.data.clone())
            };
            let dtype = self.dtype;
            let device = self.device.clone();
            let p = &mut self.params[i];
            match &mut p.state {
                State::Host(h) => {
                    p.var.as_tensor().inplace_op1(&WriteBack(&w))?;
                    if let Some(master) = &mut h.master {
                        *master = w;
                    }
                    if let Some(l) = &mut h.lazy {
                        l.factors.clear();
                        l.applied.fill(0);
                    }
                    if p.rows {
                        let cols = p.shape[1];
                        for (r, live) in h.live.iter_mut().enumerate() {
                            let span = r * cols..(r + 1) * cols;
                            *live = m[span.clone()].iter().chain(&v[span]).any(|&x| x != 0.0);
                        }
                    }
                    h.m = m;
                    h.v = v;
                }
                State::Device(d) => {
                    let n = w.len();
                    d.packed = Tensor::from_vec([w, m, v].concat(), 3 * n, &device)?;
                    p.var.set(&d.part(0)?.reshape(p.shape.as_slice())?.to_dtype(dtype)?)?;
                }
            }
        }
        self.zero_grad();
        self.step = step;
        if self.scaler.is_some() {
            self.scaler = scaler.or(self.scaler);
        }
        Ok(())
    }

    /// The model to export, on the CPU in `dtype`: frozen weights as loaded, trainable ones from
    /// `masters` (default: the current ones), LoRA adapters merged into their base weights.
    pub fn export(
        &mut self,
        masters: Option<&BTreeMap<String, HostTensor>>,
        dtype: DType,
    ) -> Result<Qwen3, TrainError> {
        self.sync()?;
        let current;
        let masters = match masters {
            Some(m) => m,
            None => {
                current = self.masters()?;
                &current
            }
        };
        let host = |name: &str| -> Result<Option<Tensor>, TrainError> {
            Ok(match masters.get(name) {
                Some(t) => Some(Tensor::from_slice(&t.data, t.shape.as_slice(), &Device::Cpu)?),
                None => None,
            })
        };
        let mut map = ParamMap::new();
        for (name, t) in self.model.params().iter() {
            let w = match host(name)? {
                Some(w) => w,
                None => t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            };
            map.insert(name, w);
        }
        for spec in &self.adapters {
            let weight = format!("{}.weight", spec.module);
            let (a, b) = match (host(&spec.a_name())?, host(&spec.b_name())?) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(TrainError::Config(format!("no adapter weights for `{}`", spec.module))),
            };
            let base = map.get(&weight).expect("adapter targets exist").clone();
            map.insert(weight, merge(&base, &a, &b, self.lora_scale)?);
        }
        Ok(Qwen3::new(self.model.config().clone(), map.to_dtype(dtype)?)?)
    }
}

fn new_state(t: &Tensor, rows: bool, host: bool, dtype: DType) -> Result<State, TrainError> {
    let n = t.elem_count();
    if host {
        let master = if dtype == DType::F32 { None } else { Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        let nrows = if rows { t.dims()[0] } else { 0 };
        Ok(State::Host(HostState {
            master,
            m: vec![0.0; n],
            v: vec![0.0; n],
            grad: vec![0.0; n],
            has_grad: false,
            live: vec![false; nrows],
            touched: vec![false; nrows],
            touched_rows: Vec::new(),
            lazy: (rows && dtype == DType::F32).then(|| LazyDecay { factors: Vec::new(), applied: vec![0; nrows] }),
        }))
    } else {
        Ok(State::Device(DeviceState::new(t)?))
    }
}

fn add_dense(state: &mut State, g: &Tensor) -> Result<(), TrainError> {
    match state {
        State::Host(h) => {
            let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if h.has_grad {
                h.grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            } else {
                h.grad.copy_from_slice(&g);
                h.has_grad = true;
            }
        }
        State::Device(d) => {
            // A micro-batch's 16-bit gradient is kept as it is (the optimizer's kernels read any
            // float dtype): with one micro-batch per step nothing is widened or copied. A second
            // one makes the f32 accumulator. An f32 gradient is autograd's own and is copied
            // before it becomes the accumulator.
            d.grad = Some(match d.grad.take() {
                Some(acc) => (acc.to_dtype(DType::F32)? + g.to_dtype(DType::F32)?)?,
                None if g.dtype() != DType::F32 => g.clone(),
                None => g.copy()?,
            });
        }
    }
    Ok(())
}

/// Adds the gradient of gathered rows (`g: [ids.len(), cols]`) into a row-sparse parameter.
fn add_rows(state: &mut State, ids: &[u32], g: &Tensor, cols: usize, device: &Device) -> Result<(), TrainError> {
    match state {
        State::Host(h) => {
            let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (k, &id) in ids.iter().enumerate() {
                let r = id as usize;
                let dst = &mut h.grad[r * cols..(r + 1) * cols];
                dst.iter_mut().zip(&g[k * cols..(k + 1) * cols]).for_each(|(a, b)| *a += b);
                if !h.touched[r] {
                    h.touched[r] = true;
                    h.touched_rows.push(r);
                }
            }
            h.has_grad = true;
        }
        State::Device(d) => {
            if d.grad.is_none() {
                d.grad = Some(Tensor::zeros(d.shape.as_slice(), DType::F32, device)?);
            }
            let acc = d.grad.as_ref().expect("set above");
            crate::kernels::scatter::Plan::new(ids, device)?.add_into(acc, g)?;
        }
    }
    Ok(())
}
