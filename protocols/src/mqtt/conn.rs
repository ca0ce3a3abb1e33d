//! One MQTT connection: CONNECT, then one loop that
//! reads packets, appends publishes, answers acks in order once durable,
//! delivers subscriptions from the log, and enforces keep-alive.
//!
//! Backpressure: the socket is not read while `MAX_APPEND_BATCHES` appends are
//! waiting for durability or `max_inflight` publishes are unacknowledged;
//! deliveries stop at the client's receive window; outbound bytes go through a
//! bounded channel to a writer task. Nothing grows with the backlog.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::budget::{MemoryBudget, Reserved, WAIT_FOR_ROOM};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tributary_storage::Error as LogError;

use super::codec::{
    self, reason, ConnAckProps, ConnectIn, DecodeError, In, Out, PublishIn, PublishOut, SubFilter,
    Version, Will,
};
use super::session::{self, Inflight, PendingWill, Retained, Session, Sub};
use super::{topic, Server, Slot};
use crate::auth::{self, Action, Credentials, Identity, Refusal};
use crate::ingest::{self, Rejection};
use crate::Peer;

/// Append batches waiting for durability before the socket is no longer read.
const MAX_APPEND_BATCHES: usize = 4;
/// Outbound bytes gathered before they are handed to the writer.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Records read from one partition per delivery pass.
const READ_RECORDS: usize = 256;
/// Bytes read from one partition per delivery pass.
const READ_BYTES: usize = 256 * 1024;
/// A peer that does not take our bytes for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// How often a persistent session's cursors are stored while they move.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// How a connection ends.
#[derive(Debug)]
enum Close {
    /// DISCONNECT from the client (`with_will`: v5 reason 0x04).
    Graceful { with_will: bool },
    /// Socket closed or failed without DISCONNECT.
    Lost,
    /// We close, with a v5 reason code (3.1.1: just close).
    Server(u8, &'static str),
}

/// The outcome of one append batch, in packet order.
struct Acked {
    acks: Vec<(u8, u16, u8)>,
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
struct Batch {
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

/// Log partitions a session tails, and the tasks that wake it on new records.
struct Tails {
    notify: Arc<Notify>,
    watchers: Vec<JoinHandle<()>>,
    sources: Vec<(String, u32)>,
    next: usize,
    topics_changed: Arc<AtomicBool>,
}

impl Drop for Tails {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

pub(super) struct Connection<S> {
    broker: Arc<Server>,
    conn_id: u64,
    version: Version,
    reader: ReadHalf<S>,
    buf: BytesMut,
    /// The part of the node's memory budget the packet being received holds.
    held: Reserved,
    out: BytesMut,
    writer: mpsc::Sender<Bytes>,
    client_id: String,
    identity: Identity,
    session: Session,
    keep_alive: Option<Duration>,
    will: Option<Will>,
    aliases: HashMap<u16, String>,
    send_window: usize,
    client_max_packet: usize,
    appends: VecDeque<JoinHandle<Acked>>,
    /// Reading waits until then (a device's rate limit).
    paused_until: Option<tokio::time::Instant>,
    /// The device registry's generation when rights were last checked.
    auth_generation: u64,
    /// The device lost its rights (see `rights_hold`): the connection ends.
    revoked: bool,
    unacked_in: usize,
    batch: Batch,
    tails: Tails,
    kick: CancellationToken,
    dirty: bool,
    /// Retained messages still to deliver after SUBSCRIBE: (topic, granted QoS,
    /// subscription id), sent as the client's window allows.
    retained_queue: VecDeque<(String, u8, Option<usize>)>,
    /// QoS 2 packet ids whose append is not durable yet.
    qos2_pending: HashSet<u16>,
    /// Unacknowledged deliveries of a resumed session still to resend, in send order.
    resend: VecDeque<u16>,
}

enum Wake {
    Kicked,
    Shutdown,
    Appended(Result<Acked, tokio::task::JoinError>),
    Read(std::io::Result<usize>),
    KeepAliveExpired,
    Deliver,
    Save,
    /// A rate-limit pause is over.
    Resume,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    /// Serves one connection to the end.
    pub(super) async fn run(broker: Arc<Server>, stream: S, peer: Peer) {
        let (mut reader, mut write_half) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let max = broker.config.max_packet_bytes;
        let connect = tokio::time::timeout(
            broker.config.connect_timeout,
            read_connect(&mut reader, &mut buf, max, &broker.cx.budget),
        )
        .await;
        let connect = match connect {
            Err(_) => {
                broker.metrics.reject("connect_timeout");
                return;
            }
            Ok(Err(ConnectFailure::Io)) => return,
            Ok(Err(ConnectFailure::Refuse(code, why, version))) => {
                broker.metrics.reject(why);
                // A CONNACK in the client's version, then close.
                let mut b = BytesMut::new();
                let props = Box::new(ConnAckProps {
                    reason_string: (version == Version::V5).then(|| why.replace('_', " ")),
                    ..ConnAckProps::default()
                });
                codec::encode(
                    Out::ConnAck {
                        session_present: false,
                        code,
                        props,
                    },
                    version,
                    &mut b,
                );
                let _ = write_half.write_all(&b).await;
                let _ = write_half.shutdown().await;
                return;
            }
            Ok(Err(ConnectFailure::Drop(why))) => {
                broker.metrics.reject(why);
                return;
            }
            Ok(Ok(c)) => c,
        };
        let version = connect.version;
        let (tx, mut rx) = mpsc::channel::<Bytes>(16);
        let writer = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                // A peer that stops reading does not hold this task (and its socket) forever.
                match tokio::time::timeout(WRITE_STALL, write_half.write_all(&b)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            let _ = write_half.shutdown().await;
        });
        let conn_id = broker.next_conn.fetch_add(1, Relaxed);
        let mut out = BytesMut::with_capacity(4096);
        let accepted = accept(&broker, conn_id, &connect, &peer, &mut out).await;
        let Some((client_id, identity, session, present, kick, released)) = accepted else {
            let _ = tx.send(out.freeze()).await;
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
            return;
        };
        broker.metrics.connects.fetch_add(1, Relaxed);
        let window = usize::from(connect.receive_max.min(broker.config.max_inflight).max(1));
        let mut h = Connection {
            version,
            reader,
            buf,
            held: Reserved::none(),
            out,
            writer: tx,
            client_id,
            identity,
            session,
            keep_alive: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
            will: connect.will.clone(),
            aliases: HashMap::new(),
            send_window: window,
            client_max_packet: connect.max_packet_size.map_or(usize::MAX, |m| m as usize),
            appends: VecDeque::new(),
            paused_until: None,
            auth_generation: broker.cx.auth.generation(),
            revoked: false,
            unacked_in: 0,
            batch: Batch::default(),
            tails: Tails {
                notify: Arc::new(Notify::new()),
                watchers: Vec::new(),
                sources: Vec::new(),
                next: 0,
                topics_changed: Arc::new(AtomicBool::new(false)),
            },
            kick,
            dirty: false,
            retained_queue: VecDeque::new(),
            qos2_pending: HashSet::new(),
            resend: VecDeque::new(),
            conn_id,
            broker,
        };
        if present {
            let mut order: Vec<(u64, u16)> = h
                .session
                .inflight
                .iter()
                .map(|(pkid, (seq, _))| (*seq, *pkid))
                .collect();
            order.sort_unstable();
            h.resend = order.into_iter().map(|(_, pkid)| pkid).collect();
        }
        // A resumed session has a cursor for every partition that existed when
        // it subscribed: partitions without one came later, so start at their start.
        h.rebuild_tails(present);
        h.tails.notify.notify_one();
        let close = h.serve().await;
        h.finish(close, released, writer).await;
    }

