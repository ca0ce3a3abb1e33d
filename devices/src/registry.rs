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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tributary_storage::Log;

use crate::acl;
use crate::auth::{Action, Authenticator, Credentials, Identity, Refusal, ADMIN, ANONYMOUS};
use crate::throttle::{Bucket, FailureTable, RecentLogins};

/// The metadata space of device documents.
const SPACE: &str = "devices";
/// The metadata space of the token key.
const KEY_SPACE: &str = "devices-key";
/// Prefix of every token: recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "trb_";
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

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No such device.
    #[error("device `{0}` does not exist")]
    NotFound(String),
    /// The id is taken.
    #[error("device `{0}` already exists")]
    Exists(String),
    /// Bad input; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// The log refused the write.
    #[error(transparent)]
    Storage(#[from] tributary_storage::Error),
}

/// A device as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Device {
    /// Unique id: the MQTT/AMQP user name and the mTLS certificate's CN.
    pub id: String,
    /// Free text for people.
    pub name: String,
    /// HMAC-SHA256 of the token, hex.
    pub token_hash: String,
    /// Disabled devices cannot log in, and lose their rights at once.
    pub enabled: bool,
    /// Patterns the device may publish to.
    pub publish: Vec<String>,
    /// Patterns the device may read and subscribe to.
    pub subscribe: Vec<String>,
    /// Events per second, at most (none: unlimited).
    pub rate_limit: Option<u32>,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// Last successful login (persisted every few seconds).
    pub last_seen_ms: Option<u64>,
}

/// What the API shows of a device (never the hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceView {
    /// Unique id.
    pub id: String,
    /// Free text.
    pub name: String,
    /// May log in.
    pub enabled: bool,
    /// Publish patterns.
    pub publish: Vec<String>,
    /// Subscribe patterns.
    pub subscribe: Vec<String>,
    /// Events per second, at most.
    pub rate_limit: Option<u32>,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// Last successful login.
    pub last_seen_ms: Option<u64>,
}

/// A new device (`POST /v1/devices`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// Unique id.
    pub id: String,
    /// Free text (default: the id).
    #[serde(default)]
    pub name: Option<String>,
    /// Publish patterns (default: none).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Subscribe patterns (default: none).
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Events per second, at most.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A change to a device (`PATCH /v1/devices/{id}`); absent fields stay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// Enable or disable.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// New publish patterns.
    #[serde(default)]
    pub publish: Option<Vec<String>>,
    /// New subscribe patterns.
    #[serde(default)]
    pub subscribe: Option<Vec<String>>,
    /// New rate limit; `0` removes it.
    #[serde(default)]
    pub rate_limit: Option<u32>,
}

struct Entry {
    device: Device,
    tag: Vec<u8>,
    bucket: Option<Arc<Mutex<Bucket>>>,
    last_seen: AtomicU64,
    persisted_seen: AtomicU64,
}

impl Entry {
    fn new(device: Device, last_seen: u64) -> Result<Entry, DeviceError> {
        let tag = from_hex(&device.token_hash).ok_or_else(|| {
            DeviceError::Invalid(format!("device `{}`: bad token hash", device.id))
        })?;
        let seen = device.last_seen_ms.unwrap_or(0).max(last_seen);
        Ok(Entry {
            bucket: device
                .rate_limit
                .map(|r| Arc::new(Mutex::new(Bucket::new(r)))),
            tag,
            persisted_seen: AtomicU64::new(device.last_seen_ms.unwrap_or(0)),
            last_seen: AtomicU64::new(seen),
            device,
        })
    }

    fn view(&self) -> DeviceView {
        let d = &self.device;
        let seen = self.last_seen.load(Relaxed);
        DeviceView {
            id: d.id.clone(),
            name: d.name.clone(),
            enabled: d.enabled,
            publish: d.publish.clone(),
            subscribe: d.subscribe.clone(),
            rate_limit: d.rate_limit,
            created_ms: d.created_ms,
            last_seen_ms: (seen > 0).then_some(seen),
        }
    }

