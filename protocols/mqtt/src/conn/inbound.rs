//! What a client sends once connected: the packet dispatch, PUBLISH (into
//! the batch of one socket read, appended by `append_batch`, acknowledged in
//! order once durable), PUBREL, SUBSCRIBE and UNSUBSCRIBE.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Close, Connection, OUT_HIGH_WATER};
use crate::codec::{self, reason, In, Out, PublishIn, SubFilter, Version};
use crate::session::{Retained, Sub};
use crate::Error;
use crate::Refusal;
use crate::{mapping, shared, topic, Server};
use tributary_devices::auth::Action;
use tributary_ingest::{self as ingest, Rejection};

/// The outcome of one append batch, in packet order.
pub(super) struct Acked {
    pub(super) acks: Vec<(u8, u16, u8)>,
    started: Instant,
}

/// What decides an ack's reason code.
#[derive(Debug, Clone, Copy)]
enum AckAt {
    /// The append result of this publish (index into the batch).
    Record(usize),
    /// Known already (a refusal, or a QoS 2 resend stored before).
    Code(u8),
}

/// Publishes gathered from one socket read.
#[derive(Default)]
pub(super) struct Batch {
    /// Tagged with the index of their publish in the batch.
    records: ingest::Batch<usize>,
    /// (qos, pkid, what decides the answer) per publish that wants an ack, in order.
    acks: Vec<(u8, u16, AckAt)>,
    retained: Vec<(usize, String, Bytes, u8, codec::MsgProps)>,
    count: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.count == 0
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    pub(super) async fn read_packets(&mut self) -> Result<(), Close> {
        let max = self.broker.config.max_packet_bytes;
        loop {
            let close = match codec::decode(&mut self.buf, self.version, max) {
                Ok(Some(packet)) => self.packet(packet).await.err(),
                Ok(None) => break,
                Err(Error::TooLarge { .. }) => Some(Close::Server(
                    reason::PACKET_TOO_LARGE,
                    Refusal::PacketTooLarge,
                )),
                Err(e @ Error::Protocol { .. }) => Some(Close::Server(
                    reason::PROTOCOL_ERROR,
                    Refusal::of_decode(&e),
                )),
                Err(_) => Some(Close::Server(reason::MALFORMED, Refusal::MalformedPacket)),
            };
            if let Some(close) = close {
                // What came before the end (a DISCONNECT right after its
                // publishes, in the same read) is still appended.
                self.flush_batch();
                return Err(close);
            }
            if self.out.len() >= OUT_HIGH_WATER {
                self.flush_batch();
                self.flush_out().await?;
            }
        }
        self.flush_batch();
        Ok(())
    }

    async fn packet(&mut self, packet: In) -> Result<(), Close> {
        match packet {
            In::Publish(p) => self.publish(p),
            In::PubAck(pkid) => {
                if self.session.inflight.get(&pkid).is_some_and(|f| f.qos == 1) {
                    self.delivery_done(pkid);
                }
                Ok(())
            }
            In::PubRec(pkid, code) => {
                self.flush_batch();
                match self.session.inflight.get_mut(&pkid) {
                    Some(f) if f.qos == 2 && code >= 0x80 => {
                        // The client refused the message: the delivery ends here.
                        self.delivery_done(pkid);
                    }
                    Some(f) if f.qos == 2 => {
                        if !f.released {
                            f.released = true;
                            let f = f.clone();
                            self.shared_has(&f);
                            self.qos2_changed();
                        }
                        self.resend.retain(|p| *p != pkid);
                        self.send(Out::PubRel(pkid, reason::SUCCESS));
                    }
                    _ => self.send(Out::PubRel(pkid, reason::PACKET_ID_NOT_FOUND)),
                }
                Ok(())
            }
            In::PubComp(pkid) => {
                if self
                    .session
                    .inflight
                    .get(&pkid)
                    .is_some_and(|f| f.qos == 2 && f.released)
                {
                    self.delivery_done(pkid);
                }
                Ok(())
            }
            In::PubRel(pkid) => {
                // A release may overtake nothing: its PUBREC was sent after durability.
                let code = if self.session.qos2.remove(&pkid) {
                    self.dirty = true;
                    reason::SUCCESS
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                self.flush_batch();
                self.send(Out::PubComp(pkid, code));
                Ok(())
            }
            In::Subscribe { pkid, filters, id } => {
                self.flush_batch();
                self.subscribe(pkid, filters, id).await
            }
            In::Unsubscribe { pkid, filters } => {
                self.flush_batch();
                self.unsubscribe(pkid, filters).await;
                Ok(())
            }
            In::PingReq => {
                self.send(Out::PingResp);
                Ok(())
            }
            In::Disconnect {
                reason: r,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    if self.session.expiry == 0 && e > 0 {
                        return Err(Close::Server(
                            reason::PROTOCOL_ERROR,
                            Refusal::ProtocolError,
                        ));
                    }
                    self.session.expiry = e.min(self.broker.config.max_session_expiry_secs);
                }
                // MQTT-3.1.2-8: only reason 0x00 discards the will.
                Err(Close::Graceful { with_will: r != 0 })
            }
            In::Connect(_) => Err(Close::Server(
                reason::PROTOCOL_ERROR,
                Refusal::SecondConnect,
            )),
            In::Unexpected(_) => Err(Close::Server(
                reason::PROTOCOL_ERROR,
                Refusal::ProtocolError,
            )),
        }
    }

