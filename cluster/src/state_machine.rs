//! The state machine is the node's log: committed entries are applied with
//! [`Log::apply_all`], in order, in groups that end at each topic change
//! or deletion of records ([`tributary_storage::Op::ends_group`]);
//! after each group the last applied log id and the membership are stored
//! in the log's metadata (space `cluster`), through the same committer, so
//! a restarted node goes on after them. What a crash left applied past that
//! point is recognized by the log's marks and not written twice (see the
//! storage crate's `replica` module).
//!
//! ## Snapshots
//! A snapshot is the whole log at one applied index. What a node keeps of
//! it (`snapshots/current.snap` in its data directory) is a cut: the
//! tables and each partition's end, made on the state machine's task
//! between two applies, which refers to the log's records instead of
//! copying them (the storage crate's `snapshot` module has the format).
//! One is taken once the entries applied since the last weigh
//! `cluster.snapshot_min_bytes`, or half the log's stored bytes if that is
//! more. Once it is durable, openraft drops the Raft log before it (less
//! `cluster.snapshot_keep` entries). A follower that needs entries no
//! longer kept is sent the cut written out in full with the records the
//! log holds below its ends, streamed as it is written out, never stored
//! on the leader ([`crate::snapshot_data`]). It receives the
//! file in chunks (`received.snap`), renames it `install.snap`, and
//! restores its log from it; then it cuts what it now holds as its own
//! `current.snap` and removes the file. A node that stops in the middle of
//! a restore finds `install.snap` when it starts and restores it again
//! ([`finish_install`]) before it does anything else.

use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
};
use tokio::sync::{watch, Mutex, OwnedMutexGuard};
use tributary_storage::{Applied, Cut, Error, Log, Op};

use crate::snapshot_data::{Expand, SnapshotData};
use crate::types::{NodeId, Request, Response, StorageError, TypeConfig};

/// Metadata space of the cluster's applied state.
pub const SPACE: &str = "cluster";
const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";

struct Applying {
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// The node's log as the Raft group's state machine.
#[derive(Clone)]
pub struct StateMachine {
    log: Log,
    state: Arc<Mutex<Applying>>,
    applied_index: Arc<watch::Sender<u64>>,
    snapshots: Arc<Snapshots>,
    /// What the entries applied since the last snapshot weigh.
    unsnapshotted: Arc<AtomicU64>,
}

/// The node's snapshot files.
struct Snapshots {
    dir: PathBuf,
    /// Held while a snapshot is taken or installed: one at a time.
    busy: Arc<Mutex<()>>,
    /// Numbers the snapshots taken here.
    taken: AtomicU64,
}

const CURRENT: &str = "current.snap";
const RECEIVED: &str = "received.snap";
const INSTALL: &str = "install.snap";

fn snapshot_err(
    meta: Option<&SnapshotMeta<NodeId, BasicNode>>,
    verb: ErrorVerb,
    e: &dyn std::fmt::Display,
) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(meta.map(SnapshotMeta::signature)),
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Restores the log from `snapshots/install.snap` if a restore was under
/// way when the node stopped (see the module's docs).
pub async fn finish_install(log: &Log, dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    // Left by a stop in the middle of taking or receiving one (`sending-`:
    // by an earlier version, which wrote a snapshot out to send it).
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("taking-") || name.starts_with("sending-") || name == RECEIVED {
            std::fs::remove_file(dir.join(&*name))?;
        }
    }
    let install = dir.join(INSTALL);
    if !install.exists() {
        return Ok(());
    }
    tracing::warn!("cluster: a snapshot's restore was cut short; restoring it again");
    let header = log.restore(&install).await?;
    settle(log, dir, &header).await
}

/// After a restore from `install.snap`: a cut of what the log now holds
/// becomes `current.snap` (it refers to the records the file brought), and
/// the file goes. A stop before the end restores the file again.
async fn settle(log: &Log, dir: &Path, header: &[u8]) -> Result<(), Error> {
    let taking = dir.join("taking-installed.snap");
    let cut = log.snapshot_cut(&taking, header)?;
    tokio::task::spawn_blocking(move || cut.finish())
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
    // The new cut is durable under its name before the file it was made
    // from goes: a stop in between restores the file again.
    std::fs::rename(&taking, dir.join(CURRENT))?;
    sync_dir(dir)?;
    std::fs::remove_file(dir.join(INSTALL))?;
    sync_dir(dir)?;
    Ok(())
}

