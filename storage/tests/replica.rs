//! The log under a replicated log: writes handed to a replicator as ops and
//! applied in one order on several nodes leave every node with the same
//! records at the same offsets, the same positions, metadata and producer
//! ids; an op applied again after a crash at any write is not written
//! twice, and none is lost.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use common::*;
use tokio::sync::{mpsc, oneshot};
use tributary_storage::{
    AppendOptions, Applied, Error, Event, GroupOffset, Guard, Log, Marker, MemStore, Op, Pending,
    ProducerBatch, Record, Replicator, Result, TopicChange, TopicConfig,
};

type Submitted = (Op, oneshot::Sender<Result<Applied>>);

/// A replicated log in one process: ops are numbered in the order they are
/// submitted, sent through their wire form (postcard), applied on every
/// node in order, and answered with the first node's outcome. Every entry
/// is kept, for the crash test.
struct Loopback {
    tx: mpsc::Sender<Submitted>,
}

impl Replicator for Loopback {
    fn submit(&self, op: Op) -> Pin<Box<dyn Future<Output = Result<Pending>> + Send + '_>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.tx.send((op, reply)).await.map_err(|_| Error::Closed)?;
            let pending: Pending =
                Box::pin(async move { answer.await.map_err(|_| Error::Closed)? });
            Ok(pending)
        })
    }
}

type Journal = Arc<Mutex<Vec<(u64, Op)>>>;

