//! `tributary bench ws`: WebSocket ingest (acked records/s over N pipelining
//! connections) and fan-out (C live-tail clients on one topic fed R events/s:
//! deliveries/s and end-to-end latency, from the producer's send time stamped
//! in each record to its arrival at each client).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{proc_sample, Report, Samples};
use crate::cli::{WsBenchArgs, WsMode};
use crate::client::ApiClient;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn ws_base(url: &str) -> String {
    url.trim_end_matches('/')
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1)
}

/// Runs `bench ws`.
pub async fn ws(args: WsBenchArgs) -> anyhow::Result<Report> {
    if args.connections == 0 || args.inflight == 0 {
        bail!("--connections and --inflight must be at least 1");
    }
    let api = ApiClient::new(&args.url)?;
    api.ensure_topic(&args.topic, 1).await?;
    match args.mode {
        WsMode::Ingest => ingest(args).await,
        WsMode::Fanout => fanout(args).await,
    }
}

async fn ingest(args: WsBenchArgs) -> anyhow::Result<Report> {
    let url = format!("{}/v1/topics/{}/publish", ws_base(&args.url), args.topic);
    let payload: String = (0..args.payload)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let record = json!({"value": payload, "encoding": "string"}).to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("cannot open {url}"))?;
        conns.push(ws);
    }
    let before = args.server_pid.map(proc_sample).transpose()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for ws in conns {
        let (stop, record, inflight) = (stop.clone(), record.clone(), args.inflight);
        workers.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let mut samples = Samples::default();
            let mut sent_at: VecDeque<Instant> = VecDeque::new();
            let (mut acked, mut errors) = (0u64, 0u64);
            loop {
                let stopping = stop.load(Relaxed);
                if !stopping && sent_at.len() < inflight {
                    let room = inflight - sent_at.len();
                    for _ in 0..room {
                        if tx.feed(Message::Text(record.clone().into())).await.is_err() {
                            return (samples, acked, errors + 1);
                        }
                        sent_at.push_back(Instant::now());
                    }
                    if tx.flush().await.is_err() {
                        return (samples, acked, errors + 1);
                    }
                }
                if stopping && sent_at.is_empty() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let Some(t0) = sent_at.pop_front() else { break };
                        if t.as_str().contains("\"offset\"") {
                            if !stopping {
                                acked += 1;
                                samples.record(t0.elapsed());
                            }
                        } else {
                            errors += 1;
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => return (samples, acked, errors + 1),
                }
            }
            let _ = tx.send(Message::Close(None)).await;
            (samples, acked, errors)
        }));
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Relaxed);
    let elapsed = started.elapsed();
    let after = args.server_pid.map(proc_sample).transpose()?;
    let (mut latencies, mut events, mut errors) = (Vec::new(), 0, 0);
    for w in workers {
        let (s, a, e) = w.await?;
        latencies.extend(s.micros);
        events += a;
        errors += e;
    }
    latencies.sort_unstable();
    Ok(Report {
        target: "ws-ingest",
        counted: "acked",
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

async fn fanout(args: WsBenchArgs) -> anyhow::Result<Report> {
    let base = ws_base(&args.url);
    let tail = match &args.tail_url {
        Some(t) => {
            // The edge forwards the topic: wait until the core has it.
            let core = ApiClient::new(t)?;
            let path = format!("/v1/topics/{}", args.topic);
            let deadline = Instant::now() + Duration::from_secs(30);
            while core.get(&path).await.is_err() {
                if Instant::now() > deadline {
                    bail!(
                        "{t} has no topic {} after 30 s: does the edge forward to it?",
                        args.topic
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ws_base(t)
        }
        None => base.clone(),
    };
    let live = format!("{tail}/v1/topics/{}/live?from=latest", args.topic);
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let (ws, _) = tokio_tungstenite::connect_async(&live)
            .await
            .with_context(|| format!("cannot open {live}"))?;
        clients.push(ws);
    }
    let before = args.server_pid.map(proc_sample).transpose()?;
    let mut readers = Vec::new();
    for mut ws in clients {
        let (stop, delivered) = (stop.clone(), delivered.clone());
        readers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut errors = 0u64;
            while !stop.load(Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(t)))) => {
                        // The producer's send time rides in the value: {"t":micros,...}.
                        let sent = t
                            .as_str()
                            .split("\"t\":")
                            .nth(1)
                            .and_then(|r| r.split([',', '}']).next())
                            .and_then(|v| v.parse::<u64>().ok());
                        match sent {
                            Some(sent) => {
                                samples.record(Duration::from_micros(
                                    now_micros().saturating_sub(sent),
                                ));
                                delivered.fetch_add(1, Relaxed);
                            }
                            None => errors += 1,
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (samples, errors)
        }));
    }
    // The producer: `rate` events/s over one publish connection, in 10 ms ticks.
    let url = format!("{base}/v1/topics/{}/publish", args.topic);
    let (producer, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("cannot open {url}"))?;
    let pad: String = "x".repeat(args.payload.saturating_sub(24));
    let (rate, duration) = (args.rate, args.duration);
    let started = Instant::now();
    let produced = tokio::spawn(async move {
        let (mut tx, mut rx) = producer.split();
        let acks = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(Ok(_)) = rx.next().await {
                n += 1;
            }
            n
        });
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0u64;
        let t0 = Instant::now();
        while t0.elapsed() < duration {
            tick.tick().await;
            let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let v = format!("{{\"value\":{{\"t\":{},\"p\":\"{pad}\"}}}}", now_micros());
                if tx.feed(Message::Text(v.into())).await.is_err() {
                    return sent;
                }
                sent += 1;
            }
            if tx.flush().await.is_err() {
                return sent;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
        acks.abort();
        sent
    });
    let sent = produced.await?;
    // The rate is over the producing time; the last deliveries may land just after.
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = args.server_pid.map(proc_sample).transpose()?;
    stop.store(true, Relaxed);
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for r in readers {
        let (s, e) = r.await?;
        latencies.extend(s.micros);
        errors += e;
    }
    latencies.sort_unstable();
    let events = delivered.load(Relaxed);
    println!(
        "ws-fanout: {sent} events published at {rate}/s to {} clients; {events} deliveries expected {}",
        args.connections,
        sent * args.connections as u64
    );
    Ok(Report {
        target: "ws-fanout",
        counted: "delivered",
        events,
        requests: sent,
        errors,
        payload_bytes: events * args.payload as u64,
        elapsed,
        latencies,
        server: before.zip(after),
        generator: None,
        extra: Vec::new(),
    })
}