    fn stored(&self) -> Device {
        let mut d = self.device.clone();
        let seen = self.last_seen.load(Relaxed);
        d.last_seen_ms = (seen > 0).then_some(seen);
        d
    }
}

#[derive(Default)]
struct Devices {
    by_id: HashMap<String, Arc<Entry>>,
    by_tag: HashMap<Vec<u8>, String>,
}

/// Login outcomes, per protocol and result.
#[derive(Debug, Default)]
struct AuthCounters {
    logins: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    delayed: AtomicU64,
    denied: Mutex<BTreeMap<&'static str, u64>>,
    limited: AtomicU64,
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

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The part of a token hash an [`Identity`] keeps (never 0).
fn credential_of(tag: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(tag) {
        *d = *s;
    }
    u64::from_be_bytes(b).max(1)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A device id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not `admin` or `anonymous`.
pub fn validate_id(id: &str) -> Result<(), DeviceError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(DeviceError::Invalid(format!(
            "device id must be 1..=128 characters of A-Z a-z 0-9 . _ -, got {id:?}"
        )));
    }
    if id == ADMIN || id == ANONYMOUS {
        return Err(DeviceError::Invalid(format!(
            "device id `{id}` is reserved"
        )));
    }
    Ok(())
}

fn validate_patterns(what: &str, patterns: &[String]) -> Result<(), DeviceError> {
    if patterns.len() > 256 {
        return Err(DeviceError::Invalid(format!("at most 256 {what} patterns")));
    }
    match patterns.iter().find(|p| !acl::valid_pattern(p)) {
        Some(p) => Err(DeviceError::Invalid(format!(
            "{what} pattern {p:?} is not a valid MQTT-style filter"
        ))),
        None => Ok(()),
    }
}