    async fn serve(&mut self) -> Close {
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
        // Packets that arrived with CONNECT, in the same read.
        if !self.buf.is_empty() {
            if let Err(close) = self.read_packets().await {
                return close;
            }
        }
        loop {
            if let Err(close) = self.flush_out().await {
                return close;
            }
            let paused = self
                .paused_until
                .filter(|t| *t > tokio::time::Instant::now());
            let can_read = self.appends.len() < MAX_APPEND_BATCHES
                && self.unacked_in < usize::from(self.broker.config.max_inflight)
                && paused.is_none();
            if !can_read {
                // Not reading is our doing: the client's keep-alive clock waits too.
                deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
            }
            // A large packet on its way holds its size from the node's budget
            // before more of it is read (waiting is backpressure; no room in
            // time closes the connection: v5 DISCONNECT 0x97).
            match budgeted_len(&self.buf) {
                Some(size) if can_read && self.held.bytes() < size => {
                    match self.broker.cx.budget.reserve(size, WAIT_FOR_ROOM).await {
                        Some(r) => self.held = r,
                        None => return Close::Server(reason::QUOTA_EXCEEDED, "memory_budget"),
                    }
                }
                Some(_) => {}
                None => {
                    self.held = Reserved::none();
                    // Give back a large packet's buffer once it is consumed.
                    if self.buf.capacity() > 4 * UNBUDGETED_BYTES
                        && self.buf.len() < UNBUDGETED_BYTES
                    {
                        self.buf = BytesMut::from(&self.buf[..]);
                    }
                }
            }
            self.buf.reserve(8 * 1024);
            let wake = {
                let appends = &mut self.appends;
                let has_appends = !appends.is_empty();
                let next_append = async {
                    match appends.front_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                };
                let pause_ends = async {
                    match paused {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                };
                let keep_alive = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                // Unbiased: a connection that both publishes and subscribes must
                // not starve its deliveries (or its session saves) under load.
                tokio::select! {
                    () = self.kick.cancelled() => Wake::Kicked,
                    () = self.broker.cx.shutdown.cancelled() => Wake::Shutdown,
                    r = next_append, if has_appends => Wake::Appended(r),
                    r = self.reader.read_buf(&mut self.buf), if can_read => Wake::Read(r),
                    () = keep_alive => Wake::KeepAliveExpired,
                    () = pause_ends => Wake::Resume,
                    () = self.tails.notify.notified() => Wake::Deliver,
                    _ = save.tick() => Wake::Save,
                }
            };
            match wake {
                Wake::Kicked => return Close::Server(reason::SESSION_TAKEN_OVER, "taken_over"),
                Wake::Shutdown => return Close::Server(reason::SERVER_SHUTTING_DOWN, "shutdown"),
                Wake::KeepAliveExpired => {
                    return Close::Server(reason::KEEP_ALIVE_TIMEOUT, "keep_alive_timeout")
                }
                Wake::Appended(r) => {
                    self.appends.pop_front();
                    match r {
                        Ok(acked) => {
                            if let Err(close) = self.acked(acked).await {
                                return close;
                            }
                        }
                        Err(_) => return Close::Server(reason::UNSPECIFIED, "append_task_failed"),
                    }
                }
                Wake::Read(Ok(0)) => return Close::Lost,
                Wake::Read(Err(_)) => return Close::Lost,
                Wake::Read(Ok(_)) => {
                    deadline = self.keep_alive.map(|k| tokio::time::Instant::now() + k);
                    if let Err(close) = self.read_packets().await {
                        return close;
                    }
                }
                Wake::Deliver => {
                    self.deliver();
                    if self.revoked {
                        return Close::Server(reason::NOT_AUTHORIZED, "not_authorized");
                    }
                }
                Wake::Resume => self.paused_until = None,
                Wake::Save => {
                    // The devices changed: a device disabled, removed, given a
                    // new token or no longer allowed a subscription is let go
                    // (at its next connection a restored session keeps only
                    // what is still allowed).
                    if !self.rights_hold() {
                        return Close::Server(reason::NOT_AUTHORIZED, "not_authorized");
                    }
                    if self.dirty && self.session.expiry > 0 {
                        self.dirty = false;
                        if let Err(e) = session::persist(
                            &self.broker.cx.log,
                            &self.client_id,
                            &mut self.session,
                        )
                        .await
                        {
                            tracing::warn!(client_id = %self.client_id, error = %e, "cannot store an MQTT session");
                        }
                    }
                }
            }
        }
    }

    /// Do the connection's rights still hold? Asked before every publish
    /// and every delivery pass, so both follow the device registry's current
    /// state rather than the one the device connected with: when the
    /// registry changed since the last check, the device must still be let
    /// in and every subscription it holds still allowed (the ACL of each
    /// publish is checked on its own). False is final: the connection ends.
    fn rights_hold(&mut self) -> bool {
        if self.revoked {
            return false;
        }
        let auth = &self.broker.cx.auth;
        let generation = auth.generation();
        if generation == self.auth_generation {
            return true;
        }
        self.auth_generation = generation;
        let allowed = auth.still_valid(&self.identity)
            && self
                .session
                .subs
                .iter()
                .all(|s| auth.authorize(&self.identity, Action::Subscribe, &s.filter));
        self.revoked = !allowed;
        allowed
    }

    /// Hands gathered outbound bytes to the writer; a peer that stops reading
    /// for `WRITE_STALL` is dropped.
    async fn flush_out(&mut self) -> Result<(), Close> {
        if self.out.is_empty() {
            return Ok(());
        }
        let bytes = self.out.split().freeze();
        tokio::select! {
            r = tokio::time::timeout(WRITE_STALL, self.writer.send(bytes)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Close::Lost),
                Err(_) => Err(Close::Server(reason::UNSPECIFIED, "write_stalled")),
            },
            () = self.kick.cancelled() => Err(Close::Server(reason::SESSION_TAKEN_OVER, "taken_over")),
            () = self.broker.cx.shutdown.cancelled() => Err(Close::Server(reason::SERVER_SHUTTING_DOWN, "shutdown")),
        }
    }

