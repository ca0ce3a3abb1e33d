//! Sessions: what a client id keeps between connections (subscriptions,
//! per-partition cursors into the log, unacknowledged deliveries, QoS 2 packet
//! ids), takeover, expiry and delayed wills. Persistent sessions are stored in
//! the log's metadata space `mqtt.sessions`; retained messages in `mqtt.retained`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tributary_storage::util::lock;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_storage::{Error as LogError, Guard, Log};

use super::codec::{MsgProps, PublishOut, Will};
use super::{wills, Server, Slot, Slots};
use tributary_devices::auth::Identity;

/// Metadata space of persistent sessions.
pub const SESSIONS: &str = "mqtt.sessions";
/// Metadata space of retained messages.
pub const RETAINED: &str = "mqtt.retained";
/// On a cluster: which connection holds each session (its claim, taken at
/// CONNECT on whichever node; the session's writes carry it).
pub const OWNERS: &str = "mqtt.owners";

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sub {
    /// Topic filter.
    pub filter: String,
    /// Granted QoS (0..=2).
    pub qos: u8,
    /// v5 retain as published.
    pub retain_as_published: bool,
    /// v5 subscription identifier.
    pub id: Option<u64>,
    /// v5 no local: skip messages this client published.
    pub no_local: bool,
}

/// Where a delivery came from (what a resend reads again).
#[derive(Debug, Clone)]
pub enum Inflight {
    /// A record of the log (re-read on redelivery).
    Log {
        /// Log topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// A retained message or anything not at a log position.
    Owned(Box<PublishOut>),
}

/// A delivery waiting for its acknowledgement: QoS 1 until PUBACK; QoS 2
/// until PUBREC (then `released`: PUBREL sent) and PUBCOMP.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Send order (resends go in this order).
    pub seq: u64,
    /// 1 or 2.
    pub qos: u8,
    /// QoS 2: PUBREC came and PUBREL went out; waiting for PUBCOMP.
    pub released: bool,
    /// What was delivered.
    pub at: Inflight,
    /// The shared subscription group it came from (told when the client has it).
    pub shared: Option<Arc<super::shared::Group>>,
}

/// A session's state.
#[derive(Debug, Clone)]
pub struct Session {
    /// Session expiry interval in seconds (0: ends with the connection).
    pub expiry: u32,
    /// Subscriptions.
    pub subs: Vec<Sub>,
    /// Next offset to read, per tailed (log topic, partition).
    pub cursors: BTreeMap<(String, u32), u64>,
    /// Deliveries not yet acknowledged, by packet id.
    pub inflight: BTreeMap<u16, Pending>,
    /// Send sequence of the next delivery (redeliveries go in this order).
    pub next_seq: u64,
    /// QoS 2 packet ids received (and stored) but not yet released.
    pub qos2: BTreeSet<u16>,
    /// Next packet id to try for deliveries.
    pub next_pkid: u16,
    /// A durable record of this session exists.
    pub stored: bool,
    /// After a restart: per partition, the offset up to which records had
    /// been sent before. Records below it go out again marked DUP at QoS 1;
    /// those delivered at QoS 2 were either completed or are in `inflight`
    /// (stored with their packet id), so they are not sent as new.
    pub replay: BTreeMap<(String, u32), u64>,
    /// On a cluster: the claim its writes carry. A connection to another
    /// node that takes the session over claims it anew, and from then on
    /// this copy's writes are refused ([`LogError::Superseded`]).
    pub guard: Option<Guard>,
}

impl Session {
    /// A fresh session.
    pub fn new(expiry: u32) -> Self {
        Session {
            expiry,
            subs: Vec::new(),
            cursors: BTreeMap::new(),
            inflight: BTreeMap::new(),
            next_seq: 0,
            qos2: BTreeSet::new(),
            next_pkid: 1,
            stored: false,
            replay: BTreeMap::new(),
            guard: None,
        }
    }

