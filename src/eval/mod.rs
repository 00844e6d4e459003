//! Evaluation: the metrics users compare models by (EVAL.md).

pub mod metrics;
pub mod run;

pub use run::{
    EvalOptions, EvalTiming, Row, Skipped, evaluate, evaluate_timed, read_rows, read_skipped,
    write_reports,
};
