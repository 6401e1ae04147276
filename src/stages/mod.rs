//! Stage kinds. Each is one module behind [`crate::engine::Stage`]; `registry` lists them.
//!
//! The data stages hand each other CSV tables in the format of [`table`]:
//! `load` (raw files → table) → `normalize` (canonical text) → `split` (train/val/test + labels).

use crate::engine::{ParamError, Stage};

pub mod analyze;
pub mod evaluate;
pub mod export;
pub mod hub;
pub mod load;
pub mod normalize;
pub mod split;
pub mod table;
pub mod tokenize;
pub mod train;

#[cfg(test)]
mod tests;

/// The `device` parameter of a stage that computes, against what this build can compute on (the
/// shared half of `train`'s and `evaluate`'s [`crate::engine::TypedStage::available`]).
fn device_available(spec: &str) -> Result<(), ParamError> {
    use crate::model::{device::DeviceSpec, ModelError};
    spec.parse::<DeviceSpec>().and_then(DeviceSpec::available).map_err(|e| match e {
        ModelError::Config(message) => ParamError::new("device", message),
        other => ParamError::new("device", other),
    })
}

/// Every stage kind this binary knows, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![
        Box::new(load::Load),
        Box::new(normalize::Normalize),
        Box::new(split::Split),
        Box::new(tokenize::Tokenize),
        Box::new(evaluate::Evaluate),
        Box::new(analyze::Analyze),
        Box::new(train::Train),
        Box::new(export::Export),
    ]
}
