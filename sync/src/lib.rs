//! Store-and-forward from edge to core: every event of a forwarded topic
//! reaches the core exactly once, in order per partition and lane, across
//! any number of disconnects, restarts and crashes of either side
//! (`docs/design.md`, section 6; `docs/contract.md`, section 7).
//!
//! What lives where:
//! - [`wire`]: the frames (postcard over WebSocket binary messages), the
//!   records block and its compression: the format, written down.
//! - [`core`]: the core's `/v1/sync` receiver: authentication, held ranges
//!   per (edge, topic, partition), dedup, append, acknowledgement after
//!   durable, checkpoints and their recovery from the log.
//! - [`edge`]: the edge's uploader: one connection, live and backlog lanes,
//!   priorities, window, bandwidth cap, compression, heartbeats, reconnects,
//!   cursors, lag.
//! - [`ranges`]: offset range sets, the state both sides keep.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`error`]: [`Error`], the crate's one error type.
//!
//! Nothing here speaks HTTP or knows the gateway: `gateway/` mounts
//! [`core::SyncCore::serve`] at `/v1/sync` and runs [`edge::Uploader`].

pub use tributary_storage::util::backoff;
pub mod core;
pub mod edge;
pub mod error;
mod metrics;
pub mod ranges;
pub mod wire;

pub use crate::core::{CoreConfig, EdgeStream, OnMessage, SyncCore, SyncPeer};
pub use crate::edge::{client_config as tls_client_config, TopicRule, Uploader, UpstreamConfig};
pub use crate::error::{Error, Result};