    /// Refuses a publish: v5 answers with the reason (QoS > 0), 3.1.1 closes.
    fn refuse_publish(&mut self, p: &PublishIn, code: u8, why: Refusal) -> Result<(), Close> {
        self.broker.metrics.refuse(why);
        match (self.version, p.qos) {
            (_, 0) => Ok(()),
            (Version::V4, _) => Err(Close::Server(code, why)),
            (Version::V5, q) => {
                self.batch.acks.push((q, p.pkid, AckAt::Code(code)));
                Ok(())
            }
        }
    }

    fn publish(&mut self, mut p: PublishIn) -> Result<(), Close> {
        if !self.rights_hold() {
            return Err(Close::Server(
                reason::NOT_AUTHORIZED,
                Refusal::NotAuthorized,
            ));
        }
        let m = &self.broker.metrics;
        m.publishes[usize::from(p.qos.min(2))].fetch_add(1, Relaxed);
        if p.qos > 0 {
            self.unacked_in += 1;
            // v5 flow control counts a QoS 2 publish until PUBCOMP: those
            // past PUBREC and waiting for PUBREL count too (a resend of one
            // of them is no new publish).
            let resent = p.qos == 2 && self.session.qos2.contains(&p.pkid);
            let released_pending = self.session.qos2.len() - usize::from(resent);
            if self.version == Version::V5
                && self.unacked_in + released_pending > usize::from(self.broker.config.max_inflight)
            {
                return Err(Close::Server(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    Refusal::ReceiveMaximumExceeded,
                ));
            }
        }
        if let Some(alias) = p.alias {
            if alias == 0 || alias > self.broker.config.topic_alias_max {
                return Err(Close::Server(
                    reason::TOPIC_ALIAS_INVALID,
                    Refusal::TopicAliasInvalid,
                ));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(Close::Server(
                            reason::PROTOCOL_ERROR,
                            Refusal::TopicAliasUnknown,
                        ))
                    }
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if !topic::valid_name(&p.topic) {
            return Err(Close::Server(
                reason::TOPIC_NAME_INVALID,
                Refusal::TopicNameInvalid,
            ));
        }
        if topic::is_sys(&p.topic) {
            // The node's own statistics: clients do not publish there.
            return self.refuse_publish(&p, reason::TOPIC_NAME_INVALID, Refusal::SysTopicReserved);
        }
        if p.qos == 2 && self.session.qos2.contains(&p.pkid) {
            // A resent QoS 2 publish we already stored: acknowledge, do not append again.
            self.batch
                .acks
                .push((2, p.pkid, AckAt::Code(reason::SUCCESS)));
            return Ok(());
        }
        if p.qos == 2 && self.qos2_pending.contains(&p.pkid) {
            // Resent while the first copy is on its way to disk: that copy's
            // PUBREC answers both.
            self.unacked_in = self.unacked_in.saturating_sub(1);
            return Ok(());
        }
        if p.props.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            return self.refuse_publish(
                &p,
                reason::PAYLOAD_FORMAT_INVALID,
                Refusal::PayloadFormatInvalid,
            );
        }
        if !self
            .broker
            .cx
            .auth
            .authorize(&self.identity, Action::Publish, &p.topic)
            .allowed()
        {
            if self.version == Version::V4 {
                // 3.1.1 has no way to refuse a publish: close, whatever the QoS.
                self.broker.metrics.refuse(Refusal::NotAuthorized);
                return Err(Close::Server(
                    reason::NOT_AUTHORIZED,
                    Refusal::NotAuthorized,
                ));
            }
            return self.refuse_publish(&p, reason::NOT_AUTHORIZED, Refusal::NotAuthorized);
        }
        let target = self.broker.router.target(&p.topic);
        let no_local = self.version == Version::V5 && self.session.subs.iter().any(|s| s.no_local);
        let publisher = no_local.then_some(self.client_id.as_str());
        let (log_topic, record) = mapping::event_for(
            target, &p.topic, &p.payload, p.qos, p.retain, &p.props, publisher,
        );
        let index = self.batch.count;
        self.batch.count += 1;
        self.batch.records.push(&log_topic, index, record);
        if p.retain {
            self.batch.retained.push((
                index,
                p.topic.clone(),
                p.payload.clone(),
                p.qos,
                p.props.clone(),
            ));
        }
        if p.qos > 0 {
            if p.qos == 2 {
                self.qos2_pending.insert(p.pkid);
            }
            self.batch.acks.push((p.qos, p.pkid, AckAt::Record(index)));
        }
        Ok(())
    }

