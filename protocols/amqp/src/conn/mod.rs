//! One AMQP connection: the handshake (protocol header, start/start-ok with
//! PLAIN or AMQPLAIN, tune/tune-ok, open), then one loop that reads frames,
//! assembles publishes per channel, appends them, and confirms in order once
//! durable.
//!
//! Backpressure: the socket is not read while `max_pending_appends` appends
//! wait for the disk; a client that announced the capability is sent
//! connection.blocked when that lasts, and unblocked when it ends. Outbound
//! bytes go through a bounded channel to a writer task; partial message bodies
//! are bounded by `max_content_bytes`. Nothing grows with the backlog.
//!
//! The code is split by concern. This file: the [`Connection`] state, [`run`]
//! and the main loop (reading, waking, channel 0, closing). The others:
//! - [`handshake`](mod@handshake): protocol header, start/tune/open, credentials;
//! - [`channel`]: channel open/close and the channel methods;
//! - [`publish`]: basic.publish, content assembly into events, the append batch;
//! - [`confirm`]: publisher confirms (hold, ack/nack, send_confirms).

mod channel;
mod confirm;
mod handshake;
mod publish;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::channel::Channel;
use self::handshake::{close_frame, drain_until_close_ok, handshake, HANDSHAKE_FRAME_MAX};
use self::publish::{Appended, Batch};
use super::frame::{self, code};
use super::Server;
use crate::Error;
use crate::Refusal;
use tributary_devices::auth::Identity;
use tributary_frontend::{wait, Peer};

/// A peer that does not take our bytes for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// How long appends may hold the socket unread before connection.blocked.
const BLOCK_AFTER: Duration = Duration::from_millis(500);
/// How long we wait for close-ok after sending connection.close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long a shutting-down connection waits for its appends to be durable.
const DRAIN: Duration = Duration::from_secs(10);
/// The same at node shutdown, and the waits after it: they must fit in the
/// node's grace period (10 s by default) with room for the final flush.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_millis(500);
/// Resolved confirms one connection may hold back behind an earlier, slower
/// tag before it stops reading.
const MAX_HELD_CONFIRMS: usize = 65_536;
/// Outbound bytes gathered before they are handed to the writer.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// How a connection ends.
#[derive(Debug)]
enum End {
    /// Socket closed or failed.
    Lost,
    /// The client sent connection.close; we answered close-ok.
    ClientClosed,
    /// We close with connection.close(code, text, class, method).
    Server(u16, String, u16, u16),
}

impl End {
    fn server(code: u16, text: impl Into<String>) -> End {
        End::Server(code, text.into(), 0, 0)
    }

    fn for_method(code: u16, text: impl Into<String>, m: &AMQPClass) -> End {
        End::Server(
            code,
            text.into(),
            m.get_amqp_class_id(),
            m.get_amqp_method_id(),
        )
    }
}

impl From<Error> for End {
    fn from(e: Error) -> End {
        let (code, text) = e.reply();
        match e {
            Error::UnknownMethod { class, method } | Error::Syntax { class, method } => {
                End::Server(code, text, class, method)
            }
            _ => End::server(code, text),
        }
    }
}

struct Connection<S> {
    server: Arc<Server>,
    reader: ReadHalf<S>,
    buf: BytesMut,
    out: Vec<u8>,
    writer: mpsc::Sender<Vec<u8>>,
    identity: Identity,
    frame_max: usize,
    channel_max: u16,
    heartbeat: Option<Duration>,
    blocked_capable: bool,
    blocked: bool,
    channels: HashMap<u16, Channel>,
    next_epoch: u64,
    appends: VecDeque<JoinHandle<Appended>>,
    /// Reading waits until then (a device's rate limit).
    paused_until: Option<Instant>,
    batch: Batch,
    /// Body bytes reserved by unfinished messages across channels.
    buffered: u64,
    /// Confirms resolved but held back behind an earlier tag, and the bytes
    /// of basic.return frames among them.
    held_confirms: usize,
    held_bytes: u64,
    /// `max_event_bytes` of topics seen to exist (topics are never deleted
    /// and their limits never change), so a publish needs no log lookup.
    known_topics: HashMap<String, usize>,
}

enum Wake {
    Shutdown,
    Appended(Result<Appended, tokio::task::JoinError>),
    Read(std::io::Result<usize>),
    Heartbeat,
    PeerSilent,
    Block,
    /// A rate-limit pause is over.
    Resume,
    /// Time to see whether the device still may be connected.
    Rights,
}

