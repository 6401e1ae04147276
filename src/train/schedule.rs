//! Linear warmup then linear decay to zero, exactly as transformers'
//! `get_linear_schedule_with_warmup` (the Trainer default), so that runs compare with the PyTorch
//! script this project replaces.

/// `lr(k)` for the optimizer step with 0-based index `k` (the number of steps already taken):
/// `base · k / warmup` while `k < warmup`, then `base · (total − k) / (total − warmup)`, never
/// below 0. Like transformers, the very first step has learning rate 0 when there is a warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub base: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// `warmup = ceil(warmup_ratio · total)`, as transformers' `get_warmup_steps`.
    pub fn new(base: f64, warmup_ratio: f64, total: u64) -> Self {
        let warmup = (warmup_ratio * total as f64).ceil() as u64;
        Self { base, warmup, total }
    }

    pub fn lr(&self, step: u64) -> f64 {
        let factor = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            let left = self.total.saturating_sub(step) as f64;
            (left / self.total.saturating_sub(self.warmup).max(1) as f64).max(0.0)
        };
        self.base * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay_at_chosen_steps() {
        // 100 steps, 10% warmup: 0, 1/10, … up to step 10, then (100 − k) / 90.
        let s = Schedule::new(1e-3, 0.1, 100);
        assert_eq!(s.warmup, 10);
        let cases =
            [(0, 0.0), (1, 1e-4), (5, 5e-4), (9, 9e-4), (10, 1e-3), (55, 0.5e-3), (99, 1e-3 / 90.0), (100, 0.0)];
        for (k, want) in cases {
            assert!((s.lr(k) - want).abs() < 1e-15, "step {k}: {} vs {want}", s.lr(k));
        }
        assert_eq!(s.lr(150), 0.0);
        // ceil: 7 steps at 10% warm up for 1 step.
        assert_eq!(Schedule::new(1.0, 0.1, 7).warmup, 1);
        // No warmup starts at the base rate.
        let flat = Schedule::new(2.0, 0.0, 4);
        assert_eq!([flat.lr(0), flat.lr(1), flat.lr(2), flat.lr(3)], [2.0, 1.5, 1.0, 0.5]);
    }
}
