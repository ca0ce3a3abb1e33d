//! Shared subscriptions (`$share/GROUP/FILTER`, MQTT 5 section 4.8.2, and
//! accepted from 3.1.1 clients too): each matching message goes to one member
//! of the group.
//!
//! A [`Group`] reads the log itself, from cursors of its own, and hands
//! positions (never payloads) to its online members: round robin over the
//! members with room in their window, or sticky by MQTT topic (one member per
//! topic while the membership holds). A member reads each record it is given,
//! delivers it like any other, and reports back when the client has it
//! (PUBACK, or PUBREC for QoS 2). A member that leaves with messages queued or
//! unacknowledged gives them back: the next members get them first (at least
//! once; a QoS 2 message the client had already acknowledged with PUBREC is
//! not given again).
//!
//! The group is durable: its cursor per partition, held back to the oldest
//! message not yet acknowledged, is stored in the metadata space
//! `mqtt.shared` (once a second when it moved), so the group survives a
//! restart and receives what was published while no member was connected.
//! It ends when no session holds its subscription any more.
//!
//! On a cluster each node holds the groups of its own sessions, and the
//! members of one group may be connected to several nodes. The nodes whose
//! group has members share its partitions out: each stores its own record
//! of the group (`{group}\0{filter}\0{node}`: its cursors, whether it has
//! members, a beat renewed every second while it has), every node reads
//! the others' records once a second, and the partitions of the group's
//! topics, in order, go round the nodes with members in the order of their
//! ids. A node takes its share only after announcing its members for
//! [`GRACE`], so the nodes already dispatching let go first; a node whose
//! beat has not moved for [`STALE`] (killed, or cut off) loses its share to
//! the others. A node taking a partition starts from the furthest cursor
//! any other node stored for it: each cursor is held back to its node's
//! oldest message in flight, so everything before it was acknowledged by a
//! member. Each message goes to one member of the group; when a partition
//! changes hands (a node's first member joins, its last leaves, a node
//! dies) the messages still in flight at the node letting go are given
//! again by the node taking it (at least once, as MQTT's QoS 1 promises).
//!
//! Memory: per group, one position per message in flight, bounded by the
//! members' windows; groups are bounded by `max_shared_groups`; on a
//! cluster, the others' records: a cursor per partition of each group per
//! node.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tributary_storage::util::lock;
use tributary_storage::{Error as LogError, Log};

use super::{mapping, topic};

/// Metadata space of shared subscription groups.
pub const SHARED: &str = "mqtt.shared";

/// Records read from one partition per dispatch.
const READ_RECORDS: usize = 256;
/// Bytes read from one partition per dispatch.
const READ_BYTES: usize = 256 * 1024;

/// On a cluster: how long another node's record may go without a new beat
/// before the nodes with members take its partitions.
pub const STALE: Duration = Duration::from_secs(5);
/// On a cluster: how long a node announces its members before it takes its
/// share of partitions from the nodes already dispatching (they read the
/// records once a second).
pub const GRACE: Duration = Duration::from_secs(2);

/// A message of the log: (topic, partition, offset).
pub type Pos = (String, u32, u64);

/// How a group picks the member of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The next member (in turn) with room in its window.
    #[default]
    RoundRobin,
    /// The member chosen by the message's MQTT topic, so one topic's messages
    /// stay in order at one member; waits while that member has no room.
    Sticky,
}

