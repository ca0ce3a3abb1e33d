//! Device identities for every protocol: a registry of devices with token
//! hashes, per-topic ACLs and rate limits, and the [`auth::Authenticator`]
//! hook the front ends call. One decision, made the same way for MQTT, AMQP,
//! HTTP, WebSockets and the sync link.
//!
//! - [`auth`]: the [`Authenticator`] hook, [`Anonymous`], identities and refusals.
//! - [`registry`]: the device registry, kept in the log's metadata.
//! - [`acl`]: ACL patterns (MQTT-style filters) and how subjects match them.
//! - [`throttle`]: the failed-login table and per-device rate limits.

pub mod acl;
pub mod auth;
pub mod registry;
pub mod throttle;

pub use auth::{
    Action, Anonymous, Authenticator, Credentials, Decision, Denial, Identity, Refusal,
};
pub use registry::{
    Device, DeviceError, DevicePatch, DeviceView, NewDevice, Registry, RegistryConfig,
};
