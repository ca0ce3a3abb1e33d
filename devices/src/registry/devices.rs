//! Devices as stored ([`Device`]) and as the API shows them ([`DeviceView`],
//! never the hash), what the API takes ([`NewDevice`], [`DevicePatch`]), the
//! in-memory cache (by id and by token hash), id and pattern validation, and
//! the admin API's operations: add, list, get, update, rotate, remove.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::tokens::{from_hex, to_hex};
use super::{now_ms, Registry, SPACE};
use crate::acl;
use crate::auth::{ADMIN, ANONYMOUS};
use crate::throttle::Bucket;
use crate::Error;

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

pub(super) struct Entry {
    pub(super) device: Device,
    pub(super) tag: Vec<u8>,
    pub(super) bucket: Option<Arc<Mutex<Bucket>>>,
    pub(super) last_seen: AtomicU64,
    pub(super) persisted_seen: AtomicU64,
}

impl Entry {
    pub(super) fn new(device: Device, last_seen: u64) -> Result<Entry, Error> {
        let tag = from_hex(&device.token_hash)
            .ok_or_else(|| Error::Invalid(format!("device `{}`: bad token hash", device.id)))?;
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

    pub(super) fn view(&self) -> DeviceView {
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
}

#[derive(Default)]
pub(super) struct Devices {
    pub(super) by_id: HashMap<String, Arc<Entry>>,
    pub(super) by_tag: HashMap<Vec<u8>, String>,
}

/// A device id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not `admin` or `anonymous`.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(Error::Invalid(format!(
            "device id must be 1..=128 characters of A-Z a-z 0-9 . _ -, got {id:?}"
        )));
    }
    if id == ADMIN || id == ANONYMOUS {
        return Err(Error::Invalid(format!("device id `{id}` is reserved")));
    }
    Ok(())
}

fn validate_patterns(what: &str, patterns: &[String]) -> Result<(), Error> {
    if patterns.len() > 256 {
        return Err(Error::Invalid(format!("at most 256 {what} patterns")));
    }
    match patterns.iter().find(|p| !acl::valid_pattern(p)) {
        Some(p) => Err(Error::Invalid(format!(
            "{what} pattern {p:?} is not a valid MQTT-style filter"
        ))),
        None => Ok(()),
    }
}

impl Registry {
    /// Puts `device` in the cache, keeping the last-seen time of its predecessor.
    pub(super) fn install(
        &self,
        device: Device,
        previous: Option<&Entry>,
    ) -> Result<Arc<Entry>, Error> {
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

    /// A device as stored now (on a cluster another node may have changed
    /// it since this node's cache was filled), else as cached.
    fn current(&self, old: &Entry) -> Device {
        let mut device = self
            .log
            .meta_get(SPACE, old.device.id.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice::<Device>(&v).ok())
            .unwrap_or_else(|| old.device.clone());
        let seen = old.last_seen.load(Relaxed);
        device.last_seen_ms = device.last_seen_ms.max((seen > 0).then_some(seen));
        device
    }

    /// Adds a device; returns it and its token (shown this once).
    pub async fn add(&self, new: NewDevice) -> Result<(DeviceView, String), Error> {
        validate_id(&new.id)?;
        validate_patterns("publish", &new.publish)?;
        validate_patterns("subscribe", &new.subscribe)?;
        let _w = self.writes.lock().await;
        let stored = self.log.meta_get(SPACE, new.id.as_bytes())?.is_some();
        if stored || self.entry(&new.id).is_some() {
            return Err(Error::Exists(new.id));
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
    pub fn get(&self, id: &str) -> Result<DeviceView, Error> {
        self.entry(id)
            .map(|e| e.view())
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// Changes a device.
    pub async fn update(&self, id: &str, patch: DevicePatch) -> Result<DeviceView, Error> {
        if let Some(p) = &patch.publish {
            validate_patterns("publish", p)?;
        }
        if let Some(p) = &patch.subscribe {
            validate_patterns("subscribe", p)?;
        }
        let _w = self.writes.lock().await;
        let old = self
            .entry(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        let mut device = self.current(&old);
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
    pub async fn rotate(&self, id: &str) -> Result<String, Error> {
        let _w = self.writes.lock().await;
        let old = self
            .entry(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        let (token, tag) = self.new_token()?;
        let mut device = self.current(&old);
        device.token_hash = to_hex(&tag);
        self.store(&device).await?;
        self.install(device, Some(&old))?;
        Ok(token)
    }

    /// Removes a device.
    pub async fn remove(&self, id: &str) -> Result<(), Error> {
        let _w = self.writes.lock().await;
        let old = self
            .entry(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        self.log
            .put_meta(SPACE, vec![(id.as_bytes().to_vec(), None)])
            .await?;
        let mut devices = self.write();
        devices.by_tag.remove(&old.tag);
        devices.by_id.remove(id);
        self.generation.fetch_add(1, Relaxed);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{enforcing, open};
    use super::*;

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
            assert!(matches!(r, Err(Error::Invalid(_))), "{id:?}");
        }
        let r = reg
            .add(NewDevice {
                id: "d".into(),
                publish: vec!["a/#/b".into()],
                ..NewDevice::default()
            })
            .await;
        assert!(matches!(r, Err(Error::Invalid(_))));
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
        assert!(matches!(again, Err(Error::Exists(_))));
        assert!(reg.is_admin("admin-secret"));
        assert!(!reg.is_admin("admin-secreT"));
        assert!(!reg.is_admin(""));
    }
}
