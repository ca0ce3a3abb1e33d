//! The bridge between a RabbitMQ (or any AMQP 0-9-1 broker) and the log, on
//! lapin. One task per `[[amqp.bridges]]` entry:
//!
//! - `direction = "in"`: consume a queue into a topic. Deliveries ready
//!   together become one append; RabbitMQ gets `basic.ack` (multiple) only
//!   once the append is durable. A crash between the two redelivers: at least
//!   once.
//! - `direction = "out"`: forward a topic to an exchange with publisher
//!   confirms. The position is a consumer group (`amqp-bridge-<name>`),
//!   committed only after RabbitMQ confirmed everything before it: at least
//!   once, in partition order.
//!
//! Both reconnect with exponential backoff and full jitter, and put timeouts
//! around everything that waits on the broker (lapin's auto-recovery once left
//! a confirm unresolved, so it is not used).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tributary_storage::{AppendRecord, GroupOffset, Log};

use super::frame::short;
use super::mapping;
use crate::{FrontendContext, MetricsSource};

/// Which way a bridge moves messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// RabbitMQ queue → topic.
    In,
    /// Topic → RabbitMQ exchange.
    Out,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// One `[[amqp.bridges]]` entry.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Name (metrics label, consumer group suffix).
    pub name: String,
    /// Which way.
    pub direction: Direction,
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The log topic.
    pub topic: String,
    /// `in`: the queue to consume.
    pub queue: String,
    /// `out`: the exchange to publish to (`""`: the default exchange).
    pub exchange: String,
    /// `out`: a fixed routing key; otherwise the record's key, or the topic name.
    pub routing_key: Option<String>,
    /// Messages per append (`in`, also the prefetch) or per confirm round (`out`).
    pub batch: u16,
    /// How long a connect, a confirm round or an ack may take.
    pub timeout: Duration,
    /// First reconnect delay; doubles up to `max_backoff`, with full jitter.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

impl BridgeConfig {
    /// The consumer group an `out` bridge keeps its position in.
    pub fn group(&self) -> String {
        format!("amqp-bridge-{}", self.name)
    }
}

/// Counters of one bridge.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Messages moved (appended durably, or confirmed by the broker).
    pub messages: AtomicU64,
    /// Connections made.
    pub connects: AtomicU64,
    /// Failures that ended a connection (broker gone, timeout, nack).
    pub errors: AtomicU64,
    /// Messages refused for good (larger than the topic allows).
    pub rejected: AtomicU64,
    /// Connected now.
    pub connected: AtomicBool,
}

/// Metrics of every bridge of a node.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    bridges: Mutex<Vec<(String, Direction, Arc<BridgeStats>)>>,
}

impl BridgeMetrics {
    fn add(&self, name: &str, direction: Direction) -> Arc<BridgeStats> {
        let stats = Arc::new(BridgeStats::default());
        self.bridges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_owned(), direction, stats.clone()));
        stats
    }
}

impl MetricsSource for BridgeMetrics {
    fn render(&self, out: &mut String) {
        let bridges = self.bridges.lock().unwrap_or_else(|p| p.into_inner());
        if bridges.is_empty() {
            return;
        }
        type Field = fn(&BridgeStats) -> u64;
        let series: [(&str, &str, &str, Field); 5] = [
            (
                "messages_total",
                "counter",
                "Messages moved: appended durably (in) or confirmed by the broker (out).",
                |s| s.messages.load(Relaxed),
            ),
            (
                "connects_total",
                "counter",
                "Connections made to the broker.",
                |s| s.connects.load(Relaxed),
            ),
            (
                "errors_total",
                "counter",
                "Failures that ended a broker connection.",
                |s| s.errors.load(Relaxed),
            ),
            (
                "rejected_total",
                "counter",
                "Messages rejected for good (in: larger than the topic allows).",
                |s| s.rejected.load(Relaxed),
            ),
            (
                "connected",
                "gauge",
                "1 while connected to the broker.",
                |s| u64::from(s.connected.load(Relaxed)),
            ),
        ];
        for (name, kind, help, field) in series {
            let _ = writeln!(out, "# HELP tributary_amqp_bridge_{name} {help}\n# TYPE tributary_amqp_bridge_{name} {kind}");
            for (bridge, direction, stats) in bridges.iter() {
                let _ = writeln!(
                    out,
                    "tributary_amqp_bridge_{name}{{bridge=\"{bridge}\",direction=\"{}\"}} {}",
                    direction.label(),
                    field(stats)
                );
            }
        }
    }
}

