//! `tributary bench drain`: how fast an edge's backlog drains into its core.
//!
//! `--phase preload` produces N JSON sensor events into the edge while its
//! core is down (the script starts the core afterwards); `--phase measure`
//! then polls the core until it holds all N and reports events/s (from the
//! first event seen at the core, and from the start of the phase), the
//! bytes the edge put on the wire against the record bytes (compression),
//! and, given their pids, CPU time per event and peak RSS of both nodes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::{proc_sample, ProcSample};
use crate::cli::{DrainBenchArgs, DrainPhase};
use crate::client::ApiClient;

/// Runs one phase.
pub async fn run(args: DrainBenchArgs) -> anyhow::Result<()> {
    match args.phase {
        DrainPhase::Preload => preload(&args).await,
        DrainPhase::Measure => measure(&args).await,
    }
}

/// A sensor reading as JSON, padded to about `size` bytes.
fn event(i: u64, size: usize) -> Value {
    let mut v = json!({
        "sensor": format!("s-{:04}", (i * 7919) % 1000),
        "seq": i,
        "ts": 1_764_600_000_000u64 + i * 5,
        "temp": 15.0 + ((i * 37) % 1500) as f64 / 100.0,
        "hum": 30.0 + ((i * 13) % 600) as f64 / 10.0,
        "ok": true,
    });
    let len = v.to_string().len();
    if len + 8 < size {
        v["note"] = json!("n".repeat(size - len - 9));
    }
    v
}

async fn preload(args: &DrainBenchArgs) -> anyhow::Result<()> {
    let api = ApiClient::new(&args.edge)?;
    api.ensure_topic(&args.topic, args.partitions).await?;
    let started = Instant::now();
    const BATCH: u64 = 1000;
    const WORKERS: u64 = 4;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (api, topic, n, size) = (
            ApiClient::new(&args.edge)?,
            args.topic.clone(),
            args.events,
            args.payload,
        );
        tasks.push(tokio::spawn(async move {
            let path = format!("/v1/topics/{topic}/records");
            let mut i = w * BATCH;
            while i < n {
                let records: Vec<Value> = (i..(i + BATCH).min(n))
                    .map(|s| json!({"key": format!("s-{}", s % 64), "value": event(s, size)}))
                    .collect();
                api.post(&path, &json!({"records": records})).await?;
                i += WORKERS * BATCH;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "drain preload: {} events of ~{} B into {} ({} partitions) in {secs:.1} s ({:.0}/s)",
        args.events,
        args.payload,
        args.edge,
        args.partitions,
        args.events as f64 / secs
    );
    Ok(())
}

async fn end_total(api: &ApiClient, topic: &str) -> u64 {
    let Ok(t) = api.get(&format!("/v1/topics/{topic}")).await else {
        return 0;
    };
    t["partitions"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["end_offset"].as_u64()).sum())
        .unwrap_or(0)
}

async fn metric(api: &ApiClient, name: &str) -> anyhow::Result<u64> {
    let text = api
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name} in the edge's /metrics"))
}

async fn measure(args: &DrainBenchArgs) -> anyhow::Result<()> {
    let core = ApiClient::new(&args.core)?;
    let edge = ApiClient::new(&args.edge)?;
    let raw0 = metric(&edge, "tributary_sync_raw_bytes_total").await?;
    let wire0 = metric(&edge, "tributary_sync_wire_bytes_total").await?;
    let sample = |pid: Option<u32>| pid.map(proc_sample).transpose();
    let (edge0, core0) = (sample(args.edge_pid)?, sample(args.core_pid)?);
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut peak = (0u64, 0u64);
    loop {
        let have = end_total(&core, &args.topic).await;
        if have > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if let (Some(e), Some(c)) = (sample(args.edge_pid)?, sample(args.core_pid)?) {
            peak = (peak.0.max(e.rss_kib), peak.1.max(c.rss_kib));
        }
        if have >= args.events {
            break;
        }
        if started.elapsed() > args.timeout {
            bail!(
                "the core holds {have} of {} events after {:?}",
                args.events,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Instant::now();
    let from_first = done.duration_since(first.unwrap_or(started)).as_secs_f64();
    let from_start = done.duration_since(started).as_secs_f64();
    let raw = metric(&edge, "tributary_sync_raw_bytes_total").await? - raw0;
    let wire = metric(&edge, "tributary_sync_wire_bytes_total").await? - wire0;
    let (edge1, core1) = (sample(args.edge_pid)?, sample(args.core_pid)?);
    let n = args.events as f64;
    println!(
        "drain: {} events in {from_first:.2} s from the first seen at the core = {:.0} events/s ({from_start:.2} s, {:.0}/s, from the core's start)",
        args.events,
        n / from_first,
        n / from_start
    );
    println!(
        "wire: {wire} B sent for {raw} B of records ({:.2}×, {:.1} B/event on the wire)",
        raw as f64 / wire.max(1) as f64,
        wire as f64 / n
    );
    let cpu = |a: Option<ProcSample>, b: Option<ProcSample>| {
        a.zip(b)
            .map(|(a, b)| (b.cpu_seconds - a.cpu_seconds) * 1e6 / n)
    };
    let (edge_cpu, core_cpu) = (cpu(edge0, edge1), cpu(core0, core1));
    if let (Some(e), Some(c)) = (edge_cpu, core_cpu) {
        println!(
            "cpu: edge {e:.2} µs/event, core {c:.2} µs/event; peak RSS during the drain: edge {} MiB, core {} MiB",
            peak.0 / 1024,
            peak.1 / 1024
        );
    }
    println!(
        "RESULT {}",
        json!({
            "target": "drain",
            "events": args.events,
            "seconds": from_first,
            "events_per_second": n / from_first,
            "events_per_second_from_core_start": n / from_start,
            "raw_bytes": raw,
            "wire_bytes": wire,
            "edge_cpu_us_per_event": edge_cpu,
            "core_cpu_us_per_event": core_cpu,
            "edge_peak_rss_mib": peak.0 / 1024,
            "core_peak_rss_mib": peak.1 / 1024,
        })
    );
    Ok(())
}
