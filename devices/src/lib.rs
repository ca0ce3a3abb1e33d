//! Device identities for every protocol: a registry of devices with token
//! hashes, per-topic ACLs and rate limits, and the [`auth::Authenticator`]
//! hook the front ends call. One decision, made the same way for MQTT, AMQP,
//! HTTP, WebSockets and the sync link.
//!
//! - [`auth`]: the [`Authenticator`] hook, [`Anonymous`], identities and refusals.
//! - [`registry`]: the device registry, kept in the log's metadata.
//! - [`acl`]: ACL patterns (MQTT-style filters) and how subjects match them.
//! - [`throttle`]: the failed-login table and per-device rate limits.
//! - [`error`]: [`Error`], the crate's one error type.

pub mod acl;
pub mod auth;
pub mod error;
pub mod registry;
pub mod throttle;

pub use auth::{
    Action, Anonymous, Authenticator, Credentials, Decision, Denial, Identity, Refusal,
};
pub use error::Error;
pub use registry::{Device, DevicePatch, DeviceView, NewDevice, Registry, RegistryConfig};
