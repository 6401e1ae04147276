//! The optimizer, apart from the learner (as `torch.optim` is apart from the module and burn-train's
//! `Optimizer` from its `Learner`): it owns every trainable parameter's f32 master copy, both AdamW
//! moments and the gradient accumulator, the deferred weight decay of untouched embedding rows, f16
//! loss scaling, the step counter, and saving and restoring all of that. It does not know how a
//! gradient was computed: the learner ([`super::learner`]) runs the forward and backward passes and
//! hands each gradient over by slot, densely ([`Optimizer::add_dense`]) or as rows
//! ([`Optimizer::add_rows`]).
//!
//! # Where the numbers live
//!
//! The model computes in `dtype` (f32, bf16 or f16) and reads each trainable parameter from a
//! candle `Var` that this optimizer creates and writes. The f32 master and the moments live:
//!
//! - on the CPU, as flat `Vec<f32>` buffers updated by the loops of [`super::optim`] (for f32
//!   compute the `Var`'s own storage is the master, updated in place through a candle in-place
//!   op, so nothing is copied);
//! - on a GPU, as one f32 tensor per parameter (master | m | v) updated in place by one fused
//!   kernel ([`crate::kernels::adamw`]).
//!
//! After each update the master is written back into the `Var` in the compute dtype.
//!
//! # Row-sparse parameters
//!
//! A batch touches a few hundred of the embedding's rows (151,669 for Qwen3). Their gradients
//! arrive as rows; the optimizer remembers which rows were touched, which is what lets
//! [`super::optim::adamw_rows`] skip the Adam arithmetic on rows whose moments are still zero. On
//! the CPU in f32, rows never touched do not even get their weight decay each step: the factors
//! are recorded and applied, in order, when the row is next read (the learner calls
//! [`Optimizer::catch_up`] for the rows a batch gathers, [`Optimizer::sync`] before validation,
//! checkpoints and export) — bit for bit the eager result.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::HostTensor;
use super::config::{AdamConfig, OptimizerBackend, TrainConfig};
use super::optim::{adamw_dense, adamw_rows, apply_pending_decay, clip_factor, sum_squares, RowState, StepScalars};
use super::TrainError;
use crate::kernels::adamw::{FusedAdamW, SumSquaresInto, WriteMaster};
use crate::kernels::{contiguous_range, write_f32};

