//! Integration tests that try to break the log: ordering, density, durability,
//! crashes, failures, recovery, retention, corruption and limits.
//!
//! Durability tests use `MemStore::hold_sync()`: a held sync can never complete
//! on its own, so "this must still be pending" is not a timing assertion.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use tributary_storage::partitioner::partition_for_key;
use tributary_storage::{
    AppendRecord, Durability, Error, Event, GroupOffset, Log, LogConfig, MemStore, OnFull,
    PartitionStore, Position, Record, SledOptions, SledStore, Store, TopicConfig,
};

const MAX: usize = usize::MAX;
const WINDOW: Duration = Duration::from_millis(200);
const HOUR_MS: i64 = 3_600_000;

/// Events exercising every field: keys (none, empty, binary), values (empty,
/// binary, larger than a batch), ordered and repeated headers, timestamps at the
/// extremes and unset (stamped at ingest).
fn rich_events(seed: u64) -> Vec<Event> {
    let mut rng = Rng::new(seed);
    let binary: Vec<u8> = (0..=255u8).collect();
    vec![
        Event::new("hello")
            .with_key("k1")
            .with_header("a", "1")
            .with_header("b", "")
            .with_header("a", "2")
            .with_timestamp(1_600_000_000_123),
        Event::new(Vec::new()),
        Event {
            key: Some(Vec::new()),
            value: Some(binary.clone()),
            timestamp: Some(0),
            headers: vec![
                ("ünïcödé".into(), vec![0, 255, 0]),
                (String::new(), Vec::new()),
            ],
        },
        Event::new(vec![0u8; 3])
            .with_key(vec![0u8, 1, 0])
            .with_timestamp(-5),
        Event::new(rng.bytes(20_000))
            .with_key(rng.bytes(300))
            .with_timestamp(i64::MAX),
        Event::new("min").with_timestamp(i64::MIN),
        Event::new(rng.bytes(77))
            .with_header("trace", rng.bytes(16))
            .with_header("trace", rng.bytes(16)),
    ]
}

/// Checks that `got` is `want` stored at `offset` in `partition`; an unset
/// timestamp must have been stamped within `[lo, hi]`.
fn assert_record(got: &Record, want: &Event, partition: u32, offset: u64, lo: i64, hi: i64) {
    assert_eq!(got.partition, partition);
    assert_eq!(got.offset, offset);
    assert_eq!(got.key, want.key, "key at {offset}");
    assert_eq!(got.value, want.value, "value at {offset}");
    assert_eq!(got.headers, want.headers, "headers at {offset}");
    match want.timestamp {
        Some(ts) => assert_eq!(got.timestamp, ts, "timestamp at {offset}"),
        None => assert!(
            (lo..=hi).contains(&got.timestamp),
            "stamped timestamp {} not within the append call [{lo}, {hi}]",
            got.timestamp
        ),
    }
}

// ---------------------------------------------------------------------------
// Round trip and partitioning
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_keys_values_headers_and_timestamps() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "rt", 1).await;

    let first = rich_events(1);
    let lo = now_ms();
    let positions = log
        .append(
            "rt",
            first.iter().cloned().map(AppendRecord::from).collect(),
        )
        .await
        .expect("append rich events");
    let hi = now_ms();
    let want: Vec<Position> = (0..first.len() as u64)
        .map(|offset| Position {
            partition: 0,
            offset,
        })
        .collect();
    assert_eq!(
        positions, want,
        "one call to one partition gets consecutive offsets from 0"
    );

    let second = rich_events(2);
    let lo2 = now_ms();
    let positions2 = log
        .append(
            "rt",
            second.iter().cloned().map(AppendRecord::from).collect(),
        )
        .await
        .expect("append again");
    let hi2 = now_ms();
    assert_eq!(
        positions2[0].offset,
        first.len() as u64,
        "the second call continues densely"
    );

    let all = read_all(&log, "rt", 0);
    assert_eq!(all.len(), first.len() + second.len());
    for (i, e) in first.iter().enumerate() {
        assert_record(&all[i], e, 0, i as u64, lo, hi);
    }
    for (i, e) in second.iter().enumerate() {
        let offset = positions2[i].offset;
        assert_record(&all[offset as usize], e, 0, offset, lo2, hi2);
    }

    // Paging one record at a time returns exactly the same records.
    assert_eq!(read_all_paged(&log, "rt", 0, 1), all);

    // Reading from the middle of a batch starts at that offset.
    let mid = log.read("rt", 0, 3, 2, MAX).expect("read mid-batch");
    assert_eq!(mid.records, all[3..5].to_vec());
    assert_eq!(mid.next_offset, 5);

    // max_bytes = 0 still returns one record (progress is always possible).
    let one = log.read("rt", 0, 4, 100, 0).expect("read with max_bytes 0");
    assert_eq!(one.records.len(), 1);
    assert_eq!(one.records[0], all[4]);

    // max_records = 0 returns nothing and does not move.
    let none = log.read("rt", 0, 2, 0, MAX).expect("read zero records");
    assert!(none.records.is_empty());
    assert_eq!(none.next_offset, 2);

    // Reading at the end is empty, one past it is out of range.
    let end = all.len() as u64;
    let at_end = log.read("rt", 0, end, 10, MAX).expect("read at end");
    assert!(at_end.records.is_empty());
    assert_eq!((at_end.next_offset, at_end.end_offset), (end, end));
    match log.read("rt", 0, end + 1, 10, MAX) {
        Err(Error::OffsetOutOfRange {
            offset,
            start: 0,
            end: e,
            ..
        }) => {
            assert_eq!((offset, e), (end + 1, end));
        }
        other => panic!("reading past the end must be out of range, got {other:?}"),
    }

    let info = log.topic("rt").expect("topic info");
    assert_eq!(info.events_appended, end);
    assert_eq!(log.stats().append_events, end);
    assert_eq!(log.stats().append_requests, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_like_kafka_keyless_calls_rotate_explicit_partition_wins() {
    let log = mem_log(&MemStore::new(), strict_config());
    create(&log, "p", 8).await;

    // Kafka's own murmur2 vectors (UtilsTest): toPositive(murmur2(key)) % 8.
    for (key, want) in [("21", 4u32), ("foobar", 6), ("abc", 3)] {
        assert_eq!(partition_for_key(key.as_bytes(), 8), want, "{key}");
        let pos = log
            .append("p", vec![Event::new(key).with_key(key).into()])
            .await
            .expect("append keyed");
        assert_eq!(
            pos[0].partition, want,
            "key {key} must land where Kafka puts it"
        );
    }

    // Many keys in one call: each lands per murmur2, dense per partition in input order.
    let before: Vec<u64> = (0..8).map(|p| offsets(&log, "p", p).1).collect();
    let keys: Vec<String> = (0..400).map(|i| format!("key-{i}")).collect();
    let positions = log
        .append(
            "p",
            keys.iter()
                .map(|k| Event::new(k.clone()).with_key(k.clone()).into())
                .collect(),
        )
        .await
        .expect("append 400 keyed events");
    let mut next = before.clone();
    for (k, pos) in keys.iter().zip(&positions) {
        let p = partition_for_key(k.as_bytes(), 8);
        assert_eq!(pos.partition, p, "{k}");
        assert_eq!(
            pos.offset, next[p as usize],
            "{k} is not at the next offset of partition {p}"
        );
        next[p as usize] += 1;
    }
    assert!(
        next.iter().zip(&before).all(|(n, b)| n > b),
        "400 keys should reach all 8 partitions"
    );
    for (k, pos) in keys.iter().zip(&positions) {
        let r = log
            .read("p", pos.partition, pos.offset, 1, MAX)
            .expect("read keyed");
        assert_eq!(r.records[0].key.as_deref(), Some(k.as_bytes()));
        assert_eq!(r.records[0].bytes(), k.as_bytes());
    }

    // Keyless: every event of one call goes to one partition; calls rotate.
    let mut previous: Option<u32> = None;
    let mut seen = BTreeSet::new();
    for call in 0..24 {
        let ps = log
            .append(
                "p",
                (0..5)
                    .map(|j| Event::new(format!("c{call}-{j}")).into())
                    .collect(),
            )
            .await
            .expect("append keyless");
        let p0 = ps[0].partition;
        for (j, pos) in ps.iter().enumerate() {
            assert_eq!(pos.partition, p0, "keyless events of one call were split");
            assert_eq!(pos.offset, ps[0].offset + j as u64);
        }
        if let Some(prev) = previous {
            assert_eq!(p0, (prev + 1) % 8, "keyless calls must rotate");
        }
        previous = Some(p0);
        seen.insert(p0);
    }
    assert_eq!(seen.len(), 8);

    // Explicit partition wins over the key and over round-robin; a mixed call
    // answers in input order.
    let key = (0..)
        .map(|i| format!("x{i}"))
        .find(|k| partition_for_key(k.as_bytes(), 8) != 5)
        .expect("some key does not hash to 5");
    let mixed = vec![
        pinned(5, Event::new("pinned-keyed").with_key(key.clone())),
        Event::new("keyless-a").into(),
        pinned(0, Event::new("pinned-keyless")),
        Event::new("keyed").with_key(key.clone()).into(),
        Event::new("keyless-b").into(),
    ];
    let ps = log.append("p", mixed.clone()).await.expect("append mixed");
    assert_eq!(ps[0].partition, 5);
    assert_eq!(ps[2].partition, 0);
    assert_eq!(ps[3].partition, partition_for_key(key.as_bytes(), 8));
    assert_eq!(
        ps[1].partition, ps[4].partition,
        "keyless events of one call share a partition"
    );
    assert_eq!(ps[1].partition, (previous.expect("rotated before") + 1) % 8);
    for (rec, pos) in mixed.iter().zip(&ps) {
        let r = log
            .read("p", pos.partition, pos.offset, 1, MAX)
            .expect("read mixed");
        assert_eq!(r.records[0].value, rec.event.value);
    }
    for p in 0..8 {
        read_all(&log, "p", p); // dense and contiguous everywhere
    }
}

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

async fn thousand_concurrent_appends(log: &Log) {
    const PARTITIONS: u32 = 4;
    create(log, "dense", PARTITIONS).await;
    let mut tasks = Vec::new();
    for task in 0..1000u32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let n = 1 + task % 5;
            let records: Vec<AppendRecord> = (0..n)
                .map(|j| {
                    let e = Event::new(format!("task-{task}-event-{j}"));
                    match (task + j) % 3 {
                        0 => e.with_key(format!("key-{}", task % 17)).into(),
                        1 => e.into(),
                        _ => pinned((task + j) % PARTITIONS, e),
                    }
                })
                .collect();
            let positions = log
                .append("dense", records)
                .await
                .expect("concurrent append");
            (task, positions)
        }));
    }
    let mut expected: HashMap<(u32, u64), String> = HashMap::new();
    let mut total = 0u64;
    for t in tasks {
        let (task, positions) = t.await.expect("task panicked");
        assert_eq!(positions.len() as u32, 1 + task % 5);
        let mut last_in_partition: HashMap<u32, u64> = HashMap::new();
        for (j, pos) in positions.iter().enumerate() {
            let payload = format!("task-{task}-event-{j}");
            if let Some(prev) = expected.insert((pos.partition, pos.offset), payload) {
                panic!(
                    "offset {}/{} handed out twice (was {prev})",
                    pos.partition, pos.offset
                );
            }
            // One call's events in one partition are consecutive, in input order.
            if let Some(prev) = last_in_partition.insert(pos.partition, pos.offset) {
                assert_eq!(
                    pos.offset,
                    prev + 1,
                    "task {task}: a call's events were interleaved"
                );
            }
            total += 1;
        }
    }
    let mut sum = 0;
    for p in 0..PARTITIONS {
        let mut got: Vec<u64> = expected
            .keys()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        got.sort_unstable();
        let n = got.len() as u64;
        assert_eq!(
            got,
            (0..n).collect::<Vec<_>>(),
            "partition {p} offsets are not exactly 0..{n}"
        );
        assert_eq!(offsets(log, "dense", p), (0, n));
        let records = read_all(log, "dense", p);
        assert_eq!(records.len() as u64, n);
        for r in records {
            assert_eq!(
                r.bytes(),
                expected[&(p, r.offset)].as_bytes(),
                "wrong payload at {p}/{}",
                r.offset
            );
        }
        sum += n;
    }
    assert_eq!(sum, total);
    assert_eq!(log.stats().append_events, total);
    assert_eq!(log.stats().append_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_appends_get_dense_unique_offsets_mem() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    thousand_concurrent_appends(&log).await;
    // Nothing was acknowledged that a crash would lose.
    let log = mem_log(&store.crashed(), strict_config());
    let durable: usize = (0..4).map(|p| read_all(&log, "dense", p).len()).sum();
    assert_eq!(
        durable as u64,
        log.topics()[0]
            .partitions
            .iter()
            .map(|p| p.end_offset)
            .sum::<u64>()
    );
    assert_eq!(
        durable,
        (0..1000u32).map(|t| 1 + t as usize % 5).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_appends_get_dense_unique_offsets_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), strict_config());
    thousand_concurrent_appends(&log).await;
    let before: Vec<Vec<Record>> = (0..4).map(|p| read_all(&log, "dense", p)).collect();
    drop(log);
    let log = sled_log(dir.path(), strict_config());
    for p in 0..4 {
        assert_eq!(
            read_all(&log, "dense", p),
            before[p as usize],
            "partition {p} changed across reopen"
        );
    }
}

