//! One group's membership state machine: Kafka's classic group protocol
//! (the states Empty, PreparingRebalance, CompletingRebalance and Stable; a
//! group that is deleted is simply removed). Pure state: the coordinator
//! holds every group under one lock, passes the time in, and runs
//! [`Group::tick`] on a timer; waiters are one-shot senders the callers await
//! outside the lock.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::{GroupError, JoinRequest, Joined, JoinedMember, MemberView, Synced};

/// A group's state, as Kafka names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No members (committed offsets may exist).
    Empty,
    /// Members are (re)joining; the next generation forms when all have
    /// joined or the rebalance timeout passes.
    PreparingRebalance,
    /// The generation formed; members wait for the leader's assignment.
    CompletingRebalance,
    /// Every member has its assignment.
    Stable,
}

impl State {
    /// Kafka's name for the state (DescribeGroups, ListGroups).
    pub fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

pub(crate) type JoinWaiter = oneshot::Sender<Result<Joined, GroupError>>;
pub(crate) type SyncWaiter = oneshot::Sender<Result<Synced, GroupError>>;

#[derive(Debug)]
pub(crate) struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    joining: Option<JoinWaiter>,
    syncing: Option<SyncWaiter>,
    /// The session ends at this instant unless a heartbeat (or a join or
    /// sync) comes first; members with a join or sync in progress do not
    /// expire.
    deadline: Instant,
    /// Joined order: the first member leads when the leader is gone.
    seq: u64,
}

impl Member {
    fn bytes(&self) -> usize {
        self.id.len()
            + self.instance_id.as_ref().map_or(0, String::len)
            + self.client_id.len()
            + self.client_host.len()
            + self.protocol_type.len()
            + self
                .protocols
                .iter()
                .map(|(n, m)| n.len() + m.len())
                .sum::<usize>()
            + self.assignment.len()
            + MEMBER_OVERHEAD
    }

    /// Takes what a join says about the member (protocols, timeouts,
    /// client); whether its protocols changed.
    fn rejoin(&mut self, req: JoinRequest, delta: &mut Delta) -> bool {
        let before = self.bytes();
        let changed = self.protocols != req.protocols;
        self.protocols = req.protocols;
        self.protocol_type = req.protocol_type;
        self.session_timeout = req.session_timeout;
        self.rebalance_timeout = req.rebalance_timeout;
        self.client_id = req.client_id;
        self.client_host = req.client_host;
        delta.bytes += self.bytes() as isize - before as isize;
        changed
    }

    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

/// Bytes a member costs beyond its strings (counted against the node's
/// group-state budget).
pub(crate) const MEMBER_OVERHEAD: usize = 256;

/// What a change did to the node-wide accounting.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Delta {
    pub members: isize,
    pub bytes: isize,
    pub rebalances: u64,
    pub expired: u64,
}

impl Delta {
    fn add(&mut self, other: Delta) {
        self.members += other.members;
        self.bytes += other.bytes;
        self.rebalances += other.rebalances;
        self.expired += other.expired;
    }
}

/// Settings the state machine needs (from `GroupsConfig`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub initial_delay: Duration,
}

#[derive(Debug)]
pub(crate) struct Group {
    pub state: State,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not joined yet, and
    /// when each is forgotten.
    pending: HashMap<String, Instant>,
    /// Static members: group.instance.id → member id.
    statics: HashMap<String, String>,
    /// PreparingRebalance ends by then at the latest.
    join_deadline: Option<Instant>,
    /// An empty group's first rebalance waits this long for more members.
    initial_until: Option<Instant>,
    /// CompletingRebalance: the leader's assignment is due by then.
    sync_deadline: Option<Instant>,
    next_seq: u64,
}

impl Group {
    pub fn new() -> Self {
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            statics: HashMap::new(),
            join_deadline: None,
            initial_until: None,
            sync_deadline: None,
            next_seq: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty()
    }

    /// Members in the order they joined.
    fn in_join_order(&self) -> Vec<&Member> {
        let mut out: Vec<&Member> = self.members.values().collect();
        out.sort_by_key(|m| m.seq);
        out
    }

    pub fn members(&self) -> Vec<MemberView> {
        let protocol = self.protocol.as_deref().unwrap_or("");
        self.in_join_order()
            .into_iter()
            .map(|m| MemberView {
                member_id: m.id.clone(),
                instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: m.metadata(protocol),
                assignment: m.assignment.clone(),
            })
            .collect()
    }