/// Runs one connection to its end.
pub(super) async fn run<S>(server: Arc<Server>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, mut write_half) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let handshake = tokio::select! {
        r = tokio::time::timeout(
            server.config.handshake_timeout,
            handshake(&server, &mut reader, &mut write_half, &mut buf, &peer),
        ) => r,
        // A connection still logging in does not hold the node's shutdown.
        () = server.cx.shutdown.cancelled() => return,
    };
    let accepted = match handshake {
        Err(_) => {
            server.metrics.refuse(Refusal::HandshakeTimeout);
            return;
        }
        Ok(Err(end)) => {
            if let End::Server(code, text, class, method) = end {
                let mut out = Vec::new();
                close_frame(&mut out, code, &text, class, method);
                let _ = write_half.write_all(&out).await;
                // Give the client its chance to answer close-ok, then go.
                let drain = drain_until_close_ok(&mut reader, &mut buf, HANDSHAKE_FRAME_MAX);
                let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
            }
            let _ = write_half.shutdown().await;
            return;
        }
        Ok(Ok(a)) => a,
    };
    server.metrics.logins.fetch_add(1, Relaxed);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            match tokio::time::timeout(WRITE_STALL, write_half.write_all(&b)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let _ = write_half.shutdown().await;
    });
    let mut c = Connection {
        server,
        reader,
        buf,
        out: Vec::with_capacity(4096),
        writer: tx,
        identity: accepted.identity,
        frame_max: accepted.frame_max,
        channel_max: accepted.channel_max,
        heartbeat: accepted.heartbeat,
        blocked_capable: accepted.blocked_capable,
        blocked: false,
        channels: HashMap::new(),
        next_epoch: 1,
        appends: VecDeque::new(),
        paused_until: None,
        batch: Batch::default(),
        buffered: 0,
        held_confirms: 0,
        held_bytes: 0,
        known_topics: HashMap::new(),
    };
    let end = c.serve().await;
    c.finish(end).await;
    // What is still pending after the drain's bound is dropped (the client
    // saw no ack for it), so a stalled disk cannot pile up orphaned appends.
    for h in c.appends.drain(..) {
        h.abort();
    }
    drop(c);
    // The writer ends once it has sent what is queued; one that a peer keeps
    // from finishing is stopped, so it cannot hold the connection's slot.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// `class.method` for messages.
