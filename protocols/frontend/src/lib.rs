//! What every Tributary front end shares: the node's context
//! ([`FrontendContext`]), the [`Frontend`] trait and the one accept loop
//! ([`serve`]), TCP listeners with a connection limit, TLS, the node-wide
//! memory budget for bytes received, metrics, and the panic hook. The front
//! ends themselves are crates beside this one (`tributary-mqtt`,
//! `tributary-amqp`, `tributary-http`), each depending on this crate, on
//! `tributary-ingest` (the one append path) and never on one another.
//!
//! What lives where:
//! - [`budget`]: the node-wide memory budget for bytes received but not yet
//!   whole (`limits.max_buffered_bytes`).
//! - [`context`]: [`Peer`], [`FrontendContext`], the `/v1/stats` registries.
//! - [`error`]: [`Error`], the crate's one error type (loading the TLS files).
//! - [`listener`]: a TCP listener with a connection limit, shared by every front end.
//! - [`metrics`]: the ack-latency histogram; the writer, registry and typed
//!   reasons of `tributary-telemetry`, re-exported.
//! - [`panics`]: a panic closes only the connection it hit, and is counted.
//! - [`serve`](mod@serve): the [`Frontend`] trait and the one accept loop.
//! - [`tls`]: TLS and mTLS for every listener, with certificate reload.
//! - [`wait`]: an optional deadline and the oldest of a task queue, for `select!`.
//!
//! Every front end has the same shape and names: a `Server` with what its
//! connections share, a `Connection` per client, one shutdown token.

pub mod budget;
pub mod context;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod panics;
pub mod serve;
pub mod tls;
pub mod wait;

pub use context::{ConnectionGauges, FrontendContext, Gauge, Peer, StatsSection, StatsSections};
pub use error::Error;
pub use metrics::{AckHistogram, MetricsHub, MetricsSource, Reason, Reasons, Text, ACK_BUCKETS};
pub use serve::{serve, Frontend};
