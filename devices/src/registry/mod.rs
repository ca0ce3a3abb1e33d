//! The device registry: identities, token hashes, ACLs and rate limits, kept
//! in the log's metadata (space `devices`, one JSON document per device) and
//! cached in memory, so a login costs one HMAC and no disk access.
//!
//! Tokens are 256 random bits, shown once. We store HMAC-SHA256(key, token)
//! and compare in constant time (`ring::hmac::verify`). A slow password hash
//! (argon2) protects guessable human passwords; a random 256-bit token cannot
//! be guessed, and argon2 at its recommended cost (19 MiB, several ms per
//! check) would cap logins at a few hundred per second per core and let a
//! reconnect storm exhaust a small gateway's memory (README, "Devices").
//!
//! This file holds the [`Registry`], its settings and errors, opening it and
//! the [`Authenticator`] hook; the rest is by concern:
//!
//! - `devices.rs`: the device records, the in-memory cache, id and ACL pattern
//!   validation and the admin API's operations (add, list, get, update,
//!   rotate, remove).
//! - `tokens.rs`: tokens and their hashes, the admin token, the credential check.
//! - `limits.rs`: the delays after failed logins and per-device rate limits.
//! - `persist.rs`: devices and their last-seen times written to the log.
//! - `metrics.rs`: the login counters and their Prometheus text.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tributary_storage::Log;

use crate::acl;
use crate::auth::{Action, Authenticator, Credentials, Decision, Denial, Identity, Refusal, ADMIN};
use crate::throttle::{FailureTable, RecentLogins};
use crate::Error;

mod devices;
mod limits;
mod metrics;
mod persist;
mod tokens;

pub use devices::{validate_id, Device, DevicePatch, DeviceView, NewDevice};
use devices::{Devices, Entry};
use metrics::AuthCounters;
use tokens::credential_of;
pub use tokens::TOKEN_PREFIX;

/// The metadata space of device documents.
const SPACE: &str = "devices";
/// The metadata space of the token key.
const KEY_SPACE: &str = "devices-key";
/// The metadata space of the last-seen times (key: the device id; value:
/// milliseconds, big-endian), apart from the devices' documents, so that
/// only the admin API writes those: on a cluster a node's logins never
/// write back a document another node changed.
const SEEN_SPACE: &str = "devices-seen";
/// Source addresses whose failed logins are remembered, at most.
const FAILURE_TABLE: usize = 4096;

/// Registry settings (`[auth]`).
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Check credentials and ACLs (`mode = "devices"`); otherwise anyone may
    /// connect and the registry only answers the admin API.
    pub enforce: bool,
    /// The admin API's bearer token; without one the admin API is off.
    pub admin_token: Option<String>,
    /// Key of the token hash. Without one a random key is kept in the log's
    /// metadata; with one, a copy of the data directory alone does not let
    /// anybody check guesses offline.
    pub token_key: Option<String>,
}

