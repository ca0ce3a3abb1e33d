//! The core cluster: nodes of the same binary holding the same log, as one
//! Raft group (openraft 0.9) whose entries are the log's writes.
//!
//! - **One write path.** The node's [`Log`] hands every write (an append of
//!   any front end, a marker, an offset commit, metadata, a topic change) to
//!   the cluster as an [`Op`] ([`Log::replicate_with`]). The leader proposes
//!   it; a follower forwards it to the leader (pipelined, in order). It is
//!   acknowledged once a majority of voters hold it on disk and the node
//!   that took it applied it: offsets come from the one order of the Raft
//!   log, the same on every node.
//! - **Every node applies every entry** to its own log in that order
//!   ([`state_machine`]); reads on any node see only applied, so committed,
//!   records, identical at the same offsets everywhere.
//! - **Forming.** Nodes started with the same `peers` initialize the group
//!   with those voters themselves (openraft allows the same initial
//!   membership on every node); a node already initialized ignores it.
//! - **Leadership** is told to the log ([`Replicator::leadership`]): what
//!   must run in one place (Kafka's group and transaction coordinators)
//!   runs on the leader and follows it.

#![warn(missing_docs)]
// openraft's storage traits return its `StorageError` (over 200 bytes); the
// helpers that build one return it too.
#![allow(clippy::result_large_err)]

pub mod gate;
pub mod log_store;
pub mod merge;
pub mod network;
pub mod snapshot_data;
pub mod state_machine;
pub mod types;
pub mod wal;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, ServerState};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tributary_storage::{Applied, Error, Leadership, Log, Op, Pending, Replicator};

use merge::Merged;
use network::{unavailable, Forwarder, Submit};
use types::{NodeId, Raft, Request};

/// A cluster node's settings (`[cluster]`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id (≥ 1), one of `peers`.
    pub node_id: NodeId,
    /// Where this node listens for the others (`host:port`).
    pub listen: String,
    /// Every voter, this node included: id → `host:port` of its `listen`.
    pub peers: BTreeMap<NodeId, String>,
    /// The leader's heartbeat period.
    pub heartbeat: Duration,
    /// A follower that heard no leader for 1.5 times this (the leader's
    /// lease), plus this to 1.5 times it again, starts an election.
    pub election_timeout: Duration,
    /// A write not acknowledged by a majority within this long fails (its
    /// outcome is then unknown, as for any timed-out write).
    pub write_timeout: Duration,
    /// This node joins a running cluster: it does not form one with its
    /// peers, and waits until a voter adds it ([`Cluster::change`]).
    pub join: bool,
    /// Mutual TLS between nodes, if on.
    pub tls: Option<network::NodeTls>,
    /// A snapshot is taken once the entries applied since the last one
    /// weigh this many bytes ([`Op::weight`]), or half the log's stored
    /// bytes if that is more.
    pub snapshot_min_bytes: u64,
    /// Entries kept in the Raft log before the last snapshot.
    pub snapshot_keep: u64,
}

/// A change of the voters, asked of any node and made by the leader.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub enum MembershipChange {
    /// Node `id`, reached at `address` (its node-to-node port), joins: it
    /// is replicated to as a learner until it has caught up, then made a
    /// voter.
    Add {
        /// Its id.
        id: NodeId,
        /// Its node-to-node address.
        address: String,
    },
    /// Node `id` stops being a voter and leaves the cluster (stop it
    /// afterwards).
    Remove {
        /// Its id.
        id: NodeId,
    },
}

/// Why a cluster node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A setting is wrong.
    #[error("cluster config: {0}")]
    Config(String),
    /// The Raft log's files.
    #[error("cluster storage: {0}")]
    Storage(String),
    /// The node-to-node port.
    #[error("cluster listen on {0}: {1}")]
    Listen(String, std::io::Error),
}

/// A write waiting for the proposer.
struct Proposal {
    op: Op,
    answer: oneshot::Sender<Result<(Applied, u64), Error>>,
}

