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
//!
//! ## Where things live
//! - this file: the [`Uploader`] handle, its settings ([`UpstreamConfig`],
//!   [`TopicRule`]), its state, opening it and the reconnect loop.
//! - `cursors`: what the edge knows the core holds, per partition: the
//!   forwarded prefixes, written to the metadata and marked in the log.
//! - `link`: connecting (TCP, TLS, WebSocket), the Hello/Welcome handshake,
//!   writes with a deadline and the reader task.
//! - `session`: one connection's session: its event loop (frames, new data,
//!   new topics, heartbeats), opening topics, Acks and the core's errors.
//! - `lanes`: the lanes each opened partition gets (live first, around
//!   refused records) and the scheduler that fills the window from them:
//!   priorities, window, bandwidth cap, linger, batches and skips.
//! - `stats`: counters, lag per topic ([`TopicLag`]), `/v1/stats` and the
//!   Prometheus metrics.

mod cursors;
mod lanes;
mod link;
pub use link::client_config;
mod session;
mod stats;

pub use stats::TopicLag;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tributary_storage::Log;

use crate::backoff::Backoff;
use crate::ranges::RangeSet;
use crate::Error;
use cursors::{parse_cursor_key, Known};
use lanes::Blocked;
use link::parse_url;
use stats::EdgeMetrics;

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
    /// The core's sync endpoints, `ws://host:port/v1/sync` or
    /// `wss://host:port/v1/sync`: the nodes of one core cluster. The edge
    /// links to one at a time and, when a link fails, tries the next after
    /// the reconnect backoff.
    pub urls: Vec<String>,
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
            urls: Vec::new(),
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
        if self.urls.is_empty() {
            errors.push("`upstream.url` (or `upstream.urls`) names no core".into());
        }
        for url in &self.urls {
            if let Err(e) = parse_url(url) {
                errors.push(format!("`upstream.url`: {e}"));
            }
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

use tributary_storage::util::{lock, now_ms};

struct EdgeInner {
    log: Log,
    config: UpstreamConfig,
    instance: u64,
    known: Mutex<HashMap<(String, u32), Known>>,
    /// Acked events per topic, sampled for the drain rate.
    acked: Mutex<HashMap<String, u64>>,
    samples: Mutex<VecDeque<(Instant, HashMap<String, u64>)>>,
    connected: AtomicBool,
    /// Which of `config.urls` the link uses (or tries) now.
    target: AtomicUsize,
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
    Failed(Error),
    /// The core reported a gap: reconnect at once to learn what it holds.
    Resync(Error),
}

impl Uploader {
    /// Loads (or creates) the edge's instance id and cursors, and marks the
    /// forwarded prefixes in the log, before anything is sent.
    pub async fn open(log: Log, config: UpstreamConfig) -> Result<Uploader, Error> {
        let instance = match log
            .meta_get(META_SPACE, b"instance")
            .map_err(Error::Storage)?
        {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.try_into().unwrap_or_default()),
            _ => {
                let id = fastrand::u64(1..);
                log.put_meta(
                    META_SPACE,
                    vec![(b"instance".to_vec(), Some(id.to_be_bytes().to_vec()))],
                )
                .await
                .map_err(Error::Storage)?;
                id
            }
        };
        let mut known = HashMap::new();
        for (k, v) in log.meta(META_SPACE).map_err(Error::Storage)? {
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
                target: AtomicUsize::new(0),
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
                    let failed = self.url().to_owned();
                    // The next core of the cluster, if there are several.
                    self.inner.target.fetch_add(1, Relaxed);
                    tracing::warn!(reason = %why, url = %failed, retry_in = ?d, next = %self.url(), "sync: link to the core lost");
                    d
                }
            };
            if let End::Failed(why) | End::Resync(why) = end {
                *lock(&self.inner.last_error) = Some(why.to_string());
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        let _ = persister.await;
        self.persist().await;
    }

    /// The core URL the link uses now, or tries next.
    pub fn url(&self) -> &str {
        let urls = &self.inner.config.urls;
        match urls.len() {
            0 => "",
            n => &urls[self.inner.target.load(Relaxed) % n],
        }
    }

    /// Is the link up?
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Relaxed)
    }
}
