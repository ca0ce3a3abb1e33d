//! Consumer groups: the node's one coordinator of group membership, the same
//! for every protocol that has groups (Kafka's classic group protocol today)
//! and read by the HTTP API, the CLI, `/metrics` and the dashboard.
//!
//! - Membership lives in memory (as in a Kafka coordinator between restarts):
//!   members join, the first to join leads, the leader assigns partitions
//!   with the client's own assignor (range, roundrobin, cooperative-sticky:
//!   the coordinator only carries the bytes), everyone gets its assignment,
//!   heartbeats keep sessions alive, and a member whose session ends is
//!   removed and the others rebalance. Static members (`group.instance.id`)
//!   come back after a restart of the client with their assignment and no
//!   rebalance. After a restart of the node, members find their ids unknown
//!   and rejoin: the group forms again from their committed offsets.
//! - Committed offsets are the log's (`Log::commit_offsets`), durable in the
//!   same commit cycle as appends: the HTTP API and Kafka read and write the
//!   same positions. A commit from a member is checked against the current
//!   generation first, so a member that was rebalanced away cannot move the
//!   new owner's position. On a cluster, the leader coordinates; for each
//!   term it leads, it first claims the groups in the log
//!   ([`CLAIM_SPACE`]/[`CLAIM_KEY`]) and makes its position writes under
//!   that claim, so a node that lost the lead and does not know it yet
//!   cannot move a position the new leader's members committed.
//! - Memory is bounded for the whole node: `max_members` members (and ids
//!   handed out but not used yet) across all groups, `max_state_bytes` of
//!   protocol metadata and assignments; a join past either is refused with
//!   [`GroupError::GroupMaxSizeReached`].

mod group;

pub use group::State;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tributary_storage::{validate_group, GroupOffset, Guard, Log};
use tributary_telemetry::{Kind, MetricsSource, Text};

use group::{Delta, Group, Timing};

/// Group coordinator settings (`[groups]`).
#[derive(Debug, Clone)]
pub struct GroupsConfig {
    /// An empty group's first rebalance waits this long for more members to
    /// join, so a group starting together gets one rebalance, not one per
    /// member (Kafka's `group.initial.rebalance.delay.ms`).
    pub initial_rebalance_delay: Duration,
    /// Shortest session timeout a member may ask for.
    pub min_session_timeout: Duration,
    /// Longest session timeout a member may ask for.
    pub max_session_timeout: Duration,
    /// Members across every group of the node.
    pub max_members: usize,
    /// Protocol metadata and assignment bytes across every group.
    pub max_state_bytes: usize,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            initial_rebalance_delay: Duration::from_secs(3),
            min_session_timeout: Duration::from_secs(6),
            max_session_timeout: Duration::from_secs(30 * 60),
            max_members: 10_000,
            max_state_bytes: 64 << 20,
        }
    }
}

/// Why a group operation was refused; each is one of Kafka's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The group name is empty, too long or has a NUL.
    #[error("invalid group id")]
    InvalidGroupId,
    /// The session timeout is outside the node's bounds.
    #[error("session timeout outside the node's bounds")]
    InvalidSessionTimeout,
    /// Protocol type or protocols do not match the group's.
    #[error("inconsistent group protocol")]
    InconsistentGroupProtocol,
    /// The member is not (or no longer) in the group.
    #[error("unknown member id")]
    UnknownMemberId,
    /// Rejoin with this member id (KIP-394).
    #[error("member id required")]
    MemberIdRequired(String),
    /// Another client took over this static member's instance id.
    #[error("fenced instance id")]
    FencedInstanceId,
    /// The member's generation is not the group's.
    #[error("illegal generation")]
    IllegalGeneration,
    /// The group is rebalancing: rejoin.
    #[error("rebalance in progress")]
    RebalanceInProgress,
    /// The node's member or state limit is reached.
    #[error("group size limit reached")]
    GroupMaxSizeReached,
    /// No such group.
    #[error("group not found")]
    GroupIdNotFound,
    /// The group has members (delete refused).
    #[error("group is not empty")]
    NonEmptyGroup,
    /// A member subscribes to the topic (its positions may not be deleted).
    #[error("the group subscribes to the topic")]
    GroupSubscribedToTopic,
    /// The node is shutting down, the log refused a write, or a cluster
    /// has no leader now.
    #[error("coordinator not available")]
    CoordinatorNotAvailable,
    /// On a cluster, groups are coordinated by the leader, and this node
    /// is not it (the client asks FindCoordinator again).
    #[error("not the coordinator: on a cluster, the leader coordinates groups")]
    NotCoordinator,
}