/// `$share/GROUP/FILTER` → (group, filter); `None` when `path` is not a
/// shared subscription; `Err` when it is one but malformed (MQTT-4.8.2-1/2:
/// a group name without `/`, `+`, `#`, non-empty, and a valid filter after).
pub fn parse(path: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = path.strip_prefix("$share/")?;
    let Some((group, filter)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    if group.is_empty() || group.contains(['+', '#']) || !topic::valid_filter(filter) {
        return Some(Err(()));
    }
    Some(Ok((group, filter)))
}

/// One online member.
#[derive(Debug)]
struct Member {
    conn: u64,
    /// Wakes the member's connection (its delivery pass takes from `queue`).
    notify: Arc<Notify>,
    window: usize,
    /// Given to this member, not yet taken by its connection.
    queue: VecDeque<Pos>,
    /// Taken and sent, not yet acknowledged by the client.
    unacked: BTreeSet<Pos>,
}

impl Member {
    fn has_room(&self) -> bool {
        self.queue.len() + self.unacked.len() < self.window
    }
}

#[derive(Debug, Default)]
struct State {
    members: Vec<Member>,
    /// Next offset to dispatch, per partition.
    cursors: BTreeMap<(String, u32), u64>,
    /// Given back by members that left; dispatched first.
    redeliver: VecDeque<Pos>,
    next: usize,
    /// Sessions (client ids) holding the subscription, online or not.
    holders: BTreeSet<String>,
    dirty: bool,
    /// On a cluster: the other nodes dispatching this group now (records
    /// with members and a moving beat), in order.
    peers_live: Vec<u64>,
    /// On a cluster: the furthest cursor the other nodes stored, per
    /// partition.
    peer_cursors: BTreeMap<(String, u32), u64>,
    /// On a cluster: the partitions this node dispatched in its last pass.
    owned: BTreeSet<(String, u32)>,
    /// On a cluster: since when this node's stored record says it has
    /// members.
    announced: Option<Instant>,
    /// On a cluster: the grace after `announced` has passed (this node
    /// has taken its share).
    settled: bool,
    /// On a cluster: this node's beat (renewed each second while it has
    /// members).
    beat: u64,
    /// On a cluster: the group was loaded from a record without a node id
    /// (stored before the node joined a cluster), removed at the next save.
    legacy: bool,
}

/// One shared subscription group: `$share/{name}/{filter}`.
#[derive(Debug)]
pub struct Group {
    filter: String,
    /// The log topics the filter can match (`None`: every topic).
    topics: Option<Vec<String>>,
    policy: Policy,
    /// On a cluster: this node's id.
    node: Option<u64>,
    state: Mutex<State>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    version: u8,
    cursors: Vec<(String, u32, u64)>,
}

/// On a cluster: one node's record of a group.
#[derive(Debug, Serialize, Deserialize)]
struct StoredNode {
    version: u8,
    cursors: Vec<(String, u32, u64)>,
    /// The node has members of the group connected.
    members: bool,
    /// Renewed each second while it has.
    beat: u64,
}

/// A stored record's key: `(group, filter, node)`, the node absent on a
/// single node.
fn parse_key(k: &[u8]) -> Option<(&str, &str, Option<u64>)> {
    let (name, rest) = std::str::from_utf8(k).ok()?.split_once('\0')?;
    match rest.split_once('\0') {
        None => Some((name, rest, None)),
        Some((filter, node)) => Some((name, filter, Some(node.parse().ok()?))),
    }
}

/// Another node's record as this one has seen it.
#[derive(Debug)]
struct Seen {
    members: bool,
    beat: u64,
    /// When its beat last moved (by this node's clock).
    moved: Instant,
    cursors: Vec<(String, u32, u64)>,
}

impl Group {
    fn key(name: &str, filter: &str, node: Option<u64>) -> Vec<u8> {
        match node {
            None => format!("{name}\0{filter}").into_bytes(),
            Some(n) => format!("{name}\0{filter}\0{n}").into_bytes(),
        }
    }

    /// The group's filter (without `$share/GROUP/`).
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// A connection joins (or rejoins) with its window and waker.
    pub fn join(&self, conn: u64, notify: Arc<Notify>, window: usize) {
        let mut s = lock(&self.state);
        if let Some(m) = s.members.iter_mut().find(|m| m.conn == conn) {
            m.window = window.max(1);
            return;
        }
        s.members.push(Member {
            conn,
            notify,
            window: window.max(1),
            queue: VecDeque::new(),
            unacked: BTreeSet::new(),
        });
    }

    /// A connection leaves: what it held and its client has not
    /// acknowledged goes to the other members first.
    pub fn leave(&self, conn: u64) {
        let mut s = lock(&self.state);
        let Some(i) = s.members.iter().position(|m| m.conn == conn) else {
            return;
        };
        let m = s.members.remove(i);
        let mut back: Vec<Pos> = m.unacked.into_iter().chain(m.queue).collect();
        back.sort();
        for p in back.into_iter().rev() {
            s.redeliver.push_front(p);
        }
        s.dirty = true;
        for m in &s.members {
            m.notify.notify_one();
        }
    }

    /// The client has the message (PUBACK; PUBREC for QoS 2; sent, for QoS 0).
    pub fn ack(&self, conn: u64, pos: &Pos) {
        let mut s = lock(&self.state);
        if let Some(m) = s.members.iter_mut().find(|m| m.conn == conn) {
            if m.unacked.remove(pos) {
                s.dirty = true;
                // Room again: the group may have messages waiting for it.
                for m in &s.members {
                    m.notify.notify_one();
                }
            }
        }
    }

    /// Up to `room` messages for member `conn` (its delivery pass sends them
    /// and reports each with [`Group::ack`]). Dispatches from the log first.
    pub fn take(&self, log: &Log, conn: u64, room: usize) -> Vec<Pos> {
        let mut s = lock(&self.state);
        self.dispatch(&mut s, log);
        let Some(m) = s.members.iter_mut().find(|m| m.conn == conn) else {
            return Vec::new();
        };
        let n = room.min(m.queue.len());
        let taken: Vec<Pos> = m.queue.drain(..n).collect();
        m.unacked.extend(taken.iter().cloned());
        taken
    }

    /// Hands queued-back and new matching messages to members with room.
    fn dispatch(&self, s: &mut State, log: &Log) {
        if s.members.is_empty() {
            return;
        }
        while let Some(p) = s.redeliver.front().cloned() {
            let Some(i) = self.pick(s, &p.0) else {
                return;
            };
            s.redeliver.pop_front();
            s.members[i].queue.push_back(p);
            s.members[i].notify.notify_one();
        }
        let sources = self.sources(log);
        let now = super::session::now_ms();
        for (i, (t, p)) in sources.into_iter().enumerate() {
            let key = (t.clone(), p);
            if let Some(me) = self.node {
                if !Self::owns(s, me, i) {
                    if s.owned.remove(&key) {
                        tracing::info!(filter = %self.filter, topic = %t, partition = p, "a shared subscription group's partition goes to another node");
                    }
                    continue;
                }
                if !s.owned.contains(&key) {
                    // Taken from the nodes that had it: from the furthest
                    // point stored (everything before it acknowledged).
                    if let Some(&c) = s.peer_cursors.get(&key) {
                        let mine = s.cursors.entry(key.clone()).or_insert(c);
                        if *mine < c {
                            *mine = c;
                            s.dirty = true;
                        }
                    }
                    s.owned.insert(key.clone());
                    tracing::info!(filter = %self.filter, topic = %t, partition = p, cursor = ?s.cursors.get(&key), nodes = ?s.peers_live, "a shared subscription group's partition is dispatched here");
                }
            }
            let cursor = match s.cursors.get(&key) {
                Some(c) => *c,
                // A partition the group has not seen: created after it, so
                // everything in it is new to the group.
                None => match log.offsets(&t, p) {
                    Ok((start, _)) => start,
                    Err(_) => continue,
                },
            };
            let read = match log.read(&t, p, cursor, READ_RECORDS, READ_BYTES) {
                Ok(r) => r,
                Err(LogError::OffsetOutOfRange { start, .. }) if cursor < start => {
                    s.cursors.insert(key, start);
                    s.dirty = true;
                    continue;
                }
                Err(_) => continue,
            };
            let mut next = cursor;
            for r in &read.records {
                let wanted = mapping::delivery_of(&t, r, now).filter(|d| {
                    topic::valid_name(&d.topic) && topic::matches(&d.topic, &self.filter)
                });
                if let Some(d) = wanted {
                    let Some(i) = self.pick(s, &d.topic) else {
                        break;
                    };
                    s.members[i].queue.push_back((t.clone(), p, r.offset));
                    s.members[i].notify.notify_one();
                }
                next = r.offset + 1;
            }
            if s.cursors.get(&key) != Some(&next) {
                s.cursors.insert(key, next);
                s.dirty = true;
            }
        }
    }

    /// On a cluster: whether node `me` dispatches the `i`-th partition of
    /// the group's topics now.
    fn owns(s: &State, me: u64, i: usize) -> bool {
        if s.peers_live.is_empty() {
            return true;
        }
        if s.announced.is_none_or(|t| t.elapsed() < GRACE) {
            return false;
        }
        let mut nodes = s.peers_live.clone();
        nodes.push(me);
        nodes.sort_unstable();
        nodes.dedup();
        nodes[i % nodes.len()] == me
    }

    /// The member to give a message of `mqtt_topic` to, if one has room.
    fn pick(&self, s: &mut State, mqtt_topic: &str) -> Option<usize> {
        let n = s.members.len();
        match self.policy {
            Policy::Sticky => {
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_key(|&i| s.members[i].conn);
                let mut h = std::collections::hash_map::DefaultHasher::new();
                mqtt_topic.hash(&mut h);
                let i = order[(h.finish() % n as u64) as usize];
                s.members[i].has_room().then_some(i)
            }
            Policy::RoundRobin => {
                for k in 0..n {
                    let i = (s.next + k) % n;
                    if s.members[i].has_room() {
                        s.next = (i + 1) % n;
                        return Some(i);
                    }
                }
                None
            }
        }
    }

    /// The log partitions the filter can match.
    fn sources(&self, log: &Log) -> Vec<(String, u32)> {
        let topics: Vec<String> = match &self.topics {
            Some(ts) => ts.clone(),
            None => log.topics().into_iter().map(|t| t.config.name).collect(),
        };
        let mut out = Vec::new();
        for t in topics {
            if let Ok(info) = log.topic(&t) {
                out.extend((0..info.config.partitions).map(|p| (t.clone(), p)));
            }
        }
        // The same order on every node: a cluster's nodes share them out by it.
        out.sort();
        out.dedup();
        out
    }

    /// The durable cursors: each held back to the oldest message in flight.
    fn cursors(s: &State) -> Vec<(String, u32, u64)> {
        let mut c = s.cursors.clone();
        let held = s
            .members
            .iter()
            .flat_map(|m| m.queue.iter().chain(m.unacked.iter()))
            .chain(s.redeliver.iter());
        for (t, p, o) in held {
            if let Some(x) = c.get_mut(&(t.clone(), *p)) {
                *x = (*x).min(*o);
            }
        }
        c.into_iter().map(|((t, p), o)| (t, p, o)).collect()
    }

    /// This node's record of the group, as stored.
    fn record(&self, s: &State) -> Option<Vec<u8>> {
        let cursors = Self::cursors(s);
        match self.node {
            None => postcard::to_stdvec(&Stored {
                version: 1,
                cursors,
            }),
            Some(_) => postcard::to_stdvec(&StoredNode {
                version: 2,
                cursors,
                members: !s.members.is_empty(),
                beat: s.beat,
            }),
        }
        .ok()
    }
}

/// Every shared subscription group of a node.
#[derive(Debug)]
pub struct Groups {
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    router: topic::Router,
    policy: Policy,
    max: usize,
    /// On a cluster: this node's id.
    node: Option<u64>,
    /// On a cluster: the other nodes' records, per group and node.
    peers: Mutex<HashMap<(String, String), BTreeMap<u64, Seen>>>,
}

impl Groups {
    /// Loads the stored groups (their holders come back with the sessions).
    pub fn load(
        log: &Log,
        router: topic::Router,
        policy: Policy,
        max: usize,
    ) -> tributary_storage::Result<Self> {
        let node = log.leadership().map(|l| l.borrow().node);
        let mut groups: HashMap<(String, String), Arc<Group>> = HashMap::new();
        for (k, v) in log.meta(SHARED)? {
            let Some((name, filter, owner)) = parse_key(&k) else {
                continue;
            };
            let cursors = match owner {
                None => postcard::from_bytes::<Stored>(&v).map(|s| s.cursors),
                // Another node's record: read once a second (`save`).
                Some(n) if Some(n) != node => continue,
                Some(_) => postcard::from_bytes::<StoredNode>(&v).map(|s| s.cursors),
            };
            let Ok(cursors) = cursors else {
                tracing::warn!(group = %name, "a stored shared subscription group does not decode; dropped");
                continue;
            };
            let group = groups
                .entry((name.to_owned(), filter.to_owned()))
                .or_insert_with(|| {
                    Arc::new(Group {
                        filter: filter.to_owned(),
                        topics: router.sources(filter),
                        policy,
                        node,
                        state: Mutex::new(State::default()),
                    })
                });
            let mut s = lock(&group.state);
            // A record from before the node was in a cluster: rewritten as
            // this node's at the first save.
            s.legacy |= owner.is_none() && node.is_some();
            for (t, p, o) in cursors {
                let c = s.cursors.entry((t, p)).or_insert(o);
                *c = (*c).max(o);
            }
        }
        let groups = Groups {
            groups: Mutex::new(groups),
            router,
            policy,
            max,
            node,
            peers: Mutex::new(HashMap::new()),
        };
        groups.read_peers(log);
        groups.apply_peers(&lock(&groups.groups));
        Ok(groups)
    }

    /// On a cluster: reads the other nodes' records of every group.
    fn read_peers(&self, log: &Log) {
        let Some(me) = self.node else {
            return;
        };
        let records = match log.meta(SHARED) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared subscription groups of the other nodes");
                return;
            }
        };
        let now = Instant::now();
        let mut peers = lock(&self.peers);
        let mut seen: HashMap<(String, String), BTreeMap<u64, Seen>> = HashMap::new();
        for (k, v) in records {
            let Some((name, filter, Some(n))) = parse_key(&k) else {
                continue;
            };
            if n == me {
                continue;
            }
            let Ok(r) = postcard::from_bytes::<StoredNode>(&v) else {
                continue;
            };
            let key = (name.to_owned(), filter.to_owned());
            let moved = match peers.get(&key).and_then(|m| m.get(&n)) {
                Some(old) if old.beat == r.beat => old.moved,
                _ => now,
            };
            seen.entry(key).or_default().insert(
                n,
                Seen {
                    members: r.members,
                    beat: r.beat,
                    moved,
                    cursors: r.cursors,
                },
            );
        }
        *peers = seen;
    }

    /// On a cluster: tells each group which other nodes dispatch it now and
    /// how far they stored.
    fn apply_peers(&self, groups: &HashMap<(String, String), Arc<Group>>) {
        if self.node.is_none() {
            return;
        }
        let peers = lock(&self.peers);
        for (key, g) in groups {
            let mut s = lock(&g.state);
            let before = std::mem::take(&mut s.peers_live);
            s.peer_cursors.clear();
            for (&n, seen) in peers.get(key).into_iter().flatten() {
                if seen.members && seen.moved.elapsed() < STALE {
                    s.peers_live.push(n);
                }
                for (t, p, o) in &seen.cursors {
                    let c = s.peer_cursors.entry((t.clone(), *p)).or_insert(*o);
                    *c = (*c).max(*o);
                }
            }
            if s.peers_live != before {
                // The partitions change hands: a dispatch pass now, not at
                // the next record.
                for m in &s.members {
                    m.notify.notify_one();
                }
            }
        }
    }

    /// The group of `$share/name/filter`, created (starting at the end of
    /// the log) when new; `None` when `max_shared_groups` are in use.
    pub fn hold(&self, log: &Log, name: &str, filter: &str, client: &str) -> Option<Arc<Group>> {
        let key = (name.to_owned(), filter.to_owned());
        if self.node.is_some() && !lock(&self.groups).contains_key(&key) {
            // Another node may have the group already: it goes on from there.
            self.read_peers(log);
        }
        let mut groups = lock(&self.groups);
        let group = match groups.get(&key) {
            Some(g) => g.clone(),
            None => {
                if groups.len() >= self.max {
                    return None;
                }
                let g = Arc::new(Group {
                    filter: filter.to_owned(),
                    topics: self.router.sources(filter),
                    policy: self.policy,
                    node: self.node,
                    state: Mutex::new(State::default()),
                });
                groups.insert(key, g.clone());
                self.apply_peers(&groups);
                {
                    let mut s = lock(&g.state);
                    for (t, p) in g.sources(log) {
                        let from = match s.peer_cursors.get(&(t.clone(), p)) {
                            Some(&c) => c,
                            None => match log.offsets(&t, p) {
                                Ok((_, end)) => end,
                                Err(_) => continue,
                            },
                        };
                        s.cursors.insert((t, p), from);
                    }
                    s.dirty = true;
                }
                g
            }
        };
        lock(&group.state).holders.insert(client.to_owned());
        Some(group)
    }

    /// A session no longer holds `$share/name/filter` (unsubscribed, or the
    /// session ended): the last holder's going ends the group.
    pub fn release(&self, name: &str, filter: &str, client: &str) {
        let groups = lock(&self.groups);
        if let Some(g) = groups.get(&(name.to_owned(), filter.to_owned())) {
            let mut s = lock(&g.state);
            s.holders.remove(client);
            s.dirty = true;
        }
    }

    /// A session ended: it holds none of its shared subscriptions any more.
    pub fn release_all<'a>(&self, client: &str, filters: impl IntoIterator<Item = &'a str>) {
        for f in filters {
            if let Some(Ok((name, filter))) = parse(f) {
                self.release(name, filter, client);
            }
        }
    }

    /// Stores moved cursors and forgets groups nobody holds (once a second).
    pub async fn save(&self, log: &Log) {
        self.read_peers(log);
        let node = self.node;
        let mut entries = Vec::new();
        {
            let mut groups = lock(&self.groups);
            self.apply_peers(&groups);
            groups.retain(|(name, filter), g| {
                let mut s = lock(&g.state);
                if s.legacy {
                    entries.push((Group::key(name, filter, None), None));
                    s.legacy = false;
                    s.dirty = true;
                }
                if s.holders.is_empty() && s.members.is_empty() {
                    entries.push((Group::key(name, filter, node), None));
                    return false;
                }
                if node.is_some() {
                    // The beat that tells the other nodes this one is
                    // dispatching; its end, when the last member left.
                    if !s.members.is_empty() {
                        s.beat += 1;
                        s.dirty = true;
                        let since = *s.announced.get_or_insert_with(Instant::now);
                        if since.elapsed() >= GRACE && !std::mem::replace(&mut s.settled, true) {
                            // Its share is this node's now: a dispatch pass.
                            for m in &s.members {
                                m.notify.notify_one();
                            }
                        }
                    } else if s.announced.take().is_some() {
                        s.settled = false;
                        s.dirty = true;
                    }
                }
                if std::mem::take(&mut s.dirty) {
                    if let Some(v) = g.record(&s) {
                        entries.push((Group::key(name, filter, node), Some(v)));
                    }
                }
                true
            });
        }
        if !entries.is_empty() {
            if let Err(e) = log.put_meta(SHARED, entries).await {
                tracing::warn!(error = %e, "cannot store shared subscription groups");
            }
        }
    }

    /// Groups in use (tests, metrics).
    pub fn len(&self) -> usize {
        lock(&self.groups).len()
    }

    /// True without groups.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_filters_parse_as_the_spec_says() {
        assert_eq!(parse("a/b"), None);
        assert_eq!(parse("$share/g/a/#"), Some(Ok(("g", "a/#"))));
        assert_eq!(parse("$share/g//x"), Some(Ok(("g", "/x"))));
        for bad in [
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/a/#/b",
            "$share/",
        ] {
            assert_eq!(parse(bad), Some(Err(())), "{bad}");
        }
    }

    #[test]
    fn a_record_key_names_its_node_on_a_cluster_only() {
        for node in [None, Some(3)] {
            let k = Group::key("g", "a/#", node);
            assert_eq!(parse_key(&k), Some(("g", "a/#", node)));
        }
        assert_eq!(parse_key(b"g\0a\0x"), None, "a node id is a number");
        assert_eq!(parse_key(b"no-separator"), None);
    }

    #[test]
    fn the_nodes_with_members_share_the_partitions_out_after_the_grace() {
        let mut s = State::default();
        // Alone: every partition.
        assert!((0..4).all(|i| Group::owns(&s, 2, i)));
        // Another node dispatches and this one has not announced long
        // enough: none.
        s.peers_live = vec![1];
        s.announced = Some(Instant::now());
        assert!((0..4).all(|i| !Group::owns(&s, 2, i)));
        // After the grace: every other one, in the order of the node ids,
        // as node 1 sees it too.
        s.announced = Instant::now().checked_sub(GRACE);
        let mine: Vec<usize> = (0..4).filter(|&i| Group::owns(&s, 2, i)).collect();
        assert_eq!(mine, [1, 3]);
        let theirs = State {
            peers_live: vec![2],
            announced: Instant::now().checked_sub(GRACE),
            ..State::default()
        };
        let other: Vec<usize> = (0..4).filter(|&i| Group::owns(&theirs, 1, i)).collect();
        assert_eq!(other, [0, 2]);
    }
}
