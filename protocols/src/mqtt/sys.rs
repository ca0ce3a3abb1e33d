//! `$SYS/broker/...`: the node's own statistics as MQTT topics, the way
//! mosquitto and most brokers publish them. Every `sys_interval_secs` the
//! values that changed (and the uptime) are appended through the one write
//! path, like any publish, and kept as retained messages, so a subscriber to
//! `$SYS/#` gets the current values at once and every change after. Their
//! log topic is the node's own `mqtt.sys` (one partition, kept an hour).
//! Clients cannot publish under `$SYS/` (refused with 0x90).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary_storage::util::lock;

use tributary_storage::TopicConfig;

use super::codec::MsgProps;
use super::topic::SYS_LOG_TOPIC;
use super::{mapping, Server};
use crate::ingest;

/// How long `$SYS` records stay in their log topic.
const KEEP: Duration = Duration::from_secs(3600);

/// The statistics now, as (topic, value).
fn snapshot(broker: &Server, started: Instant) -> Vec<(&'static str, String)> {
    let m = &broker.metrics;
    let sum =
        |c: &[std::sync::atomic::AtomicU64; 3]| c.iter().map(|a| a.load(Relaxed)).sum::<u64>();
    vec![
        (
            "$SYS/broker/version",
            format!("tributary {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", started.elapsed().as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            broker.open_connections().to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            broker.sessions.len().to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            sum(&m.publishes).to_string(),
        ),
        ("$SYS/broker/messages/sent", sum(&m.deliveries).to_string()),
        (
            "$SYS/broker/retained messages/count",
            lock(&broker.retained).len().to_string(),
        ),
    ]
}

/// Publishes the statistics every `interval` until shutdown.
pub(super) async fn publisher(broker: Arc<Server>, interval: Duration) {
    let started = Instant::now();
    if broker.cx.log.topic(SYS_LOG_TOPIC).is_err() {
        let mut config = TopicConfig::new(SYS_LOG_TOPIC, 1);
        config.retention_ms = Some(KEEP.as_millis() as u64);
        if let Err(e) = broker.cx.log.create_topic(config).await {
            if !matches!(e, tributary_storage::Error::TopicExists(_)) {
                tracing::warn!(error = %e, "cannot create the $SYS log topic; no $SYS statistics");
                return;
            }
        }
    }
    let mut last: HashMap<&'static str, String> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = broker.cx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let changed: Vec<(&'static str, String)> = snapshot(&broker, started)
            .into_iter()
            .filter(|(t, v)| last.get(t) != Some(v))
            .collect();
        if changed.is_empty() {
            continue;
        }
        let mut batch = ingest::Batch::default();
        for (topic, value) in &changed {
            let payload = Bytes::from(value.clone().into_bytes());
            let (log_topic, record) = mapping::event_for(
                broker.router.target(topic),
                topic,
                &payload,
                0,
                true,
                &MsgProps::default(),
                None,
            );
            batch.push(&log_topic, (), record);
        }
        let stored = ingest::append(&broker.cx.log, batch)
            .await
            .into_iter()
            .all(|(_, outcome)| outcome.is_ok());
        if !stored {
            // A full disk or a missing topic: try again next time.
            broker.metrics.reject("sys_not_stored");
            continue;
        }
        for (topic, value) in changed {
            let payload = Bytes::from(value.clone().into_bytes());
            if broker
                .set_retained(topic, &payload, 0, &MsgProps::default())
                .await
                .is_ok()
            {
                last.insert(topic, value);
            }
        }
    }
}
