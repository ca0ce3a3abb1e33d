//! Tributary's front ends. Each one only translates: wire frames become
//! [`tributary_storage::Event`]s, the log appends them, and the acknowledgement
//! goes out only after the log says durable.
//!
//! What lives where:
//! - [`listener`]: a TCP listener with a connection limit, shared by every front end.
//! - [`http`]: the HTTP API (axum): topics, produce, fetch, consumer groups,
//!   health, metrics and the OpenAPI document.
//!
//! MQTT, AMQP and WebSocket front ends arrive as their own modules with the
//! same shape: a listener, a handler per connection, one shutdown token.

pub mod http;
pub mod listener;

use tokio_util::sync::CancellationToken;
use tributary_storage::Log;

/// What every front end gets from the gateway.
#[derive(Debug, Clone)]
pub struct FrontendContext {
    /// The one write path.
    pub log: Log,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// `edge` or `core`, for health and stats.
    pub mode: &'static str,
}
