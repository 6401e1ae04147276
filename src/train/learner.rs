//! One model being trained: how its gradients are computed. The learner gathers each batch's
//! embedding rows, runs the forward pass, the loss and the backward pass (by hand or by autograd,
//! with or without recomputation, full or LoRA), and hands every gradient to its
//! [`Optimizer`] ([`super::optimizer`]), which owns the masters, the moments and the update. The
//! loop around both lives in [`super::trainer`].
//!
//! # The embedding
//!
//! A batch touches a few hundred of the embedding's rows (151,669 for Qwen3). Left to autograd,
//! `index_select`'s backward would build a dense `[vocab, hidden]` gradient (twice with tied
//! embeddings). Instead each micro-batch gathers the rows it uses (plus the yes/no rows of the
//! head) into a small leaf variable and feeds the decoder embeddings
//! ([`Qwen3::hidden_states_from_embeds`]); the leaf's gradient (with the hand-written layer
//! backward: each position's gradient directly, [`crate::kernels::scatter`] on a device) is scattered into
//! the optimizer's accumulator, which remembers the touched rows (see [`super::optimizer`] for what
//! that saves). The rows a batch gathers are first brought up to date with any weight decay the
//! optimizer deferred.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::HostTensor;
use super::config::{Mode, TrainConfig};
use super::data::{pad_left, MicroBatch};
use super::lora::{adapter_specs, check_modules, init_a, merge, AdapterSpec};
use super::optimizer::{takes_weight_decay, LossScaler, Optimizer, SlotKind, StepReport};
use super::TrainError;
use crate::model::backward::LayerTape;
use crate::model::reranker::{score_last, yes_no};
use crate::model::{LoraAdapter, LoraDropout, ParamMap, Qwen3, Reranker};
use crate::text::TokenStore;
use crate::util::rng::stream;

