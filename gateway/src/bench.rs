//! `tributary bench`: load generators that count acknowledgements (not
//! messages handed to a client library), run for a fixed time, and report
//! throughput, latency percentiles and, given the server's pid, its CPU time
//! per event and peak RSS. One report format for every protocol, so the same
//! run can compare Tributary with its peers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;

use crate::cli::{BenchTarget, HttpBenchArgs, MqttBenchArgs};
use crate::client::ApiClient;

/// At most this many latency samples per worker (older ones are overwritten
/// round-robin): memory stays bounded on long runs.
const MAX_SAMPLES_PER_WORKER: usize = 200_000;

/// Latency samples of one worker, in microseconds.
#[derive(Debug, Default)]
pub struct Samples {
    pub(crate) micros: Vec<u32>,
    seen: usize,
}

impl Samples {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u32::MAX)) as u32;
        if self.micros.len() < MAX_SAMPLES_PER_WORKER {
            self.micros.push(us);
        } else {
            let slot = self.seen % MAX_SAMPLES_PER_WORKER;
            self.micros[slot] = us;
        }
        self.seen += 1;
    }
}

/// CPU time (user + system, in clock ticks) and peak RSS of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime in seconds.
    pub cpu_seconds: f64,
    /// VmHWM in KiB.
    pub peak_rss_kib: u64,
    /// VmRSS in KiB.
    pub rss_kib: u64,
}

/// Reads a process's CPU time and memory from /proc (Linux).
pub fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("no process {pid}"))?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let after = stat.rsplit_once(") ").map(|(_, a)| a).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 after the name.
    let hz = 100.0; // USER_HZ is 100 on every Linux ABI we target.
    let cpu_seconds = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_seconds,
        peak_rss_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    })
}

/// What a benchmark run measured.
#[derive(Debug)]
pub struct Report {
    /// Target name, e.g. `http`.
    pub target: &'static str,
    /// What `events` counts: `acked` (acknowledged by the server) or `sent`
    /// (MQTT QoS 0: written to the socket, nothing acknowledges them).
    pub counted: &'static str,
    /// Events acknowledged (or sent, see `counted`).
    pub events: u64,
    /// Requests acknowledged.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Payload bytes acknowledged.
    pub payload_bytes: u64,
    /// Measured time.
    pub elapsed: Duration,
    /// All latency samples, µs, sorted.
    pub latencies: Vec<u32>,
    /// Server CPU and memory over the run, if a pid was given.
    pub server: Option<(ProcSample, ProcSample)>,
}

/// Latency at percentile `p` (0..=1) of sorted µs samples, ms; 0 when empty.
pub fn percentile_ms(sorted_micros: &[u32], p: f64) -> f64 {
    if sorted_micros.is_empty() {
        return 0.0;
    }
    let i = ((sorted_micros.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted_micros[i]) / 1000.0
}

/// The same for a RESULT line: null when nothing was timed.
pub fn percentile_json(sorted_micros: &[u32], p: f64) -> serde_json::Value {
    if sorted_micros.is_empty() {
        serde_json::Value::Null
    } else {
        json!(percentile_ms(sorted_micros, p))
    }
}

impl Report {
    fn percentile(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies, p)
    }

    fn percentile_json(&self, p: f64) -> serde_json::Value {
        percentile_json(&self.latencies, p)
    }

    /// Prints a human summary and one JSON line (prefixed `RESULT `) for scripts.
    pub fn print(&self) {
        let secs = self.elapsed.as_secs_f64();
        let eps = self.events as f64 / secs;
        println!(
            "{}: {} events {} in {:.2}s = {:.0} events/s, {:.1} MB/s payload, {:.0} requests/s, {} errors",
            self.target,
            self.events,
            self.counted,
            secs,
            eps,
            self.payload_bytes as f64 / secs / 1e6,
            self.requests as f64 / secs,
            self.errors
        );
        if self.latencies.is_empty() {
            println!("latency per request (ms): n/a (nothing acknowledged)");
        } else {
            println!(
                "latency per request (ms): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                self.percentile(0.5),
                self.percentile(0.9),
                self.percentile(0.99),
                self.percentile(0.999),
                self.percentile(1.0)
            );
        }
        let mut result = json!({
            "target": self.target, "counted": self.counted, "events": self.events, "seconds": secs,
            "events_per_sec": eps, "errors": self.errors,
            "p50_ms": self.percentile_json(0.5), "p90_ms": self.percentile_json(0.9),
            "p99_ms": self.percentile_json(0.99), "max_ms": self.percentile_json(1.0),
        });
        if let Some((before, after)) = self.server {
            let cpu = after.cpu_seconds - before.cpu_seconds;
            let us_per_event = if self.events > 0 {
                cpu * 1e6 / self.events as f64
            } else {
                0.0
            };
            println!(
                "server: {:.2} CPU-s, {:.2} µs CPU per event, RSS {:.1} MiB, peak RSS {:.1} MiB",
                cpu,
                us_per_event,
                after.rss_kib as f64 / 1024.0,
                after.peak_rss_kib as f64 / 1024.0
            );
            result["server_cpu_us_per_event"] = json!(us_per_event);
            result["server_peak_rss_mib"] = json!(after.peak_rss_kib as f64 / 1024.0);
        }
        println!("RESULT {result}");
    }
}

