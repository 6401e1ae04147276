//! GPU slots: one pool per `pipe` process, shared by every thread that runs stages (the points of a
//! sweep under `--jobs`), so that concurrent compute stages get GPUs of their own.
//!
//! Each GPU has `stages_per_gpu` slots (1 by default: never two stages on one GPU). A stage that
//! wants `n` GPUs waits until `n` distinct GPUs have a free slot and takes them all at once: a stage
//! never holds some GPUs while waiting for others, and a holder never waits for anything else
//! (the runner takes a stage's slots after its store lock, releases them when it ends), so waiting
//! cannot deadlock. Stages that need no GPU never come here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// What a stage asks of the pool, from its parameters (see [`super::Stage::gpus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuDemand {
    /// Computes on the CPU: never waits, is given no GPU.
    #[default]
    None,
    /// Wants `gpus_per_stage` GPUs from the pool. `optional`: the stage also runs without one
    /// (`device = "auto"` falls back to the CPU), so an empty pool is not an error for it.
    Slots { optional: bool },
    /// Pinned by the user to this ordinal (`device = "cuda:N"`): it waits for that GPU's slot when
    /// the pool manages it, and runs unmanaged when the pool does not list it.
    Pinned(usize),
}

/// Why a stage could not be given GPUs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("needs {wanted} GPU(s) but the run has {have} ({gpus})")]
    TooFew { wanted: usize, have: usize, gpus: String },
    #[error("interrupted while waiting for a GPU")]
    Cancelled,
}

#[derive(Debug)]
pub struct GpuPool {
    /// The ordinals handed out, in the order given (`--gpus 3,1` prefers 3).
    gpus: Vec<usize>,
    per_stage: usize,
    per_gpu: usize,
    /// Stages holding each GPU, by position in `gpus`.
    busy: Mutex<Vec<usize>>,
    freed: Condvar,
}

impl GpuPool {
    pub fn new(gpus: Vec<usize>, per_stage: usize, per_gpu: usize) -> Self {
        let busy = Mutex::new(vec![0; gpus.len()]);
        GpuPool { gpus, per_stage: per_stage.max(1), per_gpu: per_gpu.max(1), busy, freed: Condvar::new() }
    }

    pub fn gpus(&self) -> &[usize] {
        &self.gpus
    }

    /// How many GPUs (which ones, for a pinned stage) a demand takes from this pool, or why it
    /// cannot be met. Checked for every stage before a run starts, so an impossible demand is a
    /// configuration error then, not a stage waiting forever.
    pub fn plan(&self, demand: GpuDemand) -> Result<Want, SlotError> {
        match demand {
            GpuDemand::None => Ok(Want::Nothing),
            GpuDemand::Slots { optional: true } if self.gpus.is_empty() => Ok(Want::Nothing),
            GpuDemand::Slots { .. } if self.per_stage > self.gpus.len() => Err(SlotError::TooFew {
                wanted: self.per_stage,
                have: self.gpus.len(),
                gpus: if self.gpus.is_empty() {
                    "none".into()
                } else {
                    format!("GPUs {}", super::executor::join(&self.gpus))
                },
            }),
            GpuDemand::Slots { .. } => Ok(Want::Any(self.per_stage)),
            GpuDemand::Pinned(g) => Ok(self.gpus.iter().position(|x| *x == g).map_or(Want::Nothing, Want::On)),
        }
    }

    /// Take the GPUs `want` names, waiting while they are busy. `waiting` is called once, with the
    /// number of busy GPUs, when the stage has to wait. Polls `cancel` so Ctrl-C ends the wait.
    pub fn acquire(
        &self,
        want: Want,
        cancel: &AtomicBool,
        waiting: &mut dyn FnMut(usize),
    ) -> Result<SlotGuard<'_>, SlotError> {
        let n = match want {
            Want::Nothing => return Ok(SlotGuard { pool: self, held: Vec::new() }),
            Want::Any(n) if n > self.gpus.len() => {
                return Err(SlotError::TooFew {
                    wanted: n,
                    have: self.gpus.len(),
                    gpus: super::executor::join(&self.gpus),
                })
            }
            Want::Any(n) => n,
            Want::On(_) => 1,
        };
        let mut busy = self.busy.lock().expect("gpu pool lock");
        let mut told = false;
        loop {
            let free: Vec<usize> = match want {
                Want::On(i) => (busy[i] < self.per_gpu).then_some(i).into_iter().collect(),
                _ => {
                    // The least used first, then the order given: spreads stages over the GPUs.
                    let mut free: Vec<usize> = (0..self.gpus.len()).filter(|&i| busy[i] < self.per_gpu).collect();
                    free.sort_by_key(|&i| busy[i]);
                    free
                }
            };
            if free.len() >= n {
                let held: Vec<usize> = free[..n].to_vec();
                for &i in &held {
                    busy[i] += 1;
                }
                return Ok(SlotGuard { pool: self, held });
            }
            if cancel.load(Ordering::SeqCst) {
                return Err(SlotError::Cancelled);
            }
            if !told {
                told = true;
                waiting(busy.iter().filter(|b| **b >= self.per_gpu).count());
            }
            busy = self.freed.wait_timeout(busy, Duration::from_millis(200)).expect("gpu pool lock").0;
        }
    }
}

