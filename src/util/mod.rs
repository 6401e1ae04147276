//! Small leaf helpers shared by the engine and the ML code alike: durable file writes and the
//! seeded generator. Nothing here may depend on another module of the crate, so that every layer
//! can use it without an import cycle or an engine → ML dependency.

pub mod fs;
pub mod rng;
