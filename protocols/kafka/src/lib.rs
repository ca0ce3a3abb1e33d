//! Kafka wire-protocol front end: Kafka clients (librdkafka and everything
//! built on it, the Java client, kafka-python, kafkajs, kcat) produce to and
//! fetch from the log unchanged. The [`Server`] holds what every connection
//! shares and is served by the one accept loop
//! ([`tributary_frontend::serve()`]); a connection per client answers its
//! requests in order (`conn`).
//!
//! - Requests are framed by a 4-byte size, checked against
//!   `kafka.max_request_bytes` and reserved from the node's memory budget
//!   before a byte of the body is buffered; a malformed request, an unknown
//!   API key or an API this node does not serve closes the connection (counted
//!   by reason), as Apache Kafka does.
//! - Produce appends through the one write path (`tributary-ingest`); an
//!   acknowledgement (acks 1 or -1) goes out only once the log says durable;
//!   acks 0 gets no answer, as the protocol says. Records keep their key,
//!   value, headers and timestamp byte for byte ([`codec`]).
//! - Fetch long-polls the log (max_wait, min_bytes, partition and response
//!   max_bytes); ListOffsets answers earliest and latest; Metadata names
//!   this node as the leader of every partition (on a cluster: every node
//!   a broker, the Raft leader leading, [`brokers`]), and creates a topic a
//!   client asks for when the node creates topics on first use.
//! - Consumer groups (`groups`): Kafka's classic group protocol over the
//!   node's one coordinator (`tributary-groups`), offsets shared with the
//!   HTTP API.
//! - Idempotent producers: InitProducerId hands out producer ids; a produce
//!   batch carrying one is checked against its sequence by the log, in the
//!   order the connection sent it (`tributary_ingest::Turn`), so a retried
//!   batch is stored once, also across a restart of the node.
//! - SASL PLAIN (`sasl`): device id and token, as every other protocol logs
//!   in; without it (or a client certificate) a node that requires
//!   credentials answers only ApiVersions and SASL.
//! - The admin APIs (`admin`): CreateTopics, DeleteTopics,
//!   CreatePartitions, DescribeConfigs, AlterConfigs and
//!   IncrementalAlterConfigs over the log's topic operations, Kafka's config
//!   names mapped to ours.
//! - Transactions (`txn`): the coordinator of Kafka's transaction protocol,
//!   its state durable in the log's metadata; on a cluster it runs on the
//!   leader, one term at a time, its writes fenced by a claim.

mod admin;
pub mod brokers;
pub mod codec;
mod conn;
mod groups;
mod handlers;
mod sasl;
mod txn;

pub use handlers::{parse, Parsed, Request};
mod refusal;
pub mod versions;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tributary_frontend::listener::{ConnectionStats, ListenerSet};
use tributary_frontend::metrics::Kind;
use tributary_frontend::tls::MaybeTls;
use tributary_frontend::{
    AckHistogram, Frontend, FrontendContext, MetricsSource, Peer, Reasons, Text,
};

pub use refusal::Refusal;

/// Kafka front-end settings (`[kafka]`).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Largest request accepted, bytes (its size prefix is checked before
    /// the body is read).
    pub max_request_bytes: usize,
    /// Host named in Metadata answers; `None`: the address the client
    /// connected to.
    pub advertised_host: Option<String>,
    /// Requests one connection may have in progress (Kafka clients pipeline:
    /// librdkafka sends up to `max.in.flight` produce requests).
    pub max_in_flight: usize,
    /// Longest a fetch waits for records, whatever the client asks.
    pub max_fetch_wait_ms: u64,
    /// Largest fetch answer, bytes, whatever the client asks; reserved from
    /// the node's memory budget while the answer is read and sent.
    pub max_fetch_bytes: usize,
    /// Transactional ids the coordinator keeps at most (each holds its
    /// producer id, epoch and current transaction in memory); a new one
    /// beyond is refused until idle ones expire.
    pub max_transactional_ids: usize,
    /// An idle transactional id (no transaction open) is forgotten after
    /// this long (Kafka's `transactional.id.expiration.ms`).
    pub transactional_id_expiration_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            max_request_bytes: 16 << 20,
            advertised_host: None,
            max_in_flight: 16,
            max_fetch_wait_ms: 30_000,
            max_fetch_bytes: 4 << 20,
            max_transactional_ids: 10_000,
            transactional_id_expiration_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// Why the Kafka front end failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a v2 record batch, a bad CRC, truncated, or a codec error.
    #[error("corrupt record batch: {0}")]
    CorruptBatch(String),
    /// A batch decompresses to more than [`codec::MAX_DECOMPRESSED`].
    #[error(
        "a record batch decompresses to more than {} bytes",
        codec::MAX_DECOMPRESSED
    )]
    BatchTooLarge,
    /// A control batch from a client (only the coordinator writes markers).
    #[error("control batches are written by the transaction coordinator, not by clients")]
    Transactional,
    /// A request that does not decode.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A response that could not be encoded (a bug).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Kafka counters for `/metrics`.