    fn send(&mut self, packet: Out) {
        codec::encode(packet, self.version, &mut self.out);
    }

    async fn read_packets(&mut self) -> Result<(), Close> {
        let max = self.broker.config.max_packet_bytes;
        loop {
            match codec::decode(&mut self.buf, self.version, max) {
                Ok(Some(packet)) => self.packet(packet).await?,
                Ok(None) => break,
                Err(DecodeError::TooLarge { .. }) => {
                    return Err(Close::Server(reason::PACKET_TOO_LARGE, "packet_too_large"))
                }
                Err(DecodeError::Protocol { why, .. }) => {
                    return Err(Close::Server(reason::PROTOCOL_ERROR, why))
                }
                Err(_) => return Err(Close::Server(reason::MALFORMED, "malformed_packet")),
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
                if self.session.inflight.remove(&pkid).is_some() {
                    self.resend.retain(|p| *p != pkid);
                    self.dirty = true;
                    self.tails.notify.notify_one();
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
                self.subscribe(pkid, filters, id).await;
                Ok(())
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
                        return Err(Close::Server(reason::PROTOCOL_ERROR, "protocol_error"));
                    }
                    self.session.expiry = e.min(self.broker.config.max_session_expiry_secs);
                }
                // MQTT-3.1.2-8: only reason 0x00 discards the will.
                Err(Close::Graceful { with_will: r != 0 })
            }
            In::Connect(_) => Err(Close::Server(reason::PROTOCOL_ERROR, "second_connect")),
            In::PubRec(_) | In::PubComp(_) | In::Unexpected(_) => {
                Err(Close::Server(reason::PROTOCOL_ERROR, "protocol_error"))
            }
        }
    }

