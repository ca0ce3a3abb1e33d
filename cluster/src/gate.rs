//! Votes from a node that lost its log.
//!
//! A node whose Raft log was wiped (or replaced by a new disk) and that is
//! started again under the same id has forgotten entries it once helped
//! commit. Were it to vote at once, a candidate missing those entries
//! could win with its vote while the node that holds them is down: an
//! acknowledged write lost to a minority of failures (openraft's FAQ shows
//! the case). So a node that starts with an empty Raft log keeps its vote
//! to itself until it holds everything the leader had committed when it
//! first heard from it:
//!
//! - the first entries it receives tell it the leader's commit index; it
//!   stores that as its catch-up target (durably: a crash while catching up
//!   does not reopen the gate early);
//! - it answers no vote request from a candidate with history (a last log
//!   index above the initial membership entry) until its log reaches the
//!   target; then it clears the target and votes as any node;
//! - a node elected leader holds every committed entry (the voters found
//!   its log up to date), so its gate opens too.
//!
//! Nodes of a new cluster start empty too: they vote for candidates that
//! hold only the initial membership, so the cluster forms, and the first
//! entries they receive open their gate. While a node's gate is closed it
//! also does not serve clients ([`crate::Cluster::ready`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use openraft::raft::VoteRequest;

use crate::log_store::LogStore;
use crate::types::{NodeId, StorageError};

/// The vote gate of one node.
pub struct Gate {
    store: LogStore,
    closed: AtomicBool,
    target: Mutex<Option<u64>>,
    opened: tokio::sync::Notify,
}

impl Gate {
    /// Closed if the Raft log is empty or a catch-up target is stored.
    pub fn new(store: &LogStore) -> Result<Gate, StorageError> {
        let target = store.catch_up()?;
        let closed = target.is_some() || store.is_blank()?;
        Ok(Gate {
            store: store.clone(),
            closed: AtomicBool::new(closed),
            target: Mutex::new(target),
            opened: tokio::sync::Notify::new(),
        })
    }

    /// Whether it may answer `req`.
    pub fn may_vote(&self, req: &VoteRequest<NodeId>) -> bool {
        !self.closed.load(Ordering::SeqCst) || req.last_log_id.is_none_or(|l| l.index == 0)
    }

    /// Whether the node holds what it must.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    /// Waits until it is open.
    pub async fn wait_open(&self) {
        loop {
            let notified = self.opened.notified();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }

    /// This node was elected: the others found its log up to date, so it
    /// holds every committed entry.
    pub async fn elected(&self) -> Result<(), StorageError> {
        if self.is_open() {
            return Ok(());
        }
        self.store.set_catch_up(None).await?;
        self.open_now();
        Ok(())
    }

    fn open_now(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Entries arrived from a leader whose commit index is `leader_commit`;
    /// the node's log now ends at `last_log_index`.
    pub async fn heard(
        &self,
        leader_commit: Option<u64>,
        last_log_index: Option<u64>,
    ) -> Result<(), StorageError> {
        if self.is_open() {
            return Ok(());
        }
        let known = *lock(&self.target);
        let target = match known {
            Some(t) => t,
            None => {
                let t = leader_commit.unwrap_or(0);
                self.store.set_catch_up(Some(t)).await?;
                *lock(&self.target) = Some(t);
                tracing::info!(
                    target = t,
                    "cluster: this node starts with an empty log; it votes once it holds index {t}"
                );
                t
            }
        };
        if last_log_index.is_some_and(|l| l >= target) {
            self.store.set_catch_up(None).await?;
            self.open_now();
            tracing::info!(target, "cluster: caught up; this node votes again");
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
