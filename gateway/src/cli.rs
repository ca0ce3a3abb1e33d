//! The command line: `edge`/`core` run a node; the other subcommands are
//! clients of a node's HTTP API.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use crate::config::Profile;

/// Tributary: an event-streaming gateway for the edge.
#[derive(Debug, Parser)]
#[command(name = "tributary", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a field gateway node.
    Edge(RunArgs),
    /// Run a central (core) node.
    Core(RunArgs),
    #[cfg(feature = "client")]
    /// Create, list, describe, change and delete topics.
    Topics {
        /// Which topic operation.
        #[command(subcommand)]
        op: TopicsOp,
        /// The node's HTTP API.
        #[arg(
            long,
            global = true,
            env = "TRIBUTARY_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        url: String,
    },
    #[cfg(feature = "client")]
    /// List and describe consumer groups: members, assignments, offsets, lag.
    Groups {
        /// Which group operation.
        #[command(subcommand)]
        op: GroupsOp,
        /// The node's HTTP API.
        #[arg(
            long,
            global = true,
            env = "TRIBUTARY_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        url: String,
    },
    #[cfg(feature = "client")]
    /// Append lines from stdin to a topic, one event per line.
    Produce(ProduceArgs),
    #[cfg(feature = "client")]
    /// Print a topic's records as JSON lines.
    Tail(TailArgs),
    #[cfg(feature = "client")]
    /// Manage devices: credentials, ACLs and rate limits (needs the admin token).
    Devices {
        /// Which device operation.
        #[command(subcommand)]
        op: DevicesOp,
        #[command(flatten)]
        node: AdminApi,
    },
    #[cfg(feature = "client")]
    /// Connectors: list, create (JSON, as `POST /v1/connectors`), describe,
    /// delete, pause, resume, restart.
    Connectors {
        /// Which connector operation.
        #[command(subcommand)]
        op: ConnectorsOp,
        #[command(flatten)]
        node: AdminApi,
    },
    #[cfg(feature = "client")]
    /// Pipelines (continuous SQL): list, create, describe, delete, pause,
    /// resume.
    Pipelines {
        /// Which pipeline operation.
        #[command(subcommand)]
        op: PipelinesOp,
        #[command(flatten)]
        node: AdminApi,
    },
    #[cfg(feature = "client")]
    /// The core cluster: status, add a node, remove a node.
    Cluster {
        /// Which cluster operation.
        #[command(subcommand)]
        op: ClusterOp,
        #[command(flatten)]
        node: AdminApi,
    },
    /// Development certificates for the TLS listeners.
    Tls {
        /// Which certificate to write.
        #[command(subcommand)]
        op: TlsOp,
    },
    #[cfg(feature = "client")]
    /// Load generators that count acknowledgements.
    Bench {
        /// Which protocol to drive.
        #[command(subcommand)]
        target: BenchCommand,
    },
}

/// Options of `edge` and `core`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file (every key can also come from TRIBUTARY_<SECTION>__<KEY>).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Preset under the file and environment: `small` for Pi-class boards
    /// (8 MiB sled cache, smaller buffers and limits).
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    pub profile: Profile,
}

