//! Deleting and changing topics, and trying to break both: appends and
//! alters racing each other, a crash between the steps of a deletion, a
//! deleted topic's name used again, reopening after each.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use tributary_storage::{
    AppendOptions, Error, Event, GroupOffset, Log, MemStore, ProducerBatch, SledOptions, SledStore,
    Store, TopicChange, TopicConfig,
};

fn offset(topic: &str, partition: u32, offset: u64) -> GroupOffset {
    GroupOffset {
        topic: topic.into(),
        partition,
        offset,
    }
}

async fn idempotent(log: &Log, topic: &str, id: i64, first: i32) -> Result<u64, Error> {
    let options = AppendOptions {
        producer: Some(ProducerBatch {
            producer_id: id,
            epoch: 0,
            first_sequence: first,
        }),
        ..AppendOptions::default()
    };
    let records = vec![pinned(0, Event::new(format!("p{first}")))];
    log.append_with(topic, records, options)
        .await
        .map(|p| p[0].offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_takes_its_records_offsets_and_producers_and_its_name_never_reuses_an_offset(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), strict_config());
    let mut t = TopicConfig::new("t", 2);
    t.retention_bytes = Some(2048);
    log.create_topic(t).await.expect("create t");
    create(&log, "u", 1).await;
    for i in 0..100 {
        log.append("t", vec![pinned(0, Event::new(format!("{i:0>100}")))])
            .await
            .expect("append");
    }
    append_one(&log, "u", "kept").await;
    // A floor (retention moved the start) must not survive the topic.
    log.enforce_retention();
    assert!(offsets(&log, "t", 0).0 > 0, "retention set no floor");
    let id = log.allocate_producer_id().await.expect("producer id");
    assert_eq!(idempotent(&log, "t", id, 0).await.expect("idempotent"), 100);
    log.commit_offsets("g", vec![offset("t", 0, 50), offset("u", 0, 1)])
        .await
        .expect("commit");
    assert_eq!(log.producer_states(), 1);

    log.delete_topic("t").await.expect("delete");
    assert!(matches!(log.topic("t"), Err(Error::UnknownTopic(_))));
    assert!(matches!(
        log.read("t", 0, 0, 10, usize::MAX),
        Err(Error::UnknownTopic(_))
    ));
    assert!(matches!(
        log.append("t", vec![Event::new("x").into()]).await,
        Err(Error::UnknownTopic(_))
    ));
    assert!(matches!(
        log.delete_topic("t").await,
        Err(Error::UnknownTopic(_))
    ));
    assert_eq!(
        log.group_offsets("g").expect("offsets"),
        vec![offset("u", 0, 1)]
    );
    assert_eq!(log.producer_states(), 0);
    assert_eq!(log.topics().len(), 1);

    // The name again: a new, empty topic; its offsets go on from where the
    // old one ended, so no position stored anywhere points into it.
    create(&log, "t", 1).await;
    assert_eq!(offsets(&log, "t", 0), (101, 101));
    assert_eq!(append_one(&log, "t", "new").await, 101);
    // The old producer is a stranger here.
    assert!(matches!(
        idempotent(&log, "t", id, 1).await,
        Err(Error::UnknownProducer { .. })
    ));
    drop(log);

    let log = sled_log(dir.path(), strict_config());
    let records = read_all(&log, "t", 0);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].bytes(), b"new");
    assert_eq!(log.topic("t").expect("t").config.partitions, 1);
    assert_eq!(
        log.group_offsets("g").expect("offsets"),
        vec![offset("u", 0, 1)]
    );
    assert_eq!(read_all(&log, "u", 0)[0].bytes(), b"kept");
    assert_eq!(log.producer_states(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_removing_a_topic_and_its_partitions_leaves_no_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = sled_log(dir.path(), strict_config());
        create(&log, "t", 3).await;
        create(&log, "u", 1).await;
        for p in 0..3 {
            log.append("t", vec![pinned(p, Event::new(vec![7u8; 40_000]))])
                .await
                .expect("append");
        }
        append_one(&log, "u", "kept").await;
    }
    {
        // The first half of a deletion, durable; then the crash.
        let store = SledStore::open(dir.path(), &SledOptions::default()).expect("store");
        store.remove_topic("t").expect("remove");
        for p in 0..3 {
            store.put_floor("t", p, 1).expect("floor");
        }
        store.sync().expect("sync");
        assert_eq!(store.partition_topics().expect("trees"), vec!["t", "u"]);
    }
    {
        let log = sled_log(dir.path(), strict_config());
        assert!(matches!(log.topic("t"), Err(Error::UnknownTopic(_))));
        create(&log, "t", 3).await;
        for p in 0..3 {
            assert_eq!(offsets(&log, "t", p), (1, 1), "partition {p} came back");
        }
        assert_eq!(read_all(&log, "u", 0).len(), 1);
        log.delete_topic("t").await.expect("delete");
    }
    let store = SledStore::open(dir.path(), &SledOptions::default()).expect("store");
    assert_eq!(store.partition_topics().expect("trees"), vec!["u"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_is_all_or_nothing_across_a_crash() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 2).await;
    for i in 0..10 {
        append_one(&log, "t", format!("{i}")).await;
    }
    log.commit_offsets("g", vec![offset("t", 0, 3)])
        .await
        .expect("commit");
    // Crash before the deletion: everything is there.
    let before = mem_log(&store.crashed(), strict_config());
    assert_eq!(before.topic("t").expect("t").config.partitions, 2);
    drop(before);
    log.delete_topic("t").await.expect("delete");
    // Crash after it returned: nothing is.
    let after_store = store.crashed();
    let after = mem_log(&after_store, strict_config());
    assert!(matches!(after.topic("t"), Err(Error::UnknownTopic(_))));
    assert!(after.group_offsets("g").expect("offsets").is_empty());
    assert!(after_store.partition_topics().expect("trees").is_empty());
}

/// Appends race a deletion and the name's re-creation: each append either
/// lands in the old topic (and vanishes with it) or in the new one, or is
/// refused; the new topic holds exactly the appends acknowledged to it, at
/// dense offsets, also after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_racing_a_deletion_never_leak_into_the_name_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), strict_config());
    create(&log, "t", 1).await;
    let mut producers = Vec::new();
    for w in 0..4u32 {
        let log = log.clone();
        producers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..400u32 {
                let value = format!("{w}-{i}");
                match log
                    .append("t", vec![Event::new(value.clone()).into()])
                    .await
                {
                    Ok(p) => acked.push((p[0].offset, value)),
                    Err(Error::UnknownTopic(_)) => {}
                    Err(e) => panic!("append: {e}"),
                }
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            acked
        }));
    }
    // Delete once some appends landed, then take the name again.
    wait_until("some appends", || offsets(&log, "t", 0).1 > 50).await;
    log.delete_topic("t").await.expect("delete");
    let created = loop {
        match log.create_topic(TopicConfig::new("t", 1)).await {
            Ok(info) => break info,
            Err(Error::TopicDeleting(_)) => tokio::task::yield_now().await,
            Err(e) => panic!("create: {e}"),
        }
    };
    // The new topic starts where the old one ended. Appends racing the
    // creation may already have landed in it when its info is read, so
    // its end is not checked here: the records stored decide below.
    let start = created.partitions[0].start_offset;
    assert!(start > 50, "offsets went back to {start}");
    let mut acked = Vec::new();
    for p in producers {
        acked.extend(p.await.expect("producer"));
    }
    let check = |log: &Log| {
        let stored = read_all(log, "t", 0);
        assert!(
            stored.iter().all(|r| r.offset >= start),
            "an old record survived"
        );
        // Acknowledged to the new topic: those whose record is there.
        let new: Vec<&(u64, String)> = acked
            .iter()
            .filter(|(o, v)| {
                o.checked_sub(start)
                    .and_then(|i| stored.get(i as usize))
                    .is_some_and(|r| r.offset == *o && r.bytes() == v.as_bytes())
            })
            .collect();
        assert_eq!(
            new.len(),
            stored.len(),
            "the new topic holds records nobody was told are there"
        );
    };
    check(&log);
    drop(log);
    check(&sled_log(dir.path(), strict_config()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_gains_partitions_and_new_limits_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = sled_log(dir.path(), strict_config());
    create(&log, "t", 2).await;
    for p in 0..2 {
        log.append("t", vec![pinned(p, Event::new("before"))])
            .await
            .expect("append");
    }
    let change = TopicChange {
        partitions: Some(4),
        max_event_bytes: Some(100),
        retention_ms: Some(Some(86_400_000)),
        ..TopicChange::default()
    };
    let info = log.alter_topic("t", &change).await.expect("alter");
    assert_eq!(info.partitions.len(), 4);
    assert_eq!(info.config.max_event_bytes, 100);
    assert_eq!(info.config.retention_ms, Some(86_400_000));
    let p = log
        .append("t", vec![pinned(3, Event::new("in the new partition"))])
        .await
        .expect("append to partition 3");
    assert_eq!((p[0].partition, p[0].offset), (3, 0));
    assert!(matches!(
        log.append("t", vec![Event::new(vec![0u8; 200]).into()])
            .await,
        Err(Error::EventTooLarge { max: 100, .. })
    ));
    let shrink = TopicChange {
        partitions: Some(1),
        ..TopicChange::default()
    };
    assert!(matches!(
        log.alter_topic("t", &shrink).await,
        Err(Error::InvalidTopic(_))
    ));
    assert!(matches!(
        log.alter_topic("nope", &change).await,
        Err(Error::UnknownTopic(_))
    ));
    let unset = TopicChange {
        retention_ms: Some(None),
        ..TopicChange::default()
    };
    assert_eq!(
        log.alter_topic("t", &unset)
            .await
            .expect("unset")
            .config
            .retention_ms,
        None
    );
    drop(log);

    let log = sled_log(dir.path(), strict_config());
    let info = log.topic("t").expect("t");
    assert_eq!(info.config.partitions, 4);
    assert_eq!(info.config.max_event_bytes, 100);
    assert_eq!(info.config.retention_ms, None);
    assert_eq!(read_all(&log, "t", 0)[0].bytes(), b"before");
    assert_eq!(read_all(&log, "t", 3)[0].bytes(), b"in the new partition");
}

/// Appends queued with the topic's old state and with its new one share a
/// partition: offsets stay dense and every acknowledged record is where its
/// offset says, while the topic changes under them again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_racing_topic_changes_keep_dense_offsets() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    let log = Arc::new(log);
    let mut tasks = Vec::new();
    for w in 0..6u32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..300u32 {
                let value = format!("{w}-{i}");
                let p = log
                    .append("t", vec![pinned(0, Event::new(value.clone()))])
                    .await
                    .expect("append");
                acked.push((p[0].offset, value));
            }
            acked
        }));
    }
    let mut partitions = 1;
    for round in 0..60u64 {
        let change = TopicChange {
            retention_ms: Some(Some(86_400_000 + round)),
            partitions: (round % 10 == 9).then(|| {
                partitions += 1;
                partitions
            }),
            ..TopicChange::default()
        };
        log.alter_topic("t", &change).await.expect("alter");
        tokio::task::yield_now().await;
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("writer"));
    }
    let stored = read_all(&log, "t", 0);
    assert_eq!(stored.len(), acked.len());
    for (offset, value) in acked {
        assert_eq!(
            stored[offset as usize].bytes(),
            value.as_bytes(),
            "at {offset}"
        );
    }
    assert_eq!(log.topic("t").expect("t").config.partitions, partitions);
}