/// A running cluster node.
pub struct Cluster {
    id: NodeId,
    raft: Raft,
    config: ClusterConfig,
    queue: mpsc::Sender<Proposal>,
    applied: watch::Receiver<u64>,
    forwarder: Mutex<Option<(NodeId, Arc<Forwarder>)>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    leader_changes: std::sync::atomic::AtomicU64,
    /// Entries this node's proposer handed over, and the writes in them.
    proposed: [std::sync::atomic::AtomicU64; 2],
    gate: Arc<gate::Gate>,
    /// Who leads, as this node knows it ([`Replicator::leadership`]).
    leadership: watch::Receiver<Leadership>,
    /// From a write handed to the cluster to its acknowledgement (a
    /// majority has it on disk and the node that took it applied it).
    write_latency: tributary_telemetry::Histogram,
}

/// One node as the cluster status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Its id.
    pub id: NodeId,
    /// `leader`, `follower` (as far as this node knows).
    pub role: &'static str,
    /// Its node-to-node address.
    pub address: String,
    /// On the leader: the last index it holds (`null` elsewhere).
    pub match_index: Option<u64>,
    /// On the leader: entries it is behind the leader's log.
    pub lag: Option<u64>,
}

/// What `GET /v1/cluster` answers.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: NodeId,
    /// Its role now: `leader`, `follower`, `candidate`, `learner`.
    pub role: &'static str,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Its last log index.
    pub last_log_index: Option<u64>,
    /// The last index applied to its log.
    pub applied_index: Option<u64>,
    /// The last index of its latest snapshot (taken or installed).
    pub snapshot_index: Option<u64>,
    /// Its Raft log holds no entry up to this index (they are in the
    /// snapshot).
    pub purged_index: Option<u64>,
    /// Times this node saw the leader change since it started.
    pub leader_changes: u64,
    /// Entries this node proposed (or forwarded) since it started.
    pub proposed_entries: u64,
    /// Writes in them: more than entries where writes were merged.
    pub proposed_writes: u64,
    /// Every voter.
    pub nodes: Vec<NodeStatus>,
}

