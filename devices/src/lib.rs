//! Device identities for every protocol: a registry of devices with token
//! hashes, per-topic ACLs and rate limits, and the [`auth::Authenticator`]
//! hook the front ends call. One decision, made the same way for MQTT, AMQP,
//! HTTP, WebSockets and the sync link.

pub mod acl;
pub mod auth;
pub mod registry;
pub mod throttle;

pub use auth::{Action, Anonymous, Authenticator, Credentials, Identity, Refusal};
pub use registry::{
    Device, DeviceError, DevicePatch, DeviceView, NewDevice, Registry, RegistryConfig,
};
