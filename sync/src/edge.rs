//! The edge side: one uploader keeps one WebSocket connection to the core
//! and forwards every chosen topic, live data first.
//!
//! **Cursors.** Per forwarded partition the edge knows which offset ranges
//! the core holds: the core says so when a topic is opened (`Opened`) and
//! with every `Ack`. The start of that knowledge, the *forwarded prefix*
//! (everything below it is at the core), is written to the edge's log
//! metadata (space `sync-edge`) about once a second and passed to the log
//! ([`Log::mark_forwarded`]) at once: retention keeps everything above it,
//! and the disk quota evicts below it first. A lagging on-disk prefix is
//! harmless: at the next connection the core's `Opened` is the truth.
//!
//! **Lanes (live first).** When a topic is opened, each partition's end
//! offset *E* splits it: the *live lane* sends `[E, …)` as events arrive,
//! the *backlog lane* fills what the core lacks below *E*, oldest first,
//! with whatever window and bandwidth the live lane leaves. So at the core,
//! per edge partition, each lane's records arrive in offset order; the two
//! lanes interleave until the backlog reaches *E*. Every record carries its
//! edge offset in a header, so a reader that needs the edge's exact order
//! can sort by it, or set `upstream.live_first = false` for one lane only.
//! Between topics, higher `priority` goes first within each lane class.
//!
//! **Links.** Reconnects back off exponentially with full jitter
//! ([`crate::backoff`]); the edge pings every `heartbeat` and drops a link
//! on which nothing (frame or pong) arrived for `timeout`, or on which a
//! write did not complete in that time (a half-open TCP connection).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tributary_storage::{Error as LogError, Log};

use crate::backoff::Backoff;
use crate::ranges::RangeSet;
use crate::wire::{self, code, Batch, ErrorFrame, Frame, Hello, Open, Opened, Skip, MAX_RANGES};

/// Metadata space of the edge's sync state.
pub const META_SPACE: &str = "sync-edge";

/// One forwarded topic and its priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    /// Topic name.
    pub name: String,
    /// Higher goes first.
    pub priority: i32,
}

/// The edge's `[upstream]` settings.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `ws://host:port/v1/sync` or `wss://host:port/v1/sync`.
    pub url: String,
    /// This edge's id at the core (its device id in devices mode).
    pub edge_id: String,
    /// Device token at the core.
    pub token: Option<String>,
    /// CA certificate(s) (PEM) the core's certificate must chain to; none:
    /// the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS, with `key`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Topics to forward; empty: every topic (also those created later).
    pub topics: Vec<TopicRule>,
    /// Priority of topics not listed (when `topics` is empty).
    pub default_priority: i32,
    /// Records per batch at most.
    pub batch_max_records: usize,
    /// Bytes of records per batch at most (before compression).
    pub batch_max_bytes: usize,
    /// How long a live batch may wait to fill up.
    pub linger: Duration,
    /// Bytes of records sent and not yet acknowledged, at most.
    pub window_bytes: usize,
    /// Batches sent and not yet acknowledged, at most.
    pub window_batches: usize,
    /// zstd level for batches (0: no compression).
    pub compression_level: i32,
    /// Bytes per second on the wire at most (0: no cap).
    pub max_bytes_per_sec: u64,
    /// Ping period.
    pub heartbeat: Duration,
    /// A link on which nothing arrived (or nothing could be written) for this long is dropped.
    pub timeout: Duration,
    /// Shortest reconnect delay ceiling.
    pub min_backoff: Duration,
    /// Longest reconnect delay ceiling.
    pub max_backoff: Duration,
    /// Live data ahead of the backlog.
    pub live_first: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            edge_id: String::new(),
            token: None,
            ca: None,
            cert: None,
            key: None,
            topics: Vec::new(),
            default_priority: 0,
            batch_max_records: 1024,
            batch_max_bytes: 256 * 1024,
            linger: Duration::from_millis(5),
            window_bytes: 8 * 1024 * 1024,
            window_batches: 64,
            compression_level: 1,
            max_bytes_per_sec: 0,
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            live_first: true,
        }
    }
}