/// Starts the loopback over `nodes` (the first one writes through it).
fn cluster(nodes: Vec<Log>) -> Journal {
    let journal: Journal = Arc::default();
    let (tx, mut rx) = mpsc::channel::<Submitted>(64);
    nodes[0]
        .replicate_with(Arc::new(Loopback { tx }))
        .expect("replicator");
    let kept = journal.clone();
    tokio::spawn(async move {
        let mut index = 0u64;
        while let Some(first) = rx.recv().await {
            // What is waiting goes as one group, as a consensus library
            // hands the state machine several committed entries at once.
            let mut group = vec![first];
            while let Ok(more) = rx.try_recv() {
                group.push(more);
            }
            let mut entries = Vec::new();
            let mut replies = Vec::new();
            for (op, reply) in group {
                index += 1;
                let wire = postcard::to_allocvec(&op).expect("encode");
                let op: Op = postcard::from_bytes(&wire).expect("decode");
                kept.lock().unwrap().push((index, op.clone()));
                entries.push((index, op));
                replies.push(reply);
            }
            let mut outcomes = Vec::new();
            for (i, node) in nodes.iter().enumerate() {
                let applied = apply_recorded(node, entries.clone()).await;
                if i == 0 {
                    outcomes = applied;
                }
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
    });
    journal
}

const APPLIED: &str = "test-applied";

/// Applies entries as a cluster node's state machine does: in groups that
/// end at each topic change or deletion of records, recording after each group the last index
/// applied (a node restarting goes on after it).
async fn apply_recorded(log: &Log, entries: Vec<(u64, Op)>) -> Vec<Result<Applied>> {
    let mut out = Vec::new();
    let mut group = Vec::new();
    let total = entries.len();
    for (n, (index, op)) in entries.into_iter().enumerate() {
        let change = op.ends_group();
        group.push((index, op));
        let pointer = || Op::Meta {
            space: APPLIED.into(),
            entries: vec![(b"index".to_vec(), Some(index.to_be_bytes().to_vec()))],
        };
        if change {
            // A topic change or a deletion: applied, then recorded, alone.
            out.extend(log.apply_all(std::mem::take(&mut group)).await);
            log.apply_all(vec![(index, pointer())])
                .await
                .pop()
                .expect("one answer")
                .expect("the pointer is stored");
        } else if n + 1 == total {
            // The rest, with the pointer last in the same call (so in the
            // same commit cycle as the ops before it).
            let mut all = std::mem::take(&mut group);
            all.push((index, pointer()));
            let mut outcomes = log.apply_all(all).await;
            outcomes
                .pop()
                .expect("one answer")
                .expect("the pointer is stored");
            out.extend(outcomes);
        }
    }
    out
}

/// The last index a node recorded as applied.
fn applied_index(log: &Log) -> u64 {
    log.meta_get(APPLIED, b"index")
        .expect("meta")
        .map_or(0, |v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
}

/// Every record of a partition, start to end (markers take offsets and are
/// no records).
fn partition_records(log: &Log, topic: &str, partition: u32) -> Vec<Record> {
    let (mut at, end) = offsets(log, topic, partition);
    let mut out = Vec::new();
    while at < end {
        let r = log
            .read(topic, partition, at, 1000, usize::MAX)
            .expect("read");
        assert!(r.next_offset > at, "no progress at {at}");
        at = r.next_offset;
        out.extend(r.records);
    }
    out
}

/// Everything a node holds that the cluster must agree on.
#[derive(Debug, PartialEq)]
struct State {
    records: BTreeMap<(String, u32), Vec<Record>>,
    /// Each partition's start and end offsets.
    bounds: BTreeMap<(String, u32), (u64, u64)>,
    last_stable: BTreeMap<(String, u32), u64>,
    positions: Vec<GroupOffset>,
    meta: Vec<(Vec<u8>, Vec<u8>)>,
    producer_ids: Vec<(Vec<u8>, Vec<u8>)>,
    /// The idempotent producers' stored states, when each was last used
    /// included (what the table forgets first follows it).
    producers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The first difference between two states, readably.
fn difference(a: &State, b: &State) -> Option<String> {
    if a == b {
        return None;
    }
    for (k, ra) in &a.records {
        let Some(rb) = b.records.get(k) else {
            return Some(format!("{k:?} only in the first"));
        };
        if ra != rb {
            let at = ra.iter().zip(rb).position(|(x, y)| x != y);
            return Some(format!(
                "{k:?}: {} and {} records, first different at {at:?}: {:?} / {:?}",
                ra.len(),
                rb.len(),
                at.and_then(|i| ra.get(i)),
                at.and_then(|i| rb.get(i))
            ));
        }
    }
    Some(format!(
        "topics {:?} / {:?}; bounds {:?} / {:?}; lso {:?} / {:?}; positions {:?} / {:?}; meta {:?} / {:?}; ids {:?} / {:?}; producers {:?} / {:?}",
        a.records.keys().collect::<Vec<_>>(),
        b.records.keys().collect::<Vec<_>>(),
        a.bounds,
        b.bounds,
        a.last_stable,
        b.last_stable,
        a.positions,
        b.positions,
        a.meta,
        b.meta,
        a.producer_ids,
        b.producer_ids,
        a.producers,
        b.producers
    ))
}

fn state(log: &Log) -> State {
    let mut records = BTreeMap::new();
    let mut last_stable = BTreeMap::new();
    let mut bounds = BTreeMap::new();
    for t in log.topics() {
        for p in 0..t.config.partitions {
            let name = t.config.name.clone();
            records.insert((name.clone(), p), partition_records(log, &name, p));
            bounds.insert((name.clone(), p), log.offsets(&name, p).expect("offsets"));
            last_stable.insert((name.clone(), p), log.last_stable(&name, p).expect("lso"));
        }
    }
    State {
        records,
        bounds,
        last_stable,
        positions: log.group_offsets("g").expect("positions"),
        meta: log.meta("app").expect("meta"),
        producer_ids: log.meta("__producer_ids").expect("ids"),
        producers: log.meta("__producers").expect("producers"),
    }
}

fn producer(id: i64, seq: i32, transactional: bool) -> AppendOptions {
    AppendOptions {
        producer: Some(ProducerBatch {
            producer_id: id,
            epoch: 0,
            first_sequence: seq,
        }),
        transactional,
        ..AppendOptions::default()
    }
}

fn keyed(partition: Option<u32>, key: &str, value: String) -> tributary_storage::AppendRecord {
    tributary_storage::AppendRecord {
        partition,
        event: Event::new(value).with_key(key),
    }
}

/// Every kind of write, through the first node, some of them at once.
async fn workload(leader: &Log) {
    create(leader, "t", 3).await;
    create(leader, "gone", 1).await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let log = leader.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..25 {
                let records = (0..(1 + i % 4))
                    .map(|j| keyed(None, &format!("k{w}-{j}"), format!("w{w}-{i}-{j}")))
                    .collect();
                log.append("t", records).await.expect("append");
            }
        }));
    }
    // An idempotent producer, with a batch sent twice: stored once.
    let pid = leader.allocate_producer_id().await.expect("id");
    let batch = |v: &str| vec![keyed(Some(1), "p", v.to_owned())];
    let first = leader
        .append_with("t", batch("p0"), producer(pid, 0, false))
        .await
        .expect("first");
    let again = leader
        .append_with("t", batch("p0"), producer(pid, 0, false))
        .await
        .expect("again");
    assert_eq!(
        first, again,
        "a duplicate is answered with its first offset"
    );
    leader
        .append_with("t", batch("p1"), producer(pid, 1, false))
        .await
        .expect("next");
    // Two transactions: one commits, one aborts.
    let (tx1, tx2) = (
        leader.allocate_producer_id().await.expect("id"),
        leader.allocate_producer_id().await.expect("id"),
    );
    assert!(tx1 != tx2 && tx1 != pid);
    for (id, marker) in [(tx1, Marker::Commit), (tx2, Marker::Abort)] {
        leader
            .append_with(
                "t",
                vec![keyed(Some(2), "x", format!("txn {id}"))],
                producer(id, 0, true),
            )
            .await
            .expect("transactional");
        let at = leader
            .write_marker("t", 2, id, 0, marker, 3)
            .await
            .expect("marker");
        assert!(at.is_some());
    }
    for w in writers {
        w.await.expect("writer");
    }
    // Records deleted: every node moves its start there, in the log's order.
    let end = leader.offsets("t", 1).expect("t").1;
    assert!(end > 10, "{end} records in t/1");
    assert_eq!(
        leader
            .delete_records("t", 1, Some(7))
            .await
            .expect("delete"),
        7
    );
    leader
        .commit_offsets(
            "g",
            vec![GroupOffset {
                topic: "t".into(),
                partition: 0,
                offset: 3,
            }],
        )
        .await
        .expect("commit");
    leader
        .put_meta("app", vec![(b"a".to_vec(), Some(b"1".to_vec()))])
        .await
        .expect("meta");
    let change = TopicChange {
        partitions: Some(4),
        ..TopicChange::default()
    };
    leader.alter_topic("t", &change).await.expect("alter");
    leader
        .append(
            "t",
            vec![keyed(Some(3), "new", "in the new partition".into())],
        )
        .await
        .expect("append to the added partition");
    // Deleted to the end, then past it (refused), each followed by appends
    // that the deletion must not reach when it is applied again.
    for i in 0..2 {
        leader
            .append("t", vec![keyed(Some(3), "before", format!("b{i}"))])
            .await
            .expect("append");
    }
    assert_eq!(
        leader
            .delete_records("t", 3, None)
            .await
            .expect("to the end"),
        3
    );
    assert!(matches!(
        leader.delete_records("t", 3, Some(5)).await,
        Err(Error::OffsetOutOfRange { .. })
    ));
    for i in 0..2 {
        leader
            .append("t", vec![keyed(Some(3), "after", format!("a{i}"))])
            .await
            .expect("append");
    }
    leader.delete_topic("gone").await.expect("delete");
    create(leader, "gone", 2).await;
    append_one(leader, "gone", "again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_applying_the_same_ops_hold_the_same_log() {
    let stores: Vec<MemStore> = (0..3).map(|_| MemStore::new()).collect();
    let nodes: Vec<Log> = stores.iter().map(|s| mem_log(s, config())).collect();
    let journal = cluster(nodes.clone());
    workload(&nodes[0]).await;
    let leader = state(&nodes[0]);
    assert_eq!(leader.records.len(), 4 + 2, "t has 4 partitions, gone 2");
    let total: usize = leader.records.values().map(Vec::len).sum();
    // 4 writers × 61 records (1, 2, 3, 4, 1, 2, … over 25 appends), 2
    // idempotent, 1 of the committed transaction (a read skips the aborted
    // one's), 2 in the added partition (3 more were deleted), 1 in the new
    // `gone`; less the 7 deleted from t/1.
    assert_eq!(total, 4 * 61 + 2 + 1 + 2 + 1 - 7);
    assert_eq!(
        nodes[2].offsets("t", 1).expect("t").0,
        7,
        "the deletion reached a follower"
    );
    for (i, node) in nodes.iter().enumerate().skip(1) {
        if let Some(d) = difference(&state(node), &leader) {
            panic!("node {i} differs from the leader: {d}");
        }
    }
    assert!(journal.lock().unwrap().len() > 100);
    // A follower's answers are its own: it refuses nothing the leader took.
    assert_eq!(
        nodes[1].topic("t").expect("t").partitions.len(),
        nodes[0].topic("t").expect("t").partitions.len()
    );
}

/// The crash test: a node applies the whole journal while every write it
/// makes is recorded; then, for a crash after each write in turn, a node
/// reopened on what the disk kept applies the entries after the index it
/// recorded, and must hold exactly what the node that did not crash holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_applied_again_after_a_crash_at_any_write_is_stored_once() {
    // The journal of a real run.
    let source = MemStore::new();
    let leader = mem_log(&source, config());
    let journal = cluster(vec![leader.clone()]);
    workload(&leader).await;
    let entries = journal.lock().unwrap().clone();
    drop(leader);

    let store = MemStore::new();
    store.record_writes();
    let node = mem_log(&store, config());
    // In groups of a few entries, as they would be committed.
    for group in entries.chunks(5) {
        apply_recorded(&node, group.to_vec()).await;
    }
    let expected = state(&node);
    let writes = store.recorded_writes();
    assert!(writes > 100, "only {writes} writes");
    drop(node);
    for n in 0..=writes {
        let crashed = store.crashed_after(n);
        let reopened = mem_log(&crashed, config());
        let from = applied_index(&reopened);
        let rest: Vec<(u64, Op)> = entries.iter().filter(|(i, _)| *i > from).cloned().collect();
        for group in rest.chunks(5) {
            apply_recorded(&reopened, group.to_vec()).await;
        }
        if let Some(d) = difference(&state(&reopened), &expected) {
            panic!("crash after write {n} of {writes} (applied up to {from}): {d}");
        }
    }
}