    /// A free packet id for a delivery.
    pub fn take_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// The durable form. Cursors go back to the oldest unacknowledged QoS 1
    /// delivery (at least once); QoS 2 deliveries of the log are stored with
    /// their packet id and state (exactly once), and `sent` keeps where
    /// delivery had got to, so the replay after a restart does not send them
    /// again as new messages.
    fn record(&self) -> StoredSession {
        let mut cursors = self.cursors.clone();
        let mut out2 = Vec::new();
        for (pkid, f) in &self.inflight {
            if f.shared.is_some() {
                // The group keeps (and redelivers) its own messages.
                continue;
            }
            let Inflight::Log {
                topic,
                partition,
                offset,
            } = &f.at
            else {
                continue;
            };
            if f.qos == 2 {
                out2.push(StoredOut2 {
                    pkid: *pkid,
                    seq: f.seq,
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    released: f.released,
                });
            } else if let Some(c) = cursors.get_mut(&(topic.clone(), *partition)) {
                *c = (*c).min(*offset);
            }
        }
        let mut sent: BTreeMap<(String, u32), u64> = self.replay.clone();
        for (k, o) in &self.cursors {
            let e = sent.entry(k.clone()).or_insert(*o);
            *e = (*e).max(*o);
        }
        StoredSession {
            version: STORED_VERSION,
            expiry: self.expiry,
            subs: self.subs.clone(),
            cursors: cursors.into_iter().map(|((t, p), o)| (t, p, o)).collect(),
            qos2: self.qos2.iter().copied().collect(),
            out2,
            sent: sent.into_iter().map(|((t, p), o)| (t, p, o)).collect(),
        }
    }

    /// A session from its durable form (either version).
    pub(crate) fn restore(bytes: &[u8]) -> Result<Session, postcard::Error> {
        let (version, _) = postcard::take_from_bytes::<u8>(bytes)?;
        let stored = if version == 1 {
            let v1: StoredSessionV1 = postcard::from_bytes(bytes)?;
            StoredSession {
                version: 1,
                expiry: v1.expiry,
                subs: v1.subs,
                cursors: v1.cursors,
                qos2: v1.qos2,
                out2: Vec::new(),
                sent: Vec::new(),
            }
        } else {
            postcard::from_bytes::<StoredSession>(bytes)?
        };
        let mut s = Session::new(stored.expiry);
        s.subs = stored.subs;
        s.cursors = stored
            .cursors
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect();
        s.qos2 = stored.qos2.into_iter().collect();
        for o in stored.out2 {
            s.next_seq = s.next_seq.max(o.seq + 1);
            s.inflight.insert(
                o.pkid,
                Pending {
                    seq: o.seq,
                    qos: 2,
                    released: o.released,
                    at: Inflight::Log {
                        topic: o.topic,
                        partition: o.partition,
                        offset: o.offset,
                    },
                    shared: None,
                },
            );
        }
        for (t, p, o) in stored.sent {
            if s.cursors.get(&(t.clone(), p)).is_some_and(|c| *c < o) {
                s.replay.insert((t, p), o);
            }
        }
        s.stored = true;
        Ok(s)
    }
}

/// The stored session format's version (1: before QoS 2 deliveries were kept).
const STORED_VERSION: u8 = 2;

#[derive(Debug, Serialize, Deserialize)]
struct StoredSession {
    version: u8,
    expiry: u32,
    subs: Vec<Sub>,
    cursors: Vec<(String, u32, u64)>,
    qos2: Vec<u16>,
    out2: Vec<StoredOut2>,
    sent: Vec<(String, u32, u64)>,
}

/// A QoS 2 delivery of a log record, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct StoredOut2 {
    pkid: u16,
    seq: u64,
    topic: String,
    partition: u32,
    offset: u64,
    released: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSessionV1 {
    version: u8,
    expiry: u32,
    subs: Vec<Sub>,
    cursors: Vec<(String, u32, u64)>,
    qos2: Vec<u16>,
}

/// Stores (or removes, for sessions that end with their connection) a session.
pub async fn persist(
    log: &Log,
    client_id: &str,
    session: &mut Session,
) -> tributary_storage::Result<()> {
    let guard = session.guard.as_ref();
    if session.expiry == 0 {
        if session.stored {
            log.put_meta_guarded(SESSIONS, vec![(client_id.as_bytes().to_vec(), None)], guard)
                .await?;
            session.stored = false;
        }
        return Ok(());
    }
    let bytes = postcard::to_stdvec(&session.record())
        .map_err(|e| tributary_storage::Error::Config(e.to_string()))?;
    log.put_meta_guarded(
        SESSIONS,
        vec![(client_id.as_bytes().to_vec(), Some(bytes))],
        guard,
    )
    .await?;
    session.stored = true;
    Ok(())
}