impl UpstreamConfig {
    /// Is `topic` forwarded, and with what priority?
    pub fn priority(&self, topic: &str) -> Option<i32> {
        if self.topics.is_empty() {
            return Some(self.default_priority);
        }
        self.topics
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.priority)
    }

    /// Checks the settings; every problem, naming the key.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        match parse_url(&self.url) {
            Ok(_) => {}
            Err(e) => errors.push(format!("`upstream.url`: {e}")),
        }
        if !crate::core::valid_edge_id(&self.edge_id) {
            errors.push("`upstream.edge_id` must be 1..=128 characters of [A-Za-z0-9._-]".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            errors.push("`upstream.cert` and `upstream.key` go together".into());
        }
        for (key, v) in [
            ("upstream.batch_max_records", self.batch_max_records),
            ("upstream.batch_max_bytes", self.batch_max_bytes),
            ("upstream.window_bytes", self.window_bytes),
            ("upstream.window_batches", self.window_batches),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        if self.window_bytes < self.batch_max_bytes {
            errors
                .push("`upstream.window_bytes` must be at least `upstream.batch_max_bytes`".into());
        }
        if !(0..=19).contains(&self.compression_level) {
            errors.push("`upstream.compression_level` must be 0 (off) to 19".into());
        }
        if self.heartbeat.is_zero() || self.timeout <= self.heartbeat {
            errors.push(
                "`upstream.heartbeat_ms` must be positive and below `upstream.timeout_ms`".into(),
            );
        }
        if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            errors.push(
                "`upstream.min_backoff_ms` must be positive and at most `upstream.max_backoff_ms`"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.topics {
            if !seen.insert(&t.name) {
                errors.push(format!("`upstream.topics`: `{}` is listed twice", t.name));
            }
        }
        errors
    }
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(format!("`{url}` must start with ws:// or wss://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target { tls, host, port })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cursor_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = [b"c/", topic.as_bytes(), b"\0"].concat();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn parse_cursor_key(k: &[u8]) -> Option<(String, u32)> {
    let rest = k.strip_prefix(b"c/")?;
    let split = rest.iter().position(|&b| b == 0)?;
    let topic = std::str::from_utf8(&rest[..split]).ok()?.to_owned();
    let p: [u8; 4] = rest[split + 1..].try_into().ok()?;
    Some((topic, u32::from_be_bytes(p)))
}

/// What the edge knows of one forwarded partition, kept across connections.
#[derive(Debug, Default, Clone)]
struct Known {
    /// What the core holds (from Opened and Acks).
    held: RangeSet,
    /// The prefix last written to disk.
    persisted: u64,
}

/// Counters of the edge side.
#[derive(Debug, Default)]
struct EdgeMetrics {
    connects: AtomicU64,
    disconnects: AtomicU64,
    batches: AtomicU64,
    sent_events: AtomicU64,
    acked_events: AtomicU64,
    skipped_events: AtomicU64,
    raw_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

struct EdgeInner {
    log: Log,
    config: UpstreamConfig,
    instance: u64,
    known: Mutex<HashMap<(String, u32), Known>>,
    /// Acked events per topic, sampled for the drain rate.
    acked: Mutex<HashMap<String, u64>>,
    samples: Mutex<VecDeque<(Instant, HashMap<String, u64>)>>,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Records the core refused as too large: (topic, partition) → (offset,
    /// retry after, why). Lanes go around them until then.
    blocked: Mutex<HashMap<(String, u32), Blocked>>,
    metrics: EdgeMetrics,
}

/// The edge's uploader; cheap to clone.
#[derive(Clone)]
pub struct Uploader {
    inner: Arc<EdgeInner>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader").finish_non_exhaustive()
    }
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Shutdown asked for.
    Shutdown,
    /// The link failed or the core said so.
    Failed(String),
    /// The core reported a gap: reconnect at once to learn what it holds.
    Resync(String),
}

impl Uploader {
    /// Loads (or creates) the edge's instance id and cursors, and marks the
    /// forwarded prefixes in the log, before anything is sent.
    pub async fn open(log: Log, config: UpstreamConfig) -> Result<Uploader, LogError> {
        let instance = match log.meta_get(META_SPACE, b"instance")? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.try_into().unwrap_or_default()),
            _ => {
                let id = fastrand::u64(1..);
                log.put_meta(
                    META_SPACE,
                    vec![(b"instance".to_vec(), Some(id.to_be_bytes().to_vec()))],
                )
                .await?;
                id
            }
        };
        let mut known = HashMap::new();
        for (k, v) in log.meta(META_SPACE)? {
            let (Some((topic, p)), Ok(b)) =
                (parse_cursor_key(&k), <[u8; 8]>::try_from(v.as_slice()))
            else {
                continue;
            };
            let prefix = u64::from_be_bytes(b);
            if log.mark_forwarded(&topic, p, prefix).is_ok() {
                let mut held = RangeSet::new();
                held.insert(0, prefix);
                known.insert(
                    (topic, p),
                    Known {
                        held,
                        persisted: prefix,
                    },
                );
            }
        }
        Ok(Uploader {
            inner: Arc::new(EdgeInner {
                log,
                config,
                instance,
                known: Mutex::new(known),
                acked: Mutex::new(HashMap::new()),
                samples: Mutex::new(VecDeque::new()),
                connected: AtomicBool::new(false),
                last_error: Mutex::new(None),
                blocked: Mutex::new(HashMap::new()),
                metrics: EdgeMetrics::default(),
            }),
        })
    }

    /// Runs the uploader until `shutdown`: connect, forward, reconnect.
    pub fn spawn(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let up = self.clone();
        tokio::spawn(async move { up.run(shutdown).await })
    }

    async fn run(self, shutdown: CancellationToken) {
        let c = &self.inner.config;
        let mut backoff = Backoff::new(c.min_backoff, c.max_backoff);
        let persister = {
            let up = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move { up.persist_loop(stop).await })
        };
        loop {
            let started = Instant::now();
            let end = self.session(&shutdown).await;
            self.inner.connected.store(false, Relaxed);
            let delay = match &end {
                End::Shutdown => break,
                End::Resync(why) => {
                    tracing::warn!(reason = %why, "sync: resynchronizing with the core");
                    Duration::ZERO
                }
                End::Failed(why) => {
                    // A link that worked for a while starts the backoff over.
                    if started.elapsed() > c.timeout * 2 {
                        backoff.reset();
                    }
                    let d = backoff.next_delay();
                    tracing::warn!(reason = %why, retry_in = ?d, "sync: link to the core lost");
                    d
                }
            };
            if let End::Failed(why) | End::Resync(why) = end {
                *lock(&self.inner.last_error) = Some(why);
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        let _ = persister.await;
        self.persist().await;
    }

    /// Writes changed forwarded prefixes to disk, and samples drain rates.
    async fn persist_loop(&self, shutdown: CancellationToken) {
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

    async fn persist(&self) {
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

    async fn session(&self, shutdown: &CancellationToken) -> End {
        let c = &self.inner.config;
        let connect = tokio::time::timeout(c.timeout, self.connect());
        let ws = tokio::select! {
            () = shutdown.cancelled() => return End::Shutdown,
            r = connect => match r {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => return End::Failed(e),
                Err(_) => return End::Failed("connecting timed out".into()),
            },
        };
        self.inner.metrics.connects.fetch_add(1, Relaxed);
        let (sink, stream) = ws.split();
        let mut link = Link {
            sink,
            timeout: c.timeout,
            wire_bytes: &self.inner.metrics.wire_bytes,
        };
        let hello = Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::VERSION,
            edge_id: c.edge_id.clone(),
            instance: self.inner.instance,
            token: c.token.clone(),
        };
        if let Err(e) = link.send(Frame::Hello(hello)).await.map(drop) {
            return End::Failed(e);
        }
        let (frames_tx, mut frames) = mpsc::channel(1024);
        let heard = Arc::new(AtomicU64::new(now_ms() as u64));
        let session_stop = shutdown.child_token();
        let reader = tokio::spawn(read_frames(
            stream,
            frames_tx,
            heard.clone(),
            session_stop.clone(),
        ));
        let welcome = tokio::select! {
            () = shutdown.cancelled() => { session_stop.cancel(); return End::Shutdown }
            f = tokio::time::timeout(c.timeout, frames.recv()) => f,
        };
        let end = match welcome {
            Ok(Some(Ok(Frame::Welcome(w)))) => {
                tracing::info!(version = w.version, url = %c.url, "sync: connected to the core");
                self.inner.connected.store(true, Relaxed);
                let mut s =
                    Session::new(self, link, w.max_batch_bytes as usize, session_stop.clone());
                s.run(&mut frames, &heard, shutdown).await
            }
            Ok(Some(Ok(Frame::Error(e)))) => End::Failed(self.error(&e)),
            Ok(Some(Ok(_))) => End::Failed("the core did not answer Hello with Welcome".into()),
            Ok(Some(Err(e))) => End::Failed(e),
            Ok(None) => End::Failed("the connection closed before Welcome".into()),
            Err(_) => End::Failed("no Welcome in time".into()),
        };
        session_stop.cancel();
        let _ = reader.await;
        self.inner.metrics.disconnects.fetch_add(1, Relaxed);
        end
    }

    fn error(&self, e: &ErrorFrame) -> String {
        *lock(&self.inner.metrics.errors)
            .entry(code::name(e.code))
            .or_insert(0) += 1;
        format!(
            "the core said {} ({}): {}",
            code::name(e.code),
            e.code,
            e.message
        )
    }

    async fn connect(&self) -> Result<WsStream, String> {
        let c = &self.inner.config;
        let target = parse_url(&c.url)?;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", target.host, target.port))?;
        let _ = tcp.set_nodelay(true);
        let stream = if target.tls {
            let config = client_tls(c).map_err(|e| format!("TLS setup: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("bad TLS server name {}: {e}", target.host))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with the core failed: {e}"))?;
            MaybeTls::Tls(Box::new(tls))
        } else {
            MaybeTls::Plain(tcp)
        };
        let mut ws_config = WebSocketConfig::default();
        ws_config.max_message_size = Some(64 << 20);
        ws_config.max_frame_size = Some(64 << 20);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(c.url.as_str(), stream, Some(ws_config))
                .await
                .map_err(|e| format!("WebSocket handshake with the core failed: {e}"))?;
        Ok(ws)
    }

    /// Is the link up?
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Relaxed)
    }

    fn note_ack(&self, topic: &str, partition: u32, from: u64, to: u64, events: u64) {
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

    /// Per forwarded topic: lag (events, estimated bytes, age of the oldest
    /// unforwarded event), drain rate and ETA.
    pub fn topic_lag(&self) -> Vec<TopicLag> {
        let c = &self.inner.config;
        let log = &self.inner.log;
        let known = lock(&self.inner.known).clone();
        let rates = self.rates();
        let now = now_ms();
        let mut out = Vec::new();
        for t in log.topics() {
            if c.priority(&t.config.name).is_none() {
                continue;
            }
            let mut lag = TopicLag {
                topic: t.config.name.clone(),
                ..TopicLag::default()
            };
            for p in &t.partitions {
                let held = known
                    .get(&(t.config.name.clone(), p.partition))
                    .map(|k| k.held.clone())
                    .unwrap_or_default();
                // Offsets below the start that the core lacks are lost, not lag.
                let missing = held.missing(p.start_offset, p.end_offset);
                let events: u64 = missing.iter().map(|(a, b)| b - a).sum();
                lag.events += events;
                let stored = p.end_offset - p.start_offset;
                if stored > 0 {
                    lag.bytes += (p.bytes as f64 * events as f64 / stored as f64) as u64;
                }
                if let Some(&(first, _)) = missing.first() {
                    if let Ok(r) = log.read(&t.config.name, p.partition, first, 1, 1) {
                        if let Some(rec) = r.records.first() {
                            let age = u64::try_from(now - rec.timestamp).unwrap_or(0);
                            lag.oldest_age_ms = lag.oldest_age_ms.max(age);
                        }
                    }
                }
                lag.forwarded_events += held.count_below(p.end_offset);
            }
            lag.rate = rates.get(&lag.topic).copied().unwrap_or(0.0);
            lag.eta_seconds = (lag.rate > 0.0).then(|| lag.events as f64 / lag.rate);
            out.push(lag);
        }
        out
    }

    fn rates(&self) -> HashMap<String, f64> {
        let s = lock(&self.inner.samples);
        let (Some((t0, a0)), Some((t1, a1))) = (s.front(), s.back()) else {
            return HashMap::new();
        };
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return HashMap::new();
        }
        a1.iter()
            .map(|(t, n)| {
                (
                    t.clone(),
                    (n - a0.get(t).copied().unwrap_or(0)) as f64 / secs,
                )
            })
            .collect()
    }

    /// `/v1/stats`'s `sync` section on an edge.
    pub fn stats(&self) -> serde_json::Value {
        let m = &self.inner.metrics;
        let topics: Vec<serde_json::Value> = self
            .topic_lag()
            .into_iter()
            .map(|l| {
                json!({
                    "topic": l.topic,
                    "lag_events": l.events,
                    "lag_bytes": l.bytes,
                    "oldest_unforwarded_age_ms": l.oldest_age_ms,
                    "forwarded_events": l.forwarded_events,
                    "drain_rate_events_per_second": l.rate,
                    "eta_seconds": l.eta_seconds,
                })
            })
            .collect();
        json!({
            "role": "edge",
            "upstream": self.inner.config.url,
            "edge_id": self.inner.config.edge_id,
            "connected": self.is_connected(),
            "last_error": lock(&self.inner.last_error).clone(),
            "blocked": lock(&self.inner.blocked)
                .iter()
                .map(|((t, p), (o, until, why))| json!({
                    "topic": t,
                    "partition": p,
                    "offset": o,
                    "reason": why,
                    "retry_in_seconds": until.saturating_duration_since(Instant::now()).as_secs(),
                }))
                .collect::<Vec<_>>(),
            "sent_events": m.sent_events.load(Relaxed),
            "acked_events": m.acked_events.load(Relaxed),
            "skipped_events": m.skipped_events.load(Relaxed),
            "raw_bytes": m.raw_bytes.load(Relaxed),
            "wire_bytes": m.wire_bytes.load(Relaxed),
            "topics": topics,
        })
    }

    /// Appends the edge's Prometheus metrics (labelled by topic name, never
    /// by key or device).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::Kind::{Counter, Gauge};
        let m = &self.inner.metrics;
        crate::metrics::render(
            out,
            &[
                (Gauge, "tributary_sync_connected", "1 while the link to the core is up.", u64::from(self.is_connected())),
                (Counter, "tributary_sync_connects_total", "Links to the core established (TCP, TLS, WebSocket).", m.connects.load(Relaxed)),
                (Counter, "tributary_sync_disconnects_total", "Links to the core lost or closed.", m.disconnects.load(Relaxed)),
                (Counter, "tributary_sync_sent_batches_total", "Batches sent to the core.", m.batches.load(Relaxed)),
                (Counter, "tributary_sync_sent_events_total", "Events sent to the core (resends after a reconnect included).", m.sent_events.load(Relaxed)),
                (Counter, "tributary_sync_acked_events_total", "Events the core acknowledged as durable.", m.acked_events.load(Relaxed)),
                (Counter, "tributary_sync_skipped_events_total", "Events lost before forwarding (evicted by the disk quota) and reported to the core as a gap.", m.skipped_events.load(Relaxed)),
                (Counter, "tributary_sync_raw_bytes_total", "Record bytes sent, before compression.", m.raw_bytes.load(Relaxed)),
                (Counter, "tributary_sync_wire_bytes_total", "Bytes of sync frames sent, after compression.", m.wire_bytes.load(Relaxed)),
            ],
        );
        crate::metrics::render_by_code(
            out,
            "tributary_sync_errors_total",
            "Errors the core reported, by code.",
            &lock(&m.errors),
        );
        let lags = self.topic_lag();
        let family = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&TopicLag) -> String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for l in &lags {
                let _ = writeln!(out, "{name}{{topic=\"{}\"}} {}", l.topic, f(l));
            }
        };
        family(
            out,
            "tributary_sync_lag_events",
            "Events of the topic the core does not hold yet.",
            &|l| l.events.to_string(),
        );
        family(
            out,
            "tributary_sync_lag_bytes",
            "Stored bytes of those events (estimated from the partitions' average).",
            &|l| l.bytes.to_string(),
        );
        family(
            out,
            "tributary_sync_oldest_unforwarded_age_seconds",
            "Age of the oldest event the core does not hold yet.",
            &|l| format!("{:.3}", l.oldest_age_ms as f64 / 1000.0),
        );
        family(
            out,
            "tributary_sync_drain_rate_events_per_second",
            "Events acknowledged per second over the last 10 s.",
            &|l| format!("{:.1}", l.rate),
        );
        family(
            out,
            "tributary_sync_eta_seconds",
            "Lag divided by the drain rate (-1: not draining).",
            &|l| format!("{:.1}", l.eta_seconds.unwrap_or(-1.0)),
        );
    }
}