fn read_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::read_state_machine(e).into()
}

impl StateMachine {
    /// The state machine over `log`, where it left off; its snapshots in
    /// `dir`.
    pub fn open(log: Log, dir: &Path) -> Result<StateMachine, StorageError> {
        let get = |key: &[u8]| log.meta_get(SPACE, key).map_err(|e| read_err(&e));
        let applied: Option<LogId<NodeId>> = match get(APPLIED)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| read_err(&e))?,
            None => None,
        };
        let membership = match get(MEMBERSHIP)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| read_err(&e))?,
            None => StoredMembership::default(),
        };
        let index = applied.map_or(0, |l| l.index);
        Ok(StateMachine {
            log,
            state: Arc::new(Mutex::new(Applying {
                applied,
                membership,
            })),
            applied_index: Arc::new(watch::Sender::new(index)),
            snapshots: Arc::new(Snapshots {
                dir: dir.to_owned(),
                busy: Arc::new(Mutex::new(())),
                taken: AtomicU64::new(0),
            }),
            unsnapshotted: Arc::default(),
        })
    }

    /// What the entries applied since the last snapshot weigh (bytes,
    /// [`Op::weight`]), as it grows.
    pub fn unsnapshotted(&self) -> Arc<AtomicU64> {
        self.unsnapshotted.clone()
    }

    /// `current.snap`, opened: its metadata is read from the file itself,
    /// which stays open (a snapshot taken since replaces the name only).
    fn open_current(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let err = |e: &dyn std::fmt::Display| snapshot_err(None, ErrorVerb::Read, e);
        let mut cut = match std::fs::File::open(self.snapshots.dir.join(CURRENT)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(&e)),
        };
        let header =
            tributary_storage::read_snapshot_header(BufReader::new(&cut)).map_err(|e| err(&e))?;
        let meta: SnapshotMeta<NodeId, BasicNode> =
            postcard::from_bytes(&header).map_err(|e| err(&e))?;
        cut.seek(SeekFrom::Start(0)).map_err(|e| err(&e))?;
        let expand = Expand {
            log: self.log.clone(),
            cut,
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::cut(expand)),
        }))
    }

    /// The index of the last entry applied here, as it moves.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.subscribe()
    }

    /// Applies a group of ops; a failure of the disk stops the node (its
    /// copy would differ from the others' otherwise).
    async fn apply_group(
        &self,
        group: Vec<(u64, Op)>,
        last: LogId<NodeId>,
    ) -> Result<Vec<Result<Applied, Error>>, StorageError> {
        let outcomes = self.log.apply_all(group).await;
        for o in &outcomes {
            if let Err(
                e @ (Error::Unwritable(_)
                | Error::Io(_)
                | Error::Engine(_)
                | Error::DiskFull { .. }),
            ) = o
            {
                return Err(StorageIOError::apply(last, AnyError::error(e.to_string())).into());
            }
        }
        Ok(outcomes)
    }

    /// The op that records `state` as applied, in the log's metadata.
    fn pointer(&self, state: &Applying) -> Result<Op, StorageError> {
        let write_err = |e: &dyn std::fmt::Display| -> StorageError {
            StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
        };
        let applied = postcard::to_allocvec(&state.applied).map_err(|e| write_err(&e))?;
        let membership = postcard::to_allocvec(&state.membership).map_err(|e| write_err(&e))?;
        Ok(Op::Meta {
            space: SPACE.into(),
            entries: vec![
                (APPLIED.to_vec(), Some(applied)),
                (MEMBERSHIP.to_vec(), Some(membership)),
            ],
        })
    }

    /// Records `state` as applied, in the log's metadata.
    async fn record(&self, state: &Applying) -> Result<(), StorageError> {
        let write_err = |e: &dyn std::fmt::Display| -> StorageError {
            StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
        };
        let op = self.pointer(state)?;
        let index = state.applied.map_or(0, |l| l.index);
        match self.log.apply_all(vec![(index, op)]).await.pop() {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(write_err(&e)),
            None => Err(write_err(&Error::Closed)),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let s = self.state.lock().await;
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let started = std::time::Instant::now();
        let mut s = self.state.lock().await;
        let mut out: Vec<Response> = Vec::new();
        let mut group: Vec<(u64, Op)> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        let mut weight = 0usize;
        for entry in entries {
            let log_id = entry.log_id;
            weight += match &entry.payload {
                EntryPayload::Normal(Request(op)) => op.weight(),
                _ => 64,
            };
            match entry.payload {
                EntryPayload::Blank => out.push(Response(Ok(Applied::Done))),
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(log_id), m);
                    out.push(Response(Ok(Applied::Done)));
                }
                EntryPayload::Normal(Request(op)) => {
                    let change = op.ends_group();
                    group.push((log_id.index, op));
                    slots.push(out.len());
                    out.push(Response(Err(Error::Closed)));
                    if change {
                        // Applied, then recorded, before anything after it.
                        let outcomes = self.apply_group(std::mem::take(&mut group), log_id).await?;
                        for (slot, o) in slots.drain(..).zip(outcomes) {
                            out[slot] = Response(o);
                        }
                        s.applied = Some(log_id);
                        self.record(&s).await?;
                    }
                }
            }
            s.applied = Some(log_id);
        }
        if let Some(last) = s.applied {
            // The pointer goes last in the same call: the committer writes
            // it in the group's cycle, after the group's effects.
            group.push((last.index, self.pointer(&s)?));
            let mut outcomes = self.apply_group(group, last).await?;
            match outcomes.pop() {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(
                        StorageIOError::write_state_machine(AnyError::error(e.to_string())).into(),
                    )
                }
                None => {
                    return Err(
                        StorageIOError::write_state_machine(AnyError::error("no answer")).into(),
                    )
                }
            }
            for (slot, o) in slots.drain(..).zip(outcomes) {
                out[slot] = Response(o);
            }
            self.applied_index.send_replace(last.index);
        }
        self.unsnapshotted
            .fetch_add(weight as u64, Ordering::Relaxed);
        tracing::debug!(entries = out.len(), took = ?started.elapsed(), "cluster: applied");
        Ok(out)
    }

    /// The cut is made here, between two applies (see the module's docs).
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let busy = self.snapshots.busy.clone().lock_owned().await;
        let s = self.state.lock().await;
        self.unsnapshotted.store(0, Ordering::Relaxed);
        let n = self.snapshots.taken.fetch_add(1, Ordering::SeqCst);
        let meta = SnapshotMeta {
            last_log_id: s.applied,
            last_membership: s.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{n}",
                s.applied.map_or(0, |l| l.leader_id.term),
                s.applied.map_or(0, |l| l.index)
            ),
        };
        let path = self.snapshots.dir.join(format!("taking-{n}.snap"));
        // Under the state's lock, as every apply is: the cut is the state
        // after `meta`'s index.
        let cut = postcard::to_allocvec(&meta)
            .map_err(|e| e.to_string())
            .and_then(|header| {
                self.log
                    .snapshot_cut(&path, &header)
                    .map_err(|e| e.to_string())
            });
        drop(s);
        Builder {
            machine: self.clone(),
            meta,
            path,
            cut: Some(cut),
            _busy: busy,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let file = tokio::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(self.snapshots.dir.join(RECEIVED))
            .await
            .map_err(|e| snapshot_err(None, ErrorVerb::Write, &e))?;
        Ok(Box::new(SnapshotData::file(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let err = |verb, e: &dyn std::fmt::Display| snapshot_err(Some(meta), verb, e);
        let file = snapshot
            .into_file()
            .map_err(|e| err(ErrorVerb::Write, &e))?;
        file.sync_all()
            .await
            .map_err(|e| err(ErrorVerb::Write, &e))?;
        drop(file);
        let _busy = self.snapshots.busy.lock().await;
        let mut s = self.state.lock().await;
        let dir = &self.snapshots.dir;
        let install = dir.join(INSTALL);
        std::fs::rename(dir.join(RECEIVED), &install)
            .and_then(|()| sync_dir(dir))
            .map_err(|e| err(ErrorVerb::Write, &e))?;
        let started = std::time::Instant::now();
        let header = self
            .log
            .restore(&install)
            .await
            .map_err(|e| err(ErrorVerb::Write, &e))?;
        settle(&self.log, dir, &header)
            .await
            .map_err(|e| err(ErrorVerb::Write, &e))?;
        s.applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        self.unsnapshotted.store(0, Ordering::Relaxed);
        self.applied_index
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        tracing::info!(
            snapshot = %meta.snapshot_id,
            took = ?started.elapsed(),
            "cluster: installed a snapshot"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.open_current()
    }
}

/// A snapshot being taken: the cut is made, made durable by
/// [`RaftSnapshotBuilder::build_snapshot`].
pub struct Builder {
    machine: StateMachine,
    meta: SnapshotMeta<NodeId, BasicNode>,
    path: PathBuf,
    cut: Option<Result<Cut, String>>,
    _busy: OwnedMutexGuard<()>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let meta = self.meta.clone();
        let err = |e: &dyn std::fmt::Display| snapshot_err(Some(&meta), ErrorVerb::Write, e);
        let cut = match self.cut.take() {
            Some(Ok(cut)) => cut,
            Some(Err(e)) => return Err(err(&e)),
            None => return Err(err(&"built already")),
        };
        let started = std::time::Instant::now();
        let bytes = tokio::task::spawn_blocking(move || cut.finish())
            .await
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e))?;
        let dir = &self.machine.snapshots.dir;
        std::fs::rename(&self.path, dir.join(CURRENT))
            .and_then(|()| sync_dir(dir))
            .map_err(|e| err(&e))?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            took = ?started.elapsed(),
            "cluster: took a snapshot"
        );
        match self.machine.open_current()? {
            Some(s) => Ok(s),
            None => Err(err(&"no snapshot after taking one")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tributary_storage::{AppendRecord, Event, LogConfig, MemStore, TopicConfig};

    fn log() -> Log {
        Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log")
    }

    /// A node stopped while restoring a snapshot (`install.snap` is there)
    /// restores it again when it starts, and removes what a stop left of
    /// snapshots being taken or received.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_cut_short_is_done_again_at_the_next_start() {
        let source = log();
        source
            .create_topic(TopicConfig::new("t", 2))
            .await
            .expect("create");
        for i in 0..20 {
            let event = Event::new(format!("e{i}"));
            source
                .append(
                    "t",
                    vec![AppendRecord {
                        partition: None,
                        event,
                    }],
                )
                .await
                .expect("append");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let snaps = dir.path().join("snapshots");
        std::fs::create_dir_all(&snaps).expect("dir");
        let cut_file = dir.path().join("cut");
        let cut = source.snapshot_cut(&cut_file, b"meta").expect("cut");
        let whole = std::fs::File::create(snaps.join(INSTALL)).expect("create");
        let leader = source.clone();
        tokio::task::spawn_blocking(move || {
            cut.finish()?;
            leader.snapshot_expand(std::fs::File::open(cut_file)?, whole)
        })
        .await
        .expect("join")
        .expect("write out");
        std::fs::write(snaps.join("taking-3.snap"), b"half").expect("write");
        std::fs::write(snaps.join(RECEIVED), b"half").expect("write");
        let node = log();
        node.create_topic(TopicConfig::new("mine", 1))
            .await
            .expect("create");
        finish_install(&node, &snaps).await.expect("finish");
        assert!(node.topic("mine").is_err(), "the node's own topic is gone");
        for p in 0..2 {
            assert_eq!(
                node.offsets("t", p).expect("t"),
                source.offsets("t", p).expect("t")
            );
        }
        let files: Vec<String> = std::fs::read_dir(&snaps)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [CURRENT]);
        // The node's own cut of what it restored, under the same header.
        let current = snaps.join(CURRENT);
        assert_eq!(
            tributary_storage::snapshot_header(&current).expect("header"),
            b"meta"
        );
        let e = log().restore(&current).await.expect_err("a cut");
        assert!(e.to_string().contains("a cut"), "{e}");
        // Nothing left to do at the start after.
        finish_install(&node, &snaps).await.expect("again");
        assert!(node.topic("t").is_ok());
    }
}
