//! The bridge's lapin side (feature `amqp-bridge`): one task per bridge,
//! reconnecting with backoff; see [`super::bridge`] for what each direction does.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tributary_storage::util::backoff::Backoff;
use tributary_storage::util::lock;
use tributary_storage::{AppendRecord, GroupOffset, Log};

use super::bridge::{BridgeConfig, BridgeStats, Direction};
use super::frame::short;
use super::mapping;
use crate::Error;

async fn timed<T, E: Into<Error>>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(Error::Timeout(what)),
    }
}

/// Runs one bridge until shutdown: connects, bridges, and reconnects after
/// a delay with exponential backoff and full jitter (reset by a connection
/// that moved messages).
pub(super) async fn run(
    log: Log,
    config: BridgeConfig,
    stats: Arc<BridgeStats>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Backoff::new(config.min_backoff, config.max_backoff);
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
            *lock(&stats.last_error) = None;
            tracing::info!(bridge = %config.name, direction = config.direction.label(), "AMQP bridge connected");
            let r = match config.direction {
                Direction::In => bridge_in(&log, &config, &conn, &stats, &mut backoff).await,
                Direction::Out => bridge_out(&log, &config, &conn, &stats, &mut backoff).await,
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
            r
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session => r,
        };
        stats.connected.store(false, Relaxed);
        if let Err(e) = result {
            stats.errors.fetch_add(1, Relaxed);
            *lock(&stats.last_error) = Some(e.to_string());
            tracing::warn!(bridge = %config.name, error = %e, "AMQP bridge disconnected; reconnecting");
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Connects and closes.
pub(super) async fn probe(config: &BridgeConfig) -> Result<(), String> {
    let conn = timed(
        "connect",
        config.timeout,
        Connection::connect(&config.url, ConnectionProperties::default()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let _ = tokio::time::timeout(config.timeout, conn.close(200, "bye".into())).await;
    Ok(())
}

async fn bridge_in(
    log: &Log,
    config: &BridgeConfig,
    conn: &Connection,
    stats: &BridgeStats,
    backoff: &mut Backoff,
) -> Result<(), Error> {
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
            return Err(Error::Cancelled);
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
                    return Err(Error::AckLost);
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
        match tributary_ingest::append_topic(log, &config.topic, records).await {
            Ok(_) => {
                // `multiple` covers the rejected ones too: they are settled already.
                let ack = last.acker.ack(BasicAckOptions { multiple: true });
                if !timed("basic.ack", config.timeout, ack).await? {
                    return Err(Error::AckLost);
                }
                stats.messages.fetch_add(n, Relaxed);
                stats.batches.fetch_add(1, Relaxed);
                backoff.reset();
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
    backoff: &mut Backoff,
) -> Result<(), Error> {
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
                        r.bytes(),
                        mapping::properties_for(&r.headers, r.timestamp),
                    ),
                )
                .await?;
                confirms.push(confirm);
            }
            let n = confirms.len() as u64;
            let all = futures_util::future::join_all(confirms);
            for c in timed("publisher confirms", config.timeout, async {
                Ok::<_, Error>(all.await)
            })
            .await?
            {
                match c? {
                    lapin::Confirmation::Ack(None) => {}
                    lapin::Confirmation::Ack(Some(_)) => return Err(Error::Unroutable),
                    _ => return Err(Error::Nacked),
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
            stats.batches.fetch_add(1, Relaxed);
            backoff.reset();
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
                return Err(Error::Timeout("broker connection"));
            }
        }
    }
}