/// Events larger than a batch are stored in chunks (sled's cache never
/// evicts pages of large values): they read back byte for byte, across a
/// reopen, beside small ones, and retention removes them whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_are_chunked_on_sled_and_read_back_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), strict_config());
    create(&log, "large", 1).await;
    let mut rng = Rng::new(7);
    let sizes = [
        0usize,
        10,
        12 * 1024,
        12 * 1024 + 1,
        8 * 1024 * 3,
        100_000,
        900_000,
        5,
    ];
    let values: Vec<Vec<u8>> = sizes.iter().map(|&n| rng.bytes(n)).collect();
    for v in &values {
        append_one(&log, "large", v.clone()).await;
    }
    let check = |log: &Log| {
        let got: Vec<Vec<u8>> = read_all_paged(log, "large", 0, 3)
            .into_iter()
            .map(|r| r.bytes().to_vec())
            .collect();
        assert_eq!(got.len(), values.len());
        for (i, (g, w)) in got.iter().zip(&values).enumerate() {
            assert!(g == w, "record {i} ({} bytes) differs", w.len());
        }
    };
    check(&log);
    drop(log);
    let log = sled_log(dir.path(), strict_config());
    check(&log);
    assert_eq!(offsets(&log, "large", 0), (0, values.len() as u64));
    assert_eq!(
        append_one(&log, "large", rng.bytes(50_000)).await,
        values.len() as u64
    );
    drop(log);
    // Retention removes chunked batches whole; what is left still reads.
    let mut sized = TopicConfig::new("large", 1);
    sized.retention_bytes = Some(60_000);
    let store = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
    store.put_topic(&sized).expect("narrow retention");
    store.sync().expect("sync");
    drop(store);
    let log = sled_log(dir.path(), strict_config());
    log.enforce_retention();
    let (start, end) = offsets(&log, "large", 0);
    assert!(start > 6, "the large batches were removed: start {start}");
    let kept = read_all(&log, "large", 0);
    assert_eq!(kept.len() as u64, end - start);
    assert_eq!(kept.last().map(|r| r.bytes().len()), Some(50_000));
}