/// The device registry; also the [`Authenticator`] of `mode = "devices"`.
pub struct Registry {
    log: Log,
    enforce: bool,
    key: hmac::Key,
    admin_tag: Option<Vec<u8>>,
    devices: RwLock<Devices>,
    writes: tokio::sync::Mutex<()>,
    failures: FailureTable,
    recent: RecentLogins,
    generation: AtomicU64,
    counters: AuthCounters,
    rng: SystemRandom,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("enforce", &self.enforce)
            .field("devices", &self.read().by_id.len())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch, unsigned (the registry's last-seen times).
pub fn now_ms() -> u64 {
    u64::try_from(tributary_storage::util::now_ms()).unwrap_or(0)
}

impl Registry {
    /// Opens the registry on `log`'s metadata, creating the token key on
    /// first use.
    pub async fn open(log: Log, config: RegistryConfig) -> Result<Registry, Error> {
        let rng = SystemRandom::new();
        let key_bytes = match &config.token_key {
            Some(k) if !k.is_empty() => ring::digest::digest(&ring::digest::SHA256, k.as_bytes())
                .as_ref()
                .to_vec(),
            _ => match log.meta_get(KEY_SPACE, b"hmac-sha256")? {
                Some(k) if k.len() == 32 => k,
                _ => {
                    let mut k = vec![0u8; 32];
                    rng.fill(&mut k)
                        .map_err(|_| Error::Invalid("no system randomness".into()))?;
                    // The first key written wins: in a cluster, nodes started
                    // at once agree on one.
                    log.put_meta_if_absent(KEY_SPACE, b"hmac-sha256", k).await?
                }
            },
        };
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key_bytes);
        let admin_tag = config
            .admin_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| hmac::sign(&key, t.as_bytes()).as_ref().to_vec());
        let mut devices = Devices::default();
        let seen = persist::seen_times(&log)?;
        for (k, v) in log.meta(SPACE)? {
            let id = String::from_utf8_lossy(&k).into_owned();
            let last_seen = seen.get(&id).copied().unwrap_or(0);
            let entry = serde_json::from_slice::<Device>(&v)
                .map_err(|e| Error::Invalid(format!("stored device `{id}`: {e}")))
                .and_then(|d| Entry::new(d, last_seen));
            match entry {
                Ok(e) => {
                    devices.by_tag.insert(e.tag.clone(), e.device.id.clone());
                    devices.by_id.insert(e.device.id.clone(), Arc::new(e));
                }
                Err(e) => tracing::error!(error = %e, "skipping a device that does not parse"),
            }
        }
        Ok(Registry {
            log,
            enforce: config.enforce,
            key,
            admin_tag,
            devices: RwLock::new(devices),
            writes: tokio::sync::Mutex::new(()),
            failures: FailureTable::new(FAILURE_TABLE),
            recent: RecentLogins::new(FAILURE_TABLE),
            generation: AtomicU64::new(0),
            counters: AuthCounters::default(),
            rng,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Devices> {
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Devices> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.read().by_id.get(id).cloned()
    }

    /// Does this registry check credentials (`mode = "devices"`)?
    pub fn enforcing(&self) -> bool {
        self.enforce
    }
}

impl Authenticator for Registry {
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<Identity, Refusal> {
        if !self.enforce {
            return Ok(Identity::anonymous());
        }
        let result = self.check(creds);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(r) => r.reason(),
        };
        *self
            .counters
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((creds.protocol, outcome))
            .or_default() += 1;
        // A client that presented nothing (a scraper, a misconfigured probe)
        // is refused but not counted: only guesses slow a source down.
        let presented =
            creds.certificate.is_some() || creds.password.is_some_and(|p| !p.is_empty());
        if let (Some(peer), Err(_), true) = (creds.peer, &result, presented) {
            self.failures.failed(peer.ip());
        }
        result
    }

    fn authorize(&self, who: &Identity, action: Action, subject: &str) -> Decision {
        if who.id == ADMIN || !self.enforce {
            return Decision::Allow;
        }
        let decision = match self.entry(&who.id) {
            None => Decision::Deny(Denial::NotInAcl),
            Some(e) if !e.device.enabled => Decision::Deny(Denial::Disabled),
            Some(e) => {
                let patterns = match action {
                    Action::Publish => &e.device.publish,
                    Action::Subscribe => &e.device.subscribe,
                };
                let covered = patterns.iter().any(|p| acl::covers(p, subject));
                Decision::from_bool(covered, Denial::NotInAcl)
            }
        };
        if !decision.allowed() {
            let action = match action {
                Action::Publish => "publish",
                Action::Subscribe => "subscribe",
            };
            *self
                .counters
                .denied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(action)
                .or_default() += 1;
        }
        decision
    }

    fn may_see(&self, who: &Identity, topic: &str) -> bool {
        if who.id == ADMIN || !self.enforce {
            return true;
        }
        let space = format!("{topic}/#");
        self.entry(&who.id).is_some_and(|e| {
            e.device.enabled
                && e.device
                    .publish
                    .iter()
                    .chain(&e.device.subscribe)
                    .any(|p| acl::overlap(p, &space))
        })
    }

    fn still_valid(&self, who: &Identity) -> bool {
        if who.id == ADMIN || !self.enforce {
            return true;
        }
        self.entry(&who.id).is_some_and(|e| {
            e.device.enabled && (who.credential == 0 || who.credential == credential_of(&e.tag))
        })
    }

    fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    fn login_delay(&self, peer: Option<SocketAddr>, outcome: Option<&Identity>) -> Duration {
        if !self.enforce {
            return Duration::ZERO;
        }
        self.delay_for(peer, outcome.map(|i| i.id.as_str()))
    }

    fn admit(&self, who: &Identity, events: u32) -> Duration {
        self.limit(who, |b| b.admit(events))
    }

    fn pace(&self, who: &Identity, events: u32) -> Duration {
        self.limit(who, |b| b.take(events))
    }

    fn enforcing(&self) -> bool {
        self.enforce
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tributary_storage::{LogConfig, SledOptions};

    pub(super) async fn open(dir: &std::path::Path, config: RegistryConfig) -> (Log, Registry) {
        let log = Log::open(dir, &SledOptions::default(), LogConfig::default()).unwrap();
        let reg = Registry::open(log.clone(), config).await.unwrap();
        (log, reg)
    }

    pub(super) fn enforcing() -> RegistryConfig {
        RegistryConfig {
            enforce: true,
            admin_token: Some("admin-secret".into()),
            token_key: None,
        }
    }

    pub(super) fn creds<'a>(user: Option<&'a str>, pass: Option<&'a str>) -> Credentials<'a> {
        Credentials {
            protocol: "mqtt",
            username: user,
            password: pass,
            peer: Some("10.1.2.3:5000".parse().unwrap()),
            ..Credentials::default()
        }
    }

    #[tokio::test]
    async fn refusals_and_acls() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        let (_, token) = reg
            .add(NewDevice {
                id: "t1".into(),
                publish: vec!["sensors/+/temp".into()],
                subscribe: vec!["alerts/#".into()],
                ..NewDevice::default()
            })
            .await
            .unwrap();
        assert_eq!(
            reg.authenticate(&creds(None, None)),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            reg.authenticate(&creds(Some("t1"), Some("trb_wrong"))),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            reg.authenticate(&creds(Some("nobody"), Some(&token))),
            Err(Refusal::BadCredentials)
        );
        let who = reg.authenticate(&creds(Some("t1"), Some(&token))).unwrap();
        assert!(reg
            .authorize(&who, Action::Publish, "sensors/a/temp")
            .allowed());
        assert_eq!(
            reg.authorize(&who, Action::Publish, "sensors/a/hum"),
            Decision::Deny(Denial::NotInAcl)
        );
        assert!(!reg
            .authorize(&who, Action::Subscribe, "sensors/a/temp")
            .allowed());
        assert!(reg.authorize(&who, Action::Subscribe, "alerts/#").allowed());
        assert!(!reg.authorize(&who, Action::Subscribe, "#").allowed());
        assert!(!reg
            .authorize(&Identity::anonymous(), Action::Publish, "sensors/a/temp")
            .allowed());
        // Disabled: refused at login, and an open session loses its rights.
        reg.update(
            "t1",
            DevicePatch {
                enabled: Some(false),
                ..DevicePatch::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            reg.authenticate(&creds(Some("t1"), Some(&token))),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            reg.authorize(&who, Action::Publish, "sensors/a/temp"),
            Decision::Deny(Denial::Disabled)
        );
        // A certificate names the device without a password.
        reg.update(
            "t1",
            DevicePatch {
                enabled: Some(true),
                ..DevicePatch::default()
            },
        )
        .await
        .unwrap();
        let by_cert = Credentials {
            certificate: Some("t1"),
            ..creds(None, None)
        };
        assert_eq!(reg.authenticate(&by_cert).unwrap().id, "t1");
        let mismatch = Credentials {
            certificate: Some("t1"),
            ..creds(Some("t2"), None)
        };
        assert_eq!(reg.authenticate(&mismatch), Err(Refusal::BadCredentials));
        reg.remove("t1").await.unwrap();
        assert_eq!(
            reg.authenticate(&creds(Some("t1"), Some(&token))),
            Err(Refusal::BadCredentials)
        );
        assert!(!reg.authorize(&who, Action::Subscribe, "alerts/#").allowed());
    }

    #[tokio::test]
    async fn anonymous_mode_lets_everyone_in() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), RegistryConfig::default()).await;
        let who = reg.authenticate(&creds(None, None)).unwrap();
        assert!(reg.authorize(&who, Action::Publish, "anything").allowed());
        assert!(!reg.admin_configured());
        assert!(!reg.is_admin(""));
    }
}
