//! Idempotent producers and ordered appends: a batch sent again is stored
//! once, also after a crash; sequences and epochs are enforced; a batch lost
//! in a crash is written when sent again; appends chained in order are
//! queued in that order; producer ids are never handed out twice.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use tokio::sync::oneshot;
use tributary_storage::store::MemStore;
use tributary_storage::{AppendOptions, Error, Event, Log, ProducerBatch};

fn batch(n: usize, tag: &str) -> Vec<tributary_storage::AppendRecord> {
    (0..n)
        .map(|i| pinned(0, Event::new(format!("{tag}-{i}"))))
        .collect()
}

async fn send(log: &Log, id: i64, epoch: i16, first: i32, n: usize) -> Result<u64, Error> {
    let options = AppendOptions {
        producer: Some(ProducerBatch {
            producer_id: id,
            epoch,
            first_sequence: first,
        }),
        ..AppendOptions::default()
    };
    log.append_with("t", batch(n, &format!("{id}.{epoch}.{first}")), options)
        .await
        .map(|p| p[0].offset)
}

fn end(log: &Log) -> u64 {
    log.offsets("t", 0).expect("offsets").1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_is_stored_once_and_sequences_are_enforced() {
    let store = MemStore::new();
    let log = mem_log(&store, config());
    create(&log, "t", 1).await;
    let id = log.allocate_producer_id().await.expect("id");
    assert_eq!(send(&log, id, 0, 0, 3).await.expect("first"), 0);
    assert_eq!(send(&log, id, 0, 3, 2).await.expect("second"), 3);
    // The answer was lost; the producer sends both again.
    assert_eq!(send(&log, id, 0, 0, 3).await.expect("again"), 0);
    assert_eq!(send(&log, id, 0, 3, 2).await.expect("again"), 3);
    assert_eq!(end(&log), 5, "nothing stored twice");
    assert_eq!(
        log.topic("t").expect("t").events_appended,
        5,
        "a duplicate is not counted as appended"
    );
    assert_eq!(read_all(&log, "t", 0).len(), 5);
    // A gap, an old epoch, a stranger: refused, nothing stored.
    assert!(matches!(
        send(&log, id, 0, 9, 1).await,
        Err(Error::OutOfOrderSequence {
            expected: 5,
            got: 9,
            ..
        })
    ));
    assert!(matches!(
        send(&log, 999, 0, 4, 1).await,
        Err(Error::UnknownProducer { producer_id: 999 })
    ));
    // A new epoch starts again at 0 and fences the old one.
    assert_eq!(send(&log, id, 1, 0, 1).await.expect("new epoch"), 5);
    assert!(matches!(
        send(&log, id, 0, 5, 1).await,
        Err(Error::ProducerFenced { current: 1, .. })
    ));
    assert_eq!(end(&log), 6);
    // Other producers and plain appends interleave freely.
    let other = log.allocate_producer_id().await.expect("id");
    assert_ne!(other, id);
    assert_eq!(send(&log, other, 0, 0, 1).await.expect("other"), 6);
    append_one(&log, "t", "plain").await;
    assert_eq!(send(&log, id, 1, 1, 1).await.expect("continues"), 8);
    assert_eq!(log.producer_states(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_durable_batch_is_still_a_duplicate_and_a_lost_one_is_written() {
    let store = MemStore::new();
    let log = mem_log(&store, config());
    create(&log, "t", 1).await;
    let id = log.allocate_producer_id().await.expect("id");
    assert_eq!(send(&log, id, 0, 0, 4).await.expect("durable"), 0);
    // The next batch is written but its sync never completes.
    store.hold_sync();
    let lost = {
        let log = log.clone();
        tokio::spawn(async move { send(&log, id, 0, 4, 2).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!lost.is_finished(), "not answered before its sync");
    let after = store.crashed();
    // The old log may finish now; what it writes is not in `after`.
    store.release_sync();
    let _ = lost.await;
    let log = mem_log(&after, config());
    // The durable batch sent again: the offset it got, nothing written.
    assert_eq!(send(&log, id, 0, 0, 4).await.expect("duplicate"), 0);
    assert_eq!(end(&log), 4);
    // The lost batch sent again: written now, at the next offset.
    assert_eq!(send(&log, id, 0, 4, 2).await.expect("written"), 4);
    assert_eq!(end(&log), 6);
    assert_eq!(read_all(&log, "t", 0).len(), 6);
    // Producer ids stay unique across the crash.
    let next = log.allocate_producer_id().await.expect("id");
    assert!(next > id, "{next} after {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled_the_producer_table_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = {
        let log = sled_log(dir.path(), config());
        create(&log, "t", 1).await;
        let id = log.allocate_producer_id().await.expect("id");
        assert_eq!(send(&log, id, 0, 0, 2).await.expect("first"), 0);
        assert_eq!(send(&log, id, 0, 2, 2).await.expect("second"), 2);
        log.close().await.expect("close");
        id
    };
    let log = sled_log(dir.path(), config());
    assert_eq!(send(&log, id, 0, 2, 2).await.expect("duplicate"), 2);
    assert_eq!(end(&log), 4);
    assert_eq!(send(&log, id, 0, 4, 1).await.expect("next"), 4);
    assert!(log.allocate_producer_id().await.expect("id") > id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_table_is_bounded_and_forgets_the_least_recently_used() {
    let store = MemStore::new();
    let mut cfg = config();
    cfg.max_producer_states = 32;
    let log = mem_log(&store, cfg);
    create(&log, "t", 1).await;
    for id in 0..100 {
        send(&log, id, 0, 0, 1).await.expect("append");
    }
    assert!(log.producer_states() <= 32, "{}", log.producer_states());
    // The newest producer is still known; the oldest was forgotten.
    assert_eq!(send(&log, 99, 0, 0, 1).await.expect("duplicate"), 99);
    assert!(matches!(
        send(&log, 0, 0, 1, 1).await,
        Err(Error::UnknownProducer { .. })
    ));
    // What is forgotten is forgotten on disk too.
    let log = mem_log(&store.crashed(), config());
    assert!(log.producer_states() <= 32);
}

/// Two nodes that applied the same appends forget the same producers,
/// though one of them restarted in between: how recently each was used is
/// stored with it (a duplicate counts as a use). Kept in memory only, the
/// restarted node forgot producers in the order its hash table listed them,
/// and in a cluster the two would then answer the same batch differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_forgets_the_same_producers_as_one_that_was_not() {
    let cfg = || {
        let mut cfg = config();
        cfg.max_producer_states = 8;
        cfg
    };
    let (kept, restarted) = (MemStore::new(), MemStore::new());
    let nodes = [mem_log(&kept, cfg()), mem_log(&restarted, cfg())];
    for log in &nodes {
        create(log, "t", 1).await;
        for id in 0..8 {
            send(log, id, 0, 0, 1).await.expect("append");
        }
        // The first four send their batch again: now the most recently used.
        for id in 0..4 {
            send(log, id, 0, 0, 1).await.expect("duplicate");
        }
    }
    let [kept_log, _] = nodes;
    let restarted_log = mem_log(&restarted.crashed(), cfg());
    let mut answers = Vec::new();
    for log in [&kept_log, &restarted_log] {
        // Four new producers: four old ones are forgotten.
        for id in 8..12 {
            send(log, id, 0, 0, 1).await.expect("append");
        }
        let known: Vec<bool> = {
            let mut known = Vec::new();
            for id in 0..12 {
                match send(log, id, 0, 1, 1).await {
                    Ok(_) => known.push(true),
                    Err(Error::UnknownProducer { .. }) => known.push(false),
                    Err(e) => panic!("producer {id}: {e}"),
                }
            }
            known
        };
        answers.push(known);
    }
    let forgotten: Vec<usize> = (0..12).filter(|&id| !answers[0][id]).collect();
    assert_eq!(forgotten, [4, 5, 6, 7], "the least recently used go first");
    assert_eq!(
        answers[1], answers[0],
        "the restarted node forgot other producers"
    );
    assert_eq!(end(&kept_log), end(&restarted_log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_chained_in_order_are_queued_in_that_order() {
    let store = MemStore::new();
    let log = Arc::new(mem_log(&store, config()));
    create(&log, "t", 1).await;
    // Each append's turn is taken in order; they are then spawned in reverse,
    // so without the chain the last would tend to be queued first.
    let mut last: Option<oneshot::Receiver<()>> = None;
    let options: Vec<AppendOptions> = (0..50)
        .map(|_| AppendOptions::in_order(&mut last))
        .collect();
    let mut tasks = Vec::new();
    for (i, o) in options.into_iter().enumerate().rev() {
        let log = log.clone();
        tasks.push((
            i,
            tokio::spawn(async move {
                log.append_with("t", vec![pinned(0, Event::new(format!("{i}")))], o)
                    .await
            }),
        ));
    }
    for (i, t) in tasks {
        let p = t.await.expect("task").expect("append");
        assert_eq!(p[0].offset, i as u64, "append {i} keeps its place");
    }
}
