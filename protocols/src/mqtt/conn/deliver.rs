//! Serving subscriptions from the log: the tailed partitions and their
//! watchers, delivery passes within the client's window, the inflight
//! deliveries (QoS 1, until PUBACK) and their resending on a resumed session.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tributary_storage::Error as LogError;

use super::{Connection, OUT_HIGH_WATER};
use crate::mqtt::codec::{self, Out, PublishOut, Version};
use crate::mqtt::session::{self, Inflight, Retained};
use crate::mqtt::{mapping, topic};

/// Records read from one partition per delivery pass.
const READ_RECORDS: usize = 256;
/// Bytes read from one partition per delivery pass.
const READ_BYTES: usize = 256 * 1024;

/// Log partitions a session tails, and the tasks that wake it on new records.
pub(super) struct Tails {
    pub(super) notify: Arc<Notify>,
    pub(super) watchers: Vec<JoinHandle<()>>,
    pub(super) sources: Vec<(String, u32)>,
    pub(super) next: usize,
    pub(super) topics_changed: Arc<AtomicBool>,
}

impl Drop for Tails {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    /// Recomputes the tailed partitions from the subscriptions. New partitions
    /// start at their end (only later records are delivered), except those of
    /// topics created after a wildcard subscription (`from_start`).
    pub(super) fn rebuild_tails(&mut self, from_start: bool) {
        let log = &self.broker.cx.log;
        // Watch first, list second: a topic created in between is not missed.
        let topics_rx = log.watch_topics();
        let mut all = false;
        let mut topics: Vec<String> = Vec::new();
        for s in &self.session.subs {
            match self.broker.router.sources(&s.filter) {
                None => all = true,
                Some(ts) => {
                    for t in ts {
                        if !topics.contains(&t) {
                            topics.push(t);
                        }
                    }
                }
            }
        }
        if all {
            topics = log.topics().into_iter().map(|t| t.config.name).collect();
        }
        let mut sources = Vec::new();
        let mut missing = false;
        for t in topics {
            let Ok(info) = log.topic(&t) else {
                missing = true;
                continue;
            };

            for p in 0..info.config.partitions {
                sources.push((t.clone(), p));
            }
        }
        let cursors = std::mem::take(&mut self.session.cursors);
        for (t, p) in &sources {
            let key = (t.clone(), *p);
            let cursor = match cursors.get(&key) {
                Some(c) => *c,
                None => match log.offsets(t, *p) {
                    Ok((start, end)) => {
                        if from_start {
                            start
                        } else {
                            end
                        }
                    }
                    Err(_) => continue,
                },
            };
            self.session.cursors.insert(key, cursor);
        }
        if self.session.cursors != cursors {
            self.dirty = true;
        }
        for w in self.tails.watchers.drain(..) {
            w.abort();
        }
        for (t, p) in &sources {
            let Ok(mut rx) = log.watch_end(t, *p) else {
                continue;
            };
            let notify = self.tails.notify.clone();
            self.tails.watchers.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    notify.notify_one();
                }
            }));
        }
        // New topics may bring new sources: wildcard filters tail every topic,
        // and a filter's own topic may not exist yet. Otherwise nothing to watch.
        if all || missing {
            let mut rx = topics_rx;

            let notify = self.tails.notify.clone();
            let changed = self.tails.topics_changed.clone();
            self.tails.watchers.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    changed.store(true, Relaxed);
                    notify.notify_one();
                }
            }));
        }
        self.tails.sources = sources;
        self.tails.next = 0;
    }

    /// Delivers matching records from the log while the client's window and
    /// our outbound buffer allow; comes back (via the notify) if more is left.
    pub(super) fn deliver(&mut self) {
        if !self.rights_hold() {
            // The serve loop ends the connection (`revoked`).
            return;
        }
        if self.tails.topics_changed.swap(false, Relaxed) {
            self.rebuild_tails(true);
        }
        self.resend_some();
        if !self.resend.is_empty() {
            // PUBACKs (or a drained buffer) bring us back.
            if self.out.len() >= OUT_HIGH_WATER {
                self.tails.notify.notify_one();
            }
            return;
        }
        while let Some((topic, granted, id)) = self.retained_queue.front().cloned() {
            if self.out.len() >= OUT_HIGH_WATER || (granted > 0 && self.window_full()) {
                // Come back when PUBACKs free the window (or the buffer drains).
                if self.out.len() >= OUT_HIGH_WATER {
                    self.tails.notify.notify_one();
                }
                return;
            }
            self.retained_queue.pop_front();
            if let Some(mut p) = Retained::load(&self.broker.cx.log, &topic) {
                p.qos = p.qos.min(granted);
                p.sub_ids = id.into_iter().collect();
                self.send_publish(p, None);
            }
        }
        if self.session.subs.is_empty() || self.tails.sources.is_empty() {
            return;
        }
        let log = self.broker.cx.log.clone();
        let n = self.tails.sources.len();
        let mut more = false;
        let now = session::now_ms();
        for i in 0..n {
            if self.out.len() >= OUT_HIGH_WATER {
                more = true;
                break;
            }
            let idx = (self.tails.next + i) % n;
            let (t, p) = self.tails.sources[idx].clone();
            let key = (t.clone(), p);
            let Some(&cursor) = self.session.cursors.get(&key) else {
                continue;
            };
            let read = match log.read(&t, p, cursor, READ_RECORDS, READ_BYTES) {
                Ok(r) => r,
                Err(LogError::OffsetOutOfRange { start, .. }) if cursor < start => {
                    // Retention removed records this session had not read yet.
                    self.broker
                        .metrics
                        .reject("subscriber_fell_behind_retention");
                    self.session.cursors.insert(key, start);
                    more = true;
                    continue;
                }
                Err(_) => continue,
            };
            let mut next = cursor;
            let mut blocked = false;
            for r in &read.records {
                let Some(d) = mapping::delivery_of(&t, r, now) else {
                    next = r.offset + 1;
                    continue;
                };
                // A key or header that is no MQTT topic name (wildcards, NUL,
                // empty, over 65,535 bytes) cannot be delivered over MQTT.
                if !topic::valid_name(&d.topic) {
                    self.broker.metrics.reject("undeliverable_topic");
                    next = r.offset + 1;
                    continue;
                }
                let mine = d.publisher.as_deref() == Some(self.client_id.as_str());
                let mut granted: Option<u8> = None;
                let mut ids = Vec::new();
                let mut keep_retain = false;
                for s in &self.session.subs {
                    if topic::matches(&d.topic, &s.filter) && !(s.no_local && mine) {
                        granted = Some(granted.unwrap_or(0).max(s.qos));
                        ids.extend(s.id.map(|i| i as usize));
                        keep_retain |= s.retain_as_published;
                    }
                }
                let Some(granted) = granted else {
                    next = r.offset + 1;
                    continue;
                };
                let qos = d.qos.min(granted);
                if qos == 1 && self.window_full() {
                    blocked = true;
                    break;
                }
                let retained_flag =
                    keep_retain && r.headers.iter().any(|(k, _)| k == mapping::header::RETAIN);
                let publish = PublishOut {
                    topic: d.topic,
                    qos,
                    retain: retained_flag,
                    dup: false,
                    pkid: 0,
                    payload: Bytes::from(r.value.clone()),
                    props: d.props,
                    sub_ids: ids,
                };

                self.send_publish(
                    publish,
                    Some(Inflight::Log {
                        topic: t.clone(),
                        partition: p,
                        offset: r.offset,
                    }),
                );
                next = r.offset + 1;
            }
            if next != cursor {
                self.session.cursors.insert(key, next);
                self.dirty = true;
            }
            if !blocked && next < read.end_offset {
                more = true;
            }
        }
        self.tails.next = (self.tails.next + 1) % n.max(1);
        if more {
            self.tails.notify.notify_one();
        }
    }

    /// Sends a delivery; QoS 1 takes a packet id and waits for PUBACK.
    /// Returns false when the client's maximum packet size forbids it.
    fn send_publish(&mut self, mut p: PublishOut, at: Option<Inflight>) -> bool {
        if p.qos > 0 {
            p.pkid = self.session.take_pkid();
        }
        let (qos, pkid) = (p.qos, p.pkid);
        let entry = (qos > 0).then(|| at.unwrap_or_else(|| Inflight::Owned(Box::new(p.clone()))));
        let Some(encoded) = self.encode_delivery(p) else {
            return false;
        };
        self.broker.metrics.deliveries[usize::from(qos.min(1))].fetch_add(1, Relaxed);
        if let Some(entry) = entry {
            let seq = self.session.next_seq;
            self.session.next_seq += 1;
            self.session.inflight.insert(pkid, (seq, entry));
        }
        self.out.extend_from_slice(&encoded);
        true
    }

    /// A delivery in this connection's wire form (3.1.1 has no properties), or
    /// `None` when it exceeds the client's maximum packet size (MQTT-3.1.2-24:
    /// never send what the client said it cannot take).
    fn encode_delivery(&self, mut p: PublishOut) -> Option<BytesMut> {
        if self.version == Version::V4 {
            p.props = codec::MsgProps::default();
            p.sub_ids.clear();
        }
        let mut encoded = BytesMut::new();
        codec::encode(Out::Publish(Box::new(p)), self.version, &mut encoded);
        if encoded.len() > self.client_max_packet {
            self.broker
                .metrics
                .reject("delivery_over_client_max_packet");
            return None;
        }
        Some(encoded)
    }

    /// Deliveries the client has not acknowledged yet, counted against its window.
    fn unacked_out(&self) -> usize {
        self.session
            .inflight
            .len()
            .saturating_sub(self.resend.len())
    }

    /// New deliveries wait until resends are done and the window has room.
    fn window_full(&self) -> bool {
        !self.resend.is_empty() || self.session.inflight.len() >= self.send_window
    }

    /// Resends unacknowledged deliveries of a resumed session with DUP, in
    /// their original order, as the window and the buffer allow.
    fn resend_some(&mut self) {
        let log = self.broker.cx.log.clone();
        let now = session::now_ms();
        while let Some(&pkid) = self.resend.front() {
            if self.unacked_out() >= self.send_window || self.out.len() >= OUT_HIGH_WATER {
                return;
            }
            self.resend.pop_front();
            let Some((_, entry)) = self.session.inflight.get(&pkid).cloned() else {
                continue;
            };
            let publish = match entry {
                Inflight::Owned(p) => Some(*p),
                Inflight::Log {
                    topic,
                    partition,
                    offset,
                } => log
                    .read(&topic, partition, offset, 1, READ_BYTES)
                    .ok()
                    .and_then(|r| r.records.into_iter().next())
                    .filter(|r| r.offset == offset)
                    .and_then(|r| {
                        mapping::delivery_of(&topic, &r, now).map(|d| PublishOut {
                            topic: d.topic,
                            qos: 1,
                            retain: false,
                            dup: true,
                            pkid,
                            payload: Bytes::from(r.value),
                            props: d.props,
                            sub_ids: Vec::new(),
                        })
                    }),
            };
            let Some(mut p) = publish else {
                // Gone by retention or expiry: nothing left to redeliver.
                self.session.inflight.remove(&pkid);
                continue;
            };
            p.dup = true;
            p.pkid = pkid;
            match self.encode_delivery(p) {
                Some(encoded) => self.out.extend_from_slice(&encoded),
                None => {
                    self.session.inflight.remove(&pkid);
                }
            }
        }
    }
}
