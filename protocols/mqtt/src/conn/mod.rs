//! One MQTT connection: CONNECT, then one loop that
//! reads packets, appends publishes, answers acks in order once durable,
//! delivers subscriptions from the log, and enforces keep-alive.
//!
//! Backpressure: the socket is not read while `MAX_APPEND_BATCHES` appends are
//! waiting for durability or `max_inflight` publishes are unacknowledged;
//! deliveries stop at the client's receive window; outbound bytes go through a
//! bounded channel to a writer task. Nothing grows with the backlog.
//!
//! This file holds the [`Connection`] itself: `run` (CONNECT to the end), the
//! serve loop, the rights check, the outbound buffer, session saves and the
//! end of a connection (session parked or dropped, will). The rest, by concern:
//! - `connect`: reading CONNECT, login, session takeover/resume, CONNACK;
//! - `inbound`: the packets a client sends (PUBLISH, PUBREL, SUBSCRIBE, ...),
//!   the append batch and its acks;
//! - `deliver`: tailing the log, deliveries, the inflight window and resends.

mod connect;
mod deliver;
mod inbound;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tributary_frontend::budget::{Reserved, WAIT_FOR_ROOM};

use self::connect::{accept, read_connect, ConnectFailure};
use self::deliver::Tails;
use self::inbound::{Acked, Batch};
use super::codec::{self, reason, ConnAckProps, Out, Version, Will};
use super::session::{self, PendingWill, Session};
use super::{wills, Server};
use crate::Refusal;
use tributary_devices::auth::{Action, Identity};
use tributary_frontend::{wait, Peer};

