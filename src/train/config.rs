//! The trainer's hyperparameters as typed values, independent of any config file: the train stage
//! builds a [`TrainConfig`] from its TOML parameters, tests and benchmarks build one directly.

use super::TrainError;

/// Which parameters learn.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Every parameter (the embedding unless `freeze_embeddings`).
    Full,
    /// Low-rank adapters on the named linear layers; the base model stays frozen.
    Lora(LoraConfig),
}

/// LoRA as PEFT defines it: `y = W x + (alpha / r) · B A dropout(x)`, A Kaiming-uniform, B zero.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Linear layer names inside a decoder layer: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// The training objective on the reranker logit `s = logit(yes) − logit(no)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// Binary cross-entropy of `sigmoid(s)` against the 0/1 label.
    Bce,
    /// Squared error of `sigmoid(s)` against `(relevance − 1) / 2` (relevance 1..3 → 0..1).
    Mse,
    /// RankNet: `log(1 + e^{−(s_i − s_j)})` over every pair of one query's candidates with
    /// relevance `r_i > r_j`.
    Pairwise,
    /// Softmax cross-entropy over a group of one positive and up to `group_size − 1` negatives
    /// of its query (FlagEmbedding's `train_group_size`): `logsumexp(s_group) − s_pos`.
    GroupCe,
    /// LambdaRank's NDCG-swap weighted logistic loss over the pairs of one query's candidates
    /// (see [`super::loss`] for the formula).
    Lambda,
}

impl LossKind {
    /// Whether a training item is a list of rows scored together (a group or a query) rather
    /// than one row.
    pub fn is_listwise(self) -> bool {
        matches!(self, Self::GroupCe | Self::Lambda)
    }
}

impl std::str::FromStr for LossKind {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "bce" => Ok(Self::Bce),
            "mse" => Ok(Self::Mse),
            "pairwise" => Ok(Self::Pairwise),
            "group_ce" => Ok(Self::GroupCe),
            "lambda" => Ok(Self::Lambda),
            other => {
                Err(TrainError::Config(format!("loss `{other}` is not one of bce, mse, pairwise, group_ce, lambda")))
            }
        }
    }
}

/// The validation number that picks the exported checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BestMetric {
    ValLoss,
    ValAuc,
    ValNdcg10,
}

impl BestMetric {
    pub fn name(self) -> &'static str {
        match self {
            Self::ValLoss => "val_loss",
            Self::ValAuc => "val_auc",
            Self::ValNdcg10 => "val_ndcg@10",
        }
    }

    /// Whether `new` beats `old` (strictly; an undefined value never wins).
    pub fn better(self, new: Option<f64>, old: Option<f64>) -> bool {
        match (new, old) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(n), Some(o)) => match self {
                Self::ValLoss => n < o,
                _ => n > o,
            },
        }
    }
}

impl std::str::FromStr for BestMetric {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "val_loss" => Ok(Self::ValLoss),
            "val_auc" => Ok(Self::ValAuc),
            "val_ndcg@10" => Ok(Self::ValNdcg10),
            other => {
                Err(TrainError::Config(format!("best_metric `{other}` is not one of val_loss, val_auc, val_ndcg@10")))
            }
        }
    }
}

/// AdamW's constants (torch.optim.AdamW's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Where the optimizer keeps f32 masters and moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerBackend {
    /// Flat host buffers on the CPU, tensors on the model's device otherwise.
    #[default]
    Auto,
    /// Flat `Vec<f32>` buffers (CPU models only).
    Host,
    /// f32 tensors on the model's device updated with tensor ops (what a GPU uses; selectable on
    /// the CPU to cross-check the two implementations).
    Tensor,
}

/// A deliberate failure, for tests of the guards and of resuming (see `stages/train.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Multiply the loss of optimizer step N (1-based) by NaN inside the graph.
    NanLoss(u64),
    /// Return an error right after step N and its checkpoint, as if the process had died there.
    StopAfter(u64),
    /// Abort the process (SIGABRT, no cleanup) right after step N and its checkpoint.
    AbortAfter(u64),
}

impl std::str::FromStr for Fault {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        let bad = || TrainError::Config(format!("fault `{s}` is not nan_loss@N, stop@N or abort@N"));
        let (what, n) = s.split_once('@').ok_or_else(bad)?;
        let n: u64 = n.parse().map_err(|_| bad())?;
        match what {
            "nan_loss" => Ok(Self::NanLoss(n)),
            "stop" => Ok(Self::StopAfter(n)),
            "abort" => Ok(Self::AbortAfter(n)),
            _ => Err(bad()),
        }
    }
}

