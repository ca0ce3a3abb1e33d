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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, ProtocolVersion};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{
    access, basic, channel, confirm, connection, exchange, queue, AMQPClass,
};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tributary_storage::{AppendRecord, Error as LogError};

use super::frame::{self, code, short, FrameError};
use super::{mapping, Server};
use crate::auth::{self, Action, Credentials, Identity, Refusal};
use crate::ingest::{self, Rejection};
use crate::Peer;

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
/// Frames are at most this big before tune-ok (the specification's
/// FRAME_MIN_SIZE, which every client stays within until tune).
const HANDSHAKE_FRAME_MAX: usize = 4096;
/// Resolved confirms one connection may hold back behind an earlier, slower
/// tag before it stops reading.
const MAX_HELD_CONFIRMS: usize = 65_536;
/// A batch gathered behind a waiting append goes at this size anyway.
const GATHER_BYTES: usize = 256 * 1024;
const GATHER_COUNT: usize = 4096;
/// Topics whose limits one connection remembers.
const KNOWN_TOPICS: usize = 1024;
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

impl From<FrameError> for End {
    fn from(e: FrameError) -> End {
        let (code, text) = e.reply();
        match e {
            FrameError::UnknownMethod { class, method } | FrameError::Syntax { class, method } => {
                End::Server(code, text, class, method)
            }
            _ => End::server(code, text),
        }
    }
}

/// A publish whose header or body frames are still arriving.
struct Content {
    publish: basic::Publish,
    /// Announced body size and properties, once the header frame came.
    header: Option<(u64, AMQPProperties)>,
    body: Vec<u8>,
    received: u64,
    /// Bytes of `max_content_bytes` this message holds (its announced size).
    reserved: u64,
    /// Set when the message is refused already; its body is read and dropped.
    refused: Option<String>,
    /// Its announced size, held from the node's memory budget until it is done.
    _budget: Option<crate::budget::Reserved>,
}

/// A confirm's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ack,
    Nack,
    /// basic.return (method, header and body frames, encoded), then an ack of
    /// this tag alone: clients pair a return with the next confirm they see.
    Returned(Vec<u8>),
}

struct Channel {
    /// Distinguishes reopenings of one channel number, so late append results
    /// for a closed channel are dropped.
    epoch: u64,
    /// We sent channel.close and wait for close-ok.
    closing: bool,
    confirm: bool,
    /// Delivery tag of the next publish (confirm mode).
    next_tag: u64,
    /// Every tag up to this one has been confirmed to the client.
    confirmed_through: u64,
    /// Resolved tags not yet sent (an earlier tag is still waiting).
    resolved: BTreeMap<u64, Outcome>,
    content: Option<Content>,
}

impl Channel {
    fn new(epoch: u64) -> Self {
        Channel {
            epoch,
            closing: false,
            confirm: false,
            next_tag: 1,
            confirmed_through: 0,
            resolved: BTreeMap::new(),
            content: None,
        }
    }
}

/// Where an appended message came from.
#[derive(Debug, Clone, Copy)]
struct Origin {
    channel: u16,
    epoch: u64,
    tag: Option<u64>,
}

/// Publishes completed by one socket read.
#[derive(Default)]
struct Batch {
    records: ingest::Batch<Origin>,
    bytes: usize,
}

/// The outcome of one append batch.
struct Appended {
    results: Vec<(Origin, Option<ingest::Refused>)>,
    started: Instant,
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
            server.metrics.reject("handshake_timeout");
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

/// What the handshake settled.
struct Accepted {
    identity: Identity,
    frame_max: usize,
    channel_max: u16,
    heartbeat: Option<Duration>,
    blocked_capable: bool,
}

async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    frame_max: usize,
) -> Result<AMQPFrame, End> {
    loop {
        if let Some(f) = frame::next_frame(buf, frame_max)? {
            return Ok(f);
        }
        buf.reserve(4096);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(End::Lost),
            Ok(_) => {}
        }
    }
}

