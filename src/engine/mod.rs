//! The engine: configuration, DAG, cache keys, the store and the runner. It knows nothing about ML.

pub mod params;
pub mod stage;

pub use params::{ParamError, Params, StageParams};
pub use slots::GpuDemand;
pub use stage::{
    Contract, ExternalInput, JsonMap, Need, Stage, StageContext, StageError, StageOutput, TypedStage, Upstream, When,
};
pub mod compare;
pub mod config;
pub mod dirty;
pub mod executor;
pub mod gc;
#[cfg(test)]
mod gpu_slot_tests;
pub mod graph;
pub mod hashing;
pub mod key;
pub mod remote;
pub mod runner;
pub mod slots;
pub mod slurm;
pub mod store;
pub mod sweep;
pub mod time;