#[derive(Debug, Default)]
pub struct KafkaMetrics {
    requests: [AtomicU64; 6],
    produced: AtomicU64,
    fetched: AtomicU64,
    acks: AckHistogram,
    rejections: Reasons<Refusal>,
    connections: ListenerSet,
}

/// The request kinds counted apart in `tributary_kafka_requests_total`.
#[derive(Debug, Clone, Copy)]
enum Api {
    Produce = 0,
    Fetch = 1,
    Metadata = 2,
    Group = 3,
    Other = 4,
    Admin = 5,
}

impl KafkaMetrics {
    /// Counts a refusal and logs it, in one call.
    pub fn refuse(&self, why: Refusal) {
        self.rejections.record(why);
    }

    /// [`Self::refuse`], logging what went wrong too.
    pub fn refuse_with(&self, why: Refusal, detail: &dyn std::fmt::Display) {
        self.rejections.record_with(why, detail);
    }

    /// Refusals so far for `reason` (tests read this).
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections.get(reason)
    }

    /// Kafka connections open now.
    pub fn open_connections(&self) -> u64 {
        self.connections.open()
    }

    fn request(&self, api: Api) {
        self.requests[api as usize].fetch_add(1, Relaxed);
    }
}

impl MetricsSource for KafkaMetrics {
    fn render(&self, out: &mut Text) {
        out.gauge(
            "tributary_kafka_connections",
            "Open Kafka connections.",
            self.connections.open(),
        );
        out.counter(
            "tributary_kafka_connections_accepted_total",
            "Kafka connections accepted.",
            self.connections.accepted(),
        );
        let mut family = out.family(
            "tributary_kafka_requests_total",
            Kind::Counter,
            "Kafka requests answered, by API.",
        );
        for (api, name) in ["produce", "fetch", "metadata", "group", "other", "admin"]
            .iter()
            .enumerate()
        {
            family.sample(&[("api", name)], self.requests[api].load(Relaxed));
        }
        out.counter(
            "tributary_kafka_produced_records_total",
            "Records appended from Kafka producers (durable).",
            self.produced.load(Relaxed),
        );
        out.counter(
            "tributary_kafka_fetched_records_total",
            "Records sent to Kafka consumers.",
            self.fetched.load(Relaxed),
        );
        self.acks.render(
            out,
            "tributary_kafka_ack_seconds",
            "Time from a produce request read to its answer (durable).",
        );
        self.rejections.render(
            out,
            "tributary_kafka_rejections_total",
            "Closed connections and refused requests and records, by reason.",
        );
    }
}

/// State shared by every Kafka connection of a node.
#[derive(Debug)]
pub struct Server {
    cx: FrontendContext,
    config: KafkaConfig,
    metrics: Arc<KafkaMetrics>,
    /// The transaction coordinator now (on a cluster, while this node
    /// leads), started by [`Server::start`] or on first use.
    txns: std::sync::Mutex<Option<Arc<txn::Coordinator>>>,
    /// Held while a coordinator starts (one at a time).
    starting: tokio::sync::Mutex<()>,
    /// This node's Kafka endpoint, as the other nodes of a cluster name it.
    endpoint: std::sync::OnceLock<brokers::Endpoint>,
}

impl Server {
    /// Builds the server and registers its metrics and connection gauge.
    pub fn new(cx: FrontendContext, config: KafkaConfig) -> Arc<Self> {
        let metrics = Arc::new(KafkaMetrics::default());
        cx.metrics.register(metrics.clone());
        let gauge = metrics.clone();
        cx.connections
            .register("kafka", Arc::new(move || gauge.open_connections()));
        Arc::new(Server {
            cx,
            config,
            metrics,
            txns: std::sync::Mutex::new(None),
            starting: tokio::sync::Mutex::new(()),
            endpoint: std::sync::OnceLock::new(),
        })
    }