/// `devices` operations.
#[derive(Debug, Subcommand)]
pub enum DevicesOp {
    /// Add a device and print its token (shown this once).
    Add {
        /// Device id: the MQTT/AMQP user name and the mTLS certificate CN.
        id: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Pattern the device may publish to (MQTT-style: + and #); repeatable.
        #[arg(long)]
        publish: Vec<String>,
        /// Pattern the device may read and subscribe to; repeatable.
        #[arg(long)]
        subscribe: Vec<String>,
        /// Events per second, at most.
        #[arg(long)]
        rate_limit: Option<u32>,
    },
    /// List devices.
    List,
    /// Remove a device.
    Remove {
        /// Device id.
        id: String,
    },
    /// Give a device a new token (the old one stops working) and print it.
    Rotate {
        /// Device id.
        id: String,
    },
    /// Refuse a device's logins and publishes until enabled again.
    Disable {
        /// Device id.
        id: String,
    },
    /// Let a disabled device in again.
    Enable {
        /// Device id.
        id: String,
    },
}

/// `tls` operations.
#[derive(Debug, Subcommand)]
pub enum TlsOp {
    /// Write a development CA and a server certificate signed by it:
    /// ca.pem, ca-key.pem, server.pem, server-key.pem.
    SelfSigned {
        /// Directory to write to.
        #[arg(long, default_value = "tls")]
        out: PathBuf,
        /// Host names and addresses of the server (default: localhost, 127.0.0.1, ::1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Write a client certificate for a device (mTLS: its CN is the device id),
    /// signed by the CA in --ca-dir.
    ClientCert {
        /// Device id.
        name: String,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, default_value = "tls")]
        ca_dir: PathBuf,
        /// Directory to write NAME.pem and NAME-key.pem to (default: --ca-dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// `topics` operations.
#[derive(Debug, Subcommand)]
pub enum TopicsOp {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partition count.
        #[arg(long, short)]
        partitions: Option<u32>,
        /// Remove events older than this (ms).
        #[arg(long)]
        retention_ms: Option<u64>,
        /// Keep each partition under this many bytes.
        #[arg(long)]
        retention_bytes: Option<u64>,
        /// Largest event accepted.
        #[arg(long)]
        max_event_bytes: Option<usize>,
        /// Compaction settings.
        #[command(flatten)]
        compaction: CompactionArgs,
    },
    /// List topics.
    List,
    /// Show a topic's settings and offsets.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic with its records and the groups' positions in it
    /// (under device auth: TRIBUTARY_TOKEN must be the admin token).
    Delete {
        /// Topic name.
        name: String,
    },
    /// Change a topic's settings: add partitions, change or remove limits
    /// (under device auth: TRIBUTARY_TOKEN must be the admin token).
    Alter {
        /// Topic name.
        name: String,
        /// The new partition count (partitions can only be added).
        #[arg(long, short)]
        partitions: Option<u32>,
        /// Remove events older than this (ms); `none` removes the limit.
        #[arg(long, value_parser = limit)]
        retention_ms: Option<Limit>,
        /// Keep each partition under this many bytes; `none` removes the limit.
        #[arg(long, value_parser = limit)]
        retention_bytes: Option<Limit>,
        /// Largest event accepted.
        #[arg(long)]
        max_event_bytes: Option<usize>,
        /// What the topic does at the disk quota: `reject` or `drop_oldest`.
        #[arg(long)]
        on_full: Option<String>,
        /// Compaction settings.
        #[command(flatten)]
        compaction: CompactionArgs,
    },
}

/// A topic's compaction settings on the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CompactionArgs {
    /// `delete` (retention), `compact` (the latest record of each key) or
    /// `compact,delete`.
    #[arg(long)]
    pub cleanup_policy: Option<String>,
    /// How long a tombstone stays after compaction first kept it (ms).
    #[arg(long)]
    pub delete_retention_ms: Option<u64>,
    /// Records younger than this are not compacted (ms).
    #[arg(long)]
    pub min_compaction_lag_ms: Option<u64>,
    /// Records older than this are compacted whatever the dirty ratio (ms);
    /// `none` removes the limit.
    #[arg(long, value_parser = limit)]
    pub max_compaction_lag_ms: Option<Limit>,
    /// The share of a partition written since its last pass that starts a
    /// pass (0..=1).
    #[arg(long)]
    pub min_cleanable_dirty_ratio: Option<f64>,
}

impl CompactionArgs {
    /// Sets what was given in a topic's JSON body; true when anything was.
    pub fn fill(&self, body: &mut serde_json::Value) -> bool {
        let before = body.as_object().map_or(0, |o| o.len());
        if let Some(v) = &self.cleanup_policy {
            body["cleanup_policy"] = serde_json::json!(v);
        }
        if let Some(v) = self.delete_retention_ms {
            body["delete_retention_ms"] = serde_json::json!(v);
        }
        if let Some(v) = self.min_compaction_lag_ms {
            body["min_compaction_lag_ms"] = serde_json::json!(v);
        }
        if let Some(Limit(v)) = self.max_compaction_lag_ms {
            body["max_compaction_lag_ms"] = serde_json::json!(v);
        }
        if let Some(v) = self.min_cleanable_dirty_ratio {
            body["min_cleanable_dirty_ratio"] = serde_json::json!(v);
        }
        body.as_object().map_or(0, |o| o.len()) > before
    }
}

/// A limit given on the command line: a number, or `none` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