/// The claim on `client_id`'s session as it stands (an empty value when
/// none was taken: such a guard never holds).
pub(crate) fn owner_now(log: &Log, client_id: &str) -> Guard {
    Guard {
        space: OWNERS.into(),
        key: client_id.as_bytes().to_vec(),
        value: log
            .meta_get(OWNERS, client_id.as_bytes())
            .ok()
            .flatten()
            .unwrap_or_default(),
    }
}

/// On a cluster: claims `client_id`'s session for a new connection
/// (`conn_id` on this node), then reads its stored state, which includes
/// every write of the connections that held it before, on any node.
/// `Ok(None)`: no stored session.
pub(crate) async fn take_over(
    log: &Log,
    client_id: &str,
    conn_id: u64,
) -> tributary_storage::Result<(Guard, Option<Session>)> {
    let node = log.node_id();
    let guard = Guard {
        space: OWNERS.into(),
        key: client_id.as_bytes().to_vec(),
        value: format!("{node}:{conn_id}:{}", tributary_storage::util::now_ms()).into_bytes(),
    };
    log.claim(&guard).await?;
    let stored = log
        .meta_get(SESSIONS, client_id.as_bytes())?
        .and_then(|v| match Session::restore(&v) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(%client_id, error = %e, "a stored MQTT session does not decode; dropped");
                None
            }
        })
        .map(|s| Session {
            stored: true,
            guard: Some(guard.clone()),
            ..s
        });
    Ok((guard, stored))
}

/// Whether a write failed because the session was taken over on another
/// node of the cluster.
pub(crate) fn taken_over(e: &LogError) -> bool {
    matches!(e, LogError::Superseded(_))
}

/// A will waiting for its delay (or its session's end).
#[derive(Debug, Clone)]
pub struct PendingWill {
    /// Who left it: its rights are checked when it is published.
    pub identity: Identity,
    /// The will.
    pub will: Will,
    /// When to publish it.
    pub due: Instant,
    /// As stored in `mqtt.wills` (`None` when it could not be stored).
    pub stored: Option<Vec<u8>>,
}

/// Every session of the node.
#[derive(Debug)]
pub struct SessionStore {
    pub(super) slots: Slots,
}

impl SessionStore {
    /// Loads persistent sessions from the log's metadata. Their expiry clock
    /// restarts at load (the offline time before a restart is not counted).
    pub fn load(log: &Log) -> tributary_storage::Result<Self> {
        let mut slots = HashMap::new();
        for (k, v) in log.meta(SESSIONS)? {
            let Ok(client_id) = String::from_utf8(k) else {
                continue;
            };
            let s = match Session::restore(&v) {
                // On a cluster a stored session may be held by a
                // connection to another node: this copy's writes carry the
                // claim as it is now, refused once anyone claims it anew.
                Ok(s) if log.is_replicated() => Session {
                    guard: Some(owner_now(log, &client_id)),
                    ..s
                },
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%client_id, error = %e, "a stored MQTT session does not decode; dropped");
                    continue;
                }
            };
            let (_, released) = watch::channel(true);
            slots.insert(
                client_id,
                Slot {
                    owner: None,
                    kick: CancellationToken::new(),
                    released,
                    expires: expiry_deadline(s.expiry),
                    parked: Some(s),
                    will: None,
                },
            );
        }
        if !slots.is_empty() {
            tracing::info!(sessions = slots.len(), "persistent MQTT sessions loaded");
        }
        Ok(SessionStore {
            slots: std::sync::Mutex::new(slots),
        })
    }

    /// Takes in this node's stored wills (`mqtt.wills`): each waits in its
    /// session's slot until it is due, or is published at the first sweep
    /// when it fell due while the node was down or its session is gone.
    pub fn load_wills(&self, log: &Log) -> tributary_storage::Result<()> {
        let node = log.node_id();
        let now = Instant::now();
        let now_ms = tributary_storage::util::now_ms();
        let mut slots = self.lock();
        let mut loaded = 0;
        for (k, v) in log.meta(wills::WILLS)? {
            let Ok(client_id) = String::from_utf8(k) else {
                continue;
            };
            let Some(stored) = wills::Stored::decode(&v) else {
                tracing::warn!(%client_id, "a stored will does not decode; dropped");
                continue;
            };
            if stored.node != node {
                continue;
            }
            let wait = u64::try_from(i64::try_from(stored.due_ms).unwrap_or(i64::MAX) - now_ms)
                .unwrap_or(0);
            let (identity, will) = stored.will();
            let slot = slots.entry(client_id).or_insert_with(|| {
                // Its session is gone: the will is published at once.
                let (_, released) = watch::channel(true);
                Slot {
                    owner: None,
                    kick: CancellationToken::new(),
                    released,
                    expires: Some(now),
                    parked: None,
                    will: None,
                }
            });
            slot.will = Some(PendingWill {
                identity,
                will,
                due: now + Duration::from_millis(wait),
                stored: Some(v),
            });
            loaded += 1;
        }
        if loaded > 0 {
            tracing::info!(wills = loaded, "delayed MQTT wills loaded");
        }
        Ok(())
    }

    /// Number of sessions (online and offline).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True without sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        lock(&self.slots)
    }
}