async fn drain_until_close_ok<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    frame_max: usize,
) {
    loop {
        match read_frame(reader, buf, frame_max).await {
            Ok(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))))
            | Ok(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))))
            | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn close_frame(out: &mut Vec<u8>, code: u16, text: &str, class: u16, method: u16) {
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: code,
            reply_text: short(text),
            class_id: class,
            method_id: method,
        })),
        out,
    );
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "authentication_failure_close",
        "connection.blocked",
    ] {
        caps.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("product".into(), AMQPValue::LongString("Tributary".into()));
    props.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    props.insert("platform".into(), AMQPValue::LongString("Rust".into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}

/// Checks the protocol header, then start/start-ok, tune/tune-ok and open.
async fn handshake<R, W>(
    server: &Server,
    reader: &mut R,
    writer: &mut W,
    buf: &mut BytesMut,
    peer: &Peer,
) -> Result<Accepted, End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while buf.len() < 8 {
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(End::Lost),
            Ok(_) => {}
        }
    }
    if buf[..8] != *b"AMQP\x00\x00\x09\x01" {
        // The specification's answer to a header we do not speak: ours, then close.
        server.metrics.reject("bad_protocol_header");
        let mut out = Vec::new();
        frame::encode(
            &AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
            &mut out,
        );
        let _ = writer.write_all(&out).await;
        return Err(End::Lost);
    }
    let _ = buf.split_to(8);
    let config = &server.config;
    let mut out = Vec::new();
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            // EXTERNAL (the client certificate names the device) only where
            // TLS verified one.
            mechanisms: if peer.certificate.is_some() {
                "EXTERNAL PLAIN AMQPLAIN".into()
            } else {
                "PLAIN AMQPLAIN".into()
            },
            locales: "en_US".into(),
        })),
        &mut out,
    );
    writer.write_all(&out).await.map_err(|_| End::Lost)?;

    let start_ok = match read_frame(reader, buf, HANDSHAKE_FRAME_MAX).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(s))) => s,
        other => {
            server.metrics.reject("handshake_out_of_order");
            return Err(unexpected_in_handshake(&other, "connection.start-ok"));
        }
    };
    let mechanism = start_ok.mechanism.as_str();
    if mechanism == "EXTERNAL" && peer.certificate.is_none() {
        server.metrics.reject("bad_auth_mechanism");
        let why = "ACCESS_REFUSED - EXTERNAL needs a verified client certificate (AMQPS with mTLS)";
        return Err(End::Server(code::ACCESS_REFUSED, why.to_owned(), 10, 11));
    }
    let (user, pass) = match credentials(mechanism, start_ok.response.as_bytes()) {
        Ok(c) => c,
        Err(why) => {
            server.metrics.reject("bad_auth_mechanism");
            return Err(End::Server(code::ACCESS_REFUSED, why, 10, 11));
        }
    };
    let creds = Credentials {
        protocol: "amqp",
        username: Some(&user),
        password: Some(&pass),
        client_id: None,
        peer: peer.addr,
        certificate: peer.certificate.as_deref(),
    };
    let identity = match auth::login(&*server.cx.auth, &creds).await {
        Ok(id) => id,
        Err(refusal) => {
            server.metrics.reject("bad_credentials");
            let why = match refusal {
                Refusal::BadCredentials => {
                    "ACCESS_REFUSED - login refused: bad user name or password"
                }
                Refusal::NotAuthorized => "ACCESS_REFUSED - login refused: not authorized",
            };
            return Err(End::Server(code::ACCESS_REFUSED, why.to_owned(), 10, 11));
        }
    };
    let blocked_capable = match start_ok.client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => matches!(
            caps.inner().get("connection.blocked"),
            Some(AMQPValue::Boolean(true))
        ),
        _ => false,
    };

    out.clear();
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: config.max_channels,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat_secs,
        })),
        &mut out,
    );
    writer.write_all(&out).await.map_err(|_| End::Lost)?;
    let tune_ok = match read_frame(reader, buf, HANDSHAKE_FRAME_MAX).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => t,
        other => {
            server.metrics.reject("handshake_out_of_order");
            return Err(unexpected_in_handshake(&other, "connection.tune-ok"));
        }
    };
    if tune_ok.frame_max != 0 && tune_ok.frame_max < 4096 {
        server.metrics.reject("frame_max_too_small");
        return Err(End::Server(
            530,
            format!(
                "frame_max {} is below the minimum of 4096",
                tune_ok.frame_max
            ),
            10,
            31,
        ));
    }
    let frame_max = match tune_ok.frame_max {
        0 => config.frame_max,
        f => f.min(config.frame_max),
    } as usize;
    let channel_max = match tune_ok.channel_max {
        0 => config.max_channels,
        c => c.min(config.max_channels),
    };
    let heartbeat =
        (tune_ok.heartbeat > 0).then(|| Duration::from_secs(u64::from(tune_ok.heartbeat)));

    match read_frame(reader, buf, frame_max).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(_))) => {}
        other => {
            server.metrics.reject("handshake_out_of_order");
            return Err(unexpected_in_handshake(&other, "connection.open"));
        }
    }
    out.clear();
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        &mut out,
    );
    writer.write_all(&out).await.map_err(|_| End::Lost)?;
    Ok(Accepted {
        identity,
        frame_max,
        channel_max,
        heartbeat,
        blocked_capable,
    })
}

