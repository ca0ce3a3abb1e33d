//! A connector's configuration: the same JSON in `[[connectors]]` (config
//! file) and `POST /v1/connectors`. Secrets are references — `${env:NAME}`
//! or `${file:PATH}` — resolved when the connector starts and never stored,
//! shown or logged resolved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorConfig {
    /// Its name: letters, digits, `.`, `_`, `-` (1–100). Also the consumer
    /// group a sink reads as: `connector-<name>`.
    pub name: String,
    /// What it is, with its settings.
    #[serde(flatten)]
    pub kind: Kind,
}

/// The kinds of connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// Webhooks: records POSTed as JSON.
    HttpSink(HttpSink),
    /// Rows in a PostgreSQL table, exactly once.
    PostgresSink(PostgresSink),
    /// Records published to an outside MQTT broker.
    MqttSink(MqttSink),
    /// An outside MQTT broker's messages appended to a topic.
    MqttSource(MqttSource),
    /// A topic published to an AMQP 0-9-1 exchange (RabbitMQ).
    AmqpSink(AmqpSink),
    /// An AMQP 0-9-1 queue (RabbitMQ) consumed into a topic.
    AmqpSource(AmqpSource),
    /// Records produced into an outside Kafka cluster, exactly once.
    KafkaSink(KafkaSink),
    /// An outside Kafka cluster's topics appended to the log, exactly once.
    KafkaSource(KafkaSource),
}

/// The kinds, as `kind` names them.
pub const KINDS: &str =
    "http_sink, postgres_sink, mqtt_sink, mqtt_source, amqp_sink, amqp_source, kafka_sink, kafka_source";

impl Kind {
    /// The `kind` label.
    pub fn label(&self) -> &'static str {
        match self {
            Kind::HttpSink(_) => "http_sink",
            Kind::PostgresSink(_) => "postgres_sink",
            Kind::MqttSink(_) => "mqtt_sink",
            Kind::MqttSource(_) => "mqtt_source",
            Kind::AmqpSink(_) => "amqp_sink",
            Kind::AmqpSource(_) => "amqp_source",
            Kind::KafkaSink(_) => "kafka_sink",
            Kind::KafkaSource(_) => "kafka_source",
        }
    }

    /// A sink's delivery settings (none for a source).
    pub fn delivery(&self) -> Option<&Delivery> {
        match self {
            Kind::HttpSink(h) => Some(&h.delivery),
            Kind::PostgresSink(p) => Some(&p.delivery),
            Kind::MqttSink(m) => Some(&m.delivery),
            Kind::KafkaSink(k) => Some(&k.delivery),
            Kind::MqttSource(_)
            | Kind::AmqpSink(_)
            | Kind::AmqpSource(_)
            | Kind::KafkaSource(_) => None,
        }
    }
}

/// What every sink has: its topics, batches, retries and dead letters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Delivery {
    /// The topics delivered.
    pub topics: Vec<String>,
    /// Records per batch (1..=10,000; none: the kind's default, 100 for
    /// webhooks, 5,000 for PostgreSQL, 500 for MQTT).
    pub batch_size: Option<usize>,
    /// Partitions delivered at once, each over its own connection (1..=32;
    /// none: the kind's default, 1 for webhooks, 4 for PostgreSQL). A
    /// partition's batches always go one after another, in order.
    pub concurrency: Option<usize>,
    /// Tries of one batch before it goes to the dead-letter topic (a
    /// PostgreSQL sink retries an unreachable database without limit).
    pub max_attempts: u32,
    /// First retry delay ceiling (ms).
    pub min_backoff_ms: u64,
    /// Largest retry delay (ms); a longer `Retry-After` is cut to it.
    pub max_backoff_ms: u64,
    /// Where undeliverable records go (with headers naming the error and
    /// where they came from); none: `<name>.dead-letter`.
    pub dead_letter_topic: Option<String>,
    /// Where a partition with no committed position starts.
    pub start: Start,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            topics: Vec::new(),
            batch_size: None,
            concurrency: None,
            max_attempts: 10,
            min_backoff_ms: 200,
            max_backoff_ms: 30_000,
            dead_letter_topic: None,
            start: Start::Earliest,
        }
    }
}