/// When a session parked now expires (`None`: never).
pub fn expiry_deadline(expiry: u32) -> Option<Instant> {
    if expiry == u32::MAX {
        None
    } else {
        Instant::now().checked_add(Duration::from_secs(u64::from(expiry)))
    }
}

/// Publishes due wills and drops expired sessions, once a second.
pub async fn sweeper(broker: Arc<Server>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            () = broker.cx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&broker, Instant::now()).await;
        broker.shared.save(&broker.cx.log).await;
        ticks += 1;
        if ticks.is_multiple_of(5) {
            adopt_wills(&broker).await;
        }
    }
}

/// On a single node or a cluster's leader: publishes the stored wills
/// still there [`wills::ORPHANED`] after they were due. Their nodes are
/// down (one that comes back finds them gone), or could not publish them
/// when they were due (a write refused while the cluster had no leader, a
/// full disk): a will whose publication failed is tried again here.
async fn adopt_wills(broker: &Server) {
    let log = &broker.cx.log;
    let (node, leads) = log.leadership().map_or((0, true), |l| {
        let l = l.borrow();
        (l.node, l.leads())
    });
    if !leads {
        return;
    }
    let Ok(stored) = log.meta(wills::WILLS) else {
        return;
    };
    let late = tributary_storage::util::now_ms()
        - i64::try_from(wills::ORPHANED.as_millis()).unwrap_or(i64::MAX);
    for (k, v) in stored {
        let Ok(client) = String::from_utf8(k) else {
            continue;
        };
        let Some(s) = wills::Stored::decode(&v) else {
            continue;
        };
        if i64::try_from(s.due_ms).unwrap_or(i64::MAX) > late {
            continue;
        }
        if let Some(taken) = wills::take(log, &client, &v, node).await {
            tracing::info!(%client, node = s.node, "publishing a delayed will its node did not publish");
            let (identity, will) = s.will();
            broker.publish_will_through(&taken, &identity, will).await;
            wills::published(&taken, &client).await;
        }
    }
}

async fn sweep(broker: &Server, now: Instant) {
    let mut wills = Vec::new();
    let mut expired = Vec::new();
    {
        let mut slots = broker.sessions.lock();
        slots.retain(|id, slot| {
            if slot.owner.is_some() {
                return true;
            }
            let ends = slot.expires.is_some_and(|e| e <= now);
            if let Some(w) = slot.will.take_if(|w| w.due <= now || ends) {
                wills.push((id.clone(), w));
            }
            if ends {
                if let Some(s) = &slot.parked {
                    broker
                        .shared
                        .release_all(id, s.subs.iter().map(|s| s.filter.as_str()));
                }
                if let Some(s) = slot.parked.as_ref().filter(|s| s.stored) {
                    expired.push((id.clone(), s.guard.clone()));
                }
                return false;
            }
            true
        });
    }
    let log = &broker.cx.log;
    let node = log.node_id();
    for (client, w) in wills {
        let Some(read) = w.stored else {
            broker.publish_will(&w.identity, w.will).await;
            continue;
        };
        // Published only while the stored will is as this node left it:
        // not when the client came back on another node.
        if let Some(taken) = wills::take(log, &client, &read, node).await {
            broker
                .publish_will_through(&taken, &w.identity, w.will)
                .await;
            wills::published(&taken, &client).await;
        }
    }
    // On a cluster each removal carries its session's claim: a session
    // taken over on another node since is not this node's to remove.
    let (guarded, plain): (Vec<_>, Vec<_>) = expired.into_iter().partition(|(_, g)| g.is_some());
    if !plain.is_empty() {
        let entries = plain
            .into_iter()
            .map(|(id, _)| (id.into_bytes(), None))
            .collect();
        if let Err(e) = broker.cx.log.put_meta(SESSIONS, entries).await {
            tracing::warn!(error = %e, "cannot remove expired MQTT sessions");
        }
    }
    for (id, guard) in guarded {
        let entry = vec![(id.into_bytes(), None)];
        match broker
            .cx
            .log
            .put_meta_guarded(SESSIONS, entry, guard.as_ref())
            .await
        {
            Ok(()) => {}
            Err(e) if taken_over(&e) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove an expired MQTT session"),
        }
    }
}

