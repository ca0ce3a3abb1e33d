//! Storage benchmark (no harness): `cargo bench -p tributary-storage --bench log`.
//!
//! On a sled log in a temporary directory on disk:
//! 1. append throughput, durability `Fsync` (the default): 256 concurrent
//!    producers, each appending calls of 64 × 100-byte events, for a fixed time;
//! 2. read throughput: reopen the log and scan every partition back with `read`;
//! 3. append throughput again with `Durability::Interval(5ms)`;
//! 4. peak RSS (VmHWM) after each phase.
//!
//! Environment: `BENCH_SECS` (default 10) is each append phase's duration;
//! `BENCH_DIR` is where the temporary log directories go (default: the system
//! temp dir, which must be on a real disk for the fsync numbers to mean anything).
// A benchmark: a failed setup step ends the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tributary_storage::{
    AppendRecord, Durability, Event, Log, LogConfig, SledOptions, StatsSnapshot, TopicConfig,
};

const PRODUCERS: usize = 256;
const EVENTS_PER_CALL: usize = 64;
const EVENT_BYTES: usize = 100;
const PARTITIONS: u32 = 8;
const TOPIC: &str = "bench";
const MB: f64 = 1_000_000.0;

fn main() {
    let secs: f64 = match std::env::var("BENCH_SECS") {
        Ok(s) => s.parse().expect("BENCH_SECS must be a number of seconds"),
        Err(_) => 10.0,
    };
    let duration = Duration::from_secs_f64(secs);
    let parent = std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "tributary-storage log bench: {PRODUCERS} producers x {EVENTS_PER_CALL} events x {EVENT_BYTES} B per call, \
         {PARTITIONS} partitions, {secs} s per append phase, {} cores, dir under {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        parent.display()
    );

    let mut memory = Memory::default();

    // (a) Fsync appends, then (b) reads of what they wrote.
    let dir = tempdir(&parent);
    memory.start("Fsync appends");
    let appended = {
        let log = open(&dir, Durability::Fsync);
        let r = rt.block_on(append_phase(&log, duration));
        r.print("append, durability Fsync", &log);
        r
    };
    memory.end();
    memory.start("reopen + full scan");
    read_phase(&dir, appended.events);
    memory.end();
    drop(dir);

    // (a') Interval(5ms) appends.
    let dir = tempdir(&parent);
    memory.start("Interval(5ms) appends");
    {
        let log = open(&dir, Durability::Interval(Duration::from_millis(5)));
        let r = rt.block_on(append_phase(&log, duration));
        r.print("append, durability Interval(5ms)", &log);
        let t = Instant::now();
        rt.block_on(log.flush()).expect("final flush");
        println!("  final flush: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    memory.end();
    drop(dir);
    println!(
        "peak RSS of the whole run (max VmHWM): {:.1} MB",
        memory.overall_kb as f64 / 1024.0
    );
}

fn tempdir(parent: &std::path::Path) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tributary-bench-")
        .tempdir_in(parent)
        .expect("create a temporary directory")
}

fn open(dir: &tempfile::TempDir, durability: Durability) -> Log {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let mut config = LogConfig {
        durability,
        ..LogConfig::default()
    };
    let mut sled = SledOptions::default();
    // Tuning knobs for experiments; the defaults are what the node runs with.
    if let Some(b) = env("BENCH_BATCH_BYTES") {
        config.batch_bytes = b;
    }
    if let Some(s) = env("BENCH_SEGMENT_BYTES") {
        sled.segment_size = s;
    }
    if let Some(c) = env("BENCH_CACHE_BYTES") {
        sled.cache_capacity = c as u64;
    }
    Log::open(dir.path(), &sled, config).expect("open the log")
}

struct AppendRun {
    events: u64,
    calls: u64,
    elapsed: Duration,
    before: StatsSnapshot,
    after: StatsSnapshot,
    latencies: Vec<Duration>,
}