fn unexpected_in_handshake(f: &AMQPFrame, wanted: &str) -> End {
    match f {
        // A client that gives up answers close: nothing more to say.
        AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => End::Lost,
        AMQPFrame::Method(_, m) => End::for_method(
            code::COMMAND_INVALID,
            format!("expected {wanted}, got {}", method_name(m)),
            m,
        ),
        _ => End::server(code::UNEXPECTED_FRAME, format!("expected {wanted}")),
    }
}

/// User and password from a PLAIN or AMQPLAIN response.
fn credentials(mechanism: &str, response: &[u8]) -> Result<(String, String), String> {
    match mechanism {
        "PLAIN" => {
            // [authzid] NUL authcid NUL passwd (RFC 4616).
            let mut parts = response.split(|b| *b == 0);
            let (Some(_), Some(user), Some(pass), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("ACCESS_REFUSED - malformed PLAIN response".to_owned());
            };
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(pass).into_owned(),
            ))
        }
        "AMQPLAIN" => {
            // A field table without its length prefix: LOGIN and PASSWORD.
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            if !frame::nesting_ok(&framed, 0) {
                return Err("ACCESS_REFUSED - malformed AMQPLAIN response".to_owned());
            }
            let table = amq_protocol::types::parsing::parse_field_table(&framed[..])
                .map(|(_, t)| t)
                .map_err(|_| "ACCESS_REFUSED - malformed AMQPLAIN response".to_owned())?;
            let field = |name: &str| match table.inner().get(name) {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
                _ => String::new(),
            };
            Ok((field("LOGIN"), field("PASSWORD")))
        }
        // The certificate speaks for the client; a response, if any, is the
        // identity it asks for (it must be the certificate's).
        "EXTERNAL" => Ok((String::from_utf8_lossy(response).into_owned(), String::new())),
        other => Err(format!(
            "ACCESS_REFUSED - mechanism {} is not offered (PLAIN, AMQPLAIN; EXTERNAL with a client certificate)",
            short(other)
        )),
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

