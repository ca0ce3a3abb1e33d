//! Log compaction, and trying to break it: a crash at every write of a
//! pass, more keys than the cleaner's map holds, tombstones and their
//! horizon, keyless records, reads from every offset of a partition with
//! gaps, a reopen over sled.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tributary_storage::{
    CleanupPolicy, Error, Event, Log, LogConfig, MemStore, Record, Store, TopicChange, TopicConfig,
};

/// Each key's writes, in order: (offset, value; `None` for a tombstone).
type Written = BTreeMap<String, Vec<(u64, Option<Vec<u8>>)>>;

/// Small batches, so a few hundred records make many of them.
fn small_batches() -> LogConfig {
    LogConfig {
        // One round of `write_rounds` (≤ 20 keys) is one batch.
        batch_bytes: 1024,
        compaction_map_bytes: 0,
        ..strict_config()
    }
}

fn compacted(name: &str, partitions: u32) -> TopicConfig {
    TopicConfig {
        cleanup_policy: CleanupPolicy::Compact,
        min_cleanable_dirty_ratio: 0.0,
        ..TopicConfig::new(name, partitions)
    }
}

/// Writes `rounds` updates of each of `keys` keys, one append (and so one
/// batch) per round; the last round's value of `k{i}` is null when
/// `deleted(i)`. Answers each key's writes as (offset, value).
async fn write_rounds(
    log: &Log,
    topic: &str,
    keys: usize,
    rounds: usize,
    deleted: impl Fn(usize) -> bool,
) -> Written {
    let mut written: Written = BTreeMap::new();
    for round in 0..rounds {
        let events: Vec<_> = (0..keys)
            .map(|i| {
                let value = if round + 1 == rounds && deleted(i) {
                    None
                } else {
                    Some(format!("k{i}-r{round}").into_bytes())
                };
                Event {
                    key: Some(format!("k{i}").into_bytes()),
                    value,
                    ..Event::default()
                }
                .into()
            })
            .collect();
        let positions = log.append(topic, events).await.expect("append");
        for (i, p) in positions.iter().enumerate() {
            let value = if round + 1 == rounds && deleted(i) {
                None
            } else {
                Some(format!("k{i}-r{round}").into_bytes())
            };
            written
                .entry(format!("k{i}"))
                .or_default()
                .push((p.offset, value));
        }
    }
    written
}

fn read_all(log: &Log, topic: &str, partition: u32) -> Vec<Record> {
    let (start, end) = log.offsets(topic, partition).expect("offsets");
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let r = log.read(topic, partition, at, 100, 1 << 20).expect("read");
        assert!(r.next_offset > at, "a read from {at} moved on");
        out.extend(r.records);
        at = r.next_offset;
    }
    out
}

/// Every record read was written, at the offset it was written at, in
/// offset order, and the latest write of each key is among them.
fn assert_sound(read: &[Record], written: &Written) {
    let by_offset: BTreeMap<u64, (&str, &Option<Vec<u8>>)> = written
        .iter()
        .flat_map(|(k, w)| w.iter().map(move |(o, v)| (*o, (k.as_str(), v))))
        .collect();
    for pair in read.windows(2) {
        assert!(pair[0].offset < pair[1].offset, "offsets in order");
    }
    for r in read {
        let (k, v) = by_offset.get(&r.offset).expect("a record that was written");
        assert_eq!(r.key.as_deref(), Some(k.as_bytes()), "key at {}", r.offset);
        assert_eq!(&r.value, *v, "value at {}", r.offset);
    }
    for (k, w) in written {
        let (last, _) = w.last().expect("written");
        assert!(
            read.iter().any(|r| r.offset == *last),
            "the latest write of {k} (at {last}) is kept"
        );
    }
}

