//! Stage kinds. Each is one module behind [`crate::engine::Stage`]; `registry` lists them.

use crate::engine::Stage;

pub mod tokenize;

/// Every stage kind this binary knows, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![Box::new(tokenize::Tokenize)]
}