    /// Starts appending what one read gathered; its acks come back in order.
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        // A device over its rate limit: this batch goes on, reading pauses
        // until the limit has caught up (TCP pushes back on the client).
        let wait = self.broker.cx.auth.pace(
            &self.identity,
            u32::try_from(batch.count).unwrap_or(u32::MAX),
        );
        if !wait.is_zero() {
            self.paused_until = Some(tokio::time::Instant::now() + wait);
        }
        let broker = self.broker.clone();
        self.appends
            .push_back(tokio::spawn(append_batch(broker, batch)));
    }

    pub(super) async fn acked(&mut self, acked: Acked) -> Result<(), Close> {
        let n = acked.acks.len() as u64;
        if n > 0 {
            self.broker.metrics.ack_latency(acked.started.elapsed(), n);
        }
        // QoS 2: the packet id is remembered once its message is durable, and
        // for a persistent session stored before PUBREC, so a resend after a
        // reconnect or a restart is not appended again.
        let mut remembered = false;
        for &(qos, pkid, code) in &acked.acks {
            if qos == 2 && self.qos2_pending.remove(&pkid) && code == reason::SUCCESS {
                remembered |= self.session.qos2.insert(pkid);
            }
        }
        if remembered {
            self.dirty = true;
            self.save_now().await;
        }
        for (qos, pkid, code) in acked.acks {
            self.unacked_in = self.unacked_in.saturating_sub(1);
            if code != reason::SUCCESS && self.version == Version::V4 {
                // 3.1.1 has no negative acknowledgement: closing is the refusal.
                return Err(Close::Server(code, Refusal::AppendFailed));
            }
            self.send(if qos == 1 {
                Out::PubAck(pkid, code)
            } else {
                Out::PubRec(pkid, code)
            });
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubFilter>,
        id: Option<usize>,
    ) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for f in filters {
            // `$share/GROUP/FILTER`: rights and routing follow FILTER.
            let share = shared::parse(&f.path);
            let filter = match share {
                Some(Ok((_, filter))) => filter,
                _ => f.path.as_str(),
            };
            if matches!(share, Some(Ok(_))) && f.no_local {
                // MQTT-3.8.3-4.
                return Err(Close::Server(
                    reason::PROTOCOL_ERROR,
                    Refusal::SharedNoLocal,
                ));
            }
            let refused = if matches!(share, Some(Err(()))) || !topic::valid_filter(filter) {
                Some(reason::TOPIC_FILTER_INVALID)
            } else if self.session.subs.len() >= self.broker.config.max_subscriptions
                && !self.session.subs.iter().any(|s| s.filter == f.path)
            {
                Some(reason::QUOTA_EXCEEDED)
            } else if !self
                .broker
                .cx
                .auth
                .authorize(&self.identity, Action::Subscribe, filter)
                .allowed()
            {
                Some(reason::NOT_AUTHORIZED)
            } else if let Some(Ok((name, filter))) = share {
                // Beyond `max_shared_groups`: no room for another group.
                let log = &self.broker.cx.log;
                let group = self.broker.shared.hold(log, name, filter, &self.client_id);
                group.is_none().then_some(reason::QUOTA_EXCEEDED)
            } else {
                None
            };
            let code = if let Some(code) = refused {
                code
            } else {
                let granted = f.qos.min(2);
                let sub = Sub {
                    filter: f.path.clone(),
                    qos: granted,
                    retain_as_published: f.retain_as_published,
                    id: id.map(|i| i as u64),
                    no_local: f.no_local,
                };
                let existed = match self.session.subs.iter_mut().find(|s| s.filter == f.path) {
                    Some(s) => {
                        *s = sub;
                        true
                    }
                    None => {
                        self.session.subs.push(sub);
                        false
                    }
                };
                // A shared subscription gets no retained messages (MQTT 4.8.2).
                let wants_retained = f.retain_handling == 0 || (f.retain_handling == 1 && !existed);
                if share.is_none() && wants_retained {
                    retained.push((f.path.clone(), granted));
                    // `$SYS` values count as retained: sent again, current.
                    self.sys_sent.retain(|t, _| !topic::matches(t, &f.path));
                }
                granted
            };
            if code >= 0x80 {
                self.broker.metrics.refuse(Refusal::SubscribeRefused);
            }
            codes.push(code);
        }
        self.attach_shared();
        self.rebuild_tails(false);
        self.save_now().await;
        if !self.shared.is_empty() {
            // A new group's starting cursor is durable before SUBACK.
            self.broker.shared.save(&self.broker.cx.log).await;
        }
        self.send(Out::SubAck(pkid, codes));
        if !retained.is_empty() {
            // One scan of the retained topics per SUBSCRIBE; a topic is queued
            // once, so the queue never holds more than `max_retained` entries.
            let queued: HashSet<String> = self
                .retained_queue
                .iter()
                .map(|(t, _, _)| t.clone())
                .collect();
            for topic in Retained::topics_matching_any(&self.broker.cx.log, &retained) {
                if queued.contains(&topic.0) {
                    continue;
                }
                self.retained_queue.push_back((topic.0, topic.1, id));
            }
        }
        self.tails.notify.notify_one();
        Ok(())
    }

    async fn unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let codes = filters
            .iter()
            .map(|f| {
                let before = self.session.subs.len();
                self.session.subs.retain(|s| &s.filter != f);
                if self.session.subs.len() < before {
                    if let Some(Ok((name, filter))) = shared::parse(f) {
                        self.broker.shared.release(name, filter, &self.client_id);
                    }
                    reason::SUCCESS
                } else {
                    0x11
                }
            })
            .collect();
        self.attach_shared();
        self.rebuild_tails(false);
        self.save_now().await;
        self.send(Out::UnsubAck(pkid, codes));
    }
}

