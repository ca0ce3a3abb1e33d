//! Serving subscriptions from the log: the tailed partitions and their
//! watchers, delivery passes within the client's window, the inflight
//! deliveries (QoS 1 until PUBACK; QoS 2 until PUBREC, then PUBREL until
//! PUBCOMP) and their resending on a resumed session.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tributary_storage::Error as LogError;

use super::{Connection, OUT_HIGH_WATER};
use crate::codec::{self, Out, PublishOut, Version};
use crate::session::{self, Inflight, Pending, Retained};
use crate::shared::{self, Group};
use crate::Refusal;
use crate::{mapping, topic};

/// Records read from one partition per delivery pass.
const READ_RECORDS: usize = 256;
/// Bytes read from one partition per delivery pass.
const READ_BYTES: usize = 256 * 1024;

/// A filter that can match `$SYS/...` (wildcards at the first level cannot).
pub(super) fn is_sys_filter(filter: &str) -> bool {
    filter == "$SYS" || filter.starts_with("$SYS/")
}

/// A shared subscription this connection is a member for.
#[derive(Clone)]
pub(super) struct SharedSub {
    pub(super) group: Arc<Group>,
    /// Granted QoS.
    pub(super) qos: u8,
    /// v5 subscription identifier.
    pub(super) id: Option<u64>,
    pub(super) retain_as_published: bool,
}

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
        // Own subscriptions get cursors of this session; shared ones are read
        // by their group, and their partitions are only watched (the wake-up
        // lets this connection take what the group hands it).
        let mut all = false;
        let mut topics: Vec<String> = Vec::new();
        let mut all_watched = false;
        let mut watched: Vec<String> = Vec::new();
        for s in &self.session.subs {
            let (filter, all, topics) = match shared::parse(&s.filter) {
                Some(Ok((_, f))) => (f, &mut all_watched, &mut watched),
                Some(Err(())) => continue,
                None => (s.filter.as_str(), &mut all, &mut topics),
            };
            match self.broker.router.sources(filter) {
                None => *all = true,
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
        if all_watched {
            watched = log.topics().into_iter().map(|t| t.config.name).collect();
        }
        let mut watch_only = Vec::new();
        let mut missing = false;
        for t in watched {
            if topics.contains(&t) {
                continue;
            }
            match log.topic(&t) {
                Ok(info) => {
                    watch_only.extend((0..info.config.partitions).map(|p| (t.clone(), p)));
                }
                Err(_) => missing = true,
            }
        }
        let all = all || all_watched;
        let mut sources = Vec::new();
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
        for (t, p) in sources.iter().chain(&watch_only) {
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
        if self.session.subs.iter().any(|s| is_sys_filter(&s.filter)) {
            let mut rx = self.broker.sys.subscribe();
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
                self.send_publish(p, None, None);
            }
        }
        self.deliver_sys();
        self.deliver_shared();
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
                        .refuse(Refusal::SubscriberFellBehindRetention);
                    self.session.cursors.insert(key, start);
                    more = true;
                    continue;
                }
                Err(_) => continue,
            };
            let mut next = cursor;
            let mut blocked = false;
            let replay_until = self.session.replay.get(&key).copied().unwrap_or(0);
            for r in &read.records {
                let Some(d) = mapping::delivery_of(&t, r, now) else {
                    next = r.offset + 1;
                    continue;
                };
                // A key or header that is no MQTT topic name (wildcards, NUL,
                // empty, over 65,535 bytes) cannot be delivered over MQTT.
                if !topic::valid_name(&d.topic) {
                    self.broker.metrics.refuse(Refusal::UndeliverableTopic);
                    next = r.offset + 1;
                    continue;
                }
                let mine = d.publisher.as_deref() == Some(self.client_id.as_str());
                let mut granted: Option<u8> = None;
                let mut ids = Vec::new();
                let mut keep_retain = false;
                for s in &self.session.subs {
                    if topic::matches(&d.topic, &s.filter)
                        && !(s.no_local && mine)
                        && shared::parse(&s.filter).is_none()
                    {
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
                // Sent before a restart: a QoS 2 delivery was completed or is
                // resent from the session's inflight, a QoS 0 one is not sent
                // twice; QoS 1 goes again (unless acknowledged: not known), as DUP.
                let replayed = r.offset < replay_until;
                if replayed && qos != 1 {
                    next = r.offset + 1;
                    continue;
                }
                if qos > 0 && self.window_full() {
                    blocked = true;
                    break;
                }
                let retained_flag =
                    keep_retain && r.headers.iter().any(|(k, _)| k == mapping::header::RETAIN);
                let publish = PublishOut {
                    topic: d.topic,
                    alias: None,
                    qos,
                    retain: retained_flag,
                    dup: replayed && qos > 0,
                    pkid: 0,
                    payload: Bytes::from(r.value.clone().unwrap_or_default()),
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
                    None,
                );
                next = r.offset + 1;
            }
            if next >= replay_until && replay_until > 0 {
                self.session.replay.remove(&key);
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

    /// Joins the groups of this session's shared subscriptions, and leaves
    /// the groups it no longer subscribes to.
    pub(super) fn attach_shared(&mut self) {
        let log = self.broker.cx.log.clone();
        let mut now: Vec<SharedSub> = Vec::new();
        for s in &self.session.subs {
            let Some(Ok((name, filter))) = shared::parse(&s.filter) else {
                continue;
            };
            let Some(group) = self.broker.shared.hold(&log, name, filter, &self.client_id) else {
                continue;
            };
            group.join(self.conn_id, self.tails.notify.clone(), self.send_window);
            now.push(SharedSub {
                group,
                qos: s.qos,
                id: s.id,
                retain_as_published: s.retain_as_published,
            });
        }
        for old in &self.shared {
            if !now.iter().any(|n| Arc::ptr_eq(&n.group, &old.group)) {
                old.group.leave(self.conn_id);
            }
        }
        self.shared = now;
    }

    /// Sends a delivery; QoS 1 and 2 take a packet id and wait for their
    /// acknowledgements. Returns false when the client's maximum packet size
    /// forbids it.
    fn send_publish(
        &mut self,
        mut p: PublishOut,
        at: Option<Inflight>,
        shared: Option<Arc<Group>>,
    ) -> bool {
        if p.qos > 0 {
            p.pkid = self.session.take_pkid();
        }
        let (qos, pkid) = (p.qos, p.pkid);
        let entry = (qos > 0).then(|| at.unwrap_or_else(|| Inflight::Owned(Box::new(p.clone()))));
        let Some(encoded) = self.encode_delivery(p) else {
            return false;
        };
        self.broker.metrics.deliveries[usize::from(qos.min(2))].fetch_add(1, Relaxed);
        if let Some(at) = entry {
            let seq = self.session.next_seq;
            self.session.next_seq += 1;
            self.session.inflight.insert(
                pkid,
                Pending {
                    seq,
                    qos,
                    released: false,
                    at,
                    shared,
                },
            );
            if qos == 2 {
                self.qos2_changed();
            }
        }
        self.out.extend_from_slice(&encoded);
        true
    }

    /// A delivery in this connection's wire form (3.1.1 has no properties), or
    /// `None` when it exceeds the client's maximum packet size (MQTT-3.1.2-24:
    /// never send what the client said it cannot take). v5: the topic goes as
    /// an alias once the client has seen it with one, within the client's
    /// topic alias maximum.
    fn encode_delivery(&mut self, mut p: PublishOut) -> Option<BytesMut> {
        let mut new_alias = None;
        if self.version == Version::V4 {
            p.props = codec::MsgProps::default();
            p.sub_ids.clear();
        } else if let Some(&a) = self.out_aliases.get(&p.topic) {
            p.alias = Some(a);
            p.topic.clear();
        } else if self.out_aliases.len() < usize::from(self.client_alias_max) {
            let a = u16::try_from(self.out_aliases.len() + 1).unwrap_or(u16::MAX);
            p.alias = Some(a);
            new_alias = Some((p.topic.clone(), a));
        }
        let mut encoded = BytesMut::new();
        codec::encode(Out::Publish(Box::new(p)), self.version, &mut encoded);
        if encoded.len() > self.client_max_packet {
            self.broker
                .metrics
                .refuse(Refusal::DeliveryOverClientMaxPacket);
            return None;
        }
        if let Some((topic, a)) = new_alias {
            self.out_aliases.insert(topic, a);
        }
        Some(encoded)
    }

    /// Sends the `$SYS` statistics that changed since this connection last
    /// sent them, at QoS 0; the first value of a topic goes as retained.
    fn deliver_sys(&mut self) {
        if !self.session.subs.iter().any(|s| is_sys_filter(&s.filter)) {
            return;
        }
        let snapshot = self.broker.sys.borrow().clone();
        for (topic, value) in snapshot.iter() {
            if self.sys_sent.get(topic) == Some(value) {
                continue;
            }
            let matching: Vec<&session::Sub> = self
                .session
                .subs
                .iter()
                .filter(|s| is_sys_filter(&s.filter) && topic::matches(topic, &s.filter))
                .collect();
            if matching.is_empty() {
                continue;
            }
            let publish = PublishOut {
                topic: topic.clone(),
                alias: None,
                qos: 0,
                retain: !self.sys_sent.contains_key(topic),
                dup: false,
                pkid: 0,
                payload: Bytes::from(value.clone().into_bytes()),
                props: codec::MsgProps::default(),
                sub_ids: matching
                    .iter()
                    .filter_map(|s| s.id.map(|i| i as usize))
                    .collect(),
            };
            self.send_publish(publish, None, None);
            self.sys_sent.insert(topic.clone(), value.clone());
        }
    }

    /// Delivers what this connection's shared subscription groups hand it,
    /// within its window. A message the client already has (QoS 0 once
    /// sent; QoS 1 and 2 at PUBACK/PUBREC) is reported back to its group.
    fn deliver_shared(&mut self) {
        if self.shared.is_empty() || !self.resend.is_empty() {
            return;
        }
        let log = self.broker.cx.log.clone();
        let now = session::now_ms();
        for i in 0..self.shared.len() {
            let room = self
                .send_window
                .saturating_sub(self.session.inflight.len())
                .min(READ_RECORDS);
            if room == 0 || self.out.len() >= OUT_HIGH_WATER {
                return;
            }
            let sub = self.shared[i].clone();
            for pos in sub.group.take(&log, self.conn_id, room) {
                let (t, p, offset) = pos.clone();
                let record = log
                    .read(&t, p, offset, 1, READ_BYTES)
                    .ok()
                    .and_then(|r| r.records.into_iter().next())
                    .filter(|r| r.offset == offset);
                let Some(d) = record
                    .as_ref()
                    .and_then(|r| mapping::delivery_of(&t, r, now))
                else {
                    // Gone by retention, or expired: nothing to deliver.
                    sub.group.ack(self.conn_id, &pos);
                    continue;
                };
                let Some(r) = record else { continue };
                let qos = d.qos.min(sub.qos);
                let retained = sub.retain_as_published
                    && r.headers.iter().any(|(k, _)| k == mapping::header::RETAIN);
                let publish = PublishOut {
                    topic: d.topic,
                    alias: None,
                    qos,
                    retain: retained,
                    dup: false,
                    pkid: 0,
                    payload: Bytes::from(r.value.unwrap_or_default()),
                    props: d.props,
                    sub_ids: sub.id.map(|i| i as usize).into_iter().collect(),
                };
                let at = Inflight::Log {
                    topic: t,
                    partition: p,
                    offset,
                };
                let sent = self.send_publish(publish, Some(at), Some(sub.group.clone()));
                if qos == 0 || !sent {
                    sub.group.ack(self.conn_id, &pos);
                }
            }
        }
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
            let Some(entry) = self.session.inflight.get(&pkid).cloned() else {
                continue;
            };
            if entry.released {
                // QoS 2 past PUBREC: only the release is repeated.
                self.send(Out::PubRel(pkid, codec::reason::SUCCESS));
                continue;
            }
            let publish = match entry.at {
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
                            alias: None,
                            qos: entry.qos,
                            retain: false,
                            dup: true,
                            pkid,
                            payload: Bytes::from(r.value.unwrap_or_default()),
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