/// A node that applies an op a second time (its pointer lost, say) leaves
/// its records as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_markers_applied_twice_are_stored_once() {
    let store = MemStore::new();
    let node = mem_log(&store, config());
    node.create_topic(TopicConfig::new("t", 2))
        .await
        .expect("topic");
    let events = |tag: &str| {
        tributary_storage::Event::new(tag.to_owned())
            .with_key("k")
            .into()
    };
    let source = MemStore::new();
    let encoder = mem_log(&source, config());
    let journal = cluster(vec![encoder.clone()]);
    encoder
        .create_topic(TopicConfig::new("t", 2))
        .await
        .expect("topic");
    encoder
        .append("t", vec![events("a"), events("b")])
        .await
        .expect("append");
    encoder
        .append_with(
            "t",
            vec![keyed(Some(0), "x", "txn".into())],
            producer(5, 0, true),
        )
        .await
        .expect("txn");
    encoder
        .write_marker("t", 0, 5, 0, Marker::Commit, 0)
        .await
        .expect("marker");
    let ops: Vec<(u64, Op)> = journal
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, op)| !op.is_topic_change())
        .cloned()
        .collect();
    assert_eq!(ops.len(), 3);
    let first = node.apply_all(ops.clone()).await;
    assert!(first.iter().all(Result::is_ok), "{first:?}");
    let once = state(&node);
    let again = node.apply_all(ops).await;
    assert!(
        again.iter().all(|r| matches!(r, Err(Error::Closed))),
        "replays are not answered as written: {again:?}"
    );
    assert_eq!(state(&node), once);
    // And after a reopen, from the marks on disk.
    drop(node);
    let reopened = mem_log(&store.crashed(), config());
    assert_eq!(state(&reopened), once);
}