impl Delivery {
    /// The dead-letter topic of connector `name`.
    pub fn dead_letters(&self, name: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{name}.dead-letter"))
    }

    fn validate(&self, name: &str) -> Result<(), String> {
        if self.topics.is_empty() {
            return Err("`topics`: name at least one topic".into());
        }
        for t in &self.topics {
            tributary_storage::topic::validate_name(t).map_err(|e| format!("`topics`: {e}"))?;
        }
        if self.batch_size.is_some_and(|b| !(1..=10_000).contains(&b)) {
            return Err("`batch_size`: 1 to 10000".into());
        }
        if self.concurrency.is_some_and(|c| !(1..=32).contains(&c)) {
            return Err("`concurrency`: 1 to 32".into());
        }
        if self.max_attempts == 0 || self.min_backoff_ms == 0 {
            return Err("`max_attempts` and `min_backoff_ms` must be positive".into());
        }
        let dead = self.dead_letters(name);
        tributary_storage::topic::validate_name(&dead)
            .map_err(|e| format!("`dead_letter_topic`: {e}"))?;
        if self.topics.contains(&dead) {
            return Err("`dead_letter_topic` is one of the topics it reads".into());
        }
        Ok(())
    }
}

/// Where a sink with no committed position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The partition's first record.
    #[default]
    Earliest,
    /// Records written from now on.
    Latest,
}

/// `kind = "http_sink"`: each batch of records is one POST of
/// `{"records": [...]}` (records as `GET .../records` renders them, with
/// `topic`), or with `batch_size = 1` the record object alone; header
/// `Idempotency-Key: <topic>/<partition>/<first offset>-<last offset>`.
/// 2xx delivers; 5xx, 408, 429 and transport errors are retried with
/// backoff (full jitter, `Retry-After` honoured) up to `max_attempts`, other
/// 4xx not at all; what is not delivered goes to the dead-letter topic.
/// At least once: the position is committed after delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSink {
    /// Topics, batches, retries, dead letters.
    #[serde(flatten)]
    pub delivery: Delivery,
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra request headers; values may be secret references.
    pub headers: BTreeMap<String, String>,
    /// A request's time limit (ms).
    pub timeout_ms: u64,
    /// PEM roots for `https://` (none: the system's).
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpSink {
    fn default() -> Self {
        HttpSink {
            delivery: Delivery::default(),
            url: String::new(),
            headers: BTreeMap::new(),
            timeout_ms: 10_000,
            ca_file: None,
        }
    }
}

/// `kind = "postgres_sink"`: records as rows of `table`, exactly once —
/// the rows and the connector's position in each partition (a row of
/// `offsets_table`) are written in one transaction, and each transaction
/// first reads the position back, so a batch delivered again after a crash
/// or a lost answer is skipped. A row the table refuses (type, constraint)
/// goes to the dead-letter topic with the database's error; the rest of
/// its batch is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostgresSink {
    /// Topics, batches, retries, dead letters.
    #[serde(flatten)]
    pub delivery: Delivery,
    /// `postgres://user@host:port/database` (or a secret reference to
    /// one); `?sslmode=require` connects with TLS and verifies the server
    /// against `ca_file` or the system's roots.
    pub url: String,
    /// The password (a secret reference), if not in `url`.
    pub password: Option<String>,
    /// The target table (`name` or `schema.name`).
    pub table: String,
    /// Column → where its value comes from: a field of the record's JSON
    /// value (`"temp"`, nested `"a.b"`), or `_key`, `_value`, `_ts`,
    /// `_topic`, `_partition`, `_offset`.
    pub columns: BTreeMap<String, String>,
    /// `insert`, or `upsert` on the table's primary key (the latest record
    /// per key wins).
    pub mode: PgMode,
    /// The table of positions (created if missing).
    pub offsets_table: String,
    /// PEM roots for `sslmode=require` (none: the system's).
    pub ca_file: Option<PathBuf>,
    /// Time limit of connecting and of one batch (ms).
    pub timeout_ms: u64,
}