    /// Whether a static member with this instance id is in the group.
    pub fn has_static(&self, instance_id: &str) -> bool {
        self.statics.contains_key(instance_id)
    }

    /// Protocols every member supports (all of them while empty).
    fn common_protocols(&self) -> Option<Vec<String>> {
        let mut it = self.members.values();
        let first = it.next()?;
        let mut common: Vec<String> = first.protocols.iter().map(|(n, _)| n.clone()).collect();
        for m in it {
            common.retain(|n| m.protocols.iter().any(|(p, _)| p == n));
        }
        Some(common)
    }

    fn compatible(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if protocol_type.is_empty() || protocols.is_empty() {
            return false;
        }
        if self.members.is_empty() {
            return true;
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        self.common_protocols()
            .is_some_and(|c| c.iter().any(|n| protocols.iter().any(|(p, _)| p == n)))
    }

    /// JoinGroup. `Ok(rx)`: await it for the answer; `Err`: answer now.
    pub fn join(
        &mut self,
        req: JoinRequest,
        member_id: impl FnOnce() -> String,
        now: Instant,
        timing: Timing,
        delta: &mut Delta,
    ) -> Result<oneshot::Receiver<Result<Joined, GroupError>>, GroupError> {
        if !self.compatible(&req.protocol_type, &req.protocols) {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        let (tx, rx) = oneshot::channel();
        if req.member_id.is_empty() {
            let id = member_id();
            if let Some(instance) = req.instance_id.clone() {
                if let Some(old) = self.statics.get(&instance).cloned() {
                    self.replace_static(&old, id, req, tx, now, timing, delta);
                    return Ok(rx);
                }
            } else if req.require_known_member_id {
                // KIP-394: the client rejoins with the id it is given, so a
                // client that gives up does not leave a member behind.
                let wait = req.session_timeout.max(req.rebalance_timeout);
                self.pending.insert(id.clone(), now + wait);
                delta.members += 1;
                return Err(GroupError::MemberIdRequired(id));
            }
            self.add_member(id, req, tx, now, timing, delta);
            return Ok(rx);
        }
        // A known member id (or one handed out with MEMBER_ID_REQUIRED).
        if let Some(instance) = &req.instance_id {
            match self.statics.get(instance) {
                Some(id) if *id != req.member_id => return Err(GroupError::FencedInstanceId),
                _ => {}
            }
        }
        if self.pending.remove(&req.member_id).is_some() {
            delta.members -= 1;
            let id = req.member_id.clone();
            self.add_member(id, req, tx, now, timing, delta);
            return Ok(rx);
        }
        let member_id = req.member_id.clone();
        let Some(member) = self.members.get_mut(&member_id) else {
            return Err(GroupError::UnknownMemberId);
        };
        let changed = member.rejoin(req, delta);
        let is_leader = self.leader.as_deref() == Some(member.id.as_str());
        match self.state {
            State::PreparingRebalance => {
                member.joining = Some(tx);
                self.maybe_complete_join(now, delta);
            }
            State::CompletingRebalance | State::Stable if !changed && !is_leader => {
                // Nothing changed: the current generation again.
                member.deadline = now + member.session_timeout;
                let answer = self.joined_for(&member_id, false);
                let _ = tx.send(Ok(answer));
            }
            State::CompletingRebalance | State::Stable | State::Empty => {
                member.joining = Some(tx);
                self.prepare_rebalance(now, timing, delta);
                self.maybe_complete_join(now, delta);
            }
        }
        Ok(rx)
    }

    fn add_member(
        &mut self,
        id: String,
        req: JoinRequest,
        tx: JoinWaiter,
        now: Instant,
        timing: Timing,
        delta: &mut Delta,
    ) {
        if let Some(instance) = &req.instance_id {
            self.statics.insert(instance.clone(), id.clone());
        }
        if self.members.is_empty() {
            self.protocol_type = Some(req.protocol_type.clone());
        }
        let member = Member {
            id: id.clone(),
            instance_id: req.instance_id,
            client_id: req.client_id,
            client_host: req.client_host,
            session_timeout: req.session_timeout,
            rebalance_timeout: req.rebalance_timeout,
            protocol_type: req.protocol_type,
            protocols: req.protocols,
            assignment: Bytes::new(),
            joining: Some(tx),
            syncing: None,
            deadline: now + req.session_timeout,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        delta.members += 1;
        delta.bytes += member.bytes() as isize;
        self.members.insert(id, member);
        if self.state != State::PreparingRebalance {
            self.prepare_rebalance(now, timing, delta);
        }
        self.maybe_complete_join(now, delta);
    }

    /// A static member came back with a new member id: the old id is fenced;
    /// a stable group whose protocol does not change keeps its generation and
    /// assignment (no rebalance, KIP-345).
    #[allow(clippy::too_many_arguments)]
    fn replace_static(
        &mut self,
        old: &str,
        id: String,
        req: JoinRequest,
        tx: JoinWaiter,
        now: Instant,
        timing: Timing,
        delta: &mut Delta,
    ) {
        let Some(mut member) = self.members.remove(old) else {
            self.statics
                .remove(req.instance_id.as_deref().unwrap_or(""));
            self.add_member(id, req, tx, now, timing, delta);
            return;
        };
        if let Some(w) = member.joining.take() {
            let _ = w.send(Err(GroupError::FencedInstanceId));
        }
        if let Some(w) = member.syncing.take() {
            let _ = w.send(Err(GroupError::FencedInstanceId));
        }
        delta.bytes += id.len() as isize - member.id.len() as isize;
        member.id = id.clone();
        let changed = member.rejoin(req, delta);
        member.deadline = now + member.session_timeout;
        if let Some(instance) = &member.instance_id {
            self.statics.insert(instance.clone(), id.clone());
        }
        if self.leader.as_deref() == Some(old) {
            self.leader = Some(id.clone());
        }
        self.members.insert(id.clone(), member);
        match self.state {
            State::Stable if !changed => {
                let answer = self.joined_for(&id, false);
                let _ = tx.send(Ok(answer));
            }
            State::PreparingRebalance => {
                if let Some(m) = self.members.get_mut(&id) {
                    m.joining = Some(tx);
                }
                self.maybe_complete_join(now, delta);
            }
            _ => {
                if let Some(m) = self.members.get_mut(&id) {
                    m.joining = Some(tx);
                }
                self.prepare_rebalance(now, timing, delta);
                self.maybe_complete_join(now, delta);
            }
        }
    }

    /// The answer to a join in the current generation; the leader gets every
    /// member's metadata when `with_members`.
    fn joined_for(&self, member_id: &str, with_members: bool) -> Joined {
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let members = if with_members && leader == member_id {
            self.in_join_order()
                .into_iter()
                .map(|m| JoinedMember {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    metadata: m.metadata(&protocol),
                })
                .collect()
        } else {
            Vec::new()
        };
        Joined {
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol.clone(),
            leader,
            member_id: member_id.to_owned(),
            members,
        }
    }

    fn prepare_rebalance(&mut self, now: Instant, timing: Timing, delta: &mut Delta) {
        if self.state == State::CompletingRebalance {
            // The assignment of the generation being formed will not come.
            for m in self.members.values_mut() {
                m.assignment = Bytes::new();
                if let Some(w) = m.syncing.take() {
                    // An answer counts as activity: the member rejoins now.
                    m.deadline = now + m.session_timeout;
                    let _ = w.send(Err(GroupError::RebalanceInProgress));
                }
            }
        }
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        if self.state == State::Empty && !timing.initial_delay.is_zero() {
            self.initial_until = Some(now + timing.initial_delay.min(timeout));
        }
        self.state = State::PreparingRebalance;
        self.sync_deadline = None;
        self.join_deadline = Some(now + timeout);
        delta.rebalances += 1;
    }

    fn all_joined(&self) -> bool {
        self.pending.is_empty() && self.members.values().all(|m| m.joining.is_some())
    }

    fn maybe_complete_join(&mut self, now: Instant, delta: &mut Delta) {
        if self.state != State::PreparingRebalance {
            return;
        }
        if self.initial_until.is_some_and(|t| now < t) {
            return;
        }
        let due = self.join_deadline.is_some_and(|t| now >= t);
        if !self.all_joined() && !due {
            return;
        }
        // Members that did not rejoin in time leave (static ones stay, their
        // session may still end); ids handed out and not used are dropped.
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| m.joining.is_none() && m.instance_id.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in gone {
            self.remove(&id, delta);
        }
        delta.members -= self.pending.len() as isize;
        self.pending.clear();
        self.initial_until = None;
        self.join_deadline = None;
        self.generation = self.generation.wrapping_add(1).max(1);
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        self.protocol = self.select_protocol();
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.contains_key(l))
        {
            self.leader = self
                .members
                .values()
                .filter(|m| m.joining.is_some())
                .min_by_key(|m| m.seq)
                .or_else(|| self.members.values().min_by_key(|m| m.seq))
                .map(|m| m.id.clone());
        }
        self.state = State::CompletingRebalance;
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.sync_deadline = Some(now + timeout);
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let answer = self.joined_for(&id, true);
            if let Some(m) = self.members.get_mut(&id) {
                m.deadline = now + m.session_timeout;
                m.assignment = Bytes::new();
                if let Some(w) = m.joining.take() {
                    let _ = w.send(Ok(answer));
                }
            }
        }
    }

    /// The protocol every member supports that most members prefer; ties go
    /// to the leader's (or first member's) preference order.
    fn select_protocol(&self) -> Option<String> {
        let common = self.common_protocols()?;
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some((name, _)) = m.protocols.iter().find(|(n, _)| common.contains(n)) {
                *votes.entry(name.as_str()).or_default() += 1;
            }
        }
        let best = votes.values().copied().max()?;
        let first = self
            .leader
            .as_ref()
            .and_then(|l| self.members.get(l))
            .or_else(|| self.members.values().min_by_key(|m| m.seq))?;
        first
            .protocols
            .iter()
            .map(|(n, _)| n.as_str())
            .find(|n| votes.get(n) == Some(&best))
            .map(str::to_owned)
    }