/// Writers waiting for their ops to be applied hold the node's pending-bytes
/// budget; applying takes a budget of its own, so a full budget never stops
/// the ops that would free it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pending_budget_does_not_stop_the_ops_that_free_it() {
    let small = tributary_storage::LogConfig {
        max_pending_bytes: 4096,
        ..config()
    };
    let store = MemStore::new();
    let node = mem_log(&store, small);
    cluster(vec![node.clone()]);
    create(&node, "t", 2).await;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let log = node.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    let value = format!("{w}-{i}-{}", "x".repeat(1500));
                    log.append("t", vec![keyed(None, "k", value)])
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    let all = async {
        for w in writers {
            w.await.expect("writer");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("the writers finish");
    let total: usize = (0..2).map(|p| partition_records(&node, "t", p).len()).sum();
    assert_eq!(total, 160);
}

/// Writes under a claim ([`Guard`]): written while the claim holds; once
/// another writer claimed the same key, refused with `Superseded` and
/// written nowhere, even when the write was submitted before the new
/// claim was applied but is ordered after it; the same through a handle
/// made under a claim ([`Log::guarded`]). Alone and replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_a_replaced_claim_is_refused_on_every_node() {
    let alone = mem_log(&MemStore::new(), config());
    let stores: Vec<MemStore> = (0..2).map(|_| MemStore::new()).collect();
    let nodes: Vec<Log> = stores.iter().map(|s| mem_log(s, config())).collect();
    let _journal = cluster(nodes.clone());
    for (what, log, all) in [
        ("alone", &alone, vec![alone.clone()]),
        ("replicated", &nodes[0], nodes.clone()),
    ] {
        log.create_topic(TopicConfig::new("t", 1))
            .await
            .expect("create");
        let claim = |v: &str| Guard {
            space: "claims".into(),
            key: b"edge".to_vec(),
            value: v.as_bytes().to_vec(),
        };
        let under = |g: &Guard| AppendOptions {
            guard: Some(g.clone()),
            ..AppendOptions::default()
        };
        let (first, second) = (claim("first"), claim("second"));
        let one = |v: &str| vec![Event::new(v.to_owned()).into()];
        // Nobody claimed it yet: nothing is written under a claim.
        let r = log.append_with("t", one("unclaimed"), under(&first)).await;
        assert!(matches!(r, Err(Error::Superseded(_))), "{what}: {r:?}");
        log.claim(&first).await.expect("claim");
        log.append_with("t", one("a"), under(&first))
            .await
            .expect("written under the claim");
        log.put_meta_guarded(
            "m",
            vec![(b"k".to_vec(), Some(b"1".to_vec()))],
            Some(&first),
        )
        .await
        .expect("metadata under the claim");
        // The new claim is submitted first, the old writer's append right
        // behind it: ordered after the claim, it is refused.
        let (claimed, late) = tokio::join!(
            log.claim(&second),
            log.append_with("t", one("late"), under(&first))
        );
        claimed.expect("second claim");
        assert!(
            matches!(late, Err(Error::Superseded(_))),
            "{what}: {late:?}"
        );
        let meta = log
            .put_meta_guarded(
                "m",
                vec![(b"k".to_vec(), Some(b"2".to_vec()))],
                Some(&first),
            )
            .await;
        assert!(
            matches!(meta, Err(Error::Superseded(_))),
            "{what}: {meta:?}"
        );
        log.append_with("t", one("b"), under(&second))
            .await
            .expect("written under the new claim");
        // A handle made under a claim writes under it without asking.
        let old = log.guarded(first.clone());
        let late = old.append("t", one("late again")).await;
        assert!(
            matches!(late, Err(Error::Superseded(_))),
            "{what}: {late:?}"
        );
        let meta = old
            .put_meta("m", vec![(b"k".to_vec(), Some(b"3".to_vec()))])
            .await;
        assert!(
            matches!(meta, Err(Error::Superseded(_))),
            "{what}: {meta:?}"
        );
        log.guarded(second.clone())
            .append("t", one("c"))
            .await
            .expect("written through a handle under the new claim");
        // A group's positions too: committed and removed under the claim
        // that holds, refused under the replaced one.
        let at = |offset| {
            vec![GroupOffset {
                topic: "t".into(),
                partition: 0,
                offset,
            }]
        };
        let current = log.guarded(second.clone());
        current
            .commit_offsets("g", at(2))
            .await
            .expect("a commit under the claim");
        current
            .commit_offsets("gone", at(1))
            .await
            .expect("a commit under the claim");
        let late = old.commit_offsets("g", at(1)).await;
        assert!(
            matches!(late, Err(Error::Superseded(_))),
            "{what}: {late:?}"
        );
        for late in [
            old.forget_group("g").await,
            old.forget_group_offsets("g", vec![("t".into(), 0)]).await,
        ] {
            assert!(
                matches!(late, Err(Error::Superseded(_))),
                "{what}: {late:?}"
            );
        }
        current
            .forget_group("gone")
            .await
            .expect("removed under the claim");
        for (i, node) in all.iter().enumerate() {
            assert_eq!(
                node.group_offsets("g").expect("positions"),
                at(2),
                "{what} node {i}"
            );
            assert_eq!(
                node.group_offsets("gone").expect("positions"),
                vec![],
                "{what} node {i}"
            );
        }
        for (i, node) in all.iter().enumerate() {
            let values: Vec<Vec<u8>> = partition_records(node, "t", 0)
                .into_iter()
                .map(|r| r.value.unwrap_or_default())
                .collect();
            assert_eq!(
                values,
                vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()],
                "{what} node {i}"
            );
            assert_eq!(
                node.meta_get("m", b"k").expect("meta"),
                Some(b"1".to_vec()),
                "{what} node {i}"
            );
        }
    }
}

