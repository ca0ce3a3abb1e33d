//! `tributary bench amqp`: AMQP 0-9-1 publishes with publisher confirms, to
//! any broker (RabbitMQ, Tributary's own AMQP front end), through lapin.
//!
//! Every connection opens one channel in confirm mode and keeps up to
//! `--inflight` publishes unconfirmed: a window of (send time, confirm) pairs
//! awaited oldest first, refilled as confirms come back. What counts is
//! `basic.ack`s, never publishes handed to lapin: a publish is only written to
//! a socket buffer, while a confirm says the broker took responsibility for
//! the message (RabbitMQ: routed to a durable queue and, persistent, fsynced;
//! Tributary: in the log and durable). Counting sends would measure the client
//! library and the socket buffers, not the server. `basic.nack`s are counted
//! apart, and neither they nor a connection's failure stop the others.
//!
//! Publishing starts at once, counting after `--warmup` (so connection ramp-up,
//! queue creation and the server's first allocations stay out of the figures)
//! and stops at the deadline; a confirm counts when it arrives inside that
//! window. The server's CPU time and RSS, with `--server-pid`, are sampled at
//! the window's two ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use futures_util::FutureExt as _;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::json;

use super::{proc_sample, Report, Samples};
use crate::cli::AmqpBenchArgs;

/// How long each connection may take to connect, open its channel and enter
/// confirm mode (and, on the first, declare the queue) before the run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// After the deadline, how long a connection waits for its outstanding
/// confirms (not counted) and then for its close, so the broker sees a clean
/// close rather than a peer gone with publishes in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Persistent messages (`delivery_mode` 2): a durable queue stores them on disk.
const PERSISTENT: u8 = 2;

/// What one connection measured.
#[derive(Debug, Default)]
struct Worker {
    /// Confirm latencies of the counted acks.
    samples: Samples,
    /// `basic.ack`s inside the measured window.
    confirmed: u64,
    /// `basic.nack`s inside the measured window.
    nacked: u64,
    /// Why the connection ended early, if it did.
    error: Option<String>,
}

/// Runs `bench amqp` and prints its report; fails when nothing was confirmed.
pub async fn run(args: AmqpBenchArgs) -> anyhow::Result<()> {
    let report = amqp(args).await?;
    report.print();
    if report.events == 0 {
        bail!("no message was confirmed");
    }
    Ok(())
}

/// A message body of exactly `size` bytes: a JSON sensor reading padded with
/// `x`s (cut short, so no longer JSON, when `size` is below its ~70 bytes).
fn payload(size: usize) -> Vec<u8> {
    let head = r#"{"device":"bench-0001","sensor":"temperature","value":21.5,"pad":""#;
    let tail = r#""}"#;
    let mut body = Vec::with_capacity(size.max(head.len() + tail.len()));
    body.extend_from_slice(head.as_bytes());
    body.resize(size.saturating_sub(tail.len()).max(head.len()), b'x');
    body.extend_from_slice(tail.as_bytes());
    body.truncate(size);
    body
}

/// `bench amqp`: connects every connection (the clock has not started), runs
/// warm-up and measured window, and collects what each connection counted.
pub async fn amqp(args: AmqpBenchArgs) -> anyhow::Result<Report> {
    if args.connections == 0 || args.inflight == 0 {
        bail!("--connections and --inflight must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be above 0");
    }
    let exchange = ShortString::try_new(args.exchange.clone())
        .map_err(|_| anyhow!("--exchange is longer than 255 bytes"))?;
    let routing_key = ShortString::try_new(args.routing_key.clone())
        .map_err(|_| anyhow!("--routing-key is longer than 255 bytes"))?;
    if args.declare_queue && args.routing_key.is_empty() {
        bail!("--declare-queue needs a --routing-key to name the queue");
    }
    let body: Arc<[u8]> = payload(args.size).into();

    let mut connections = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let declare = args.declare_queue && i == 0;
        let setup = connect(&args.url, declare.then_some((&exchange, &routing_key)));
        let (conn, channel) = tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .map_err(|_| anyhow!("no answer within {SETUP_TIMEOUT:?}"))
            .and_then(|r| r)
            .with_context(|| format!("connection {i} to {}", redact(&args.url)))?;
        connections.push((conn, channel));
    }

    let started = Instant::now();
    let measure_from = started + args.warmup;
    let deadline = measure_from + args.duration;
    let workers: Vec<_> = connections
        .into_iter()
        .map(|(conn, channel)| {
            let target = (exchange.clone(), routing_key.clone());
            tokio::spawn(publish_loop(
                conn,
                channel,
                target,
                body.clone(),
                args.inflight,
                measure_from,
                deadline,
            ))
        })
        .collect();

    tokio::time::sleep_until(tokio::time::Instant::from_std(measure_from)).await;
    let before = args.server_pid.map(proc_sample).transpose()?;
    let me_before = proc_sample(std::process::id()).ok();
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
    // Sample the server when counting stops, before the connections drain and close.
    let after = args.server_pid.map(proc_sample).transpose()?;
    let me_after = proc_sample(std::process::id()).ok();

    let (mut latencies, mut confirmed, mut nacked, mut errors) = (Vec::new(), 0, 0, 0);
    for (i, w) in workers.into_iter().enumerate() {
        let w = w.await?;
        latencies.extend(w.samples.micros);
        confirmed += w.confirmed;
        nacked += w.nacked;
        if let Some(e) = w.error {
            errors += 1;
            eprintln!("connection {i}: {e}");
        }
    }
    latencies.sort_unstable();
    Ok(Report {
        target: "amqp",
        counted: "acked",
        events: confirmed,
        requests: confirmed,
        errors,
        payload_bytes: confirmed * args.size as u64,
        elapsed: args.duration,
        latencies,
        server: before.zip(after),
        generator: me_before.zip(me_after),
        extra: vec![("nacked", json!(nacked)), ("size", json!(args.size))],
    })
}