// ---------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_is_neither_acknowledged_nor_visible_before_its_sync() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "d", 1).await;
    let mut end_rx = log.watch_end("d", 0).expect("watch end");

    store.hold_sync();
    let l = log.clone();
    let mut append =
        tokio::spawn(async move { l.append("d", vec![Event::new("held").into()]).await });
    // The committer writes the batch into the engine, then waits on the held sync.
    wait_until("the batch reaches the engine", || {
        live_batches(&store, "d", 0) == 1
    })
    .await;
    assert_pending(&mut append, WINDOW, "append").await;

    // The record is in the engine but no reader may see it.
    let r = log.read("d", 0, 0, 10, MAX).expect("read at 0");
    assert!(r.records.is_empty(), "a reader saw an undurable record");
    assert_eq!(r.end_offset, 0);
    assert_eq!(offsets(&log, "d", 0), (0, 0));
    assert!(matches!(
        log.read("d", 0, 1, 10, MAX),
        Err(Error::OffsetOutOfRange { end: 0, .. })
    ));
    assert_eq!(*end_rx.borrow_and_update(), 0);
    let f = log
        .fetch("d", 0, 0, 10, MAX, Duration::ZERO)
        .await
        .expect("fetch without wait");
    assert!(f.records.is_empty());

    // A tail waiting for offset 0, a flush and a group commit all wait too.
    let l = log.clone();
    let mut tail = tokio::spawn(async move { l.fetch("d", 0, 0, 10, MAX, DEADLINE).await });
    let l = log.clone();
    let mut flush = tokio::spawn(async move { l.flush().await });
    let l = log.clone();
    let mut commit = tokio::spawn(async move {
        l.commit_offsets(
            "g",
            vec![GroupOffset {
                topic: "d".into(),
                partition: 0,
                offset: 0,
            }],
        )
        .await
    });
    assert_pending(&mut tail, WINDOW, "tail fetch").await;
    assert_pending(&mut flush, WINDOW, "flush").await;
    assert_pending(&mut commit, WINDOW, "commit_offsets").await;
    assert!(
        !end_rx.has_changed().expect("sender alive"),
        "end offset moved before the sync"
    );

    // A crash now loses the record, and nothing was acknowledged.
    assert_eq!(live_batches(&store.crashed(), "d", 0), 0);

    store.release_sync();
    let positions = append.await.expect("join").expect("append after release");
    assert_eq!(
        positions,
        vec![Position {
            partition: 0,
            offset: 0
        }]
    );
    flush.await.expect("join").expect("flush after release");
    commit.await.expect("join").expect("commit after release");
    let tailed = tail.await.expect("join").expect("tail after release");
    assert_eq!(tailed.records.len(), 1);
    assert_eq!(tailed.records[0].bytes(), b"held");
    end_rx.changed().await.expect("end changes");
    assert_eq!(*end_rx.borrow(), 1);
    assert_eq!(
        live_batches(&store.crashed(), "d", 0),
        1,
        "acknowledged means synced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_keeps_acknowledged_records_and_loses_unsynced_ones() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "c", 2).await;

    let mut acked: BTreeMap<(u32, u64), Vec<u8>> = BTreeMap::new();
    for i in 0..50u32 {
        let value = format!("acked-{i}").into_bytes();
        let pos = log
            .append("c", vec![pinned(i % 2, Event::new(value.clone()))])
            .await
            .expect("append");
        acked.insert((pos[0].partition, pos[0].offset), value);
    }
    log.commit_offsets(
        "g",
        vec![GroupOffset {
            topic: "c".into(),
            partition: 0,
            offset: 10,
        }],
    )
    .await
    .expect("commit offsets");

    store.hold_sync();
    let l = log.clone();
    let mut lost = tokio::spawn(async move {
        let records = (0..10u32)
            .map(|i| pinned(i % 2, Event::new(format!("lost-{i}"))))
            .collect();
        l.append("c", records).await
    });
    wait_until("the unsynced batches reach the engine", || {
        live_batches(&store, "c", 0) == 26 && live_batches(&store, "c", 1) == 26
    })
    .await;
    assert_pending(&mut lost, WINDOW, "unsynced append").await;
    let crashed = store.crashed();
    store.release_sync();
    lost.await
        .expect("join")
        .expect("the old log completes its append on the old store");
    drop(log);

    let log = mem_log(&crashed, strict_config());
    for p in 0..2 {
        let got: Vec<(u64, Vec<u8>)> = read_all(&log, "c", p)
            .into_iter()
            .map(|r| (r.offset, r.bytes().to_vec()))
            .collect();
        let want: Vec<(u64, Vec<u8>)> = acked
            .iter()
            .filter(|((q, _), _)| *q == p)
            .map(|((_, o), v)| (*o, v.clone()))
            .collect();
        assert_eq!(got, want, "partition {p} after the crash");
        assert_eq!(offsets(&log, "c", p), (0, 25));
    }
    assert_eq!(
        log.group_offsets("g").expect("group offsets"),
        vec![GroupOffset {
            topic: "c".into(),
            partition: 0,
            offset: 10
        }]
    );

    // Offsets continue densely after the crash.
    for i in 0..6u32 {
        let pos = log
            .append("c", vec![pinned(i % 2, Event::new(format!("after-{i}")))])
            .await
            .expect("append");
        assert_eq!(pos[0].offset, 25 + u64::from(i / 2));
    }
    // And a second crash keeps everything acknowledged since.
    let again = crashed.crashed();
    drop(log);
    let log = mem_log(&again, strict_config());
    for p in 0..2 {
        let records = read_all(&log, "c", p);
        assert_eq!(records.len(), 28);
        assert_eq!(records[27].bytes(), format!("after-{}", 4 + p).into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_under_the_reserve_refuses_appends_keeps_reads_and_recovers_by_itself() {
    let store = MemStore::new();
    let reserve = 1024 * 1024;
    let log = mem_log(
        &store,
        LogConfig {
            min_free_bytes: reserve,
            ..strict_config()
        },
    );
    create(&log, "d", 1).await;
    store.set_free_bytes(Some(100 * 1024 * 1024));
    for i in 0..10 {
        assert_eq!(append_one(&log, "d", format!("v{i}")).await, i);
    }
    log.health().expect("room on the disk");

    // The disk fills up (another writer, or our own events).
    store.set_free_bytes(Some(reserve - 1));
    let syncs = store.syncs();
    for _ in 0..3 {
        let e = log
            .append("d", vec![Event::new("refused").into()])
            .await
            .expect_err("no room");
        assert!(
            matches!(e, Error::DiskFull { reserve: r, .. } if r == reserve),
            "{e}"
        );
    }
    assert!(matches!(log.health(), Err(Error::DiskFull { .. })));
    assert_eq!(
        store.syncs(),
        syncs,
        "nothing was written for the refused appends"
    );
    // Every stored event stays readable while the disk is full.
    let values: Vec<Vec<u8>> = read_all(&log, "d", 0)
        .into_iter()
        .map(|r| r.bytes().to_vec())
        .collect();
    assert_eq!(
        values,
        (0..10)
            .map(|i| format!("v{i}").into_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(log.stats().disk_full_rejected_appends, 3);
    // Offset commits are small: they still go through.
    log.commit_offsets(
        "g",
        vec![GroupOffset {
            topic: "d".into(),
            partition: 0,
            offset: 10,
        }],
    )
    .await
    .expect("commit while the disk is low");

    // An append that would itself eat into the reserve is refused too.
    store.set_free_bytes(Some(reserve + 1000));
    let e = log
        .append("d", vec![Event::new(vec![0u8; 4096]).into()])
        .await
        .expect_err("this event does not fit above the reserve");
    assert!(matches!(e, Error::DiskFull { .. }), "{e}");
    // A little room is not enough: writes resume with room for a whole cycle.
    store.set_free_bytes(Some(reserve + 100_000));
    assert!(matches!(log.health(), Err(Error::DiskFull { .. })));

    // Space is back: appends resume and health is green, without a restart.
    store.set_free_bytes(Some(100 * 1024 * 1024));
    log.health().expect("healthy again");
    assert_eq!(append_one(&log, "d", "after").await, 10);
    assert_eq!(offsets(&log, "d", 0), (0, 11), "offsets stay dense");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_makes_the_log_unwritable_for_good() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "f", 1).await;
    create(&log, "other", 1).await;
    assert_eq!(append_one(&log, "f", "ok").await, 0);
    log.health().expect("healthy before the failure");

    store.fail_sync(Some("disk on fire"));
    let err = log
        .append("f", vec![Event::new("doomed").into()])
        .await
        .expect_err("append must fail");
    assert!(
        matches!(&err, Error::Unwritable(m) if m.contains("disk on fire")),
        "{err}"
    );
    assert!(matches!(log.health(), Err(Error::Unwritable(m)) if m.contains("disk on fire")));
    assert_eq!(
        offsets(&log, "f", 0),
        (0, 1),
        "the failed record must not become visible"
    );

    // Even once the disk "recovers", the log refuses everything: the outcome of
    // the failed cycle is unknown and offsets must never be handed out twice.
    store.fail_sync(None);
    let syncs = store.syncs();
    let batches = live_batches(&store, "f", 0);
    for topic in ["f", "other"] {
        let e = log
            .append(topic, vec![Event::new("later").into()])
            .await
            .expect_err("append after failure");
        assert!(matches!(e, Error::Unwritable(_)), "{e}");
    }
    let e = log
        .create_topic(TopicConfig::new("new", 1))
        .await
        .expect_err("create after failure");
    assert!(matches!(e, Error::Unwritable(_)), "{e}");
    let e = log
        .commit_offsets(
            "g",
            vec![GroupOffset {
                topic: "f".into(),
                partition: 0,
                offset: 1,
            }],
        )
        .await
        .expect_err("commit after failure");
    assert!(matches!(e, Error::Unwritable(_)), "{e}");
    let e = log.flush().await.expect_err("flush after failure");
    assert!(matches!(e, Error::Unwritable(_)), "{e}");
    let e = log
        .close()
        .await
        .expect_err("close of a failed log cannot promise durability");
    assert!(matches!(e, Error::Unwritable(_)), "{e}");
    assert!(
        matches!(log.health(), Err(Error::Unwritable(_))),
        "health must keep reporting the failure"
    );
    assert_eq!(store.syncs(), syncs, "a failed log must never sync again");
    assert_eq!(
        live_batches(&store, "f", 0),
        batches,
        "a failed log must never write again"
    );
    assert_eq!(offsets(&log, "f", 0), (0, 1));
    assert!(log.stats().append_errors >= 3);
    drop(log);

    // A restart from what is durable keeps the acknowledged record.
    let log = mem_log(&store.crashed(), strict_config());
    let records = read_all(&log, "f", 0);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].bytes(), b"ok");
    assert_eq!(append_one(&log, "f", "after restart").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_append_in_flight_when_the_sync_fails_fails() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "f", 2).await;
    store.hold_sync();
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let l = log.clone();
        tasks.push(tokio::spawn(async move {
            l.append("f", vec![pinned(i % 2, Event::new(format!("e{i}")))])
                .await
        }));
    }
    wait_until("a cycle reaches the held sync", || {
        live_batches(&store, "f", 0) + live_batches(&store, "f", 1) > 0
    })
    .await;
    store.fail_sync(Some("EIO"));
    store.release_sync();
    for t in tasks {
        let e = t
            .await
            .expect("join")
            .expect_err("no append may succeed once a sync failed");
        assert!(matches!(e, Error::Unwritable(_)), "{e}");
    }
    assert_eq!(offsets(&log, "f", 0), (0, 0));
    assert_eq!(offsets(&log, "f", 1), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_refuses_new_appends_and_keeps_what_was_accepted() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    append_one(&log, "t", "kept").await;
    log.close().await.expect("close");
    assert!(matches!(log.health(), Err(Error::Closed)));
    let e = log
        .append("t", vec![Event::new("late").into()])
        .await
        .expect_err("append after close");
    assert!(matches!(e, Error::Closed), "{e}");
    assert_eq!(
        read_all(&log, "t", 0).len(),
        1,
        "reads still work after close"
    );
    drop(log);
    let log = mem_log(&store.crashed(), strict_config());
    assert_eq!(read_all(&log, "t", 0)[0].bytes(), b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_acks_early_and_flush_makes_durable() {
    let store = MemStore::new();
    let config = LogConfig {
        durability: Durability::Interval(Duration::from_millis(20)),
        ..strict_config()
    };
    let log = mem_log(&store, config.clone());
    create(&log, "iv", 1).await;

    // With syncs held, an interval-mode append is still acknowledged and readable.
    store.hold_sync();
    let pos = tokio::time::timeout(DEADLINE, log.append("iv", vec![Event::new("fast").into()]))
        .await
        .expect("interval mode must not wait for a sync")
        .expect("append");
    assert_eq!(pos[0].offset, 0);
    assert_eq!(read_all(&log, "iv", 0)[0].bytes(), b"fast");
    assert_eq!(
        live_batches(&store.crashed(), "iv", 0),
        0,
        "not durable yet: the sync is held"
    );

    // flush waits for durability.
    let l = log.clone();
    let mut flush = tokio::spawn(async move { l.flush().await });
    assert_pending(&mut flush, WINDOW, "flush").await;
    store.release_sync();
    flush.await.expect("join").expect("flush");
    let crashed = store.crashed();
    assert_eq!(
        live_batches(&crashed, "iv", 0),
        1,
        "flush made the record durable"
    );

    // The background flusher makes later appends durable without a flush.
    assert_eq!(append_one(&log, "iv", "second").await, 1);
    wait_until("the flusher syncs", || {
        live_batches(&store.crashed(), "iv", 0) == 2
    })
    .await;

    drop(log);
    let log = mem_log(&store.crashed(), config);
    let values: Vec<Vec<u8>> = read_all(&log, "iv", 0)
        .into_iter()
        .map(|r| r.bytes().to_vec())
        .collect();
    assert_eq!(values, vec![b"fast".to_vec(), b"second".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_on_sled_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        durability: Durability::Interval(Duration::from_millis(20)),
        ..config()
    };
    let log = sled_log(dir.path(), config.clone());
    create(&log, "iv", 3).await;
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let l = log.clone();
        tasks.push(tokio::spawn(async move {
            l.append("iv", vec![pinned(i % 3, Event::new(format!("v{i}")))])
                .await
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("append");
    }
    log.flush().await.expect("flush");
    let before: Vec<Vec<Record>> = (0..3).map(|p| read_all(&log, "iv", p)).collect();
    drop(log);
    let log = sled_log(dir.path(), config);
    for p in 0..3u32 {
        assert_eq!(read_all(&log, "iv", p), before[p as usize]);
    }
    assert_eq!(before.iter().map(Vec::len).sum::<usize>(), 100);
}

// ---------------------------------------------------------------------------
// Recovery on sled
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_groups_positions_in_chosen_partitions_are_forgotten_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |topic: &str, partition: u32, offset: u64| GroupOffset {
        topic: topic.into(),
        partition,
        offset,
    };
    {
        let log = sled_log(dir.path(), config());
        create(&log, "a", 2).await;
        create(&log, "b", 1).await;
        for p in 0..2 {
            log.append("a", vec![pinned(p, Event::new("x").with_timestamp(1))])
                .await
                .expect("append");
        }
        log.append("b", vec![AppendRecord::from(Event::new("y"))])
            .await
            .expect("append");
        log.commit_offsets("g", vec![at("a", 0, 1), at("a", 1, 1), at("b", 0, 1)])
            .await
            .expect("commit");
        log.commit_offsets("h", vec![at("a", 1, 0)])
            .await
            .expect("commit h");
        // One position of g, and one g never had: no error.
        log.forget_group_offsets("g", vec![("a".into(), 1), ("b".into(), 7)])
            .await
            .expect("forget");
        assert_eq!(
            log.group_offsets("g").expect("g"),
            vec![at("a", 0, 1), at("b", 0, 1)]
        );
    }
    let log = sled_log(dir.path(), config());
    assert_eq!(
        log.group_offsets("g").expect("g"),
        vec![at("a", 0, 1), at("b", 0, 1)],
        "the removal is on disk"
    );
    assert_eq!(
        log.group_offsets("h").expect("h"),
        vec![at("a", 1, 0)],
        "another group's position in that partition stays"
    );
    assert!(matches!(
        log.forget_group_offsets("bad\0group", vec![]).await,
        Err(Error::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_reopen_keeps_topics_offsets_data_and_group_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut expected: BTreeMap<(String, u32), Vec<(u64, Event)>> = BTreeMap::new();
    let mut record = |topic: &str, positions: &[Position], events: &[Event]| {
        for (pos, e) in positions.iter().zip(events) {
            expected
                .entry((topic.to_owned(), pos.partition))
                .or_default()
                .push((pos.offset, e.clone()));
        }
    };
    let stamp = |events: Vec<Event>| -> Vec<Event> {
        events
            .into_iter()
            .map(|e| {
                if e.timestamp.is_none() {
                    e.with_timestamp(42)
                } else {
                    e
                }
            })
            .collect()
    };

    let mut alpha_config = TopicConfig::new("alpha", 3);
    alpha_config.max_event_bytes = 2 * 1024 * 1024;
    let groups = vec![
        GroupOffset {
            topic: "alpha".into(),
            partition: 1,
            offset: 3,
        },
        GroupOffset {
            topic: "beta".into(),
            partition: 0,
            offset: 5,
        },
    ];
    {
        let log = sled_log(dir.path(), config());
        log.create_topic(alpha_config.clone())
            .await
            .expect("create alpha");
        create(&log, "beta", 1).await;
        for round in 0..20u64 {
            let events = stamp(rich_events(round));
            let records: Vec<AppendRecord> = events
                .iter()
                .enumerate()
                .map(|(i, e)| pinned(i as u32 % 3, e.clone()))
                .collect();
            let positions = log.append("alpha", records).await.expect("append alpha");
            record("alpha", &positions, &events);
            let events = stamp(rich_events(1000 + round));
            let positions = log
                .append(
                    "beta",
                    events.iter().cloned().map(AppendRecord::from).collect(),
                )
                .await
                .expect("append beta");
            record("beta", &positions, &events);
        }
        // Auto-created topic.
        let events: Vec<Event> = (0..10)
            .map(|i| Event::new(format!("g{i}")).with_timestamp(i))
            .collect();
        let positions = log
            .append(
                "gamma",
                events.iter().cloned().map(AppendRecord::from).collect(),
            )
            .await
            .expect("gamma");
        record("gamma", &positions, &events);
        log.commit_offsets("readers", groups.clone())
            .await
            .expect("commit");
        log.commit_offsets("other", vec![groups[0].clone()])
            .await
            .expect("commit other");
        // Dropping the log joins its threads and releases sled's lock.
    }

    let check = |log: &Log, expected: &BTreeMap<(String, u32), Vec<(u64, Event)>>| {
        let names: Vec<String> = log.topics().into_iter().map(|t| t.config.name).collect();
        assert_eq!(names, ["alpha", "beta", "gamma"]);
        // As created, with the id it was given then.
        let mut stored = log.topic("alpha").expect("alpha").config;
        assert_ne!(stored.id, [0; 16]);
        stored.id = alpha_config.id;
        assert_eq!(stored, alpha_config);
        for ((topic, p), want) in expected {
            let got = read_all(log, topic, *p);
            assert_eq!(got.len(), want.len(), "{topic}/{p}");
            assert_eq!(offsets(log, topic, *p), (0, want.len() as u64));
            for (r, (offset, e)) in got.iter().zip(want) {
                assert_record(r, e, *p, *offset, 0, 0);
            }
        }
    };

    let log = sled_log(dir.path(), config());
    check(&log, &expected);
    let mut sorted = groups.clone();
    sorted.sort();
    assert_eq!(log.group_offsets("readers").expect("groups"), sorted);
    assert_eq!(
        log.group_offsets("other").expect("groups"),
        vec![groups[0].clone()]
    );
    assert!(log.group_offsets("nobody").expect("groups").is_empty());

    // The next offsets continue densely in every partition.
    for p in 0..3u32 {
        let end = expected[&("alpha".to_owned(), p)].len() as u64;
        let e = Event::new(format!("after-{p}")).with_timestamp(7);
        let pos = log
            .append("alpha", vec![pinned(p, e.clone())])
            .await
            .expect("append after reopen");
        assert_eq!(pos[0].offset, end, "alpha/{p}");
        expected
            .entry(("alpha".to_owned(), p))
            .or_default()
            .push((end, e));
    }
    drop(log);
    let log = sled_log(dir.path(), config());
    check(&log, &expected);
}

/// sled's I/O threads hold its file lock for a moment after the last handle is
/// dropped; a reopen right after a drop must still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_reopen_right_after_drop_is_reliable() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..40u64 {
        let log = sled_log(dir.path(), config());
        let topic = format!("again-{}", round % 4);
        let events = (0..200)
            .map(|i| Event::new(format!("{round}-{i:0>200}")).into())
            .collect();
        let positions = log.append(&topic, events).await.expect("append");
        assert_eq!(positions[0].offset, round / 4 * 200);
        drop(log);
    }
    let log = sled_log(dir.path(), config());
    for t in 0..4 {
        assert_eq!(read_all(&log, &format!("again-{t}"), 0).len(), 10 * 200);
    }
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_retention_advances_start_and_never_reuses_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), strict_config());
    let mut sized = TopicConfig::new("sized", 1);
    sized.retention_bytes = Some(4096);
    log.create_topic(sized).await.expect("create sized");
    let value = |i: u64| format!("{i:0>100}").into_bytes();
    for i in 0..120 {
        assert_eq!(append_one(&log, "sized", value(i)).await, i);
    }
    assert_eq!(offsets(&log, "sized", 0), (0, 120));
    log.enforce_retention();

    let (start, end) = offsets(&log, "sized", 0);
    assert!(start > 0, "retention removed nothing");
    assert_eq!(end, 120, "retention must not move the end");
    let bytes = log.topic("sized").expect("info").partitions[0].bytes;
    assert!(bytes <= 4096, "{bytes} bytes kept over a 4096-byte limit");
    assert!(
        bytes + 200 > 4096,
        "retention removed more than needed: {bytes} bytes kept"
    );
    assert_eq!(log.stats().retention_removed_events, start);

    for below in [0, start - 1] {
        match log.read("sized", 0, below, 10, MAX) {
            Err(e @ Error::OffsetOutOfRange { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("{start}..=120")),
                    "message must name the range: {msg}"
                );
                let Error::OffsetOutOfRange {
                    offset,
                    start: s,
                    end: e,
                    ..
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((offset, s, e), (below, start, 120));
            }
            other => {
                panic!("read below start at {below}: expected OffsetOutOfRange, got {other:?}")
            }
        }
        let e = log
            .fetch("sized", 0, below, 10, MAX, Duration::ZERO)
            .await
            .expect_err("fetch below start");
        assert!(matches!(e, Error::OffsetOutOfRange { .. }), "{e}");
    }
    let kept = read_all(&log, "sized", 0);
    assert_eq!(kept.first().map(|r| r.offset), Some(start));
    for r in &kept {
        assert_eq!(r.bytes(), value(r.offset));
    }

    // A topic where retention removes every batch.
    let mut tiny = TopicConfig::new("tiny", 1);
    tiny.retention_bytes = Some(1);
    log.create_topic(tiny).await.expect("create tiny");
    for i in 0..10 {
        assert_eq!(append_one(&log, "tiny", value(i)).await, i);
    }
    log.enforce_retention();
    assert_eq!(offsets(&log, "tiny", 0), (10, 10));
    assert!(log
        .read("tiny", 0, 10, 10, MAX)
        .expect("read at end")
        .records
        .is_empty());
    assert!(matches!(
        log.read("tiny", 0, 9, 10, MAX),
        Err(Error::OffsetOutOfRange {
            start: 10,
            end: 10,
            ..
        })
    ));
    drop(log);

    let log = sled_log(dir.path(), strict_config());
    assert_eq!(
        offsets(&log, "sized", 0),
        (start, 120),
        "reopen must keep start and end"
    );
    assert_eq!(read_all(&log, "sized", 0), kept);
    assert_eq!(
        offsets(&log, "tiny", 0),
        (10, 10),
        "an emptied partition must remember its end"
    );
    assert_eq!(append_one(&log, "sized", "next").await, 120);
    assert_eq!(
        append_one(&log, "tiny", "next").await,
        10,
        "offsets were reused after retention emptied the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_retention_removes_old_batches_by_producer_timestamp() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    let mut aged = TopicConfig::new("aged", 1);
    aged.retention_ms = Some(HOUR_MS as u64);
    log.create_topic(aged.clone()).await.expect("create aged");
    let old = now_ms() - 2 * HOUR_MS;
    for i in 0..5 {
        let pos = log
            .append(
                "aged",
                vec![Event::new(format!("old-{i}"))
                    .with_timestamp(old + i)
                    .into()],
            )
            .await;
        assert_eq!(pos.expect("append old")[0].offset, i as u64);
    }
    for i in 5..8 {
        assert_eq!(append_one(&log, "aged", format!("new-{i}")).await, i);
    }
    log.enforce_retention();
    assert_eq!(offsets(&log, "aged", 0), (5, 8));
    let values: Vec<Vec<u8>> = read_all(&log, "aged", 0)
        .into_iter()
        .map(|r| r.bytes().to_vec())
        .collect();
    assert_eq!(
        values,
        vec![b"new-5".to_vec(), b"new-6".to_vec(), b"new-7".to_vec()]
    );
    assert!(matches!(
        log.read("aged", 0, 4, 10, MAX),
        Err(Error::OffsetOutOfRange { start: 5, .. })
    ));

    // "Forever" spelled as a huge retention_ms must not expire anything.
    for (name, ms) in [
        ("forever", u64::MAX),
        ("almost-forever", i64::MAX as u64 + 1),
    ] {
        let mut forever = TopicConfig::new(name, 1);
        forever.retention_ms = Some(ms);
        log.create_topic(forever).await.expect("create forever");
        for ts in [0, old, i64::MIN + 1] {
            log.append(name, vec![Event::new("keep").with_timestamp(ts).into()])
                .await
                .expect("append");
        }
        log.enforce_retention();
        assert_eq!(
            offsets(&log, name, 0),
            (0, 3),
            "retention_ms = {ms} removed events"
        );
    }

    // Every batch expired.
    let mut gone = aged.clone();
    gone.name = "gone".into();
    log.create_topic(gone).await.expect("create gone");
    for i in 0..4 {
        let pos = log
            .append("gone", vec![Event::new("x").with_timestamp(old + i).into()])
            .await;
        assert_eq!(pos.expect("append")[0].offset, i as u64);
    }
    log.enforce_retention();
    assert_eq!(offsets(&log, "gone", 0), (4, 4));
    // The pass removed every batch of "gone"; nothing synced since.

    // A crash right after a pass (no sync since) may bring batches back, but
    // never offsets: the end stays and the next append continues from it.
    let unsynced = store.crashed();
    log.flush().await.expect("flush");
    let synced = store.crashed();
    drop(log);
    for (what, s) in [("unsynced", unsynced), ("synced", synced)] {
        let log = mem_log(&s, strict_config());
        let (start, end) = offsets(&log, "gone", 0);
        assert_eq!(end, 4, "{what}: end moved");
        assert!(start <= 4);
        if what == "synced" {
            assert_eq!(start, 4, "a synced retention pass must stick");
            assert_eq!(offsets(&log, "aged", 0), (5, 8));
        }
        assert_eq!(
            append_one(&log, "gone", "next").await,
            4,
            "{what}: offsets reused"
        );
    }
}

/// A checkpoint a store operation stops at (once armed) until the test releases
/// it, to line up concurrent operations deterministically.
#[derive(Default)]
struct Gate {
    armed: AtomicBool,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    released: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    /// Arms the gate; the receiver hears when an operation has stopped at it.
    fn arm(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        *self.entered.lock().expect("gate") = Some(tx);
        self.armed.store(true, Ordering::SeqCst);
        rx
    }

    /// Called by the store: stops the first caller after `arm` until `release`.
    fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            if let Some(tx) = self.entered.lock().expect("gate").take() {
                tx.send(()).expect("test listens");
            }
            let mut released = self.released.lock().expect("gate");
            while !*released {
                released = self.cv.wait(released).expect("gate");
            }
        }
    }

    fn release(&self) {
        *self.released.lock().expect("gate") = true;
        self.cv.notify_all();
    }
}

/// A [`MemStore`] with gates before `put_floor` and before partition reads.
#[derive(Default)]
struct GatedStore {
    inner: MemStore,
    floor_gate: Arc<Gate>,
    read_gate: Arc<Gate>,
}

struct GatedPartition {
    inner: Arc<dyn PartitionStore>,
    read_gate: Arc<Gate>,
}

impl PartitionStore for GatedPartition {
    fn insert(&self, base: u64, value: Vec<u8>) -> tributary_storage::Result<()> {
        self.inner.insert(base, value)
    }
    fn insert_marked(&self, base: u64, value: Vec<u8>, mark: u64) -> tributary_storage::Result<()> {
        self.inner.insert_marked(base, value, mark)
    }
    fn mark(&self) -> tributary_storage::Result<Option<u64>> {
        self.inner.mark()
    }
    fn remove(&self, base: u64) -> tributary_storage::Result<()> {
        self.inner.remove(base)
    }
    fn first(&self) -> tributary_storage::Result<Option<(u64, Vec<u8>)>> {
        self.inner.first()
    }
    fn last(&self) -> tributary_storage::Result<Option<(u64, Vec<u8>)>> {
        self.inner.last()
    }
    fn read(&self, from: u64, max_bytes: usize) -> tributary_storage::Result<Vec<(u64, Vec<u8>)>> {
        self.read_gate.pass();
        self.inner.read(from, max_bytes)
    }
    fn read_after(
        &self,
        after: u64,
        max_bytes: usize,
    ) -> tributary_storage::Result<Vec<(u64, Vec<u8>)>> {
        self.read_gate.pass();
        self.inner.read_after(after, max_bytes)
    }
}

impl Store for GatedStore {
    fn load_topics(&self) -> tributary_storage::Result<Vec<TopicConfig>> {
        self.inner.load_topics()
    }
    fn put_topic(&self, config: &TopicConfig) -> tributary_storage::Result<()> {
        self.inner.put_topic(config)
    }
    fn remove_topic(&self, topic: &str) -> tributary_storage::Result<()> {
        self.inner.remove_topic(topic)
    }
    fn drop_partitions(&self, topic: &str) -> tributary_storage::Result<()> {
        self.inner.drop_partitions(topic)
    }
    fn partition_topics(&self) -> tributary_storage::Result<Vec<String>> {
        self.inner.partition_topics()
    }
    fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> tributary_storage::Result<Arc<dyn PartitionStore>> {
        Ok(Arc::new(GatedPartition {
            inner: self.inner.partition(topic, partition)?,
            read_gate: self.read_gate.clone(),
        }))
    }
    fn put_floor(&self, topic: &str, partition: u32, start: u64) -> tributary_storage::Result<()> {
        self.floor_gate.pass();
        self.inner.put_floor(topic, partition, start)
    }
    fn floor(&self, topic: &str, partition: u32) -> tributary_storage::Result<Option<u64>> {
        self.inner.floor(topic, partition)
    }
    fn put_group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
        metadata: &[u8],
    ) -> tributary_storage::Result<()> {
        self.inner
            .put_group_offset(group, topic, partition, offset, metadata)
    }
    fn group_offsets(
        &self,
        group: &str,
    ) -> tributary_storage::Result<Vec<tributary_storage::store::GroupPosition>> {
        self.inner.group_offsets(group)
    }
    fn forget_group(&self, group: &str) -> tributary_storage::Result<()> {
        self.inner.forget_group(group)
    }
    fn forget_group_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> tributary_storage::Result<()> {
        self.inner.forget_group_offset(group, topic, partition)
    }
    fn group_names(&self) -> tributary_storage::Result<Vec<String>> {
        self.inner.group_names()
    }
    fn put_meta(
        &self,
        space: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> tributary_storage::Result<()> {
        self.inner.put_meta(space, key, value)
    }
    fn meta(&self, space: &str) -> tributary_storage::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.meta(space)
    }
    fn floors(&self) -> tributary_storage::Result<Vec<(String, u32, u64)>> {
        self.inner.floors()
    }
    fn for_each_meta(
        &self,
        f: &mut tributary_storage::store::MetaVisitor<'_>,
    ) -> tributary_storage::Result<()> {
        self.inner.for_each_meta(f)
    }
    fn clear(&self) -> tributary_storage::Result<()> {
        self.inner.clear()
    }
    fn sync(&self) -> tributary_storage::Result<()> {
        self.inner.sync()
    }
    fn disk_bytes(&self) -> u64 {
        self.inner.disk_bytes()
    }
}

/// A log over a fresh [`GatedStore`], with a one-partition topic `tiny` that
/// size retention empties completely.
async fn gated_log() -> (Log, Arc<GatedStore>) {
    let store = Arc::new(GatedStore::default());
    let log = Log::with_store(store.clone(), strict_config()).expect("open gated log");
    let mut tiny = TopicConfig::new("tiny", 1);
    tiny.retention_bytes = Some(1);
    log.create_topic(tiny).await.expect("create");
    (log, store)
}

/// `enforce_retention` is public and the background thread runs it too: two
/// passes at once must not write a stale floor after a newer one (which would
/// hand out old offsets again after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retention_passes_never_move_the_floor_back() {
    let (log, store) = gated_log().await;
    let gate = store.floor_gate.clone();
    assert_eq!(append_one(&log, "tiny", "a").await, 0);
    assert_eq!(append_one(&log, "tiny", "b").await, 1);

    // Pass A reads the first batch (offset 0) and stops before writing its floor.
    let entered = gate.arm();
    let l = log.clone();
    let slow = std::thread::spawn(move || l.enforce_retention());
    entered
        .recv_timeout(DEADLINE)
        .expect("pass A reaches put_floor");

    // Pass B runs meanwhile. If passes are serialized it waits for A, so give it
    // only a bounded chance to finish first; either way the outcome must be right.
    let (done_tx, done_rx) = mpsc::channel();
    let l = log.clone();
    let fast = std::thread::spawn(move || {
        l.enforce_retention();
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(Duration::from_millis(500));
    gate.release();
    slow.join().expect("pass A");
    fast.join().expect("pass B");

    assert_eq!(offsets(&log, "tiny", 0), (2, 2));
    let removed = log.stats().retention_removed_batches;
    log.flush().await.expect("flush");
    drop(log);
    let log = mem_log(&store.inner.crashed(), strict_config());
    assert_eq!(offsets(&log, "tiny", 0), (2, 2), "the floor moved back");
    assert_eq!(
        append_one(&log, "tiny", "c").await,
        2,
        "offset handed out twice"
    );
    assert_eq!(removed, 2, "a batch was counted twice");
}

/// A read that loses its batches to retention while it runs answers
/// `OffsetOutOfRange` with a range that is valid now (start ≤ end), not a fresh
/// start paired with the end from before the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_racing_retention_reports_a_valid_range() {
    let (log, store) = gated_log().await;
    assert_eq!(append_one(&log, "tiny", "a").await, 0);

    // The read checks 0 against 0..=1, then stops before touching the store.
    let entered = store.read_gate.arm();
    let l = log.clone();
    let reader = std::thread::spawn(move || l.read("tiny", 0, 0, 10, MAX));
    entered
        .recv_timeout(DEADLINE)
        .expect("the read reaches the store");

    // Meanwhile the log grows and retention removes everything.
    assert_eq!(append_one(&log, "tiny", "b").await, 1);
    assert_eq!(append_one(&log, "tiny", "c").await, 2);
    log.enforce_retention();
    assert_eq!(offsets(&log, "tiny", 0), (3, 3));

    store.read_gate.release();
    match reader.join().expect("reader thread") {
        Err(e @ Error::OffsetOutOfRange { .. }) => {
            let msg = e.to_string();
            let Error::OffsetOutOfRange {
                offset, start, end, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!((offset, start, end), (0, 3, 3), "{msg}");
        }
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
}

/// Retention, appends and readers all at once on sled: a reader either gets
/// the right records, contiguous from where it asked, or an out-of-range error
/// for an offset that retention really removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_racing_appends_and_readers_never_serves_wrong_data() {
    const CALLS: u64 = 300;
    const PER_CALL: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        durability: Durability::Interval(Duration::from_millis(5)),
        ..strict_config()
    };
    let log = sled_log(dir.path(), config.clone());
    let mut race = TopicConfig::new("race", 1);
    race.retention_bytes = Some(3000);
    log.create_topic(race).await.expect("create");

    let stop = Arc::new(AtomicBool::new(false));
    let retention = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                log.enforce_retention();
                std::thread::yield_now();
            }
        })
    };
    let reader = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let (mut offset, mut reads, mut out_of_range) = (0u64, 0u64, 0u64);
            loop {
                let done = stop.load(Ordering::SeqCst);
                match log.read("race", 0, offset, 7, MAX) {
                    Ok(r) => {
                        reads += 1;
                        for (i, rec) in r.records.iter().enumerate() {
                            assert_eq!(rec.offset, offset + i as u64, "not contiguous");
                            assert_eq!(
                                rec.bytes(),
                                format!("v{}", rec.offset).into_bytes(),
                                "wrong data"
                            );
                        }
                        assert!(r.next_offset <= r.end_offset);
                        if r.records.is_empty() {
                            // Caught up: finish, or go back to the oldest records,
                            // which are the ones retention is busy removing.
                            if done && r.end_offset == CALLS * PER_CALL {
                                return (reads, out_of_range);
                            }
                            offset = r.start_offset;
                        } else {
                            offset = r.next_offset;
                        }
                    }
                    Err(Error::OffsetOutOfRange {
                        offset: o,
                        start,
                        end,
                        ..
                    }) => {
                        assert!(
                            o < start && start <= end,
                            "out of range for {o} with {start}..={end}"
                        );
                        out_of_range += 1;
                        offset = start;
                    }
                    Err(e) => panic!("read failed: {e}"),
                }
            }
        })
    };
    for call in 0..CALLS {
        let records = (0..PER_CALL)
            .map(|i| Event::new(format!("v{}", call * PER_CALL + i)).into())
            .collect::<Vec<_>>();
        let pos = log.append("race", records).await.expect("append");
        assert_eq!(pos[0].offset, call * PER_CALL);
    }
    stop.store(true, Ordering::SeqCst);
    retention.join().expect("retention thread");
    let (reads, out_of_range) = reader.await.expect("reader");
    println!("reader: {reads} reads, {out_of_range} out-of-range answers");
    assert!(reads > 0);
    log.enforce_retention();
    let (start, end) = offsets(&log, "race", 0);
    assert_eq!(end, CALLS * PER_CALL);
    assert!(start > 0);
    let kept = read_all(&log, "race", 0);
    drop(log);
    let log = sled_log(dir.path(), config);
    assert_eq!(offsets(&log, "race", 0), (start, end));
    assert_eq!(read_all(&log, "race", 0), kept);
    assert_eq!(append_one(&log, "race", "next").await, end);
}