    /// Refuses a publish: v5 answers with the reason (QoS > 0), 3.1.1 closes.
    fn refuse_publish(&mut self, p: &PublishIn, code: u8, why: &'static str) -> Result<(), Close> {
        self.broker.metrics.reject(why);
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
            return Err(Close::Server(reason::NOT_AUTHORIZED, "not_authorized"));
        }
        let m = &self.broker.metrics;
        m.publishes[usize::from(p.qos.min(2))].fetch_add(1, Relaxed);
        if p.qos > 0 {
            self.unacked_in += 1;
            if self.version == Version::V5
                && self.unacked_in > usize::from(self.broker.config.max_inflight)
            {
                return Err(Close::Server(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive_maximum_exceeded",
                ));
            }
        }
        if let Some(alias) = p.alias {
            if alias == 0 || alias > self.broker.config.topic_alias_max {
                return Err(Close::Server(
                    reason::TOPIC_ALIAS_INVALID,
                    "topic_alias_invalid",
                ));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(Close::Server(reason::PROTOCOL_ERROR, "topic_alias_unknown"))
                    }
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if !topic::valid_name(&p.topic) {
            return Err(Close::Server(
                reason::TOPIC_NAME_INVALID,
                "topic_name_invalid",
            ));
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
                "payload_format_invalid",
            );
        }
        if !self
            .broker
            .cx
            .auth
            .authorize(&self.identity, Action::Publish, &p.topic)
        {
            if self.version == Version::V4 {
                // 3.1.1 has no way to refuse a publish: close, whatever the QoS.
                self.broker.metrics.reject("not_authorized");
                return Err(Close::Server(reason::NOT_AUTHORIZED, "not_authorized"));
            }
            return self.refuse_publish(&p, reason::NOT_AUTHORIZED, "not_authorized");
        }
        let target = self.broker.router.target(&p.topic);
        let no_local = self.version == Version::V5 && self.session.subs.iter().any(|s| s.no_local);
        let publisher = no_local.then_some(self.client_id.as_str());
        let (log_topic, record) = match session::event_for(
            target, &p.topic, &p.payload, p.qos, p.retain, &p.props, publisher,
        ) {
            Ok(x) => x,
            Err(_) => return self.refuse_publish(&p, reason::TOPIC_NAME_INVALID, "no_log_topic"),
        };
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

