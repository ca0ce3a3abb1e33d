//! Persistence: one JSON document per device in the log's metadata (space
//! `devices`), and the last-seen times, kept in memory at each login and
//! written every few seconds by a background task.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::devices::Entry;
use super::{Device, Registry, SPACE};
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
            let stored = e.stored();
            let doc = serde_json::to_vec(&stored)
                .map_err(|err| Error::Invalid(format!("cannot encode device: {err}")))?;
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
}