/// Writes after a snapshot's cut, before it is written out in full: more
/// records, records deleted from a partition's start (batches the cut
/// refers to go), a new position and metadata, and a topic written to,
/// then deleted and created again.
async fn after_the_cut(leader: &Log) {
    let start = leader
        .delete_records("t", 0, Some(3))
        .await
        .expect("delete records");
    assert_eq!(start, 3);
    for i in 0..10 {
        leader
            .append("t", vec![keyed(None, "late", format!("late {i}"))])
            .await
            .expect("append");
    }
    append_one(leader, "gone", "written after the cut").await;
    leader
        .commit_offsets(
            "g",
            vec![GroupOffset {
                topic: "t".into(),
                partition: 1,
                offset: 7,
            }],
        )
        .await
        .expect("commit");
    leader
        .put_meta(
            "app",
            vec![(b"a".to_vec(), None), (b"b".to_vec(), Some(b"2".to_vec()))],
        )
        .await
        .expect("meta");
    leader.delete_topic("gone").await.expect("delete");
    create(leader, "gone", 1).await;
    append_one(leader, "gone", "the third gone").await;
}

/// A cut written out in full as a snapshot file, while the log goes on.
async fn expand(log: &Log, cut: &std::path::Path, to: &std::path::Path) -> u64 {
    let (log, cut, to) = (log.clone(), cut.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        log.snapshot_expand(
            std::fs::File::open(cut).expect("cut"),
            std::io::BufWriter::new(std::fs::File::create(to).expect("create")),
        )
    })
    .await
    .expect("join")
    .expect("expand")
}