/// Everything the loop needs to know; the defaults are `stages/train.toml`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub mode: Mode,
    pub freeze_embeddings: bool,
    pub loss: LossKind,
    /// Rows per group of the `group_ce` loss: one positive and `group_size − 1` negatives.
    pub group_size: usize,
    pub epochs: usize,
    /// Rows per micro-batch (queries per micro-batch for the pairwise and lambda losses, groups
    /// for group_ce).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    /// Global gradient norm limit; 0 disables clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Validate every this many optimizer steps (0: only at epoch ends).
    pub eval_every: u64,
    pub eval_batch_size: usize,
    /// Stop after this many validations without improvement (0: never).
    pub early_stopping: usize,
    pub best_metric: BestMetric,
    /// Epoch-end checkpoints kept in the scratch dir.
    pub keep_checkpoints: usize,
    /// Stop after this many optimizer steps (0: no limit).
    pub max_steps: u64,
    /// Write a resumable checkpoint every this many optimizer steps (and at every epoch end).
    pub checkpoint_every: u64,
    /// Length bucketing window in batches (0: plain shuffled batches); see [`super::data`].
    pub bucket_batches: usize,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (same gradients, about a third more compute, one layer's activations of memory).
    pub recompute: bool,
    /// Weight of the auxiliary token-matching loss ([`super::matching`]); 0 switches it off.
    pub match_loss: f64,
    pub adam: AdamConfig,
    pub backend: OptimizerBackend,
    pub fault: Option<Fault>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Full,
            freeze_embeddings: false,
            loss: LossKind::Bce,
            group_size: 8,
            epochs: 3,
            batch_size: 2,
            grad_accum: 8,
            learning_rate: 5e-6,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            eval_batch_size: 16,
            early_stopping: 0,
            best_metric: BestMetric::ValLoss,
            keep_checkpoints: 1,
            max_steps: 0,
            checkpoint_every: 50,
            bucket_batches: 64,
            recompute: false,
            match_loss: 0.0,
            adam: AdamConfig::default(),
            backend: OptimizerBackend::Auto,
            fault: None,
        }
    }
}

/// A value [`TrainConfig::validate`] rejects. `key` is the stage parameter it comes from (the field
/// name, `lora.r` for the adapter's), so the train stage names the key without reading the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {message}")]
pub struct InvalidConfig {
    pub key: &'static str,
    pub message: String,
}

impl From<InvalidConfig> for TrainError {
    fn from(e: InvalidConfig) -> Self {
        TrainError::Config(e.to_string())
    }
}

impl TrainConfig {
    /// Value checks that do not need the data.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |key: &'static str, message: String| Err(InvalidConfig { key, message });
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.group_size < 2 {
            return bad(
                "group_size",
                format!("must be at least 2 (one positive and at least one negative), got {}", self.group_size),
            );
        }
        for (key, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_batch_size", self.eval_batch_size),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad("learning_rate", format!("must be >= 0, got {}", self.learning_rate));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", format!("must be >= 0, got {}", self.weight_decay));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", format!("must be in [0, 1], got {}", self.warmup_ratio));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("max_grad_norm", format!("must be >= 0 (0 = no clipping), got {}", self.max_grad_norm));
        }
        if !(self.match_loss.is_finite() && self.match_loss >= 0.0) {
            return bad("match_loss", format!("must be >= 0 (0 = off), got {}", self.match_loss));
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every", "must be at least 1".into());
        }
        if let Mode::Lora(l) = &self.mode {
            if l.r == 0 {
                return bad("lora.r", "must be at least 1".into());
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad("lora.dropout", format!("must be in [0, 1), got {}", l.dropout));
            }
            if l.target_modules.is_empty() {
                return bad("lora.target_modules", "is empty".into());
            }
            for m in &l.target_modules {
                if !super::lora::MODULES.contains(&m.as_str()) {
                    return bad(
                        "lora.target_modules",
                        format!("`{m}` is not one of {}", super::lora::MODULES.join(", ")),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_values_name_their_field() {
        let lora = |r, dropout| TrainConfig {
            mode: Mode::Lora(LoraConfig { r, alpha: 1.0, dropout, target_modules: vec!["q_proj".into()] }),
            ..TrainConfig::default()
        };
        assert_eq!(lora(0, 0.0).validate().unwrap_err().key, "lora.r");
        assert_eq!(lora(1, 1.0).validate().unwrap_err().key, "lora.dropout");
        let e = TrainConfig { grad_accum: 0, ..TrainConfig::default() }.validate().unwrap_err();
        assert_eq!((e.key, e.to_string().as_str()), ("grad_accum", "grad_accum must be at least 1"));
        let e = TrainConfig { group_size: 1, ..TrainConfig::default() }.validate().unwrap_err();
        assert_eq!(e.key, "group_size");
        assert!(e.to_string().contains("got 1"), "{e}");
        assert!(TrainConfig::default().validate().is_ok());
    }
}
