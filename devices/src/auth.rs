//! The one place every protocol asks who a client is and what it may do.
//! Front ends call [`login`] when a client connects and
//! [`Authenticator::authorize`] on every publish and subscribe, and answer
//! refusals in their own protocol's terms. [`Anonymous`] lets everyone in;
//! [`crate::Registry`] checks device credentials and ACLs.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Who is logging in.
#[derive(Debug, Clone, Default)]
pub struct Credentials<'a> {
    /// `mqtt`, `amqp`, `http`, `ws`, `sync`.
    pub protocol: &'static str,
    /// User name (MQTT username, AMQP PLAIN user, HTTP Basic user): the device id.
    pub username: Option<&'a str>,
    /// Password or token.
    pub password: Option<&'a str>,
    /// MQTT client id, when there is one.
    pub client_id: Option<&'a str>,
    /// Peer address.
    pub peer: Option<SocketAddr>,
    /// The identity of a client certificate the TLS layer verified (mTLS):
    /// the subject's common name.
    pub certificate: Option<&'a str>,
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Device id, `anonymous`, or `admin` (the HTTP admin token).
    pub id: String,
    /// Which credential logged in (part of the token's hash; 0 for a client
    /// certificate or no credential): a rotated token ends the sessions of
    /// the old one ([`Authenticator::still_valid`]).
    pub credential: u64,
}

impl Identity {
    /// An identity logged in without a token.
    pub fn new(id: impl Into<String>) -> Self {
        Identity {
            id: id.into(),
            credential: 0,
        }
    }

    /// The identity of anonymous access.
    pub fn anonymous() -> Self {
        Identity::new(ANONYMOUS)
    }
}

/// The id of anonymous clients (never a device id).
pub const ANONYMOUS: &str = "anonymous";
/// The id of the admin token's holder (never a device id).
pub const ADMIN: &str = "admin";

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, unknown user or wrong secret.
    BadCredentials,
    /// Known, but not allowed in (disabled device).
    NotAuthorized,
}

impl Refusal {
    /// A short reason for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
        }
    }
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write events.
    Publish,
    /// Read events.
    Subscribe,
}

/// The answer to "may this identity do that?": an expected outcome, so it is
/// a value, with the reason a refusal is counted and logged under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Refused, and why.
    Deny(Denial),
}

/// Why an action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No pattern of the identity's ACL covers the subject (or the identity
    /// is not a known device).
    NotInAcl,
    /// The device is disabled.
    Disabled,
}

impl Decision {
    /// Allowed?
    pub fn allowed(self) -> bool {
        self == Decision::Allow
    }

    /// Allowed when `yes`, else refused for `why`.
    pub fn from_bool(yes: bool, why: Denial) -> Decision {
        if yes {
            Decision::Allow
        } else {
            Decision::Deny(why)
        }
    }
}

impl Denial {
    /// A short reason for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::NotInAcl => "not_in_acl",
            Denial::Disabled => "disabled",
        }
    }
}

/// The authentication and authorization hook.
pub trait Authenticator: Send + Sync + fmt::Debug {
    /// Checks a login. Failures are counted per source address by
    /// implementations that slow down guessing (see [`Authenticator::login_delay`]).
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<Identity, Refusal>;

    /// May `who` do `action` on `subject`? For [`Action::Publish`] the subject
    /// is a name (MQTT topic, `topic` or `topic/key`); for [`Action::Subscribe`]
    /// it may be an MQTT-style filter (`topic/#` for a whole log topic).
    fn authorize(&self, who: &Identity, action: Action, subject: &str) -> Decision;

    /// How long the answer to a login from `peer` waits: grows with the
    /// recent failures of that address, whatever the outcome (so a guesser
    /// cannot tell a hit by its speed), except for a device that logged in
    /// successfully from there recently. Zero by default.
    fn login_delay(&self, _peer: Option<SocketAddr>, _outcome: Option<&Identity>) -> Duration {
        Duration::ZERO
    }

    /// Request-style admission (HTTP): zero when `events` may go now (they
    /// are taken, possibly into debt); otherwise how long until the limit
    /// has caught up, taking nothing (the caller refuses with a retry time).
    fn admit(&self, _who: &Identity, _events: u32) -> Duration {
        Duration::ZERO
    }

    /// Takes `events` from `who`'s rate limit even when that runs into debt,
    /// and says how long until the debt is paid: streaming front ends stop
    /// reading that long, so the client is slowed rather than refused.
    fn pace(&self, _who: &Identity, _events: u32) -> Duration {
        Duration::ZERO
    }

    /// May `who` know that `topic` exists (list and describe it)? True when
    /// any of its publish or subscribe patterns reaches into the topic.
    fn may_see(&self, _who: &Identity, _topic: &str) -> bool {
        true
    }

    /// Is `who` still let in (not disabled, removed or given a new token
    /// since it logged in)? Long-lived connections ask this when
    /// [`Authenticator::generation`] changes.
    fn still_valid(&self, _who: &Identity) -> bool {
        true
    }

    /// A number that changes whenever devices change (added, changed,
    /// rotated, removed): connections re-check their rights when it moves.
    fn generation(&self) -> u64 {
        0
    }

    /// Is device authentication on (false for anonymous access)?
    fn enforcing(&self) -> bool {
        true
    }
}

/// May `who` delete topics and change their settings? Anyone while devices
/// are not enforced; with device auth only the admin token's holder (a
/// device's ACL speaks of publishing and reading, not of destroying data).
pub fn may_administer(auth: &dyn Authenticator, who: &Identity) -> bool {
    !auth.enforcing() || who.id == ADMIN
}

/// Checks a login, then waits out the source's failure delay before the
/// answer. Every front end logs clients in through here.
pub async fn login(auth: &dyn Authenticator, creds: &Credentials<'_>) -> Result<Identity, Refusal> {
    let outcome = auth.authenticate(creds);
    let delay = auth.login_delay(creds.peer, outcome.as_ref().ok());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    outcome
}

/// Everyone is `anonymous` and may do everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Anonymous;

impl Authenticator for Anonymous {
    fn authenticate(&self, _: &Credentials<'_>) -> Result<Identity, Refusal> {
        Ok(Identity::anonymous())
    }

    fn authorize(&self, _: &Identity, _: Action, _: &str) -> Decision {
        Decision::Allow
    }

    fn enforcing(&self) -> bool {
        false
    }
}