fn limit(s: &str) -> Result<Limit, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    s.parse()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("`{s}` is neither a number nor `none`"))
}

/// The node's HTTP API and admin token, for commands that may need it
/// (`devices` always; `connectors` with device auth).
#[derive(Debug, Args)]
pub struct AdminApi {
    /// The node's HTTP API.
    #[arg(
        long,
        global = true,
        env = "TRIBUTARY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// The node's `auth.admin_token`.
    #[arg(
        long,
        global = true,
        env = "TRIBUTARY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
}

/// `connectors` operations.
#[derive(Debug, Subcommand)]
pub enum ConnectorsOp {
    /// List connectors: kind, state, delivered, lag.
    List,
    /// Create a connector from its JSON (a file, or `-` for stdin).
    Create {
        /// The JSON file (`-`: stdin).
        file: std::path::PathBuf,
    },
    /// Show a connector: settings (secrets as their references), state,
    /// counters, last error.
    Describe {
        /// Connector name.
        name: String,
    },
    /// Stop and remove a connector created over the API (and its position).
    Delete {
        /// Connector name.
        name: String,
    },
    /// Hold a connector between batches.
    Pause {
        /// Connector name.
        name: String,
    },
    /// Let a paused connector go on.
    Resume {
        /// Connector name.
        name: String,
    },
    /// Start a connector's task again (secrets read again).
    Restart {
        /// Connector name.
        name: String,
    },
}

/// `cluster` operations (on any node of the cluster).
#[derive(Debug, Subcommand)]
pub enum ClusterOp {
    /// Leader, term, and each node: role, address, replication lag.
    Status,
    /// Add a node (started with `cluster.join = true`): it catches up as a
    /// learner, then becomes a voter.
    Add {
        /// Its node id.
        id: u64,
        /// Its node-to-node address (`host:port`, its `cluster.listen`).
        address: String,
    },
    /// Remove a voter (stop the node afterwards).
    Remove {
        /// Its node id.
        id: u64,
    },
}

/// `pipelines` operations.
#[derive(Debug, Subcommand)]
pub enum PipelinesOp {
    /// List pipelines: state, rows in and out, late, errors, lag.
    List,
    /// Create a pipeline from one `INSERT INTO … SELECT …` statement.
    Create {
        /// Pipeline name.
        name: String,
        /// The SQL (`-`: read it from stdin).
        sql: String,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Show a pipeline: SQL, counters, watermark, state size, newest rows.
    Describe {
        /// Pipeline name.
        name: String,
    },
    /// Stop and remove a pipeline created over the API, and its state (its
    /// output topic stays).
    Delete {
        /// Pipeline name.
        name: String,
    },
    /// Hold a pipeline between steps.
    Pause {
        /// Pipeline name.
        name: String,
    },
    /// Let a paused pipeline go on.
    Resume {
        /// Pipeline name.
        name: String,
    },
}

/// `groups` operations.
#[derive(Debug, Subcommand)]
pub enum GroupsOp {
    /// List groups: state, members, total lag.
    List,
    /// Show a group's members, their partitions, and offsets with lag.
    Describe {
        /// Group name.
        name: String,
    },
}

/// Options of `produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to append to.
    pub topic: String,
    /// Key for every event.
    #[arg(long, short)]
    pub key: Option<String>,
    /// Partition for every event.
    #[arg(long, short)]
    pub partition: Option<u32>,
    /// Lines per request.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// The node's HTTP API.
    #[arg(long, env = "TRIBUTARY_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

/// Options of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic to read.
    pub topic: String,
    /// Start at `earliest`, `latest` or an offset (per partition).
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// Keep waiting for new records.
    #[arg(long, short)]
    pub follow: bool,
    /// Only this partition.
    #[arg(long, short)]
    pub partition: Option<u32>,
    /// `json` or `binary` (key and value base64).
    #[arg(long, default_value = "json")]
    pub format: String,
    /// The node's HTTP API.
    #[arg(long, env = "TRIBUTARY_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

/// Every `bench` subcommand: the generators that share `bench::run` and its
/// report, and `amqp` (`bench::amqp::run`: the same report, counting confirms, with nacks added).
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// `http`, `mqtt` and `ws`.
    #[command(flatten)]
    Common(BenchTarget),
    /// AMQP 0-9-1 publish with publisher confirms to any broker: N
    /// connections, one confirm-mode channel each, each keeping W publishes
    /// unconfirmed; counts basic.acks (and basic.nacks apart) after a warm-up.
    Amqp(AmqpBenchArgs),
    /// MQTT logins per second (TCP, optional TLS, CONNECT with optional
    /// credentials, CONNACK, DISCONNECT) from N concurrent workers.
    Connect(ConnectBenchArgs),
    /// Store and forward: preload a backlog into an edge whose core is
    /// down, then time its drain into the core (events/s, bytes on the
    /// wire, CPU and RSS of both).
    Drain(DrainBenchArgs),
    #[cfg(feature = "processing")]
    /// Continuous SQL: a filter + projection and a tumbling-window GROUP BY
    /// over generated readings, the engine alone on one core or a whole
    /// pipeline through a log on disk; one JSON line with events/s and
    /// peak RSS.
    Pipeline(PipelineBenchArgs),
}

