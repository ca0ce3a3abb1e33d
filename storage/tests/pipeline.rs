//! The committer writes the next cycle while the syncer fsyncs the previous
//! one. A cycle written during a held sync must stay invisible and
//! unacknowledged until a sync that covers it completes.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tributary_storage::{AppendRecord, Event, Log, LogConfig, MemStore, TopicConfig};

fn events(n: usize, size: usize, tag: u8) -> Vec<AppendRecord> {
    (0..n)
        .map(|i| {
            Event::new(vec![tag; size])
                .with_key(format!("{tag}-{i}"))
                .into()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_written_during_a_held_sync_waits_for_its_own_sync() {
    let store = MemStore::new();
    let log = Log::with_store(Arc::new(store.clone()), LogConfig::default()).expect("log");
    log.create_topic(TopicConfig::new("p", 1))
        .await
        .expect("topic");
    let syncs_before = store.syncs();
    store.hold_sync();

    let first = tokio::spawn({
        let log = log.clone();
        async move { log.append("p", events(3, 10, 1)).await }
    });
    // Wait until the first cycle is in the syncer (blocked on the held sync).
    let mut end = log.watch_end("p", 0).expect("watch");
    tokio::time::timeout(Duration::from_millis(300), end.changed())
        .await
        .expect_err("nothing visible yet");

    // 300 KiB: over the pipelining threshold, so the committer writes this
    // cycle into the engine while the first one's sync is still held.
    let second = tokio::spawn({
        let log = log.clone();
        async move { log.append("p", events(300, 1024, 2)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "no ack before a sync completes"
    );
    assert_eq!(
        *end.borrow(),
        0,
        "no record visible before a sync completes"
    );
    let read = log.read("p", 0, 0, 1000, 1 << 30).expect("read at end");
    assert!(read.records.is_empty());

    // A crash now keeps neither: nothing was synced.
    let crashed = Log::with_store(Arc::new(store.crashed()), LogConfig::default()).expect("reopen");
    assert_eq!(
        crashed
            .topic("p")
            .map(|t| t.partitions[0].end_offset)
            .unwrap_or(0),
        0
    );
    drop(crashed);

    store.release_sync();
    let a = first.await.expect("join").expect("first acked");
    let b = second.await.expect("join").expect("second acked");
    assert_eq!(
        a.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(b.first().map(|p| p.offset), Some(3));
    assert_eq!(b.last().map(|p| p.offset), Some(302));
    assert!(store.syncs() > syncs_before);
    // Everything acknowledged survives a crash after the release.
    let after = Log::with_store(Arc::new(store.crashed()), LogConfig::default()).expect("reopen");
    assert_eq!(
        after.topic("p").expect("topic").partitions[0].end_offset,
        303
    );
}
