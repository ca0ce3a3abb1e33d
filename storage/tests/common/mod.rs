//! Helpers shared by the storage integration tests.
//!
//! Nothing here sleeps to make a test pass: the only waiting is `wait_until`,
//! which polls a condition that must eventually hold and fails loudly (after a
//! generous deadline) if it never does.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tributary_storage::{
    AppendRecord, Event, Log, LogConfig, MemStore, Record, SledOptions, Store, TopicConfig,
};

/// How long `wait_until` polls before it declares a condition unreachable. Far
/// beyond anything a healthy run needs: it only bounds a hung test.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A log config whose background retention never runs on its own during a test
/// (tests call `enforce_retention` when they want a pass).
pub fn config() -> LogConfig {
    LogConfig {
        retention_interval: Duration::from_secs(3600),
        ..LogConfig::default()
    }
}

/// Like [`config`] but unknown topics are an error instead of being created.
pub fn strict_config() -> LogConfig {
    LogConfig {
        auto_create_topics: false,
        ..config()
    }
}

/// A log over a [`MemStore`] (the store handle is shared, so the test can hold,
/// fail or crash it).
pub fn mem_log(store: &MemStore, config: LogConfig) -> Log {
    Log::with_store(Arc::new(store.clone()), config).expect("open a log over a MemStore")
}

/// A sled-backed log in `dir` with default sled options.
pub fn sled_log(dir: &Path, config: LogConfig) -> Log {
    Log::open(dir, &SledOptions::default(), config).expect("open a sled log")
}

/// Milliseconds since the Unix epoch, as the log stamps events.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Creates `name` with `partitions` partitions and default limits.
pub async fn create(log: &Log, name: &str, partitions: u32) {
    log.create_topic(TopicConfig::new(name, partitions))
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
}

/// Appends one event with only a value and returns its offset (partition 0 of a
/// one-partition topic, or wherever round-robin put it).
pub async fn append_one(log: &Log, topic: &str, value: impl Into<Vec<u8>>) -> u64 {
    let positions = log
        .append(topic, vec![Event::new(value).into()])
        .await
        .unwrap_or_else(|e| panic!("append to {topic}: {e}"));
    assert_eq!(positions.len(), 1);
    positions[0].offset
}

/// An append record pinned to `partition`.
pub fn pinned(partition: u32, event: Event) -> AppendRecord {
    AppendRecord {
        partition: Some(partition),
        event,
    }
}

/// Reads a partition from its start to its end offset, in pages of at most
/// `page` records, checking that every page continues exactly where the last
/// one stopped.
pub fn read_all_paged(log: &Log, topic: &str, partition: u32, page: usize) -> Vec<Record> {
    let (mut offset, end) = offsets(log, topic, partition);
    let mut out = Vec::new();
    while offset < end {
        let r = log
            .read(topic, partition, offset, page, usize::MAX)
            .unwrap_or_else(|e| panic!("read {topic}/{partition} at {offset}: {e}"));
        assert!(
            !r.records.is_empty(),
            "read below the end returned nothing at {offset}"
        );
        assert!(
            r.records.len() <= page,
            "read returned more than max_records"
        );
        for (i, rec) in r.records.iter().enumerate() {
            assert_eq!(rec.offset, offset + i as u64, "records are not contiguous");
            assert_eq!(rec.partition, partition);
        }
        assert_eq!(r.next_offset, offset + r.records.len() as u64);
        offset = r.next_offset;
        out.extend(r.records);
    }
    out
}

/// Every stored record of a partition, start to end.
pub fn read_all(log: &Log, topic: &str, partition: u32) -> Vec<Record> {
    read_all_paged(log, topic, partition, 1000)
}

/// (start, end) offsets of a partition as the log reports them.
pub fn offsets(log: &Log, topic: &str, partition: u32) -> (u64, u64) {
    let info = log
        .topic(topic)
        .unwrap_or_else(|e| panic!("topic {topic}: {e}"));
    let p = &info.partitions[partition as usize];
    (p.start_offset, p.end_offset)
}

/// Polls `cond` until it holds; panics after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < DEADLINE, "gave up waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Asserts that `fut` does not complete within `window`. The futures this is used
/// on can never complete on their own (they wait for a held sync), so a slow
/// machine cannot make this fail.
pub async fn assert_pending<F: Future + Unpin>(fut: &mut F, window: Duration, what: &str) {
    if tokio::time::timeout(window, fut).await.is_ok() {
        panic!("{what} completed, but it must wait for the held sync");
    }
}

/// Number of batches the in-memory store holds (live, synced or not) for a partition.
pub fn live_batches(store: &MemStore, topic: &str, partition: u32) -> usize {
    let p = store.partition(topic, partition).expect("partition store");
    p.read(0, usize::MAX).expect("read live batches").len()
}

/// A deterministic pseudo-random byte generator (xorshift64*), so payloads are
/// not trivially compressible or repetitive.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// CRC-32 (IEEE), as the batch format uses; lets tests forge batches whose
/// checksum is right but whose contents are not.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}
