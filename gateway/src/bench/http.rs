//! `bench http`: produce requests over the HTTP API, counting acknowledged records.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;

use crate::cli::HttpBenchArgs;
use crate::client::ApiClient;

use super::{proc_sample, Report, Samples};

/// A produce answer, counted without building a JSON map per record.
#[derive(serde::Deserialize)]
struct Acked {
    offsets: Vec<serde::de::IgnoredAny>,
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
        generator: None,
        extra: Vec::new(),
    })
}
