//! The core side: `GET /v1/sync` receives edges' streams.
//!
//! **Exactly once, with no time window.** Every record the core stores for an
//! edge carries headers naming the edge and its partition and offset there
//! ([`HEADER_EDGE`], [`HEADER_PARTITION`], [`HEADER_OFFSET`]), written in the
//! same append as the record itself: the log can never hold a record without
//! knowing where it came from. Per (edge, topic, edge partition) the core
//! keeps the ranges of edge offsets it holds ([`RangeSet`]); a batch's records
//! inside them are replays and are dropped, the rest are appended, and the
//! batch is acknowledged once the append is durable.
//!
//! The ranges are checkpointed in the log's metadata (space `sync`) after
//! each append round, together with the core offset up to which they are
//! complete. After a crash the checkpoint may be a round behind: at start the
//! core re-reads each stream's core partition from that offset and adds the
//! offsets the records' headers name. So the ranges always equal exactly what
//! the log holds, whatever moment the crash hit.
//!
//! One connection per edge: a new one makes the old one close
//! ([`code::REPLACED`]) and waits until its appends have finished.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_devices::auth::{self, Action, Authenticator, Credentials, Identity};
use tributary_ingest::{self as ingest, Rejection};
use tributary_storage::{AppendRecord, Error as LogError, Event, Log, MetaEntry, TopicConfig};

use crate::ranges::RangeSet;
use crate::wire::{
    self, code, Ack, Batch, ErrorFrame, Frame, Hello, Open, Opened, Skip, Welcome, WireRecord,
    HEADER_EDGE, HEADER_OFFSET, HEADER_PARTITION, MAX_RANGES,
};

/// Metadata space of the core's sync state.
pub const META_SPACE: &str = "sync";

/// The core's sync settings (`[sync]`).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Create topics edges forward (with the edge's partition count) when
    /// the core does not have them; otherwise refuse them.
    pub auto_create_topics: bool,
    /// How often the core pings an edge; an edge silent for 3 periods is dropped.
    pub heartbeat: Duration,
    /// Largest records block (uncompressed) one batch may carry.
    pub max_batch_bytes: usize,
    /// Bytes of batches one connection gathers into one append round.
    pub max_round_bytes: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            auto_create_topics: true,
            heartbeat: Duration::from_secs(5),
            max_batch_bytes: 4 * 1024 * 1024,
            max_round_bytes: 8 * 1024 * 1024,
        }
    }
}

/// How long an edge has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection waits for the old one of the same edge to end.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// A peer that takes none of our bytes for this long is dropped.
const SEND_STALL: Duration = Duration::from_secs(30);
/// Batches queued between a connection's reader and its appender.
const PIPELINE: usize = 256;
/// Bytes of decoded batches one connection may have queued or appending
/// (memory per connection is bounded by this, however fast the edge sends).
const QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// Extra `max_event_bytes` of topics created for edges (the origin headers).
const ORIGIN_HEADER_ROOM: usize = 4096;
/// Topics one connection may open.
const MAX_TOPICS_PER_CONNECTION: usize = 4096;
/// Streams (topic partitions) one edge may forward.
const MAX_STREAMS_PER_EDGE: usize = 100_000;
/// Edges a core remembers; a new edge beyond it is refused.
const MAX_EDGES: usize = 10_000;

/// Who is on the other end, as the transport knows it.
#[derive(Debug, Clone, Default)]
pub struct SyncPeer {
    /// Remote address.
    pub addr: Option<SocketAddr>,
    /// Identity of a verified client certificate (mTLS).
    pub certificate: Option<String>,
}

