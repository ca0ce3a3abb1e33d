//! Persistence: one JSON document per device in the log's metadata (space
//! `devices`), and the last-seen times, kept in memory at each login and
//! written every few seconds by a background task.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::devices::Entry;
use super::{Device, Registry, SEEN_SPACE, SPACE};
use crate::Error;

impl Registry {
    pub(super) async fn store(&self, device: &Device) -> Result<(), Error> {
        let doc = serde_json::to_vec(device)
            .map_err(|e| Error::Invalid(format!("cannot encode device: {e}")))?;
        self.log
            .put_meta(SPACE, vec![(device.id.as_bytes().to_vec(), Some(doc))])
            .await?;
        Ok(())
    }

    /// Writes the last-seen times that changed since the last call.
    pub async fn persist_last_seen(&self) -> Result<usize, Error> {
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
            let seen = e.last_seen.load(Relaxed);
            entries.push((
                e.device.id.as_bytes().to_vec(),
                Some(seen.to_be_bytes().to_vec()),
            ));
            written.push(seen);
        }
        self.log.put_meta(SEEN_SPACE, entries).await?;
        // What was written, not what is there now: a login meanwhile stays dirty.
        for (e, seen) in changed.iter().zip(written) {
            e.persisted_seen.store(seen, Relaxed);
        }
        Ok(changed.len())
    }

    /// On a cluster: takes in what other nodes' admin APIs changed (devices
    /// added, changed, rotated, disabled, removed) and the last-seen times
    /// they stored.
    pub fn follow_stored(&self) -> Result<(), Error> {
        let seen = seen_times(&self.log)?;
        let stored: HashMap<String, Device> = self
            .log
            .meta(SPACE)?
            .into_iter()
            .filter_map(|(k, v)| {
                let id = String::from_utf8(k).ok()?;
                match serde_json::from_slice::<Device>(&v) {
                    Ok(d) => Some((id, d)),
                    Err(e) => {
                        tracing::error!(device = %id, error = %e, "a stored device does not parse");
                        None
                    }
                }
            })
            .collect();
        let cached: HashMap<String, Arc<Entry>> = self.read().by_id.clone();
        for (id, old) in &cached {
            if !stored.contains_key(id) {
                let mut devices = self.write();
                devices.by_tag.remove(&old.tag);
                devices.by_id.remove(id);
                self.generation.fetch_add(1, Relaxed);
            }
        }
        for (id, mut device) in stored {
            let old = cached.get(&id);
            if let Some(&t) = seen.get(&id) {
                if let Some(e) = old {
                    e.last_seen.fetch_max(t, Relaxed);
                }
                device.last_seen_ms = device.last_seen_ms.max(Some(t));
            }
            let same = old.is_some_and(|e| {
                let mut have = e.device.clone();
                have.last_seen_ms = device.last_seen_ms;
                have == device
            });
            if !same {
                self.install(device, old.map(|e| &**e))?;
            }
        }
        Ok(())
    }

    /// On a cluster: follows what the other nodes store every second
    /// ([`Registry::follow_stored`]) until `shutdown`.
    pub fn spawn_follower(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                let Some(me) = me.upgrade() else { return };
                if let Err(e) = me.follow_stored() {
                    tracing::warn!(error = %e, "cannot read the stored devices");
                }
            }
        });
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
}

/// The stored last-seen times, by device id.
pub(super) fn seen_times(log: &tributary_storage::Log) -> Result<HashMap<String, u64>, Error> {
    Ok(log
        .meta(SEEN_SPACE)?
        .into_iter()
        .filter_map(|(k, v)| {
            let id = String::from_utf8(k).ok()?;
            let t = u64::from_be_bytes(v.try_into().ok()?);
            Some((id, t))
        })
        .collect())
}