    /// Builds the server and starts its transaction coordinator, which
    /// completes or aborts what a stop left of transactions. On a cluster
    /// the coordinator runs on the leader: it starts each time this node
    /// is elected.
    pub async fn start(
        cx: FrontendContext,
        config: KafkaConfig,
    ) -> Result<Arc<Self>, tributary_storage::Error> {
        let server = Server::new(cx, config);
        match server.cx.log.leadership() {
            None => {
                server
                    .coordinator()
                    .await
                    .map_err(|r| tributary_storage::Error::Unwritable(format!("{r:?}")))?;
            }
            Some(leadership) => {
                tokio::spawn(follow_leadership(Arc::downgrade(&server), leadership));
            }
        }
        Ok(server)
    }

    /// Whether a transaction still open holds offsets of `group` for
    /// `topic`/`partition` (OffsetFetch with `require_stable`).
    pub(crate) fn offsets_pending(&self, group: &str, topic: &str, partition: i32) -> bool {
        self.current_txns()
            .is_some_and(|c| c.offsets_pending(group, topic, partition))
    }

    fn current_txns(&self) -> Option<Arc<txn::Coordinator>> {
        self.txns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The transaction coordinator: started on first use on a single node;
    /// on a cluster, the one of the leader's term while this node leads
    /// (NOT_COORDINATOR elsewhere; COORDINATOR_NOT_AVAILABLE while it leads
    /// cut off from the majority).
    pub(crate) async fn coordinator(&self) -> Result<Arc<txn::Coordinator>, txn::Refused> {
        let claim = match self.cx.log.leadership() {
            None => None,
            Some(l) => {
                let l = l.borrow().clone();
                if !l.leads() || l.cut_off {
                    return Err(match l.leader {
                        Some(_) if !l.cut_off => txn::Refused::NotCoordinator,
                        _ => txn::Refused::NotAvailable,
                    });
                }
                Some((brokers::coordinator_claim(&l), l.term))
            }
        };
        let term = claim.as_ref().map_or(0, |(_, t)| *t);
        let current = |s: &Self| s.current_txns().filter(|c| c.term == term);
        if let Some(c) = current(self) {
            return Ok(c);
        }
        let _one = self.starting.lock().await;
        if let Some(c) = current(self) {
            return Ok(c);
        }
        let limits = txn::Limits {
            max_ids: self.config.max_transactional_ids,
            expiration_ms: self.config.transactional_id_expiration_ms,
        };
        let c = txn::Coordinator::start(self.cx.log.clone(), limits, claim).await?;
        let old = self
            .txns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(c.clone());
        if let Some(old) = old {
            old.retire();
        }
        Ok(c)
    }

    /// This node's Kafka endpoint, published for the other nodes of its
    /// cluster to name in their Metadata answers (once; a single node
    /// keeps it to itself).
    pub fn advertise(self: &Arc<Self>, endpoint: brokers::Endpoint) {
        if self.endpoint.set(endpoint.clone()).is_err() {
            return;
        }
        if self.cx.log.is_replicated() {
            tokio::spawn(brokers::publish(
                self.cx.log.clone(),
                endpoint,
                self.cx.shutdown.clone(),
            ));
        }
    }

    /// Counters (tests and `/metrics`).
    pub fn metrics(&self) -> &Arc<KafkaMetrics> {
        &self.metrics
    }
}

/// Starts the transaction coordinator each time this node is elected, so
/// that what the last leader left prepared is completed and open
/// transactions time out without waiting for a client.
async fn follow_leadership(
    server: std::sync::Weak<Server>,
    mut leadership: tokio::sync::watch::Receiver<tributary_storage::Leadership>,
) {
    loop {
        let leads = {
            let l = leadership.borrow_and_update();
            l.leads() && !l.cut_off
        };
        if leads {
            let Some(s) = server.upgrade() else { return };
            if let Err(r) = s.coordinator().await {
                tracing::warn!(refused = ?r, "the transaction coordinator did not start on the new leader; trying again");
                drop(s);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        }
        if leadership.changed().await.is_err() {
            return;
        }
    }
}

/// Served on TCP listeners by [`tributary_frontend::serve()`] (9092, and 9093
/// with TLS, where a verified client certificate names the device).
impl Frontend for Server {
    fn context(&self) -> &FrontendContext {
        &self.cx
    }

    fn listening(&self, stats: Arc<ConnectionStats>) {
        self.metrics.connections.add(stats);
    }

    async fn connection(self: Arc<Self>, stream: MaybeTls, peer: Peer) {
        conn::run(self, stream, peer).await;
    }
}