/// `kind = "mqtt_sink"`: each record published to an outside broker (MQTT
/// 3.1.1, persistent session) at QoS 1 or 2; a batch's position is
/// committed only when the broker has acknowledged every record of it
/// (PUBACK, or PUBCOMP at QoS 2): at least once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MqttSink {
    /// Topics, batches, retries, dead letters.
    #[serde(flatten)]
    pub delivery: Delivery,
    /// The broker and how to log in.
    #[serde(flatten)]
    pub broker: Broker,
    /// 1 or 2.
    pub qos: u8,
    /// The MQTT topic of each record: a template with `{key}`, `{topic}`,
    /// `{partition}`, `{header.NAME}`; none: the record's `mqtt.topic`
    /// header, else its key.
    pub mqtt_topic: Option<String>,
    /// Publish with the retain flag.
    pub retain: bool,
}

impl Default for MqttSink {
    fn default() -> Self {
        MqttSink {
            delivery: Delivery::default(),
            broker: Broker::default(),
            qos: 1,
            mqtt_topic: None,
            retain: false,
        }
    }
}

/// An outside MQTT broker, as both MQTT kinds name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Broker {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub url: String,
    /// User name.
    pub username: Option<String>,
    /// Password (a secret reference).
    pub password: Option<String>,
    /// Client id (none: `tributary-<name>`); the broker keeps the
    /// persistent session under it.
    pub client_id: Option<String>,
    /// Keep-alive (s).
    pub keep_alive_s: u16,
    /// Time limit of connecting and of each wait for the broker (ms).
    pub timeout_ms: u64,
    /// PEM roots for `mqtts://` (none: the system's).
    pub ca_file: Option<PathBuf>,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            url: String::new(),
            username: None,
            password: None,
            client_id: None,
            keep_alive_s: 30,
            timeout_ms: 10_000,
            ca_file: None,
        }
    }
}

impl Broker {
    /// The client id of connector `name`.
    pub fn client_id(&self, name: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("tributary-{name}"))
    }

    fn validate(&self) -> Result<(), String> {
        crate::mqtt_link::parse_url(&self.url).map_err(|e| format!("`url`: {e}"))?;
        secret_only("password", self.password.as_deref())?;
        if self.password.is_some() && self.username.is_none() {
            return Err("`password` without `username`".into());
        }
        if self
            .client_id
            .as_ref()
            .is_some_and(|c| c.is_empty() || c.len() > 65_535)
        {
            return Err("`client_id`: 1 to 65535 bytes".into());
        }
        if self.keep_alive_s == 0 || self.timeout_ms == 0 {
            return Err("`keep_alive_s` and `timeout_ms` must be positive".into());
        }
        Ok(())
    }
}

/// `kind = "mqtt_source"`: subscribes to `mqtt_topics` on an outside broker
/// (MQTT 3.1.1, persistent session, QoS 1) and appends each message to
/// `topic` (key and `mqtt.topic` header: its MQTT topic), acknowledging it
/// only once the append is durable: at least once, also across a restart
/// of either side (the broker keeps what arrives meanwhile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MqttSource {
    /// The broker and how to log in.
    #[serde(flatten)]
    pub broker: Broker,
    /// Topic filters subscribed to (wildcards allowed).
    pub mqtt_topics: Vec<String>,
    /// The log topic the messages go to.
    pub topic: String,
    /// Messages per append at most (1..=10,000).
    pub batch_size: usize,
    /// First reconnect delay ceiling (ms).
    pub min_backoff_ms: u64,
    /// Largest reconnect delay (ms).
    pub max_backoff_ms: u64,
}

impl Default for MqttSource {
    fn default() -> Self {
        MqttSource {
            broker: Broker::default(),
            mqtt_topics: Vec::new(),
            topic: String::new(),
            batch_size: 500,
            min_backoff_ms: 200,
            max_backoff_ms: 30_000,
        }
    }
}