/// A node that installs a snapshot of another, then applies the entries
/// after its cut, holds what the other holds, and keeps it through a
/// restart; whatever it held before is gone. The records are copied after
/// the cut while writes go on (a topic is even deleted and created again
/// in between), so the copy must stop at the cut's ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_a_snapshot_then_the_later_entries_equals_the_leader() {
    let store = MemStore::new();
    let leader = mem_log(&store, config());
    let journal = cluster(vec![leader.clone()]);
    workload(&leader).await;
    // Every write was answered, so every op was applied: a quiet point.
    let cut_at = applied_index(&leader);
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("one.snap");
    let cut = leader.snapshot_cut(&file, b"header").expect("cut");
    let gone_ends: Vec<u64> = (0..2)
        .map(|p| leader.offsets("gone", p).expect("gone").1)
        .collect();
    let cut_bytes = tokio::task::spawn_blocking(move || cut.finish())
        .await
        .expect("join")
        .expect("finish");
    assert_eq!(
        tributary_storage::snapshot_header(&file).expect("header"),
        b"header"
    );
    // The records are not in the cut: it is refused as a snapshot.
    let refused = mem_log(&MemStore::new(), config());
    let e = refused.restore(&file).await.expect_err("a cut");
    assert!(e.to_string().contains("a cut"), "{e}");
    after_the_cut(&leader).await;
    let whole = files.path().join("whole.snap");
    let bytes = expand(&leader, &file, &whole).await;
    assert!(bytes > cut_bytes + 1000, "{cut_bytes} bytes, {bytes} whole");
    assert_eq!(
        tributary_storage::snapshot_header(&whole).expect("header"),
        b"header"
    );
    let file = whole;

    let dir = tempfile::tempdir().expect("tempdir");
    let node = sled_log(dir.path(), config());
    create(&node, "junk", 2).await;
    append_one(&node, "junk", "must go").await;
    node.put_meta("app", vec![(b"z".to_vec(), Some(b"old".to_vec()))])
        .await
        .expect("meta");
    assert_eq!(node.restore(&file).await.expect("restore"), b"header");
    assert_eq!(applied_index(&node), cut_at, "the cut's pointer came along");
    assert!(node.topic("junk").is_err(), "what the node held is gone");
    for (p, end) in gone_ends.iter().enumerate() {
        assert_eq!(
            node.offsets("gone", p as u32).expect("gone").1,
            *end,
            "a partition deleted after the cut still ends where the cut saw it"
        );
    }
    let later: Vec<(u64, Op)> = journal
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i > cut_at)
        .cloned()
        .collect();
    assert!(later.len() > 10, "{} entries after the cut", later.len());
    for outcome in apply_recorded(&node, later).await {
        if let Err(e) = outcome {
            assert!(matches!(e, Error::Closed), "{e}");
        }
    }
    let expected = state(&leader);
    if let Some(d) = difference(&state(&node), &expected) {
        panic!("the restored node differs from the leader: {d}");
    }
    assert_eq!(
        node.meta("app").expect("meta"),
        vec![(b"b".to_vec(), b"2".to_vec())]
    );
    // Appending goes on at the same offsets.
    let next = node.offsets("t", 0).expect("t").1;
    assert_eq!(next, leader.offsets("t", 0).expect("t").1);
    drop(node);
    let node = sled_log(dir.path(), config());
    if let Some(d) = difference(&state(&node), &expected) {
        panic!("the restored node differs after a restart: {d}");
    }
    assert!(node.topic("junk").is_err());
}