/// Exactly the latest write of each key, except that records of the last
/// batch (never cleaned) and the keys it updates may keep older values.
fn assert_compacted(read: &[Record], written: &Written, last_batch_from: u64) {
    assert_sound(read, written);
    for r in read.iter().filter(|r| r.offset < last_batch_from) {
        let k = std::str::from_utf8(r.key.as_deref().expect("key")).expect("utf8");
        let latest_below = written[k]
            .iter()
            .filter(|(o, _)| *o < last_batch_from)
            .map(|(o, _)| *o)
            .max();
        assert_eq!(
            Some(r.offset),
            latest_below,
            "{k}: only its latest record below the last batch is left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_keeps_the_latest_record_of_each_key_at_its_offset_and_reads_step_over_the_gaps() {
    let store = MemStore::new();
    let log = mem_log(&store, small_batches());
    log.create_topic(compacted("c", 1)).await.expect("create");
    let written = write_rounds(&log, "c", 10, 30, |_| false).await;
    let before = log.topic("c").expect("c");
    let (start, end) = log.offsets("c", 0).expect("offsets");
    log.compact();
    let after = log.topic("c").expect("c");
    let info = after.compaction.clone().expect("compaction info");
    assert_eq!(info.passes, 1);
    // 10 keys × 30 rounds; the last round (its own batch) is not cleaned.
    let last_round = written["k0"].last().expect("k0").0;
    let read = read_all(&log, "c", 0);
    assert_compacted(&read, &written, last_round);
    assert_eq!(read.len(), 20, "rounds 28 and 29 are left");
    assert_eq!(info.records_removed, 280);
    assert!(
        after.partitions[0].bytes < before.partitions[0].bytes / 5,
        "bytes {} → {}",
        before.partitions[0].bytes,
        after.partitions[0].bytes
    );
    assert_eq!(
        info.bytes_reclaimed,
        before.partitions[0].bytes - after.partitions[0].bytes
    );
    assert_eq!(
        log.offsets("c", 0).expect("offsets"),
        (start, end),
        "offsets never change"
    );
    // A read from any offset, gap or not, answers the first record at or
    // after it.
    for at in start..end {
        let r = log.read("c", 0, at, 1, 1 << 20).expect("read");
        let expected = read
            .iter()
            .find(|r| r.offset >= at)
            .expect("a record after");
        assert_eq!(r.records[0].offset, expected.offset, "read from {at}");
    }
    // A second pass with nothing new does nothing; new updates are cleaned
    // by the next.
    log.compact();
    assert_eq!(
        log.topic("c").expect("c").compaction.expect("info").passes,
        1
    );
    let more = write_rounds(&log, "c", 10, 3, |_| false).await;
    let mut all = written.clone();
    for (k, w) in more {
        all.get_mut(&k).expect("key").extend(w);
    }
    log.compact();
    let last_round = all["k0"].last().expect("k0").0;
    assert_compacted(&read_all(&log, "c", 0), &all, last_round);
    // Reopened: the same records, offsets and byte count.
    let bytes = log.topic("c").expect("c").partitions[0].bytes;
    let kept = read_all(&log, "c", 0);
    log.close().await.expect("close");
    drop(log);
    let log = mem_log(&store.crashed(), small_batches());
    assert_eq!(read_all(&log, "c", 0), kept);
    assert_eq!(log.topic("c").expect("c").partitions[0].bytes, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_write_of_a_pass_loses_nothing_compaction_keeps() {
    let store = MemStore::new();
    let log = mem_log(&store, small_batches());
    log.create_topic(compacted("c", 1)).await.expect("create");
    let written = write_rounds(&log, "c", 8, 25, |i| i % 3 == 0).await;
    let last_round = written["k0"].last().expect("k0").0;
    log.flush().await.expect("flush");
    store.record_writes();
    log.compact();
    let writes = store.recorded_writes();
    assert!(writes > 20, "the pass wrote {writes} times");
    let end = log.offsets("c", 0).expect("offsets").1;
    for n in 0..=writes {
        let crashed = store.crashed_after(n);
        let reopened = mem_log(&crashed, small_batches());
        assert_eq!(
            reopened.offsets("c", 0).expect("offsets").1,
            end,
            "crash after {n} writes"
        );
        assert_sound(&read_all(&reopened, "c", 0), &written);
        // The next pass finishes the work.
        reopened.compact();
        assert_compacted(&read_all(&reopened, "c", 0), &written, last_round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_delete_their_key_and_go_after_their_horizon() {
    let store = MemStore::new();
    let log = mem_log(&store, small_batches());
    let mut config = compacted("c", 1);
    config.delete_retention_ms = 300;
    log.create_topic(config).await.expect("create");
    let written = write_rounds(&log, "c", 6, 10, |i| i < 2).await;
    // One more round for k5 only, so the tombstones are below the last batch.
    let tail = log
        .append("c", vec![Event::new("tail").with_key("k5").into()])
        .await
        .expect("append");
    let mut all = written.clone();
    all.get_mut("k5")
        .expect("k5")
        .push((tail[0].offset, Some(b"tail".to_vec())));
    log.compact();
    let read = read_all(&log, "c", 0);
    assert_sound(&read, &all);
    let nulls: Vec<_> = read.iter().filter(|r| r.value.is_none()).collect();
    assert_eq!(nulls.len(), 2, "the tombstones stay until their horizon");
    assert_eq!(read.len(), 7);
    // After the horizon a pass runs without new records and drops them.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        log.compact();
        let read = read_all(&log, "c", 0);
        if read.iter().all(|r| r.value.is_some()) {
            assert_eq!(
                read.len(),
                5,
                "k2..k5, k5 twice (its tail is the last batch)"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tombstones never went"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_keys_than_the_map_holds_take_several_passes_and_end_exactly_compacted() {
    let store = MemStore::new();
    let log = mem_log(
        &store,
        LogConfig {
            batch_bytes: 8 * 1024,
            ..small_batches()
        },
    );
    log.create_topic(compacted("c", 1)).await.expect("create");
    // The smallest map holds 49,152 keys; 60,000 keys written twice.
    let keys = 60_000;
    let mut written: Written = BTreeMap::new();
    for round in 0..2 {
        for chunk in (0..keys).collect::<Vec<_>>().chunks(2000) {
            let events = chunk
                .iter()
                .map(|i| {
                    Event::new(format!("{round}"))
                        .with_key(format!("k{i}"))
                        .into()
                })
                .collect();
            let positions = log.append("c", events).await.expect("append");
            for (i, p) in chunk.iter().zip(positions) {
                written
                    .entry(format!("k{i}"))
                    .or_default()
                    .push((p.offset, Some(format!("{round}").into_bytes())));
            }
        }
    }
    let mut passes = 0;
    loop {
        log.compact();
        let now = log.topic("c").expect("c").compaction.expect("info").passes;
        if now == passes {
            break;
        }
        passes = now;
    }
    assert!(passes >= 2, "{passes} passes");
    let read = read_all(&log, "c", 0);
    assert_sound(&read, &written);
    // Below the last append (2,000 records, of which only the last batch is
    // never cleaned) every key has one record, and only keys updated in the
    // last append may keep their first value.
    let last_append = log.offsets("c", 0).expect("offsets").1 - 2000;
    let mut seen = std::collections::BTreeSet::new();
    for r in read.iter().filter(|r| r.offset < last_append) {
        assert!(
            seen.insert(r.key.clone()),
            "one record per key below the tail"
        );
        let i: usize = std::str::from_utf8(&r.key.as_deref().expect("key")[1..])
            .expect("utf8")
            .parse()
            .expect("index");
        assert!(
            r.value.as_deref() == Some(b"1") || i >= keys - 2000,
            "k{i} kept its first value"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_refuses_keyless_records_and_changes_policy_durably() {
    let store = MemStore::new();
    let log = mem_log(&store, small_batches());
    log.create_topic(compacted("c", 1)).await.expect("create");
    let refused = log.append("c", vec![Event::new("no key").into()]).await;
    assert!(matches!(refused, Err(Error::KeyRequired(_))), "{refused:?}");
    let change = TopicChange {
        cleanup_policy: Some(CleanupPolicy::Delete),
        ..TopicChange::default()
    };
    log.alter_topic("c", &change).await.expect("alter");
    log.append("c", vec![Event::new("no key").into()])
        .await
        .expect("a keyless record in a topic that is no longer compacted");
    let bad = TopicChange {
        min_cleanable_dirty_ratio: Some(1.5),
        ..TopicChange::default()
    };
    assert!(matches!(
        log.alter_topic("c", &bad).await,
        Err(Error::InvalidTopic(_))
    ));
    log.close().await.expect("close");
    drop(log);
    let log = mem_log(&store.crashed(), small_batches());
    let c = log.topic("c").expect("c").config;
    assert_eq!(c.cleanup_policy, CleanupPolicy::Delete);
    assert_eq!(c.min_cleanable_dirty_ratio, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_log_compacts_reopens_with_the_same_records_and_reads_old_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (written, kept) = {
        let log = sled_log(dir.path(), small_batches());
        log.create_topic(compacted("c", 2)).await.expect("create");
        create(&log, "plain", 1).await;
        let written = write_rounds(&log, "c", 20, 20, |i| i == 3).await;
        log.compact();
        let kept = (read_all(&log, "c", 0), read_all(&log, "c", 1));
        log.close().await.expect("close");
        (written, kept)
    };
    let log = sled_log(dir.path(), small_batches());
    assert_eq!((read_all(&log, "c", 0), read_all(&log, "c", 1)), kept);
    let mut read = kept.0.clone();
    read.extend(kept.1.clone());
    let keys: std::collections::BTreeSet<_> = read.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), written.len(), "every key is still there");
    assert_eq!(
        log.topic("plain").expect("plain").config.cleanup_policy,
        CleanupPolicy::Delete
    );
}

/// A compacted batch of a MiB or more covering several offsets (a large
/// record kept with originals emptied around it): the next pass reads on
/// past it and keeps everything after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_reads_past_a_compacted_batch_of_a_mib_or_more() {
    let store = MemStore::new();
    let log = mem_log(&store, small_batches());
    let mut config = compacted("c", 1);
    config.max_event_bytes = 2 * 1024 * 1024;
    log.create_topic(config).await.expect("create");
    let mut written: Written = BTreeMap::new();
    let mut put = |key: &str, value: Vec<u8>, offset: u64| {
        written
            .entry(key.to_owned())
            .or_default()
            .push((offset, Some(value)));
    };
    let big = vec![7u8; 1_200_000];
    for (key, value) in [
        ("k1", b"a".to_vec()),
        ("big", big.clone()),
        ("k1", b"b".to_vec()),
        ("tail", b"t".to_vec()),
    ] {
        let p = log
            .append("c", vec![Event::new(value.clone()).with_key(key).into()])
            .await
            .expect("append");
        put(key, value, p[0].offset);
    }
    log.compact();
    // More updates, then a second pass over the range holding the big batch.
    for (i, key) in ["k2", "k2", "k3", "k1", "k3", "end"].iter().enumerate() {
        let value = format!("v{i}").into_bytes();
        let p = log
            .append("c", vec![Event::new(value.clone()).with_key(*key).into()])
            .await
            .expect("append");
        put(key, value, p[0].offset);
    }
    log.compact();
    assert_eq!(
        log.topic("c").expect("c").compaction.expect("info").passes,
        2
    );
    let last = written["end"][0].0;
    assert_compacted(&read_all(&log, "c", 0), &written, last);
}

/// A snapshot refers to the log's batches and copies them only when it is
/// written out in full: a pass in between may merge batches across the
/// cut's end. The copy holds what lay below the end, trimmed, and the
/// restored partition ends where the cut saw it, its bytes counted. With
/// 100 keys the pass's kept records fill more than one batch, so the
/// trimmed one follows another of the pass's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_written_out_after_a_pass_stops_at_its_cut() {
    for keys in [10, 100] {
        let log = mem_log(&MemStore::new(), small_batches());
        log.create_topic(compacted("c", 1)).await.expect("create");
        // The keys for 20 rounds, then the cut, then five of them for ten
        // more.
        write_rounds(&log, "c", keys, 20, |_| false).await;
        let files = tempfile::tempdir().expect("tempdir");
        let (cut_file, whole) = (files.path().join("cut"), files.path().join("whole"));
        let cut = log.snapshot_cut(&cut_file, b"h").expect("cut");
        cut.finish().expect("finish");
        let end = log.offsets("c", 0).expect("offsets").1;
        assert_eq!(end, 20 * keys as u64);
        write_rounds(&log, "c", 5, 10, |_| false).await;
        log.compact();
        assert_eq!(
            log.topic("c").expect("c").compaction.expect("info").passes,
            1
        );
        // k5 and after were last written before the cut: the pass keeps
        // those in batches the last of which also covers offsets after it.
        let kept_below: Vec<(u64, Vec<u8>)> = read_all(&log, "c", 0)
            .into_iter()
            .filter(|r| r.offset < end)
            .map(|r| (r.offset, r.value.unwrap_or_default()))
            .collect();
        assert_eq!(
            kept_below,
            (5..keys)
                .map(|i| ((19 * keys + i) as u64, format!("k{i}-r19").into_bytes()))
                .collect::<Vec<_>>(),
            "{keys} keys"
        );
        let out = std::io::BufWriter::new(std::fs::File::create(&whole).expect("create"));
        log.snapshot_expand(std::fs::File::open(&cut_file).expect("cut"), out)
            .expect("expand");
        let store = MemStore::new();
        let node = mem_log(&store, small_batches());
        node.restore(&whole).await.expect("restore");
        assert_eq!(
            node.offsets("c", 0).expect("offsets"),
            (0, end),
            "{keys} keys"
        );
        let restored: Vec<(u64, Vec<u8>)> = read_all(&node, "c", 0)
            .into_iter()
            .map(|r| (r.offset, r.value.unwrap_or_default()))
            .collect();
        assert_eq!(restored, kept_below, "{keys} keys");
        let bytes = node.topic("c").expect("c").partitions[0].bytes;
        let kept_bytes: u64 = kept_below.iter().map(|(_, v)| v.len() as u64).sum();
        // The partition's byte count is its batches' bytes: a trimmed batch
        // ends where the one before it ends, and its own bytes further.
        let batches = store
            .partition("c", 0)
            .expect("partition")
            .read(0, usize::MAX)
            .expect("read");
        let stored: u64 = batches.iter().map(|(_, v)| v.len() as u64).sum();
        assert_eq!(bytes, stored, "{keys} keys: {} batches", batches.len());
        assert!(bytes >= kept_bytes, "{keys} keys: {bytes} bytes counted");
        // The entries after the cut land where they did on the log.
        let next = node
            .append(
                "c",
                vec![Event {
                    key: Some(b"k0".to_vec()),
                    value: Some(b"after".to_vec()),
                    ..Event::default()
                }
                .into()],
            )
            .await
            .expect("append");
        assert_eq!(next[0].offset, end);
    }
}
