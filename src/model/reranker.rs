//! The Qwen3-Reranker head and the losses the trainer uses.
//!
//! Qwen3-Reranker scores a (query, document) prompt by the next-token logits of "yes" and "no" at
//! the last position: `P(yes) = softmax([no, yes])[1] = sigmoid(yes − no)`. Only two rows of the
//! output projection matter, so the head gathers them (`[2, hidden]`) instead of projecting onto
//! the whole vocabulary (151,936 × hidden per position for Qwen3).

use candle_core::{Tensor, D};

use super::qwen3::Qwen3;
use super::ModelError;

/// Per-row outputs of the head, each `[B]`, differentiable.
#[derive(Debug, Clone)]
pub struct RerankOutput {
    /// The "yes" token's logit at the last position.
    pub yes: Tensor,
    /// The "no" token's logit at the last position.
    pub no: Tensor,
    /// `yes − no`, the reranker logit; `sigmoid(logit)` is `P(yes)`.
    pub logit: Tensor,
}

/// One row's score as plain numbers, for ranking and printing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RerankScore {
    pub logit: f32,
    pub p_yes: f32,
}

/// A Qwen3 decoder plus the yes/no head. The token ids come from the tokenizer (for the real
/// Qwen3 tokenizer "yes" = 9693, "no" = 2152).
#[derive(Debug, Clone)]
pub struct Reranker {
    model: Qwen3,
    yes_id: u32,
    no_id: u32,
    /// `Some([1, hidden])` for a sequence-classification export, whose only head row is
    /// `W_yes − W_no`: its logit is read directly instead of as a difference of two rows.
    score: Option<Tensor>,
}

impl Reranker {
    pub fn new(model: Qwen3, yes_id: u32, no_id: u32) -> Result<Self, ModelError> {
        let vocab = model.config().vocab_size;
        for (what, id) in [("yes", yes_id), ("no", no_id)] {
            if id as usize >= vocab {
                return Err(ModelError::Input(format!(
                    "`{what}` token id {id} is outside the model's vocabulary ({vocab})"
                )));
            }
        }
        if yes_id == no_id {
            return Err(ModelError::Input("the yes and no token ids are equal".into()));
        }
        Ok(Self { model, yes_id, no_id, score: None })
    }

    /// A reranker whose head is one row `score: [1, hidden]` (`Qwen3ForSequenceClassification`
    /// with one label), as [`super::seqcls`] loads it. Its logit equals the causal model's
    /// `yes − no` up to float rounding, because the row is that difference. `yes_id`/`no_id` are
    /// only recorded (the export's tokenizer still has them).
    pub fn with_score_row(model: Qwen3, score: Tensor, yes_id: u32, no_id: u32) -> Result<Self, ModelError> {
        let hidden = model.config().hidden_size;
        if score.dims() != [1, hidden] {
            return Err(ModelError::ShapeMismatch {
                name: "score.weight".into(),
                expected: vec![1, hidden],
                got: score.dims().to_vec(),
            });
        }
        let score = score.to_dtype(model.dtype())?.to_device(model.device())?;
        Ok(Self { model, yes_id, no_id, score: Some(score) })
    }

    /// True when the head is a single score row (a sequence-classification export).
    pub fn is_seq_cls(&self) -> bool {
        self.score.is_some()
    }

    /// The head as two rows `[2, hidden]`, yes first: the LM head's yes and no rows, or the score
    /// row and a zero row, so that [`yes_no`] computes the same `logit` for both forms.
    fn head_rows(&self) -> Result<Tensor, ModelError> {
        match &self.score {
            None => self.model.lm_head_rows(&[self.yes_id, self.no_id]),
            Some(row) => Ok(Tensor::cat(&[row, &row.zeros_like()?], 0)?),
        }
    }

    pub fn model(&self) -> &Qwen3 {
        &self.model
    }

    /// For attaching LoRA adapters or swapping in a trainable copy.
    pub fn model_mut(&mut self) -> &mut Qwen3 {
        &mut self.model
    }

    pub fn into_model(self) -> Qwen3 {
        self.model
    }

    pub fn token_ids(&self) -> (u32, u32) {
        (self.yes_id, self.no_id)
    }

    /// Scores a LEFT-padded batch: `ids`, `attention_mask: [B, T]` (mask 1 = token, 0 = padding).
    ///
    /// With left padding the last position `T-1` is every row's final prompt token. A row whose
    /// last position is padding (right padding) would be scored from a pad, so it is an error; a
    /// row that is padding throughout is allowed and yields a finite, meaningless score.
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<RerankOutput, ModelError> {
        check_left_padded(attention_mask)?;
        let h = self.model.hidden_states(ids, attention_mask)?;
        score_last(&self.model, &h, &self.head_rows()?)
    }

