//! Cursors: what the edge knows the core holds, per forwarded partition
//! ([`Known`]), learnt from `Opened` and every `Ack`; the forwarded prefix
//! is marked in the log at once and written to the edge's metadata about
//! once a second (the drain-rate samples are taken on the same tick).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{lock, Uploader, META_SPACE};
use crate::ranges::RangeSet;

fn cursor_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = [b"c/", topic.as_bytes(), b"\0"].concat();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub(super) fn parse_cursor_key(k: &[u8]) -> Option<(String, u32)> {
    let rest = k.strip_prefix(b"c/")?;
    let split = rest.iter().position(|&b| b == 0)?;
    let topic = std::str::from_utf8(&rest[..split]).ok()?.to_owned();
    let p: [u8; 4] = rest[split + 1..].try_into().ok()?;
    Some((topic, u32::from_be_bytes(p)))
}

/// What the edge knows of one forwarded partition, kept across connections.
#[derive(Debug, Default, Clone)]
pub(super) struct Known {
    /// What the core holds (from Opened and Acks).
    pub(super) held: RangeSet,
    /// The prefix last written to disk.
    pub(super) persisted: u64,
}

impl Uploader {
    /// Writes changed forwarded prefixes to disk, and samples drain rates.
    pub(super) async fn persist_loop(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.persist().await;
            let snapshot = lock(&self.inner.acked).clone();
            let mut s = lock(&self.inner.samples);
            s.push_back((Instant::now(), snapshot));
            while s.len() > 11 {
                s.pop_front();
            }
        }
    }

    pub(super) async fn persist(&self) {
        let entries: Vec<_> = {
            let mut known = lock(&self.inner.known);
            known
                .iter_mut()
                .filter(|(_, k)| k.held.prefix() > k.persisted)
                .map(|((t, p), k)| {
                    k.persisted = k.held.prefix();
                    (cursor_key(t, *p), Some(k.persisted.to_be_bytes().to_vec()))
                })
                .collect()
        };
        if !entries.is_empty() {
            if let Err(e) = self.inner.log.put_meta(META_SPACE, entries).await {
                tracing::warn!(error = %e, "sync: cannot store the forwarded cursors");
            }
        }
    }

    pub(super) fn note_ack(&self, topic: &str, partition: u32, from: u64, to: u64, events: u64) {
        let prefix = {
            let mut known = lock(&self.inner.known);
            let k = known.entry((topic.to_owned(), partition)).or_default();
            k.held.insert(from, to);
            k.held.prefix()
        };
        let _ = self.inner.log.mark_forwarded(topic, partition, prefix);
        *lock(&self.inner.acked).entry(topic.to_owned()).or_insert(0) += events;
        self.inner.metrics.acked_events.fetch_add(events, Relaxed);
    }
}