/// `kind = "amqp_sink"`: the records of `topic` published to an AMQP 0-9-1
/// exchange with publisher confirms, the position (consumer group
/// `connector-<name>`) committed only after the broker confirmed everything
/// before it: at least once, in partition order. (The RabbitMQ bridge of
/// `[[amqp.bridges]]`, direction `out`, as a connector.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AmqpSink {
    /// `amqp://user:pass@host:port/vhost` or `amqps://…` (or a secret
    /// reference to one).
    pub url: String,
    /// The topic forwarded.
    pub topic: String,
    /// The exchange (`""`: the default exchange).
    pub exchange: String,
    /// A fixed routing key; none: the record's key, else the topic.
    pub routing_key: Option<String>,
    /// Messages per confirm round (1..=65,535).
    pub batch_size: u16,
    /// Time limit of connecting and of a confirm round (ms).
    pub timeout_ms: u64,
    /// First reconnect delay ceiling (ms).
    pub min_backoff_ms: u64,
    /// Largest reconnect delay (ms).
    pub max_backoff_ms: u64,
}

impl Default for AmqpSink {
    fn default() -> Self {
        AmqpSink {
            url: String::new(),
            topic: String::new(),
            exchange: String::new(),
            routing_key: None,
            batch_size: 256,
            timeout_ms: 10_000,
            min_backoff_ms: 500,
            max_backoff_ms: 30_000,
        }
    }
}

/// `kind = "amqp_source"`: a queue consumed into `topic`; deliveries ready
/// together are one append, acknowledged (`basic.ack`, multiple) only once
/// it is durable: at least once. (The RabbitMQ bridge of `[[amqp.bridges]]`,
/// direction `in`, as a connector.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AmqpSource {
    /// `amqp://user:pass@host:port/vhost` or `amqps://…` (or a secret
    /// reference to one).
    pub url: String,
    /// The queue consumed.
    pub queue: String,
    /// The topic appended to.
    pub topic: String,
    /// Messages per append at most, also the prefetch (1..=65,535).
    pub batch_size: u16,
    /// Time limit of connecting and of an acknowledgement (ms).
    pub timeout_ms: u64,
    /// First reconnect delay ceiling (ms).
    pub min_backoff_ms: u64,
    /// Largest reconnect delay (ms).
    pub max_backoff_ms: u64,
}

impl Default for AmqpSource {
    fn default() -> Self {
        AmqpSource {
            url: String::new(),
            queue: String::new(),
            topic: String::new(),
            batch_size: 256,
            timeout_ms: 10_000,
            min_backoff_ms: 500,
            max_backoff_ms: 30_000,
        }
    }
}

/// Checks what both AMQP kinds have.
fn check_amqp(
    url: &str,
    topic: &str,
    batch: u16,
    timeout_ms: u64,
    min: u64,
    max: u64,
) -> Result<(), String> {
    if !tributary_amqp::bridge::AVAILABLE {
        return Err("this build has no AMQP bridge (cargo feature `amqp-bridge`)".into());
    }
    check_reference(url).map_err(|e| format!("`url`: {e}"))?;
    if reference(url).is_none() {
        tributary_amqp::bridge::validate_url(url).map_err(|e| format!("`url`: {e}"))?;
    }
    tributary_storage::topic::validate_name(topic).map_err(|e| format!("`topic`: {e}"))?;
    if batch == 0 || timeout_ms == 0 || min == 0 {
        return Err("`batch_size`, `timeout_ms` and `min_backoff_ms` must be positive".into());
    }
    if max < min {
        return Err("`max_backoff_ms` must be at least `min_backoff_ms`".into());
    }
    Ok(())
}

/// An outside Kafka cluster, as both Kafka kinds name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaCluster {
    /// `host:port` of brokers to ask first.
    pub bootstrap_servers: Vec<String>,
    /// Connect with TLS, verified against `ca_file` or the system's roots.
    pub tls: bool,
    /// PEM roots for `tls`.
    pub ca_file: Option<PathBuf>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; none: no SASL.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password (a secret reference).
    pub password: Option<String>,
    /// The client id (none: `tributary-<name>`).
    pub client_id: Option<String>,
    /// Time limit of connecting and of each answer (ms).
    pub timeout_ms: u64,
}

impl Default for KafkaCluster {
    fn default() -> Self {
        KafkaCluster {
            bootstrap_servers: Vec::new(),
            tls: false,
            ca_file: None,
            sasl_mechanism: None,
            username: None,
            password: None,
            client_id: None,
            timeout_ms: 30_000,
        }
    }
}