/// Weight decay applies to matrices, not to norm weights or biases (transformers' Trainer rule).
pub fn takes_weight_decay(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
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

/// How a parameter learns: what [`Optimizer::add`] needs besides its name and initial value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotKind {
    /// Takes decoupled weight decay.
    pub decay: bool,
    /// Its gradient arrives as rows (embedding, untied head) rather than from autograd on the `Var`.
    pub rows: bool,
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

/// One trainable parameter: the `Var` the model reads and everything the optimizer keeps for it.
struct Slot {
    name: String,
    shape: Vec<usize>,
    var: Var,
    kind: SlotKind,
    state: State,
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

/// AdamW with f32 masters over the trainable parameters of one model.
pub struct Optimizer {
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    adam: AdamConfig,
    weight_decay: f64,
    max_grad_norm: f64,
    /// Masters and moments as host buffers (the CPU loops) rather than device tensors.
    host: bool,
    dtype: DType,
    device: Device,
    step: u64,
    scaler: Option<LossScaler>,
}

impl Optimizer {
    /// An optimizer with no parameters yet, for a model computing in `dtype` on `device`; f16
    /// compute gets a loss scaler.
    pub fn new(cfg: &TrainConfig, dtype: DType, device: &Device) -> Result<Self, TrainError> {
        let host = match cfg.backend {
            OptimizerBackend::Auto => device.is_cpu(),
            OptimizerBackend::Host if !device.is_cpu() => {
                return Err(TrainError::Config("the host optimizer backend needs a CPU model".into()))
            }
            OptimizerBackend::Host => true,
            OptimizerBackend::Tensor => false,
        };
        Ok(Self {
            slots: Vec::new(),
            by_name: HashMap::new(),
            adam: cfg.adam,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            host,
            dtype,
            device: device.clone(),
            step: 0,
            scaler: (dtype == DType::F16).then(LossScaler::new),
        })
    }

    /// Registers a trainable parameter starting from `init` (any float dtype: its values, widened
    /// to f32, are the master) and returns the `Var` the model should compute with, in the compute
    /// dtype. The slot index is the order of registration.
    pub fn add(&mut self, name: &str, init: &Tensor, kind: SlotKind) -> Result<Var, TrainError> {
        let var = Var::from_tensor(&init.to_dtype(self.dtype)?.detach())?;
        let state = new_state(init, kind.rows, self.host, self.dtype)?;
        self.by_name.insert(name.to_string(), self.slots.len());
        self.slots.push(Slot { name: name.to_string(), shape: init.dims().to_vec(), var: var.clone(), kind, state });
        Ok(var)
    }

    /// The slot of a registered parameter.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The `Var` of slot `i` (its current weights in the compute dtype).
    pub fn var(&self, i: usize) -> &Var {
        &self.slots[i].var
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.scaler
    }

    /// The factor the loss is multiplied by before the backward pass (1 without a scaler).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// Names of the parameters, in slot order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// Number of trainable scalars.
    pub fn count(&self) -> usize {
        self.slots.iter().map(|s| s.shape.iter().product::<usize>()).sum()
    }

    /// Adds a dense gradient to slot `i`'s accumulator.
    pub fn add_dense(&mut self, i: usize, g: &Tensor) -> Result<(), TrainError> {
        add_dense(&mut self.slots[i].state, g)
    }

    /// Adds the gradient of every dense (not row-sparse) parameter that `grads` holds.
    pub fn add_grads(&mut self, grads: &GradStore) -> Result<(), TrainError> {
        for s in self.slots.iter_mut().filter(|s| !s.kind.rows) {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                add_dense(&mut s.state, g)?;
            }
        }
        Ok(())
    }

    /// Adds the gradient of gathered rows (`g: [ids.len(), cols]`) into row-sparse slot `i`.
    pub fn add_rows(&mut self, i: usize, ids: &[u32], g: &Tensor) -> Result<(), TrainError> {
        let cols = self.slots[i].shape[1];
        add_rows(&mut self.slots[i].state, ids, g, cols, &self.device)
    }

    /// The accumulated gradients in f32 (after removing the loss scale), by parameter name.
    pub fn gradients(&self) -> Result<BTreeMap<String, Vec<f32>>, TrainError> {
        let inv = 1.0 / self.loss_scale() as f32;
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let g: Vec<f32> = match &s.state {
                State::Host(h) => h.grad.clone(),
                State::Device(d) => match &d.grad {
                    Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                    None => vec![0.0; s.shape.iter().product()],
                },
            };
            out.insert(s.name.clone(), g.into_iter().map(|x| x * inv).collect());
        }
        Ok(out)
    }

    /// Clips the accumulated gradient to `max_grad_norm` (global norm), applies AdamW with `lr`,
    /// writes the new weights back into the `Var`s and clears the gradients.
    pub fn apply(&mut self, lr: f64) -> Result<StepReport, TrainError> {
        let loss_scale = self.loss_scale();
        let grad_norm = self.grad_norm_sq()?.sqrt() / loss_scale;
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
        let grad_scale = clip_factor(grad_norm, self.max_grad_norm) / loss_scale as f32;
        self.step += 1;
        let (adam, wd, step) = (self.adam, self.weight_decay, self.step);
        for slot in &mut self.slots {
            let s = StepScalars::new(&adam, lr, if slot.kind.decay { wd } else { 0.0 }, step, grad_scale);
            let Slot { var, state, kind, shape, .. } = slot;
            match state {
                State::Host(h) => {
                    if !h.has_grad {
                        // torch skips parameters without a gradient.
                        continue;
                    }
                    let rows = kind.rows;
                    let cols = if rows { shape[1] } else { 0 };
                    let HostState { master, m, v, grad, live, touched, lazy, .. } = h;
                    if let Some(l) = lazy {
                        if s.decay != 1.0 {
                            l.factors.push(s.decay);
                        }
                    }
                    let lazy = lazy.is_some();
                    let mut kernel = |w: &mut [f32]| {
                        if rows {
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

    /// The squared global norm of the (still loss-scaled) accumulated gradient, in f64.
    fn grad_norm_sq(&self) -> Result<f64, TrainError> {
        let mut sq = 0.0f64;
        // Device-held gradients: each parameter's partial sums of squares go into its slot of one
        // device buffer, read back in one transfer at the end (one sync per step instead of one
        // per parameter) and added in parameter order, in f64.
        let device_grads: Vec<&Tensor> = self
            .slots
            .iter()
            .filter_map(|s| match &s.state {
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
        for s in &self.slots {
            sq += match &s.state {
                State::Host(h) if s.kind.rows => {
                    let cols = s.shape[1];
                    h.touched_rows.iter().map(|&r| sum_squares(&h.grad[r * cols..(r + 1) * cols])).sum()
                }
                State::Host(h) => sum_squares(&h.grad),
                State::Device(_) => 0.0,
            };
        }
        Ok(sq)
    }

    /// Applies every deferred weight decay, so that the weights the `Var`s hold are exact.
    pub fn sync(&mut self) -> Result<(), TrainError> {
        for i in 0..self.slots.len() {
            self.catch_up(i, None)?;
        }
        Ok(())
    }

    /// Brings `rows` (all rows when `None`) of slot `i` up to date if its weight decay is
    /// deferred; a no-op for every other slot.
    pub fn catch_up(&mut self, i: usize, rows: Option<&[u32]>) -> Result<(), TrainError> {
        let s = &mut self.slots[i];
        let State::Host(HostState { lazy: Some(l), live, .. }) = &mut s.state else { return Ok(()) };
        if l.factors.is_empty() {
            return Ok(());
        }
        let cols = s.shape[1];
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
        s.var.as_tensor().inplace_op1(&UpdateInPlace(RefCell::new(&mut fix)))?;
        if rows.is_none() {
            factors.clear();
        }
        Ok(())
    }

    /// Drops the accumulated gradients.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            match &mut s.state {
                State::Host(h) => {
                    if s.kind.rows {
                        let cols = s.shape[1];
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

    /// The f32 master weights, by parameter name.
    pub fn masters(&mut self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        self.sync()?;
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let data = match &s.state {
                State::Host(HostState { master: Some(w), .. }) => w.clone(),
                State::Host(_) => s.var.as_tensor().flatten_all()?.to_vec1()?,
                State::Device(d) => d.part(0)?.to_vec1()?,
            };
            out.insert(s.name.clone(), HostTensor { shape: s.shape.clone(), data });
        }
        Ok(out)
    }

    /// Everything an exact resume needs: masters and both moments (`master/`, `m/`, `v/` + name).
    pub fn state_tensors(&mut self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        let mut out = BTreeMap::new();
        for (name, t) in self.masters()? {
            out.insert(format!("master/{name}"), t);
        }
        for s in &self.slots {
            let (m, v) = match &s.state {
                State::Host(h) => (h.m.clone(), h.v.clone()),
                State::Device(d) => (d.part(1)?.to_vec1()?, d.part(2)?.to_vec1()?),
            };
            out.insert(format!("m/{}", s.name), HostTensor { shape: s.shape.clone(), data: m });
            out.insert(format!("v/{}", s.name), HostTensor { shape: s.shape.clone(), data: v });
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
        let get = |kind: &str, s: &Slot| -> Result<&HostTensor, TrainError> {
            let key = format!("{kind}/{}", s.name);
            let t = tensors.get(&key).ok_or_else(|| TrainError::Config(format!("checkpoint lacks `{key}`")))?;
            if t.shape != s.shape {
                return Err(TrainError::Config(format!(
                    "checkpoint `{key}` has shape {:?}, expected {:?}",
                    t.shape, s.shape
                )));
            }
            Ok(t)
        };
        let (dtype, device) = (self.dtype, self.device.clone());
        for i in 0..self.slots.len() {
            let (w, m, v) = {
                let s = &self.slots[i];
                (get("master", s)?.data.clone(), get("m", s)?.data.clone(), get("v", s)?.data.clone())
            };
            let s = &mut self.slots[i];
            match &mut s.state {
                State::Host(h) => {
                    s.var.as_tensor().inplace_op1(&WriteBack(&w))?;
                    if let Some(master) = &mut h.master {
                        *master = w;
                    }
                    if let Some(l) = &mut h.lazy {
                        l.factors.clear();
                        l.applied.fill(0);
                    }
                    if s.kind.rows {
                        let cols = s.shape[1];
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
                    s.var.set(&d.part(0)?.reshape(s.shape.as_slice())?.to_dtype(dtype)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        TrainConfig { max_grad_norm: 0.0, weight_decay: 0.1, ..TrainConfig::default() }
    }

    /// The optimizer works without a model: what it does to a parameter is AdamW's update of
    /// `super::optim`, on the `Var` the model would read.
    #[test]
    fn dense_step_is_adamw_on_the_var() {
        let dev = Device::Cpu;
        let mut opt = Optimizer::new(&cfg(), DType::F32, &dev).unwrap();
        let init = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let var = opt.add("w", &init, SlotKind { decay: true, rows: false }).unwrap();
        let g = Tensor::new(&[[0.1f32, -0.2], [0.3, 0.0]], &dev).unwrap();
        opt.add_dense(0, &g).unwrap();
        let report = opt.apply(1e-2).unwrap();
        assert!(!report.skipped);
        assert!((report.grad_norm - (0.01f64 + 0.04 + 0.09).sqrt()).abs() < 1e-6);

        let (mut p, mut m, mut v) = (vec![0.5f32, -1.0, 2.0, 0.25], vec![0.0; 4], vec![0.0; 4]);
        let s = StepScalars::new(&cfg().adam, 1e-2, 0.1, 1, 1.0);
        adamw_dense(&mut p, &mut m, &mut v, &[0.1, -0.2, 0.3, 0.0], &s);
        let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, p);
        assert_eq!(opt.step(), 1);
        // The gradient was consumed by the step.
        assert!(opt.gradients().unwrap()["w"].iter().all(|&x| x == 0.0));
    }

    /// A resumed optimizer continues exactly where the saved one was.
    #[test]
    fn state_round_trips() {
        let dev = Device::Cpu;
        let make = || {
            let mut opt = Optimizer::new(&cfg(), DType::F32, &dev).unwrap();
            let init = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
            let var = opt.add("rows", &init, SlotKind { decay: true, rows: true }).unwrap();
            (opt, var)
        };
        let g = Tensor::new(&[[0.5f32, -0.5]], &dev).unwrap();
        let (mut a, va) = make();
        a.add_rows(0, &[1], &g).unwrap();
        a.apply(1e-2).unwrap();
        let saved = a.state_tensors().unwrap();
        let (mut b, vb) = make();
        b.load_state(&saved, a.step(), None).unwrap();
        for opt in [&mut a, &mut b] {
            opt.add_rows(0, &[2], &g).unwrap();
            opt.apply(1e-2).unwrap();
            opt.sync().unwrap();
        }
        let read = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(read(&va), read(&vb));
        assert_eq!(a.step(), 2);
        // Row 0 was never touched: it only decayed, twice.
        let decay = (1.0f64 - 1e-2 * 0.1) as f32;
        assert_eq!(read(&va)[0], 1.0 * decay * decay);
    }
}