/// A message's MQTT 5 properties as stored (retained messages, delayed
/// wills).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProps {
    payload_format: Option<u8>,
    expiry: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation: Option<Vec<u8>>,
    user: Vec<(String, String)>,
}

impl StoredProps {
    /// The stored form of `props`.
    pub fn new(props: &MsgProps) -> Self {
        StoredProps {
            payload_format: props.payload_format,
            expiry: props.expiry,
            content_type: props.content_type.clone(),
            response_topic: props.response_topic.clone(),
            correlation: props.correlation.as_ref().map(|c| c.to_vec()),
            user: props.user.clone(),
        }
    }

    /// The properties again.
    pub fn props(self) -> MsgProps {
        MsgProps {
            payload_format: self.payload_format,
            expiry: self.expiry,
            content_type: self.content_type,
            response_topic: self.response_topic,
            correlation: self.correlation.map(Bytes::from),
            user: self.user,
        }
    }
}

/// A retained message as stored. (postcard writes a nested struct as its
/// fields in order: the properties nested here are the same bytes as the
/// fields that were written here one by one before.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retained {
    payload: Vec<u8>,
    qos: u8,
    props: StoredProps,
    stored_ms: i64,
}

impl Retained {
    /// Builds the stored form.
    pub fn new(payload: &Bytes, qos: u8, props: &MsgProps) -> Self {
        Retained {
            payload: payload.to_vec(),
            qos,
            props: StoredProps::new(props),
            stored_ms: now_ms(),
        }
    }

    /// Encoded for the metadata space.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Topics with a retained message matching any of `filters`, each once,
    /// with the highest QoS granted among the filters it matches.
    pub fn topics_matching_any(log: &Log, filters: &[(String, u8)]) -> Vec<(String, u8)> {
        let Ok(keys) = log.meta_keys(RETAINED) else {
            return Vec::new();
        };
        keys.into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .filter_map(|t| {
                let granted = filters
                    .iter()
                    .filter(|(f, _)| super::topic::matches(&t, f))
                    .map(|(_, q)| *q)
                    .max()?;
                Some((t, granted))
            })
            .collect()
    }

    /// The retained message of `topic` as a delivery (`None`: gone or expired).
    pub fn load(log: &Log, topic: &str) -> Option<PublishOut> {
        let v = log.meta_get(RETAINED, topic.as_bytes()).ok()??;
        let r = postcard::from_bytes::<Retained>(&v).ok()?;
        let mut props = r.props.props();
        if let Some(e) = props.expiry {
            let left = i64::from(e) - (now_ms() - r.stored_ms) / 1000;
            if left <= 0 {
                return None;
            }
            props.expiry = Some(left as u32);
        }
        Some(PublishOut {
            topic: topic.to_owned(),
            alias: None,
            qos: r.qos,
            retain: true,
            dup: false,
            pkid: 0,
            payload: Bytes::from(r.payload),
            props,
            sub_ids: Vec::new(),
        })
    }
}

pub(super) use tributary_storage::util::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retained_message_stored_with_flat_properties_still_reads() {
        // The layout before the properties were one nested struct.
        #[derive(Serialize)]
        struct Flat {
            payload: Vec<u8>,
            qos: u8,
            payload_format: Option<u8>,
            expiry: Option<u32>,
            content_type: Option<String>,
            response_topic: Option<String>,
            correlation: Option<Vec<u8>>,
            user: Vec<(String, String)>,
            stored_ms: i64,
        }
        let flat = Flat {
            payload: b"p".to_vec(),
            qos: 1,
            payload_format: Some(1),
            expiry: None,
            content_type: Some("text/plain".into()),
            response_topic: Some("r".into()),
            correlation: Some(b"c".to_vec()),
            user: vec![("k".into(), "v".into())],
            stored_ms: 7,
        };
        let bytes = postcard::to_stdvec(&flat).expect("encode");
        let r: Retained = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(r.stored_ms, 7);
        let props = r.props.clone().props();
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.user, [("k".to_owned(), "v".to_owned())]);
        assert_eq!(r.encode(), bytes, "and writes the same bytes");
    }
}
