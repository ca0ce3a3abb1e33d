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
//! Memory: per group, one position per message in flight, bounded by the
//! members' windows; groups are bounded by `max_shared_groups`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

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
}

/// One shared subscription group: `$share/{name}/{filter}`.
#[derive(Debug)]
pub struct Group {
    filter: String,
    /// The log topics the filter can match (`None`: every topic).
    topics: Option<Vec<String>>,
    policy: Policy,
    state: Mutex<State>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    version: u8,
    cursors: Vec<(String, u32, u64)>,
}

impl Group {
    fn key(name: &str, filter: &str) -> Vec<u8> {
        format!("{name}\0{filter}").into_bytes()
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
        for (t, p) in sources {
            let key = (t.clone(), p);
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
        out
    }

    /// The durable cursors: each held back to the oldest message in flight.
    fn stored(s: &State) -> Stored {
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
        Stored {
            version: 1,
            cursors: c.into_iter().map(|((t, p), o)| (t, p, o)).collect(),
        }
    }
}

/// Every shared subscription group of a node.
#[derive(Debug)]
pub struct Groups {
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    router: topic::Router,
    policy: Policy,
    max: usize,
}

impl Groups {
    /// Loads the stored groups (their holders come back with the sessions).
    pub fn load(
        log: &Log,
        router: topic::Router,
        policy: Policy,
        max: usize,
    ) -> tributary_storage::Result<Self> {
        let mut groups = HashMap::new();
        for (k, v) in log.meta(SHARED)? {
            let Some((name, filter)) = std::str::from_utf8(&k)
                .ok()
                .and_then(|k| k.split_once('\0'))
            else {
                continue;
            };
            let Ok(stored) = postcard::from_bytes::<Stored>(&v) else {
                tracing::warn!(group = %name, "a stored shared subscription group does not decode; dropped");
                continue;
            };
            let state = State {
                cursors: stored
                    .cursors
                    .into_iter()
                    .map(|(t, p, o)| ((t, p), o))
                    .collect(),
                ..State::default()
            };
            groups.insert(
                (name.to_owned(), filter.to_owned()),
                Arc::new(Group {
                    filter: filter.to_owned(),
                    topics: router.sources(filter),
                    policy,
                    state: Mutex::new(state),
                }),
            );
        }
        Ok(Groups {
            groups: Mutex::new(groups),
            router,
            policy,
            max,
        })
    }

    /// The group of `$share/name/filter`, created (starting at the end of
    /// the log) when new; `None` when `max_shared_groups` are in use.
    pub fn hold(&self, log: &Log, name: &str, filter: &str, client: &str) -> Option<Arc<Group>> {
        let mut groups = lock(&self.groups);
        let key = (name.to_owned(), filter.to_owned());
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
                    state: Mutex::new(State::default()),
                });
                {
                    let mut s = lock(&g.state);
                    for (t, p) in g.sources(log) {
                        if let Ok((_, end)) = log.offsets(&t, p) {
                            s.cursors.insert((t, p), end);
                        }
                    }
                    s.dirty = true;
                }
                groups.insert(key, g.clone());
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
        let mut entries = Vec::new();
        {
            let mut groups = lock(&self.groups);
            groups.retain(|(name, filter), g| {
                let mut s = lock(&g.state);
                if s.holders.is_empty() && s.members.is_empty() {
                    entries.push((Group::key(name, filter), None));
                    return false;
                }
                if std::mem::take(&mut s.dirty) {
                    if let Ok(v) = postcard::to_stdvec(&Group::stored(&s)) {
                        entries.push((Group::key(name, filter), Some(v)));
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
}