impl Registry {
    /// Opens the registry on `log`'s metadata, creating the token key on
    /// first use.
    pub async fn open(log: Log, config: RegistryConfig) -> Result<Registry, DeviceError> {
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
                        .map_err(|_| DeviceError::Invalid("no system randomness".into()))?;
                    log.put_meta(KEY_SPACE, vec![(b"hmac-sha256".to_vec(), Some(k.clone()))])
                        .await?;
                    k
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
        for (k, v) in log.meta(SPACE)? {
            let id = String::from_utf8_lossy(&k).into_owned();
            let entry = serde_json::from_slice::<Device>(&v)
                .map_err(|e| DeviceError::Invalid(format!("stored device `{id}`: {e}")))
                .and_then(|d| Entry::new(d, 0));
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

    /// Is the admin API on (an admin token configured)?
    pub fn admin_configured(&self) -> bool {
        self.admin_tag.is_some()
    }

    /// Is `token` the admin token? Constant time.
    pub fn is_admin(&self, token: &str) -> bool {
        self.admin_tag
            .as_ref()
            .is_some_and(|tag| hmac::verify(&self.key, token.as_bytes(), tag).is_ok())
    }

    /// Counts a wrong admin token from `peer` as a failed login of that
    /// address (in every auth mode).
    pub fn admin_failure(&self, peer: Option<SocketAddr>) {
        *self
            .counters
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(("admin", "bad_credentials"))
            .or_default() += 1;
        if let Some(p) = peer {
            self.failures.failed(p.ip());
        }
    }

    /// How long the answer to an admin-token check from `peer` waits (in
    /// every auth mode; `ok`: the token was right).
    pub fn admin_delay(&self, peer: Option<SocketAddr>, ok: bool) -> Duration {
        self.delay_for(peer, ok.then_some(ADMIN))
    }

    /// Does this registry check credentials (`mode = "devices"`)?
    pub fn enforcing(&self) -> bool {
        self.enforce
    }

    fn new_token(&self) -> Result<(String, Vec<u8>), DeviceError> {
        let mut secret = [0u8; 32];
        self.rng
            .fill(&mut secret)
            .map_err(|_| DeviceError::Invalid("no system randomness".into()))?;
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let tag = hmac::sign(&self.key, token.as_bytes()).as_ref().to_vec();
        Ok((token, tag))
    }

    async fn store(&self, device: &Device) -> Result<(), DeviceError> {
        let doc = serde_json::to_vec(device)
            .map_err(|e| DeviceError::Invalid(format!("cannot encode device: {e}")))?;
        self.log
            .put_meta(SPACE, vec![(device.id.as_bytes().to_vec(), Some(doc))])
            .await?;
        Ok(())
    }

    /// Puts `device` in the cache, keeping the last-seen time of its predecessor.
    fn install(&self, device: Device, previous: Option<&Entry>) -> Result<Arc<Entry>, DeviceError> {
        let seen = previous.map_or(0, |p| p.last_seen.load(Relaxed));
        let mut entry = Entry::new(device, seen)?;
        // Same limit: the debt carries over (a PATCH must not reset it).
        if let Some(p) = previous.filter(|p| p.device.rate_limit == entry.device.rate_limit) {
            entry.bucket.clone_from(&p.bucket);
        }
        let entry = Arc::new(entry);
        let mut devices = self.write();
        if let Some(p) = previous {
            devices.by_tag.remove(&p.tag);
        }
        devices
            .by_tag
            .insert(entry.tag.clone(), entry.device.id.clone());
        devices.by_id.insert(entry.device.id.clone(), entry.clone());
        self.generation.fetch_add(1, Relaxed);
        Ok(entry)
    }

    /// Adds a device; returns it and its token (shown this once).
    pub async fn add(&self, new: NewDevice) -> Result<(DeviceView, String), DeviceError> {
        validate_id(&new.id)?;
        validate_patterns("publish", &new.publish)?;
        validate_patterns("subscribe", &new.subscribe)?;
        let _w = self.writes.lock().await;
        if self.entry(&new.id).is_some() {
            return Err(DeviceError::Exists(new.id));
        }
        let (token, tag) = self.new_token()?;
        let device = Device {
            name: new.name.unwrap_or_else(|| new.id.clone()),
            id: new.id,
            token_hash: to_hex(&tag),
            enabled: new.enabled.unwrap_or(true),
            publish: new.publish,
            subscribe: new.subscribe,
            rate_limit: new.rate_limit.filter(|r| *r > 0),
            created_ms: now_ms(),
            last_seen_ms: None,
        };
        self.store(&device).await?;
        let entry = self.install(device, None)?;
        Ok((entry.view(), token))
    }

    /// Every device, by id.
    pub fn list(&self) -> Vec<DeviceView> {
        let mut all: Vec<DeviceView> = self.read().by_id.values().map(|e| e.view()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// One device.
    pub fn get(&self, id: &str) -> Result<DeviceView, DeviceError> {
        self.entry(id)
            .map(|e| e.view())
            .ok_or_else(|| DeviceError::NotFound(id.to_owned()))
    }

    /// Changes a device.
    pub async fn update(&self, id: &str, patch: DevicePatch) -> Result<DeviceView, DeviceError> {
        if let Some(p) = &patch.publish {
            validate_patterns("publish", p)?;
        }
        if let Some(p) = &patch.subscribe {
            validate_patterns("subscribe", p)?;
        }
        let _w = self.writes.lock().await;
        let old = self
            .entry(id)
            .ok_or_else(|| DeviceError::NotFound(id.to_owned()))?;
        let mut device = old.stored();
        if let Some(n) = patch.name {
            device.name = n;
        }
        if let Some(e) = patch.enabled {
            device.enabled = e;
        }
        if let Some(p) = patch.publish {
            device.publish = p;
        }
        if let Some(s) = patch.subscribe {
            device.subscribe = s;
        }
        if let Some(r) = patch.rate_limit {
            device.rate_limit = (r > 0).then_some(r);
        }
        self.store(&device).await?;
        Ok(self.install(device, Some(&old))?.view())
    }

    /// A new token for a device; the old one stops working at once.
    pub async fn rotate(&self, id: &str) -> Result<String, DeviceError> {
        let _w = self.writes.lock().await;
        let old = self
            .entry(id)
            .ok_or_else(|| DeviceError::NotFound(id.to_owned()))?;
        let (token, tag) = self.new_token()?;
        let mut device = old.stored();
        device.token_hash = to_hex(&tag);
        self.store(&device).await?;
        self.install(device, Some(&old))?;
        Ok(token)
    }

    /// Removes a device.
    pub async fn remove(&self, id: &str) -> Result<(), DeviceError> {
        let _w = self.writes.lock().await;
        let old = self
            .entry(id)
            .ok_or_else(|| DeviceError::NotFound(id.to_owned()))?;
        self.log
            .put_meta(SPACE, vec![(id.as_bytes().to_vec(), None)])
            .await?;
        let mut devices = self.write();
        devices.by_tag.remove(&old.tag);
        devices.by_id.remove(id);
        self.generation.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Writes the last-seen times that changed since the last call.
    pub async fn persist_last_seen(&self) -> Result<usize, DeviceError> {
        let _w = self.writes.lock().await;
        let changed: Vec<Arc<Entry>> = self
            .read()
            .by_id
            .values()
            .filter(|e| e.last_seen.load(Relaxed) != e.persisted_seen.load(Relaxed))
            .cloned()
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let mut entries = Vec::with_capacity(changed.len());
        let mut written = Vec::with_capacity(changed.len());
        for e in &changed {
            let stored = e.stored();
            let doc = serde_json::to_vec(&stored)
                .map_err(|err| DeviceError::Invalid(format!("cannot encode device: {err}")))?;
            entries.push((e.device.id.as_bytes().to_vec(), Some(doc)));
            written.push(stored.last_seen_ms.unwrap_or(0));
        }
        self.log.put_meta(SPACE, entries).await?;
        // What was written, not what is there now: a login meanwhile stays dirty.
        for (e, seen) in changed.iter().zip(written) {
            e.persisted_seen.store(seen, Relaxed);
        }
        Ok(changed.len())
    }

    /// Persists last-seen times every `every` until `shutdown`, then once more.
    pub fn spawn_persister(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let stop = tokio::select! {
                    () = shutdown.cancelled() => true,
                    () = tokio::time::sleep(every) => false,
                };
                if let Err(e) = me.persist_last_seen().await {
                    tracing::warn!(error = %e, "cannot store device last-seen times");
                }
                if stop {
                    return;
                }
            }
        })
    }

    fn check(&self, creds: &Credentials<'_>) -> Result<Identity, Refusal> {
        let entry = if let Some(cn) = creds.certificate {
            // The TLS layer verified the certificate: its CN is the device.
            if creds.username.is_some_and(|u| !u.is_empty() && u != cn) {
                return Err(Refusal::BadCredentials);
            }
            self.entry(cn).ok_or(Refusal::BadCredentials)?
        } else {
            let secret = creds
                .password
                .filter(|p| !p.is_empty())
                .ok_or(Refusal::BadCredentials)?;
            let found = match creds.username.filter(|u| !u.is_empty()) {
                Some(user) => self.entry(user),
                None => {
                    let tag = hmac::sign(&self.key, secret.as_bytes());
                    let devices = self.read();
                    devices
                        .by_tag
                        .get(tag.as_ref())
                        .and_then(|id| devices.by_id.get(id))
                        .cloned()
                }
            };
            match found {
                Some(e) if hmac::verify(&self.key, secret.as_bytes(), &e.tag).is_ok() => e,
                Some(_) => return Err(Refusal::BadCredentials),
                None => {
                    // As much work as a known device: no timing tells which ids exist.
                    let _ = hmac::verify(&self.key, secret.as_bytes(), &[0u8; 32]);
                    return Err(Refusal::BadCredentials);
                }
            }
        };
        if !entry.device.enabled {
            return Err(Refusal::NotAuthorized);
        }
        entry.last_seen.store(now_ms(), Relaxed);
        Ok(Identity {
            id: entry.device.id.clone(),
            credential: if creds.certificate.is_some() {
                0
            } else {
                credential_of(&entry.tag)
            },
        })
    }

    /// The delay for `peer` (see [`Authenticator::login_delay`]); remembers
    /// a success of `device`.
    fn delay_for(&self, peer: Option<SocketAddr>, device: Option<&str>) -> Duration {
        let Some(ip) = peer.map(|p| p.ip()) else {
            return Duration::ZERO;
        };
        let delay = self.failures.delay(ip);
        if delay.is_zero() {
            // Nothing to exempt from: successes are remembered only for
            // sources that are slowed, so a fleet of good logins costs nothing.
            return delay;
        }
        if let Some(d) = device {
            if self.recent.recent(ip, d) {
                return Duration::ZERO;
            }
            self.recent.succeeded(ip, d);
        }
        self.counters.delayed.fetch_add(1, Relaxed);
        delay
    }

    fn limit(&self, who: &Identity, f: impl FnOnce(&mut Bucket) -> Duration) -> Duration {
        if !self.enforce {
            return Duration::ZERO;
        }
        let Some(entry) = self.entry(&who.id) else {
            return Duration::ZERO;
        };
        let Some(bucket) = &entry.bucket else {
            return Duration::ZERO;
        };
        let wait = f(&mut bucket.lock().unwrap_or_else(|e| e.into_inner()));
        if !wait.is_zero() {
            self.counters.limited.fetch_add(1, Relaxed);
        }
        wait
    }

    /// Prometheus text of the login counters.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP tributary_auth_logins_total Logins by protocol and result.\n");
        out.push_str("# TYPE tributary_auth_logins_total counter\n");
        let logins = self
            .counters
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for ((protocol, result), n) in logins.iter() {
            let _ = writeln!(
                out,
                "tributary_auth_logins_total{{protocol=\"{protocol}\",result=\"{result}\"}} {n}"
            );
        }
        drop(logins);
        out.push_str("# HELP tributary_auth_denied_total Publishes and subscriptions refused by an ACL, by action.\n");
        out.push_str("# TYPE tributary_auth_denied_total counter\n");
        let denied = self
            .counters
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (action, n) in denied.iter() {
            let _ = writeln!(
                out,
                "tributary_auth_denied_total{{action=\"{action}\"}} {n}"
            );
        }
        drop(denied);
        let _ = writeln!(
            out,
            "# HELP tributary_auth_delayed_logins_total Logins delayed because their address failed recently.\n# TYPE tributary_auth_delayed_logins_total counter\ntributary_auth_delayed_logins_total {}",
            self.counters.delayed.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tributary_auth_rate_limited_total Publishes held back by a device's rate limit.\n# TYPE tributary_auth_rate_limited_total counter\ntributary_auth_rate_limited_total {}",
            self.counters.limited.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tributary_auth_failure_addresses Source addresses with recent failed logins (bounded).\n# TYPE tributary_auth_failure_addresses gauge\ntributary_auth_failure_addresses {}",
            self.failures.len()
        );
        let _ = writeln!(
            out,
            "# HELP tributary_devices Registered devices.\n# TYPE tributary_devices gauge\ntributary_devices {}",
            self.read().by_id.len()
        );
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

    fn authorize(&self, who: &Identity, action: Action, subject: &str) -> bool {
        if who.id == ADMIN || !self.enforce {
            return true;
        }
        let allowed = self.entry(&who.id).is_some_and(|e| {
            let patterns = match action {
                Action::Publish => &e.device.publish,
                Action::Subscribe => &e.device.subscribe,
            };
            e.device.enabled && patterns.iter().any(|p| acl::covers(p, subject))
        });
        if !allowed {
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
        allowed
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

    async fn open(dir: &std::path::Path, config: RegistryConfig) -> (Log, Registry) {
        let log = Log::open(dir, &SledOptions::default(), LogConfig::default()).unwrap();
        let reg = Registry::open(log.clone(), config).await.unwrap();
        (log, reg)
    }

    fn enforcing() -> RegistryConfig {
        RegistryConfig {
            enforce: true,
            admin_token: Some("admin-secret".into()),
            token_key: None,
        }
    }

    fn creds<'a>(user: Option<&'a str>, pass: Option<&'a str>) -> Credentials<'a> {
        Credentials {
            protocol: "mqtt",
            username: user,
            password: pass,
            peer: Some("10.1.2.3:5000".parse().unwrap()),
            ..Credentials::default()
        }
    }

    #[tokio::test]
    async fn tokens_log_in_survive_restart_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let token = {
            let (log, reg) = open(dir.path(), enforcing()).await;
            let (view, token) = reg
                .add(NewDevice {
                    id: "pump-1".into(),
                    publish: vec!["sensors/#".into()],
                    ..NewDevice::default()
                })
                .await
                .unwrap();
            assert_eq!(view.id, "pump-1");
            assert!(
                token.starts_with(TOKEN_PREFIX) && token.len() == 47,
                "{token}"
            );
            let who = reg
                .authenticate(&creds(Some("pump-1"), Some(&token)))
                .unwrap();
            assert_eq!(who.id, "pump-1");
            // Bearer style: the token alone.
            assert_eq!(
                reg.authenticate(&creds(None, Some(&token))).unwrap().id,
                "pump-1"
            );
            assert_eq!(reg.persist_last_seen().await.unwrap(), 1);
            log.close().await.unwrap();
            token
        };
        let (_log, reg) = open(dir.path(), enforcing()).await;
        assert!(reg.get("pump-1").unwrap().last_seen_ms.is_some());
        assert_eq!(
            reg.authenticate(&creds(Some("pump-1"), Some(&token)))
                .unwrap()
                .id,
            "pump-1"
        );
        let fresh = reg.rotate("pump-1").await.unwrap();
        assert_ne!(fresh, token);
        assert_eq!(
            reg.authenticate(&creds(Some("pump-1"), Some(&token))),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            reg.authenticate(&creds(None, Some(&token))),
            Err(Refusal::BadCredentials)
        );
        assert!(reg
            .authenticate(&creds(Some("pump-1"), Some(&fresh)))
            .is_ok());
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
        assert!(reg.authorize(&who, Action::Publish, "sensors/a/temp"));
        assert!(!reg.authorize(&who, Action::Publish, "sensors/a/hum"));
        assert!(!reg.authorize(&who, Action::Subscribe, "sensors/a/temp"));
        assert!(reg.authorize(&who, Action::Subscribe, "alerts/#"));
        assert!(!reg.authorize(&who, Action::Subscribe, "#"));
        assert!(!reg.authorize(&Identity::anonymous(), Action::Publish, "sensors/a/temp"));
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
        assert!(!reg.authorize(&who, Action::Publish, "sensors/a/temp"));
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
        assert!(!reg.authorize(&who, Action::Subscribe, "alerts/#"));
    }

    #[tokio::test]
    async fn bad_input_and_admin() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        for id in ["", "admin", "anonymous", "a b", "x/y"] {
            let r = reg
                .add(NewDevice {
                    id: id.into(),
                    ..NewDevice::default()
                })
                .await;
            assert!(matches!(r, Err(DeviceError::Invalid(_))), "{id:?}");
        }
        let r = reg
            .add(NewDevice {
                id: "d".into(),
                publish: vec!["a/#/b".into()],
                ..NewDevice::default()
            })
            .await;
        assert!(matches!(r, Err(DeviceError::Invalid(_))));
        reg.add(NewDevice {
            id: "d".into(),
            ..NewDevice::default()
        })
        .await
        .unwrap();
        let again = reg
            .add(NewDevice {
                id: "d".into(),
                ..NewDevice::default()
            })
            .await;
        assert!(matches!(again, Err(DeviceError::Exists(_))));
        assert!(reg.is_admin("admin-secret"));
        assert!(!reg.is_admin("admin-secreT"));
        assert!(!reg.is_admin(""));
    }

    #[tokio::test]
    async fn failed_logins_slow_their_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        let (_, token) = reg
            .add(NewDevice {
                id: "legit".into(),
                ..NewDevice::default()
            })
            .await
            .unwrap();
        let guesser: SocketAddr = "10.9.9.9:1".parse().unwrap();
        let from = |user, pass| Credentials {
            peer: Some(guesser),
            ..creds(user, pass)
        };
        // Presenting nothing is refused but never counted.
        for _ in 0..20 {
            assert!(reg.authenticate(&from(None, None)).is_err());
        }
        assert_eq!(reg.login_delay(Some(guesser), None), Duration::ZERO);
        for _ in 0..6 {
            assert!(reg.authenticate(&from(Some("x"), Some("y"))).is_err());
        }
        assert!(reg.login_delay(Some(guesser), None) >= Duration::from_millis(100));
        let other: SocketAddr = "10.9.9.8:1".parse().unwrap();
        assert_eq!(reg.login_delay(Some(other), None), Duration::ZERO);
        // A success from the slowed source waits once (a hit answers no
        // faster than a miss), then that device is let through at once.
        let who = reg
            .authenticate(&from(Some("legit"), Some(&token)))
            .unwrap();
        assert!(reg.login_delay(Some(guesser), Some(&who)) >= Duration::from_millis(100));
        assert_eq!(reg.login_delay(Some(guesser), Some(&who)), Duration::ZERO);
        // The guesses still count: the source stays slowed for others.
        assert!(reg.login_delay(Some(guesser), None) >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn rotation_and_removal_end_old_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        let (_, token) = reg
            .add(NewDevice {
                id: "d".into(),
                ..NewDevice::default()
            })
            .await
            .unwrap();
        let g0 = reg.generation();
        let old = reg.authenticate(&creds(Some("d"), Some(&token))).unwrap();
        let by_cert = reg
            .authenticate(&Credentials {
                certificate: Some("d"),
                ..creds(None, None)
            })
            .unwrap();
        assert!(reg.still_valid(&old) && reg.still_valid(&by_cert));
        let fresh = reg.rotate("d").await.unwrap();
        assert!(reg.generation() > g0);
        assert!(!reg.still_valid(&old), "the old token's sessions end");
        assert!(reg.still_valid(&by_cert), "a certificate session does not");
        let new = reg.authenticate(&creds(Some("d"), Some(&fresh))).unwrap();
        assert!(reg.still_valid(&new));
        reg.remove("d").await.unwrap();
        assert!(!reg.still_valid(&new) && !reg.still_valid(&by_cert));
    }

    #[tokio::test]
    async fn anonymous_mode_lets_everyone_in() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), RegistryConfig::default()).await;
        let who = reg.authenticate(&creds(None, None)).unwrap();
        assert!(reg.authorize(&who, Action::Publish, "anything"));
        assert!(!reg.admin_configured());
        assert!(!reg.is_admin(""));
    }

    #[tokio::test]
    async fn rate_limit_asks_to_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        reg.add(NewDevice {
            id: "slow".into(),
            rate_limit: Some(5),
            ..NewDevice::default()
        })
        .await
        .unwrap();
        let who = Identity::new("slow");
        assert_eq!(reg.admit(&who, 5), Duration::ZERO);
        assert_eq!(reg.admit(&who, 5), Duration::ZERO);
        assert!(reg.admit(&who, 1) > Duration::ZERO);
        // Unlimited devices never wait.
        assert_eq!(
            reg.admit(&Identity::new("other"), 1_000_000),
            Duration::ZERO
        );
    }
}