/// Opens a connection and one channel in confirm mode; with `declare`
/// (exchange, queue name), first declares that durable queue and, unless the
/// exchange is the default one (which routes by queue name), binds it.
async fn connect(
    url: &str,
    declare: Option<(&ShortString, &ShortString)>,
) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connect")?;
    let channel = conn.create_channel().await.context("channel.open")?;
    if let Some((exchange, queue)) = declare {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.clone(), options, FieldTable::default())
            .await
            .with_context(|| format!("queue.declare {queue}"))?;
        if !exchange.as_str().is_empty() {
            channel
                .queue_bind(
                    queue.clone(),
                    exchange.clone(),
                    queue.clone(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("queue.bind {queue} to {exchange}"))?;
        }
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("confirm.select")?;
    Ok((conn, channel))
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Settles the confirms at the front of the window that have already
/// arrived; false when the channel failed.
fn settle_ready(
    window: &mut VecDeque<(Instant, lapin::PublisherConfirm)>,
    w: &mut Worker,
    measure_from: Instant,
    deadline: Instant,
) -> bool {
    while let Some(confirmation) = window.front_mut().and_then(|(_, c)| c.now_or_never()) {
        let Some((sent_at, _)) = window.pop_front() else {
            break;
        };
        if !w.settle(sent_at, confirmation, measure_from, deadline) {
            return false;
        }
    }
    true
}

/// One connection: publishes while fewer than `inflight` are unconfirmed,
/// awaits the oldest confirm when the window is full, counts the confirms that
/// arrive between `measure_from` and `deadline`, then drains and closes.
async fn publish_loop(
    conn: Connection,
    channel: Channel,
    (exchange, routing_key): (ShortString, ShortString),
    body: Arc<[u8]>,
    inflight: usize,
    measure_from: Instant,
    deadline: Instant,
) -> Worker {
    let mut w = Worker::default();
    // Unconfirmed publishes, oldest first: the broker confirms a channel's
    // publishes in order (possibly several per `multiple` ack).
    let mut window: VecDeque<(Instant, lapin::PublisherConfirm)> =
        VecDeque::with_capacity(inflight);
    let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    let stop = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
    tokio::pin!(stop);
    'run: loop {
        while window.len() < inflight {
            // Confirms that arrived while we refill are settled before each
            // publish, so their latency is stamped now, not after the refill.
            if !settle_ready(&mut window, &mut w, measure_from, deadline) {
                break 'run;
            }
            let sent_at = Instant::now();
            // Resolves once lapin's I/O loop has written the frames out; the
            // answer is the confirm to wait for.
            // Mandatory: a broker acks a message it could not route (RabbitMQ
            // without the queue); such an ack comes with the message returned
            // and is not counted as confirmed.
            let publish = channel.basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                properties.clone(),
            );
            let published = tokio::select! {
                biased;
                () = &mut stop => break 'run,
                p = publish => p,
            };
            match published {
                Ok(confirm) => window.push_back((sent_at, confirm)),
                Err(e) => {
                    w.error = Some(format!("basic.publish: {e}"));
                    break 'run;
                }
            }
        }
        // The window is full: wait for its oldest confirm.
        let Some((_, oldest)) = window.front_mut() else {
            break;
        };
        let confirmation = tokio::select! {
            biased;
            () = &mut stop => break 'run,
            c = oldest => c,
        };
        let Some((sent_at, _)) = window.pop_front() else {
            break;
        };
        if !w.settle(sent_at, confirmation, measure_from, deadline) {
            break;
        }
        // Settle the confirms that arrived with it (a `multiple` ack covers
        // many) now, so their latency does not include the next publishes.
        if !settle_ready(&mut window, &mut w, measure_from, deadline) {
            break 'run;
        }
    }
    if w.error.is_none() {
        // Best effort, not counted: let the outstanding publishes be confirmed,
        // then close the channel and the connection.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            for (_, confirm) in window.drain(..) {
                if confirm.await.is_err() {
                    return;
                }
            }
            let _ = channel.close(200, "bench done".into()).await;
            let _ = conn.close(200, "bench done".into()).await;
        })
        .await;
    }
    w
}

impl Worker {
    /// Counts one confirm if it arrived inside the measured window; false when
    /// the channel failed (the error is kept and the connection stops).
    fn settle(
        &mut self,
        sent_at: Instant,
        confirmation: lapin::Result<Confirmation>,
        measure_from: Instant,
        deadline: Instant,
    ) -> bool {
        let now = Instant::now();
        let counted = now >= measure_from && now < deadline;
        match confirmation {
            Ok(Confirmation::Ack(Some(_))) | Ok(Confirmation::Nack(_)) => {
                // Returned (unroutable) or refused: stored nowhere.
                if counted {
                    self.nacked += 1;
                }
                true
            }
            Ok(Confirmation::Ack(None)) => {
                if counted {
                    self.confirmed += 1;
                    self.samples.record(now - sent_at);
                }
                true
            }
            Ok(Confirmation::NotRequested) => {
                self.error = Some("the channel is not in confirm mode".into());
                false
            }
            Err(e) => {
                self.error = Some(format!("confirm: {e}"));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_asked_size() {
        for size in [0, 1, 10, 69, 70, 71, 100, 1000, 65_536] {
            assert_eq!(payload(size).len(), size, "size {size}");
        }
        let p = payload(100);
        assert!(p.starts_with(b"{\"device\""));
        assert!(p.ends_with(b"x\"}"));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1/%2f"), "amqp://127.0.0.1/%2f");
    }
}