    async fn acked(&mut self, acked: Acked) -> Result<(), Close> {
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
                return Err(Close::Server(code, "append_failed"));
            }
            self.send(if qos == 1 {
                Out::PubAck(pkid, code)
            } else {
                Out::PubRec(pkid, code)
            });
        }
        Ok(())
    }

    async fn subscribe(&mut self, pkid: u16, filters: Vec<SubFilter>, id: Option<usize>) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for f in filters {
            let code = if f.path.starts_with("$share/") {
                reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            } else if !topic::valid_filter(&f.path) {
                reason::TOPIC_FILTER_INVALID
            } else if self.session.subs.len() >= self.broker.config.max_subscriptions
                && !self.session.subs.iter().any(|s| s.filter == f.path)
            {
                reason::QUOTA_EXCEEDED
            } else if !self
                .broker
                .cx
                .auth
                .authorize(&self.identity, Action::Subscribe, &f.path)
            {
                reason::NOT_AUTHORIZED
            } else {
                let granted = f.qos.min(1);
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
                if f.retain_handling == 0 || (f.retain_handling == 1 && !existed) {
                    retained.push((f.path.clone(), granted));
                }
                granted
            };
            if code >= 0x80 {
                self.broker.metrics.reject("subscribe_refused");
            }
            codes.push(code);
        }
        self.rebuild_tails(false);
        self.save_now().await;
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
    }

    async fn unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let codes = filters
            .iter()
            .map(|f| {
                let before = self.session.subs.len();
                self.session.subs.retain(|s| &s.filter != f);
                if self.session.subs.len() < before {
                    reason::SUCCESS
                } else {
                    0x11
                }
            })
            .collect();
        self.rebuild_tails(false);
        self.save_now().await;
        self.send(Out::UnsubAck(pkid, codes));
    }

    /// Stores a persistent session now (subscription changes are acknowledged
    /// only once stored).
    async fn save_now(&mut self) {
        if self.session.expiry > 0 {
            self.dirty = false;
            if let Err(e) =
                session::persist(&self.broker.cx.log, &self.client_id, &mut self.session).await
            {
                tracing::warn!(client_id = %self.client_id, error = %e, "cannot store an MQTT session");
            }
        }
    }

    /// Recomputes the tailed partitions from the subscriptions. New partitions
    /// start at their end (only later records are delivered), except those of
    /// topics created after a wildcard subscription (`from_start`).
    fn rebuild_tails(&mut self, from_start: bool) {
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
    fn deliver(&mut self) {
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
                let Some(d) = session::delivery_of(&t, r, now) else {
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
                    keep_retain && r.headers.iter().any(|(k, _)| k == session::header::RETAIN);
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
                        session::delivery_of(&topic, &r, now).map(|d| PublishOut {
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

    async fn finish(mut self, close: Close, released: watch::Sender<bool>, writer: JoinHandle<()>) {
        // Acks already durable still go out; publishes not yet durable are
        // not acknowledged (the client resends them).
        let publish_will = match &close {
            Close::Graceful { with_will } => *with_will,
            Close::Lost => true,
            Close::Server(code, why) => {
                if !matches!(*why, "shutdown") {
                    self.broker.metrics.reject(why);
                }
                if self.version == Version::V5 {
                    self.send(Out::Disconnect(*code));
                }
                // No will for a client let go at shutdown or for lost rights.
                !matches!(*why, "shutdown" | "not_authorized")
            }
        };
        // The last bytes (acks, DISCONNECT) go out even though kick/shutdown fired.
        if !self.out.is_empty() {
            let bytes = self.out.split().freeze();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.writer.send(bytes)).await;
        }
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, tx));
        let mut writer = writer;
        if tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        self.tails.watchers.drain(..).for_each(|w| w.abort());
        // Appends still in flight settle the QoS 2 state the session keeps.
        for h in std::mem::take(&mut self.appends) {
            if let Ok(Ok(acked)) = tokio::time::timeout(Duration::from_secs(10), h).await {
                for (qos, pkid, code) in acked.acks {
                    if qos == 2 && code == reason::SUCCESS {
                        self.session.qos2.insert(pkid);
                    }
                }
            }
        }

        let will = if publish_will { self.will.take() } else { None };
        let mine = self
            .broker
            .sessions
            .lock()
            .get(&self.client_id)
            .is_some_and(|s| s.owner == Some(self.conn_id));
        let expiry = self.session.expiry;
        // Only the session's owner stores it: a connection that was taken over
        // late must not overwrite what its successor holds.
        if mine && (expiry > 0 || self.session.stored) {
            if let Err(e) =
                session::persist(&self.broker.cx.log, &self.client_id, &mut self.session).await
            {
                tracing::warn!(client_id = %self.client_id, error = %e, "cannot store an MQTT session");
            }
        }
        let mut now_will = None;
        {
            let mut slots = self.broker.sessions.lock();
            let mine = slots
                .get(&self.client_id)
                .is_some_and(|s| s.owner == Some(self.conn_id));
            if mine {
                if expiry == 0 {
                    slots.remove(&self.client_id);
                    now_will = will;
                } else if let Some(slot) = slots.get_mut(&self.client_id) {
                    slot.owner = None;
                    slot.expires = session::expiry_deadline(expiry);
                    slot.parked = Some(std::mem::replace(&mut self.session, Session::new(0)));
                    match will {
                        Some(w) if w.delay > 0 => {
                            let delay = Duration::from_secs(u64::from(w.delay.min(expiry)));
                            slot.will = Some(PendingWill {
                                identity: self.identity.clone(),
                                will: w,
                                due: Instant::now() + delay,
                            });
                        }
                        w => now_will = w,
                    }
                }
            } else {
                // Taken over: the client is back, so a delayed will is void
                // (MQTT-3.1.3-9); one without delay is published now.
                now_will = will.filter(|w| w.delay == 0);
            }
        }
        let _ = released.send(true);
        if let Some(w) = now_will {
            self.broker.publish_will(&self.identity, w).await;
        }
    }
}

/// Appends one batch (one append per log topic, concurrently), then stores
/// retained messages; answers every ack in packet order.
async fn append_batch(broker: Arc<Server>, batch: Batch) -> Acked {
    let started = Instant::now();
    let mut results = vec![reason::SUCCESS; batch.count];
    for (index, outcome) in ingest::append(&broker.cx.log, batch.records).await {
        if let Err(refused) = outcome {
            broker.metrics.reject(refused.rejection.label());
            results[index] = match refused.rejection {
                Rejection::UnknownTopic => reason::TOPIC_NAME_INVALID,
                Rejection::TooLarge | Rejection::Quota | Rejection::DiskFull => {
                    reason::QUOTA_EXCEEDED
                }
                Rejection::Unwritable => reason::IMPLEMENTATION_SPECIFIC,
            };
        }
    }
    for (index, topic, payload, qos, props) in batch.retained {
        if results[index] != reason::SUCCESS {
            continue;
        }
        if let Err(e) = broker.set_retained(&topic, &payload, qos, &props).await {
            broker.metrics.reject("retain_refused");
            tracing::warn!(%topic, error = %e, "a retained message was not kept");
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

enum ConnectFailure {
    Io,
    /// CONNACK with this code in this version's form, then close.
    Refuse(u8, &'static str, Version),
    /// Close without a word (not MQTT at all).
    Drop(&'static str),
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
    budget: &MemoryBudget,
) -> Result<ConnectIn, ConnectFailure> {
    // A large CONNECT (a will with a big payload) holds node budget while it
    // arrives, like any other large packet.
    let mut held = Reserved::none();
    loop {
        match codec::sniff_version(buf, max) {
            Ok(Some(v)) => match codec::decode(buf, v, max) {
                Ok(Some(In::Connect(c))) => return Ok(*c),
                Ok(Some(_)) => return Err(ConnectFailure::Drop("not_connect")),
                Ok(None) => {}
                Err(DecodeError::TooLarge { .. }) => {
                    return Err(ConnectFailure::Drop("packet_too_large"))
                }
                // A v5 CONNECT that repeats a property: CONNACK 0x82.
                Err(DecodeError::Protocol { why, .. }) => {
                    return Err(ConnectFailure::Refuse(reason::PROTOCOL_ERROR, why, v))
                }
                Err(_) => return Err(ConnectFailure::Drop("malformed_connect")),
            },
            Ok(None) => {}
            Err(DecodeError::UnsupportedVersion(_)) => {
                // A CONNACK a 3.1/3.1.1 client understands.
                return Err(ConnectFailure::Refuse(
                    reason::UNSUPPORTED_PROTOCOL_VERSION,
                    "unsupported_protocol_version",
                    Version::V4,
                ));
            }
            Err(DecodeError::TooLarge { .. }) => {
                return Err(ConnectFailure::Drop("packet_too_large"))
            }
            Err(DecodeError::NotMqtt(_)) => return Err(ConnectFailure::Drop("not_mqtt")),
            Err(DecodeError::Malformed(_) | DecodeError::Protocol { .. }) => {
                return Err(ConnectFailure::Drop("malformed_connect"))
            }
        }
        if let Some(size) = budgeted_len(buf) {
            if held.bytes() < size {
                held = budget
                    .reserve(size, WAIT_FOR_ROOM)
                    .await
                    .ok_or(ConnectFailure::Drop("memory_budget"))?;
            }
        }
        buf.reserve(4096);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ConnectFailure::Io),
            Ok(_) => {}
        }
    }
}

/// Bytes of its own a connection may buffer without the node's budget: a
/// packet larger than this reserves its whole size before more of it is read.
const UNBUDGETED_BYTES: usize = 16 * 1024;

/// The size of the incomplete packet at the head of `buf`, when it is one the
/// node's budget must cover.
fn budgeted_len(buf: &[u8]) -> Option<usize> {
    codec::pending_len(buf).filter(|&size| size > UNBUDGETED_BYTES && size > buf.len())
}

type Accepted = (
    String,
    Identity,
    Session,
    bool,
    CancellationToken,
    watch::Sender<bool>,
);

/// Checks a CONNECT, takes over or resumes the session, and writes CONNACK
/// into `out`. `None`: refused (the CONNACK says why).
async fn accept(
    broker: &Arc<Server>,
    conn_id: u64,
    c: &ConnectIn,
    peer: &Peer,
    out: &mut BytesMut,
) -> Option<Accepted> {
    let refuse = |code: u8, why: &'static str, out: &mut BytesMut| {
        broker.metrics.reject(why);
        codec::encode(
            Out::ConnAck {
                session_present: false,
                code,
                props: Box::new(ConnAckProps {
                    reason_string: Some(why.replace('_', " ")),
                    ..ConnAckProps::default()
                }),
            },
            c.version,
            out,
        );
    };
    if c.auth_method.is_some() {
        refuse(reason::BAD_AUTH_METHOD, "enhanced_auth_unsupported", out);
        return None;
    }
    if c.receive_max == 0 || c.max_packet_size == Some(0) {
        // MQTT-3.1.2.11: zero is a protocol error for both.
        refuse(reason::PROTOCOL_ERROR, "protocol_error", out);
        return None;
    }

    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        if c.version == Version::V4 && !c.clean {
            // MQTT-3.1.3-8: an empty id needs clean session in 3.1.1.
            refuse(reason::CLIENT_ID_NOT_VALID, "client_id_invalid", out);
            return None;
        }
        let id = format!("tributary-{:016x}", fastrand::u64(..));
        assigned = Some(id.clone());
        id
    } else {
        c.client_id.clone()
    };
    if client_id.len() > 200 || client_id.contains('\0') {
        refuse(reason::CLIENT_ID_NOT_VALID, "client_id_invalid", out);
        return None;
    }
    if let Some(w) = &c.will {
        if !topic::valid_name(&w.topic) || w.qos > 2 {
            refuse(reason::PROTOCOL_ERROR, "will_invalid", out);
            return None;
        }
    }
    let creds = Credentials {
        protocol: "mqtt",
        username: c.username.as_deref(),
        password: c.password.as_deref(),
        client_id: Some(&client_id),
        peer: peer.addr,
        certificate: peer.certificate.as_deref(),
    };
    let identity = match auth::login(&*broker.cx.auth, &creds).await {
        Ok(i) => i,
        Err(Refusal::BadCredentials) => {
            refuse(reason::BAD_USERNAME_OR_PASSWORD, "bad_credentials", out);
            return None;
        }
        Err(Refusal::NotAuthorized) => {
            refuse(reason::NOT_AUTHORIZED, "not_authorized", out);
            return None;
        }
    };
    if let Some(w) = &c.will {
        if !broker
            .cx
            .auth
            .authorize(&identity, Action::Publish, &w.topic)
        {
            refuse(reason::NOT_AUTHORIZED, "not_authorized", out);
            return None;
        }
    }
    // A session belongs to a device: another device using the same client id
    // gets a session of its own, and can neither take this one over nor kick
    // its connection. (Device ids hold no `:`.)
    let client_id = if identity.id == auth::ANONYMOUS {
        client_id
    } else {
        format!("{}:{client_id}", identity.id)
    };
    let expiry = c.session_expiry.min(broker.config.max_session_expiry_secs);

    // Take the session over from a live connection: kick it, wait until it has
    // put the session back (bounded), then claim the slot.
    // Loop: another connection with this id may have claimed it meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let previous = {
            let slots = broker.sessions.lock();
            slots
                .get(&client_id)
                .filter(|s| s.owner.is_some())
                .map(|s| (s.kick.clone(), s.released.clone()))
        };
        let Some((kick, mut released)) = previous else {
            break;
        };
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        kick.cancel();
        let _ = tokio::time::timeout_at(deadline, released.wait_for(|r| *r)).await;
    }
    let kick = CancellationToken::new();
    let (released_tx, released_rx) = watch::channel(false);
    let (session, present, stale) = {
        let mut slots = broker.sessions.lock();
        if !slots.contains_key(&client_id) && slots.len() >= broker.config.max_sessions {
            drop(slots);
            refuse(reason::QUOTA_EXCEEDED, "too_many_sessions", out);
            return None;
        }
        let old = slots.insert(
            client_id.clone(),
            Slot {
                owner: Some(conn_id),
                kick: kick.clone(),
                released: released_rx,
                parked: None,
                expires: None,
                will: None,
            },
        );
        // A pending delayed will is dropped: the client is back (MQTT-3.1.3-9).
        let parked = old.and_then(|o| {
            if let Some(k) = o.owner {
                tracing::warn!(%client_id, previous = k, "the previous connection did not release its session in time");
                o.kick.cancel();
            }
            o.parked
        });
        match parked {
            Some(mut s) if !c.clean => {
                s.expiry = expiry;
                // The device's rights may have narrowed while it was away.
                s.subs.retain(|sub| {
                    broker
                        .cx
                        .auth
                        .authorize(&identity, Action::Subscribe, &sub.filter)
                });
                (s, true, false)
            }
            Some(s) => (Session::new(expiry), false, s.stored),
            None => (Session::new(expiry), false, false),
        }
    };
    let mut session = session;
    if stale {
        session.stored = true;
    }
    if session.expiry > 0 || stale {
        if let Err(e) = session::persist(&broker.cx.log, &client_id, &mut session).await {
            tracing::warn!(%client_id, error = %e, "cannot store an MQTT session");
            broker.sessions.lock().remove(&client_id);
            refuse(reason::SERVER_UNAVAILABLE, "log_unwritable", out);
            return None;
        }
    }
    let granted_expiry = (c.version == Version::V5 && expiry != c.session_expiry).then_some(expiry);
    codec::encode(
        Out::ConnAck {
            session_present: present,
            code: reason::SUCCESS,
            props: Box::new(ConnAckProps {
                assigned_client_id: assigned,
                receive_max: broker.config.max_inflight,
                max_packet_size: broker.config.max_packet_bytes as u32,
                topic_alias_max: broker.config.topic_alias_max,
                session_expiry: granted_expiry,
                server_keep_alive: None,
                reason_string: None,
            }),
        },
        c.version,
        out,
    );
    Some((client_id, identity, session, present, kick, released_tx))
}
