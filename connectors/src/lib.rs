//! Connectors: sinks that deliver topics to the systems around the node,
//! each reading as a consumer group with a delivery guarantee, configured
//! in the config file (`[[connectors]]`) or at run time
//! (`POST /v1/connectors`, the same JSON).
//!
//! - [`config`], the settings, validated with messages naming the key;
//!   secrets as `${env:NAME}` / `${file:PATH}` references.
//! - [`sink`], the engine every sink runs (positions, batches, retries,
//!   dead letters, commits after delivery).
//! - [`http_sink`], webhooks.
//! - [`postgres_sink`], rows in PostgreSQL, exactly once.
//! - [`mqtt`], the bridge to an outside MQTT broker (sink and source), over
//!   [`mqtt_link`].
//! - [`kafka`], the Kafka sink and source, exactly once, over
//!   [`kafka_link`].
//! - [`manager`], the node's connectors, their state and counters
//!   (`/v1/stats` section `connectors`, `tributary_connector_*` metrics).
//! - [`api`], the routes of `/v1/connectors`.

pub mod api;
pub mod config;
pub mod http_sink;
pub mod kafka;
pub mod kafka_link;
pub mod manager;
pub mod mqtt;
pub mod mqtt_link;
pub mod postgres_sink;
pub mod sink;

pub use config::ConnectorConfig;
pub use manager::{check_at_start, Manager};