/// Starts every bridge; they run until the node shuts down.
pub fn start(cx: &FrontendContext, bridges: Vec<BridgeConfig>) -> Vec<tokio::task::JoinHandle<()>> {
    if bridges.is_empty() {
        return Vec::new();
    }
    let metrics = Arc::new(BridgeMetrics::default());
    cx.metrics.register(metrics.clone());
    bridges
        .into_iter()
        .map(|config| {
            let stats = metrics.add(&config.name, config.direction);
            let cx = cx.clone();
            tokio::spawn(run(cx, config, stats))
        })
        .collect()
}

/// Why a bridge session ended.
#[derive(Debug, thiserror::Error)]
enum BridgeError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("log: {0}")]
    Log(#[from] tributary_storage::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the broker refused a message (basic.nack)")]
    Nacked,
    #[error("the broker could not route a message to any queue (basic.return)")]
    Unroutable,
    #[error("the channel closed before an ack could be sent")]
    AckLost,
    #[error("the consumer was cancelled")]
    Cancelled,
}

async fn timed<T, E: Into<BridgeError>>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BridgeError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(BridgeError::Timeout(what)),
    }
}

/// Full jitter: a random delay in `[0, min(max, base × 2^attempt)]`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let cap = base
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
}

async fn run(cx: FrontendContext, config: BridgeConfig, stats: Arc<BridgeStats>) {
    let mut attempt = 0u32;
    loop {
        let session = async {
            let conn = timed(
                "connect",
                config.timeout,
                Connection::connect(&config.url, ConnectionProperties::default()),
            )
            .await?;
            stats.connects.fetch_add(1, Relaxed);
            stats.connected.store(true, Relaxed);
            tracing::info!(bridge = %config.name, direction = config.direction.label(), "AMQP bridge connected");
            let r = match config.direction {
                Direction::In => bridge_in(&cx.log, &config, &conn, &stats, &mut attempt).await,
                Direction::Out => bridge_out(&cx.log, &config, &conn, &stats, &mut attempt).await,
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
            r
        };
        let result = tokio::select! {
            () = cx.shutdown.cancelled() => return,
            r = session => r,
        };
        stats.connected.store(false, Relaxed);
        if let Err(e) = result {
            stats.errors.fetch_add(1, Relaxed);
            tracing::warn!(bridge = %config.name, error = %e, "AMQP bridge disconnected; reconnecting");
        }
        let delay = backoff(attempt, config.min_backoff, config.max_backoff);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = cx.shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn bridge_in(
    log: &Log,
    config: &BridgeConfig,
    conn: &Connection,
    stats: &BridgeStats,
    attempt: &mut u32,
) -> Result<(), BridgeError> {
    let channel = timed("channel.open", config.timeout, conn.create_channel()).await?;
    timed(
        "basic.qos",
        config.timeout,
        channel.basic_qos(config.batch.max(1), BasicQosOptions::default()),
    )
    .await?;
    let mut consumer = timed(
        "basic.consume",
        config.timeout,
        channel.basic_consume(
            short(&config.queue),
            short(&format!("tributary-{}", config.name)),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    loop {
        let Some(first) = consumer.next().await else {
            return Err(BridgeError::Cancelled);
        };
        let mut deliveries = vec![first?];
        // Whatever else is ready joins this append.
        while deliveries.len() < usize::from(config.batch.max(1)) {
            match futures_util::FutureExt::now_or_never(consumer.next()) {
                Some(Some(d)) => deliveries.push(d?),
                Some(None) => break,
                None => break,
            }
        }
        // A message the topic can never take would come back forever: it is
        // rejected alone (RabbitMQ dead-letters it if the queue says so).
        let max_event = log
            .topic(&config.topic)
            .map_or(log.config().topic_defaults.max_event_bytes, |t| {
                t.config.max_event_bytes
            });
        let mut records = Vec::with_capacity(deliveries.len());
        let mut last_good = None;
        for d in &deliveries {
            let event = mapping::event_from(d.routing_key.as_str(), &d.properties, d.data.clone());
            if event.size() > max_event {
                stats.rejected.fetch_add(1, Relaxed);
                tracing::warn!(bridge = %config.name, size = event.size(), max_event, "a message larger than the topic allows was rejected");
                let nack = d.acker.nack(BasicNackOptions {
                    multiple: false,
                    requeue: false,
                });
                if !timed("basic.nack", config.timeout, nack).await? {
                    return Err(BridgeError::AckLost);
                }
                continue;
            }
            records.push(AppendRecord::from(event));
            last_good = Some(d);
        }
        let Some(last) = last_good else {
            continue;
        };
        let n = records.len() as u64;
        match log.append(&config.topic, records).await {
            Ok(_) => {
                // `multiple` covers the rejected ones too: they are settled already.
                let ack = last.acker.ack(BasicAckOptions { multiple: true });
                if !timed("basic.ack", config.timeout, ack).await? {
                    return Err(BridgeError::AckLost);
                }
                stats.messages.fetch_add(n, Relaxed);
                *attempt = 0;
            }
            Err(e) => {
                // Back to the queue; the reconnect backoff paces the retry.
                let _ = timed(
                    "basic.nack",
                    config.timeout,
                    last.acker.nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    }),
                )
                .await;
                return Err(e.into());
            }
        }
    }
}

async fn bridge_out(
    log: &Log,
    config: &BridgeConfig,
    conn: &Connection,
    stats: &BridgeStats,
    attempt: &mut u32,
) -> Result<(), BridgeError> {
    let channel = timed("channel.open", config.timeout, conn.create_channel()).await?;
    timed(
        "confirm.select",
        config.timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let group = config.group();
    let mut topics = log.watch_topics();
    loop {
        // The topic may not exist yet (an edge creates it on first publish).
        let partitions = match log.topic(&config.topic) {
            Ok(t) => t.partitions.len() as u32,
            Err(_) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), topics.changed()).await;
                continue;
            }
        };
        let mut next: BTreeMap<u32, u64> = (0..partitions)
            .map(|p| {
                (
                    p,
                    log.offsets(&config.topic, p).map_or(0, |(start, _)| start),
                )
            })
            .collect();
        for o in log.group_offsets(&group)? {
            if o.topic == config.topic {
                if let Some(n) = next.get_mut(&o.partition) {
                    *n = (*n).max(o.offset);
                }
            }
        }
        let mut moved = false;
        for (&p, offset) in next.iter_mut() {
            // fetch reads on the blocking pool, off the async workers.
            let batch = usize::from(config.batch.max(1));
            let read = log
                .fetch(&config.topic, p, *offset, batch, 1 << 20, Duration::ZERO)
                .await;
            let read = match read {
                Ok(r) => r,
                // Retention passed the position (or it is past the end, as
                // after restoring an older data directory): go on from the
                // nearest valid offset, and say so.
                Err(tributary_storage::Error::OffsetOutOfRange { start, end, .. }) => {
                    let to = if *offset < start { start } else { end };
                    tracing::warn!(bridge = %config.name, partition = p, from = *offset, to, "the bridge position was outside the log; moved");
                    *offset = to;
                    let moved_to = GroupOffset {
                        topic: config.topic.clone(),
                        partition: p,
                        offset: to,
                    };
                    log.commit_offsets(&group, vec![moved_to]).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if read.records.is_empty() {
                continue;
            }
            let mut confirms = Vec::with_capacity(read.records.len());
            for r in &read.records {
                let key = match &config.routing_key {
                    Some(k) => k.clone(),
                    None => r.key.as_deref().map_or_else(
                        || config.topic.clone(),
                        |k| String::from_utf8_lossy(k).into_owned(),
                    ),
                };
                let confirm = timed(
                    "basic.publish",
                    config.timeout,
                    channel.basic_publish(
                        short(&config.exchange),
                        short(&key),
                        // Mandatory: RabbitMQ acks a message no queue takes, and
                        // that ack must not move the position.
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &r.value,
                        mapping::properties_for(&r.headers, r.timestamp),
                    ),
                )
                .await?;
                confirms.push(confirm);
            }
            let n = confirms.len() as u64;
            let all = futures_util::future::join_all(confirms);
            for c in timed("publisher confirms", config.timeout, async {
                Ok::<_, BridgeError>(all.await)
            })
            .await?
            {
                match c? {
                    lapin::Confirmation::Ack(None) => {}
                    lapin::Confirmation::Ack(Some(_)) => return Err(BridgeError::Unroutable),
                    _ => return Err(BridgeError::Nacked),
                }
            }
            *offset = read.next_offset;
            log.commit_offsets(
                &group,
                vec![GroupOffset {
                    topic: config.topic.clone(),
                    partition: p,
                    offset: *offset,
                }],
            )
            .await?;
            stats.messages.fetch_add(n, Relaxed);
            *attempt = 0;
            moved = true;
        }
        if !moved {
            // Wait for any partition to grow (or a second, to notice new ones).
            let mut watches: Vec<_> = (0..partitions)
                .filter_map(|p| log.watch_end(&config.topic, p).ok())
                .collect();
            if watches.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                let changed = futures_util::future::select_all(
                    watches.iter_mut().map(|w| Box::pin(w.changed())),
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
            }
            if conn.status().errored() || !channel.status().connected() {
                return Err(BridgeError::Timeout("broker connection"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..40 {
            let cap = base.saturating_mul(1 << attempt.min(16)).min(max);
            for _ in 0..50 {
                assert!(backoff(attempt, base, max) <= cap);
            }
        }
        // Full jitter spreads: not every draw is the cap.
        let draws: Vec<_> = (0..100).map(|_| backoff(10, base, max)).collect();
        assert!(draws.iter().any(|d| *d < max / 2));
    }
}