/// A JoinGroup.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The group.
    pub group: String,
    /// `""` for a member joining for the first time.
    pub member_id: String,
    /// `group.instance.id` of a static member.
    pub instance_id: Option<String>,
    /// The client's id (prefix of a new member id).
    pub client_id: String,
    /// The client's address.
    pub client_host: String,
    /// How long without a heartbeat before the member is removed.
    pub session_timeout: Duration,
    /// How long a rebalance may wait for this member to rejoin.
    pub rebalance_timeout: Duration,
    /// `consumer` for consumers.
    pub protocol_type: String,
    /// (assignor name, subscription metadata), in the client's preference.
    pub protocols: Vec<(String, Bytes)>,
    /// A new dynamic member gets its id first and must rejoin with it
    /// (JoinGroup v4+).
    pub require_known_member_id: bool,
}

/// The answer to a JoinGroup.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The generation formed.
    pub generation: i32,
    /// The group's protocol type.
    pub protocol_type: Option<String>,
    /// The assignor chosen.
    pub protocol_name: Option<String>,
    /// The leader's member id.
    pub leader: String,
    /// This member's id.
    pub member_id: String,
    /// Every member with its metadata: for the leader only.
    pub members: Vec<JoinedMember>,
}

/// One member, as the leader sees it.
#[derive(Debug, Clone)]
pub struct JoinedMember {
    /// Its id.
    pub member_id: String,
    /// Its instance id, if static.
    pub instance_id: Option<String>,
    /// Its subscription for the chosen protocol.
    pub metadata: Bytes,
}

/// The answer to a SyncGroup.
#[derive(Debug, Clone)]
pub struct Synced {
    /// The group's protocol type.
    pub protocol_type: Option<String>,
    /// The assignor chosen.
    pub protocol_name: Option<String>,
    /// This member's assignment, as the leader encoded it.
    pub assignment: Bytes,
}

/// A member, as DescribeGroups and the HTTP API show it.
#[derive(Debug, Clone)]
pub struct MemberView {
    /// Its id.
    pub member_id: String,
    /// Its instance id, if static.
    pub instance_id: Option<String>,
    /// The client's id.
    pub client_id: String,
    /// The client's address.
    pub client_host: String,
    /// Its subscription for the chosen protocol.
    pub metadata: Bytes,
    /// Its assignment.
    pub assignment: Bytes,
}

/// A group: its membership and its committed offsets.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: State,
    /// `consumer`, or `""` for a group that only has committed offsets.
    pub protocol_type: String,
    /// The assignor chosen, `""` while none.
    pub protocol: String,
    /// The generation.
    pub generation: i32,
    /// The leader's member id, `""` while none.
    pub leader: String,
    /// Members, in join order.
    pub members: Vec<MemberView>,
}

/// Node-wide counters.
#[derive(Debug, Default)]
struct Counters {
    members: AtomicU64,
    bytes: AtomicU64,
    rebalances: AtomicU64,
    expired: AtomicU64,
    joins: AtomicU64,
    refused_full: AtomicU64,
}

struct Inner {
    log: Log,
    config: GroupsConfig,
    groups: Mutex<HashMap<String, Group>>,
    counters: Counters,
    /// Prefix that makes member ids unique across restarts of the node.
    epoch: u64,
    next_id: AtomicU64,
    /// On a cluster: the term this node claimed the groups for, and the
    /// log handle whose position writes carry that claim.
    writer: tokio::sync::Mutex<Option<(u64, Log)>>,
}