impl KafkaCluster {
    /// The client options of connector `name` (secrets resolved).
    pub fn options(&self, name: &str) -> Result<crate::kafka_link::Options, String> {
        let sasl = match &self.sasl_mechanism {
            None => None,
            Some(m) => {
                let m = crate::kafka_link::Mechanism::parse(m)
                    .map_err(|e| format!("`sasl_mechanism`: {e}"))?;
                let user = self.username.clone().unwrap_or_default();
                let password = match &self.password {
                    Some(p) => resolve(p).map_err(|e| format!("`password`: {e}"))?,
                    None => String::new(),
                };
                Some((m, user, password))
            }
        };
        crate::kafka_link::Options::new(
            &self.bootstrap_servers,
            self.tls,
            self.ca_file.as_deref(),
            sasl,
            std::time::Duration::from_millis(self.timeout_ms),
            self.client_id
                .clone()
                .unwrap_or_else(|| format!("tributary-{name}")),
        )
    }

    fn validate(&self) -> Result<(), String> {
        if self.bootstrap_servers.is_empty() {
            return Err("`bootstrap_servers`: name at least one `host:port`".into());
        }
        for s in &self.bootstrap_servers {
            crate::kafka_link::parse_server(s).map_err(|e| format!("`bootstrap_servers`: {e}"))?;
        }
        if let Some(m) = &self.sasl_mechanism {
            crate::kafka_link::Mechanism::parse(m).map_err(|e| format!("`sasl_mechanism`: {e}"))?;
            if self.username.is_none() {
                return Err("`sasl_mechanism` without `username`".into());
            }
        } else if self.username.is_some() || self.password.is_some() {
            return Err("`username` and `password` need `sasl_mechanism`".into());
        }
        secret_only("password", self.password.as_deref())?;
        if self.ca_file.is_some() && !self.tls {
            return Err("`ca_file` without `tls = true`".into());
        }
        if self.timeout_ms == 0 {
            return Err("`timeout_ms` must be positive".into());
        }
        Ok(())
    }
}

/// `kind = "kafka_sink"`: the records of `topics` produced into an outside
/// Kafka cluster (a topic of the same name, or `kafka_topic`), exactly
/// once: each batch is one Kafka transaction holding the records and the
/// sink's next position in each partition (a record of `positions_topic`,
/// compacted), and the positions are read back (read_committed) at start
/// and after any failure, so a batch is never written twice. Keyed records
/// go to Kafka's partition for their key, keyless ones to the partition
/// of the same number (modulo the count).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaSink {
    /// Topics, batches, retries, dead letters.
    #[serde(flatten)]
    pub delivery: Delivery,
    /// The cluster and how to log in.
    #[serde(flatten)]
    pub cluster: KafkaCluster,
    /// The Kafka topic: a name, or a template with `{topic}`; none: the
    /// topic's own name.
    pub kafka_topic: Option<String>,
    /// Create a missing Kafka topic (with the topic's partition count and
    /// the cluster's default replication).
    pub create_topics: bool,
    /// The compacted Kafka topic holding the positions (created if
    /// missing, one partition).
    pub positions_topic: String,
    /// The transactional id (none: `tributary-<name>`; `-<n>` added per
    /// connection beyond the first). A second sink with the same id fences
    /// the first.
    pub transactional_id: Option<String>,
    /// `none`, `gzip`, `lz4` or `zstd`.
    pub compression: String,
    /// A record larger than this (its key, value and headers) goes to the
    /// dead-letter topic instead (Kafka's default `max.message.bytes` is
    /// 1 MiB).
    pub max_record_bytes: usize,
}

impl Default for KafkaSink {
    fn default() -> Self {
        KafkaSink {
            delivery: Delivery::default(),
            cluster: KafkaCluster::default(),
            kafka_topic: None,
            create_topics: true,
            positions_topic: "tributary-sink-positions".into(),
            transactional_id: None,
            compression: "none".into(),
            max_record_bytes: 1_000_000,
        }
    }
}