/// The ACL subject of a publish: the topic, or `topic/routing-key` for a named exchange.
fn acl_subject(exchange: &str, routing_key: &str) -> String {
    // The MQTT topic the message is delivered as: one subject for every front end.
    let key = (!routing_key.is_empty()).then_some(routing_key.as_bytes());
    crate::mqtt::topic::record_topic(mapping::topic_of(exchange, routing_key), key, None)
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
                let appends = &mut self.appends;
                let has_appends = !appends.is_empty();
                let next_append = async {
                    match appends.front_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                };
                let silent = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let pause_ends = async {
                    match paused {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                };
                let block = async {
                    match block_at {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
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
                    self.server.metrics.reject("heartbeat_timeout");
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
                    self.server.metrics.reject(match e {
                        FrameError::TooLarge { .. } => "frame_too_large",
                        FrameError::UnknownMethod { .. } => "unknown_method",
                        FrameError::Syntax { .. } => "malformed_method",
                        FrameError::Malformed(_) => "malformed_frame",
                        FrameError::TooDeep { .. } => "nesting_too_deep",
                    });
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
                self.server.metrics.reject("malformed_frame");
                Err(End::server(
                    code::FRAME_ERROR,
                    format!("FRAME_ERROR - heartbeat on channel {ch}"),
                ))
            }
            AMQPFrame::ProtocolHeader(_) => {
                self.server.metrics.reject("unexpected_frame");
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
                self.server.metrics.reject("command_invalid");
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
        self.server.metrics.reject("not_implemented");
        End::for_method(
            code::NOT_IMPLEMENTED,
            format!(
                "NOT_IMPLEMENTED - {} is not implemented: Tributary accepts publishes over AMQP; read events over HTTP, WebSockets or MQTT",
                method_name(m)
            ),
            m,
        )
    }

    /// Sends channel.close and drops the channel's state until close-ok.
    fn close_channel(&mut self, ch: u16, code: u16, text: String, m: Option<&AMQPClass>) {
        if let Some(c) = self.channels.get_mut(&ch) {
            c.closing = true;
            self.release(ch);
        }
        frame::method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: short(&text),
                class_id: m.map_or(0, AMQPClass::get_amqp_class_id),
                method_id: m.map_or(0, AMQPClass::get_amqp_method_id),
            })),
            &mut self.out,
        );
    }

    /// Gives back what a channel holds: its unfinished message's reservation
    /// and its held confirms (they will never be sent).
    fn release(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        if let Some(content) = c.content.take() {
            self.buffered = self.buffered.saturating_sub(content.reserved);
        }
        for (_, outcome) in std::mem::take(&mut c.resolved) {
            self.held_confirms = self.held_confirms.saturating_sub(1);
            if let Outcome::Returned(frames) = outcome {
                self.held_bytes = self.held_bytes.saturating_sub(frames.len() as u64);
            }
        }
    }

    /// Forgets a closed channel.
    fn drop_channel(&mut self, ch: u16) {
        self.release(ch);
        self.channels.remove(&ch);
    }

    fn reply(&mut self, ch: u16, m: AMQPClass) {
        frame::method(ch, m, &mut self.out);
    }

    async fn channel_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), End> {
        if ch > self.channel_max {
            self.server.metrics.reject("channel_error");
            return Err(End::for_method(
                code::CHANNEL_ERROR,
                format!(
                    "CHANNEL_ERROR - channel {ch} exceeds channel_max {}",
                    self.channel_max
                ),
                &m,
            ));
        }
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = m {
            if self.channels.contains_key(&ch) {
                self.server.metrics.reject("channel_error");
                return Err(End::for_method(
                    code::CHANNEL_ERROR,
                    format!("CHANNEL_ERROR - channel {ch} is open already"),
                    &m,
                ));
            }
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            self.channels.insert(ch, Channel::new(epoch));
            self.reply(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(());
        }
        let Some(state) = self.channels.get(&ch) else {
            self.server.metrics.reject("channel_error");
            return Err(End::for_method(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - channel {ch} is not open"),
                &m,
            ));
        };
        if state.closing {
            // After our channel.close only close-ok (or a crossing close) counts.
            match m {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.drop_channel(ch);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.drop_channel(ch);
                    self.reply(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                }
                _ => {}
            }
            return Ok(());
        }
        if state.content.is_some() {
            self.server.metrics.reject("unexpected_frame");
            return Err(End::for_method(
                code::UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - {} on channel {ch} while a message's content was expected",
                    method_name(&m)
                ),
                &m,
            ));
        }
        match m {
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                if p.immediate {
                    // RabbitMQ's answer too: nothing here consumes, so nothing
                    // could ever take a message immediately.
                    self.server.metrics.reject("not_implemented");
                    return Err(End::for_method(
                        code::NOT_IMPLEMENTED,
                        "NOT_IMPLEMENTED - immediate=true is not supported",
                        &AMQPClass::Basic(basic::AMQPMethod::Publish(p)),
                    ));
                }
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.content = Some(Content {
                        publish: p,
                        header: None,
                        body: Vec::new(),
                        received: 0,
                        reserved: 0,
                        refused: None,
                        _budget: None,
                    });
                }
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.drop_channel(ch);
                self.reply(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))
            | AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                // We send no deliveries, so there is nothing to pause.
                self.reply(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: f.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.confirm = true;
                }
                if !s.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(_)) => Ok(()),
            AMQPClass::Basic(
                basic::AMQPMethod::Ack(basic::Ack { delivery_tag, .. })
                | basic::AMQPMethod::Nack(basic::Nack { delivery_tag, .. })
                | basic::AMQPMethod::Reject(basic::Reject { delivery_tag, .. }),
            ) => {
                // We deliver nothing, so no tag is ours to settle.
                self.server.metrics.reject("unknown_delivery_tag");
                self.close_channel(
                    ch,
                    code::PRECONDITION_FAILED,
                    format!("PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"),
                    Some(&m),
                );
                Ok(())
            }
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(ref d)) => {
                let d = d.clone();
                self.declare_exchange(ch, d, &m).await;
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                // Queues hold nothing here (the exchange is the topic); declaring
                // one is accepted so publishers written for RabbitMQ run unchanged.
                let name = if d.queue.as_str().is_empty() {
                    format!(
                        "amq.gen-{:016x}{:08x}",
                        fastrand::u64(..),
                        fastrand::u32(..)
                    )
                } else {
                    d.queue.as_str().to_owned()
                };
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: short(&name),
                            message_count: 0,
                            consumer_count: 0,
                        })),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => {
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(p)) => {
                if !p.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: 0,
                        })),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => {
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: 0,
                        })),
                    );
                }
                Ok(())
            }
            // Consuming, transactions, and changing exchanges (topics hold data;
            // deleting one is not a protocol side effect here).
            AMQPClass::Basic(
                basic::AMQPMethod::Consume(_)
                | basic::AMQPMethod::Get(_)
                | basic::AMQPMethod::Cancel(_),
            )
            | AMQPClass::Tx(_)
            | AMQPClass::Exchange(
                exchange::AMQPMethod::Delete(_)
                | exchange::AMQPMethod::Bind(_)
                | exchange::AMQPMethod::Unbind(_),
            ) => Err(self.not_implemented(&m)),
            other => {
                // Methods only a server sends (deliver, return, *-ok, ...).
                self.server.metrics.reject("command_invalid");
                Err(End::for_method(
                    code::COMMAND_INVALID,
                    format!(
                        "COMMAND_INVALID - {} is not a client method",
                        method_name(&other)
                    ),
                    &other,
                ))
            }
        }
    }

    /// exchange.declare: the exchange is a topic. Passive checks that it exists;
    /// otherwise the topic is created (with the log's defaults) if missing.
    async fn declare_exchange(&mut self, ch: u16, d: exchange::Declare, m: &AMQPClass) {
        let name = d.exchange.as_str().to_owned();
        let ok = |c: &mut Self| {
            if !d.nowait {
                c.reply(
                    ch,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                );
            }
        };
        if name.is_empty() {
            ok(self);
            return;
        }
        if !self
            .server
            .cx
            .auth
            .authorize(&self.identity, Action::Publish, &name)
        {
            self.server.metrics.reject("not_authorized");
            self.close_channel(
                ch,
                code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - declaring '{name}' is not authorized for {}",
                    self.identity.id
                ),
                Some(m),
            );
            return;
        }
        let log = &self.server.cx.log;
        if d.passive {
            if log.topic(&name).is_ok() {
                ok(self);
            } else {
                self.close_channel(
                    ch,
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no topic '{name}'"),
                    Some(m),
                );
            }
            return;
        }
        if let Err(why) = tributary_storage::topic::validate_name(&name) {
            self.close_channel(
                ch,
                code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - exchange '{name}' cannot be a topic: {why}"),
                Some(m),
            );
            return;
        }
        if log.topic(&name).is_ok() {
            ok(self);
            return;
        }
        // Creating a topic waits for the disk. It happens once per topic, so the
        // connection waits with it: publishes that follow find the topic.
        let config = log.config().topic_defaults.config(&name);
        // Bounded, so a stalled disk cannot hold the connection past its heartbeats.
        let created = tokio::time::timeout(Duration::from_secs(10), log.create_topic(config)).await;
        let created = created.unwrap_or_else(|_| {
            Err(LogError::Io(std::io::Error::other(
                "creating the topic took over 10 s",
            )))
        });
        match created {
            Ok(_) | Err(LogError::TopicExists(_)) => ok(self),
            Err(e) => {
                self.server.metrics.reject("log_unwritable");
                self.close_channel(
                    ch,
                    code::INTERNAL_ERROR,
                    format!("INTERNAL_ERROR - {e}"),
                    Some(m),
                );
            }
        }
    }

    fn content_header(&mut self, ch: u16, h: AMQPContentHeader) -> Result<(), End> {
        let Some(c) = self.channels.get_mut(&ch) else {
            self.server.metrics.reject("channel_error");
            return Err(End::server(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - channel {ch} is not open"),
            ));
        };
        if c.closing {
            return Ok(());
        }
        let confirm = c.confirm;
        let Some(content) = c.content.as_mut().filter(|c| c.header.is_none()) else {
            self.server.metrics.reject("unexpected_frame");
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - content header on channel {ch} without basic.publish"),
            ));
        };
        if h.class_id != 60 {
            self.server.metrics.reject("unexpected_frame");
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - content header of class {} for basic.publish",
                    h.class_id
                ),
            ));
        }
        let max = self.server.config.max_message_bytes;
        if h.body_size > max {
            self.server.metrics.reject("message_too_large");
            let why = format!(
                "PRECONDITION_FAILED - message of {} bytes exceeds max_message_bytes {max}",
                h.body_size
            );
            if !confirm {
                self.close_channel(ch, code::PRECONDITION_FAILED, why, None);
                return Ok(());
            }
            content.refused = Some(why);
        } else {
            // The node-wide budget (all connections, all protocols) first: the
            // newest message is refused when it is spent.
            let Some(held) = self.server.cx.budget.try_reserve(h.body_size as usize) else {
                self.server.metrics.reject("memory_budget");
                let why = format!(
                    "RESOURCE_ERROR - the node holds limits.max_buffered_bytes ({}) of unfinished messages",
                    self.server.cx.budget.total()
                );
                if !confirm {
                    self.close_channel(ch, code::RESOURCE_ERROR, why, None);
                    return Ok(());
                }
                content.refused = Some(why);
                content.header = Some((h.body_size, h.properties));
                if h.body_size == 0 {
                    self.complete(ch);
                }
                return Ok(());
            };
            content._budget = Some(held);
            if self.buffered + h.body_size > self.server.config.max_content_bytes {
                self.server.metrics.reject("content_buffer_full");
                return Err(End::server(
                    code::RESOURCE_ERROR,
                    format!(
                        "RESOURCE_ERROR - more than {} bytes of unfinished messages on one connection",
                        self.server.config.max_content_bytes
                    ),
                ));
            }
            // Reserved now, filled as body frames come: memory follows what
            // arrived, the budget what was announced.
            content.reserved = h.body_size;
            self.buffered += h.body_size;
            content.body = Vec::with_capacity((h.body_size as usize).min(self.frame_max));
        }
        content.header = Some((h.body_size, h.properties));
        if h.body_size == 0 {
            self.complete(ch);
        }
        Ok(())
    }

    fn content_body(&mut self, ch: u16, data: Vec<u8>) -> Result<(), End> {
        let Some(c) = self.channels.get_mut(&ch) else {
            self.server.metrics.reject("channel_error");
            return Err(End::server(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - channel {ch} is not open"),
            ));
        };
        if c.closing {
            return Ok(());
        }
        let Some(content) = c.content.as_mut().filter(|c| c.header.is_some()) else {
            self.server.metrics.reject("unexpected_frame");
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - content body on channel {ch} without a content header"),
            ));
        };
        let size = content.header.as_ref().map_or(0, |(s, _)| *s);
        content.received += data.len() as u64;
        if content.received > size {
            self.server.metrics.reject("unexpected_frame");
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - body frames on channel {ch} exceed the announced {size} bytes"),
            ));
        }
        if content.refused.is_none() {
            content.body.extend_from_slice(&data);
        }
        if content.received == size {
            self.complete(ch);
        }
        Ok(())
    }

    /// A whole message arrived on `ch`: route it, or refuse it now.
    fn complete(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        let Some(content) = c.content.take() else {
            return;
        };
        self.buffered = self.buffered.saturating_sub(content.reserved);
        let tag = c.confirm.then(|| {
            let t = c.next_tag;
            c.next_tag += 1;
            t
        });
        let origin = Origin {
            channel: ch,
            epoch: c.epoch,
            tag,
        };
        self.server.metrics.publishes.fetch_add(1, Relaxed);
        let Content {
            publish,
            header,
            body,
            refused,
            ..
        } = content;
        let props = header.map(|(_, p)| p).unwrap_or_default();
        if let Some(why) = refused {
            tracing::debug!(%why, "an AMQP publish was refused");
            self.resolve(origin, Outcome::Nack);
            return;
        }
        let exchange = publish.exchange.as_str();
        let routing_key = publish.routing_key.as_str();
        let topic = mapping::topic_of(exchange, routing_key);
        // For error replies only (they name the method).
        let publish_method = || AMQPClass::Basic(basic::AMQPMethod::Publish(publish.clone()));
        let subject = acl_subject(exchange, routing_key);
        if !self
            .server
            .cx
            .auth
            .authorize(&self.identity, Action::Publish, &subject)
        {
            self.server.metrics.reject("not_authorized");
            self.close_channel(
                ch,
                code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - publishing to '{subject}' is not authorized for {}",
                    self.identity.id
                ),
                Some(&publish_method()),
            );
            return;
        }
        let log = &self.server.cx.log;
        let existing = match self.known_topics.get(topic) {
            Some(&max) => Some(max),
            None => {
                let found = log.topic(topic).ok().map(|t| t.config.max_event_bytes);
                if let Some(max) = found {
                    if self.known_topics.len() >= KNOWN_TOPICS {
                        self.known_topics.clear();
                    }
                    self.known_topics.insert(topic.to_owned(), max);
                }
                found
            }
        };
        let routable = existing.is_some()
            || (log.config().auto_create_topics
                && tributary_storage::topic::validate_name(topic).is_ok());
        if !routable {
            self.server.metrics.reject("no_route");
            if publish.mandatory {
                self.server.metrics.returns.fetch_add(1, Relaxed);
                let mut frames = Vec::new();
                frame::method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: code::NO_ROUTE,
                        reply_text: short(&format!("NO_ROUTE - no topic '{topic}'")),
                        exchange: publish.exchange.clone(),
                        routing_key: publish.routing_key.clone(),
                    })),
                    &mut frames,
                );
                frame::content(ch, props, &body, self.frame_max, &mut frames);
                if tag.is_some() {
                    self.resolve(origin, Outcome::Returned(frames));
                } else {
                    self.out.extend_from_slice(&frames);
                }
            } else if tag.is_some() {
                self.resolve(origin, Outcome::Nack);
            } else {
                self.close_channel(
                    ch,
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no topic '{topic}', and this node does not create topics on publish"),
                    Some(&publish_method()),
                );
            }
            return;
        }
        let event = mapping::event_from(routing_key, &props, body);
        let max_event = existing.unwrap_or(log.config().topic_defaults.max_event_bytes);
        if event.size() > max_event {
            self.server.metrics.reject("message_too_large");
            if tag.is_some() {
                self.resolve(origin, Outcome::Nack);
            } else {
                self.close_channel(
                    ch,
                    code::PRECONDITION_FAILED,
                    format!(
                        "PRECONDITION_FAILED - event of {} bytes exceeds the topic's max_event_bytes {max_event}",
                        event.size()
                    ),
                    Some(&publish_method()),
                );
            }
            return;
        }
        let size = event.size();
        self.batch
            .records
            .push(topic, origin, AppendRecord::from(event));
        self.batch.bytes += size;
    }

    /// Hands the gathered publishes to the log unless an append of this
    /// connection is already waiting for the disk and the batch is small: then
    /// it keeps gathering and goes when that append completes. Pipelining
    /// clients send a few messages per read; this makes one append (not one
    /// per read) per commit cycle, which is what costs CPU.
    fn flush_batch_unless_busy(&mut self) {
        if self.appends.is_empty()
            || self.batch.bytes >= GATHER_BYTES
            || self.batch.records.len() >= GATHER_COUNT
        {
            self.flush_batch();
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.records.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        // A device over its rate limit: this batch goes on, reading pauses
        // until the limit has caught up (TCP pushes back on the client).
        let wait = self.server.cx.auth.pace(
            &self.identity,
            u32::try_from(batch.records.len()).unwrap_or(u32::MAX),
        );
        if !wait.is_zero() {
            self.paused_until = Some(Instant::now() + wait);
        }
        let server = self.server.clone();
        self.appends
            .push_back(tokio::spawn(append_batch(server, batch)));
    }

    fn appended(&mut self, done: Appended) {
        let (mut acks, mut nacks) = (0, 0);
        let mut touched = Vec::new();
        for (origin, error) in done.results {
            let current = self
                .channels
                .get(&origin.channel)
                .is_some_and(|c| c.epoch == origin.epoch && !c.closing);
            if !current {
                // The channel closed meanwhile: its confirms went with it.
                continue;
            }
            match (origin.tag, error) {
                (None, None) => {}
                (None, Some(e)) => {
                    // No confirms to carry the refusal: close the channel, as
                    // RabbitMQ does when it cannot take a message.
                    self.close_channel(
                        origin.channel,
                        code::INTERNAL_ERROR,
                        format!("INTERNAL_ERROR - a message was not stored: {e}"),
                        None,
                    );
                }
                (Some(tag), error) => {
                    let outcome = if error.is_none() {
                        acks += 1;
                        Outcome::Ack
                    } else {
                        nacks += 1;
                        Outcome::Nack
                    };
                    self.hold(origin.channel, tag, outcome);
                    touched.push(origin.channel);
                }
            }
        }
        if acks > 0 {
            self.server.metrics.confirmed(done.started.elapsed(), acks);
        }
        self.server.metrics.acks.fetch_add(acks, Relaxed);
        self.server.metrics.nacks.fetch_add(nacks, Relaxed);
        touched.sort_unstable();
        touched.dedup();
        for ch in touched {
            self.send_confirms(ch);
        }
    }

    fn resolve(&mut self, origin: Origin, outcome: Outcome) {
        let Some(tag) = origin.tag else {
            return;
        };
        let counter = match outcome {
            Outcome::Ack | Outcome::Returned(_) => &self.server.metrics.acks,
            Outcome::Nack => &self.server.metrics.nacks,
        };
        counter.fetch_add(1, Relaxed);
        self.hold(origin.channel, tag, outcome);
        self.send_confirms(origin.channel);
    }

    /// Keeps a resolved confirm until every earlier tag of its channel is sent.
    fn hold(&mut self, ch: u16, tag: u64, outcome: Outcome) {
        if let Some(c) = self.channels.get_mut(&ch) {
            if let Outcome::Returned(frames) = &outcome {
                self.held_bytes += frames.len() as u64;
            }
            match c.resolved.insert(tag, outcome) {
                None => self.held_confirms += 1,
                Some(Outcome::Returned(old)) => {
                    self.held_bytes = self.held_bytes.saturating_sub(old.len() as u64)
                }
                Some(_) => {}
            }
        }
    }

    /// Confirms the resolved tags that follow the last confirmed one: runs of
    /// acks as one `multiple` ack, nacks one by one.
    fn send_confirms(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        let mut run: Option<(u64, u64)> = None; // (first, last) of a run of acks
        let mut out = Vec::new();
        while let Some(entry) = c.resolved.first_entry() {
            if *entry.key() != c.confirmed_through + 1 {
                break;
            }
            let (tag, outcome) = entry.remove_entry();
            c.confirmed_through = tag;
            self.held_confirms = self.held_confirms.saturating_sub(1);
            if let Outcome::Returned(frames) = &outcome {
                self.held_bytes = self.held_bytes.saturating_sub(frames.len() as u64);
            }
            if outcome == Outcome::Ack {
                run = Some(run.map_or((tag, tag), |(first, _)| (first, tag)));
                continue;
            }
            if let Some((first, last)) = run.take() {
                frame::method(ch, ack(first, last), &mut out);
            }
            match outcome {
                Outcome::Returned(frames) => {
                    out.extend_from_slice(&frames);
                    frame::method(ch, ack(tag, tag), &mut out);
                }
                _ => frame::method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: tag,
                        multiple: false,
                        requeue: false,
                    })),
                    &mut out,
                ),
            }
        }
        if let Some((first, last)) = run {
            frame::method(ch, ack(first, last), &mut out);
        }
        self.out.extend_from_slice(&out);
    }
}

