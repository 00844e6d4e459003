//! Evaluation: the metrics users compare models by (EVAL.md).

pub mod metrics;