/// The metadata space of the claim a cluster's coordinator takes for each
/// term it leads (shared with the transaction coordinator's claim).
pub const CLAIM_SPACE: &str = "__kafka_coordinator";
/// The key of the groups' claim; its value is `node:term`.
pub const CLAIM_KEY: &[u8] = b"groups";

/// The metadata space where a cluster's leader lists the groups that have
/// members, so that every node knows them (a follower's HTTP API refuses
/// a plain commit to such a group, as the leader's does).
pub const ACTIVE_SPACE: &str = "__groups_active";

/// The metadata space that keeps each group's protocol type (`consumer`,
/// `connect`) once its members commit, so that DescribeGroups and
/// ListGroups give it after every member has left, as Kafka does (a
/// client takes a group without one for a simple consumer's).
pub const TYPE_SPACE: &str = "__groups_type";

/// How often the leader brings that list up to date.
const PUBLISH: Duration = Duration::from_secs(1);

/// The node's group coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

/// How often sessions and rebalance deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

impl Coordinator {
    /// A coordinator over `log`'s committed offsets whose timer runs on the
    /// current runtime until `shutdown`.
    pub fn start(log: Log, config: GroupsConfig, shutdown: CancellationToken) -> Self {
        let c = Coordinator::new(log, config);
        tokio::spawn(c.clone().run(shutdown));
        c
    }