/// `kind = "kafka_source"`: `kafka_topics` of an outside Kafka cluster
/// read (read_committed by default) and appended to `topic` (none: a topic
/// of the same name), each Kafka partition into the partition of the same
/// number (modulo the count), key, value, timestamp and headers kept.
/// Exactly once: every record appended carries a header
/// `tributary.kafka` = `<name>/<topic>/<partition>/<offset>` in the same
/// append, and the position in each Kafka partition is checkpointed in
/// the log's metadata after each append; at start the partitions are read
/// from the checkpoint on, so the position always equals what the log
/// holds, whenever a crash hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaSource {
    /// The cluster and how to log in.
    #[serde(flatten)]
    pub cluster: KafkaCluster,
    /// The Kafka topics read.
    pub kafka_topics: Vec<String>,
    /// The log topic they go to; none: each to a topic of its own name.
    pub topic: Option<String>,
    /// Where a Kafka partition never read starts.
    pub start: Start,
    /// Skip records of aborted transactions and wait for open ones
    /// (`read_committed`); false: `read_uncommitted`.
    pub read_committed: bool,
    /// Bytes one fetch asks for at most (the memory it holds).
    pub fetch_max_bytes: usize,
    /// First reconnect delay ceiling (ms).
    pub min_backoff_ms: u64,
    /// Largest reconnect delay (ms).
    pub max_backoff_ms: u64,
}

impl Default for KafkaSource {
    fn default() -> Self {
        KafkaSource {
            cluster: KafkaCluster::default(),
            kafka_topics: Vec::new(),
            topic: None,
            start: Start::Earliest,
            read_committed: true,
            fetch_max_bytes: 4 << 20,
            min_backoff_ms: 200,
            max_backoff_ms: 30_000,
        }
    }
}

/// How a PostgreSQL sink writes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgMode {
    /// Every record a new row (`COPY`).
    #[default]
    Insert,
    /// One row per primary key, the latest record's.
    Upsert,
}

impl Default for PostgresSink {
    fn default() -> Self {
        PostgresSink {
            delivery: Delivery::default(),
            url: String::new(),
            password: None,
            table: String::new(),
            columns: BTreeMap::new(),
            mode: PgMode::Insert,
            offsets_table: "tributary_offsets".into(),
            ca_file: None,
            timeout_ms: 30_000,
        }
    }
}

