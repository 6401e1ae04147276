//! A differentiable, padding-aware Qwen3 and the reranker head, with checkpoint I/O.