fn ack(first: u64, last: u64) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: last,
        multiple: last > first,
    }))
}

async fn append_batch(server: Arc<Server>, batch: Batch) -> Appended {
    let started = Instant::now();
    let outcomes = ingest::append(&server.cx.log, batch.records).await;
    let results = outcomes
        .into_iter()
        .map(|(origin, outcome)| {
            let error = outcome.err();
            if let Some(refused) = &error {
                server.metrics.reject(match refused.rejection {
                    Rejection::UnknownTopic => "no_route",
                    Rejection::TooLarge => "message_too_large",
                    other => other.label(),
                });
            }
            (origin, error)
        })
        .collect();
    Appended { results, started }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain_credentials() {
        assert_eq!(
            credentials("PLAIN", b"\0guest\0secret"),
            Ok(("guest".into(), "secret".into()))
        );
        assert_eq!(
            credentials("PLAIN", b"admin\0dev-1\0tok"),
            Ok(("dev-1".into(), "tok".into()))
        );
        assert!(credentials("PLAIN", b"guest").is_err());
        assert!(credentials("PLAIN", b"\0a\0b\0c").is_err());
        // LOGIN "u" (long string), PASSWORD "p".
        let mut t = Vec::new();
        for (k, v) in [("LOGIN", "u"), ("PASSWORD", "p")] {
            t.push(k.len() as u8);
            t.extend_from_slice(k.as_bytes());
            t.push(b'S');
            t.extend_from_slice(&(v.len() as u32).to_be_bytes());
            t.extend_from_slice(v.as_bytes());
        }
        assert_eq!(credentials("AMQPLAIN", &t), Ok(("u".into(), "p".into())));
        assert!(credentials("AMQPLAIN", b"\x05LOG").is_err());
        // EXTERNAL parses (the handshake refuses it without a certificate).
        assert_eq!(
            credentials("EXTERNAL", b""),
            Ok((String::new(), String::new()))
        );
        assert!(credentials("CRAM-MD5", b"x").is_err());
    }

    #[test]
    fn method_names_follow_the_specification() {
        let m = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume::default()));
        assert_eq!(method_name(&m), "basic.consume");
        let m = AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk::default()));
        assert_eq!(method_name(&m), "queue.declare-ok");
    }

    #[test]
    fn acl_subject_names_topic_and_key() {
        assert_eq!(acl_subject("", "sensors"), "sensors");
        assert_eq!(acl_subject("plant", "line.3"), "plant/line.3");
        assert_eq!(acl_subject("plant", ""), "plant");
    }

    #[test]
    fn ack_runs_use_multiple() {
        assert_eq!(
            ack(3, 3),
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 3,
                multiple: false
            }))
        );
        assert_eq!(
            ack(3, 9),
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 9,
                multiple: true
            }))
        );
    }
}