/// The lag of one forwarded topic.
#[derive(Debug, Clone, Default)]
pub struct TopicLag {
    /// Topic.
    pub topic: String,
    /// Events the core does not hold yet.
    pub events: u64,
    /// Their stored bytes (estimated).
    pub bytes: u64,
    /// Age of the oldest of them (ms).
    pub oldest_age_ms: u64,
    /// Events the core holds.
    pub forwarded_events: u64,
    /// Acknowledged events per second lately.
    pub rate: f64,
    /// `events / rate`, when draining.
    pub eta_seconds: Option<f64>,
}

fn client_tls(c: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &c.ca {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("{}: {e}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// A plain or TLS stream under the WebSocket.
enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<MaybeTls>;

/// The writing half of a link, with a deadline on every write.
struct Link<'a> {
    sink: futures_util::stream::SplitSink<WsStream, Message>,
    timeout: Duration,
    wire_bytes: &'a AtomicU64,
}

impl Link<'_> {
    /// Sends a frame; returns its size on the wire.
    async fn send(&mut self, f: Frame) -> Result<usize, String> {
        let bytes = f.encode();
        let n = bytes.len();
        self.wire_bytes.fetch_add(n as u64, Relaxed);
        self.write(Message::Binary(bytes.into())).await?;
        Ok(n)
    }

    async fn write(&mut self, m: Message) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.sink.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("writing to the core failed: {e}")),
            Err(_) => Err(format!(
                "a write to the core did not complete in {:?} (half-open link?)",
                self.timeout
            )),
        }
    }
}