/// What went wrong opening the core's sync state.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The log failed.
    #[error("sync state: {0}")]
    Log(#[from] LogError),
    /// A stored checkpoint does not parse.
    #[error("corrupt sync checkpoint {key}: {detail}")]
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct EdgeMeta {
    instance: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StreamMeta {
    held: Vec<(u64, u64)>,
    core_partition: u32,
    /// Core offset from which records may be newer than `held`.
    scan_from: u64,
}

#[derive(Debug, Default)]
struct Stream {
    held: RangeSet,
    core_partition: u32,
    scan_from: u64,
    edge_end: u64,
    received: u64,
}

impl Stream {
    fn lag(&self) -> u64 {
        self.edge_end
            .saturating_sub(self.held.count_below(self.edge_end))
    }
}

#[derive(Debug, Default)]
struct EdgeState {
    instance: u64,
    connected: bool,
    peer: Option<SocketAddr>,
    since_ms: i64,
    last_seen_ms: i64,
    streams: HashMap<(String, u32), Stream>,
}

#[derive(Debug, Default)]
struct EdgeSlot {
    /// Held by the edge's one connection for its whole life.
    conn: Arc<tokio::sync::Mutex<()>>,
    /// Cancels the connection holding `conn` (a newer one takes over).
    kick: Mutex<CancellationToken>,
    state: Mutex<EdgeState>,
}

/// Counters of the core side.
#[derive(Debug, Default)]
struct CoreMetrics {
    connections: AtomicU64,
    open: AtomicU64,
    batches: AtomicU64,
    events: AtomicU64,
    duplicates: AtomicU64,
    skipped: AtomicU64,
    wire_bytes: AtomicU64,
    rounds: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

struct CoreInner {
    log: Log,
    auth: Arc<dyn Authenticator>,
    config: CoreConfig,
    edges: Mutex<HashMap<String, Arc<EdgeSlot>>>,
    metrics: CoreMetrics,
}

/// The core's receiver of edge streams; cheap to clone.
#[derive(Clone)]
pub struct SyncCore {
    inner: Arc<CoreInner>,
}

impl std::fmt::Debug for SyncCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncCore").finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn edge_key(edge: &str) -> Vec<u8> {
    [b"e/", edge.as_bytes()].concat()
}

fn stream_key(edge: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = [b"s/", edge.as_bytes(), b"\0", topic.as_bytes(), b"\0"].concat();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn parse_stream_key(key: &[u8]) -> Option<(String, String, u32)> {
    let rest = key.strip_prefix(b"s/")?;
    let mut parts = rest.splitn(3, |&b| b == 0);
    let edge = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let topic = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let p: [u8; 4] = parts.next()?.try_into().ok()?;
    Some((edge, topic, u32::from_be_bytes(p)))
}

/// Edge ids: 1..=128 of `[A-Za-z0-9._-]`.
pub fn valid_edge_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The edge offset a stored record came from, if it came from `edge`'s
/// `partition`.
fn origin(headers: &[(String, Vec<u8>)], edge: &str, partition: u32) -> Option<u64> {
    // The core's own headers come last (a record may carry older ones).
    let get = |name: &str| {
        headers
            .iter()
            .rfind(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    if get(HEADER_EDGE)? != edge.as_bytes() {
        return None;
    }
    let p: u32 = std::str::from_utf8(get(HEADER_PARTITION)?)
        .ok()?
        .parse()
        .ok()?;
    if p != partition {
        return None;
    }
    std::str::from_utf8(get(HEADER_OFFSET)?).ok()?.parse().ok()
}

/// Adds to `stream` the edge offsets named by the records of its core
/// partition from `scan_from` on (what the last checkpoint did not cover).
fn recover_stream(
    log: &Log,
    edge: &str,
    topic: &str,
    partition: u32,
    s: &mut Stream,
) -> Result<(), LogError> {
    let (start, end) = match log.offsets(topic, s.core_partition) {
        Ok(r) => r,
        Err(LogError::UnknownTopic(_) | LogError::UnknownPartition { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut at = s.scan_from.clamp(start, end);
    let mut run: Option<(u64, u64)> = None;
    while at < end {
        let page = log.read(topic, s.core_partition, at, 4096, 4 << 20)?;
        for r in &page.records {
            if let Some(o) = origin(&r.headers, edge, partition) {
                run = match run {
                    Some((a, b)) if b == o => Some((a, o + 1)),
                    Some((a, b)) => {
                        s.held.insert(a, b);
                        Some((o, o + 1))
                    }
                    None => Some((o, o + 1)),
                };
            }
        }
        if page.next_offset <= at {
            break;
        }
        at = page.next_offset;
    }
    if let Some((a, b)) = run {
        s.held.insert(a, b);
    }
    s.scan_from = end;
    Ok(())
}

impl SyncCore {
    /// Loads the sync state from the log's metadata and completes it from
    /// the log itself (see the module docs).
    pub async fn open(
        log: Log,
        auth: Arc<dyn Authenticator>,
        config: CoreConfig,
    ) -> Result<SyncCore, SyncError> {
        let scan_log = log.clone();
        let (edges, checkpoints) = tokio::task::spawn_blocking(move || -> Result<_, SyncError> {
            let log = scan_log;
            let mut edges: HashMap<String, EdgeState> = HashMap::new();
            for (key, value) in log.meta(META_SPACE)? {
                let corrupt = |detail: String| SyncError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail,
                };
                if let Some(edge) = key.strip_prefix(b"e/") {
                    let m: EdgeMeta =
                        postcard::from_bytes(&value).map_err(|e| corrupt(e.to_string()))?;
                    let edge = String::from_utf8_lossy(edge).into_owned();
                    edges.entry(edge).or_default().instance = m.instance;
                } else if let Some((edge, topic, p)) = parse_stream_key(&key) {
                    let m: StreamMeta =
                        postcard::from_bytes(&value).map_err(|e| corrupt(e.to_string()))?;
                    let stream = Stream {
                        held: RangeSet::from_ranges(m.held),
                        core_partition: m.core_partition,
                        scan_from: m.scan_from,
                        ..Stream::default()
                    };
                    edges.entry(edge).or_default().streams.insert((topic, p), stream);
                }
            }
            let mut checkpoints = Vec::new();
            for (edge, st) in &mut edges {
                for ((topic, p), s) in &mut st.streams {
                    let before = s.held.clone();
                    recover_stream(&log, edge, topic, *p, s)?;
                    if s.held != before {
                        tracing::info!(%edge, %topic, partition = p, "sync: completed a checkpoint from the log after a crash");
                    }
                    checkpoints.push(checkpoint(edge, topic, *p, s));
                }
            }
            Ok((edges, checkpoints))
        })
        .await
        .map_err(|e| SyncError::Log(LogError::Io(std::io::Error::other(e.to_string()))))??;
        if !checkpoints.is_empty() {
            log.put_meta(META_SPACE, checkpoints).await?;
        }
        let edges = edges
            .into_iter()
            .map(|(id, state)| {
                let slot = EdgeSlot {
                    state: Mutex::new(state),
                    ..EdgeSlot::default()
                };
                (id, Arc::new(slot))
            })
            .collect();
        Ok(SyncCore {
            inner: Arc::new(CoreInner {
                log,
                auth,
                config,
                edges: Mutex::new(edges),
                metrics: CoreMetrics::default(),
            }),
        })
    }

    /// Serves one edge connection until it ends, the edge is replaced, or
    /// `shutdown` is cancelled.
    pub async fn serve(
        &self,
        socket: WebSocket,
        peer: SyncPeer,
        shutdown: CancellationToken,
        on_message: Option<OnMessage>,
    ) {
        let m = &self.inner.metrics;
        m.connections.fetch_add(1, Relaxed);
        m.open.fetch_add(1, Relaxed);
        let (sink, stream) = socket.split();
        let mut stream = EdgeStream {
            inner: stream,
            on_message,
        };
        let (out, out_rx) = mpsc::channel(PIPELINE);
        let writer = tokio::spawn(writer(sink, out_rx));
        let hello = tokio::select! {
            h = read_hello(&mut stream) => h,
            () = shutdown.cancelled() => Err(ErrorFrame::new(code::SHUTTING_DOWN, "the core is shutting down")),
        };
        let result = match hello {
            Ok(hello) => {
                self.session(hello, peer, &mut stream, &out, &shutdown)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.count_error(e.code);
            tracing::info!(code = code::name(e.code), message = %e.message, "sync connection ended with an error");
            let close_code = match e.code {
                code::UNAUTHORIZED | code::FORBIDDEN => 1008,
                code::BAD_FRAME | code::UNSUPPORTED_VERSION | code::GAP => 1002,
                code::TOO_LARGE => 1009,
                code::SHUTTING_DOWN | code::REPLACED => 1001,
                _ => 1011,
            };
            let _ = out.send(Out::Frame(Frame::Error(e))).await;
            let _ = out.send(Out::Close(close_code)).await;
        } else {
            let _ = out.send(Out::Close(1000)).await;
        }
        drop(out);
        let _ = writer.await;
        m.open.fetch_sub(1, Relaxed);
    }

    fn count_error(&self, c: u16) {
        *lock(&self.inner.metrics.errors)
            .entry(code::name(c))
            .or_insert(0) += 1;
    }

    fn slot(&self, edge: &str) -> Result<Arc<EdgeSlot>, ErrorFrame> {
        let mut edges = lock(&self.inner.edges);
        if edges.len() >= MAX_EDGES && !edges.contains_key(edge) {
            return Err(ErrorFrame::new(
                code::FORBIDDEN,
                format!("this core already knows {MAX_EDGES} edges"),
            ));
        }
        Ok(edges.entry(edge.to_owned()).or_default().clone())
    }

    async fn session(
        &self,
        hello: Hello,
        peer: SyncPeer,
        stream: &mut EdgeStream,
        out: &mpsc::Sender<Out>,
        shutdown: &CancellationToken,
    ) -> Result<(), ErrorFrame> {
        let core = &self.inner;
        let version = wire::VERSION.min(hello.max_version);
        if version < wire::MIN_VERSION.max(hello.min_version) {
            return Err(ErrorFrame::new(
                code::UNSUPPORTED_VERSION,
                format!(
                    "the core speaks sync versions {}..={}, the edge {}..={}",
                    wire::MIN_VERSION,
                    wire::VERSION,
                    hello.min_version,
                    hello.max_version
                ),
            ));
        }
        if !valid_edge_id(&hello.edge_id) {
            return Err(ErrorFrame::new(
                code::BAD_FRAME,
                "edge ids are 1..=128 characters of [A-Za-z0-9._-]",
            ));
        }
        let creds = Credentials {
            protocol: "sync",
            username: Some(&hello.edge_id),
            password: hello.token.as_deref(),
            client_id: None,
            peer: peer.addr,
            certificate: peer.certificate.as_deref(),
        };
        let who = auth::login(core.auth.as_ref(), &creds).await.map_err(|r| {
            ErrorFrame::new(code::UNAUTHORIZED, format!("login refused: {}", r.reason()))
        })?;
        if core.auth.enforcing() && who.id != hello.edge_id {
            return Err(ErrorFrame::new(
                code::UNAUTHORIZED,
                format!(
                    "logged in as device {}, not as edge {}",
                    who.id, hello.edge_id
                ),
            ));
        }
        let edge = hello.edge_id.clone();
        let slot = self.slot(&edge)?;
        let kick = CancellationToken::new();
        // The previous connection of this edge (if any) was just kicked: wait
        // until its appends are done, so the held ranges are exact.
        let previous = std::mem::replace(&mut *lock(&slot.kick), kick.clone());
        previous.cancel();
        let _conn = tokio::select! {
            g = tokio::time::timeout(TAKEOVER_TIMEOUT, slot.conn.clone().lock_owned()) => g.map_err(|_| {
                ErrorFrame::new(code::REPLACED, "the edge's previous connection is still closing")
            })?,
            () = kick.cancelled() => return Err(ErrorFrame::new(code::REPLACED, "a newer connection of this edge took over")),
        };
        let reset = {
            let mut st = lock(&slot.state);
            let reset = st.instance != hello.instance;
            // Changed in memory only once these writes are durable (in `connected`).
            let dropped: Vec<MetaEntry> = if reset {
                if st.instance != 0 {
                    tracing::warn!(%edge, "sync: the edge came back with a new data directory; its offsets start again");
                }
                st.streams
                    .keys()
                    .map(|(t, p)| (stream_key(&edge, t, *p), None))
                    .collect()
            } else {
                Vec::new()
            };
            st.connected = true;
            st.peer = peer.addr;
            st.since_ms = now_ms();
            st.last_seen_ms = st.since_ms;
            reset.then_some(dropped)
        };
        let result = self
            .connected(
                &edge,
                &who,
                &slot,
                reset,
                hello.instance,
                stream,
                out,
                shutdown,
                &kick,
                version,
            )
            .await;
        let mut st = lock(&slot.state);
        st.connected = false;
        st.last_seen_ms = now_ms();
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn connected(
        &self,
        edge: &str,
        who: &Identity,
        slot: &Arc<EdgeSlot>,
        reset: Option<Vec<MetaEntry>>,
        instance: u64,
        stream: &mut EdgeStream,
        out: &mpsc::Sender<Out>,
        shutdown: &CancellationToken,
        kick: &CancellationToken,
        version: u16,
    ) -> Result<(), ErrorFrame> {
        let core = &self.inner;
        if let Some(mut entries) = reset {
            let meta = EdgeMeta { instance };
            entries.push((
                edge_key(edge),
                Some(postcard::to_allocvec(&meta).unwrap_or_default()),
            ));
            core.log
                .put_meta(META_SPACE, entries)
                .await
                .map_err(storage_error)?;
            let mut st = lock(&slot.state);
            st.instance = instance;
            st.streams.clear();
        }
        let welcome = Welcome {
            version,
            heartbeat_ms: u32::try_from(core.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
            max_batch_bytes: u32::try_from(core.config.max_batch_bytes).unwrap_or(u32::MAX),
        };
        send(out, Frame::Welcome(welcome)).await?;
        tracing::info!(%edge, "sync: edge connected");
        let (work_tx, work_rx) = mpsc::channel(PIPELINE);
        let budget = Arc::new(tokio::sync::Semaphore::new(QUEUED_BYTES));
        let appender = Appender {
            core: self.clone(),
            edge: edge.to_owned(),
            slot: slot.clone(),
            out: out.clone(),
            accepted: HashMap::new(),
        };
        let mut appending = tokio::spawn(appender.run(work_rx));
        let mut appender_ended = None;
        let mut opened: HashMap<String, (u32, u32)> = HashMap::new();
        let silent_after = core.config.heartbeat * 3;
        let mut last_heard = Instant::now();
        let mut ping = tokio::time::interval(core.config.heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let generation = core.auth.generation();
        let result = loop {
            let silent = tokio::time::sleep_until((last_heard + silent_after).into());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Err(ErrorFrame::new(code::SHUTTING_DOWN, "the core is shutting down")),
                () = kick.cancelled() => break Err(ErrorFrame::new(code::REPLACED, "a newer connection of this edge took over")),
                ended = &mut appending => {
                    let e = match ended {
                        Ok(Err(e)) => e,
                        _ => ErrorFrame::new(code::STORAGE, "the connection's appender ended"),
                    };
                    appender_ended = Some(());
                    break Err(e);
                }
                _ = ping.tick() => {
                    if core.auth.generation() != generation && !core.auth.still_valid(who) {
                        break Err(ErrorFrame::new(code::UNAUTHORIZED, "the edge's device was disabled, removed or given a new token"));
                    }
                    if out.send(Out::Ping).await.is_err() {
                        break Ok(());
                    }
                }
                () = silent => break Err(ErrorFrame::new(code::BAD_FRAME, format!("nothing heard from the edge for {silent_after:?}"))),
                msg = stream.next() => {
                    last_heard = Instant::now();
                    lock(&slot.state).last_seen_ms = now_ms();
                    let bytes = match msg {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Ok(()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Text(_))) => break Err(ErrorFrame::new(code::BAD_FRAME, "text messages are not sync frames")),
                        Some(Ok(Message::Binary(b))) => b,
                    };
                    core.metrics.wire_bytes.fetch_add(bytes.len() as u64, Relaxed);
                    let frame = match Frame::decode(&bytes) {
                        Ok(f) => f,
                        Err(e) => break Err(ErrorFrame::new(code::BAD_FRAME, e.to_string())),
                    };
                    match frame {
                        Frame::Open(o) => {
                            if opened.len() >= MAX_TOPICS_PER_CONNECTION && !opened.contains_key(&o.topic) {
                                break Err(ErrorFrame::new(code::BAD_FRAME, "too many topics on one connection"));
                            }
                            match self.open_topic(edge, who, &o).await {
                                Ok(reply) => {
                                    opened.insert(o.topic.clone(), (o.partitions, reply.partitions));
                                    if let Err(e) = send(out, Frame::Opened(reply)).await { break Err(e) }
                                }
                                // A refused topic is refused alone: the edge forwards the others.
                                Err(e) if matches!(e.code, code::FORBIDDEN | code::UNKNOWN_TOPIC) => {
                                    self.count_error(e.code);
                                    if let Err(e) = send(out, Frame::Error(e)).await { break Err(e) }
                                }
                                Err(e) => break Err(e),
                            }
                        }
                        Frame::Batch(b) => {
                            // Taken before decoding: what waits is bounded in bytes.
                            let want = charge(&b).clamp(1, QUEUED_BYTES) as u32;
                            let Ok(permit) = budget.clone().acquire_many_owned(want).await else {
                                break Ok(());
                            };
                            let work = match self.check_batch(&opened, b, permit) {
                                Ok(w) => w,
                                Err(e) => break Err(e),
                            };
                            if work_tx.send(work).await.is_err() {
                                continue; // the appender ended: its result comes next
                            }
                        }
                        Frame::Skip(s) => {
                            let Some(&(edge_parts, core_parts)) = opened.get(&s.topic) else {
                                break Err(not_opened(&s.topic));
                            };
                            if s.partition >= edge_parts || s.from >= s.to {
                                break Err(ErrorFrame::new(code::BAD_FRAME, "skip of no offsets or of a partition the topic lacks").at(&s.topic, s.partition));
                            }
                            let _ = core_parts;
                            if work_tx.send(Work::Skip(s)).await.is_err() {
                                continue;
                            }
                        }
                        other => break Err(ErrorFrame::new(code::BAD_FRAME, format!("an edge does not send {}", kind(&other)))),
                    }
                }
            }
        };
        // Appends already handed to the log finish (and are acknowledged if
        // the socket still takes it) before the next connection may start.
        drop(work_tx);
        if appender_ended.is_none() {
            let ended = appending.await;
            if result.is_ok() {
                if let Ok(Err(e)) = ended {
                    return Err(e);
                }
            }
        }
        tracing::info!(%edge, "sync: edge disconnected");
        result
    }

    async fn open_topic(&self, edge: &str, who: &Identity, o: &Open) -> Result<Opened, ErrorFrame> {
        let core = &self.inner;
        let refuse = |c: u16, m: String| {
            Err(ErrorFrame {
                topic: Some(o.topic.clone()),
                ..ErrorFrame::new(c, m)
            })
        };
        if !core.auth.authorize(who, Action::Publish, &o.topic) {
            return refuse(
                code::FORBIDDEN,
                format!("edge {edge} may not forward topic {}", o.topic),
            );
        }
        if o.partitions == 0 || o.partitions > tributary_storage::topic::MAX_PARTITIONS {
            return Err(ErrorFrame::new(
                code::BAD_FRAME,
                "partition count out of range",
            ));
        }
        let partitions = match core.log.topic(&o.topic) {
            Ok(t) => t.config.partitions,
            Err(LogError::UnknownTopic(_)) if core.config.auto_create_topics => {
                let mut config: TopicConfig = core.log.config().topic_defaults.config(&o.topic);
                config.partitions = o.partitions;
                // Room for the three origin headers on an edge's largest events.
                config.max_event_bytes = (config.max_event_bytes + ORIGIN_HEADER_ROOM)
                    .min(tributary_storage::topic::MAX_EVENT_BYTES_LIMIT);
                match core.log.create_topic(config).await {
                    Ok(t) => t.config.partitions,
                    Err(LogError::TopicExists(_)) => {
                        core.log
                            .topic(&o.topic)
                            .map_err(storage_error)?
                            .config
                            .partitions
                    }
                    Err(LogError::InvalidTopic(m)) => {
                        return Err(ErrorFrame::new(code::BAD_FRAME, m))
                    }
                    Err(e) => return Err(storage_error(e)),
                }
            }
            Err(LogError::UnknownTopic(_)) => {
                return refuse(
                    code::UNKNOWN_TOPIC,
                    format!(
                        "the core has no topic {} and does not create topics for edges",
                        o.topic
                    ),
                );
            }
            Err(LogError::InvalidTopic(m)) => return Err(ErrorFrame::new(code::BAD_FRAME, m)),
            Err(e) => return Err(storage_error(e)),
        };
        let slot = self.slot(edge)?;
        // A stream seen for the first time gets a durable checkpoint before
        // anything of it is acknowledged: after a crash the core then scans
        // its partition from here, never from records older than the stream
        // (another instance's, for one), and never misses its first rounds.
        let (held, fresh) = {
            let mut st = lock(&slot.state);
            if !st.streams.contains_key(&(o.topic.clone(), 0))
                && st.streams.len() + o.partitions as usize > MAX_STREAMS_PER_EDGE
            {
                return refuse(
                    code::FORBIDDEN,
                    format!("edge {edge} forwards more than {MAX_STREAMS_PER_EDGE} partitions"),
                );
            }
            let mut fresh = Vec::new();
            let held: Vec<Vec<(u64, u64)>> = (0..o.partitions)
                .map(|p| {
                    let key = (o.topic.clone(), p);
                    let core_partition = p % partitions;
                    let s = st.streams.entry(key).or_insert_with(|| {
                        let end = core
                            .log
                            .offsets(&o.topic, core_partition)
                            .map_or(0, |(_, e)| e);
                        let s = Stream {
                            core_partition,
                            scan_from: end,
                            ..Stream::default()
                        };
                        fresh.push(checkpoint(edge, &o.topic, p, &s));
                        s
                    });
                    s.core_partition = core_partition;
                    s.held.ranges().to_vec()
                })
                .collect();
            (held, fresh)
        };
        if !fresh.is_empty() {
            core.log
                .put_meta(META_SPACE, fresh)
                .await
                .map_err(storage_error)?;
        }
        Ok(Opened {
            topic: o.topic.clone(),
            partitions,
            held,
        })
    }

    fn check_batch(
        &self,
        opened: &HashMap<String, (u32, u32)>,
        b: Batch,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Work, ErrorFrame> {
        let Some(&(edge_parts, core_parts)) = opened.get(&b.topic) else {
            return Err(match self.inner.log.topic(&b.topic) {
                Err(LogError::UnknownTopic(_)) => ErrorFrame {
                    topic: Some(b.topic.clone()),
                    ..ErrorFrame::new(
                        code::UNKNOWN_TOPIC,
                        format!("no topic {} at the core", b.topic),
                    )
                },
                _ => not_opened(&b.topic),
            });
        };
        if b.partition >= edge_parts {
            return Err(
                ErrorFrame::new(code::BAD_FRAME, "batch for a partition the topic lacks")
                    .at(&b.topic, b.partition),
            );
        }
        let raw = wire::decompress(&b, self.inner.config.max_batch_bytes).map_err(|e| {
            let c = if matches!(e, wire::WireError::TooLarge { .. }) {
                code::TOO_LARGE
            } else {
                code::BAD_FRAME
            };
            ErrorFrame::new(c, e.to_string()).at(&b.topic, b.partition)
        })?;
        let records = wire::decode_records(&raw, b.count).map_err(|e| {
            ErrorFrame::new(code::BAD_FRAME, e.to_string()).at(&b.topic, b.partition)
        })?;
        if b.base_offset.checked_add(u64::from(b.count)).is_none() {
            return Err(
                ErrorFrame::new(code::BAD_FRAME, "offsets overflow").at(&b.topic, b.partition)
            );
        }
        self.inner.metrics.batches.fetch_add(1, Relaxed);
        Ok(Work::Batch {
            core_partition: b.partition % core_parts,
            bytes: charge(&b),
            _permit: permit,
            batch: Batch {
                records: Vec::new(),
                ..b
            },
            records,
        })
    }

    /// Sync connections open now (with or without a finished Hello).
    pub fn open_connections(&self) -> u64 {
        self.inner.metrics.open.load(Relaxed)
    }

    /// Edges connected now.
    pub fn connected_edges(&self) -> u64 {
        lock(&self.inner.edges)
            .values()
            .filter(|s| lock(&s.state).connected)
            .count() as u64
    }

    /// `/v1/stats`'s `sync` section on a core: every edge, its streams and lag.
    pub fn stats(&self) -> serde_json::Value {
        let edges: Vec<(String, Arc<EdgeSlot>)> = lock(&self.inner.edges)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut list = Vec::new();
        for (id, slot) in edges {
            let st = lock(&slot.state);
            let mut topics: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
            for ((t, _), s) in &st.streams {
                let e = topics.entry(t).or_default();
                e.0 += s.lag();
                e.1 += s.received;
            }
            let topics: Vec<serde_json::Value> = topics
                .into_iter()
                .map(|(t, (lag, received))| json!({"topic": t, "lag_events": lag, "received_events": received}))
                .collect();
            list.push(json!({
                "edge": id,
                "connected": st.connected,
                "peer": st.peer.map(|p| p.to_string()),
                "connected_since_ms": st.since_ms,
                "last_seen_ms": st.last_seen_ms,
                "lag_events": st.streams.values().map(Stream::lag).sum::<u64>(),
                "topics": topics,
            }));
        }
        list.sort_by(|a, b| a["edge"].as_str().cmp(&b["edge"].as_str()));
        let m = &self.inner.metrics;
        json!({
            "role": "core",
            "edges_connected": self.connected_edges(),
            "received_events": m.events.load(Relaxed),
            "duplicate_events": m.duplicates.load(Relaxed),
            "skipped_events": m.skipped.load(Relaxed),
            "edges": list,
        })
    }

    /// Appends the core's Prometheus metrics (never labelled by edge id).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::Kind::{Counter, Gauge};
        let m = &self.inner.metrics;
        let known = lock(&self.inner.edges).len() as u64;
        crate::metrics::render(
            out,
            &[
                (Gauge, "tributary_sync_edges_connected", "Edges connected now.", self.connected_edges()),
                (Gauge, "tributary_sync_edges_known", "Edges that ever connected.", known),
                (Gauge, "tributary_sync_core_connections_open", "Sync connections open now (before and after their Hello).", m.open.load(Relaxed)),
                (Counter, "tributary_sync_core_connections_total", "Sync connections accepted.", m.connections.load(Relaxed)),
                (Counter, "tributary_sync_received_batches_total", "Batches received from edges.", m.batches.load(Relaxed)),
                (Counter, "tributary_sync_received_events_total", "Events from edges appended (durable).", m.events.load(Relaxed)),
                (Counter, "tributary_sync_duplicate_events_total", "Events from edges the core already held (replays, dropped).", m.duplicates.load(Relaxed)),
                (Counter, "tributary_sync_skipped_events_total", "Events edges lost before forwarding them (their disk quota), recorded as gaps.", m.skipped.load(Relaxed)),
                (Counter, "tributary_sync_core_wire_bytes_total", "Bytes of sync frames received.", m.wire_bytes.load(Relaxed)),
                (Counter, "tributary_sync_append_rounds_total", "Append rounds (each one log append per topic covering many batches).", m.rounds.load(Relaxed)),
            ],
        );
        crate::metrics::render_by_code(
            out,
            "tributary_sync_core_errors_total",
            "Sync errors sent to edges, by code.",
            &lock(&m.errors),
        );
    }
}

fn checkpoint(edge: &str, topic: &str, partition: u32, s: &Stream) -> MetaEntry {
    let m = StreamMeta {
        held: s.held.ranges().to_vec(),
        core_partition: s.core_partition,
        scan_from: s.scan_from,
    };
    (
        stream_key(edge, topic, partition),
        Some(postcard::to_allocvec(&m).unwrap_or_default()),
    )
}

/// What a batch costs in memory once decoded and turned into appends: its
/// block plus each record's own allocations (key, value, headers and the
/// three origin headers), whatever the block's size says.
fn charge(b: &Batch) -> usize {
    (b.raw_len as usize).saturating_add((b.count as usize).saturating_mul(RECORD_OVERHEAD))
}

/// Bytes a decoded record costs beyond its block bytes (measured shape:
/// `WireRecord`, `AppendRecord` and six header allocations).
const RECORD_OVERHEAD: usize = 256;

fn kind(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Welcome(_) => "Welcome",
        Frame::Open(_) => "Open",
        Frame::Opened(_) => "Opened",
        Frame::Batch(_) => "Batch",
        Frame::Ack(_) => "Ack",
        Frame::Skip(_) => "Skip",
        Frame::Error(_) => "Error",
    }
}

fn not_opened(topic: &str) -> ErrorFrame {
    ErrorFrame {
        topic: Some(topic.to_owned()),
        ..ErrorFrame::new(
            code::BAD_FRAME,
            format!("topic {topic} was not opened on this connection"),
        )
    }
}

/// Called after each message read from an edge: the HTTP layer gives the
/// bytes read for it back to the node's memory budget.
pub type OnMessage = Arc<dyn Fn() + Send + Sync>;

/// An edge's messages, calling [`OnMessage`] as each is taken.
pub struct EdgeStream {
    inner: futures_util::stream::SplitStream<WebSocket>,
    on_message: Option<OnMessage>,
}

impl futures_util::Stream for EdgeStream {
    type Item = <futures_util::stream::SplitStream<WebSocket> as futures_util::Stream>::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let (std::task::Poll::Ready(Some(_)), Some(f)) = (&r, &self.on_message) {
            f();
        }
        r
    }
}

fn storage_error(e: impl std::fmt::Display) -> ErrorFrame {
    ErrorFrame::new(code::STORAGE, format!("the core cannot store it: {e}"))
}

async fn send(out: &mpsc::Sender<Out>, f: Frame) -> Result<(), ErrorFrame> {
    out.send(Out::Frame(f))
        .await
        .map_err(|_| ErrorFrame::new(code::BAD_FRAME, "the connection is gone"))
}

async fn read_hello(stream: &mut EdgeStream) -> Result<Hello, ErrorFrame> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| ErrorFrame::new(code::BAD_FRAME, "no Hello in time"))?;
        match msg {
            Some(Ok(Message::Binary(b))) => {
                return match Frame::decode(&b) {
                    Ok(Frame::Hello(h)) => Ok(h),
                    Ok(other) => Err(ErrorFrame::new(
                        code::BAD_FRAME,
                        format!("expected Hello, got {}", kind(&other)),
                    )),
                    Err(e) => Err(ErrorFrame::new(
                        code::BAD_FRAME,
                        format!("expected Hello: {e}"),
                    )),
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(ErrorFrame::new(
                    code::BAD_FRAME,
                    "text messages are not sync frames",
                ))
            }
            _ => return Err(ErrorFrame::new(code::BAD_FRAME, "closed before Hello")),
        }
    }
}

/// What the writer task sends.
enum Out {
    Frame(Frame),
    Ping,
    Close(u16),
}

async fn writer(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Out>) {
    while let Some(o) = rx.recv().await {
        let (msg, last) = match o {
            Out::Frame(f) => (Message::Binary(f.encode().into()), false),
            Out::Ping => (Message::Ping(Vec::new().into()), false),
            Out::Close(c) => (
                Message::Close(Some(CloseFrame {
                    code: c,
                    reason: "".into(),
                })),
                true,
            ),
        };
        // Acks queue up while the socket is busy: feed them, flush once.
        let sent = tokio::time::timeout(SEND_STALL, async {
            sink.feed(msg).await?;
            if last || rx.is_empty() {
                sink.flush().await?;
            }
            Ok::<_, axum::Error>(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) || last {
            return;
        }
    }
}

/// A connection's appends, in the order its frames arrived.
enum Work {
    Batch {
        batch: Batch,
        core_partition: u32,
        records: Vec<WireRecord>,
        bytes: usize,
        /// Its share of the connection's [`QUEUED_BYTES`], given back after its round.
        _permit: tokio::sync::OwnedSemaphorePermit,
    },
    Skip(Skip),
}

impl Work {
    fn bytes(&self) -> usize {
        match self {
            Work::Batch { bytes, .. } => *bytes,
            Work::Skip(_) => 64,
        }
    }

    fn at(&self) -> (&str, u32, u64, u64) {
        match self {
            Work::Batch { batch, .. } => (
                &batch.topic,
                batch.partition,
                batch.base_offset,
                batch.base_offset + u64::from(batch.count),
            ),
            Work::Skip(s) => (&s.topic, s.partition, s.from, s.to),
        }
    }
}

struct Appender {
    core: SyncCore,
    edge: String,
    slot: Arc<EdgeSlot>,
    out: mpsc::Sender<Out>,
    /// Per stream, what is held or being appended on this connection.
    accepted: HashMap<(String, u32), RangeSet>,
}

impl Appender {
    async fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Result<(), ErrorFrame> {
        let max = self.core.inner.config.max_round_bytes;
        let mut pending_meta: Vec<MetaEntry> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut bytes = first.bytes();
            let mut round = vec![first];
            while bytes < max {
                match rx.try_recv() {
                    Ok(w) => {
                        bytes += w.bytes();
                        round.push(w);
                    }
                    Err(_) => break,
                }
            }
            let meta = std::mem::take(&mut pending_meta);
            pending_meta = self.round(round, meta).await?;
            if rx.is_empty() && !pending_meta.is_empty() {
                let meta = std::mem::take(&mut pending_meta);
                self.core
                    .inner
                    .log
                    .put_meta(META_SPACE, meta)
                    .await
                    .map_err(storage_error)?;
            }
        }
        if !pending_meta.is_empty() {
            self.core
                .inner
                .log
                .put_meta(META_SPACE, pending_meta)
                .await
                .map_err(storage_error)?;
        }
        Ok(())
    }

    /// One round: checks every batch against the held ranges, appends what is
    /// new (one append per core topic, `meta` written alongside), updates the
    /// ranges, acknowledges. Returns the checkpoints to write next.
    async fn round(
        &mut self,
        round: Vec<Work>,
        meta: Vec<MetaEntry>,
    ) -> Result<Vec<MetaEntry>, ErrorFrame> {
        let core = &self.core.inner;
        let mut per_topic: Vec<(String, Vec<AppendRecord>)> = Vec::new();
        let mut duplicates = 0u64;
        let mut skipped = 0u64;
        let mut has_skip = false;
        let mut new_events = Vec::with_capacity(round.len());
        // Works left out of this round: a stream stops at a record the core
        // cannot store (too large for its topic), and so do its later works.
        let mut excluded = vec![false; round.len()];
        let mut blocked: Vec<(String, u32)> = Vec::new();
        let mut oversize: Option<ErrorFrame> = None;
        let mut max_event: HashMap<String, usize> = HashMap::new();
        for (wi, w) in round.iter().enumerate() {
            let (topic, partition, from, to) = w.at();
            if blocked.iter().any(|(t, p)| t == topic && *p == partition) {
                excluded[wi] = true;
                new_events.push(0);
                continue;
            }
            let key = (topic.to_owned(), partition);
            let slot = &self.slot;
            let accepted = self.accepted.entry(key).or_insert_with_key(|key| {
                lock(&slot.state)
                    .streams
                    .get(key)
                    .map(|s| s.held.clone())
                    .unwrap_or_default()
            });
            let new_lane = matches!(w, Work::Batch { batch, .. } if batch.new_lane);
            if !(accepted.continues_at(from) || new_lane && accepted.len() < MAX_RANGES) {
                return Err(ErrorFrame {
                    expected: Some(accepted.expected_below(from)),
                    ..ErrorFrame::new(
                        code::GAP,
                        format!("offset {from} neither continues a held range nor opens a lane"),
                    )
                    .at(topic, partition)
                });
            }
            let missing = accepted.missing(from, to);
            accepted.insert(from, to);
            let fresh = missing
                .iter()
                .fold(0u64, |n, (a, b)| n.saturating_add(b - a));
            new_events.push(fresh);
            match w {
                Work::Skip(..) => {
                    skipped = skipped.saturating_add(fresh);
                    has_skip = true;
                }
                Work::Batch {
                    batch,
                    core_partition,
                    records,
                    ..
                } => {
                    duplicates += u64::from(batch.count).saturating_sub(fresh);
                    if missing.is_empty() {
                        continue;
                    }
                    let max = *max_event.entry(topic.to_owned()).or_insert_with(|| {
                        core.log
                            .topic(topic)
                            .map_or(usize::MAX, |t| t.config.max_event_bytes)
                    });
                    let mut list = Vec::with_capacity(fresh as usize);
                    let p = partition.to_string();
                    for (a, b) in missing {
                        for o in a..b {
                            let r = &records[(o - from) as usize];
                            let mut headers = r.headers.clone();
                            headers.push((HEADER_EDGE.to_owned(), self.edge.as_bytes().to_vec()));
                            headers.push((HEADER_PARTITION.to_owned(), p.as_bytes().to_vec()));
                            headers.push((HEADER_OFFSET.to_owned(), o.to_string().into_bytes()));
                            let event = Event {
                                key: r.key.clone(),
                                value: r.value.clone(),
                                timestamp: Some(r.timestamp),
                                headers,
                            };
                            if event.size() > max && oversize.is_none() {
                                oversize = Some(ErrorFrame {
                                    expected: Some(o),
                                    ..ErrorFrame::new(
                                        code::TOO_LARGE,
                                        format!(
                                            "record {o} of {topic}/{partition} has {} bytes with its origin headers; the core's topic takes {max}",
                                            event.size()
                                        ),
                                    )
                                    .at(topic, partition)
                                });
                            }
                            if event.size() > max {
                                list.clear();
                                break;
                            }
                            list.push(AppendRecord {
                                partition: Some(*core_partition),
                                event,
                            });
                        }
                    }
                    if list.len() as u64 != fresh {
                        excluded[wi] = true;
                        blocked.push((topic.to_owned(), partition));
                        continue;
                    }
                    match per_topic.iter_mut().find(|(t, _)| t == topic) {
                        Some((_, all)) => all.extend(list),
                        None => per_topic.push((topic.to_owned(), list)),
                    }
                }
            }
        }
        let log = &core.log;
        // Through the one append path; each record is tagged with its topic's
        // index in `per_topic`, whose names stay here to name failures.
        let mut batch = ingest::Batch::default();
        let names: Vec<String> = per_topic.iter().map(|(t, _)| t.clone()).collect();
        for (i, (topic, records)) in per_topic.into_iter().enumerate() {
            for record in records {
                batch.push(&topic, i, record);
            }
        }
        let appends = ingest::append(log, batch);
        let write_meta = async {
            if meta.is_empty() {
                Ok(())
            } else {
                log.put_meta(META_SPACE, meta).await
            }
        };
        let (results, meta_written) = tokio::join!(appends, write_meta);
        // Topics whose append failed are neither held nor acknowledged; the
        // others are durable and must be both, or the edge would resend them
        // after the connection ends and they would be stored twice.
        let mut failure = oversize.or(meta_written.err().map(storage_error));
        let mut failed: Vec<String> = Vec::new();
        let mut ends: HashMap<(String, u32), u64> = HashMap::new();
        for (i, outcome) in results {
            let topic = &names[i];
            match outcome {
                Ok(p) => {
                    let end = ends.entry((topic.clone(), p.partition)).or_default();
                    *end = (*end).max(p.offset + 1);
                }
                // A topic's records are stored all or none: one failure names it.
                Err(_) if failed.contains(topic) => {}
                Err(refused) => {
                    let frame = match refused.rejection {
                        Rejection::TooLarge => {
                            ErrorFrame::new(code::TOO_LARGE, format!("topic {topic}: {refused}"))
                        }
                        _ => storage_error(&refused),
                    };
                    failure.get_or_insert(frame);
                    failed.push(topic.clone());
                }
            }
        }
        let done_at = |i: usize, w: &Work| {
            !excluded[i]
                && match w {
                    Work::Batch { batch, .. } => !failed.contains(&batch.topic),
                    Work::Skip(_) => true,
                }
        };
        core.metrics.rounds.fetch_add(1, Relaxed);
        let mut appended = 0u64;
        for (i, (w, fresh)) in round.iter().zip(&new_events).enumerate() {
            if matches!(w, Work::Batch { .. }) && done_at(i, w) {
                appended = appended.saturating_add(*fresh);
            }
        }
        core.metrics.events.fetch_add(appended, Relaxed);
        core.metrics.duplicates.fetch_add(duplicates, Relaxed);
        core.metrics.skipped.fetch_add(skipped, Relaxed);
        // Durable now: the shared ranges grow, checkpoints follow.
        let mut checkpoints = Vec::new();
        {
            let mut st = lock(&self.slot.state);
            let mut touched = Vec::new();
            for (i, (w, fresh)) in round.iter().zip(&new_events).enumerate() {
                if !done_at(i, w) {
                    continue;
                }
                let (topic, partition, from, to) = w.at();
                let s = st.streams.entry((topic.to_owned(), partition)).or_default();
                s.held.insert(from, to);
                if matches!(w, Work::Batch { .. }) {
                    s.received = s.received.saturating_add(*fresh);
                }
                if let Work::Batch {
                    batch,
                    core_partition,
                    ..
                } = w
                {
                    s.edge_end = s.edge_end.max(batch.edge_end);
                    s.core_partition = *core_partition;
                    if let Some(&end) = ends.get(&(topic.to_owned(), *core_partition)) {
                        s.scan_from = s.scan_from.max(end);
                    }
                }
                touched.push((topic.to_owned(), partition));
            }
            touched.sort();
            touched.dedup();
            for (t, p) in touched {
                if let Some(s) = st.streams.get(&(t.clone(), p)) {
                    checkpoints.push(checkpoint(&self.edge, &t, p, s));
                }
            }
        }
        let mut skips_durable = true;
        if has_skip {
            // A skip is in no record: its checkpoint must be durable before it is acked.
            let written = log
                .put_meta(META_SPACE, std::mem::take(&mut checkpoints))
                .await;
            if let Err(e) = written {
                failure.get_or_insert(storage_error(e));
                skips_durable = false;
            }
        }
        for (i, w) in round.iter().enumerate() {
            if !done_at(i, w) || (matches!(w, Work::Skip(_)) && !skips_durable) {
                continue;
            }
            let (topic, partition, from, to) = w.at();
            let ack = Ack {
                topic: topic.to_owned(),
                partition,
                base_offset: from,
                next_offset: to,
            };
            if self.out.send(Out::Frame(Frame::Ack(ack))).await.is_err() {
                break;
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(checkpoints),
        }
    }
}