    fn check_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<&Member, GroupError> {
        if let Some(instance) = instance_id {
            match self.statics.get(instance) {
                Some(id) if id != member_id => return Err(GroupError::FencedInstanceId),
                None if !self.members.contains_key(member_id) => {
                    return Err(GroupError::UnknownMemberId)
                }
                _ => {}
            }
        }
        self.members
            .get(member_id)
            .ok_or(GroupError::UnknownMemberId)
    }

    /// SyncGroup. `Ok(rx)`: await it.
    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
        delta: &mut Delta,
    ) -> Result<oneshot::Receiver<Result<Synced, GroupError>>, GroupError> {
        self.check_member(member_id, instance_id)?;
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration);
        }
        if protocol_type.is_some_and(|t| Some(t) != self.protocol_type.as_deref())
            || protocol_name.is_some_and(|n| Some(n) != self.protocol.as_deref())
        {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        let (tx, rx) = oneshot::channel();
        match self.state {
            State::Empty => return Err(GroupError::UnknownMemberId),
            State::PreparingRebalance => return Err(GroupError::RebalanceInProgress),
            State::Stable => {
                let answer = self.synced(member_id);
                if let Some(m) = self.members.get_mut(member_id) {
                    m.deadline = now + m.session_timeout;
                }
                let _ = tx.send(Ok(answer));
            }
            State::CompletingRebalance => {
                if let Some(m) = self.members.get_mut(member_id) {
                    m.syncing = Some(tx);
                }
                if self.leader.as_deref() == Some(member_id) {
                    for (id, assignment) in assignments {
                        if let Some(m) = self.members.get_mut(&id) {
                            delta.bytes += assignment.len() as isize - m.assignment.len() as isize;
                            m.assignment = assignment;
                        }
                    }
                    self.state = State::Stable;
                    self.sync_deadline = None;
                    let ids: Vec<String> = self.members.keys().cloned().collect();
                    for id in ids {
                        let answer = self.synced(&id);
                        if let Some(m) = self.members.get_mut(&id) {
                            m.deadline = now + m.session_timeout;
                            if let Some(w) = m.syncing.take() {
                                let _ = w.send(Ok(answer));
                            }
                        }
                    }
                }
            }
        }
        Ok(rx)
    }

    fn synced(&self, member_id: &str) -> Synced {
        Synced {
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol.clone(),
            assignment: self
                .members
                .get(member_id)
                .map(|m| m.assignment.clone())
                .unwrap_or_default(),
        }
    }

    /// Heartbeat: extends the member's session.
    pub fn heartbeat(
        &mut self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
    ) -> Result<(), GroupError> {
        self.check_member(member_id, instance_id)?;
        let state = self.state;
        let current = self.generation;
        if let Some(m) = self.members.get_mut(member_id) {
            m.deadline = now + m.session_timeout;
        }
        match state {
            State::Empty => Err(GroupError::UnknownMemberId),
            State::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ if generation != current => Err(GroupError::IllegalGeneration),
            _ => Ok(()),
        }
    }

    /// Whether an offset commit from this member (or a simple consumer,
    /// generation < 0) is allowed now.
    pub fn may_commit(
        &self,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        if generation < 0 && member_id.is_empty() {
            // A consumer that assigns its own partitions: only while nobody
            // is a member, or it would move the members' positions.
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(GroupError::UnknownMemberId)
            };
        }
        self.check_member(member_id, instance_id)?;
        // While members rejoin (PreparingRebalance) they still own what they
        // were assigned and commit it (the cooperative protocol relies on
        // it); between the join and the assignment they own nothing yet.
        match self.state {
            State::CompletingRebalance if generation == self.generation => {
                Err(GroupError::RebalanceInProgress)
            }
            _ if generation != self.generation => Err(GroupError::IllegalGeneration),
            _ => Ok(()),
        }
    }

    /// LeaveGroup for one member (by id, or by instance id with an empty id).
    pub fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
        timing: Timing,
        delta: &mut Delta,
    ) -> Result<(), GroupError> {
        let id = match instance_id {
            Some(instance) => match self.statics.get(instance) {
                Some(id) if member_id.is_empty() || id == member_id => id.clone(),
                Some(_) => return Err(GroupError::FencedInstanceId),
                None => return Err(GroupError::UnknownMemberId),
            },
            None => member_id.to_owned(),
        };
        if self.pending.remove(&id).is_some() {
            delta.members -= 1;
            self.maybe_complete_join(now, delta);
            return Ok(());
        }
        if !self.members.contains_key(&id) {
            return Err(GroupError::UnknownMemberId);
        }
        self.remove(&id, delta);
        self.after_removal(now, timing, delta);
        Ok(())
    }

    fn remove(&mut self, id: &str, delta: &mut Delta) {
        if let Some(mut m) = self.members.remove(id) {
            delta.members -= 1;
            delta.bytes -= m.bytes() as isize;
            if let Some(instance) = &m.instance_id {
                if self.statics.get(instance).map(String::as_str) == Some(id) {
                    self.statics.remove(instance);
                }
            }
            if let Some(w) = m.joining.take() {
                let _ = w.send(Err(GroupError::UnknownMemberId));
            }
            if let Some(w) = m.syncing.take() {
                let _ = w.send(Err(GroupError::UnknownMemberId));
            }
        }
        if self.leader.as_deref() == Some(id) {
            self.leader = None;
        }
    }

    fn after_removal(&mut self, now: Instant, timing: Timing, delta: &mut Delta) {
        match self.state {
            State::Stable | State::CompletingRebalance => {
                self.prepare_rebalance(now, timing, delta);
                self.maybe_complete_join(now, delta);
            }
            State::PreparingRebalance => self.maybe_complete_join(now, delta),
            State::Empty => {}
        }
    }

    /// Time passes: sessions end, ids handed out expire, a join or a sync
    /// that is due completes or restarts.
    pub fn tick(&mut self, now: Instant, timing: Timing) -> Delta {
        let mut delta = Delta::default();
        let before = self.pending.len();
        self.pending.retain(|_, until| *until > now);
        delta.members -= (before - self.pending.len()) as isize;
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.joining.is_none() && m.syncing.is_none() && m.deadline <= now)
            .map(|m| m.id.clone())
            .collect();
        if !expired.is_empty() {
            for id in &expired {
                tracing::debug!(member = %id, "group member's session ended");
                self.remove(id, &mut delta);
            }
            delta.expired += expired.len() as u64;
            self.after_removal(now, timing, &mut delta);
        }
        if self.state == State::CompletingRebalance && self.sync_deadline.is_some_and(|t| now >= t)
        {
            // The leader's assignment did not come: members that did not ask
            // for theirs leave, the rest rejoin.
            let gone: Vec<String> = self
                .members
                .values()
                .filter(|m| m.syncing.is_none())
                .map(|m| m.id.clone())
                .collect();
            for id in gone {
                self.remove(&id, &mut delta);
            }
            self.after_removal(now, timing, &mut delta);
        }
        let mut more = Delta::default();
        self.maybe_complete_join(now, &mut more);
        delta.add(more);
        delta
    }

    /// Ends every waiter (the node is shutting down or the group is deleted).
    pub fn close(&mut self, delta: &mut Delta) {
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            self.remove(&id, delta);
        }
        delta.members -= self.pending.len() as isize;
        self.pending.clear();
    }
}