/// ListOffsets' "max timestamp": the record with the largest timestamp,
/// the first of them when several share it, within the end asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_with_the_largest_timestamp_is_found() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    assert_eq!(log.max_timestamp("t", 0, u64::MAX).expect("empty"), None);
    for batch in [&[100i64, 200, 150][..], &[50], &[300, 250], &[300, 10]] {
        let records = batch
            .iter()
            .map(|&ts| pinned(0, Event::new(format!("{ts}")).with_timestamp(ts)))
            .collect();
        log.append("t", records).await.expect("append");
    }
    let max = |end| log.max_timestamp("t", 0, end).expect("lookup");
    assert_eq!(max(u64::MAX), Some((4, 300)), "the first of two at 300");
    assert_eq!(max(4), Some((1, 200)), "below offset 4");
    assert_eq!(max(1), Some((0, 100)));
    assert_eq!(max(0), None);
    assert!(matches!(
        log.max_timestamp("nope", 0, u64::MAX),
        Err(Error::UnknownTopic(_))
    ));
}

/// Lookup by timestamp: the first record in offset order at or after it,
/// with timestamps out of order within and across batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_record_at_or_after_a_timestamp_is_found_in_offset_order() {
    let store = MemStore::new();
    let log = mem_log(&store, strict_config());
    create(&log, "t", 1).await;
    for batch in [&[100i64, 200, 150][..], &[50], &[300, 250]] {
        let records = batch
            .iter()
            .map(|&ts| pinned(0, Event::new(format!("{ts}")).with_timestamp(ts)))
            .collect();
        log.append("t", records).await.expect("append");
    }
    let at = |ts| log.offset_for_timestamp("t", 0, ts).expect("lookup");
    assert_eq!(at(0), Some((0, 100)));
    assert_eq!(at(100), Some((0, 100)));
    assert_eq!(at(101), Some((1, 200)));
    assert_eq!(at(201), Some((4, 300)));
    assert_eq!(at(300), Some((4, 300)));
    assert_eq!(at(301), None);
    assert!(matches!(
        log.offset_for_timestamp("nope", 0, 0),
        Err(Error::UnknownTopic(_))
    ));
}
