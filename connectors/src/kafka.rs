//! The Kafka connectors, over [`crate::kafka_link`]: `kafka_sink` produces
//! topics into an outside Kafka cluster in transactions that carry the
//! sink's positions; `kafka_source` appends an outside cluster's topics to
//! the log, each record with a header naming where it came from, and
//! checkpoints the positions in the log's metadata. Both exactly once
//! (the config's text for each kind tells how).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::add_partitions_to_txn_request::{
    AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction,
};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, CreateTopicsRequest, EndTxnRequest, FetchRequest,
    FindCoordinatorRequest, InitProducerIdRequest, ListOffsetsRequest, ProduceRequest, ProducerId,
    TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Compression, Record as KafkaRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_kafka::codec::{fetched_batches, kafka_record, produce_batch, FetchedBatch};
use tributary_storage::partitioner::partition_for_key;
use tributary_storage::util::backoff::Backoff;
use tributary_storage::{AppendRecord, Event, Isolation, Log, Record};

use crate::config::{KafkaSink, KafkaSource, Start};
use crate::kafka_link::{code, topic_name, version, Cluster, LinkError, Options};
use crate::sink::{unpaused, wait_after_failure, DeadLetters, Deliver, Outcome, Position, Status};

/// Kafka's topic names: 1–249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(t: &str) -> Result<(), String> {
    let ok = (1..=249).contains(&t.len())
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{t}` is not a Kafka topic name (1–249 letters, digits, `.`, `_`, `-`)"
        ))
    }
}

/// The codec a `compression` setting names.
pub fn compression(s: &str) -> Result<Compression, String> {
    match s {
        "none" => Ok(Compression::None),
        "gzip" => Ok(Compression::Gzip),
        "lz4" => Ok(Compression::Lz4),
        "zstd" => Ok(Compression::Zstd),
        other => Err(format!("`{other}` is not none, gzip, lz4 or zstd")),
    }
}

/// A transaction's limit on the cluster (Kafka aborts one open longer).
const TRANSACTION_TIMEOUT_MS: i32 = 60_000;
/// Wait between tries of a request the coordinator is not ready for.
const COORDINATOR_RETRY: Duration = Duration::from_millis(50);
/// Header of every record a Kafka source appends.
pub const SOURCE_HEADER: &str = "tributary.kafka";
/// Metadata space of the Kafka sources' checkpoints.
const META_SPACE: &str = "kafka_source";

/// Key and value of a position record.
#[derive(Debug, Serialize, Deserialize)]
struct PositionKey {
    connector: String,
    topic: String,
    partition: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct PositionValue {
    next_offset: u64,
}

/// The producer a sink's transactions run under.
#[derive(Debug, Clone, Copy)]
struct Producer {
    id: i64,
    epoch: i16,
    coordinator: i32,
}

/// A transaction of the sink whose end is not seen yet in its partitions.
///
/// Apache Kafka can record a transaction as ended without writing its
/// markers: when a partition has no leader at that moment (a controlled
/// shutdown or a restart of the broker that alone holds it), the coordinator
/// takes the partition for deleted and skips it. The records then stay open,
/// and the producer's next marker in that partition ends them, whichever it
/// is (docs/kafka-compatibility.md, "Found in Apache Kafka itself"). So the
/// sink starts no transaction before the last one's markers are seen, and
/// after a failure (its own crash included: the last transaction is kept in
/// the log's metadata, durably, before it is ended) it ends whatever was left
/// open, the way the transaction was meant to end.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    /// EndTxn commit was sent (answered or not); else it ends in an abort.
    commit_sent: bool,
    /// Every partition added to it, with the last offset of its records
    /// there when the produce was answered.
    parts: Vec<(String, i32, Option<i64>)>,
}

/// What follows a producer's records in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Commit,
    Abort,
    /// No marker of the producer yet: still open.
    Open,
    /// The records are gone (retention): nothing to end.
    Gone,
}

/// Metadata space of the Kafka sinks' last transactions.
const PENDING_SPACE: &str = "kafka_sink";

/// How long the markers of a transaction may take to appear.
const MARKERS_WITHIN: Duration = Duration::from_secs(10);

/// One connection of a `kafka_sink`.
pub struct KafkaOut {
    name: String,
    log: Log,
    cluster: Cluster,
    transactional_id: String,
    kafka_topic: Option<String>,
    create_topics: bool,
    positions_topic: String,
    compression: Compression,
    max_record_bytes: usize,
    timeout: Duration,
    dead: DeadLetters,
    producer: Option<Producer>,
    /// Next sequence per Kafka partition, for the current producer epoch.
    sequences: HashMap<(String, i32), i32>,
    /// Positions as last read back or committed.
    known: HashMap<(String, u32), u64>,
    /// Positions must be read back before the next batch.
    stale: bool,
    /// Kafka topics known to exist.
    ensured: HashSet<String>,
    /// The last transaction, until its markers are seen.
    pending: Option<Pending>,
}

impl KafkaOut {
    /// Connection `index` of sink `name`.
    pub fn new(
        name: &str,
        index: usize,
        config: &KafkaSink,
        log: Log,
        dead: DeadLetters,
    ) -> Result<KafkaOut, String> {
        let options = config.cluster.options(name)?;
        let base = config
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("tributary-{name}"));
        Ok(KafkaOut {
            name: name.to_owned(),
            log,
            cluster: Cluster::new(options.clone()),
            transactional_id: if index == 0 {
                base
            } else {
                format!("{base}-{index}")
            },
            kafka_topic: config.kafka_topic.clone(),
            create_topics: config.create_topics,
            positions_topic: config.positions_topic.clone(),
            compression: compression(&config.compression)?,
            max_record_bytes: config.max_record_bytes,
            timeout: options.timeout,
            dead,
            producer: None,
            sequences: HashMap::new(),
            known: HashMap::new(),
            stale: true,
            ensured: HashSet::new(),
            pending: None,
        }
        .with_pending())
    }

    /// The last transaction as the metadata keeps it (a stored value that
    /// does not decode is ignored, with a warning).
    fn with_pending(mut self) -> KafkaOut {
        match self
            .log
            .meta_get(PENDING_SPACE, self.transactional_id.as_bytes())
        {
            Ok(Some(v)) => match serde_json::from_slice::<Pending>(&v) {
                Ok(p) => self.pending = Some(p),
                Err(e) => {
                    tracing::warn!(connector = %self.name, error = %e, "Kafka sink: its last transaction's record does not decode; ignored");
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(connector = %self.name, error = %e, "Kafka sink: cannot read its last transaction's record");
            }
        }
        self
    }

    /// Keeps `self.pending` in the metadata, durably.
    async fn save_pending(&self) -> Result<(), LinkError> {
        let value = match &self.pending {
            Some(p) => {
                Some(serde_json::to_vec(p).map_err(|e| LinkError::Unreachable(e.to_string()))?)
            }
            None => None,
        };
        self.log
            .put_meta(
                PENDING_SPACE,
                vec![(self.transactional_id.as_bytes().to_vec(), value)],
            )
            .await
            .map_err(|e| LinkError::Unreachable(format!("writing the transaction's record: {e}")))
    }

    fn target(&self, topic: &str) -> String {
        match &self.kafka_topic {
            Some(t) => t.replace("{topic}", topic),
            None => topic.to_owned(),
        }
    }

    /// Forgets the producer and the connections: the next batch starts
    /// with InitProducerId (which ends whatever transaction was open) and
    /// reads the positions back.
    fn reset(&mut self) {
        self.producer = None;
        self.sequences.clear();
        self.stale = true;
        self.cluster.reset();
    }

    async fn coordinator(&mut self) -> Result<i32, LinkError> {
        let req = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(self.transactional_id.clone()))
            .with_key_type(1);
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = self
                .cluster
                .any()
                .await?
                .call(version::FIND_COORDINATOR, &req)
                .await?;
            if r.error_code == code::NONE {
                let port = u16::try_from(r.port).unwrap_or(0);
                self.cluster.learn(r.node_id.0, r.host.to_string(), port);
                return Ok(r.node_id.0);
            }
            if !code::retriable(r.error_code) || Instant::now() > deadline {
                return Err(LinkError::kafka(r.error_code, "FindCoordinator"));
            }
            tokio::time::sleep(COORDINATOR_RETRY).await;
        }
    }

    /// InitProducerId under the transactional id: fences an older
    /// incarnation and ends its open transaction.
    async fn init_producer(&mut self) -> Result<Producer, LinkError> {
        let deadline = Instant::now() + self.timeout;
        let mut coordinator = self.coordinator().await?;
        loop {
            let req = InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_string(
                    self.transactional_id.clone(),
                ))))
                .with_transaction_timeout_ms(TRANSACTION_TIMEOUT_MS)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
            let r = self
                .cluster
                .broker(coordinator)
                .await?
                .call(version::INIT_PRODUCER_ID, &req)
                .await?;
            match r.error_code {
                code::NONE => {
                    let p = Producer {
                        id: r.producer_id.0,
                        epoch: r.producer_epoch,
                        coordinator,
                    };
                    self.producer = Some(p);
                    self.sequences.clear();
                    tracing::debug!(connector = %self.name, producer = p.id, epoch = p.epoch, "Kafka sink: producer initialised");
                    return Ok(p);
                }
                c if code::retriable(c) && Instant::now() < deadline => {
                    if matches!(c, code::NOT_COORDINATOR | code::COORDINATOR_NOT_AVAILABLE) {
                        coordinator = self.coordinator().await?;
                    }
                    tokio::time::sleep(COORDINATOR_RETRY).await;
                }
                c => return Err(LinkError::kafka(c, "InitProducerId")),
            }
        }
    }

    /// Makes sure `topic` exists on the cluster, creating it if allowed;
    /// its partition count.
    async fn ensure_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        compacted: bool,
    ) -> Result<usize, LinkError> {
        if self.ensured.contains(topic) {
            if let Some(ps) = self.cluster.topics.get(topic) {
                return Ok(ps.len());
            }
        }
        self.cluster.refresh(&[topic.to_owned()]).await?;
        if !self.cluster.topics.contains_key(topic) {
            if !self.create_topics {
                return Err(LinkError::Refused(format!(
                    "the cluster has no topic {topic} (and `create_topics` is false)"
                )));
            }
            let mut t = CreatableTopic::default()
                .with_name(topic_name(topic))
                .with_num_partitions(i32::try_from(partitions).unwrap_or(1))
                .with_replication_factor(-1);
            if compacted {
                t.configs = vec![
                    CreatableTopicConfig::default()
                        .with_name(StrBytes::from_static_str("cleanup.policy"))
                        .with_value(Some(StrBytes::from_static_str("compact"))),
                    CreatableTopicConfig::default()
                        .with_name(StrBytes::from_static_str("segment.ms"))
                        .with_value(Some(StrBytes::from_static_str("3600000"))),
                ];
            }
            let req = CreateTopicsRequest::default()
                .with_topics(vec![t])
                .with_timeout_ms(i32::try_from(self.timeout.as_millis()).unwrap_or(30_000));
            let r = self
                .cluster
                .any()
                .await?
                .call(version::CREATE_TOPICS, &req)
                .await?;
            for t in &r.topics {
                if t.error_code != code::NONE && t.error_code != code::TOPIC_ALREADY_EXISTS {
                    return Err(LinkError::kafka(
                        t.error_code,
                        format!(
                            "creating topic {topic}: {}",
                            t.error_message.as_ref().map_or("", |m| m.as_str())
                        ),
                    ));
                }
            }
            tracing::info!(connector = %self.name, %topic, partitions, "Kafka sink: created the topic on the cluster");
            // Leaders take a moment to be elected.
            let deadline = Instant::now() + self.timeout;
            loop {
                self.cluster.refresh(&[topic.to_owned()]).await?;
                let ready = self
                    .cluster
                    .topics
                    .get(topic)
                    .is_some_and(|ps| !ps.is_empty() && ps.iter().all(|p| p.leader >= 0));
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LinkError::kafka(
                        code::LEADER_NOT_AVAILABLE,
                        format!("topic {topic} has no leaders yet"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.ensured.insert(topic.to_owned());
        Ok(self.cluster.topics.get(topic).map_or(0, Vec::len))
    }

    /// Reads every position of this sink back from the positions topic
    /// (committed transactions only).
    async fn read_positions(&mut self) -> Result<(), LinkError> {
        let topic = self.positions_topic.clone();
        self.ensure_topic(&topic, 1, true).await?;
        let mut known = HashMap::new();
        let mut offset = 0i64;
        loop {
            let fetched = fetch_partition(
                &mut self.cluster,
                &topic,
                0,
                offset,
                true,
                4 << 20,
                Duration::ZERO,
            )
            .await?;
            let stable = fetched.stable;
            if fetched.error == code::OFFSET_OUT_OF_RANGE {
                offset = fetched.log_start.max(0);
                continue;
            }
            if fetched.error != code::NONE {
                return Err(LinkError::kafka(fetched.error, format!("fetching {topic}")));
            }
            let before = offset;
            for r in committed(fetched.batches, &fetched.aborted, offset, &mut offset) {
                let Some(key) = r.key.as_ref() else { continue };
                let Ok(k) = serde_json::from_slice::<PositionKey>(key) else {
                    continue;
                };
                if k.connector != self.name {
                    continue;
                }
                match r
                    .value
                    .as_ref()
                    .map(|v| serde_json::from_slice::<PositionValue>(v))
                {
                    Some(Ok(v)) => {
                        known.insert((k.topic, k.partition), v.next_offset);
                    }
                    _ => {
                        known.remove(&(k.topic, k.partition));
                    }
                }
            }
            if offset >= stable {
                break;
            }
            if offset == before {
                return Err(LinkError::Unreachable(format!(
                    "{topic}: no progress reading positions at offset {offset} (stable {stable})"
                )));
            }
        }
        tracing::debug!(connector = %self.name, positions = ?known, stable = offset, "Kafka sink: positions read back");
        self.known = known;
        self.stale = false;
        Ok(())
    }

    /// Adds partitions to the open transaction (retried while the
    /// coordinator finishes the previous one).
    async fn add_partitions(
        &mut self,
        p: Producer,
        parts: &BTreeMap<String, Vec<i32>>,
    ) -> Result<(), LinkError> {
        let req = AddPartitionsToTxnRequest::default().with_transactions(vec![
            AddPartitionsToTxnTransaction::default()
                .with_transactional_id(TransactionalId(StrBytes::from_string(
                    self.transactional_id.clone(),
                )))
                .with_producer_id(ProducerId(p.id))
                .with_producer_epoch(p.epoch)
                .with_topics(
                    parts
                        .iter()
                        .map(|(t, ps)| {
                            AddPartitionsToTxnTopic::default()
                                .with_name(topic_name(t))
                                .with_partitions(ps.clone())
                        })
                        .collect(),
                ),
        ]);
        // v3 and older: the transaction's fields at the top level.
        let req = {
            let t = &req.transactions[0];
            AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(t.transactional_id.clone())
                .with_v3_and_below_producer_id(t.producer_id)
                .with_v3_and_below_producer_epoch(t.producer_epoch)
                .with_v3_and_below_topics(t.topics.clone())
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = self
                .cluster
                .broker(p.coordinator)
                .await?
                .call(version::ADD_PARTITIONS_TO_TXN, &req)
                .await?;
            let worst = r
                .results_by_topic_v3_and_below
                .iter()
                .flat_map(|t| t.results_by_partition.iter())
                .map(|p| p.partition_error_code)
                .find(|&c| c != code::NONE)
                .unwrap_or(r.error_code);
            match worst {
                code::NONE => return Ok(()),
                code::CONCURRENT_TRANSACTIONS if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                c => return Err(LinkError::kafka(c, "AddPartitionsToTxn")),
            }
        }
    }

    /// What follows this producer's records in each partition (`last`:
    /// their last offset).
    async fn markers(
        &mut self,
        pid: i64,
        wanted: &[((String, i32), i64)],
    ) -> Result<Vec<Seen>, LinkError> {
        let from: Vec<(String, i32, i64)> = wanted
            .iter()
            .map(|((t, kp), last)| (t.clone(), *kp, last + 1))
            .collect();
        let fetched = fetch(&mut self.cluster, &from, false, 1 << 20, Duration::ZERO).await?;
        let mut out = vec![Seen::Open; wanted.len()];
        for ((t, kp), mut f) in fetched {
            let Some(i) = wanted
                .iter()
                .position(|((wt, wp), _)| *wt == t && *wp == kp)
            else {
                continue;
            };
            // Other producers' records can come between: read on, up to
            // the partition's end, for a few requests at most.
            for _ in 0..16 {
                // Removed by retention, or cut off by the broker's recovery.
                if f.error == code::OFFSET_OUT_OF_RANGE {
                    out[i] = Seen::Gone;
                    break;
                }
                if f.error != code::NONE {
                    return Err(LinkError::kafka(f.error, format!("fetching {t}/{kp}")));
                }
                if let Some(commit) = marker_of(&f.batches, pid) {
                    out[i] = if commit { Seen::Commit } else { Seen::Abort };
                    break;
                }
                let Some(next) = f.batches.last().map(|b| b.next_offset) else {
                    break;
                };
                if next >= f.stable {
                    break;
                }
                f = fetch_partition(
                    &mut self.cluster,
                    &t,
                    kp,
                    next,
                    false,
                    1 << 20,
                    Duration::ZERO,
                )
                .await?;
            }
        }
        Ok(out)
    }

    /// Waits until the markers of `parts` (`commit`: commit markers) are
    /// in every partition whose records' offsets are known; an error when
    /// one does not come within [`MARKERS_WITHIN`] or is the other kind.
    async fn confirm(
        &mut self,
        p: Producer,
        parts: &[(String, i32, Option<i64>)],
        commit: bool,
    ) -> Result<(), LinkError> {
        let wanted: Vec<((String, i32), i64)> = parts
            .iter()
            .filter_map(|(t, kp, last)| last.map(|l| ((t.clone(), *kp), l)))
            .collect();
        let other = if commit { Seen::Abort } else { Seen::Commit };
        let deadline = Instant::now() + MARKERS_WITHIN;
        let mut wait = Duration::from_millis(1);
        loop {
            let seen = self.markers(p.id, &wanted).await?;
            if let Some(i) = seen.iter().position(|m| *m == other) {
                return Err(LinkError::Unreachable(format!(
                    "the transaction was to {} but {}/{} holds the other marker",
                    if commit { "commit" } else { "abort" },
                    wanted[i].0 .0,
                    wanted[i].0 .1
                )));
            }
            if seen.iter().all(|m| *m != Seen::Open) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LinkError::Unreachable(
                    "the transaction's markers did not appear in its partitions".into(),
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
    }

    /// Ends what `pending` left open, as it was meant to end: a transaction
    /// of the current producer over those partitions, committed or aborted,
    /// whose markers end the open records too. Then the positions are read
    /// again.
    async fn settle(&mut self, p: Producer, pending: Pending) -> Result<(), LinkError> {
        let known: Vec<((String, i32), i64)> = pending
            .parts
            .iter()
            .filter_map(|(t, kp, last)| last.map(|l| ((t.clone(), *kp), l)))
            .collect();
        let seen = self.markers(p.id, &known).await?;
        // Never sent EndTxn: abort. Sent it: as a marker already written
        // says, else commit (every produce had been answered before).
        let commit = pending.commit_sent && !seen.contains(&Seen::Abort);
        let open: Vec<(String, i32, Option<i64>)> = pending
            .parts
            .iter()
            .filter(|(t, kp, last)| match last {
                None => true,
                Some(_) => known
                    .iter()
                    .position(|(k, _)| k.0 == *t && k.1 == *kp)
                    .is_none_or(|i| seen[i] == Seen::Open),
            })
            .cloned()
            .collect();
        if !open.is_empty() {
            tracing::warn!(connector = %self.name, partitions = ?open, commit, "Kafka sink: ending its last transaction in the partitions no marker ended it in");
            let mut parts: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for (t, kp, _) in &open {
                parts.entry(t.clone()).or_default().push(*kp);
            }
            self.add_partitions(p, &parts).await?;
            self.end(p, commit).await?;
            self.confirm(p, &open, commit).await?;
        }
        self.pending = None;
        self.save_pending().await?;
        self.stale = true;
        Ok(())
    }

    async fn end(&mut self, p: Producer, commit: bool) -> Result<(), LinkError> {
        let req = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(
                self.transactional_id.clone(),
            )))
            .with_producer_id(ProducerId(p.id))
            .with_producer_epoch(p.epoch)
            .with_committed(commit);
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = self
                .cluster
                .broker(p.coordinator)
                .await?
                .call(version::END_TXN, &req)
                .await?;
            match r.error_code {
                code::NONE => return Ok(()),
                code::CONCURRENT_TRANSACTIONS if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                c => return Err(LinkError::kafka(c, "EndTxn")),
            }
        }
    }

    /// One batch as one transaction; records at or past the committed
    /// position only.
    async fn attempt(
        &mut self,
        topic: &str,
        records: &[Record],
        next: u64,
    ) -> Result<Outcome, LinkError> {
        let p = match self.producer {
            Some(p) => p,
            None => self.init_producer().await?,
        };
        if let Some(pending) = self.pending.clone() {
            self.settle(p, pending).await?;
        }
        if self.stale {
            self.read_positions().await?;
        }
        let Some(first) = records.first() else {
            return Ok(Outcome::Delivered);
        };
        let partition = first.partition;
        let at = self
            .known
            .get(&(topic.to_owned(), partition))
            .copied()
            .unwrap_or(0);
        if at >= next {
            return Ok(Outcome::Delivered);
        }
        if at < first.offset {
            tracing::warn!(connector = %self.name, topic, partition, cluster = at, from = first.offset, "Kafka sink: the cluster holds less of the partition than the sink delivered");
        }
        let fresh: Vec<&Record> = records.iter().filter(|r| r.offset >= at).collect();
        let (fit, too_large): (Vec<&Record>, Vec<&Record>) = fresh
            .into_iter()
            .partition(|r| record_size(r) <= self.max_record_bytes);
        let target = self.target(topic);
        let source_partitions = self
            .log
            .topic(topic)
            .map_or(1, |t| t.config.partitions)
            .max(partition + 1);
        let n = self
            .ensure_topic(&target, source_partitions, false)
            .await?
            .max(1);
        let positions_topic = self.positions_topic.clone();
        self.ensure_topic(&positions_topic, 1, true).await?;
        // Records per Kafka partition, in offset order.
        let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
        for r in &fit {
            let kp = match &r.key {
                Some(k) => partition_for_key(k, n as u32),
                None => partition % n as u32,
            };
            by_partition.entry(kp as i32).or_default().push(r);
        }
        let mut parts: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        parts.insert(target.clone(), by_partition.keys().copied().collect());
        parts.entry(positions_topic.clone()).or_default().push(0);
        if target == positions_topic {
            return Err(LinkError::Refused(
                "the positions topic is also a target".into(),
            ));
        }
        // From here the transaction may leave records open.
        self.pending = Some(Pending {
            commit_sent: false,
            parts: parts
                .iter()
                .flat_map(|(t, ps)| ps.iter().map(move |kp| (t.clone(), *kp, None)))
                .collect(),
        });
        self.save_pending().await?;
        self.add_partitions(p, &parts).await?;
        // Produce, one request per leader.
        let mut per_leader: BTreeMap<i32, Vec<(String, i32, Bytes, i32)>> = BTreeMap::new();
        for (kp, rs) in &by_partition {
            let seq = *self.sequences.get(&(target.clone(), *kp)).unwrap_or(&0);
            let batch = encode(rs, p, seq, self.compression)
                .map_err(|e| LinkError::Refused(e.to_string()))?;
            let leader = self.cluster.leader(&target, *kp).await?;
            per_leader.entry(leader).or_default().push((
                target.clone(),
                *kp,
                batch,
                rs.len() as i32,
            ));
        }
        let key = serde_json::to_vec(&PositionKey {
            connector: self.name.clone(),
            topic: topic.to_owned(),
            partition,
        })
        .map_err(|e| LinkError::Refused(e.to_string()))?;
        let value = serde_json::to_vec(&PositionValue { next_offset: next })
            .map_err(|e| LinkError::Refused(e.to_string()))?;
        let position = Record {
            partition: 0,
            offset: 0,
            key: Some(key),
            value: Some(value),
            timestamp: tributary_storage::util::now_ms(),
            headers: Vec::new(),
        };
        let seq = *self
            .sequences
            .get(&(positions_topic.clone(), 0))
            .unwrap_or(&0);
        let batch = encode(&[&position], p, seq, Compression::None)
            .map_err(|e| LinkError::Refused(e.to_string()))?;
        let leader = self.cluster.leader(&positions_topic, 0).await?;
        per_leader
            .entry(leader)
            .or_default()
            .push((positions_topic.clone(), 0, batch, 1));
        for (leader, batches) in &per_leader {
            let mut written = BTreeMap::new();
            let produced = self.produce(*leader, batches, &mut written).await;
            if let Some(pending) = &mut self.pending {
                for (t, kp, last) in &mut pending.parts {
                    if let Some(l) = written.get(&(t.clone(), *kp)) {
                        *last = Some(*l);
                    }
                }
            }
            produced?;
        }
        // Records too large for the cluster go to the dead-letter topic,
        // durably before the commit: after a crash a dead letter may repeat,
        // a record is never lost.
        let dead_lettered = too_large.len() as u64;
        if !too_large.is_empty() {
            let owned: Vec<Record> = too_large.into_iter().cloned().collect();
            let error = format!(
                "larger than `max_record_bytes` ({} bytes)",
                self.max_record_bytes
            );
            self.dead
                .send(topic, &owned, &error)
                .await
                .map_err(LinkError::Unreachable)?;
        }
        if let Some(pending) = &mut self.pending {
            pending.commit_sent = true;
        }
        self.save_pending().await?;
        self.end(p, true).await?;
        if let Some(pending) = self.pending.clone() {
            self.confirm(p, &pending.parts, true).await?;
            // The record stays (the next transaction overwrites it): after
            // a crash its markers are found written.
            self.pending = None;
        }
        for batches in per_leader.values() {
            for (t, kp, _, count) in batches {
                *self.sequences.entry((t.clone(), *kp)).or_insert(0) += count;
            }
        }
        tracing::debug!(connector = %self.name, topic, partition, from = at, next, records = fit.len(), producer = p.id, epoch = p.epoch, "Kafka sink: committed");
        self.known.insert((topic.to_owned(), partition), next);
        Ok(if dead_lettered == 0 {
            Outcome::Delivered
        } else {
            Outcome::DeliveredExcept { dead_lettered }
        })
    }

    /// Sends `batches` to `leader`; `written` gets the last offset of each
    /// partition's batch the broker took.
    async fn produce(
        &mut self,
        leader: i32,
        batches: &[(String, i32, Bytes, i32)],
        written: &mut BTreeMap<(String, i32), i64>,
    ) -> Result<(), LinkError> {
        let mut topics: BTreeMap<&str, Vec<PartitionProduceData>> = BTreeMap::new();
        for (t, kp, bytes, _) in batches {
            topics.entry(t.as_str()).or_default().push(
                PartitionProduceData::default()
                    .with_index(*kp)
                    .with_records(Some(bytes.clone())),
            );
        }
        let req = ProduceRequest::default()
            .with_transactional_id(Some(TransactionalId(StrBytes::from_string(
                self.transactional_id.clone(),
            ))))
            .with_acks(-1)
            .with_timeout_ms(i32::try_from(self.timeout.as_millis()).unwrap_or(30_000))
            .with_topic_data(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        TopicProduceData::default()
                            .with_name(topic_name(t))
                            .with_partition_data(ps)
                    })
                    .collect(),
            );
        let r = self
            .cluster
            .broker(leader)
            .await?
            .call(version::PRODUCE, &req)
            .await?;
        for t in &r.responses {
            for p in &t.partition_responses {
                if p.error_code == code::NONE {
                    let count = batches
                        .iter()
                        .find(|(bt, kp, _, _)| bt.as_str() == t.name.0.as_str() && *kp == p.index)
                        .map_or(1, |b| b.3);
                    written.insert(
                        (t.name.0.to_string(), p.index),
                        p.base_offset + i64::from(count) - 1,
                    );
                }
            }
        }
        for t in &r.responses {
            for p in &t.partition_responses {
                if p.error_code != code::NONE {
                    if matches!(
                        p.error_code,
                        code::NOT_LEADER_OR_FOLLOWER | code::UNKNOWN_TOPIC_OR_PARTITION
                    ) {
                        self.cluster.topics.remove(t.name.0.as_str());
                    }
                    return Err(LinkError::kafka(
                        p.error_code,
                        format!(
                            "producing to {}/{}: {}",
                            t.name.0,
                            p.index,
                            p.error_message.as_ref().map_or("", |m| m.as_str())
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A record's bytes as Kafka counts them (roughly: key, value, headers).
fn record_size(r: &Record) -> usize {
    r.key.as_ref().map_or(0, Vec::len)
        + r.value.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
        + 32
}

/// Records as one transactional batch of producer `p` from sequence `seq`.
fn encode(
    records: &[&Record],
    p: Producer,
    seq: i32,
    compression: Compression,
) -> Result<Bytes, tributary_kafka::Error> {
    let kafka: Vec<KafkaRecord> = records
        .iter()
        .enumerate()
        .map(|(i, r)| KafkaRecord {
            transactional: true,
            partition_leader_epoch: -1,
            producer_id: p.id,
            producer_epoch: p.epoch,
            ..kafka_record(r, i as i64, seq.wrapping_add(i as i32))
        })
        .collect();
    produce_batch(&kafka, compression)
}

impl Deliver for KafkaOut {
    async fn deliver(&mut self, topic: &str, records: &[Record], next: u64) -> Outcome {
        let limit = self.timeout * 3;
        let error = match tokio::time::timeout(limit, self.attempt(topic, records, next)).await {
            Ok(Ok(outcome)) => return outcome,
            Ok(Err(e)) => e,
            Err(_) => LinkError::Unreachable(format!(
                "the batch took longer than {} ms",
                limit.as_millis()
            )),
        };
        // Whatever state the transaction is in, the next try fences it
        // (InitProducerId) and reads the positions again.
        tracing::debug!(connector = %self.name, topic, next, %error, "Kafka sink: the batch failed");
        self.reset();
        match error {
            LinkError::Kafka {
                code: code::MESSAGE_TOO_LARGE | code::RECORD_LIST_TOO_LARGE | code::INVALID_RECORD,
                context,
            } => Outcome::Refused(format!("{context}: the cluster refused the records")),
            e => Outcome::Unavailable(e.to_string()),
        }
    }

    fn keeps_positions(&self) -> bool {
        true
    }

    async fn positions(&mut self) -> Result<Vec<Position>, String> {
        let limit = self.timeout * 3;
        let read = async {
            let p = match self.producer {
                Some(p) => p,
                None => self.init_producer().await?,
            };
            if let Some(pending) = self.pending.clone() {
                self.settle(p, pending).await?;
            }
            self.read_positions().await
        };
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(())) => Ok(self
                .known
                .iter()
                .map(|((t, p), n)| ((t.clone(), *p), *n))
                .collect()),
            Ok(Err(e)) => {
                self.reset();
                Err(e.to_string())
            }
            Err(_) => {
                self.reset();
                Err("no answer from the Kafka cluster".into())
            }
        }
    }
}

/// The end of `pid`'s open records in these batches: the first of its
/// markers (`true`: commit).
fn marker_of(batches: &[FetchedBatch], pid: i64) -> Option<bool> {
    batches
        .iter()
        .find(|b| b.control && b.producer_id == pid)
        .and_then(|b| b.records.first())
        .and_then(|r| r.key.as_ref())
        .filter(|k| k.len() >= 4)
        .map(|k| i16::from_be_bytes([k[2], k[3]]) == 1)
}

/// One partition's fetch answer.
struct Fetched {
    error: i16,
    /// Last stable offset (read_committed) or high watermark.
    stable: i64,
    log_start: i64,
    aborted: Vec<(i64, i64)>,
    batches: Vec<FetchedBatch>,
}

/// Fetches one partition from its leader.
async fn fetch_partition(
    cluster: &mut Cluster,
    topic: &str,
    partition: i32,
    offset: i64,
    read_committed: bool,
    max_bytes: usize,
    wait: Duration,
) -> Result<Fetched, LinkError> {
    let mut all = fetch(
        cluster,
        &[(topic.to_owned(), partition, offset)],
        read_committed,
        max_bytes,
        wait,
    )
    .await?;
    all.pop()
        .map(|(_, f)| f)
        .ok_or_else(|| LinkError::Unreachable(format!("no answer for {topic}/{partition}")))
}

/// Fetches partitions (grouped by leader, one request each).
async fn fetch(
    cluster: &mut Cluster,
    wanted: &[(String, i32, i64)],
    read_committed: bool,
    max_bytes: usize,
    wait: Duration,
) -> Result<Vec<((String, i32), Fetched)>, LinkError> {
    let mut per_leader: BTreeMap<i32, BTreeMap<&str, Vec<FetchPartition>>> = BTreeMap::new();
    let per_partition = i32::try_from((max_bytes / 4).max(1 << 20)).unwrap_or(i32::MAX);
    for (t, p, offset) in wanted {
        let leader = cluster.leader(t, *p).await?;
        per_leader
            .entry(leader)
            .or_default()
            .entry(t.as_str())
            .or_default()
            .push(
                FetchPartition::default()
                    .with_partition(*p)
                    .with_fetch_offset(*offset)
                    .with_partition_max_bytes(per_partition),
            );
    }
    let mut out = Vec::new();
    for (leader, topics) in per_leader {
        let req = FetchRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_max_wait_ms(i32::try_from(wait.as_millis()).unwrap_or(500))
            .with_min_bytes(1)
            .with_max_bytes(i32::try_from(max_bytes).unwrap_or(i32::MAX))
            .with_isolation_level(i8::from(read_committed))
            .with_session_epoch(-1)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        FetchTopic::default()
                            .with_topic(topic_name(t))
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        let conn = cluster.broker(leader).await?;
        let limit = conn_timeout(wait);
        let r = match conn.call_within(version::FETCH, &req, limit).await {
            Ok(r) => r,
            Err(e) => {
                cluster.drop_broker(leader);
                return Err(e);
            }
        };
        if r.error_code != code::NONE {
            return Err(LinkError::kafka(r.error_code, "Fetch"));
        }
        for t in r.responses {
            let topic = t.topic.0.to_string();
            for p in t.partitions {
                if matches!(
                    p.error_code,
                    code::NOT_LEADER_OR_FOLLOWER
                        | code::UNKNOWN_TOPIC_OR_PARTITION
                        | code::FENCED_LEADER_EPOCH
                        | code::UNKNOWN_LEADER_EPOCH
                ) {
                    cluster.topics.remove(&topic);
                }
                let batches = match &p.records {
                    Some(b) if p.error_code == code::NONE => fetched_batches(b).map_err(|e| {
                        LinkError::Unreachable(format!(
                            "{topic}/{}: an unreadable batch: {e}",
                            p.partition_index
                        ))
                    })?,
                    _ => Vec::new(),
                };
                let stable = if read_committed && p.last_stable_offset >= 0 {
                    p.last_stable_offset
                } else {
                    p.high_watermark
                };
                let mut aborted: Vec<(i64, i64)> = p
                    .aborted_transactions
                    .unwrap_or_default()
                    .iter()
                    .map(|a| (a.first_offset, a.producer_id.0))
                    .collect();
                aborted.sort_unstable();
                out.push((
                    (topic.clone(), p.partition_index),
                    Fetched {
                        error: p.error_code,
                        stable,
                        log_start: p.log_start_offset,
                        aborted,
                        batches,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// A fetch's time limit: the connection's, plus the broker's wait.
fn conn_timeout(wait: Duration) -> Duration {
    Duration::from_secs(30) + wait
}

/// The records of committed data at or past `from`, as a read_committed
/// consumer sees them: control batches and batches of aborted
/// transactions skipped (Kafka's `aborted_transactions` list: a producer's
/// transactional batches from its first offset up to its abort marker).
/// `next` moves past every batch read.
pub fn committed(
    batches: Vec<FetchedBatch>,
    aborted: &[(i64, i64)],
    from: i64,
    next: &mut i64,
) -> Vec<KafkaRecord> {
    let mut pending = aborted.iter().peekable();
    let mut aborting: HashSet<i64> = HashSet::new();
    let mut out = Vec::new();
    for b in batches {
        if b.next_offset <= from {
            continue;
        }
        while let Some(&&(first, pid)) = pending.peek() {
            if first > b.next_offset - 1 {
                break;
            }
            aborting.insert(pid);
            pending.next();
        }
        *next = (*next).max(b.next_offset);
        if b.control {
            if b.transactional {
                aborting.remove(&b.producer_id);
            }
            continue;
        }
        if b.transactional && aborting.contains(&b.producer_id) {
            continue;
        }
        out.extend(b.records.into_iter().filter(|r| r.offset >= from));
    }
    out
}

// ---------------------------------------------------------------- source

/// A source's checkpoint of one Kafka partition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Checkpoint {
    /// The next Kafka offset to read.
    next: i64,
    /// The log partition its records go to.
    partition: u32,
    /// Where in that partition a record past `next` can be: records
    /// appended after the checkpoint was written start at or after it.
    scan_from: u64,
}

fn checkpoint_key(name: &str, topic: &str, partition: i32) -> Vec<u8> {
    format!("{name}/{topic}/{partition}").into_bytes()
}

/// Where a source stands in one Kafka partition.
struct SourcePartition {
    target: String,
    log_partition: u32,
    next: i64,
}

/// Runs a `kafka_source` until `cancel`, pausing while `paused`.
pub async fn run_source(
    log: Log,
    name: String,
    config: KafkaSource,
    status: Arc<Status>,
    cancel: CancellationToken,
    mut paused: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(config.min_backoff_ms),
        Duration::from_millis(config.max_backoff_ms.max(config.min_backoff_ms)),
    );
    let options = match config.cluster.options(&name) {
        Ok(o) => o,
        Err(e) => {
            status.failed(&e);
            return;
        }
    };
    loop {
        if !unpaused(&cancel, &mut paused).await {
            return;
        }
        let mut source = Source {
            log: &log,
            name: &name,
            config: &config,
            status: &status,
            cluster: Cluster::new(options.clone()),
            partitions: BTreeMap::new(),
        };
        let error = tokio::select! {
            () = cancel.cancelled() => return,
            _ = paused.changed() => continue,
            e = source.run(&mut backoff) => e,
        };
        let what = format!("Kafka source {name}");
        if !wait_after_failure(&status, &mut backoff, &cancel, &mut paused, &error, &what).await {
            return;
        }
    }
}

struct Source<'a> {
    log: &'a Log,
    name: &'a str,
    config: &'a KafkaSource,
    status: &'a Status,
    cluster: Cluster,
    partitions: BTreeMap<(String, i32), SourcePartition>,
}

/// How often a source asks for new partitions.
const METADATA_EVERY: Duration = Duration::from_secs(30);
/// How long a fetch waits on the broker for records.
const FETCH_WAIT: Duration = Duration::from_millis(500);

impl Source<'_> {
    async fn run(&mut self, backoff: &mut Backoff) -> String {
        match self.serve(backoff).await {
            Ok(()) => "the source stopped".into(),
            Err(e) => e.to_string(),
        }
    }

    async fn serve(&mut self, backoff: &mut Backoff) -> Result<(), LinkError> {
        let mut asked = Instant::now() - METADATA_EVERY;
        loop {
            if asked.elapsed() >= METADATA_EVERY || self.partitions.is_empty() {
                self.discover().await?;
                asked = Instant::now();
                if self.partitions.is_empty() {
                    tokio::time::sleep(FETCH_WAIT).await;
                    continue;
                }
            }
            let wanted: Vec<(String, i32, i64)> = self
                .partitions
                .iter()
                .map(|((t, p), s)| (t.clone(), *p, s.next))
                .collect();
            let answers = fetch(
                &mut self.cluster,
                &wanted,
                self.config.read_committed,
                self.config.fetch_max_bytes,
                FETCH_WAIT,
            )
            .await?;
            let mut any = false;
            for ((topic, p), f) in answers {
                match f.error {
                    code::NONE => {}
                    code::OFFSET_OUT_OF_RANGE => {
                        self.out_of_range(&topic, p).await?;
                        continue;
                    }
                    c if code::retriable(c) => {
                        asked = Instant::now() - METADATA_EVERY;
                        continue;
                    }
                    c => return Err(LinkError::kafka(c, format!("fetching {topic}/{p}"))),
                }
                any |= self.take(&topic, p, f).await?;
            }
            if any {
                backoff.reset();
                self.status.cleared();
            }
        }
    }

    /// Learns the topics' partitions; a new one starts from its checkpoint
    /// (completed from the log) or from `start`.
    async fn discover(&mut self) -> Result<(), LinkError> {
        self.cluster.refresh(&self.config.kafka_topics).await?;
        let mut new = Vec::new();
        for t in &self.config.kafka_topics {
            let Some(ps) = self.cluster.topics.get(t) else {
                continue;
            };
            for p in 0..ps.len() as i32 {
                if !self.partitions.contains_key(&(t.clone(), p)) {
                    new.push((t.clone(), p));
                }
            }
        }
        for (t, p) in new {
            let target = self.config.topic.clone().unwrap_or_else(|| t.clone());
            let state = self.resume(&t, p, &target).await?;
            self.partitions.insert((t, p), state);
        }
        Ok(())
    }

    /// Where partition `p` of Kafka topic `t` resumes.
    async fn resume(
        &mut self,
        t: &str,
        p: i32,
        target: &str,
    ) -> Result<SourcePartition, LinkError> {
        let key = checkpoint_key(self.name, t, p);
        let stored = self
            .log
            .meta_get(META_SPACE, &key)
            .map_err(|e| LinkError::Unreachable(format!("reading checkpoints: {e}")))?
            .and_then(|v| serde_json::from_slice::<Checkpoint>(&v).ok());
        if let Some(c) = stored {
            let next = self.scan(target, c, t, p)?;
            return Ok(SourcePartition {
                target: target.to_owned(),
                log_partition: c.partition,
                next,
            });
        }
        // First time: the log partition, and a checkpoint before anything
        // is appended (so a crash after the first append is found by the
        // scan from here).
        let partitions = match self.log.topic(target) {
            Ok(info) => info.config.partitions,
            Err(_) if !self.log.config().auto_create_topics => {
                return Err(LinkError::Refused(format!(
                    "no topic {target} (and the node does not create topics)"
                )))
            }
            Err(_) => {
                // As many partitions as the Kafka topic: each goes to its own.
                let n = self.cluster.topics.get(t).map_or(1, Vec::len) as u32;
                let mut config = self.log.config().topic_defaults.config(target);
                config.partitions = n.max(1);
                match self.log.create_topic(config).await {
                    Ok(info) => info.config.partitions,
                    Err(tributary_storage::Error::TopicExists(_)) => {
                        self.log.topic(target).map_or(1, |i| i.config.partitions)
                    }
                    Err(e) => {
                        return Err(LinkError::Refused(format!(
                            "cannot create topic {target}: {e}"
                        )))
                    }
                }
            }
        };
        let log_partition = (p as u32) % partitions.max(1);
        let next = self.first_offset(t, p).await?;
        let (_, end) = self
            .log
            .offsets(target, log_partition)
            .map_err(|e| LinkError::Unreachable(format!("{target}: {e}")))?;
        self.write_checkpoint(t, p, next, log_partition, end)
            .await?;
        Ok(SourcePartition {
            target: target.to_owned(),
            log_partition,
            next,
        })
    }

    /// The checkpoint's position, moved past every record of this Kafka
    /// partition the log holds beyond it.
    fn scan(&self, target: &str, c: Checkpoint, t: &str, p: i32) -> Result<i64, LinkError> {
        let prefix = format!("{}/{t}/{p}/", self.name);
        let mut next = c.next;
        let mut at = c.scan_from;
        loop {
            // Uncommitted: another producer's open transaction in the topic
            // must not hide our records beyond it.
            let read = match self.log.read_isolated(
                target,
                c.partition,
                at,
                1000,
                4 << 20,
                Isolation::Uncommitted,
            ) {
                Ok(r) => r,
                Err(tributary_storage::Error::UnknownTopic(_)) => return Ok(next),
                Err(e) => return Err(LinkError::Unreachable(format!("{target}: {e}"))),
            };
            let records = read.records;
            for r in &records {
                let origin = r
                    .headers
                    .iter()
                    .rev()
                    .find(|(k, _)| k == SOURCE_HEADER)
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .and_then(|v| v.strip_prefix(&prefix))
                    .and_then(|o| o.parse::<i64>().ok());
                if let Some(o) = origin {
                    next = next.max(o + 1);
                }
            }
            if read.next_offset <= at || read.next_offset >= read.end_offset {
                return Ok(next);
            }
            at = read.next_offset;
        }
    }

    async fn first_offset(&mut self, t: &str, p: i32) -> Result<i64, LinkError> {
        let timestamp = match self.config.start {
            Start::Earliest => -2,
            Start::Latest => -1,
        };
        self.offset_at(t, p, timestamp).await
    }

    /// ListOffsets: −2 the earliest, −1 the latest.
    async fn offset_at(&mut self, t: &str, p: i32, timestamp: i64) -> Result<i64, LinkError> {
        let leader = self.cluster.leader(t, p).await?;
        let req = ListOffsetsRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_isolation_level(i8::from(self.config.read_committed))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(topic_name(t))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(p)
                    .with_timestamp(timestamp)])]);
        let r = self
            .cluster
            .broker(leader)
            .await?
            .call(version::LIST_OFFSETS, &req)
            .await?;
        let part = r
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter())
            .find(|x| x.partition_index == p)
            .ok_or_else(|| LinkError::Unreachable(format!("no offset for {t}/{p}")))?;
        if part.error_code != code::NONE {
            if code::retriable(part.error_code) {
                self.cluster.topics.remove(t);
            }
            return Err(LinkError::kafka(
                part.error_code,
                format!("ListOffsets {t}/{p}"),
            ));
        }
        Ok(part.offset)
    }

    async fn write_checkpoint(
        &self,
        t: &str,
        p: i32,
        next: i64,
        partition: u32,
        scan_from: u64,
    ) -> Result<(), LinkError> {
        let value = serde_json::to_vec(&Checkpoint {
            next,
            partition,
            scan_from,
        })
        .map_err(|e| LinkError::Unreachable(e.to_string()))?;
        self.log
            .put_meta(
                META_SPACE,
                vec![(checkpoint_key(self.name, t, p), Some(value))],
            )
            .await
            .map_err(|e| LinkError::Unreachable(format!("writing a checkpoint: {e}")))
    }

    /// The records were removed on the cluster (retention) before we read
    /// them: go on from its earliest, saying so.
    async fn out_of_range(&mut self, t: &str, p: i32) -> Result<(), LinkError> {
        let was = self
            .partitions
            .get(&(t.to_owned(), p))
            .map_or(0, |s| s.next);
        let earliest = self.offset_at(t, p, -2).await?;
        if earliest > was {
            tracing::warn!(connector = %self.name, topic = %t, partition = p, was, now = earliest,
                "Kafka source: records the cluster removed before they were read are skipped");
            self.status
                .dead_letters
                .fetch_add((earliest - was) as u64, Relaxed);
        }
        if let Some(s) = self.partitions.get_mut(&(t.to_owned(), p)) {
            s.next = earliest.max(was);
        }
        Ok(())
    }

    /// Appends one partition's fetched records (durably, with their origin
    /// header) and checkpoints; whether anything moved.
    async fn take(&mut self, t: &str, p: i32, f: Fetched) -> Result<bool, LinkError> {
        let Some(state) = self.partitions.get(&(t.to_owned(), p)) else {
            return Ok(false);
        };
        let from = state.next;
        let mut next = from;
        let records = committed(f.batches, &f.aborted, from, &mut next);
        if next == from {
            return Ok(false);
        }
        let (target, log_partition) = (state.target.clone(), state.log_partition);
        let max_event = self
            .log
            .topic(&target)
            .map_or(self.log.config().topic_defaults.max_event_bytes, |i| {
                i.config.max_event_bytes
            });
        let prefix = format!("{}/{t}/{p}/", self.name);
        let mut events = Vec::with_capacity(records.len());
        let mut dropped = 0u64;
        for r in records {
            let mut headers: Vec<(String, Vec<u8>)> = r
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.as_ref().map_or_else(Vec::new, |v| v.to_vec()),
                    )
                })
                .collect();
            headers.push((
                SOURCE_HEADER.to_owned(),
                format!("{prefix}{}", r.offset).into_bytes(),
            ));
            let event = Event {
                key: r.key.map(|k| k.to_vec()),
                value: r.value.map(|v| v.to_vec()),
                timestamp: Some(r.timestamp),
                headers,
            };
            if event.size() > max_event {
                dropped += 1;
                continue;
            }
            events.push(AppendRecord {
                partition: Some(log_partition),
                event,
            });
        }
        if dropped > 0 {
            tracing::warn!(connector = %self.name, topic = %t, partition = p, records = dropped, max_event,
                "Kafka source: records larger than the topic takes, dropped");
            self.status.dead_letters.fetch_add(dropped, Relaxed);
        }
        let count = events.len() as u64;
        let mut scan_from = None;
        if !events.is_empty() {
            let positions = tributary_ingest::append_topic(self.log, &target, events)
                .await
                .map_err(|e| LinkError::Unreachable(format!("cannot append to {target}: {e}")))?;
            scan_from = positions.iter().map(|x| x.offset + 1).max();
        }
        let scan_from = match scan_from {
            Some(s) => s,
            None => self
                .log
                .offsets(&target, log_partition)
                .map(|(_, end)| end)
                .map_err(|e| LinkError::Unreachable(format!("{target}: {e}")))?,
        };
        self.write_checkpoint(t, p, next, log_partition, scan_from)
            .await?;
        if let Some(s) = self.partitions.get_mut(&(t.to_owned(), p)) {
            s.next = next;
        }
        self.status.delivered.fetch_add(count, Relaxed);
        self.status.batches.fetch_add(1, Relaxed);
        Ok(true)
    }
}

/// Probes a Kafka connector's cluster: logs in and reads metadata.
pub async fn probe(options: &Options) -> Result<(), LinkError> {
    let mut cluster = Cluster::new(options.clone());
    cluster.refresh(&[]).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::TimestampType;

    fn batch(first: i64, count: i64, pid: i64, transactional: bool, control: bool) -> FetchedBatch {
        FetchedBatch {
            records: (first..first + count)
                .map(|o| KafkaRecord {
                    transactional,
                    control,
                    delete_horizon: false,
                    partition_leader_epoch: 0,
                    producer_id: pid,
                    producer_epoch: 0,
                    timestamp_type: TimestampType::Creation,
                    offset: o,
                    sequence: 0,
                    timestamp: 0,
                    key: None,
                    value: Some(Bytes::from(o.to_string())),
                    headers: Vec::new(),
                })
                .collect(),
            next_offset: first + count,
            producer_id: pid,
            transactional,
            control,
        }
    }

    #[test]
    fn aborted_transactions_and_markers_are_skipped_like_a_read_committed_consumer() {
        // 0-1 plain; 2-3 producer 7 (aborted, marker at 4); 5-6 producer 8
        // (committed, marker at 7); 8-9 producer 7 again (committed, marker 10).
        let batches = vec![
            batch(0, 2, -1, false, false),
            batch(2, 2, 7, true, false),
            batch(4, 1, 7, true, true),
            batch(5, 2, 8, true, false),
            batch(7, 1, 8, true, true),
            batch(8, 2, 7, true, false),
            batch(10, 1, 7, true, true),
        ];
        let mut next = 1;
        let got: Vec<i64> = committed(batches, &[(2, 7)], 1, &mut next)
            .iter()
            .map(|r| r.offset)
            .collect();
        assert_eq!(got, vec![1, 5, 6, 8, 9]);
        assert_eq!(next, 11, "past the last marker");
    }

    #[test]
    fn the_marker_that_ends_a_producers_records_is_its_first_one_after_them() {
        let marker = |pid: i64, commit: bool| {
            let mut b = batch(0, 1, pid, true, true);
            b.records[0].key = Some(Bytes::from(vec![0, 0, 0, u8::from(commit)]));
            b
        };
        // Another producer's marker and records come first.
        let batches = vec![
            marker(8, true),
            batch(1, 3, 8, true, false),
            marker(7, false),
            marker(7, true),
        ];
        assert_eq!(marker_of(&batches, 7), Some(false));
        assert_eq!(marker_of(&batches, 8), Some(true));
        assert_eq!(marker_of(&batches, 9), None);
        assert_eq!(marker_of(&batches[1..2], 8), None, "records are no marker");
    }

    #[test]
    fn topic_names_and_codecs_are_checked() {
        assert!(check_topic_name("orders.v1_x-y").is_ok());
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(check_topic_name(bad).is_err(), "{bad}");
        }
        assert!(compression("zstd").is_ok());
        assert!(compression("snappy").is_err());
    }
}