/// Appends one batch (one append per log topic, concurrently), then stores
/// retained messages; answers every ack in packet order.
async fn append_batch(broker: Arc<Server>, batch: Batch) -> Acked {
    let started = Instant::now();
    let mut results = vec![reason::SUCCESS; batch.count];
    for (index, outcome) in ingest::append(&broker.cx.log, batch.records).await {
        if let Err(refused) = outcome {
            broker.metrics.refuse(Refusal::Log(refused.rejection));
            results[index] = match refused.rejection {
                Rejection::UnknownTopic => reason::TOPIC_NAME_INVALID,
                Rejection::TooLarge | Rejection::Quota | Rejection::DiskFull => {
                    reason::QUOTA_EXCEEDED
                }
                // "Valid, but the receiver is not willing to accept it".
                Rejection::Unwritable | Rejection::KeyRequired => reason::IMPLEMENTATION_SPECIFIC,
            };
        }
    }
    for (index, topic, payload, qos, props) in batch.retained {
        if results[index] != reason::SUCCESS {
            continue;
        }
        if let Err(e) = broker.set_retained(&topic, &payload, qos, &props).await {
            let detail = format!("topic {topic}: {e}");
            broker.metrics.refuse_with(Refusal::RetainRefused, &detail);
            results[index] = reason::QUOTA_EXCEEDED;
        }
    }
    let acks = batch
        .acks
        .into_iter()
        .map(|(qos, pkid, at)| {
            let code = match at {
                AckAt::Record(i) => results.get(i).copied().unwrap_or(reason::UNSPECIFIED),
                AckAt::Code(c) => c,
            };
            (qos, pkid, code)
        })
        .collect();
    Acked { acks, started }
}