/// Append batches waiting for durability before the socket is no longer read.
const MAX_APPEND_BATCHES: usize = 4;
/// Outbound bytes gathered before they are handed to the writer.
const OUT_HIGH_WATER: usize = 256 * 1024;
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
    Server(u8, Refusal),
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
    /// v5 topic aliases we assigned on deliveries, by topic.
    out_aliases: HashMap<String, u16>,
    /// v5 topic aliases the client accepts on deliveries.
    client_alias_max: u16,
    /// A persistent session's QoS 2 delivery state changed: stored before
    /// the next bytes go out (a PUBLISH's packet id, a PUBREL's release), so
    /// a restart resends the same packet id and never a completed message.
    qos2_unsaved: bool,
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
    /// The shared subscription groups this connection is a member of.
    shared: Vec<deliver::SharedSub>,
    /// `$SYS` values sent, by topic (a handful: see `sys.rs`).
    sys_sent: HashMap<String, String>,
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
                broker.metrics.refuse(Refusal::ConnectTimeout);
                return;
            }
            Ok(Err(ConnectFailure::Io)) => return,
            Ok(Err(ConnectFailure::Refuse(code, why, version))) => {
                broker.metrics.refuse(why);
                // A CONNACK in the client's version, then close.
                let mut b = BytesMut::new();
                let props = Box::new(ConnAckProps {
                    reason_string: (version == Version::V5).then(|| why.label().replace('_', " ")),
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
                broker.metrics.refuse(why);
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
            keep_alive: Some(connect::granted_keep_alive(&broker, &connect))
                .filter(|k| *k > 0)
                .map(|k| Duration::from_millis(u64::from(k) * 1500)),
            will: connect.will.clone(),
            aliases: HashMap::new(),
            out_aliases: HashMap::new(),
            client_alias_max: connect.topic_alias_max,
            qos2_unsaved: false,
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
            shared: Vec::new(),
            sys_sent: HashMap::new(),
            conn_id,
            broker,
        };
        if present {
            let mut order: Vec<(u64, u16)> = h
                .session
                .inflight
                .iter()
                .map(|(pkid, f)| (f.seq, *pkid))
                .collect();
            order.sort_unstable();
            h.resend = order.into_iter().map(|(_, pkid)| pkid).collect();
        }
        h.attach_shared();
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
                        None => {
                            return Close::Server(reason::QUOTA_EXCEEDED, Refusal::MemoryBudget)
                        }
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
                let has_appends = !self.appends.is_empty();
                let next_append = wait::oldest(&mut self.appends);
                let pause_ends = wait::until(paused);
                let keep_alive = wait::until(deadline);
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
                Wake::Kicked => {
                    return Close::Server(reason::SESSION_TAKEN_OVER, Refusal::TakenOver)
                }
                Wake::Shutdown => {
                    return Close::Server(reason::SERVER_SHUTTING_DOWN, Refusal::Shutdown)
                }
                Wake::KeepAliveExpired => {
                    return Close::Server(reason::KEEP_ALIVE_TIMEOUT, Refusal::KeepAliveTimeout)
                }
                Wake::Appended(r) => {
                    self.appends.pop_front();
                    match r {
                        Ok(acked) => {
                            if let Err(close) = self.acked(acked).await {
                                return close;
                            }
                        }
                        Err(_) => {
                            return Close::Server(reason::UNSPECIFIED, Refusal::AppendTaskFailed)
                        }
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
                        return Close::Server(reason::NOT_AUTHORIZED, Refusal::NotAuthorized);
                    }
                }
                Wake::Resume => self.paused_until = None,
                Wake::Save => {
                    if self.claim_lost() {
                        return Close::Server(reason::SESSION_TAKEN_OVER, Refusal::TakenOver);
                    }
                    // The devices changed: a device disabled, removed, given a
                    // new token or no longer allowed a subscription is let go
                    // (at its next connection a restored session keeps only
                    // what is still allowed).
                    if !self.rights_hold() {
                        return Close::Server(reason::NOT_AUTHORIZED, Refusal::NotAuthorized);
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
                            self.store_failed(&e);
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
            && self.session.subs.iter().all(|s| {
                auth.authorize(&self.identity, Action::Subscribe, &s.filter)
                    .allowed()
            });
        self.revoked = !allowed;
        allowed
    }

    /// Hands gathered outbound bytes to the writer; a peer that stops reading
    /// for `WRITE_STALL` is dropped.
    async fn flush_out(&mut self) -> Result<(), Close> {
        if self.out.is_empty() {
            return Ok(());
        }
        if self.qos2_unsaved {
            self.save_now().await;
        }
        let bytes = self.out.split().freeze();
        tokio::select! {
            r = tokio::time::timeout(WRITE_STALL, self.writer.send(bytes)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Close::Lost),
                Err(_) => Err(Close::Server(reason::UNSPECIFIED, Refusal::WriteStalled)),
            },
            () = self.kick.cancelled() => Err(Close::Server(reason::SESSION_TAKEN_OVER, Refusal::TakenOver)),
            () = self.broker.cx.shutdown.cancelled() => Err(Close::Server(reason::SERVER_SHUTTING_DOWN, Refusal::Shutdown)),
        }
    }

    fn send(&mut self, packet: Out) {
        codec::encode(packet, self.version, &mut self.out);
    }

    /// A delivery is acknowledged (PUBACK, PUBCOMP, or a refusing PUBREC):
    /// its packet id and its place in the window are free.
    fn delivery_done(&mut self, pkid: u16) {
        if let Some(f) = self.session.inflight.remove(&pkid) {
            self.shared_has(&f);
            self.resend.retain(|p| *p != pkid);
            self.dirty = true;
            if f.qos == 2 {
                self.qos2_changed();
            }
            self.tails.notify.notify_one();
        }
    }

    /// The client has a shared subscription's message: its group is told.
    fn shared_has(&self, f: &session::Pending) {
        if let (
            Some(group),
            session::Inflight::Log {
                topic,
                partition,
                offset,
            },
        ) = (&f.shared, &f.at)
        {
            group.ack(self.conn_id, &(topic.clone(), *partition, *offset));
        }
    }

    /// QoS 2 delivery state changed; a persistent session stores it before
    /// more bytes go out.
    fn qos2_changed(&mut self) {
        self.dirty = true;
        if self.session.expiry > 0 {
            self.qos2_unsaved = true;
        }
    }

    /// Stores the delayed will this connection left in its slot, so that it
    /// outlives the node ([`wills`]). Not stored, it waits in memory alone.
    async fn store_will(&self, stored: Vec<u8>) {
        let log = &self.broker.cx.log;
        let ours = |w: &PendingWill| w.stored.as_deref() == Some(stored.as_slice());
        if let Err(e) = wills::store(log, &self.client_id, stored.clone()).await {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot store a delayed will; it waits in memory only");
            let mut slots = self.broker.sessions.lock();
            if let Some(w) = slots
                .get_mut(&self.client_id)
                .and_then(|s| s.will.as_mut())
                .filter(|w| ours(w))
            {
                w.stored = None;
            }
            return;
        }
        // The client may have come back while it was being stored: its new
        // connection dropped the will, and maybe looked for it before it
        // was there.
        let pending = self
            .broker
            .sessions
            .lock()
            .get(&self.client_id)
            .and_then(|s| s.will.as_ref())
            .is_some_and(ours);
        if !pending {
            if let Err(e) = wills::withdraw(log, &self.client_id, stored).await {
                tracing::warn!(client_id = %self.client_id, error = %e, "cannot remove a void will");
            }
        }
    }

    /// On a cluster: whether a connection to another node claimed the
    /// session since this one did.
    fn claim_lost(&self) -> bool {
        self.session.guard.as_ref().is_some_and(|g| {
            let now = self.broker.cx.log.meta_get(&g.space, &g.key);
            now.is_ok_and(|v| v.as_deref() != Some(g.value.as_slice()))
        })
    }

    /// A session write failed. When a connection to another node of the
    /// cluster took the session over, this one ends (SESSION_TAKEN_OVER,
    /// as a takeover on this node ends it).
    fn store_failed(&self, e: &tributary_storage::Error) {
        if session::taken_over(e) {
            tracing::info!(client_id = %self.client_id, "the MQTT session was taken over on another node");
            self.kick.cancel();
        } else {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot store an MQTT session");
        }
    }

    /// Stores a persistent session now (subscription changes are acknowledged
    /// only once stored).
    async fn save_now(&mut self) {
        self.qos2_unsaved = false;
        if self.session.expiry > 0 {
            self.dirty = false;
            if let Err(e) =
                session::persist(&self.broker.cx.log, &self.client_id, &mut self.session).await
            {
                self.store_failed(&e);
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
                if *why != Refusal::Shutdown {
                    self.broker.metrics.refuse(*why);
                }
                if self.version == Version::V5 {
                    self.send(Out::Disconnect(*code));
                }
                // No will for a client let go at shutdown or for lost rights.
                !matches!(*why, Refusal::Shutdown | Refusal::NotAuthorized)
            }
        };
        // The last bytes (acks, DISCONNECT) go out even though kick/shutdown fired.
        if self.qos2_unsaved {
            self.save_now().await;
        }
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
        // Shared subscriptions: what the client has not acknowledged goes to
        // the group's other members (a QoS 2 message past PUBREC stays here,
        // for its PUBREL).
        for s in std::mem::take(&mut self.shared) {
            s.group.leave(self.conn_id);
        }
        self.session
            .inflight
            .retain(|_, f| f.shared.is_none() || f.released);
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
                self.store_failed(&e);
            }
        }
        let mut now_will = None;
        let mut store_will = None;
        {
            let mut slots = self.broker.sessions.lock();
            let mine = slots
                .get(&self.client_id)
                .is_some_and(|s| s.owner == Some(self.conn_id));
            if mine {
                if expiry == 0 {
                    slots.remove(&self.client_id);
                    self.broker.shared.release_all(
                        &self.client_id,
                        self.session.subs.iter().map(|s| s.filter.as_str()),
                    );
                    now_will = will;
                } else if let Some(slot) = slots.get_mut(&self.client_id) {
                    slot.owner = None;
                    slot.expires = session::expiry_deadline(expiry);
                    slot.parked = Some(std::mem::replace(&mut self.session, Session::new(0)));
                    match will {
                        Some(w) if w.delay > 0 => {
                            let delay = Duration::from_secs(u64::from(w.delay.min(expiry)));
                            let due_ms = tributary_storage::util::now_ms()
                                .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(0));
                            let node = self.broker.cx.log.node_id();
                            let stored = wills::Stored::new(
                                node,
                                u64::try_from(due_ms).unwrap_or(0),
                                &self.identity,
                                &w,
                            )
                            .encode();
                            store_will = Some(stored.clone());
                            slot.will = Some(PendingWill {
                                identity: self.identity.clone(),
                                will: w,
                                due: Instant::now() + delay,
                                stored: Some(stored),
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
        if let Some(stored) = store_will {
            self.store_will(stored).await;
        }
        let _ = released.send(true);
        if let Some(w) = now_will {
            self.broker.publish_will(&self.identity, w).await;
        }
        if matches!(close, Close::Server(..)) {
            // A lingering close: the client may still be sending (PUBRELs
            // for the PUBRECs it is reading). Closing with its bytes unread
            // would reset the connection, and a reset can throw away our
            // DISCONNECT before the client reads it. So read and discard,
            // briefly and boundedly, until the client closes too.
            let mut reader = self.reader;
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                let mut left = LINGER_BYTES;
                let _ = tokio::time::timeout(LINGER, async {
                    while left > 0 {
                        match reader.read(&mut sink).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => left = left.saturating_sub(n),
                        }
                    }
                })
                .await;
            });
        }
    }
}

/// How long a connection the server closes still reads (and discards).
const LINGER: Duration = Duration::from_secs(2);
/// How much a closing connection reads at most.
const LINGER_BYTES: usize = 1024 * 1024;

/// Bytes of its own a connection may buffer without the node's budget: a
/// packet larger than this reserves its whole size before more of it is read.
const UNBUDGETED_BYTES: usize = 16 * 1024;

/// The size of the incomplete packet at the head of `buf`, when it is one the
/// node's budget must cover.
fn budgeted_len(buf: &[u8]) -> Option<usize> {
    codec::pending_len(buf).filter(|&size| size > UNBUDGETED_BYTES && size > buf.len())
}