fn role(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Cluster {
    /// Starts this node: opens the Raft log in `dir`, applies what is
    /// committed to `log`, joins the others, and from then on takes `log`'s
    /// writes.
    pub async fn start(
        config: ClusterConfig,
        log: Log,
        dir: &Path,
    ) -> Result<Arc<Cluster>, ClusterError> {
        if !config.peers.contains_key(&config.node_id) {
            return Err(ClusterError::Config(format!(
                "`cluster.node_id` {} is not in `cluster.peers`",
                config.node_id
            )));
        }
        let heartbeat = config.heartbeat.as_millis() as u64;
        let election = config.election_timeout.as_millis() as u64;
        let raft_config = Config {
            cluster_name: "tributary".into(),
            heartbeat_interval: heartbeat,
            // openraft makes the leader's lease (how long a follower that
            // heard from it refuses to vote) the longest election timeout,
            // and a follower waits lease + timeout before it stands: a
            // narrow spread keeps failover short (the most up-to-date
            // follower still goes first: one with a shorter log waits more).
            election_timeout_min: election,
            election_timeout_max: election + election / 2,
            // Taken by `take_snapshots`, by bytes rather than entries.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: config.snapshot_keep,
            // Sending a chunk, and installing the last: a restore copies
            // the whole log.
            install_snapshot_timeout: 120_000,
            snapshot_max_chunk_size: 1 << 20,
            max_payload_entries: 256,
            ..Config::default()
        }
        .validate()
        .map_err(|e| ClusterError::Config(e.to_string()))?;
        let store = log_store::LogStore::open(&dir.join("raft"))
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let gate =
            Arc::new(gate::Gate::new(&store).map_err(|e| ClusterError::Storage(e.to_string()))?);
        let snapshots = dir.join("snapshots");
        state_machine::finish_install(&log, &snapshots)
            .await
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let sm = state_machine::StateMachine::open(log.clone(), &snapshots)
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let applied = sm.applied_index();
        let unsnapshotted = sm.unsnapshotted();
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network::Network {
                peers: config.peers.clone(),
                tls: config.tls.clone(),
            },
            store,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| ClusterError::Listen(config.listen.clone(), e))?;
        let (queue, rx) = mpsc::channel(1024);
        let (leads, leadership) = watch::channel(Leadership {
            node: config.node_id,
            ..Leadership::default()
        });
        let cluster = Arc::new(Cluster {
            leadership,
            id: config.node_id,
            raft: raft.clone(),
            config: config.clone(),
            queue,
            applied,
            forwarder: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            leader_changes: std::sync::atomic::AtomicU64::new(0),
            proposed: Default::default(),
            gate: gate.clone(),
            write_latency: tributary_telemetry::Histogram::new(&tributary_storage::COMMIT_BUCKETS),
        });
        let tasks = vec![
            tokio::spawn(network::serve(
                listener,
                raft.clone(),
                cluster.clone(),
                gate,
                config.tls.clone(),
            )),
            tokio::spawn(propose(cluster.clone(), rx)),
            tokio::spawn(count_leader_changes(cluster.clone())),
            tokio::spawn(follow_leadership(
                raft.clone(),
                config.node_id,
                // Twice the longest election timeout: by then the others
                // may have elected another leader.
                (config.election_timeout.as_millis() as u64) * 3,
                leads,
            )),
            tokio::spawn(take_snapshots(
                cluster.clone(),
                log.clone(),
                unsnapshotted,
                config.snapshot_min_bytes,
            )),
        ];
        *lock(&cluster.tasks) = tasks;
        let members: BTreeMap<NodeId, BasicNode> = config
            .peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        if config.join {
            tracing::info!(
                node = config.node_id,
                "cluster: joining; waiting for a voter to add this node"
            );
        } else {
            match raft.initialize(members).await {
                Ok(()) => {
                    tracing::info!(node = config.node_id, "cluster: initialized with its peers")
                }
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(ClusterError::Config(e.to_string())),
            }
        }
        log.replicate_with(Arc::new(Replicating(cluster.clone())))
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        Ok(cluster)
    }

    /// Waits until a leader is known, has committed an entry of its term
    /// here, and this node has applied what it held then: a node serves
    /// nobody before it has caught up. A node that started with an empty
    /// Raft log first waits to hold what the leader had committed
    /// ([`gate`]).
    pub async fn ready(&self) {
        self.gate.wait_open().await;
        let mut metrics = self.raft.metrics();
        let mut target: Option<Option<u64>> = None;
        loop {
            {
                let m = metrics.borrow_and_update();
                let settled = m
                    .last_applied
                    .is_some_and(|l| l.leader_id.term == m.current_term);
                if m.current_leader.is_some() && settled {
                    // What it held when the leader was known (entries the
                    // leader drops meanwhile lower it).
                    let t = target.get_or_insert(m.last_log_index);
                    *t = (*t).min(m.last_log_index);
                    if m.last_applied.map(|l| l.index) >= *t {
                        return;
                    }
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Writes acknowledged on this node, by the time each took from being
    /// handed to the cluster to its acknowledgement.
    pub fn write_latency(&self) -> &tributary_telemetry::Histogram {
        &self.write_latency
    }

    /// The status as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index;
        let replication = m.replication.clone().unwrap_or_default();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let nodes = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| {
                let matched = replication.get(id).map(|l| l.map_or(0, |l| l.index + 1));
                let matched = if *id == self.id && m.state == ServerState::Leader {
                    last.map(|l| l + 1)
                } else {
                    matched
                };
                NodeStatus {
                    id: *id,
                    role: if Some(*id) == m.current_leader {
                        "leader"
                    } else if voters.contains(id) {
                        "follower"
                    } else {
                        "learner"
                    },
                    address: node.addr.clone(),
                    match_index: matched.map(|i| i.saturating_sub(1)),
                    lag: matched.zip(last).map(|(mi, l)| (l + 1).saturating_sub(mi)),
                }
            })
            .collect();
        ClusterStatus {
            node_id: self.id,
            role: role(m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: last,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            leader_changes: self
                .leader_changes
                .load(std::sync::atomic::Ordering::Relaxed),
            proposed_entries: self.proposed[0].load(std::sync::atomic::Ordering::Relaxed),
            proposed_writes: self.proposed[1].load(std::sync::atomic::Ordering::Relaxed),
            nodes,
        }
    }

    /// Stops the node's Raft and its tasks.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// The leader, waiting up to a few election timeouts for one.
    async fn leader(&self) -> Option<NodeId> {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + self.config.election_timeout * 4;
        loop {
            if let Some(l) = metrics.borrow_and_update().current_leader {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// The pipelined link to `leader`, connected when needed.
    async fn forwarder(&self, leader: NodeId) -> Result<Arc<Forwarder>, Error> {
        if let Some((id, fwd)) = lock(&self.forwarder).as_ref() {
            if *id == leader && !fwd.is_closed() {
                return Ok(fwd.clone());
            }
        }
        let addr = self
            .address_of(leader)
            .ok_or_else(|| unavailable(&format!("the leader {leader} is not among the peers")))?;
        let addr = &addr;
        let fwd = Forwarder::connect(
            addr,
            256,
            self.config.election_timeout,
            self.config.tls.as_ref(),
        )
        .await
        .map(Arc::new)
        .map_err(|e| unavailable(&format!("cannot reach the leader at {addr}: {e}")))?;
        *lock(&self.forwarder) = Some((leader, fwd.clone()));
        Ok(fwd)
    }

    /// Where node `id` is reached from here: this node's `peers`, else the
    /// address the membership gives (a node added later).
    fn address_of(&self, id: NodeId) -> Option<String> {
        self.config.peers.get(&id).cloned().or_else(|| {
            self.raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        })
    }

    /// Changes the voters (on any node: a follower asks the leader). An
    /// added node is first brought up to date as a learner. Resolves once
    /// the new membership is committed.
    pub async fn change(&self, change: MembershipChange) -> Result<(), String> {
        let leader = self
            .leader()
            .await
            .ok_or_else(|| "no leader is elected".to_owned())?;
        if leader == self.id {
            return self.change_here(change).await;
        }
        let addr = self
            .address_of(leader)
            .ok_or_else(|| format!("the leader {leader} is not among the peers"))?;
        let peer = network::Peer::new(addr, self.config.tls.clone());
        match peer
            .call(
                &network::Rpc::Membership(change),
                self.config.write_timeout * 6,
            )
            .await
        {
            Ok(network::Reply::Membership(r)) => r,
            Ok(_) => Err("the leader answered with another kind of message".into()),
            Err(e) => Err(format!("the leader {leader} did not answer: {e}")),
        }
    }

    async fn change_here(&self, change: MembershipChange) -> Result<(), String> {
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let wanted = match change {
            MembershipChange::Add { id, address } => {
                if voters.contains(&id) {
                    return Err(format!("node {id} is a voter already"));
                }
                tracing::info!(node = id, %address, "cluster: adding a node; it catches up as a learner first");
                self.raft
                    .add_learner(id, BasicNode::new(address), true)
                    .await
                    .map_err(|e| e.to_string())?;
                voters.iter().copied().chain([id]).collect::<BTreeSet<_>>()
            }
            MembershipChange::Remove { id } => {
                if !voters.contains(&id) {
                    return Err(format!("node {id} is not a voter"));
                }
                if voters.len() == 1 {
                    return Err("the last voter cannot be removed".into());
                }
                voters.iter().copied().filter(|v| *v != id).collect()
            }
        };
        self.raft
            .change_membership(wanted.clone(), false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(voters = ?wanted, "cluster: voters changed");
        Ok(())
    }

    /// Proposes `op` as the leader: resolves once handed to Raft, with what
    /// resolves once it is applied here.
    async fn propose_here(
        &self,
        op: Op,
    ) -> Result<oneshot::Receiver<Result<(Applied, u64), Error>>, Error> {
        let responder = self
            .raft
            .client_write_ff(Request(op))
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        let (answer, rx) = oneshot::channel();
        tokio::spawn(async move {
            let r = match responder.await {
                Ok(Ok(resp)) => resp.data.0.map(|a| (a, resp.log_id.index)),
                Ok(Err(ClientWriteError::ForwardToLeader(_))) => {
                    Err(unavailable("this node stopped being the leader"))
                }
                Ok(Err(e)) => Err(unavailable(&e.to_string())),
                Err(_) => Err(unavailable("the node is shutting down")),
            };
            let _ = answer.send(r);
        });
        Ok(rx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands each queued write, in order, to Raft (on the leader) or to the
/// leader (on a follower). While the leader cannot be reached (it is being
/// elected, or the one known is gone) the write waits here, up to the write
/// timeout, and the writes behind it wait too: none was sent, so none can
/// be doubled, and their order holds.
///
/// A write that could share an entry is handed over only while fewer than
/// [`merge::IN_FLIGHT`] such entries are unanswered; the writes that queue
/// meanwhile go in the next entry together ([`merge`]).
async fn propose(cluster: Arc<Cluster>, mut rx: mpsc::Receiver<Proposal>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(merge::IN_FLIGHT));
    let mut held: Option<Proposal> = None;
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Only a write that could share an entry waits for room: an entry
        // of its own (an edge's batch) gains nothing from waiting.
        let permit = if merge::mergeable(&first.op) {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            Some(permit)
        } else {
            None
        };
        let mut merged = Merged::new(first.op);
        let mut answers = vec![first.answer];
        while held.is_none() {
            let Ok(p) = rx.try_recv() else { break };
            match merged.absorb(p.op) {
                Ok(()) => answers.push(p.answer),
                Err(op) => {
                    held = Some(Proposal {
                        op,
                        answer: p.answer,
                    })
                }
            }
        }
        let (op, split) = merged.finish();
        cluster.proposed[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cluster.proposed[1].fetch_add(answers.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let queued = loop {
            match cluster.leader().await {
                Some(l) if l == cluster.id => break cluster.propose_here(op).await,
                Some(l) => match cluster.forwarder(l).await {
                    Ok(f) => break f.send(op).await,
                    Err(e) if started.elapsed() >= cluster.config.write_timeout => break Err(e),
                    Err(_) => tokio::time::sleep(cluster.config.heartbeat).await,
                },
                None => break Err(unavailable("no leader is elected")),
            }
        };
        let answer = move |r| {
            for (answer, r) in answers.into_iter().zip(split.split(r)) {
                let _ = answer.send(r);
            }
        };
        match queued {
            Ok(rx) => {
                // The room is given back when the entry is answered, once
                // nobody waits for it any more, or when a new term begins:
                // an entry a cut-off leader holds may never be answered,
                // and the writes behind it go to the new leader.
                let timeout = cluster.config.write_timeout;
                let mut leads = cluster.leadership.clone();
                let term = leads.borrow_and_update().term;
                tokio::spawn(async move {
                    let mut permit = permit;
                    let answered = tokio::time::timeout(timeout, rx);
                    tokio::pin!(answered);
                    let r = loop {
                        tokio::select! {
                            r = &mut answered => break r,
                            changed = leads.changed(), if permit.is_some() => {
                                if changed.is_err() || leads.borrow().term != term {
                                    permit = None;
                                }
                            }
                        }
                    };
                    drop(permit);
                    let r = match r {
                        Ok(r) => r.unwrap_or_else(|_| Err(unavailable("the write was dropped"))),
                        Err(_) => Err(unavailable("no majority acknowledged the write in time")),
                    };
                    answer(r);
                });
            }
            Err(e) => {
                drop(permit);
                answer(Err(e));
            }
        }
    }
}

/// Asks for a snapshot once the entries applied since the last one weigh
/// `min_bytes`, or half the log's stored bytes if that is more. A snapshot
/// is a cut (no records), so taking one costs little; what the rule keeps
/// is the Raft log within half the log (and `snapshot_keep` entries), and a
/// follower away for less than that catches up from entries rather than
/// from a whole snapshot.
async fn take_snapshots(
    cluster: Arc<Cluster>,
    log: Log,
    unsnapshotted: Arc<std::sync::atomic::AtomicU64>,
    min_bytes: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut short = false;
    loop {
        tick.tick().await;
        let stored = log.stored_bytes();
        if unsnapshotted.load(std::sync::atomic::Ordering::Relaxed) < min_bytes.max(stored / 2) {
            continue;
        }
        // A snapshot that fails to write stops the node's Raft (openraft
        // takes a storage error as fatal): take none without room for it.
        // A cut holds the tables: group positions, sessions, producers.
        let need = 64 << 20;
        if let Some(free) = log.free_disk_bytes().filter(|&free| free < need) {
            if !short {
                tracing::warn!(
                    free,
                    need,
                    "cluster: no room for a snapshot; the Raft log grows until there is"
                );
            }
            short = true;
            continue;
        }
        short = false;
        if cluster.raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}

async fn count_leader_changes(cluster: Arc<Cluster>) {
    let mut metrics = cluster.raft.metrics();
    let mut last = metrics.borrow().current_leader;
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow().current_leader;
        if now == Some(cluster.id) {
            if let Err(e) = cluster.gate.elected().await {
                tracing::error!(error = %e, "cluster: cannot record that this node caught up");
            }
        }
        if now != last && now.is_some() {
            cluster
                .leader_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(leader = ?now, term = metrics.borrow().current_term, "cluster: leader");
        }
        last = now;
    }
}

impl Submit for Cluster {
    async fn change_as_leader(&self, change: MembershipChange) -> Result<(), String> {
        if self.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err("this node is not the leader".into());
        }
        self.change_here(change).await
    }

    async fn submit_as_leader(&self, op: Op) -> Result<network::Applying, Error> {
        if self.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(unavailable("this node is not the leader"));
        }
        let rx = self.propose_here(op).await?;
        Ok(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(unavailable("the write was dropped")))
        }))
    }
}

/// The log's replicator: writes go to the proposer.
struct Replicating(Arc<Cluster>);

/// Keeps `leads` up to date with who leads, as `raft` knows it; a leader
/// whose last acknowledgement from a majority is older than `cut_off_ms`
/// is cut off (openraft reports the age at every tick).
async fn follow_leadership(
    raft: Raft,
    node: NodeId,
    cut_off_ms: u64,
    leads: watch::Sender<Leadership>,
) {
    let mut metrics = raft.metrics();
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            Leadership {
                node,
                // A leader counts once it leads here (a node that was
                // leader before a restart is named by its followers' old
                // metrics until they hear of the election).
                leader: m
                    .current_leader
                    .filter(|l| *l != node || m.state == ServerState::Leader),
                term: m.current_term,
                voters: m.membership_config.membership().voter_ids().collect(),
                cut_off: m.state == ServerState::Leader
                    && m.millis_since_quorum_ack.is_some_and(|ms| ms > cut_off_ms),
            }
        };
        leads.send_if_modified(|l| {
            let changed = *l != now;
            *l = now;
            changed
        });
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

impl Replicator for Replicating {
    fn submit(&self, op: Op) -> Pin<Box<dyn Future<Output = Result<Pending, Error>> + Send + '_>> {
        Box::pin(async move {
            network::check_size(&op)?;
            let started = std::time::Instant::now();
            let (answer, rx) = oneshot::channel();
            self.0
                .queue
                .send(Proposal { op, answer })
                .await
                .map_err(|_| unavailable("the node is shutting down"))?;
            let mut applied = self.0.applied.clone();
            let timeout = self.0.config.write_timeout;
            let cluster = self.0.clone();
            let pending: Pending = Box::pin(async move {
                let (outcome, index) = tokio::time::timeout(timeout, rx)
                    .await
                    .map_err(|_| unavailable("no majority acknowledged the write in time"))?
                    .unwrap_or_else(|_| Err(unavailable("the write was dropped")))?;
                // Readers on this node see it once it is applied here too.
                let _ = tokio::time::timeout(timeout, applied.wait_for(|i| *i >= index)).await;
                cluster.write_latency.observe(started.elapsed(), 1);
                Ok(outcome)
            });
            Ok(pending)
        })
    }

    fn leadership(&self) -> Option<watch::Receiver<Leadership>> {
        Some(self.0.leadership.clone())
    }
}