/// A planned demand on the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Nothing,
    /// Any `n` distinct GPUs.
    Any(usize),
    /// The GPU at this position in the pool's list.
    On(usize),
}

/// GPUs held by one running stage; given back when dropped, even when the stage panics.
pub struct SlotGuard<'a> {
    pool: &'a GpuPool,
    /// Positions in the pool's list.
    held: Vec<usize>,
}

impl SlotGuard<'_> {
    /// The ordinals held, the first being the one the stage computes on.
    pub fn ordinals(&self) -> Vec<usize> {
        self.held.iter().map(|&i| self.pool.gpus[i]).collect()
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut busy = self.pool.busy.lock().unwrap_or_else(|p| p.into_inner());
        for &i in &self.held {
            busy[i] -= 1;
        }
        self.pool.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_name_impossible_demands() {
        let pool = GpuPool::new(vec![2, 5], 2, 1);
        assert_eq!(pool.plan(GpuDemand::None), Ok(Want::Nothing));
        assert_eq!(pool.plan(GpuDemand::Slots { optional: false }), Ok(Want::Any(2)));
        assert_eq!(pool.plan(GpuDemand::Pinned(5)), Ok(Want::On(1)));
        assert_eq!(pool.plan(GpuDemand::Pinned(0)), Ok(Want::Nothing), "a GPU outside the pool runs unmanaged");
        let three = GpuPool::new(vec![0, 1], 3, 1);
        let e = three.plan(GpuDemand::Slots { optional: false }).unwrap_err();
        assert_eq!(e.to_string(), "needs 3 GPU(s) but the run has 2 (GPUs 0,1)");
        let none = GpuPool::new(vec![], 1, 1);
        assert_eq!(none.plan(GpuDemand::Slots { optional: true }), Ok(Want::Nothing));
        assert!(none.plan(GpuDemand::Slots { optional: false }).is_err());
    }

    #[test]
    fn slots_are_exclusive_and_given_back() {
        let pool = GpuPool::new(vec![3, 1], 1, 1);
        let cancel = AtomicBool::new(false);
        let a = pool.acquire(Want::Any(1), &cancel, &mut |_| panic!("a free GPU")).unwrap();
        let b = pool.acquire(Want::Any(1), &cancel, &mut |_| panic!("a free GPU")).unwrap();
        assert_eq!((a.ordinals(), b.ordinals()), (vec![3], vec![1]));
        // Both busy: a third waits, says so, and gets the GPU freed by `a`.
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let mut told = None;
                let c = pool.acquire(Want::Any(1), &cancel, &mut |busy| told = Some(busy)).unwrap();
                (c.ordinals(), told)
            });
            std::thread::sleep(Duration::from_millis(100));
            drop(a);
            assert_eq!(t.join().unwrap(), (vec![3], Some(2)));
        });
        // Cancelled while waiting: an error, not a hang.
        cancel.store(true, Ordering::SeqCst);
        let two = pool.acquire(Want::Any(2), &cancel, &mut |_| {});
        assert_eq!(two.err(), Some(SlotError::Cancelled));
    }

    #[test]
    fn stages_per_gpu_lets_stages_share() {
        let pool = GpuPool::new(vec![0], 1, 2);
        let cancel = AtomicBool::new(false);
        let a = pool.acquire(Want::Any(1), &cancel, &mut |_| panic!("two slots on GPU 0")).unwrap();
        let b = pool.acquire(Want::On(0), &cancel, &mut |_| panic!("two slots on GPU 0")).unwrap();
        assert_eq!((a.ordinals(), b.ordinals()), (vec![0], vec![0]));
    }
}