// ---------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------

/// Topic `c` with two partitions of ten one-event batches each (bases 0..=9).
async fn ten_single_event_batches(dir: &std::path::Path) {
    let log = sled_log(dir, strict_config());
    create(&log, "c", 2).await;
    for i in 0..10u64 {
        for p in 0..2 {
            let pos = log
                .append("c", vec![pinned(p, Event::new(format!("value-{i}")))])
                .await
                .expect("append");
            assert_eq!(pos[0].offset, i);
        }
    }
}

fn tamper(dir: &std::path::Path, partition: u32, base: u64, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let store = SledStore::open(dir, &SledOptions::default()).expect("open sled store directly");
    let p = store.partition("c", partition).expect("partition");
    let (found, value) = p
        .read(base, 1)
        .expect("read batch")
        .into_iter()
        .next()
        .expect("a batch");
    assert_eq!(found, base, "expected a batch at {base}");
    p.insert(base, f(value)).expect("insert tampered batch");
    store.sync().expect("sync");
}

fn assert_corruption(
    r: tributary_storage::Result<impl std::fmt::Debug>,
    partition: u32,
    base: u64,
) {
    match r {
        Err(e @ Error::Corruption { .. }) => {
            let msg = e.to_string();
            let Error::Corruption {
                topic,
                partition: p,
                offset,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!((topic.as_str(), p, offset), ("c", partition, base), "{msg}");
            assert!(
                msg.contains(&format!("c/{partition}")) && msg.contains(&format!("offset {base}")),
                "{msg}"
            );
        }
        other => panic!("expected Corruption at c/{partition}@{base}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_batches_are_reported_with_their_location_never_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    ten_single_event_batches(dir.path()).await;

    // A bit flip in a middle batch of partition 1, garbage in another.
    tamper(dir.path(), 1, 4, |mut v| {
        let i = v.len() - 3;
        v[i] ^= 0x01;
        v
    });
    tamper(dir.path(), 1, 6, |_| b"garbage".to_vec());
    // Partition 0: a flipped header byte (the record count) in a middle batch.
    let victim = 5;
    tamper(dir.path(), 0, victim, |mut v| {
        v[7] ^= 0x80;
        v
    });

    let log = sled_log(dir.path(), strict_config());
    assert_corruption(log.read("c", 1, 4, 10, MAX), 1, 4);
    assert_corruption(log.read("c", 1, 0, 100, MAX), 1, 4); // a scan runs into it
    assert_corruption(log.read("c", 1, 6, 10, MAX), 1, 6);
    assert_corruption(log.fetch("c", 1, 4, 10, MAX, Duration::ZERO).await, 1, 4);
    assert_corruption(log.read("c", 0, victim, 10, MAX), 0, victim);
    // Intact batches still read.
    for offset in [0, 3, 5, 7, 9] {
        let r = log.read("c", 1, offset, 1, MAX).expect("intact batch");
        assert_eq!(r.records[0].bytes(), format!("value-{offset}").into_bytes());
    }
    // Appends continue after the corrupt middle.
    let pos = log
        .append("c", vec![pinned(1, Event::new("value-10"))])
        .await
        .expect("append");
    assert_eq!(pos[0].offset, 10);
    log.enforce_retention(); // no retention configured: must simply not panic
    drop(log);

    // A corrupt last batch makes open fail with Corruption, not a panic.
    tamper(dir.path(), 1, 10, |mut v| {
        v.truncate(v.len() / 2);
        v
    });
    assert_corruption(
        Log::open(dir.path(), &SledOptions::default(), strict_config()),
        1,
        10,
    );
}

/// Batches whose checksum is right but whose contents are nonsense: reads
/// and opens answer with `Corruption` (or data), never panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_batches_with_valid_checksums_never_panic() {
    let mut rng = Rng::new(0xdead_beef);
    let mut corruptions = 0;
    for round in 0..300u64 {
        let store = MemStore::new();
        {
            let log = mem_log(&store, strict_config());
            let mut t = TopicConfig::new("c", 1);
            t.retention_ms = Some(1);
            log.create_topic(t).await.expect("create");
            append_one(&log, "c", "good").await;
        }
        // A valid batch, then a forged one after it.
        let count = 1 + rng.below(4) as u32;
        let mut body = if round % 2 == 0 {
            let len = rng.below(64) as usize;
            rng.bytes(len)
        } else {
            // Start from plausible records and mangle a few bytes.
            let mut b = Vec::new();
            for _ in 0..count {
                b.extend_from_slice(&[7, 2, 3, b'k', b'y', 1, b'v', 0]);
            }
            for _ in 0..1 + rng.below(3) {
                if !b.is_empty() {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next_u64() as u8;
                }
            }
            b
        };
        let mut v = vec![0x54, 1, 0, 0, 0, 0];
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(&(rng.next_u64() as i64).to_le_bytes());
        v.extend_from_slice(&(rng.next_u64() as i64).to_le_bytes());
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
        v.append(&mut body);
        let crc = crc32(&v[6..]);
        v[2..6].copy_from_slice(&crc.to_le_bytes());
        store
            .partition("c", 0)
            .expect("partition")
            .insert(1, v)
            .expect("insert forged");
        store.sync().expect("sync");

        let log = match Log::with_store(Arc::new(store.clone()), strict_config()) {
            Ok(log) => log,
            Err(Error::Corruption { .. }) => {
                corruptions += 1;
                continue;
            }
            Err(e) => panic!("open failed with something other than Corruption: {e}"),
        };
        let (_, end) = offsets(&log, "c", 0);
        assert_eq!(end, 1 + u64::from(count));
        for from in 0..end {
            match log.read("c", 0, from, 100, MAX) {
                Ok(r) => assert!(r
                    .records
                    .iter()
                    .all(|rec| rec.offset >= from && rec.offset < end)),
                Err(Error::Corruption { offset: 1, .. }) => corruptions += 1,
                Err(e) => panic!("read at {from}: unexpected {e}"),
            }
        }
        log.enforce_retention(); // reads forged timestamps; must not panic
    }
    assert!(
        corruptions > 100,
        "only {corruptions} corruptions reported: the forgeries are too tame"
    );
}

// ---------------------------------------------------------------------------
// Limits and errors
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_event_round_trips_and_larger_ones_are_refused() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(99);
    let big = rng.bytes(MIB);
    let huge = rng.bytes(4 * MIB);
    {
        let log = sled_log(dir.path(), strict_config());
        create(&log, "big", 1).await;
        assert_eq!(log.topic("big").expect("info").config.max_event_bytes, MIB);
        assert_eq!(append_one(&log, "big", "before").await, 0);
        assert_eq!(append_one(&log, "big", big.clone()).await, 1);
        assert_eq!(append_one(&log, "big", "after").await, 2);

        for (what, e) in [
            ("value", Event::new(vec![1u8; MIB + 1])),
            ("key", Event::new(big.clone()).with_key("k")),
            (
                "header",
                Event::new(big[..MIB - 10].to_vec()).with_header("h", vec![0u8; 11]),
            ),
        ] {
            let size = e.size();
            let err = log.append("big", vec![e.into()]).await.expect_err(what);
            assert!(
                matches!(err, Error::EventTooLarge { size: s, max: MIB } if s == size),
                "{what}: {err}"
            );
        }
        // One oversize event refuses the whole call: nothing of it is written.
        let err = log
            .append(
                "big",
                vec![
                    Event::new("fine").into(),
                    Event::new(vec![0u8; MIB + 1]).into(),
                ],
            )
            .await
            .expect_err("mixed call");
        assert!(matches!(err, Error::EventTooLarge { .. }), "{err}");
        assert_eq!(offsets(&log, "big", 0), (0, 3));

        let mut large = TopicConfig::new("large", 1);
        large.max_event_bytes = 8 * MIB;
        log.create_topic(large).await.expect("create large");
        assert_eq!(append_one(&log, "large", huge.clone()).await, 0);
    }
    let log = sled_log(dir.path(), strict_config());
    let records = read_all(&log, "big", 0);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].bytes(), b"before");
    assert!(
        records[1].bytes() == big,
        "the 1 MiB event changed across reopen"
    );
    assert_eq!(records[2].bytes(), b"after");
    let large = read_all(&log, "large", 0);
    assert!(
        large.len() == 1 && large[0].bytes() == huge,
        "the 4 MiB event changed across reopen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_partitions_duplicates_and_bad_names_are_errors() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    let e = log
        .append("nope", vec![Event::new("x").into()])
        .await
        .expect_err("unknown topic");
    assert!(matches!(&e, Error::UnknownTopic(t) if t == "nope"), "{e}");
    assert!(matches!(
        log.read("nope", 0, 0, 1, MAX),
        Err(Error::UnknownTopic(_))
    ));
    assert!(matches!(
        log.fetch("nope", 0, 0, 1, MAX, Duration::ZERO).await,
        Err(Error::UnknownTopic(_))
    ));
    assert!(matches!(
        log.watch_end("nope", 0),
        Err(Error::UnknownTopic(_))
    ));
    assert!(matches!(log.topic("nope"), Err(Error::UnknownTopic(_))));
    assert!(
        log.topics().is_empty(),
        "a failed append must not create the topic"
    );

    create(&log, "t", 2).await;
    let e = log
        .append("t", vec![pinned(2, Event::new("x"))])
        .await
        .expect_err("unknown partition");
    assert!(
        matches!(&e, Error::UnknownPartition { topic, partition: 2, partitions: 2 } if topic == "t"),
        "{e}"
    );
    // A bad partition anywhere in a call refuses the whole call.
    let e = log
        .append(
            "t",
            vec![pinned(0, Event::new("ok")), pinned(7, Event::new("bad"))],
        )
        .await
        .expect_err("bad partition in call");
    assert!(
        matches!(e, Error::UnknownPartition { partition: 7, .. }),
        "{e}"
    );
    assert_eq!(offsets(&log, "t", 0), (0, 0));
    assert!(matches!(
        log.read("t", 5, 0, 1, MAX),
        Err(Error::UnknownPartition { partition: 5, .. })
    ));
    assert!(matches!(
        log.watch_end("t", 2),
        Err(Error::UnknownPartition { .. })
    ));

    let e = log
        .create_topic(TopicConfig::new("t", 3))
        .await
        .expect_err("duplicate");
    assert!(matches!(&e, Error::TopicExists(t) if t == "t"), "{e}");
    assert_eq!(
        log.topic("t").expect("info").config.partitions,
        2,
        "a duplicate create must not change the topic"
    );

    let long = "a".repeat(250);
    for bad in [
        "",
        "a/b",
        "a b",
        "..",
        ".",
        "ä",
        "tab\t",
        "nul\0",
        long.as_str(),
    ] {
        let e = log
            .create_topic(TopicConfig::new(bad, 1))
            .await
            .expect_err("invalid name");
        assert!(matches!(e, Error::InvalidTopic(_)), "{bad:?}: {e}");
    }
    for partitions in [0, 1025] {
        let e = log
            .create_topic(TopicConfig::new("parts", partitions))
            .await
            .expect_err("bad partitions");
        assert!(matches!(e, Error::InvalidTopic(_)), "{partitions}: {e}");
    }
    log.create_topic(TopicConfig::new("a".repeat(249), 1))
        .await
        .expect("249 characters are allowed");

    // Group commits are checked too.
    let e = log
        .commit_offsets(
            "g",
            vec![GroupOffset {
                topic: "nope".into(),
                partition: 0,
                offset: 0,
            }],
        )
        .await
        .expect_err("unknown topic in commit");
    assert!(matches!(e, Error::UnknownTopic(_)), "{e}");
    let e = log
        .commit_offsets(
            "g",
            vec![GroupOffset {
                topic: "t".into(),
                partition: 0,
                offset: 1,
            }],
        )
        .await
        .expect_err("commit past the end");
    assert!(
        matches!(
            e,
            Error::OffsetOutOfRange {
                offset: 1,
                end: 0,
                ..
            }
        ),
        "{e}"
    );
    for bad in ["", "a\0b"] {
        let e = log
            .commit_offsets(bad, Vec::new())
            .await
            .expect_err("bad group");
        assert!(matches!(e, Error::Config(_)), "{bad:?}: {e}");
    }

    // With auto-create on, a valid unknown name is created; an invalid one is not.
    let auto = mem_log(&MemStore::new(), config());
    assert_eq!(append_one(&auto, "fresh", "x").await, 0);
    assert_eq!(
        auto.topic("fresh").expect("auto-created").config.partitions,
        1
    );
    let e = auto
        .append("bad/name", vec![Event::new("x").into()])
        .await
        .expect_err("invalid auto-create");
    assert!(matches!(e, Error::InvalidTopic(_)), "{e}");
    assert_eq!(auto.topics().len(), 1);

    // Bad configs are refused at open.
    let bad = LogConfig {
        max_pending_bytes: 0,
        ..config()
    };
    assert!(matches!(
        Log::with_store(Arc::new(MemStore::new()), bad),
        Err(Error::Config(_))
    ));
    let mut bad = config();
    bad.topic_defaults.partitions = 0;
    assert!(matches!(
        Log::with_store(Arc::new(MemStore::new()), bad),
        Err(Error::InvalidTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_at_the_end_returns_when_another_task_appends() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "tail", 1).await;
    assert_eq!(append_one(&log, "tail", "first").await, 0);

    // Hold syncs so the fetch provably parks before the record can exist.
    store.hold_sync();
    let l = log.clone();
    let appender = tokio::spawn(async move { append_one(&l, "tail", "second").await });
    let l = log.clone();
    let mut fetch = tokio::spawn(async move {
        l.fetch("tail", 0, 1, 10, MAX, Duration::from_secs(10))
            .await
    });
    assert_pending(&mut fetch, WINDOW, "fetch at the end").await;
    store.release_sync();
    assert_eq!(appender.await.expect("join"), 1);
    let r = fetch.await.expect("join").expect("fetch");
    assert_eq!(
        r.records.len(),
        1,
        "the waiting fetch must return the appended record"
    );
    assert_eq!(
        (r.records[0].offset, r.records[0].bytes()),
        (1, &b"second"[..])
    );
    assert_eq!(r.next_offset, 2);

    // Several waiters all wake for one append.
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let l = log.clone();
            tokio::spawn(async move {
                l.fetch("tail", 0, 2, 10, MAX, Duration::from_secs(10))
                    .await
            })
        })
        .collect();
    log.append(
        "tail",
        (0..3)
            .map(|i| Event::new(format!("many-{i}")).into())
            .collect(),
    )
    .await
    .expect("append three");
    for w in waiters {
        let r = w.await.expect("join").expect("fetch");
        assert!(
            !r.records.is_empty(),
            "a waiter returned empty although records arrived"
        );
        assert_eq!(r.records[0].offset, 2);
        assert_eq!(r.records[0].bytes(), b"many-0");
    }

    // Nothing arrives: the fetch returns empty at the end, not an error.
    let r = log
        .fetch("tail", 0, 5, 10, MAX, Duration::from_millis(20))
        .await
        .expect("empty fetch");
    assert!(r.records.is_empty());
    assert_eq!((r.next_offset, r.end_offset), (5, 5));
    assert!(matches!(
        log.fetch("tail", 0, 6, 10, MAX, Duration::from_secs(10))
            .await,
        Err(Error::OffsetOutOfRange {
            offset: 6,
            end: 5,
            ..
        })
    ));
}