/// Reads frames until the link ends; every message counts as heard.
async fn read_frames(
    mut stream: futures_util::stream::SplitStream<WsStream>,
    tx: mpsc::Sender<Result<Frame, String>>,
    heard: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            m = stream.next() => m,
        };
        heard.store(now_ms() as u64, Relaxed);
        let frame = match msg {
            Some(Ok(Message::Binary(b))) => {
                Frame::decode(&b).map_err(|e| format!("bad frame from the core: {e}"))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(_))) => Err("the core sent a text message".into()),
            Some(Ok(Message::Close(c))) => Err(format!("the core closed the link: {c:?}")),
            Some(Err(e)) => Err(format!("reading from the core failed: {e}")),
            None => Err("the core closed the link".into()),
        };
        let last = frame.is_err();
        // The session may be gone and its queue full: never wait past `stop`.
        tokio::select! {
            () = stop.cancelled() => return,
            sent = tx.send(frame) => if sent.is_err() || last { return },
        }
    }
}

/// One lane of one partition: sends `[next, limit)` minus what the core holds.
#[derive(Debug, Clone)]
struct Lane {
    next: u64,
    limit: u64,
    /// The first batch opens a new held range at the core.
    opens: bool,
    live: bool,
    /// When data first waited for a live batch to fill.
    waiting_since: Option<Instant>,
}