impl ConnectorConfig {
    /// Parses a connector from JSON, refusing keys it does not know (each
    /// named) and invalid settings.
    pub fn from_json(v: serde_json::Value) -> Result<ConnectorConfig, String> {
        let given: Vec<String> = match &v {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            _ => return Err("a connector is a JSON object".into()),
        };
        let config: ConnectorConfig = serde_json::from_value(v).map_err(|e| {
            let e = e.to_string();
            if e.contains("unknown variant") {
                format!("`kind`: {e} (known: {KINDS})")
            } else if e.contains("missing field `kind`") {
                format!("`kind` is missing (known: {KINDS})")
            } else {
                e
            }
        })?;
        // Every field serializes (no skipping), so a key not in the output
        // is one no field took.
        let known = serde_json::to_value(&config).map_err(|e| e.to_string())?;
        if let Some(unknown) = given.iter().find(|k| known.get(k.as_str()).is_none()) {
            return Err(format!(
                "`{unknown}` is not a setting of a {} connector",
                config.kind.label()
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        if let Some(d) = self.kind.delivery() {
            d.validate(&self.name)?;
        }
        match &self.kind {
            Kind::HttpSink(h) => {
                let url = reqwest::Url::parse(&h.url)
                    .map_err(|e| format!("`url`: `{}` is not a URL: {e}", h.url))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!("`url`: `{}` is not http:// or https://", h.url));
                }
                if h.timeout_ms == 0 {
                    return Err("`timeout_ms` must be positive".into());
                }
                for (k, v) in &h.headers {
                    reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("`headers`: `{k}` is not a header name"))?;
                    check_reference(v).map_err(|e| format!("`headers.{k}`: {e}"))?;
                }
                Ok(())
            }
            Kind::PostgresSink(p) => p.validate(),
            Kind::MqttSink(m) => {
                m.broker.validate()?;
                if !matches!(m.qos, 1 | 2) {
                    return Err("`qos`: 1 or 2".into());
                }
                if let Some(t) = &m.mqtt_topic {
                    crate::mqtt::check_template(t).map_err(|e| format!("`mqtt_topic`: {e}"))?;
                }
                Ok(())
            }
            Kind::AmqpSink(a) => check_amqp(
                &a.url,
                &a.topic,
                a.batch_size,
                a.timeout_ms,
                a.min_backoff_ms,
                a.max_backoff_ms,
            ),
            Kind::AmqpSource(a) => {
                if a.queue.is_empty() {
                    return Err("`queue`: name the queue to consume".into());
                }
                check_amqp(
                    &a.url,
                    &a.topic,
                    a.batch_size,
                    a.timeout_ms,
                    a.min_backoff_ms,
                    a.max_backoff_ms,
                )
            }
            Kind::KafkaSink(k) => {
                k.cluster.validate()?;
                if let Some(t) = &k.kafka_topic {
                    let sample = t.replace("{topic}", "t");
                    crate::kafka::check_topic_name(&sample)
                        .map_err(|e| format!("`kafka_topic`: {e}"))?;
                }
                crate::kafka::check_topic_name(&k.positions_topic)
                    .map_err(|e| format!("`positions_topic`: {e}"))?;
                crate::kafka::compression(&k.compression)
                    .map_err(|e| format!("`compression`: {e}"))?;
                if let Some(id) = &k.transactional_id {
                    if id.is_empty() || id.len() > 200 {
                        return Err("`transactional_id`: 1 to 200 bytes".into());
                    }
                }
                if !(1024..=(64 << 20)).contains(&k.max_record_bytes) {
                    return Err("`max_record_bytes`: 1024 to 67108864".into());
                }
                Ok(())
            }
            Kind::KafkaSource(k) => {
                k.cluster.validate()?;
                if k.kafka_topics.is_empty() {
                    return Err("`kafka_topics`: name at least one topic".into());
                }
                for t in &k.kafka_topics {
                    crate::kafka::check_topic_name(t)
                        .map_err(|e| format!("`kafka_topics`: {e}"))?;
                    if k.topic.is_none() {
                        tributary_storage::topic::validate_name(t)
                            .map_err(|e| format!("`kafka_topics` (as a log topic): {e}"))?;
                    }
                }
                if let Some(t) = &k.topic {
                    tributary_storage::topic::validate_name(t)
                        .map_err(|e| format!("`topic`: {e}"))?;
                }
                if !((64 << 10)..=(64 << 20)).contains(&k.fetch_max_bytes) {
                    return Err("`fetch_max_bytes`: 65536 to 67108864".into());
                }
                if k.min_backoff_ms == 0 {
                    return Err("`min_backoff_ms` must be positive".into());
                }
                Ok(())
            }
            Kind::MqttSource(m) => {
                m.broker.validate()?;
                if m.mqtt_topics.is_empty() {
                    return Err("`mqtt_topics`: name at least one topic filter".into());
                }
                for f in &m.mqtt_topics {
                    crate::mqtt::check_filter(f).map_err(|e| format!("`mqtt_topics`: {e}"))?;
                }
                tributary_storage::topic::validate_name(&m.topic)
                    .map_err(|e| format!("`topic`: {e}"))?;
                if !(1..=10_000).contains(&m.batch_size) {
                    return Err("`batch_size`: 1 to 10000".into());
                }
                if m.min_backoff_ms == 0 {
                    return Err("`min_backoff_ms` must be positive".into());
                }
                Ok(())
            }
        }
    }
}

