//! Ranking and classification metrics as pure functions.