const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// The trainable state of one model.
pub struct Learner {
    model: Qwen3,
    yes: u32,
    no: u32,
    /// Masters, moments, gradients and the step of every trainable parameter.
    optimizer: Optimizer,
    /// Optimizer slots of the embedding and the untied head, whose gradients arrive as rows.
    embed: Option<usize>,
    head: Option<usize>,
    adapters: Vec<AdapterSpec>,
    lora_scale: f64,
    dropout: Option<Arc<AtomicU64>>,
    cfg: TrainConfig,
    dtype: DType,
    device: Device,
    matching: Option<super::Matching>,
    /// Differentiate the decoder layers with autograd even where the hand-written backward
    /// applies (the reference the tests and `pipe bench` compare it with).
    autograd_layers: bool,
    flash_attention: bool,
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
        let mut optimizer = Optimizer::new(cfg, dtype, &device)?;
        let qcfg = model.config().clone();
        let full = matches!(cfg.mode, Mode::Full);
        let mut map = ParamMap::new();
        for (name, t) in model.params().iter() {
            let trainable = full && !(cfg.freeze_embeddings && name == EMBED);
            if !trainable {
                map.insert(name, t.to_dtype(dtype)?.detach());
                continue;
            }
            let kind = SlotKind { decay: takes_weight_decay(name), rows: name == EMBED || name == LM_HEAD };
            map.insert(name, optimizer.add(name, t, kind)?.as_tensor().clone());
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
                    let var = optimizer.add(&name, &t, SlotKind { decay: true, rows: false })?;
                    vars.push(var.as_tensor().clone());
                }
                let linear = model.linear_mut(&spec.module).expect("checked above");
                linear.lora = Some(LoraAdapter { a: vars[0].clone(), b: vars[1].clone(), scale: lora_scale });
                linear.lora_dropout = stream.as_ref().map(|s| LoraDropout { p: l.dropout, stream: s.clone() });
            }
            dropout = stream;
        }
        let (embed, head) = (optimizer.index(EMBED), optimizer.index(LM_HEAD));
        Ok(Self {
            model,
            yes,
            no,
            optimizer,
            embed,
            head,
            adapters,
            lora_scale,
            dropout,
            cfg: cfg.clone(),
            dtype,
            device,
            matching: None,
            autograd_layers: false,
            flash_attention: false,
        })
    }

    /// Differentiates the decoder layers with candle's autograd instead of the hand-written
    /// backward (which full fine-tuning uses by default; LoRA always uses autograd). Same
    /// gradients up to rounding; for comparisons.
    pub fn set_autograd_layers(&mut self, on: bool) {
        self.autograd_layers = on;
    }

    /// Runs the hand-written backward's attention tiled ([`crate::kernels::flash`]): no `T × T`
    /// probabilities kept. Off by default until measured on a GPU; `pipe bench` switches it on.
    pub fn set_flash_attention(&mut self, on: bool) {
        self.flash_attention = on;
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

    /// The optimizer: its step, loss scaler, masters and state for checkpoints.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optimizer.step()
    }

    /// Names of the trainable parameters (LoRA adapters as `<module>.lora_A.weight` / `lora_B`).
    pub fn trainable(&self) -> Vec<String> {
        self.optimizer.names()
    }

    pub fn trainable_count(&self) -> usize {
        self.optimizer.count()
    }

    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.optimizer.loss_scaler()
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
            self.optimizer.catch_up(h, Some(&head_ids))?;
        }
        let embeds = match self.embed {
            Some(e) => {
                let mut uniq = padded.flat_ids.clone();
                if tied {
                    uniq.extend(head_ids);
                }
                uniq.sort_unstable();
                uniq.dedup();
                self.optimizer.catch_up(e, Some(&uniq))?;
                let table = self.optimizer.var(e).as_tensor().detach();
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
                let table = self.optimizer.var(h).as_tensor().detach();
                let leaf = Var::from_tensor(&table.index_select(&Tensor::new(&head_ids, &self.device)?, 0)?)?;
                let x = leaf.as_tensor().clone();
                head_leaf = Some(leaf);
                x
            }
            _ => self.model.lm_head_rows(&head_ids)?,
        };

        // The loss of the group's mean, scaled for f16, from the last layer's hidden states.
        let scale = self.optimizer.loss_scale();
        let step = self.optimizer.step() + 1;
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
                let z = yes_no(&all, &head)?.logit.reshape((b, t))?;
                let aux = super::matching::weighted_bce_sum(&z, y, w)?;
                match_value.set(aux.to_scalar::<f32>()? as f64 / denom.max(1) as f64);
                let logit = z.narrow(1, t - 1, 1)?.squeeze(1)?;
                let main = super::loss::micro_loss(self.cfg.loss, &logit, store, micro)?;
                (main + aux.affine(self.cfg.match_loss, 0.0)?)?
            } else {
                let logit = score_last(model, h, &head)?.logit;
                super::loss::micro_loss(self.cfg.loss, &logit, store, micro)?
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
            let shared = self.model.layer_inputs(t, &padded.mask)?.with_flash(self.flash_attention);
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
                    if let Some(i) = self.optimizer.index(&name) {
                        self.optimizer.add_dense(i, &grad)?;
                    }
                }
                g = Some(dx);
            }
            // The embedding lookup's backward: each position's gradient goes straight into its
            // row of the accumulator (with the gathered rows' own gradient, from a tied head,
            // added below).
            if let (Some(e), Some(dx)) = (self.embed, &g) {
                self.optimizer.add_rows(e, &padded.flat_ids, &dx.reshape((b * t, hidden))?)?;
            }
            (value, embed_grad, head_grad)
        } else if !self.cfg.recompute {
            let h = self.model.hidden_states_from_embeds(&embeds, &padded.mask)?;
            let (scaled, value) = head_loss(&self.model, &h)?;
            let grads = scaled.backward()?;
            self.optimizer.add_grads(&grads)?;
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
                self.optimizer.add_grads(&grads)?;
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
            self.optimizer.add_rows(e, uniq, g)?;
        }
        if let (Some(h), Some(g)) = (self.head, &head_grad) {
            self.optimizer.add_rows(h, &head_ids, g)?;
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
        self.optimizer.add_grads(&grads)?;
        let of = |v: Option<&Var>| v.and_then(|v| grads.get(v.as_tensor()).cloned());
        Ok([of(embed_leaf), of(head_leaf), of(Some(top))])
    }

    /// The accumulated gradients in f32 (after removing the loss scale), by parameter name.
    pub fn gradients(&self) -> Result<BTreeMap<String, Vec<f32>>, TrainError> {
        self.optimizer.gradients()
    }

    /// Clips the accumulated gradient, applies AdamW with `lr` and clears the gradients (see
    /// [`Optimizer::apply`]); the model computes with the new weights at once.
    pub fn apply(&mut self, lr: f64) -> Result<StepReport, TrainError> {
        self.optimizer.apply(lr)
    }

    /// Applies every deferred weight decay, so that the weights the model holds are exact.
    pub fn sync(&mut self) -> Result<(), TrainError> {
        self.optimizer.sync()
    }

    /// Drops the accumulated gradients.
    pub fn zero_grad(&mut self) {
        self.optimizer.zero_grad()
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
        self.optimizer.masters()
    }

    /// Everything an exact resume needs (see [`Optimizer::state_tensors`]).
    pub fn state_tensors(&mut self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        self.optimizer.state_tensors()
    }

    /// Restores [`Self::state_tensors`] and the step counter (and the f16 loss scale).
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        step: u64,
        scaler: Option<LossScaler>,
    ) -> Result<(), TrainError> {
        self.optimizer.load_state(tensors, step, scaler)
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