/// A produce answer, counted without building a JSON map per record.
#[derive(serde::Deserialize)]
struct Acked {
    offsets: Vec<serde::de::IgnoredAny>,
}

/// Runs the chosen generator.
pub async fn run(target: BenchTarget) -> anyhow::Result<()> {
    let report = match target {
        BenchTarget::Http(args) => http(args).await?,
        BenchTarget::Mqtt(args) => mqtt(args).await?,
        BenchTarget::Ws(args) => crate::bench_ws::ws(args).await?,
    };
    report.print();
    if report.events == 0 {
        bail!("no event was {}", report.counted);
    }
    Ok(())
}

/// `bench http`: each connection posts `batch` records per request, in a loop.
pub async fn http(args: HttpBenchArgs) -> anyhow::Result<Report> {
    if args.connections == 0 || args.batch == 0 {
        bail!("--connections and --batch must be at least 1");
    }
    let api = ApiClient::new(&args.url)?;
    api.ensure_topic(&args.topic, args.partitions).await?;
    let payload: String = (0..args.payload)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let records: Vec<_> = (0..args.batch)
        .map(|_| json!({"value": payload, "encoding": "string"}))
        .collect();
    let body = bytes::Bytes::from(serde_json::to_vec(&json!({ "records": records }))?);
    let url = format!(
        "{}/v1/topics/{}/records",
        args.url.trim_end_matches('/'),
        args.topic
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;

    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let before = args.server_pid.map(proc_sample).transpose()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (client, url, body, stop, events, errors) = (
            client.clone(),
            url.clone(),
            body.clone(),
            stop.clone(),
            events.clone(),
            errors.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut requests = 0u64;
            while !stop.load(Relaxed) {
                let t0 = Instant::now();
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let acked = match sent {
                    Ok(r) if r.status().is_success() => match r.json::<Acked>().await {
                        Ok(a) => a.offsets.len() as u64,
                        Err(_) => 0,
                    },
                    _ => 0,
                };
                if acked == 0 {
                    errors.fetch_add(1, Relaxed);
                    continue;
                }
                samples.record(t0.elapsed());
                events.fetch_add(acked, Relaxed);
                requests += 1;
            }
            (samples, requests)
        }));
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Relaxed);
    let mut latencies = Vec::new();
    let mut requests = 0;
    for w in workers {
        let (s, r) = w.await?;
        latencies.extend(s.micros);
        requests += r;
    }
    let elapsed = started.elapsed();
    let after = args.server_pid.map(proc_sample).transpose()?;
    latencies.sort_unstable();
    let events = events.load(Relaxed);
    Ok(Report {
        target: "http",
        counted: "acked",
        events,
        requests,
        errors: errors.load(Relaxed),
        payload_bytes: events * args.payload as u64,
        elapsed,
        latencies,
        server: before.zip(after),
    })
}

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
