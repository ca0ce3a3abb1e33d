//! `bench mqtt`: MQTT 3.1.1 publishes to any broker, counting acknowledgements.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use crate::cli::MqttBenchArgs;

use super::{proc_sample, Report, Samples};

/// How long `bench mqtt` waits for each CONNACK before the run.
const MQTT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one `bench mqtt` connection measured.
#[derive(Debug, Default)]
struct MqttWorker {
    samples: Samples,
    /// PUBACKs (QoS 1) or publishes written (QoS 0) before the deadline.
    counted: u64,
    /// Why the connection ended early, if it did.
    error: Option<String>,
}

/// `bench mqtt`: MQTT 3.1.1 publishes to any broker. Every connection keeps
/// up to `inflight` publishes outstanding; QoS 1 counts PUBACKs and times each
/// packet id from the PUBLISH written to its PUBACK, QoS 0 counts publishes
/// written (nothing acknowledges them, so no latency).
pub async fn mqtt(args: MqttBenchArgs) -> anyhow::Result<Report> {
    if args.connections == 0 || args.inflight == 0 {
        bail!("--connections and --inflight must be at least 1");
    }
    if args.topic.is_empty() || args.topic.contains(['+', '#', '\0']) {
        bail!(
            "--topic must be a topic name (no wildcards), got `{}`",
            args.topic
        );
    }
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => bail!("--qos must be 0, 1 or 2, got {q}"),
    };
    let payload: bytes::Bytes = (0..args.payload)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    let inflight = usize::from(args.inflight);
    // Our own limit keeps at most `inflight` requests between us and the
    // broker, so the request channel never fills.
    let channel_capacity = 2 * inflight + 16;
    // rumqttc refuses packets over 10 KiB by default.
    let max_packet = (args.payload + args.topic.len() + 64).max(10 * 1024);

    // Subscribers first, so they see every message of the run.
    let filter = match &args.share {
        Some(group) => format!("$share/{group}/{}/#", args.topic),
        None => format!("{}/#", args.topic),
    };
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let id = format!("tributary-bench-sub-{}-{i}", std::process::id());
        let (client, eventloop) = mqtt_session(&args, id, max_packet, 1000, inflight).await?;
        client.subscribe(filter.clone(), qos).await?;
        subscribers.push((client, eventloop));
    }

    // Connect every session before the clock starts.
    let mut connections = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let id = format!("tributary-bench-{}-{i}", std::process::id());
        let (client, eventloop) =
            mqtt_session(&args, id, max_packet, channel_capacity, inflight).await?;
        connections.push((client, eventloop, format!("{}/{i}", args.topic)));
    }

    let mut subscribed = Vec::new();
    for (client, mut eventloop) in subscribers {
        let delivered = delivered.clone();
        // SUBACK before the clock starts; then count until the deadline is set.
        let suback = tokio::time::timeout(MQTT_CONNECT_TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                    return Ok::<_, rumqttc::ConnectionError>(());
                }
            }
        })
        .await;
        if !matches!(suback, Ok(Ok(()))) {
            bail!("a subscriber got no SUBACK for `{filter}`");
        }
        subscribed.push(tokio::spawn(async move {
            let _client = client;
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(_)) = ev {
                    delivered.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    let before = args.server_pid.map(proc_sample).transpose()?;
    let delivered_before = delivered.load(Relaxed);
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + args.duration);
    let workers: Vec<_> = connections
        .into_iter()
        .map(|(client, eventloop, topic)| {
            let payload = payload.clone();
            tokio::spawn(mqtt_connection(
                client, eventloop, topic, qos, payload, inflight, deadline,
            ))
        })
        .collect();
    tokio::time::sleep_until(deadline).await;
    // Sample the server when counting stops, before the connections drain and close.
    let after = args.server_pid.map(proc_sample).transpose()?;
    let elapsed = started.elapsed();
    let delivered = delivered.load(Relaxed) - delivered_before;
    for s in subscribed {
        s.abort();
    }

    let mut latencies = Vec::new();
    let mut events = 0;
    let mut errors = 0;
    for (i, w) in workers.into_iter().enumerate() {
        let w = w.await?;
        latencies.extend(w.samples.micros);
        events += w.counted;
        if let Some(e) = w.error {
            errors += 1;
            eprintln!("connection {i}: {e}");
        }
    }
    latencies.sort_unstable();
    if args.subscribers > 0 {
        // Deliveries are what is counted; publishes (acknowledged) are the requests.
        return Ok(Report {
            target: "mqtt",
            counted: "delivered",
            events: delivered,
            requests: events,
            errors,
            payload_bytes: delivered * args.payload as u64,
            elapsed,
            latencies,
            server: before.zip(after),
            generator: None,
            extra: Vec::new(),
        });
    }
    Ok(Report {
        target: "mqtt",
        counted: if qos == QoS::AtMostOnce {
            "sent"
        } else {
            "acked"
        },
        events,
        requests: events,
        errors,
        payload_bytes: events * args.payload as u64,
        elapsed,
        latencies,
        server: before.zip(after),
        generator: None,
        extra: Vec::new(),
    })
}

/// A connected `bench mqtt` session (clean, 3.1.1).
async fn mqtt_session(
    args: &MqttBenchArgs,
    id: String,
    max_packet: usize,
    channel_capacity: usize,
    inflight: usize,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(id, args.host.clone(), args.port);
    options
        .set_inflight(u16::try_from(inflight).unwrap_or(u16::MAX))
        .set_request_channel_capacity(channel_capacity)
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(max_packet, max_packet);
    let (client, mut eventloop) = AsyncClient::new(options, channel_capacity);
    let connected = tokio::time::timeout(MQTT_CONNECT_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => Ok((client, eventloop)),
        Ok(Err(e)) => bail!("mqtt://{}:{}: {e}", args.host, args.port),
        Err(_) => bail!(
            "mqtt://{}:{}: no CONNACK within {:?}",
            args.host,
            args.port,
            MQTT_CONNECT_TIMEOUT
        ),
    }
}

/// One `bench mqtt` connection: publishes while fewer than `inflight` are
/// outstanding, drives the event loop, and counts until `deadline`.
async fn mqtt_connection(
    client: AsyncClient,
    mut eventloop: EventLoop,
    topic: String,
    qos: QoS,
    payload: bytes::Bytes,
    inflight: usize,
    deadline: tokio::time::Instant,
) -> MqttWorker {
    let mut w = MqttWorker::default();
    // When each packet id was written; rumqttc numbers them 1..=inflight.
    let mut sent_at: Vec<Option<Instant>> = vec![None; inflight + 1];
    // Publishes handed to rumqttc and not yet acknowledged (QoS 1) or written (QoS 0).
    let mut outstanding = 0usize;
    let stop = tokio::time::sleep_until(deadline);
    tokio::pin!(stop);
    'run: loop {
        while outstanding < inflight {
            // The channel holds more than `inflight` requests: this never waits.
            if let Err(e) = client
                .publish_bytes(topic.clone(), qos, false, payload.clone())
                .await
            {
                w.error = Some(format!("publish: {e}"));
                break 'run;
            }
            outstanding += 1;
        }
        let event = tokio::select! {
            biased;
            () = &mut stop => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if qos == QoS::AtMostOnce {
                    outstanding = outstanding.saturating_sub(1);
                    w.counted += 1;
                } else if let Some(slot) = sent_at.get_mut(usize::from(pkid)) {
                    *slot = Some(Instant::now());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(rumqttc::PubAck { pkid })))
            | Ok(Event::Incoming(Packet::PubComp(rumqttc::PubComp { pkid }))) => {
                outstanding = outstanding.saturating_sub(1);
                w.counted += 1;
                if let Some(t0) = sent_at.get_mut(usize::from(pkid)).and_then(Option::take) {
                    w.samples.record(t0.elapsed());
                }
            }
            Ok(_) => {}
            Err(e) => {
                w.error = Some(e.to_string());
                break;
            }
        }
    }
    if w.error.is_none() {
        // Best effort, not counted: wait for the outstanding publishes to be
        // acknowledged (or written), then DISCONNECT, so the broker sees a
        // clean close rather than a peer gone before its PUBACKs.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while outstanding > 0 {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                        outstanding -= 1;
                    }
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => outstanding -= 1,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            if client.try_disconnect().is_err() {
                return;
            }
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    w
}
