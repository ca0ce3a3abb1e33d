//! The brokers a Kafka client is told of. A single node is the one broker
//! (id 1), leader of every partition and coordinator of everything.
//!
//! On a cluster every node is a broker, with its cluster node id:
//!
//! - each node publishes its Kafka endpoint (host, port, TLS port) in the
//!   replicated metadata at start ([`publish`]), so that every node can
//!   name every other one;
//! - Metadata lists the voters that published one, names the Raft leader
//!   leader of every partition (its writes need no forwarding hop) and
//!   every voter a replica in sync (each holds every committed record);
//! - FindCoordinator names the leader for groups and transactional ids:
//!   the coordinators run there, for one term at a time, and answer
//!   NOT_COORDINATOR elsewhere, so a client finds the new leader after a
//!   failover as it finds a moved coordinator on Kafka.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tributary_storage::{Guard, Leadership, Log};

use crate::conn::Session;
use crate::handlers::{advertised, NODE_ID};

/// Metadata space of the nodes' Kafka endpoints (key: the node id).
const SPACE: &str = "__kafka_brokers";

/// Where clients reach a node's Kafka listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port of the plain listener.
    pub port: u16,
    /// Port of the TLS listener, if it has one.
    pub tls_port: Option<u16>,
}

/// Writes `endpoint` as this node's, trying again until the cluster takes
/// it (it starts before a write can succeed when a majority is down).
pub(crate) async fn publish(log: Log, endpoint: Endpoint, shutdown: CancellationToken) {
    let Some(leadership) = log.leadership() else {
        return;
    };
    let node = leadership.borrow().node;
    let Ok(value) = postcard::to_allocvec(&endpoint) else {
        return;
    };
    let key = node.to_string().into_bytes();
    loop {
        if log.meta_get(SPACE, &key).ok().flatten().as_deref() == Some(value.as_slice()) {
            return;
        }
        match log
            .put_meta(SPACE, vec![(key.clone(), Some(value.clone()))])
            .await
        {
            Ok(()) => {
                tracing::info!(node, host = %endpoint.host, port = endpoint.port, "kafka: endpoint published to the cluster");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "kafka: publishing the endpoint failed; trying again")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// The claim a leader's transaction coordinator takes for its term.
pub(crate) fn coordinator_claim(l: &Leadership) -> Guard {
    Guard {
        space: tributary_groups::CLAIM_SPACE.into(),
        key: b"transactions".to_vec(),
        value: format!("{}:{}", l.node, l.term).into_bytes(),
    }
}

/// The broker ids: this node alone, or a cluster's voters (each holds
/// every partition).
pub(crate) fn broker_ids(s: &Session) -> Vec<i32> {
    match s.server.cx.log.leadership() {
        None => vec![NODE_ID],
        Some(l) => l
            .borrow()
            .voters
            .iter()
            .map(|n| i32::try_from(*n).unwrap_or(i32::MAX))
            .collect(),
    }
}

/// Whether a partition's replica list names distinct brokers of `brokers`
/// (at least one). Every partition is kept on every broker whichever it
/// names.
pub(crate) fn names_brokers(replicas: &[i32], brokers: &[i32]) -> bool {
    let mut seen: Vec<i32> = replicas.to_vec();
    seen.sort_unstable();
    seen.dedup();
    !replicas.is_empty()
        && seen.len() == replicas.len()
        && replicas.iter().all(|b| brokers.contains(b))
}

/// Why an assignment was refused, for the error message.
pub(crate) fn assignment_rule(brokers: &[i32], new: bool) -> String {
    let which = if new {
        "each new partition"
    } else {
        "each partition 0..n"
    };
    match brokers {
        [one] => format!("this node is the one broker ({one}): {which} gets exactly it"),
        _ => format!(
            "{which} names distinct brokers among {brokers:?} (every partition is kept on all of them)"
        ),
    }
}

/// What one client is told.
pub(crate) struct View {
    /// Broker id, host, port.
    pub(crate) brokers: Vec<(i32, String, i32)>,
    /// The leader's broker id, if known and reachable (it published an
    /// endpoint), and not this node cut off from the majority.
    pub(crate) leader: Option<i32>,
}

impl View {
    /// The leader of every partition: the cluster's leader, or none while
    /// none is known or this node leads cut off from the majority (Kafka's
    /// partition without a leader: clients ask again, of any broker).
    pub(crate) fn partition_leader(&self) -> Option<i32> {
        self.leader
    }

    /// Host and port of broker `id`.
    pub(crate) fn endpoint(&self, id: i32) -> Option<(String, i32)> {
        self.brokers
            .iter()
            .find(|(b, _, _)| *b == id)
            .map(|(_, h, p)| (h.clone(), *p))
    }
}

/// The brokers as `s`'s client is to see them: with the ports of the kind
/// of listener it reached (plain or TLS), and this node at the address the
/// client reached it by (unless `kafka.advertised_host` says otherwise).
pub(crate) fn view(s: &Session) -> View {
    let (host, port) = advertised(s);
    let Some(leadership) = s.server.cx.log.leadership() else {
        return View {
            brokers: vec![(NODE_ID, host, port)],
            leader: Some(NODE_ID),
        };
    };
    let l = leadership.borrow().clone();
    let id = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    let me = id(l.node);
    let published: BTreeMap<u64, Endpoint> = s
        .server
        .cx
        .log
        .meta(SPACE)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| {
            let node = std::str::from_utf8(&k).ok()?.parse().ok()?;
            Some((node, postcard::from_bytes(&v).ok()?))
        })
        .collect();
    let mut brokers = vec![(me, host, port)];
    for voter in l.voters.iter().filter(|v| **v != l.node) {
        let Some(e) = published.get(voter) else {
            continue;
        };
        let port = if s.tls {
            e.tls_port.unwrap_or(e.port)
        } else {
            e.port
        };
        brokers.push((id(*voter), e.host.clone(), i32::from(port)));
    }
    brokers.sort_by_key(|(b, _, _)| *b);
    // A leader cut off from the majority may not lead any more: it names
    // none (its coordinators refuse, see `Leadership::cut_off`).
    let leader = l
        .leader
        .filter(|_| !l.cut_off)
        .map(id)
        .filter(|leader| brokers.iter().any(|(b, _, _)| b == leader));
    View { brokers, leader }
}
