//! `[auth]`: who may connect (anonymous access or device credentials), the
//! device admin API's token and the key of the device token hashes.

use serde::Deserialize;

/// `auth.mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may connect, publish and read (a warning when not on loopback).
    #[default]
    Anonymous,
    /// Device credentials and ACLs from the registry.
    Devices,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AuthSection {
    /// `anonymous` or `devices`.
    pub mode: AuthMode,
    /// Bearer token of the device admin API (`/v1/devices`); none: the API is off.
    pub admin_token: Option<String>,
    /// Key of the device token hashes; none: a random key kept in the data directory.
    pub token_key: Option<String>,
}
