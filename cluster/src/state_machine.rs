//! The state machine is the node's log: committed entries are applied with
//! [`Log::apply_all`], in order, in groups that end at each topic change;
//! after each group the last applied log id and the membership are stored
//! in the log's metadata (space `cluster`), through the same committer, so
//! a restarted node goes on after them. What a crash left applied past that
//! point is recognized by the log's marks and not written twice (see the
//! storage crate's `replica` module).
//!
//! Snapshots are not built yet: the Raft log is never purged, so a node
//! far behind, or one whose data was wiped, catches up from the log itself.

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use tokio::sync::{watch, Mutex};
use tributary_storage::{Applied, Error, Log, Op};

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
}

fn read_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::read_state_machine(e).into()
}

impl StateMachine {
    /// The state machine over `log`, where it left off.
    pub fn open(log: Log) -> Result<StateMachine, StorageError> {
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
        })
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
    type SnapshotBuilder = Self;

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
        for entry in entries {
            let log_id = entry.log_id;
            match entry.payload {
                EntryPayload::Blank => out.push(Response(Ok(Applied::Done))),
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(log_id), m);
                    out.push(Response(Ok(Applied::Done)));
                }
                EntryPayload::Normal(Request(op)) => {
                    let change = op.is_topic_change();
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
        tracing::debug!(entries = out.len(), took = ?started.elapsed(), "cluster: applied");
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<std::io::Cursor<Vec<u8>>>, StorageError> {
        Err(no_snapshots())
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        _snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        Err(no_snapshots())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(None)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        Err(no_snapshots())
    }
}

fn no_snapshots() -> StorageError {
    StorageIOError::read_snapshot(
        None,
        AnyError::error("snapshots are not built: the Raft log is kept whole"),
    )
    .into()
}