    /// Plain scores for inference: runs on a gradient-free view of the weights so no graph is
    /// kept, whatever the model's trainability.
    pub fn scores(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Vec<RerankScore>, ModelError> {
        let frozen = Reranker {
            model: self.model.detached()?,
            yes_id: self.yes_id,
            no_id: self.no_id,
            score: self.score.as_ref().map(Tensor::detach),
        };
        let out = frozen.forward(ids, attention_mask)?;
        let logits: Vec<f32> = out.logit.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(logits.into_iter().map(|logit| RerankScore { logit, p_yes: sigmoid_f32(logit) }).collect())
    }
}

/// The head on the decoder's output `h: [B, T, H]`: the final norm of the last position (every
/// row's last prompt token, batches being left-padded), then [`yes_no`]. The one place the head is
/// computed, for inference, training and the benchmarks alike.
pub fn score_last(model: &Qwen3, h: &Tensor, rows: &Tensor) -> Result<RerankOutput, ModelError> {
    let t = h.dim(1)?;
    yes_no(&model.final_norm(&h.narrow(1, t - 1, 1)?.squeeze(1)?)?, rows)
}

/// The yes and no logits of final-normed hidden states `x: [N, H]` against the head's two rows
/// `rows: [2, H]` (yes first), and their difference. Training passes rows it gathered itself
/// (a leaf of its own, or the tied embedding's), hence the rows as an argument.
pub fn yes_no(x: &Tensor, rows: &Tensor) -> Result<RerankOutput, ModelError> {
    let logits = x.matmul(&rows.t()?)?; // [N, 2]
    let yes = logits.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let no = logits.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let logit = (&yes - &no)?;
    Ok(RerankOutput { yes, no, logit })
}

fn sigmoid_f32(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn check_left_padded(attention_mask: &Tensor) -> Result<(), ModelError> {
    let rows: Vec<Vec<f32>> = attention_mask
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()
        .map_err(|_| ModelError::Input("attention_mask must be [batch, seq]".into()))?;
    for (r, row) in rows.iter().enumerate() {
        if let Some(bad) = row.iter().find(|v| **v != 0.0 && **v != 1.0) {
            return Err(ModelError::Input(format!("attention_mask row {r} holds {bad}; only 0 and 1 are allowed")));
        }
        let has_token = row.contains(&1.0);
        if has_token && row.last() != Some(&1.0) {
            return Err(ModelError::Input(format!(
                "attention_mask row {r} ends in padding; the reranker needs LEFT-padded batches \
                 (its score is read at the last position)"
            )));
        }
        let first = row.iter().position(|v| *v == 1.0).unwrap_or(row.len());
        if row[first..].contains(&0.0) {
            return Err(ModelError::Input(format!(
                "attention_mask row {r} has padding between tokens; expected left padding only"
            )));
        }
    }
    Ok(())
}

/// `sigmoid(logit)` elementwise, differentiable.
pub fn p_yes(logit: &Tensor) -> Result<Tensor, ModelError> {
    Ok(candle_nn::ops::sigmoid(logit)?)
}

/// Mean binary cross-entropy on logits, `targets` in [0, 1] (soft labels allowed), in the
/// numerically stable form `max(x, 0) − x·y + log(1 + e^{−|x|})` that PyTorch's
/// `binary_cross_entropy_with_logits` uses; it never exponentiates a large positive number.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor, ModelError> {
    let targets = targets.to_dtype(logits.dtype())?;
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let per_row = ((logits.relu()? - (logits * &targets)?)? + softplus_neg_abs)?;
    Ok(per_row.mean_all()?)
}

/// Mean squared error between `P(yes)` and `targets` in [0, 1].
pub fn mse_on_probability(logits: &Tensor, targets: &Tensor) -> Result<Tensor, ModelError> {
    let targets = targets.to_dtype(logits.dtype())?;
    Ok((p_yes(logits)? - targets)?.sqr()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn bce_is_stable_and_matches_the_naive_formula_where_that_is_finite() {
        let x = [-40.0f32, -3.0, -0.5, 0.0, 0.7, 5.0, 60.0];
        let y = [0.0f32, 1.0, 0.5, 1.0, 0.0, 0.25, 1.0];
        let xt = Tensor::new(&x, &Device::Cpu).unwrap();
        let yt = Tensor::new(&y, &Device::Cpu).unwrap();
        let loss = bce_with_logits(&xt, &yt).unwrap().to_scalar::<f32>().unwrap();
        let naive: f64 = x
            .iter()
            .zip(&y)
            .map(|(&x, &y)| {
                let (x, y) = (x as f64, y as f64);
                let p = 1.0 / (1.0 + (-x).exp());
                // log(1 - p) for large x via log(sigmoid(-x)) = -x - log(1 + e^-x)
                let log_1mp = -x - (-x).exp().ln_1p();
                -(y * p.ln() + (1.0 - y) * log_1mp)
            })
            .sum::<f64>()
            / x.len() as f64;
        assert!((loss as f64 - naive).abs() < 1e-5, "{loss} vs {naive}");
    }

    #[test]
    fn bce_gradient_is_sigmoid_minus_target_over_n() {
        let x = Var::new(&[-2.0f32, 0.3, 4.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0.0f32, 1.0, 0.5], &Device::Cpu).unwrap();
        let g = bce_with_logits(x.as_tensor(), &y).unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        for (i, (xv, yv)) in [(-2.0f32, 0.0f32), (0.3, 1.0), (4.0, 0.5)].iter().enumerate() {
            let want = (sigmoid_f32(*xv) - yv) / 3.0;
            assert!((g[i] - want).abs() < 1e-6, "{} vs {want}", g[i]);
        }
    }

    #[test]
    fn mse_on_probability_matches_definition() {
        let x = Tensor::new(&[0.0f32, 2.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let l = mse_on_probability(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        let want = (0.25 + sigmoid_f32(2.0).powi(2)) / 2.0;
        assert!((l - want).abs() < 1e-6);
    }

    #[test]
    fn left_padding_check_rejects_right_padding_and_gaps() {
        let ok = Tensor::new(&[[0u32, 1, 1], [1, 1, 1], [0, 0, 0]], &Device::Cpu).unwrap();
        assert!(check_left_padded(&ok).is_ok());
        let right = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        assert!(check_left_padded(&right).unwrap_err().to_string().contains("LEFT"));
        let gap = Tensor::new(&[[1u32, 0, 1]], &Device::Cpu).unwrap();
        assert!(check_left_padded(&gap).is_err());
        let two = Tensor::new(&[[2u32, 1, 1]], &Device::Cpu).unwrap();
        assert!(check_left_padded(&two).is_err());
    }
}