#[tokio::test]
async fn meta_writes_are_acknowledged_only_when_durable_and_survive_a_crash() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    log.put_meta(
        "s",
        vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), Some(b"2".to_vec())),
        ],
    )
    .await
    .expect("put");
    log.put_meta("other", vec![(b"a".to_vec(), Some(b"x".to_vec()))])
        .await
        .expect("put other space");
    store.hold_sync();
    let l = log.clone();
    let mut held = tokio::spawn(async move {
        l.put_meta(
            "s",
            vec![(b"a".to_vec(), None), (b"c".to_vec(), Some(b"3".to_vec()))],
        )
        .await
    });
    let early = tokio::time::timeout(Duration::from_millis(200), &mut held).await;
    assert!(early.is_err(), "put_meta resolved before its sync");
    // The crash image holds only the first, synced write.
    let crashed = mem_log(&store.crashed(), strict_config());
    assert_eq!(
        crashed.meta("s").expect("meta"),
        vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"2".to_vec())
        ]
    );
    store.release_sync();
    held.await.expect("join").expect("put after release");
    assert_eq!(
        log.meta("s").expect("meta"),
        vec![
            (b"b".to_vec(), b"2".to_vec()),
            (b"c".to_vec(), b"3".to_vec())
        ]
    );
    assert_eq!(
        log.meta("other").expect("meta"),
        vec![(b"a".to_vec(), b"x".to_vec())]
    );
    assert!(log.meta("").is_err(), "an empty space is refused");
}

