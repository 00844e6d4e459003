//! Evaluation: the metrics users compare models by (EVAL.md).

pub mod metrics;
pub mod run;

pub use run::{EvalOptions, Row, Skipped, evaluate, read_rows, read_skipped, write_reports};