    /// A coordinator over `log`'s committed offsets. Call
    /// [`Coordinator::run`] on a runtime to make sessions expire.
    pub fn new(log: Log, config: GroupsConfig) -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Coordinator {
            inner: Arc::new(Inner {
                log,
                config,
                groups: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                epoch,
                next_id: AtomicU64::new(0),
                writer: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// Ends sessions and completes rebalances that are due, until
    /// `shutdown`; then answers every waiting member.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Some(leadership) = self.inner.log.leadership() {
            tokio::spawn(self.clone().publish_active(leadership, shutdown.clone()));
        }
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => self.tick(Instant::now()),
            }
        }
        let mut groups = self.lock();
        let mut delta = Delta::default();
        for g in groups.values_mut() {
            g.close(&mut delta);
        }
        groups.clear();
        drop(groups);
        self.account(delta);
    }

    /// On a cluster's leader, every second: lists the groups that have
    /// members in [`ACTIVE_SPACE`] (and removes those that have none, such
    /// as a former leader's), under the groups' claim.
    async fn publish_active(
        self,
        leadership: tokio::sync::watch::Receiver<tributary_storage::Leadership>,
        shutdown: CancellationToken,
    ) {
        let mut every = tokio::time::interval(PUBLISH);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            if !leadership.borrow().leads() {
                continue;
            }
            let active: Vec<Vec<u8>> = self
                .lock()
                .iter()
                .filter(|(_, g)| !g.is_empty())
                .map(|(name, _)| name.as_bytes().to_vec())
                .collect();
            let Ok(listed) = self.inner.log.meta(ACTIVE_SPACE) else {
                continue;
            };
            let mut changes: Vec<tributary_storage::MetaEntry> = active
                .iter()
                .filter(|name| !listed.iter().any(|(k, _)| k == *name))
                .map(|name| (name.clone(), Some(b"1".to_vec())))
                .collect();
            changes.extend(
                listed
                    .into_iter()
                    .filter(|(k, _)| !active.contains(k))
                    .map(|(k, _)| (k, None)),
            );
            if changes.is_empty() {
                continue;
            }
            let written = match self.writer().await {
                Ok(log) => log
                    .put_meta(ACTIVE_SPACE, changes)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "the groups with members were not listed; trying again");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Group>> {
        self.inner
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this node coordinates groups now: always on a single node;
    /// on a cluster, while it leads (every member of a group then meets on
    /// one node, whichever node each client reached first) and is not cut
    /// off from the majority (the members then look for the coordinator
    /// again, and find the new leader's).
    pub fn coordinating(&self) -> Result<(), GroupError> {
        let Some(leadership) = self.inner.log.leadership() else {
            return Ok(());
        };
        let l = leadership.borrow();
        match l.leader {
            _ if l.leads() && l.cut_off => Err(GroupError::CoordinatorNotAvailable),
            _ if l.leads() => Ok(()),
            Some(_) => Err(GroupError::NotCoordinator),
            None => Err(GroupError::CoordinatorNotAvailable),
        }
    }

    /// The log handle that writes positions: the log itself on a single
    /// node; on a cluster, one under this node's claim for the term it
    /// leads, taken the first time it is needed in that term.
    async fn writer(&self) -> Result<Log, GroupError> {
        let Some(leadership) = self.inner.log.leadership() else {
            return Ok(self.inner.log.clone());
        };
        let (node, term) = {
            let l = leadership.borrow();
            match l.leader {
                _ if l.leads() => (l.node, l.term),
                Some(_) => return Err(GroupError::NotCoordinator),
                None => return Err(GroupError::CoordinatorNotAvailable),
            }
        };
        let mut writer = self.inner.writer.lock().await;
        if let Some((t, log)) = writer.as_ref() {
            if *t == term {
                return Ok(log.clone());
            }
        }
        let guard = Guard {
            space: CLAIM_SPACE.to_owned(),
            key: CLAIM_KEY.to_vec(),
            value: format!("{node}:{term}").into_bytes(),
        };
        if let Err(e) = self.inner.log.claim(&guard).await {
            tracing::warn!(error = %e, term, "could not claim the groups for this term");
            return Err(GroupError::CoordinatorNotAvailable);
        }
        let log = self.inner.log.guarded(guard);
        *writer = Some((term, log.clone()));
        Ok(log)
    }

    fn timing(&self) -> Timing {
        Timing {
            initial_delay: self.inner.config.initial_rebalance_delay,
        }
    }

    fn account(&self, d: Delta) {
        let c = &self.inner.counters;
        if d.members >= 0 {
            c.members.fetch_add(d.members as u64, Relaxed);
        } else {
            c.members
                .fetch_sub(d.members.unsigned_abs() as u64, Relaxed);
        }
        if d.bytes >= 0 {
            c.bytes.fetch_add(d.bytes as u64, Relaxed);
        } else {
            c.bytes.fetch_sub(d.bytes.unsigned_abs() as u64, Relaxed);
        }
        c.rebalances.fetch_add(d.rebalances, Relaxed);
        c.expired.fetch_add(d.expired, Relaxed);
    }

    fn tick(&self, now: Instant) {
        let timing = self.timing();
        let mut total = Delta::default();
        let mut groups = self.lock();
        // Leadership moved: the members find the new leader (their next
        // request here is refused) and rejoin there. (A leader cut off
        // keeps its groups: if it hears from the majority again still
        // leading, its members go on where they were.)
        let moved = self
            .inner
            .log
            .leadership()
            .is_some_and(|l| !l.borrow().leads());
        if !groups.is_empty() && moved {
            for g in groups.values_mut() {
                g.close(&mut total);
            }
            groups.clear();
            drop(groups);
            self.account(total);
            return;
        }
        groups.retain(|_, g| {
            let d = g.tick(now, timing);
            total.members += d.members;
            total.bytes += d.bytes;
            total.rebalances += d.rebalances;
            total.expired += d.expired;
            !(g.is_empty() && g.state == State::Empty)
        });
        drop(groups);
        self.account(total);
    }

    fn new_member_id(&self, client_id: &str) -> String {
        let n = self.inner.next_id.fetch_add(1, Relaxed);
        // Kafka's form: the client id, a dash, something unique.
        let prefix: String = client_id.chars().take(64).collect();
        format!("{prefix}-{:x}-{n:x}", self.inner.epoch)
    }

    /// JoinGroup: resolves when the next generation forms (or at once with
    /// an error, or with the current generation when nothing changed).
    pub async fn join(&self, req: JoinRequest) -> Result<Joined, GroupError> {
        validate_group(&req.group).map_err(|_| GroupError::InvalidGroupId)?;
        self.coordinating()?;
        let cfg = &self.inner.config;
        if req.session_timeout < cfg.min_session_timeout
            || req.session_timeout > cfg.max_session_timeout
        {
            return Err(GroupError::InvalidSessionTimeout);
        }
        let bytes: usize = req
            .protocols
            .iter()
            .map(|(n, m)| n.len() + m.len())
            .sum::<usize>()
            + req.member_id.len()
            + req.client_id.len()
            + group::MEMBER_OVERHEAD;
        let c = &self.inner.counters;
        c.joins.fetch_add(1, Relaxed);
        let rx = {
            let mut groups = self.lock();
            let is_new_member = req.member_id.is_empty()
                && !req.instance_id.as_ref().is_some_and(|i| {
                    groups
                        .get(&req.group)
                        .is_some_and(|g| g.has_static(i.as_str()))
                });
            if is_new_member
                && (c.members.load(Relaxed) as usize >= cfg.max_members
                    || c.bytes.load(Relaxed) as usize + bytes > cfg.max_state_bytes)
            {
                c.refused_full.fetch_add(1, Relaxed);
                return Err(GroupError::GroupMaxSizeReached);
            }
            let timing = self.timing();
            let group = groups.entry(req.group.clone()).or_insert_with(Group::new);
            let mut delta = Delta::default();
            let client_id = req.client_id.clone();
            let r = group.join(
                req,
                || self.new_member_id(&client_id),
                Instant::now(),
                timing,
                &mut delta,
            );
            drop(groups);
            self.account(delta);
            r?
        };
        rx.await.unwrap_or(Err(GroupError::CoordinatorNotAvailable))
    }

    /// SyncGroup: the leader hands in every member's assignment; each member
    /// gets its own once the leader's has come.
    pub async fn sync(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        protocol: (Option<&str>, Option<&str>),
        assignments: Vec<(String, Bytes)>,
    ) -> Result<Synced, GroupError> {
        self.coordinating()?;
        let bytes: usize = assignments.iter().map(|(_, a)| a.len()).sum();
        let cfg = &self.inner.config;
        if self.inner.counters.bytes.load(Relaxed) as usize + bytes > cfg.max_state_bytes {
            self.inner.counters.refused_full.fetch_add(1, Relaxed);
            return Err(GroupError::GroupMaxSizeReached);
        }
        let rx = {
            let mut groups = self.lock();
            let g = groups.get_mut(group).ok_or(GroupError::UnknownMemberId)?;
            let mut delta = Delta::default();
            let r = g.sync(
                generation,
                member_id,
                instance_id,
                protocol.0,
                protocol.1,
                assignments,
                Instant::now(),
                &mut delta,
            );
            drop(groups);
            self.account(delta);
            r?
        };
        rx.await.unwrap_or(Err(GroupError::CoordinatorNotAvailable))
    }

    /// Heartbeat.
    pub fn heartbeat(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        self.coordinating()?;
        let mut groups = self.lock();
        let g = groups.get_mut(group).ok_or(GroupError::UnknownMemberId)?;
        g.heartbeat(generation, member_id, instance_id, Instant::now())
    }

    /// LeaveGroup for each (member id, instance id); the answer per member.
    pub fn leave(
        &self,
        group: &str,
        members: &[(String, Option<String>)],
    ) -> Result<Vec<Result<(), GroupError>>, GroupError> {
        self.coordinating()?;
        let timing = self.timing();
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(group) else {
            return Err(GroupError::UnknownMemberId);
        };
        let mut delta = Delta::default();
        let now = Instant::now();
        let out = members
            .iter()
            .map(|(id, instance)| g.leave(id, instance.as_deref(), now, timing, &mut delta))
            .collect();
        drop(groups);
        self.account(delta);
        Ok(out)
    }

    /// Checks that a member (or a consumer outside the group protocol, with
    /// generation -1 and no member id) may commit offsets now, then commits
    /// them durably, each with its commit metadata (`metadata` empty: none).
    pub async fn commit(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        offsets: Vec<GroupOffset>,
        metadata: Vec<String>,
    ) -> Result<Result<(), tributary_storage::Error>, GroupError> {
        self.may_commit(group, generation, member_id, instance_id)?;
        let writer = self.writer().await?;
        match writer.commit_offsets_with(group, offsets, metadata).await {
            // Another node claimed the groups since: it coordinates now.
            Err(tributary_storage::Error::Superseded(_)) => Err(GroupError::NotCoordinator),
            Ok(()) if generation >= 0 => {
                self.remember_type(group, &writer).await;
                Ok(Ok(()))
            }
            other => Ok(other),
        }
    }

    /// Stores the protocol type of `group`'s members, the first time they
    /// commit (and again if it changed).
    async fn remember_type(&self, group: &str, writer: &Log) {
        let Some(kind) = self
            .lock()
            .get(group)
            .and_then(|g| g.protocol_type.clone())
            .filter(|t| !t.is_empty())
        else {
            return;
        };
        if self.stored_type(group) == kind {
            return;
        }
        let entry = vec![(group.as_bytes().to_vec(), Some(kind.into_bytes()))];
        if let Err(e) = writer.put_meta(TYPE_SPACE, entry).await {
            tracing::warn!(%group, error = %e, "cannot store a group's protocol type");
        }
    }

    /// The protocol type stored for `group` (empty: none).
    fn stored_type(&self, group: &str) -> String {
        self.inner
            .log
            .meta_get(TYPE_SPACE, group.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default()
    }

    /// A plain commit (the HTTP API; a consumer outside the group
    /// protocol): refused with [`GroupError::UnknownMemberId`] while the
    /// group has members. Where this node coordinates (a single node, a
    /// cluster's leader) it is checked against the members and written
    /// under the groups' claim, as OffsetCommit is; on a follower it is
    /// checked against the leader's list of groups with members
    /// ([`Coordinator::has_members`]) and written plainly.
    pub async fn commit_plain(
        &self,
        group: &str,
        offsets: Vec<GroupOffset>,
    ) -> Result<Result<(), tributary_storage::Error>, GroupError> {
        match self.coordinating() {
            Ok(()) => self.commit(group, -1, "", None, offsets, Vec::new()).await,
            Err(_) if self.has_members(group) => Err(GroupError::UnknownMemberId),
            Err(_) => Ok(self.inner.log.commit_offsets(group, offsets).await),
        }
    }

    /// Whether `member_id` at `generation` may commit `group`'s offsets now
    /// (OffsetCommit; TxnOffsetCommit v3+ asks it too, so a consumer fenced
    /// by a rebalance cannot commit through a transaction either).
    pub fn may_commit(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        validate_group(group).map_err(|_| GroupError::InvalidGroupId)?;
        self.coordinating()?;
        let groups = self.lock();
        match groups.get(group) {
            Some(g) => g.may_commit(generation, member_id, instance_id),
            None if generation < 0 => Ok(()),
            None => Err(GroupError::UnknownMemberId),
        }
    }

    /// Whether a group has live members (the HTTP API refuses plain commits
    /// to such a group, as Kafka does). On a cluster's follower: whether
    /// the leader, where the members are, lists it (within a second of a
    /// change).
    pub fn has_members(&self, group: &str) -> bool {
        if self.lock().get(group).is_some_and(|g| !g.is_empty()) {
            return true;
        }
        let follows = self
            .inner
            .log
            .leadership()
            .is_some_and(|l| !l.borrow().leads());
        follows
            && self
                .inner
                .log
                .meta_get(ACTIVE_SPACE, group.as_bytes())
                .ok()
                .flatten()
                .is_some()
    }

    /// One group: membership and state (committed offsets come from the log).
    pub fn describe(&self, group: &str) -> Option<GroupView> {
        let groups = self.lock();
        if let Some(g) = groups.get(group) {
            return Some(view(group, g));
        }
        drop(groups);
        let offsets = self.inner.log.group_offsets(group).ok()?;
        (!offsets.is_empty()).then(|| empty_view(group, self.stored_type(group)))
    }

    /// Every group: those with members and those with committed offsets.
    pub fn list(&self) -> Vec<GroupView> {
        let mut out: Vec<GroupView> = {
            let groups = self.lock();
            groups.iter().map(|(n, g)| view(n, g)).collect()
        };
        for name in self.inner.log.group_names().unwrap_or_default() {
            if !out.iter().any(|g| g.name == name) {
                let kind = self.stored_type(&name);
                out.push(empty_view(&name, kind));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Deletes a group that has no members: its committed offsets go, durably.
    pub async fn delete(&self, group: &str) -> Result<(), GroupError> {
        validate_group(group).map_err(|_| GroupError::InvalidGroupId)?;
        self.coordinating()?;
        if self.lock().get(group).is_some_and(|g| !g.is_empty()) {
            return Err(GroupError::NonEmptyGroup);
        }
        self.require_positions(group)?;
        let writer = self.writer().await?;
        writer.forget_group(group).await.map_err(write_refused)?;
        if !self.stored_type(group).is_empty() {
            let entry = vec![(group.as_bytes().to_vec(), None)];
            writer
                .put_meta(TYPE_SPACE, entry)
                .await
                .map_err(write_refused)?;
        }
        let mut groups = self.lock();
        if groups.get(group).is_some_and(Group::is_empty) {
            groups.remove(group);
        }
        Ok(())
    }

    /// Removes a group's positions in these partitions, durably (Kafka's
    /// OffsetDelete): refused as a whole for a group with neither members nor
    /// positions, or with members of another protocol than `consumer`; per
    /// partition, refused in a topic a member subscribes to. A partition
    /// without a position is no error.
    pub async fn delete_offsets(
        &self,
        group: &str,
        partitions: Vec<(String, u32)>,
    ) -> Result<Vec<(String, u32, Result<(), GroupError>)>, GroupError> {
        validate_group(group).map_err(|_| GroupError::InvalidGroupId)?;
        self.coordinating()?;
        let subscribed = match self.lock().get(group) {
            Some(g) if !g.is_empty() => {
                if g.protocol_type.as_deref() != Some("consumer") {
                    return Err(GroupError::NonEmptyGroup);
                }
                // As Kafka: a member whose subscription does not parse makes
                // the group subscribe to nothing known.
                g.members()
                    .iter()
                    .map(|m| consumer_subscription(&m.metadata))
                    .collect::<Option<Vec<Vec<String>>>>()
                    .unwrap_or_default()
                    .concat()
            }
            _ => {
                self.require_positions(group)?;
                Vec::new()
            }
        };
        let (refused, deleted): (Vec<_>, Vec<_>) = partitions
            .into_iter()
            .partition(|(topic, _)| subscribed.contains(topic));
        self.writer()
            .await?
            .forget_group_offsets(group, deleted.clone())
            .await
            .map_err(write_refused)?;
        let refused = refused
            .into_iter()
            .map(|(t, p)| (t, p, Err(GroupError::GroupSubscribedToTopic)));
        Ok(deleted
            .into_iter()
            .map(|(t, p)| (t, p, Ok(())))
            .chain(refused)
            .collect())
    }

    /// A group without members exists while it has positions.
    fn require_positions(&self, group: &str) -> Result<(), GroupError> {
        let known = self
            .inner
            .log
            .group_offsets(group)
            .map_err(|_| GroupError::CoordinatorNotAvailable)?;
        if known.is_empty() {
            return Err(GroupError::GroupIdNotFound);
        }
        Ok(())
    }

    /// Members across the node now.
    pub fn member_count(&self) -> u64 {
        self.inner.counters.members.load(Relaxed)
    }

    /// Rebalances started so far.
    pub fn rebalances(&self) -> u64 {
        self.inner.counters.rebalances.load(Relaxed)
    }

    /// The log the offsets live in.
    pub fn log(&self) -> &Log {
        &self.inner.log
    }
}

/// A position write the log refused: superseded when another node claimed
/// the groups since (it coordinates now).
fn write_refused(e: tributary_storage::Error) -> GroupError {
    match e {
        tributary_storage::Error::Superseded(_) => GroupError::NotCoordinator,
        _ => GroupError::CoordinatorNotAvailable,
    }
}

fn view(name: &str, g: &Group) -> GroupView {
    GroupView {
        name: name.to_owned(),
        state: g.state,
        protocol_type: g.protocol_type.clone().unwrap_or_default(),
        protocol: g.protocol.clone().unwrap_or_default(),
        generation: g.generation,
        leader: g.leader.clone().unwrap_or_default(),
        members: g.members(),
    }
}

fn empty_view(name: &str, protocol_type: String) -> GroupView {
    GroupView {
        name: name.to_owned(),
        state: State::Empty,
        protocol_type,
        protocol: String::new(),
        generation: 0,
        leader: String::new(),
        members: Vec::new(),
    }
}

impl MetricsSource for Coordinator {
    fn render(&self, out: &mut Text) {
        let c = &self.inner.counters;
        out.gauge(
            "tributary_group_members",
            "Consumer-group members across the node.",
            c.members.load(Relaxed),
        );
        out.gauge(
            "tributary_group_state_bytes",
            "Protocol metadata and assignment bytes held for group members.",
            c.bytes.load(Relaxed),
        );
        let mut by_state: [u64; 4] = [0; 4];
        for g in self.lock().values() {
            by_state[g.state as usize] += 1;
        }
        let mut family = out.family(
            "tributary_groups",
            Kind::Gauge,
            "Consumer groups with members, by state.",
        );
        for s in [
            State::Empty,
            State::PreparingRebalance,
            State::CompletingRebalance,
            State::Stable,
        ] {
            family.sample(&[("state", &s.name())], by_state[s as usize]);
        }
        out.counter(
            "tributary_group_joins_total",
            "JoinGroup requests.",
            c.joins.load(Relaxed),
        );
        out.counter(
            "tributary_group_rebalances_total",
            "Rebalances started.",
            c.rebalances.load(Relaxed),
        );
        out.counter(
            "tributary_group_sessions_expired_total",
            "Members removed because their session ended without a heartbeat.",
            c.expired.load(Relaxed),
        );
        out.counter(
            "tributary_group_refused_full_total",
            "Joins refused because the node's member or group-state limit was reached.",
            c.refused_full.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests;

/// Reads Kafka's embedded protocol structures (big-endian, `i16` string
/// lengths, `i32` array counts); `None` once the bytes run out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|x| i16::from_be_bytes([x[0], x[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.i16()?).ok()?;
        Some(std::str::from_utf8(self.take(len)?).ok()?.to_owned())
    }
    /// An array count no larger than the bytes left could hold at `each`
    /// bytes per element: a count beyond them is a lie.
    fn count(&mut self, each: usize) -> Option<usize> {
        let n = usize::try_from(self.i32()?).ok()?;
        (n <= self.0.len() / each).then_some(n)
    }
}

/// The partitions in a `consumer`-protocol assignment (Kafka's
/// ConsumerProtocolAssignment, every version: `i16` version, then topics
/// with their partitions; what follows is ignored), for showing which member
/// reads what. `None` when the bytes are not such an assignment.
pub fn consumer_assignment(bytes: &[u8]) -> Option<Vec<(String, Vec<i32>)>> {
    let mut b = Reader(bytes);
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    b.i16()?;
    let topics = b.count(6)?;
    let mut out = Vec::new();
    for _ in 0..topics {
        let name = b.string()?;
        let n = b.count(4)?;
        let parts = (0..n).map(|_| b.i32()).collect::<Option<Vec<i32>>>()?;
        out.push((name, parts));
    }
    Some(out)
}

/// The topics in a `consumer`-protocol subscription (Kafka's
/// ConsumerProtocolSubscription, every version: `i16` version, then the topic
/// names; what follows is ignored). `None` when the bytes are not one.
pub fn consumer_subscription(bytes: &[u8]) -> Option<Vec<String>> {
    let mut b = Reader(bytes);
    b.i16()?;
    let topics = b.count(2)?;
    (0..topics).map(|_| b.string()).collect()
}