// ---------------------------------------------------------------------------
// Disk quota
// ---------------------------------------------------------------------------

const QUOTA: u64 = 64 * 1024;

fn quota_log(dir: &std::path::Path) -> Log {
    sled_log(
        dir,
        LogConfig {
            max_disk_bytes: Some(QUOTA),
            ..strict_config()
        },
    )
}

fn records(n: usize, tag: &str) -> Vec<AppendRecord> {
    (0..n)
        .map(|i| Event::new(format!("{tag}-{i:0>190}")).into())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_topic_is_refused_at_the_quota_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = quota_log(dir.path());
    log.create_topic(TopicConfig::new("keep", 1))
        .await
        .expect("create");
    let mut acked = 0u64;
    let refused = loop {
        match log.append("keep", records(20, "keep")).await {
            Ok(p) => acked += p.len() as u64,
            Err(e) => break e,
        }
        assert!(acked < 100_000, "the quota never refused");
    };
    assert!(
        matches!(refused, Error::QuotaExceeded { ref topic, max: QUOTA, .. } if topic == "keep"),
        "{refused}"
    );
    assert!(log.stored_bytes() <= QUOTA, "{}", log.stored_bytes());
    // Nothing acknowledged was dropped; refusals are counted.
    assert_eq!(offsets(&log, "keep", 0), (0, acked));
    assert_eq!(read_all(&log, "keep", 0).len() as u64, acked);
    assert_eq!(log.stats().quota_dropped_events, 0);
    assert_eq!(log.stats().quota_rejected_appends, 1);
    // A drop_oldest topic cannot evict a reject topic's events to make room.
    let mut ring = TopicConfig::new("ring", 1);
    ring.on_full = OnFull::DropOldest;
    log.create_topic(ring).await.expect("create ring");
    let e = log
        .append("ring", records(20, "ring"))
        .await
        .expect_err("nothing of ring's own to evict");
    assert!(matches!(e, Error::QuotaExceeded { .. }), "{e}");
    assert_eq!(offsets(&log, "keep", 0), (0, acked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_oldest_topic_evicts_its_oldest_batches_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = quota_log(dir.path());
    let mut ring = TopicConfig::new("ring", 2);
    ring.on_full = OnFull::DropOldest;
    log.create_topic(ring).await.expect("create");
    // ~400 KB into a 64 KB quota: every append is acknowledged.
    let mut acked = 0u64;
    for round in 0..100 {
        let positions = log
            .append("ring", records(20, &format!("r{round}")))
            .await
            .expect("drop_oldest never refuses while it can evict");
        acked += positions.len() as u64;
    }
    assert!(log.stored_bytes() <= QUOTA, "{}", log.stored_bytes());
    let mut dropped = 0;
    let mut kept = 0;
    for p in 0..2 {
        let (start, end) = offsets(&log, "ring", p);
        dropped += start;
        let recs = read_all(&log, "ring", p);
        // What is kept is dense, in order, up to the end: only the oldest went.
        assert_eq!(recs.len() as u64, end - start);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, start + i as u64);
        }
        kept += recs.len() as u64;
    }
    assert!(dropped > 0, "nothing was evicted");
    assert_eq!(dropped + kept, acked);
    assert_eq!(log.stats().quota_dropped_events, dropped);
    assert_eq!(log.stats().quota_rejected_appends, 0);
    // The newest round is all there.
    let newest: usize = (0..2)
        .map(|p| {
            read_all(&log, "ring", p)
                .iter()
                .filter(|r| r.bytes().starts_with(b"r99-"))
                .count()
        })
        .sum();
    assert_eq!(newest, 20);
    // Offsets are never reused after eviction, across a restart.
    let ends: Vec<u64> = (0..2).map(|p| offsets(&log, "ring", p).1).collect();
    log.close().await.expect("close");
    drop(log);
    let log = quota_log(dir.path());
    for p in 0..2u32 {
        let (start, end) = offsets(&log, "ring", p);
        assert_eq!(end, ends[p as usize]);
        assert!(start > 0 || end == 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_never_overshoot_and_reject_topics_evict_drop_oldest_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = quota_log(dir.path());
    let mut ring = TopicConfig::new("ring", 1);
    ring.on_full = OnFull::DropOldest;
    log.create_topic(ring).await.expect("create ring");
    log.create_topic(TopicConfig::new("keep", 1))
        .await
        .expect("create keep");
    // Telemetry fills the quota first.
    for round in 0..40 {
        log.append("ring", records(20, &format!("r{round}")))
            .await
            .expect("ring append");
    }
    assert!(log.stored_bytes() <= QUOTA);
    let ring_start_before = offsets(&log, "ring", 0).0;
    // Sixteen producers on the reject topic at once: they take the room the
    // drop_oldest topic held, and the quota holds at every moment they end.
    let mut tasks = Vec::new();
    for p in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            for round in 0..40 {
                match log
                    .append("keep", records(5, &format!("k{p}-{round}")))
                    .await
                {
                    Ok(positions) => acked += positions.len() as u64,
                    Err(Error::QuotaExceeded { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                assert!(log.stored_bytes() <= QUOTA, "{}", log.stored_bytes());
            }
            acked
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.expect("producer");
    }
    assert!(log.stored_bytes() <= QUOTA, "{}", log.stored_bytes());
    // Every acknowledged `keep` event is there; `ring` gave up its room.
    assert_eq!(offsets(&log, "keep", 0), (0, acked));
    assert_eq!(read_all(&log, "keep", 0).len() as u64, acked);
    let (ring_start, ring_end) = offsets(&log, "ring", 0);
    assert!(
        ring_start > ring_start_before,
        "the reject topic's appends evicted nothing of ring"
    );
    // More was acknowledged than the room left after phase 1 could hold.
    assert!(acked * 200 > QUOTA / 4, "{acked}");
    assert_eq!(log.stats().quota_dropped_events, ring_start);
    assert_eq!(ring_end, 800);
    // stored_bytes is the same after a restart.
    let before = log.stored_bytes();
    log.close().await.expect("close");
    drop(log);
    let log = quota_log(dir.path());
    assert_eq!(log.stored_bytes(), before);
}

// ---------------------------------------------------------------------------
// Forwarded marks (an edge's unforwarded events)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_removes_unforwarded_events() {
    let store = MemStore::new();
    let log = mem_log(
        &store,
        LogConfig {
            forwarded: tributary_storage::Forwarded::All,
            ..strict_config()
        },
    );
    let mut aged = TopicConfig::new("aged", 1);
    aged.retention_ms = Some(HOUR_MS as u64);
    aged.retention_bytes = Some(1);
    log.create_topic(aged).await.expect("create aged");
    let old = now_ms() - 2 * HOUR_MS;
    for i in 0..6 {
        let e = Event::new(format!("old-{i}")).with_timestamp(old + i);
        log.append("aged", vec![e.into()]).await.expect("append");
    }
    assert_eq!(log.forwarded("aged", 0).expect("mark"), 0);
    // Expired by age and over the size limit, but nothing is forwarded yet.
    log.enforce_retention();
    assert_eq!(offsets(&log, "aged", 0), (0, 6));
    // The core holds 0..4: retention may take those, and only those.
    log.mark_forwarded("aged", 0, 4).expect("mark");
    log.enforce_retention();
    assert_eq!(offsets(&log, "aged", 0), (4, 6));
    // The mark never moves back.
    log.mark_forwarded("aged", 0, 1).expect("mark");
    assert_eq!(log.forwarded("aged", 0).expect("mark"), 4);
    log.mark_forwarded("aged", 0, 6).expect("mark");
    log.enforce_retention();
    assert_eq!(offsets(&log, "aged", 0), (6, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_that_are_not_forwarded_keep_their_retention() {
    let store = MemStore::new();
    let mut only = BTreeSet::new();
    only.insert("fwd".to_owned());
    let log = mem_log(
        &store,
        LogConfig {
            forwarded: tributary_storage::Forwarded::Topics(only),
            ..strict_config()
        },
    );
    for name in ["fwd", "local"] {
        let mut t = TopicConfig::new(name, 1);
        t.retention_ms = Some(HOUR_MS as u64);
        log.create_topic(t).await.expect("create");
        let e = Event::new("old").with_timestamp(now_ms() - 2 * HOUR_MS);
        log.append(name, vec![e.into()]).await.expect("append");
    }
    assert_eq!(log.forwarded("local", 0).expect("mark"), u64::MAX);
    log.enforce_retention();
    assert_eq!(offsets(&log, "fwd", 0), (0, 1));
    assert_eq!(offsets(&log, "local", 0), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_evicts_forwarded_events_first_then_counts_unforwarded_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(
        dir.path(),
        LogConfig {
            max_disk_bytes: Some(QUOTA),
            forwarded: tributary_storage::Forwarded::All,
            ..strict_config()
        },
    );
    // Two drop_oldest topics; "old" is written first (older batches) but is
    // not forwarded, "new" is written later and is forwarded as it goes.
    for name in ["old", "new"] {
        let mut t = TopicConfig::new(name, 1);
        t.on_full = OnFull::DropOldest;
        log.create_topic(t).await.expect("create");
    }
    let mut old_acked = 0u64;
    while log.stored_bytes() < QUOTA / 2 {
        old_acked += log
            .append("old", records(10, "old"))
            .await
            .expect("append old")
            .len() as u64;
    }
    // "new" fills the rest and keeps going: eviction must take forwarded
    // batches of "new" before any of the older, unforwarded "old".
    for round in 0..40 {
        let p = log
            .append("new", records(10, &format!("new{round}")))
            .await
            .expect("drop_oldest never refuses while it can evict");
        let end = p.last().expect("positions").offset + 1;
        log.mark_forwarded("new", 0, end).expect("mark");
    }
    assert_eq!(offsets(&log, "old", 0), (0, old_acked), "unforwarded kept");
    let dropped = log.stats().quota_dropped_events;
    assert!(dropped > 0, "nothing was evicted");
    assert_eq!(offsets(&log, "new", 0).0, dropped);
    assert_eq!(log.stats().quota_dropped_unforwarded_events, 0);
    // Nothing forwarded is left to evict: now the oldest unforwarded go, and
    // are counted as such.
    let new_end = offsets(&log, "new", 0).1;
    let (before_start, _) = offsets(&log, "new", 0);
    for round in 0..40 {
        log.append("new", records(10, &format!("late{round}")))
            .await
            .expect("append");
    }
    let lost = log.stats().quota_dropped_unforwarded_events;
    assert!(lost > 0, "unforwarded events had to go");
    let old_lost = offsets(&log, "old", 0).0;
    let new_lost = offsets(&log, "new", 0)
        .0
        .saturating_sub(new_end.max(before_start));
    assert_eq!(lost, old_lost + new_lost);
    assert_eq!(
        log.stats().quota_dropped_events,
        offsets(&log, "old", 0).0 + offsets(&log, "new", 0).0
    );
}

/// DeleteRecords: the start moves exactly to the offset asked (inside a
/// batch too), reads below it are out of range, whole batches below it are
/// gone, and the start survives a reopen; past the end is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_records_moves_the_start_exactly_and_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), config());
    create(&log, "t", 1).await;
    for chunk in 0..10u64 {
        let events = (0..10u64)
            .map(|i| pinned(0, Event::new(format!("v{}", chunk * 10 + i))))
            .collect();
        log.append("t", events).await.expect("append");
    }
    assert_eq!(offsets(&log, "t", 0), (0, 100));
    assert!(matches!(
        log.delete_records("t", 0, Some(101)).await,
        Err(tributary_storage::Error::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        log.delete_records("t", 0, Some(37)).await.expect("delete"),
        37
    );
    assert_eq!(offsets(&log, "t", 0), (37, 100));
    assert!(
        log.read("t", 0, 36, 10, 1 << 20).is_err(),
        "below the start"
    );
    let r = log.read("t", 0, 37, 1, 1 << 20).expect("read at the start");
    assert_eq!(r.records[0].offset, 37);
    assert_eq!(r.records[0].value.as_deref(), Some(&b"v37"[..]));
    // Asking below the start changes nothing.
    assert_eq!(
        log.delete_records("t", 0, Some(5)).await.expect("no-op"),
        37
    );
    log.close().await.expect("close");
    drop(log);
    let log = sled_log(dir.path(), config());
    assert_eq!(offsets(&log, "t", 0), (37, 100), "after a reopen");
    assert_eq!(read_all(&log, "t", 0).len(), 63);
    // −1: everything.
    assert_eq!(log.delete_records("t", 0, None).await.expect("all"), 100);
    assert!(read_all(&log, "t", 0).is_empty());
    assert_eq!(offsets(&log, "t", 0), (100, 100));
}

/// A commit's metadata is stored with its position, in the same write:
/// read back with it, kept across a reopen, replaced by the next commit,
/// refused over the limit. A position stored before metadata was kept (the
/// offset alone) reads back with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_metadata_is_kept_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |partition, offset| GroupOffset {
        topic: "t".into(),
        partition,
        offset,
    };
    {
        let store = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
        store.put_topic(&TopicConfig::new("t", 2)).expect("topic");
        // As every position was stored before: the offset alone.
        store.put_group_offset("old", "t", 0, 0, b"").expect("put");
        store.sync().expect("sync");
    }
    let log = sled_log(dir.path(), config());
    for i in 0..3 {
        append_one(&log, "t", format!("e{i}")).await;
    }
    log.commit_offsets_with(
        "g",
        vec![at(0, 1), at(1, 0)],
        vec!["stream-time=42".into(), String::new()],
    )
    .await
    .expect("commit");
    let read = log.group_offsets_with_metadata("g").expect("read");
    assert_eq!(
        read,
        vec![
            (at(0, 1), "stream-time=42".to_owned()),
            (at(1, 0), String::new())
        ]
    );
    assert_eq!(
        log.group_offsets("g").expect("plain"),
        vec![at(0, 1), at(1, 0)]
    );
    assert_eq!(
        log.group_offsets_with_metadata("old").expect("old"),
        vec![(at(0, 0), String::new())]
    );
    let long = "x".repeat(tributary_storage::MAX_COMMIT_METADATA + 1);
    assert!(log
        .commit_offsets_with("g", vec![at(0, 2)], vec![long])
        .await
        .is_err());
    assert!(log
        .commit_offsets_with("g", vec![at(0, 2), at(1, 1)], vec!["one".into()])
        .await
        .is_err());
    // A plain commit replaces the metadata too.
    log.commit_offsets("g", vec![at(0, 2)])
        .await
        .expect("plain commit");
    drop(log);
    let log = sled_log(dir.path(), config());
    assert_eq!(
        log.group_offsets_with_metadata("g").expect("reopened"),
        vec![(at(0, 2), String::new()), (at(1, 0), String::new())]
    );
}