struct Part {
    topic: Arc<str>,
    partition: u32,
    priority: i32,
    lanes: Vec<Lane>,
    /// What the core holds, as far as this connection knows.
    held: RangeSet,
}

struct InFlight {
    topic: Arc<str>,
    partition: u32,
    from: u64,
    to: u64,
    bytes: usize,
    events: u64,
}

struct Session<'a> {
    up: &'a Uploader,
    link: Link<'a>,
    max_batch_bytes: usize,
    parts: Vec<Part>,
    /// Topics opened or being opened on this connection.
    opening: HashMap<String, bool>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    wake: Arc<Notify>,
    stop: CancellationToken,
    /// Bandwidth tokens (bytes; negative: in debt).
    tokens: f64,
    refilled: Instant,
    rr: usize,
}

impl<'a> Session<'a> {
    fn new(
        up: &'a Uploader,
        link: Link<'a>,
        max_batch_bytes: usize,
        stop: CancellationToken,
    ) -> Self {
        Session {
            up,
            link,
            max_batch_bytes,
            parts: Vec::new(),
            opening: HashMap::new(),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            wake: Arc::new(Notify::new()),
            stop,
            tokens: 0.0,
            refilled: Instant::now(),
            rr: 0,
        }
    }

    fn config(&self) -> &UpstreamConfig {
        &self.up.inner.config
    }