/// A damaged or truncated snapshot is refused before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_changes_nothing() {
    let leader = mem_log(&MemStore::new(), config());
    create(&leader, "t", 2).await;
    for i in 0..50 {
        append_one(&leader, "t", format!("event {i}")).await;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("s.snap");
    let cut_file = files.path().join("s.cut");
    let cut = leader.snapshot_cut(&cut_file, b"h").expect("cut");
    tokio::task::spawn_blocking(move || cut.finish())
        .await
        .expect("join")
        .expect("finish");
    expand(&leader, &cut_file, &file).await;
    let whole = std::fs::read(&file).expect("read");
    let node = mem_log(&MemStore::new(), config());
    create(&node, "mine", 1).await;
    append_one(&node, "mine", "kept").await;
    let flipped = {
        let mut b = whole.clone();
        let at = b.len() / 2;
        b[at] ^= 0x40;
        b
    };
    for (what, bytes) in [
        ("a flipped byte", flipped),
        ("cut short", whole[..whole.len() - 9].to_vec()),
        ("no end", whole[..whole.len() / 3].to_vec()),
        ("not a snapshot", b"garbage, not a snapshot at all".to_vec()),
    ] {
        std::fs::write(&file, &bytes).expect("write");
        let e = node.restore(&file).await.expect_err(what);
        assert!(e.to_string().contains("snapshot file"), "{what}: {e}");
        assert_eq!(read_all(&node, "mine", 0).len(), 1, "{what}: unchanged");
        assert!(node.topic("t").is_err(), "{what}");
    }
    std::fs::write(&file, &whole).expect("write");
    node.restore(&file).await.expect("the whole file restores");
    assert_eq!(
        read_all(&node, "t", 0).len(),
        read_all(&leader, "t", 0).len()
    );
    assert!(node.topic("mine").is_err());
}