fn method_name(m: &AMQPClass) -> String {
    let class = match m {
        AMQPClass::Basic(_) => "basic",
        AMQPClass::Connection(_) => "connection",
        AMQPClass::Channel(_) => "channel",
        AMQPClass::Access(_) => "access",
        AMQPClass::Exchange(_) => "exchange",
        AMQPClass::Queue(_) => "queue",
        AMQPClass::Tx(_) => "tx",
        AMQPClass::Confirm(_) => "confirm",
    };
    // The Debug form of the method enum starts with its variant name.
    let debug = match m {
        AMQPClass::Basic(x) => format!("{x:?}"),
        AMQPClass::Connection(x) => format!("{x:?}"),
        AMQPClass::Channel(x) => format!("{x:?}"),
        AMQPClass::Access(x) => format!("{x:?}"),
        AMQPClass::Exchange(x) => format!("{x:?}"),
        AMQPClass::Queue(x) => format!("{x:?}"),
        AMQPClass::Tx(x) => format!("{x:?}"),
        AMQPClass::Confirm(x) => format!("{x:?}"),
    };
    let variant: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    // CamelCase → kebab-case, as the specification names methods.
    let mut name = String::new();
    for (i, ch) in variant.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                name.push('-');
            }
            name.push(ch.to_ascii_lowercase());
        } else {
            name.push(ch);
        }
    }
    format!("{class}.{name}")
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    async fn serve(&mut self) -> End {
        let heartbeat = self.heartbeat;
        let mut beat =
            tokio::time::interval(heartbeat.map_or(Duration::from_secs(3600), |h| h / 2));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.reset();
        let silence = heartbeat.map(|h| h * 2);
        let mut deadline = silence.map(|s| Instant::now() + s);
        let mut full_since: Option<Instant> = None;
        let mut rights = tokio::time::interval(Duration::from_secs(1));
        rights.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut auth_generation = self.server.cx.auth.generation();
        if !self.buf.is_empty() {
            if let Err(end) = self.read_frames().await {
                return end;
            }
        }
        loop {
            if let Err(end) = self.flush_out().await {
                return end;
            }
            let paused = self.paused_until.filter(|t| *t > Instant::now());
            let can_read = self.appends.len() < self.server.config.max_pending_appends
                && self.held_confirms < MAX_HELD_CONFIRMS
                && self.held_bytes <= self.server.config.max_content_bytes
                && paused.is_none();
            if can_read {
                full_since = None;
                if self.blocked {
                    self.blocked = false;
                    frame::method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                            connection::Unblocked {},
                        )),
                        &mut self.out,
                    );
                    continue;
                }
            } else {
                full_since.get_or_insert_with(Instant::now);
                // Not reading is our doing: the peer's silence clock waits too.
                deadline = silence.map(|s| Instant::now() + s);
            }
            let block_at = match full_since {
                Some(t) if self.blocked_capable && !self.blocked => Some(t + BLOCK_AFTER),
                _ => None,
            };
            self.buf.reserve(8 * 1024);
            let wake = {
                let has_appends = !self.appends.is_empty();
                let next_append = wait::oldest(&mut self.appends);
                let silent = wait::until(deadline);
                let pause_ends = wait::until(paused);
                let block = wait::until(block_at);
                tokio::select! {
                    () = self.server.cx.shutdown.cancelled() => Wake::Shutdown,
                    r = next_append, if has_appends => Wake::Appended(r),
                    r = self.reader.read_buf(&mut self.buf), if can_read => Wake::Read(r),
                    _ = beat.tick(), if heartbeat.is_some() => Wake::Heartbeat,
                    () = silent => Wake::PeerSilent,
                    () = block => Wake::Block,
                    () = pause_ends => Wake::Resume,
                    _ = rights.tick() => Wake::Rights,
                }
            };
            match wake {
                Wake::Shutdown => {
                    return End::server(
                        code::CONNECTION_FORCED,
                        "CONNECTION_FORCED - server shutting down",
                    )
                }
                Wake::Appended(r) => {
                    self.appends.pop_front();
                    match r {
                        Ok(done) => {
                            self.appended(done);
                            // What gathered while that append waited goes now.
                            self.flush_batch();
                        }
                        Err(_) => {
                            return End::server(
                                code::INTERNAL_ERROR,
                                "INTERNAL_ERROR - append task failed",
                            )
                        }
                    }
                }
                Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return End::Lost,
                Wake::Read(Ok(_)) => {
                    deadline = silence.map(|s| Instant::now() + s);
                    if let Err(end) = self.read_frames().await {
                        return end;
                    }
                }
                Wake::Heartbeat => frame::encode(&AMQPFrame::Heartbeat, &mut self.out),
                Wake::PeerSilent => {
                    self.server.metrics.refuse(Refusal::HeartbeatTimeout);
                    return End::Lost;
                }
                Wake::Resume => self.paused_until = None,
                Wake::Rights => {
                    // The devices changed: a device disabled, removed or given a
                    // new token is let go.
                    let generation = self.server.cx.auth.generation();
                    if generation != auth_generation {
                        auth_generation = generation;
                        if !self.server.cx.auth.still_valid(&self.identity) {
                            return End::server(
                                code::CONNECTION_FORCED,
                                "CONNECTION_FORCED - the device was disabled, removed or given a new token",
                            );
                        }
                    }
                }
                Wake::Block => {
                    self.blocked = true;
                    self.server.metrics.blocked.fetch_add(1, Relaxed);
                    let mut reason = "waiting for the disk".into();
                    if self.paused_until.is_some() {
                        reason = "rate limit".into();
                    } else if self.server.cx.log.health().is_err() {
                        reason = "the log is not writable".into();
                    }
                    frame::method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Blocked(
                            connection::Blocked { reason },
                        )),
                        &mut self.out,
                    );
                }
            }
        }
    }

    /// Ends the connection: at shutdown, confirms what becomes durable first;
    /// then connection.close and a short wait for close-ok.
    async fn finish(&mut self, end: End) {
        // Everything read before the end is stored, as RabbitMQ routes what it
        // received before a close (publishers without confirms count on it),
        // and confirmed where the client can still hear it. Bounded, and the
        // connection keeps its slot meanwhile, so max_connections bounds it.
        self.flush_batch();
        let shutting_down = self.server.cx.shutdown.is_cancelled();
        let close_wait = if shutting_down {
            SHUTDOWN_CLOSE_WAIT
        } else {
            CLOSE_WAIT
        };
        if matches!(end, End::ClientClosed) {
            // Its close-ok first: the client need not wait for our drain.
            let _ = self.flush_out().await;
        }
        if !matches!(end, End::Server(..)) {
            // The client closed (close-ok is out already) or is gone: no confirm may follow.
            let open: Vec<u16> = self.channels.keys().copied().collect();
            for ch in open {
                self.release(ch);
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.closing = true;
                }
            }
        }
        let drain = async {
            // Popped only once finished: what the bound cuts off stays in
            // `appends` and is aborted by the caller, not detached.
            while let Some(h) = self.appends.front_mut() {
                let done = h.await;
                self.appends.pop_front();
                if let Ok(done) = done {
                    self.appended(done);
                }
            }
        };
        let bound = if shutting_down { SHUTDOWN_DRAIN } else { DRAIN };
        let _ = tokio::time::timeout(bound, drain).await;
        if let End::Server(code, text, class, method) = end {
            if code != code::SUCCESS {
                tracing::debug!(code, %text, "closing an AMQP connection");
            }
            close_frame(&mut self.out, code, &text, class, method);
            if self.flush_out().await.is_ok() {
                let drain = drain_until_close_ok(&mut self.reader, &mut self.buf, self.frame_max);
                let _ = tokio::time::timeout(close_wait, drain).await;
            }
        } else {
            let _ = self.flush_out().await;
            if matches!(end, End::ClientClosed) {
                // The client closes the socket after our close-ok (RabbitMQ
                // waits for that too); closing first makes clients report a
                // broken connection.
                let mut sink = [0u8; 512];
                let until_eof =
                    async { while matches!(self.reader.read(&mut sink).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(close_wait, until_eof).await;
            }
        }
    }

    async fn flush_out(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(&mut self.out, Vec::with_capacity(4096));
        match tokio::time::timeout(WRITE_STALL, self.writer.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Lost),
        }
    }

    async fn read_frames(&mut self) -> Result<(), End> {
        loop {
            match frame::next_frame(&mut self.buf, self.frame_max) {
                Ok(Some(f)) => self.frame(f).await?,
                Ok(None) => break,
                Err(e) => {
                    self.server.metrics.refuse(Refusal::of_frame(&e));
                    return Err(e.into());
                }
            }
            if self.out.len() >= OUT_HIGH_WATER {
                self.flush_batch();
                self.flush_out().await?;
            }
        }
        self.flush_batch_unless_busy();
        Ok(())
    }

    async fn frame(&mut self, f: AMQPFrame) -> Result<(), End> {
        match f {
            AMQPFrame::Heartbeat => Ok(()),
            AMQPFrame::InvalidHeartbeat(ch) => {
                self.server.metrics.refuse(Refusal::MalformedFrame);
                Err(End::server(
                    code::FRAME_ERROR,
                    format!("FRAME_ERROR - heartbeat on channel {ch}"),
                ))
            }
            AMQPFrame::ProtocolHeader(_) => {
                self.server.metrics.refuse(Refusal::UnexpectedFrame);
                Err(End::server(
                    code::UNEXPECTED_FRAME,
                    "UNEXPECTED_FRAME - protocol header after the handshake",
                ))
            }
            AMQPFrame::Method(0, m) => self.connection_method(m),
            AMQPFrame::Method(ch, m) => self.channel_method(ch, m).await,
            AMQPFrame::Header(ch, h) => self.content_header(ch, h),
            AMQPFrame::Body(ch, data) => self.content_body(ch, data),
        }
    }

    fn connection_method(&mut self, m: AMQPClass) -> Result<(), End> {
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                frame::method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                    &mut self.out,
                );
                Err(End::ClientClosed)
            }
            // Nothing of ours to acknowledge; a stray close-ok is harmless.
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => Err(End::Lost),
            AMQPClass::Connection(
                connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_),
            ) => Ok(()),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                Err(self.not_implemented(&m))
            }
            other => {
                self.server.metrics.refuse(Refusal::CommandInvalid);
                Err(End::for_method(
                    code::COMMAND_INVALID,
                    format!(
                        "COMMAND_INVALID - {} is not valid on channel 0 here",
                        method_name(&other)
                    ),
                    &other,
                ))
            }
        }
    }

    fn not_implemented(&self, m: &AMQPClass) -> End {
        self.server.metrics.refuse(Refusal::NotImplemented);
        End::for_method(
            code::NOT_IMPLEMENTED,
            format!(
                "NOT_IMPLEMENTED - {} is not implemented: Tributary accepts publishes over AMQP; read events over HTTP, WebSockets or MQTT",
                method_name(m)
            ),
            m,
        )
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::protocol::{basic, queue};

    use super::*;

    #[test]
    fn method_names_follow_the_specification() {
        let m = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume::default()));
        assert_eq!(method_name(&m), "basic.consume");
        let m = AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk::default()));
        assert_eq!(method_name(&m), "queue.declare-ok");
    }
}
