//! Transactions in the log: a producer's transactional batches are read by
//! committed readers only once its commit marker is durable, never when it
//! aborts; the last stable offset holds everyone's later records back while
//! a transaction is undecided; markers are never records; all of it
//! survives a crash and a reopen.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tributary_storage::{
    AppendOptions, CleanupPolicy, Event, Isolation, Log, Marker, MemStore, ProducerBatch, Record,
    TopicConfig,
};

async fn txn_append(log: &Log, producer: i64, seq: i32, values: &[&str]) -> u64 {
    let options = AppendOptions {
        producer: Some(ProducerBatch {
            producer_id: producer,
            epoch: 0,
            first_sequence: seq,
        }),
        transactional: true,
        ..AppendOptions::default()
    };
    let records = values
        .iter()
        .map(|v| pinned(0, Event::new(*v).with_key("k")))
        .collect();
    log.append_with("t", records, options)
        .await
        .expect("append")[0]
        .offset
}

fn values(log: &Log, isolation: Isolation) -> (Vec<String>, u64) {
    let (start, _) = log.offsets("t", 0).expect("offsets");
    let mut out = Vec::new();
    let mut at = start;
    loop {
        let r = log
            .read_isolated("t", 0, at, 100, 1 << 20, isolation)
            .expect("read");
        let done = r.records.is_empty() && r.next_offset == at;
        out.extend(
            r.records
                .iter()
                .map(|r: &Record| String::from_utf8_lossy(r.bytes()).into_owned()),
        );
        if done || r.next_offset >= r.end_offset {
            return (out, r.last_stable);
        }
        at = r.next_offset;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_readers_see_a_transaction_once_committed_and_never_when_aborted() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    append_one(&log, "t", "before").await;
    let first = txn_append(&log, 7, 0, &["a1", "a2"]).await;
    append_one(&log, "t", "plain during").await;
    txn_append(&log, 7, 2, &["a3"]).await;
    txn_append(&log, 9, 0, &["b1"]).await;
    // Undecided: committed readers stop at the first transactional offset.
    let (seen, stable) = values(&log, Isolation::Committed);
    assert_eq!(seen, ["before"]);
    assert_eq!(stable, first);
    let (all, _) = values(&log, Isolation::Uncommitted);
    assert_eq!(all, ["before", "a1", "a2", "plain during", "a3", "b1"]);
    // 7 commits, 9 aborts; a marker for a producer with nothing open writes nothing.
    let commit = log
        .write_marker("t", 0, 7, 0, Marker::Commit, 0)
        .await
        .expect("marker");
    assert!(commit.is_some());
    let (seen, _) = values(&log, Isolation::Committed);
    assert_eq!(
        seen,
        ["before", "a1", "a2", "plain during", "a3"],
        "9 still undecided"
    );
    log.write_marker("t", 0, 9, 0, Marker::Abort, 0)
        .await
        .expect("marker");
    assert_eq!(
        log.write_marker("t", 0, 9, 0, Marker::Abort, 0)
            .await
            .expect("again"),
        None
    );
    append_one(&log, "t", "after").await;
    let committed = ["before", "a1", "a2", "plain during", "a3", "after"];
    assert_eq!(values(&log, Isolation::Committed).0, committed);
    assert_eq!(
        values(&log, Isolation::Uncommitted).0,
        ["before", "a1", "a2", "plain during", "a3", "b1", "after"],
        "markers are never records"
    );
    // The same after a crash (everything above was durable when answered).
    drop(log);
    let log = mem_log(&store.crashed(), strict_config());
    assert_eq!(values(&log, Isolation::Committed).0, committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_at_a_crash_stays_undecided_until_its_marker() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    let first = txn_append(&log, 5, 0, &["x1", "x2"]).await;
    append_one(&log, "t", "later").await;
    drop(log);
    let store = store.crashed();
    let log = mem_log(&store, strict_config());
    let (seen, stable) = values(&log, Isolation::Committed);
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(stable, first, "still open after the crash");
    // The coordinator aborts what was open when it comes back.
    log.write_marker("t", 0, 5, 1, Marker::Abort, 0)
        .await
        .expect("abort");
    assert_eq!(values(&log, Isolation::Committed).0, ["later"]);
    drop(log);
    let log = mem_log(&store.crashed(), strict_config());
    assert_eq!(
        values(&log, Isolation::Committed).0,
        ["later"],
        "the abort is durable"
    );
    assert_eq!(
        values(&log, Isolation::Uncommitted).0,
        ["x1", "x2", "later"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_not_readable_before_its_marker_is_durable() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    txn_append(&log, 3, 0, &["c1"]).await;
    store.hold_sync();
    let writer = log.clone();
    let marker = tokio::spawn(async move {
        writer
            .write_marker("t", 0, 3, 0, Marker::Commit, 0)
            .await
            .expect("marker")
    });
    // The marker is written but not durable: still undecided for readers.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(values(&log, Isolation::Committed).0.is_empty());
    store.release_sync();
    assert!(marker.await.expect("join").is_some());
    assert_eq!(values(&log, Isolation::Committed).0, ["c1"]);
}

/// Three aborted transactions of producer 7, each followed by a plain
/// keyed record "kept".
/// A crash at any write of a marker leaves the transaction either open
/// (the marker lost: the coordinator writes it again) or decided with its
/// marker in the log, never decided without one; written again after the
/// crash, the marker is in the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_write_of_a_marker_leaves_it_whole_or_absent() {
    for marker in [Marker::Commit, Marker::Abort] {
        let store = MemStore::new();
        let log = mem_log(&store, strict_config());
        create(&log, "t", 1).await;
        append_one(&log, "t", "before").await;
        let first = txn_append(&log, 7, 0, &["a1", "a2"]).await;
        store.record_writes();
        log.write_marker("t", 0, 7, 0, marker, 0)
            .await
            .expect("marker")
            .expect("written");
        let writes = store.recorded_writes();
        assert!(writes >= 2, "{writes} writes");
        drop(log);
        for n in 0..=writes {
            let log = mem_log(&store.crashed_after(n), strict_config());
            let (_, end) = log.offsets("t", 0).expect("offsets");
            let (_, stable) = values(&log, Isolation::Committed);
            let marker_kept = end == first + 3;
            if marker_kept {
                assert_eq!(stable, end, "crash after {n}: decided with its marker");
            } else {
                assert_eq!(end, first + 2, "crash after {n}");
                assert_eq!(stable, first, "crash after {n}: still open");
            }
            // The coordinator writes the markers of a transaction again
            // after a crash: once in the log, whatever the crash kept.
            let again = log
                .write_marker("t", 0, 7, 0, marker, 0)
                .await
                .expect("marker again");
            assert_eq!(again.is_some(), !marker_kept, "crash after {n}");
            let (_, end) = log.offsets("t", 0).expect("offsets");
            assert_eq!(end, first + 3, "crash after {n}: one marker");
            let (seen, stable) = values(&log, Isolation::Committed);
            assert_eq!(stable, end);
            let expected: &[&str] = match marker {
                Marker::Commit => &["before", "a1", "a2"],
                Marker::Abort => &["before"],
            };
            assert_eq!(seen, expected, "crash after {n}");
        }
    }
}

async fn three_aborts(log: &Log) {
    for round in 0..3 {
        txn_append(log, 7, round * 2, &["x", "y"]).await;
        log.write_marker("t", 0, 7, 0, Marker::Abort, 0)
            .await
            .expect("marker")
            .expect("written");
        log.append("t", vec![Event::new("kept").with_key("p").into()])
            .await
            .expect("append");
    }
}

/// Aborted transactions are kept in the metadata (not in memory): a reopen
/// still hides their records, and they are forgotten once retention has
/// removed their markers, or a compaction pass their records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_forgotten_once_retention_or_compaction_removes_them() {
    // Retention.
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    let mut config = TopicConfig::new("t", 1);
    config.retention_bytes = Some(1);
    log.create_topic(config).await.expect("create");
    three_aborts(&log).await;
    assert_eq!(log.meta("__txn_aborted").expect("meta").len(), 3);
    assert_eq!(values(&log, Isolation::Committed).0, ["kept"; 3]);
    drop(log);
    let log = mem_log(&store, strict_config());
    assert_eq!(
        values(&log, Isolation::Committed).0,
        ["kept"; 3],
        "aborted records stay hidden after a reopen"
    );
    log.enforce_retention();
    assert_eq!(
        log.meta("__txn_aborted").expect("meta"),
        Vec::new(),
        "retention removed every marker"
    );
    drop(log);

    // Compaction.
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    let config = TopicConfig {
        cleanup_policy: CleanupPolicy::Compact,
        min_cleanable_dirty_ratio: 0.0,
        ..TopicConfig::new("t", 1)
    };
    log.create_topic(config).await.expect("create");
    three_aborts(&log).await;
    // The newest batch is never cleaned: one more.
    log.append("t", vec![Event::new("tail").with_key("q").into()])
        .await
        .expect("append");
    assert_eq!(log.meta("__txn_aborted").expect("meta").len(), 3);
    log.compact();
    assert_eq!(
        log.meta("__txn_aborted").expect("meta"),
        Vec::new(),
        "the pass removed the aborted records"
    );
    assert_eq!(values(&log, Isolation::Committed).0, ["kept", "tail"]);
    assert_eq!(
        values(&log, Isolation::Uncommitted).0,
        ["kept", "tail"],
        "gone for every reader"
    );
    drop(log);
    let log = mem_log(&store, strict_config());
    assert_eq!(values(&log, Isolation::Committed).0, ["kept", "tail"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_describes_its_producers_and_their_open_transactions_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let append = |log: Log, producer: i64, seq: i32, transactional: bool, ts: &[i64]| {
        let records = ts
            .iter()
            .map(|t| pinned(0, Event::new("v").with_key("k").with_timestamp(*t)))
            .collect();
        let options = AppendOptions {
            producer: Some(ProducerBatch {
                producer_id: producer,
                epoch: 3,
                first_sequence: seq,
            }),
            transactional,
            ..AppendOptions::default()
        };
        async move {
            log.append_with("t", records, options)
                .await
                .expect("append")[0]
                .offset
        }
    };
    let open = {
        let log = sled_log(dir.path(), strict_config());
        create(&log, "t", 2).await;
        append_one(&log, "t", "plain").await;
        // 5: idempotent, two batches; 8: a transaction committed, another open.
        append(log.clone(), 5, 0, false, &[100, 300, 200]).await;
        append(log.clone(), 5, 3, false, &[150]).await;
        append(log.clone(), 8, 0, true, &[50]).await;
        log.write_marker("t", 0, 8, 3, Marker::Commit, 12)
            .await
            .expect("marker");
        let open = append(log.clone(), 8, 1, true, &[60, 70]).await;
        let states = log.producers("t", 0).expect("producers");
        assert_eq!(states.len(), 2, "{states:?}");
        let (idem, txn) = (&states[0], &states[1]);
        assert_eq!(
            (idem.producer_id, idem.epoch, idem.last_sequence),
            (5, 3, 3)
        );
        assert_eq!(idem.last_timestamp, 150, "the last batch's largest");
        assert_eq!((idem.coordinator_epoch, idem.transaction_start), (-1, None));
        assert_eq!((txn.producer_id, txn.last_sequence), (8, 2));
        assert_eq!(txn.last_timestamp, 70);
        assert_eq!(txn.coordinator_epoch, 12, "from the marker");
        assert_eq!(txn.transaction_start, Some(open));
        assert!(log.producers("t", 1).expect("p1").is_empty());
        assert!(log.producers("nosuch", 0).is_err());
        assert!(log.producers("t", 2).is_err());
        open
    };
    let log = sled_log(dir.path(), strict_config());
    let states = log.producers("t", 0).expect("producers");
    let brief: Vec<(i64, i32, i64, i32, Option<u64>)> = states
        .iter()
        .map(|s| {
            (
                s.producer_id,
                s.last_sequence,
                s.last_timestamp,
                s.coordinator_epoch,
                s.transaction_start,
            )
        })
        .collect();
    assert_eq!(
        brief,
        [(5, 3, 150, -1, None), (8, 2, 70, 12, Some(open))],
        "the same after a reopen"
    );
    // The marker ends the open transaction; its time is the producer's last.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    log.write_marker("t", 0, 8, 3, Marker::Abort, 13)
        .await
        .expect("marker");
    let txn = log.producers("t", 0).expect("producers").remove(1);
    assert_eq!((txn.coordinator_epoch, txn.transaction_start), (13, None));
    assert!(txn.last_timestamp >= before, "{txn:?}");
}