    async fn run(
        &mut self,
        frames: &mut mpsc::Receiver<Result<Frame, String>>,
        heard: &AtomicU64,
        shutdown: &CancellationToken,
    ) -> End {
        let log = self.up.inner.log.clone();
        let mut topics_rx = log.watch_topics();
        let mut ping = tokio::time::interval(self.config().heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Err(e) = self.open_new_topics().await {
            return End::Failed(e);
        }
        loop {
            if let Err(e) = self.fill().await {
                return End::Failed(e);
            }
            let timer = self.next_timer();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = self.link.write(Message::Close(None)).await;
                    return End::Shutdown;
                }
                f = frames.recv() => match f {
                    Some(Ok(frame)) => if let Err(end) = self.handle(frame).await { return end },
                    Some(Err(e)) => return End::Failed(e),
                    None => return End::Failed("the link ended".into()),
                },
                () = self.wake.notified() => {}
                r = topics_rx.changed() => {
                    if r.is_ok() {
                        if let Err(e) = self.open_new_topics().await { return End::Failed(e) }
                    }
                }
                _ = ping.tick() => {
                    let silent = (now_ms() as u64).saturating_sub(heard.load(Relaxed));
                    if silent > self.config().timeout.as_millis() as u64 {
                        return End::Failed(format!("nothing heard from the core for {silent} ms (half-open link?)"));
                    }
                    if let Err(e) = self.link.write(Message::Ping(Vec::new().into())).await {
                        return End::Failed(e);
                    }
                }
                () = sleep_opt(timer) => {}
            }
        }
    }

    async fn open_new_topics(&mut self) -> Result<(), String> {
        let up = self.up;
        for t in up.inner.log.topics() {
            let name = t.config.name;
            if up.inner.config.priority(&name).is_none() || self.opening.contains_key(&name) {
                continue;
            }
            self.opening.insert(name.clone(), false);
            let open = Open {
                topic: name,
                partitions: t.config.partitions,
            };
            self.link.send(Frame::Open(open)).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), End> {
        match frame {
            Frame::Opened(o) => self.opened(o).map_err(End::Failed),
            Frame::Ack(a) => {
                let Some(i) = self.in_flight.iter().position(|f| {
                    *f.topic == *a.topic
                        && f.partition == a.partition
                        && f.from == a.base_offset
                        && f.to == a.next_offset
                }) else {
                    return Err(End::Failed(format!(
                        "the core acknowledged {}/{} {}..{}, which is not in flight",
                        a.topic, a.partition, a.base_offset, a.next_offset
                    )));
                };
                let Some(f) = self.in_flight.remove(i) else {
                    return Ok(());
                };
                self.in_flight_bytes -= f.bytes;
                if let Some(p) = self
                    .parts
                    .iter_mut()
                    .find(|p| *p.topic == *f.topic && p.partition == f.partition)
                {
                    p.held.insert(f.from, f.to);
                }
                self.up
                    .note_ack(&f.topic, f.partition, f.from, f.to, f.events);
                Ok(())
            }
            Frame::Error(e) => {
                let msg = self.up.error(&e);
                match (e.code, &e.topic) {
                    (code::FORBIDDEN | code::UNKNOWN_TOPIC, Some(t))
                        if self.opening.get(t) == Some(&false) =>
                    {
                        // Refused alone: the others go on; retried on the next connection.
                        tracing::warn!(topic = %t, "{msg}");
                        Ok(())
                    }
                    (code::GAP, _) => Err(End::Resync(msg)),
                    (code::TOO_LARGE, Some(t)) => {
                        // One record the core cannot store: the next
                        // connection forwards around it (see `opened`).
                        if let (Some(p), Some(o)) = (e.partition, e.expected) {
                            let until = Instant::now() + BLOCK_RETRY;
                            lock(&self.up.inner.blocked)
                                .insert((t.clone(), p), (o, until, e.message.clone()));
                            tracing::warn!(topic = %t, partition = p, offset = o, "sync: the core refuses a record as too large; forwarding around it, retrying in {BLOCK_RETRY:?}");
                        }
                        Err(End::Failed(msg))
                    }
                    _ => Err(End::Failed(msg)),
                }
            }
            other => Err(End::Failed(
                format!("unexpected frame from the core: {other:?}")
                    .chars()
                    .take(200)
                    .collect(),
            )),
        }
    }

    fn opened(&mut self, o: Opened) -> Result<(), String> {
        let up = self.up;
        let log = &up.inner.log;
        let live_first = up.inner.config.live_first;
        let Some(priority) = up.inner.config.priority(&o.topic) else {
            return Ok(());
        };
        if self.opening.get(&o.topic) != Some(&false) {
            return Err(format!("the core opened {} twice or unasked", o.topic));
        }
        self.opening.insert(o.topic.clone(), true);
        let topic: Arc<str> = o.topic.as_str().into();
        for (p, ranges) in o.held.into_iter().enumerate() {
            let partition = p as u32;
            let held = RangeSet::from_ranges(ranges);
            let (start, end) = log
                .offsets(&o.topic, partition)
                .map_err(|e| e.to_string())?;
            if held.ranges().last().is_some_and(|&(_, e)| e > end) {
                return Err(format!(
                    "the core holds offsets of {}/{partition} beyond this edge's end {end}; is its data directory the one the core knows?",
                    o.topic
                ));
            }
            {
                let mut known = lock(&self.up.inner.known);
                let k = known.entry((o.topic.clone(), partition)).or_default();
                k.held = held.clone();
            }
            let _ = log.mark_forwarded(&o.topic, partition, held.prefix());
            let first = held.next_missing(0);
            let lanes = if first >= end {
                vec![Lane {
                    next: first,
                    limit: u64::MAX,
                    opens: false,
                    live: true,
                    waiting_since: None,
                }]
            } else if live_first && held.len() < MAX_RANGES / 2 && end > first {
                vec![
                    Lane {
                        next: end,
                        limit: u64::MAX,
                        opens: !held.continues_at(end),
                        live: true,
                        waiting_since: None,
                    },
                    Lane {
                        next: first,
                        limit: end,
                        opens: false,
                        live: false,
                        waiting_since: None,
                    },
                ]
            } else {
                vec![Lane {
                    next: first,
                    limit: u64::MAX,
                    opens: false,
                    live: false,
                    waiting_since: None,
                }]
            };
            let block = {
                let mut b = lock(&up.inner.blocked);
                b.retain(|_, (_, until, _)| *until > Instant::now());
                b.get(&(o.topic.clone(), partition)).map(|&(off, ..)| off)
            };
            let lanes = match block {
                Some(off) => around(lanes, off, &held),
                None => lanes,
            };
            tracing::debug!(topic = %o.topic, partition, start, end, ?held, "sync: partition opened");
            // Wake the session whenever the partition grows.
            if let Ok(mut rx) = log.watch_end(&o.topic, partition) {
                let (wake, stop) = (self.wake.clone(), self.stop.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            r = rx.changed() => if r.is_err() { return },
                        }
                        wake.notify_one();
                    }
                });
            }
            self.parts.push(Part {
                topic: topic.clone(),
                partition,
                priority,
                lanes,
                held,
            });
        }
        // Higher priority first; the scheduler walks this order per lane class.
        self.parts.sort_by_key(|p| std::cmp::Reverse(p.priority));
        Ok(())
    }

    /// When the session must look again without a frame or new data: a
    /// lingering live batch, or bandwidth debt paid off.
    fn next_timer(&self) -> Option<tokio::time::Instant> {
        // A full window waits for Acks (they wake the session), bandwidth
        // debt for its payoff; only with room and tokens does a lingering
        // batch's deadline matter. Otherwise a past deadline would spin.
        if self.window_full() {
            return None;
        }
        let debt = (self.tokens < 0.0 && self.config().max_bytes_per_sec > 0).then(|| {
            Instant::now()
                + Duration::from_secs_f64(-self.tokens / self.config().max_bytes_per_sec as f64)
        });
        if let Some(d) = debt {
            return Some(d.into());
        }
        let linger = self
            .parts
            .iter()
            .flat_map(|p| &p.lanes)
            .filter_map(|l| l.waiting_since)
            .min()
            .map(|t| t + self.config().linger);
        linger.map(Into::into)
    }

    /// No room for another batch until an Ack comes.
    fn window_full(&self) -> bool {
        let c = self.config();
        let batch = c.batch_max_bytes.min(self.max_batch_bytes);
        self.in_flight.len() >= c.window_batches
            || (!self.in_flight.is_empty() && self.in_flight_bytes + batch > c.window_bytes)
    }

    fn refill(&mut self) -> bool {
        let rate = self.config().max_bytes_per_sec;
        if rate == 0 {
            return true;
        }
        let now = Instant::now();
        let burst = (rate as f64).max(self.config().batch_max_bytes as f64);
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate as f64)
            .min(burst);
        self.refilled = now;
        self.tokens >= 0.0
    }

    /// Sends batches while the window and the bandwidth allow: live lanes
    /// first, then backlog lanes; within each, by topic priority, round-robin
    /// among equals.
    async fn fill(&mut self) -> Result<(), String> {
        loop {
            if self.window_full() || self.stop.is_cancelled() {
                return Ok(());
            }
            if !self.refill() {
                return Ok(());
            }
            let Some((pi, li)) = self.pick() else {
                return Ok(());
            };
            self.send_from(pi, li).await?;
        }
    }

    /// The next lane with something to send now.
    fn pick(&mut self) -> Option<(usize, usize)> {
        let up = self.up;
        let log = &up.inner.log;
        let linger = up.inner.config.linger;
        let full = up.inner.config.batch_max_records as u64;
        let n = self.parts.len();
        for live in [true, false] {
            let mut best: Option<(i32, usize, usize)> = None;
            for k in 0..n {
                let pi = (self.rr + k) % n;
                let p = &mut self.parts[pi];
                let Ok((_, end)) = log.offsets(&p.topic, p.partition) else {
                    continue;
                };
                for (li, lane) in p.lanes.iter_mut().enumerate() {
                    if lane.live != live {
                        continue;
                    }
                    let from = p.held.next_missing(lane.next);
                    let limit = lane.limit.min(end);
                    if from >= limit {
                        lane.waiting_since = None;
                        continue;
                    }
                    // The tail lane waits up to `linger` for a batch to fill up.
                    if lane.limit == u64::MAX && limit - from < full {
                        let since = *lane.waiting_since.get_or_insert_with(Instant::now);
                        if since.elapsed() < linger {
                            continue;
                        }
                    }
                    if best.is_none_or(|(prio, ..)| p.priority > prio) {
                        best = Some((p.priority, pi, li));
                    }
                }
            }
            if let Some((_, pi, li)) = best {
                self.rr = (pi + 1) % n.max(1);
                return Some((pi, li));
            }
        }
        None
    }

    async fn send_from(&mut self, pi: usize, li: usize) -> Result<(), String> {
        let inner = &self.up.inner;
        let c = &inner.config;
        let log = &inner.log;
        let p = &mut self.parts[pi];
        let (start, end) = log
            .offsets(&p.topic, p.partition)
            .map_err(|e| e.to_string())?;
        let lane = &mut p.lanes[li];
        lane.waiting_since = None;
        let from = p.held.next_missing(lane.next);
        // Up to the next held range, the lane's limit and the partition's end.
        let hole_end = p
            .held
            .missing(from, lane.limit.min(end))
            .first()
            .map_or(from, |&(_, e)| e);
        let topic = p.topic.clone();
        let partition = p.partition;
        if from < start && lane.opens {
            // A lane not yet opened at the core whose start was evicted:
            // open it further on; the hole is the next connection's backlog.
            lane.next = start;
            return Ok(());
        }
        if from < start {
            // Evicted before it could be forwarded: tell the core, so the gap is on record.
            let to = start.min(hole_end);
            lane.next = to;
            tracing::warn!(%topic, partition, from, to, "sync: events were evicted before they were forwarded");
            inner.metrics.skipped_events.fetch_add(to - from, Relaxed);
            self.in_flight.push_back(InFlight {
                topic: topic.clone(),
                partition,
                from,
                to,
                bytes: 0,
                events: 0,
            });
            let skip = Skip {
                topic: topic.to_string(),
                partition,
                from,
                to,
            };
            return self.link.send(Frame::Skip(skip)).await.map(drop);
        }
        let max_bytes = c.batch_max_bytes.min(self.max_batch_bytes);
        let want = (hole_end - from).min(c.batch_max_records as u64) as usize;
        let read = match log.read(&topic, partition, from, want, max_bytes / 2) {
            Ok(r) => r,
            // Retention or the quota moved the start meanwhile: the next round skips.
            Err(LogError::OffsetOutOfRange { .. }) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let mut raw = Vec::with_capacity(max_bytes.min(1 << 20));
        let mut count = 0u32;
        for r in &read.records {
            if r.offset >= hole_end || (count > 0 && raw.len() + wire::encoded_len(r) > max_bytes) {
                break;
            }
            wire::encode_records(std::iter::once(r), &mut raw);
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        let opens = std::mem::take(&mut lane.opens);
        let to = from + u64::from(count);
        lane.next = to;
        let raw_len = raw.len();
        let (compression, records) = if c.compression_level > 0 {
            wire::compress(raw, c.compression_level)
        } else {
            (wire::Compression::None, raw)
        };
        let batch = Batch {
            topic: topic.to_string(),
            partition,
            base_offset: from,
            count,
            new_lane: opens,
            edge_end: end,
            compression,
            raw_len: u32::try_from(raw_len).unwrap_or(u32::MAX),
            records,
        };
        let m = &inner.metrics;
        m.batches.fetch_add(1, Relaxed);
        m.sent_events.fetch_add(u64::from(count), Relaxed);
        m.raw_bytes.fetch_add(raw_len as u64, Relaxed);
        self.in_flight.push_back(InFlight {
            topic,
            partition,
            from,
            to,
            bytes: raw_len,
            events: u64::from(count),
        });
        self.in_flight_bytes += raw_len;
        let sent = self.link.send(Frame::Batch(batch)).await?;
        if c.max_bytes_per_sec > 0 {
            self.tokens -= sent as f64;
        }
        Ok(())
    }
}

/// A refused record: its offset, when to offer it again, the core's reason.
type Blocked = (u64, Instant, String);

/// How long a record the core refused as too large is gone around before
/// it is offered again (the core's limit may have been raised meanwhile).
const BLOCK_RETRY: Duration = Duration::from_secs(600);

/// Splits the lanes that would send offset `off` so that they stop before
/// it and go on after it: one record waits, its partition does not. When the
/// core's ranges leave no room for one more, the lane just stops there.
fn around(lanes: Vec<Lane>, off: u64, held: &RangeSet) -> Vec<Lane> {
    let mut out = Vec::with_capacity(lanes.len() + 1);
    for lane in lanes {
        if off < lane.next || off >= lane.limit {
            out.push(lane);
            continue;
        }
        let after = off + 1;
        let room = held.len() + out.len() + 2 < MAX_RANGES;
        out.push(Lane {
            limit: off,
            ..lane.clone()
        });
        if room && after < lane.limit {
            // The part after it keeps the lane's class (a tail stays live).
            out.push(Lane {
                next: after,
                opens: !held.continues_at(after),
                waiting_since: None,
                ..lane
            });
        }
    }
    out
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(next: u64, limit: u64, live: bool) -> Lane {
        Lane {
            next,
            limit,
            opens: false,
            live,
            waiting_since: None,
        }
    }

    #[test]
    fn lanes_go_around_a_refused_record() {
        let held = RangeSet::from_ranges([(0, 3)]);
        // A backlog lane over the record splits around it; the part after
        // it opens a new range at the core. A live lane above it is untouched.
        let out = around(
            vec![lane(100, u64::MAX, true), lane(3, 100, false)],
            10,
            &held,
        );
        let spans: Vec<(u64, u64, bool, bool)> = out
            .iter()
            .map(|l| (l.next, l.limit, l.opens, l.live))
            .collect();
        assert_eq!(
            spans,
            [
                (100, u64::MAX, false, true),
                (3, 10, false, false),
                (11, 100, true, false)
            ]
        );
        // A tail lane stays a tail after the record.
        let out = around(vec![lane(3, u64::MAX, true)], 3, &held);
        let spans: Vec<(u64, u64, bool, bool)> = out
            .iter()
            .map(|l| (l.next, l.limit, l.opens, l.live))
            .collect();
        assert_eq!(spans, [(3, 3, false, true), (4, u64::MAX, true, true)]);
        // No room for another range at the core: the lane stops at the record.
        let crowded =
            RangeSet::from_ranges((0..MAX_RANGES as u64 - 2).map(|i| (i * 10, i * 10 + 1)));
        let out = around(vec![lane(500, u64::MAX, true)], 600, &crowded);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].limit, 600);
    }
}
