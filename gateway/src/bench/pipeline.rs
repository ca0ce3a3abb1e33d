//! `tributary bench pipeline`: how fast a pipeline computes.
//!
//! Two queries over the same generated sensor readings (`--keys` devices,
//! 20,000 readings per second of event time):
//! - `filter`: a filter and a projection (`WHERE temp > 25`, three columns,
//!   one computed);
//! - `tumble`: a GROUP BY over every device in 10-second tumbling windows
//!   (COUNT, AVG, MAX).
//!
//! `--stage engine` runs the operator alone on this thread over readings in
//! memory (one core: what the SQL engine costs); `--stage log` appends the
//! readings to a log on disk first, then times a pipeline from its start
//! until it has read them all (reads, checkpoints and its output written
//! and fsynced through the write path). One JSON line per run, with the
//! process's peak RSS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tributary_frontend::FrontendContext;
use tributary_processing::engine::{Counts, Engine, State};
use tributary_processing::manager::PipelineConfig;
use tributary_processing::{compile, Manager};
use tributary_storage::{AppendRecord, Event, Log, Record};

use super::proc_sample;
use crate::cli::{PipelineBenchArgs, PipelineQuery, PipelineStage};
use crate::config::{Config, Mode};

/// Event time of the first reading (ms).
const BASE: i64 = 1_764_600_000_000;

/// The SQL of a query.
pub fn sql(q: PipelineQuery) -> &'static str {
    match q {
        PipelineQuery::Filter => {
            "INSERT INTO bench_out SELECT device, temp * 1.8 + 32 AS fahrenheit, hum \
             FROM bench_in WHERE temp > 25"
        }
        PipelineQuery::Tumble => {
            "INSERT INTO bench_out SELECT _key AS device, COUNT(*) AS n, AVG(temp) AS avg_temp, \
             MAX(temp) AS hi, window_start, window_end FROM bench_in \
             GROUP BY _key, TUMBLE(_ts, INTERVAL '10' SECOND)"
        }
    }
}

/// Reading `i`: (key, value, event time). `scripts/bench-pipeline` writes
/// the same readings for DuckDB.
pub fn reading(i: u64, keys: u64) -> (String, Vec<u8>, i64) {
    let device = format!("dev-{:05}", (i * 7919) % keys);
    let temp = 15.0 + ((i * 37) % 1500) as f64 / 100.0;
    let hum = 30 + (i * 13) % 60;
    let value = format!(r#"{{"device":"{device}","temp":{temp},"hum":{hum},"seq":{i}}}"#);
    (device, value.into_bytes(), BASE + (i / 20) as i64)
}

/// Runs the benchmark.
pub async fn run(args: PipelineBenchArgs) -> anyhow::Result<()> {
    match args.stage {
        PipelineStage::Engine => engine(&args),
        PipelineStage::Log => through_the_log(&args).await,
    }
}

fn peak_rss_kib() -> u64 {
    proc_sample(std::process::id()).map_or(0, |s| s.peak_rss_kib)
}

fn engine(args: &PipelineBenchArgs) -> anyhow::Result<()> {
    let plan = Arc::new(compile(sql(args.query)).map_err(|e| anyhow::anyhow!("{e}"))?);
    let records: Vec<Record> = (0..args.events)
        .map(|i| {
            let (key, value, ts) = reading(i, args.keys);
            Record {
                partition: 0,
                offset: i,
                key: Some(key.into_bytes()),
                value: Some(value),
                timestamp: ts,
                headers: Vec::new(),
            }
        })
        .collect();
    let mut engine = Engine::new(plan, State::default());
    let mut out = Vec::with_capacity(4096);
    let mut counts = Counts::default();
    let mut rows = 0u64;
    let started = Instant::now();
    for r in &records {
        engine.process(0, "bench_in", r, &mut out, &mut counts);
        if out.len() >= 4096 {
            rows += out.len() as u64;
            out.clear();
        }
    }
    rows += out.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    print_result(args, "engine", secs, rows, counts.rows_in);
    Ok(())
}

async fn through_the_log(args: &PipelineBenchArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tributary-bench-pipeline-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = Config::default();
    let log_config = config.log_config(Mode::Edge);
    let sled = config.sled_options();
    let log_dir = dir.join("log");
    let log = tokio::task::spawn_blocking(move || Log::open(&log_dir, &sled, log_config)).await??;
    let mut topic = log.config().topic_defaults.config("bench_in");
    topic.partitions = 1;
    log.create_topic(topic).await?;
    let loading = Instant::now();
    let mut i = 0;
    while i < args.events {
        let end = (i + 10_000).min(args.events);
        let batch: Vec<AppendRecord> = (i..end)
            .map(|i| {
                let (key, value, ts) = reading(i, args.keys);
                AppendRecord::from(Event {
                    key: Some(key.into_bytes()),
                    value: Some(value),
                    timestamp: Some(ts),
                    headers: Vec::new(),
                })
            })
            .collect();
        log.append("bench_in", batch).await?;
        i = end;
    }
    eprintln!(
        "loaded {} readings in {:.1} s",
        args.events,
        loading.elapsed().as_secs_f64()
    );
    let shutdown = CancellationToken::new();
    let cx = FrontendContext::new(log.clone(), shutdown.clone(), "edge");
    let started = Instant::now();
    let manager = Manager::start(
        &cx,
        vec![PipelineConfig {
            name: "bench".into(),
            sql: sql(args.query).into(),
            paused: false,
        }],
        tributary_processing::manager::NodeLimits::default(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = loop {
        let info = manager.get("bench").map_err(|e| anyhow::anyhow!("{e}"))?;
        if info["lag"] == 0 && info["rows_in"].as_u64() == Some(args.events) {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    print_result(
        args,
        "log",
        secs,
        info["rows_out"].as_u64().unwrap_or(0),
        args.events,
    );
    drop(manager);
    log.close().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn print_result(args: &PipelineBenchArgs, stage: &str, secs: f64, rows: u64, events: u64) {
    let line = json!({
        "query": format!("{:?}", args.query).to_lowercase(),
        "stage": stage,
        "events": events,
        "keys": args.keys,
        "rows_out": rows,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "events_per_sec": (events as f64 / secs).round(),
        "peak_rss_mib": (peak_rss_kib() as f64 / 1024.0 * 10.0).round() / 10.0,
    });
    println!("{line}");
}