impl PostgresSink {
    fn validate(&self) -> Result<(), String> {
        check_reference(&self.url).map_err(|e| format!("`url`: {e}"))?;
        if reference(&self.url).is_none() {
            crate::postgres_sink::parse_url(&self.url).map_err(|e| format!("`url`: {e}"))?;
        }
        secret_only("password", self.password.as_deref())?;
        crate::postgres_sink::quote_table(&self.table).map_err(|e| format!("`table`: {e}"))?;
        crate::postgres_sink::quote_table(&self.offsets_table)
            .map_err(|e| format!("`offsets_table`: {e}"))?;
        if self.columns.is_empty() {
            return Err("`columns`: map at least one column to a field".into());
        }
        for (column, field) in &self.columns {
            if column.is_empty() || column.contains('\0') {
                return Err(format!("`columns`: `{column}` is not a column name"));
            }
            crate::postgres_sink::Field::parse(field)
                .map_err(|e| format!("`columns.{column}`: {e}"))?;
        }
        if self.timeout_ms == 0 {
            return Err("`timeout_ms` must be positive".into());
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`name`: `{name}` must be 1–100 letters, digits, `.`, `_` or `-`"
        ))
    }
}

/// A secret reference's parts: `${env:NAME}` or `${file:PATH}`.
fn reference(v: &str) -> Option<(&str, &str)> {
    let inner = v.strip_prefix("${")?.strip_suffix('}')?;
    inner.split_once(':')
}

/// A setting that may only be a secret reference (never the secret in
/// the config itself).
fn secret_only(key: &str, v: Option<&str>) -> Result<(), String> {
    let Some(v) = v else { return Ok(()) };
    if reference(v).is_none() {
        return Err(format!(
            "`{key}`: give it as `${{env:NAME}}` or `${{file:PATH}}`"
        ));
    }
    check_reference(v).map_err(|e| format!("`{key}`: {e}"))
}

fn check_reference(v: &str) -> Result<(), String> {
    match reference(v) {
        None if v.starts_with("${") => Err("a reference is `${env:NAME}` or `${file:PATH}`".into()),
        None => Ok(()),
        Some(("env" | "file", rest)) if !rest.is_empty() => Ok(()),
        Some(_) => Err("a reference is `${env:NAME}` or `${file:PATH}`".into()),
    }
}

/// A setting's value with its secret reference resolved; an error names
/// the reference, never a value.
pub fn resolve(v: &str) -> Result<String, String> {
    match reference(v) {
        Some(("env", name)) => {
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
        }
        Some(("file", path)) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read {path}: {e}")),
        _ => Ok(v.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_connector_parses_with_defaults_and_bad_settings_are_named() {
        let c = ConnectorConfig::from_json(json!({
            "name": "hooks", "kind": "http_sink", "topics": ["t"], "url": "http://h/x",
            "headers": {"Authorization": "${env:HOOK_TOKEN}"}
        }))
        .expect("valid");
        let Kind::HttpSink(h) = &c.kind else {
            panic!("an http_sink")
        };
        assert_eq!(h.delivery.batch_size, None);
        assert_eq!(h.delivery.dead_letters("hooks"), "hooks.dead-letter");
        let bad = |v: serde_json::Value, names: &str| {
            let e = ConnectorConfig::from_json(v).expect_err("invalid");
            assert!(e.contains(names), "{e} should name {names}");
        };
        bad(json!({"name": "h", "kind": "nope"}), "`kind`");
        bad(json!({"name": "h"}), "`kind`");
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "urll": 1}),
            "`urll`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "ftp://h"}),
            "`url`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "url": "http://h"}),
            "`topics`",
        );
        bad(
            json!({"name": "h w", "kind": "http_sink", "topics": ["t"], "url": "http://h"}),
            "`name`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "batch_size": 0}),
            "`batch_size`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "headers": {"A": "${vault:x}"}}),
            "`headers.A`",
        );
        bad(
            json!({"name": "h", "kind": "http_sink", "topics": ["t"], "url": "http://h", "dead_letter_topic": "t"}),
            "`dead_letter_topic`",
        );
    }

    #[test]
    fn secret_references_resolve_from_files_and_name_only_the_reference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        let r = format!("${{file:{}}}", path.display());
        assert_eq!(resolve(&r).expect("file"), "s3cret");
        assert_eq!(resolve("plain").expect("literal"), "plain");
        let e = resolve("${env:TRIBUTARY_SURELY_UNSET_VARIABLE}").expect_err("unset");
        assert!(e.contains("TRIBUTARY_SURELY_UNSET_VARIABLE"), "{e}");
    }
}
