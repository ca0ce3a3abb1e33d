//! `tributary bench`: load generators that count acknowledgements (not
//! messages handed to a client library), run for a fixed time, and report
//! throughput, latency percentiles and, given the server's pid, its CPU time
//! per event and peak RSS. One report format for every protocol, so the same
//! run can compare Tributary with its peers.
//!
//! - [`http`]: produce requests of `batch` records; [`mqtt`]: MQTT publishes
//!   (QoS 0, 1, 2, shared-subscription deliveries); [`ws`]: WebSocket publish
//!   and live-tail fan-out; [`amqp`]: AMQP publisher confirms; [`connect`]:
//!   MQTT logins; [`drain`]: an edge's backlog drained into a core.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::cli::BenchTarget;

pub mod amqp;
pub mod connect;
pub mod drain;
pub mod http;
pub mod mqtt;
#[cfg(feature = "processing")]
pub mod pipeline;
pub mod ws;

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
    /// This process's own CPU over the run (before, after), when measured:
    /// the generator shares the machine, and when it takes a core the
    /// figures say as much about the client as about the server.
    pub generator: Option<(ProcSample, ProcSample)>,
    /// Figures only this target has, added to the RESULT line (AMQP:
    /// `nacked`, `size`).
    pub extra: Vec<(&'static str, serde_json::Value)>,
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
        if let Some((before, after)) = self.generator {
            let cpu = after.cpu_seconds - before.cpu_seconds;
            let us_per_event = cpu * 1e6 / self.events.max(1) as f64;
            println!("generator: {cpu:.2} CPU-s, {us_per_event:.2} µs CPU per event");
            result["generator_cpu_us_per_event"] = json!(us_per_event);
        }
        for (name, value) in &self.extra {
            println!("{name}: {value}");
            result[*name] = value.clone();
        }
        println!("RESULT {result}");
    }
}

/// Runs the chosen generator.
pub async fn run(target: BenchTarget) -> anyhow::Result<()> {
    let report = match target {
        BenchTarget::Http(args) => http::http(args).await?,
        BenchTarget::Mqtt(args) => mqtt::mqtt(args).await?,
        BenchTarget::Ws(args) => ws::ws(args).await?,
    };
    report.print();
    if report.events == 0 {
        bail!("no event was {}", report.counted);
    }
    Ok(())
}