/// Options of `bench pipeline`.
#[cfg(feature = "processing")]
#[derive(Debug, Args, Clone)]
pub struct PipelineBenchArgs {
    /// Which query.
    #[arg(long, value_enum, default_value_t = PipelineQuery::Filter)]
    pub query: PipelineQuery,
    /// The operator alone, or a pipeline through the log.
    #[arg(long, value_enum, default_value_t = PipelineStage::Engine)]
    pub stage: PipelineStage,
    /// Readings.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Devices (group keys).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Data directory of the `log` stage (default: a new one under the
    /// temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `bench pipeline --query`.
#[cfg(feature = "processing")]
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PipelineQuery {
    /// `WHERE temp > 25`, three columns, one computed.
    Filter,
    /// GROUP BY device over 10-second tumbling windows: COUNT, AVG, MAX.
    Tumble,
}

/// `bench pipeline --stage`.
#[cfg(feature = "processing")]
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PipelineStage {
    /// The operator on this thread over readings in memory.
    Engine,
    /// A pipeline over readings appended to a log first.
    Log,
}

/// Options of `bench connect`.
#[derive(Debug, Args)]
pub struct ConnectBenchArgs {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub addr: String,
    /// Concurrent workers, each logging in over and over.
    #[arg(long, short, default_value_t = 8)]
    pub connections: usize,
    /// MQTT user name (the device id).
    #[arg(long)]
    pub user: Option<String>,
    /// MQTT password (the device token).
    #[arg(long)]
    pub password: Option<String>,
    /// CA (PEM) to verify the broker with: turns TLS on.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Name the broker's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// How long to run, e.g. 10s.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Sample this process's CPU time and RSS during the run (the server's pid).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// `bench` targets.
#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// HTTP produce: N connections each posting batches, counting acked records.
    Http(HttpBenchArgs),
    /// MQTT 3.1.1 publish to any broker: N connections each keeping M
    /// publishes outstanding, counting PUBACKs (QoS 1) or sent publishes (QoS 0).
    Mqtt(MqttBenchArgs),
    /// WebSockets: `--mode ingest` (N connections pipelining records to
    /// `/publish`, counting acks) or `--mode fanout` (C live-tail clients on one
    /// topic while a producer publishes R events/s; counts deliveries and their
    /// end-to-end latency).
    Ws(WsBenchArgs),
}

/// `bench ws` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WsMode {
    /// Acked records/s over N publish connections.
    Ingest,
    /// Deliveries/s and latency to C live tails.
    Fanout,
}

/// Options of `bench ws`.
#[derive(Debug, clap::Args)]
pub struct WsBenchArgs {
    /// Node URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// What to measure.
    #[arg(long, value_enum, default_value = "ingest")]
    pub mode: WsMode,
    /// Ingest: publish connections. Fanout: live-tail clients.
    #[arg(long, short, default_value_t = 8)]
    pub connections: usize,
    /// Ingest: records outstanding (unacknowledged) per connection.
    #[arg(long, short, default_value_t = 1000)]
    pub inflight: usize,
    /// Bytes of payload per record.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Fanout: events/s the producer publishes.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// How long to run, e.g. 10s.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Topic (created with one partition if missing).
    #[arg(long, default_value = "bench-ws")]
    pub topic: String,
    /// Sample this process's CPU time and RSS during the run (the server's pid).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Fanout: tail another node (a core this edge forwards to): the latency
    /// is then produce at the edge → readable at the core.
    #[arg(long)]
    pub tail_url: Option<String>,
}

