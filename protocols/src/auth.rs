//! The one place every protocol asks who a client is and what it may do.
//! Until device credentials exist (the devices issue), [`Anonymous`] lets
//! everyone in; front ends already call the hook at login and on every
//! publish and subscribe, and answer refusals in their own protocol's terms.

use std::fmt;
use std::net::SocketAddr;

/// Who is logging in.
#[derive(Debug, Clone)]
pub struct Credentials<'a> {
    /// `mqtt`, `amqp`, `http`, `ws`, `sync`.
    pub protocol: &'static str,
    /// User name (MQTT username, AMQP PLAIN user, ...).
    pub username: Option<&'a str>,
    /// Password or token.
    pub password: Option<&'a str>,
    /// MQTT client id, when there is one.
    pub client_id: Option<&'a str>,
    /// Peer address.
    pub peer: Option<SocketAddr>,
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Device id, or `anonymous`.
    pub id: String,
}

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong secret.
    BadCredentials,
    /// Known, but not allowed in (disabled device).
    NotAuthorized,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write events.
    Publish,
    /// Read events.
    Subscribe,
}

/// The authentication and authorization hook.
pub trait Authenticator: Send + Sync + fmt::Debug {
    /// Checks a login.
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<Identity, Refusal>;
    /// May `who` do `action` on `topic` (an MQTT-style topic or filter)?
    fn authorize(&self, who: &Identity, action: Action, topic: &str) -> bool;
}

/// Everyone is `anonymous` and may do everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Anonymous;

impl Authenticator for Anonymous {
    fn authenticate(&self, _: &Credentials<'_>) -> Result<Identity, Refusal> {
        Ok(Identity {
            id: "anonymous".into(),
        })
    }

    fn authorize(&self, _: &Identity, _: Action, _: &str) -> bool {
        true
    }
}
