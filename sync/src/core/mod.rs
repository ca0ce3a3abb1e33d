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
//!
//! ## Where things live
//! - this file: the [`SyncCore`] handle, its settings ([`CoreConfig`]), the
//!   types its public API takes and answers with ([`SyncPeer`],
//!   [`EdgeStream`], [`OnMessage`]; its errors are [`crate::Error`]), the
//!   limits, and the per-edge state it keeps in memory (held ranges per
//!   stream).
//! - `recovery`: the checkpoints in the log's metadata (keys and format) and
//!   [`SyncCore::open`]: loading them and completing them from the log.
//! - `connection`: [`SyncCore::serve`]: one edge's connection, from its
//!   Hello, login and takeover through the read loop and opening topics, and
//!   the writer task.
//! - `appender`: a connection's batches from decoding to acknowledgement:
//!   the append rounds that dedup against the held ranges, append, and
//!   checkpoint.
//! - `stats`: counters, `/v1/stats` and the Prometheus metrics.
//!
//! [`HEADER_EDGE`]: crate::wire::HEADER_EDGE
//! [`HEADER_PARTITION`]: crate::wire::HEADER_PARTITION
//! [`HEADER_OFFSET`]: crate::wire::HEADER_OFFSET

mod appender;
mod connection;
mod recovery;
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::WebSocket;
use tokio_util::sync::CancellationToken;
use tributary_devices::auth::Authenticator;
use tributary_storage::{Guard, Log};

use crate::ranges::RangeSet;
use crate::wire::{code, ErrorFrame};
use stats::CoreMetrics;

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
    /// The claim of the connection taking the edge's writes.
    claim: Option<Guard>,
}

#[derive(Debug, Default)]
struct EdgeSlot {
    /// Held by the edge's one connection for its whole life.
    conn: Arc<tokio::sync::Mutex<()>>,
    /// Cancels the connection holding `conn` (a newer one takes over).
    kick: Mutex<CancellationToken>,
    state: Mutex<EdgeState>,
}

struct CoreInner {
    log: Log,
    auth: Arc<dyn Authenticator>,
    config: CoreConfig,
    edges: Mutex<HashMap<String, Arc<EdgeSlot>>>,
    metrics: CoreMetrics,
    /// This process's part of every claim it takes.
    claim_prefix: Vec<u8>,
    /// Claims taken (the other part).
    claims: std::sync::atomic::AtomicU64,
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

use tributary_storage::util::{lock, now_ms};

/// Edge ids: 1..=128 of `[A-Za-z0-9._-]`.
pub fn valid_edge_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

/// A write refused: a newer connection of the edge (on this node or
/// another of the cluster) claimed its streams, or the log failed.
fn write_error(e: tributary_storage::Error) -> ErrorFrame {
    match e {
        tributary_storage::Error::Superseded(_) => superseded(),
        e => storage_error(e),
    }
}

fn superseded() -> ErrorFrame {
    ErrorFrame::new(
        code::REPLACED,
        "a newer connection of this edge took over (here or on another node of the cluster)",
    )
}