/// `bench drain` phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DrainPhase {
    /// Produce the backlog into the edge (its core unreachable).
    Preload,
    /// Time the drain into the core (started after the preload).
    Measure,
}

/// Options of `bench drain`.
#[derive(Debug, Args, Clone)]
pub struct DrainBenchArgs {
    /// `preload`, then `measure` once the core is up.
    #[arg(long, value_enum)]
    pub phase: DrainPhase,
    /// The edge's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub edge: String,
    /// The core's HTTP API (measure).
    #[arg(long, default_value = "http://127.0.0.1:9080")]
    pub core: String,
    /// Topic (created on the edge with --partitions).
    #[arg(long, default_value = "bench-sync")]
    pub topic: String,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Backlog size in events.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Bytes per event (JSON sensor readings, padded).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Give up after this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Sample the edge's CPU time and RSS (measure).
    #[arg(long)]
    pub edge_pid: Option<u32>,
    /// Sample the core's CPU time and RSS (measure).
    #[arg(long)]
    pub core_pid: Option<u32>,
}

/// Options of `bench http`.
#[derive(Debug, Args, Clone)]
pub struct HttpBenchArgs {
    /// Base URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Topic to produce to (created with --partitions if missing).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Partitions when creating the topic.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Concurrent connections.
    #[arg(long, short, default_value_t = 8)]
    pub connections: usize,
    /// Records per request.
    #[arg(long, short, default_value_t = 100)]
    pub batch: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// How long to run, e.g. 10s, 500ms, 1m.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Sample this process's CPU time and RSS during the run (the server's pid).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// Options of `bench mqtt`.
#[derive(Debug, Args, Clone)]
pub struct MqttBenchArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Concurrent connections (MQTT sessions).
    #[arg(long, short, default_value_t = 10)]
    pub connections: usize,
    /// Publishes outstanding (unacknowledged) per connection at most.
    #[arg(long, short, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Bytes per message payload.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// QoS of every publish: 2 counts PUBCOMPs, 1 PUBACKs, 0 publishes written.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// How long to run, e.g. 10s, 500ms, 1m.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Topic prefix: connection `i` publishes to `{topic}/{i}`.
    #[arg(long, default_value = "bench/t")]
    pub topic: String,
    /// Sample this process's CPU time and RSS during the run (the server's pid).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Subscriber connections to `{topic}/#` (at `--qos`, at most 1 each way
    /// for QoS 0/1): the run then counts messages delivered to them.
    #[arg(long, default_value_t = 0)]
    pub subscribers: usize,
    /// With `--subscribers`: they share `$share/GROUP/{topic}/#` (each
    /// message to one of them) instead of each getting every message.
    #[arg(long)]
    pub share: Option<String>,
}

/// Options of `bench amqp`.
#[derive(Debug, Args, Clone)]
pub struct AmqpBenchArgs {
    /// Broker URL (the vhost `/` is written `%2f`).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Concurrent connections, one confirm-mode channel each.
    #[arg(long, short, default_value_t = 10)]
    pub connections: usize,
    /// Publishes outstanding (unconfirmed) per connection at most.
    #[arg(long, short, default_value_t = 100)]
    pub inflight: usize,
    /// Bytes per message body (a JSON sensor reading padded to this size).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// How long to count, after the warm-up, e.g. 10s, 500ms, 1m.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// How long to publish before counting starts (not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Exchange to publish to; empty is the default exchange, which routes to
    /// the queue named by the routing key (on Tributary: to that topic).
    #[arg(long, default_value = "")]
    pub exchange: String,
    /// Routing key of every publish.
    #[arg(long, default_value = "bench")]
    pub routing_key: String,
    /// First declare a durable queue named after the routing key (bound to
    /// --exchange unless that is the default exchange), so that a broker such
    /// as RabbitMQ stores the persistent messages rather than dropping them as
    /// unroutable. Tributary accepts the declaration and ignores it.
    #[arg(long)]
    pub declare_queue: bool,
    /// Sample this process's CPU time and RSS during the run (the server's pid).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// Parses `10s`, `250ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
