//! Stream processing: continuous SQL pipelines. Each pipeline is one
//! `INSERT INTO out SELECT … FROM in …` statement that reads a topic (and,
//! for a join, a second one) and writes its rows to a topic through the
//! log's one write path, exactly once across crashes.
//!
//! - [`plan`]: the SQL, parsed by `sqlparser`, compiled into a [`plan::Plan`].
//! - [`expr`] and [`value`]: expressions and the values they compute.
//! - [`agg`]: aggregates and their checkpointable accumulators.
//! - [`engine`]: the operator (filters, projections, windows, joins,
//!   watermarks, limits) over one record at a time.
//! - [`runner`]: a pipeline's task: reads in checkpointed steps, writes the
//!   rows with their origin, recovers after a crash without loss or
//!   repetition.
//! - [`manager`] and [`api`]: the node's pipelines, `/v1/pipelines`, stats
//!   and metrics.

pub mod agg;
pub mod api;
pub mod engine;
pub mod expr;
pub mod manager;
pub mod plan;
pub mod runner;
pub mod value;

pub use manager::Manager;
pub use plan::{compile, Plan, SqlError};