impl AppendRun {
    fn print(&self, what: &str, log: &Log) {
        let secs = self.elapsed.as_secs_f64();
        let cycles = self.after.commit_cycles - self.before.commit_cycles;
        let commit_secs = self.after.commit_seconds_sum - self.before.commit_seconds_sum;
        let encoded = self.after.append_bytes - self.before.append_bytes;
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 * p) as usize)
                .min(self.latencies.len().saturating_sub(1));
            self.latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        println!("{what}:");
        println!(
            "  {} events in {} calls over {secs:.2} s: {:.0} events/s, {:.1} MB/s of values ({:.1} MB/s encoded)",
            self.events,
            self.calls,
            self.events as f64 / secs,
            (self.events as usize * EVENT_BYTES) as f64 / MB / secs,
            encoded as f64 / MB / secs,
        );
        println!(
            "  commit cycles: {cycles} ({:.0}/s), {:.0} events/cycle, mean cycle {:.2} ms",
            cycles as f64 / secs,
            self.events as f64 / cycles.max(1) as f64,
            commit_secs * 1e3 / cycles.max(1) as f64,
        );
        println!(
            "  append latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
        println!("  size on disk: {:.1} MB", log.disk_bytes() as f64 / MB);
    }
}

async fn append_phase(log: &Log, duration: Duration) -> AppendRun {
    log.create_topic(TopicConfig::new(TOPIC, PARTITIONS))
        .await
        .expect("create the bench topic");
    let before = log.stats();
    let started = Instant::now();
    let deadline = started + duration;
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let log = log.clone();
            tokio::spawn(async move {
                let payload: Vec<u8> = (0..EVENT_BYTES).map(|i| (id + i) as u8).collect();
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let batch: Vec<AppendRecord> = (0..EVENTS_PER_CALL)
                        .map(|_| Event::new(payload.clone()).into())
                        .collect();
                    let t = Instant::now();
                    log.append(TOPIC, batch).await.expect("append");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for p in producers {
        latencies.extend(p.await.expect("producer task"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let calls = latencies.len() as u64;
    AppendRun {
        events: calls * EVENTS_PER_CALL as u64,
        calls,
        elapsed,
        before,
        after: log.stats(),
        latencies,
    }
}

fn read_phase(dir: &tempfile::TempDir, expected: u64) {
    let t = Instant::now();
    let log = open(dir, Durability::Fsync);
    println!(
        "reopen (recovery): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "  RSS after reopen, before the scan: {:.1} MB",
        proc_status_kb("VmRSS").unwrap_or(0) as f64 / 1024.0
    );
    let started = Instant::now();
    let (mut events, mut bytes, mut reads) = (0u64, 0u64, 0u64);
    for p in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let r = log
                .read(TOPIC, p, offset, 10_000, 4 * 1024 * 1024)
                .expect("read");
            if r.records.is_empty() {
                break;
            }
            reads += 1;
            events += r.records.len() as u64;
            bytes += r
                .records
                .iter()
                .map(|rec| rec.bytes().len() as u64)
                .sum::<u64>();
            offset = r.next_offset;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        events, expected,
        "the scan did not return every appended event"
    );
    println!("read (full scan with `read`, after reopen):");
    println!(
        "  {events} events in {reads} reads over {secs:.2} s: {:.0} events/s, {:.1} MB/s of values",
        events as f64 / secs,
        bytes as f64 / MB / secs
    );
}

fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Peak RSS per phase: VmHWM (from /proc/self/status) is reset before each phase
/// by writing 5 to /proc/self/clear_refs, so each phase reports its own peak.
#[derive(Default)]
struct Memory {
    phase: &'static str,
    overall_kb: u64,
    reset_ok: bool,
}

impl Memory {
    fn start(&mut self, phase: &'static str) {
        self.phase = phase;
        self.overall_kb = self.overall_kb.max(proc_status_kb("VmHWM").unwrap_or(0));
        self.reset_ok = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        println!(
            "[{phase}] RSS at start: {:.1} MB",
            proc_status_kb("VmRSS").unwrap_or(0) as f64 / 1024.0
        );
    }

    fn end(&mut self) {
        let hwm = proc_status_kb("VmHWM").unwrap_or(0);
        self.overall_kb = self.overall_kb.max(hwm);
        println!(
            "[{}] peak RSS (VmHWM{}): {:.1} MB, RSS at end: {:.1} MB",
            self.phase,
            if self.reset_ok {
                ", reset at phase start"
            } else {
                ", since process start"
            },
            hwm as f64 / 1024.0,
            proc_status_kb("VmRSS").unwrap_or(0) as f64 / 1024.0
        );
    }
}
