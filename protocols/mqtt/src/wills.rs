//! Delayed wills, stored. A will with a delay (MQTT 5 will delay interval)
//! waits in its session's slot on the node its connection was on; it is
//! also written to the metadata space `mqtt.wills` (one record per client
//! id), so that it survives the node:
//!
//! - the node started again loads its own records and publishes each when
//!   it is due (at once if it fell due while the node was down: MQTT 5
//!   section 3.1.2.5 lets a server that failed defer a will to its restart);
//! - on a cluster, a will whose node has not published it some time after
//!   it was due ([`ORPHANED`]: the node is dead) is published by the leader;
//!   a single node likewise tries again a will it failed to publish.
//!
//! A will is published once: whoever publishes it first takes the record
//! (a write made only while the record is as read), then appends the will
//! and removes the record, both only while the record is as it took it. A
//! client back before the delay (on any node) removes the record, so a
//! node still holding the will in memory cannot publish it. A node killed
//! between its append and the removal publishes it again when it restarts
//! (at least once).

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tributary_devices::auth::Identity;
use tributary_storage::{Guard, Log, Result as LogResult};

use super::codec::Will;
use super::session::StoredProps;

/// Metadata space of delayed wills.
pub const WILLS: &str = "mqtt.wills";

/// How long after its due time a stored will waits before the leader (or a
/// single node) publishes it: its node is dead, or failed to publish it.
pub const ORPHANED: Duration = Duration::from_secs(10);

/// A will as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    version: u8,
    /// The node that holds it (0 on a single node).
    pub node: u64,
    /// When it is due (ms since the epoch).
    pub due_ms: u64,
    /// Taken to be published (by `node`).
    pub taken: bool,
    device: String,
    credential: u64,
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    delay: u32,
    props: StoredProps,
}

impl Stored {
    /// The record of `will`, left by `identity`, due at `due_ms`.
    pub fn new(node: u64, due_ms: u64, identity: &Identity, will: &Will) -> Stored {
        Stored {
            version: 1,
            node,
            due_ms,
            taken: false,
            device: identity.id.clone(),
            credential: identity.credential,
            topic: will.topic.clone(),
            payload: will.payload.to_vec(),
            qos: will.qos,
            retain: will.retain,
            delay: will.delay,
            props: StoredProps::new(&will.props),
        }
    }

    /// Who left it, and the will.
    pub fn will(&self) -> (Identity, Will) {
        let identity = Identity {
            id: self.device.clone(),
            credential: self.credential,
        };
        let will = Will {
            topic: self.topic.clone(),
            payload: Bytes::from(self.payload.clone()),
            qos: self.qos,
            retain: self.retain,
            delay: self.delay,
            props: self.props.clone().props(),
        };
        (identity, will)
    }

    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// A stored record; `None` when it does not decode.
    pub fn decode(bytes: &[u8]) -> Option<Stored> {
        postcard::from_bytes(bytes).ok()
    }
}

fn guard(client: &str, value: Vec<u8>) -> Guard {
    Guard {
        space: WILLS.into(),
        key: client.as_bytes().to_vec(),
        value,
    }
}

/// Stores a will waiting for its delay: `stored` is what [`Stored::encode`]
/// gave.
pub async fn store(log: &Log, client: &str, stored: Vec<u8>) -> LogResult<()> {
    log.put_meta(WILLS, vec![(client.as_bytes().to_vec(), Some(stored))])
        .await
}

/// The client is back: its stored will, if any, is void.
pub async fn cancel(log: &Log, client: &str) -> LogResult<()> {
    if log.meta_get(WILLS, client.as_bytes())?.is_none() {
        return Ok(());
    }
    log.put_meta(WILLS, vec![(client.as_bytes().to_vec(), None)])
        .await
}

/// Removes `client`'s will if it is still the one stored as `stored`.
pub async fn withdraw(log: &Log, client: &str, stored: Vec<u8>) -> LogResult<()> {
    let entry = vec![(client.as_bytes().to_vec(), None)];
    match log
        .put_meta_guarded(WILLS, entry, Some(&guard(client, stored)))
        .await
    {
        Err(tributary_storage::Error::Superseded(_)) => Ok(()),
        r => r,
    }
}

/// Takes `client`'s will, stored as `read`, for node `node` to publish:
/// the log handle to append it through (its writes refused once the
/// record has changed), or `None` when the record is no longer as read
/// (the client is back, or another node took it).
pub async fn take(log: &Log, client: &str, read: &[u8], node: u64) -> Option<Log> {
    let mut record = Stored::decode(read)?;
    record.node = node;
    record.taken = true;
    let taken = record.encode();
    let entry = vec![(client.as_bytes().to_vec(), Some(taken.clone()))];
    match log
        .put_meta_guarded(WILLS, entry, Some(&guard(client, read.to_vec())))
        .await
    {
        Ok(()) => Some(log.guarded(guard(client, taken))),
        Err(tributary_storage::Error::Superseded(_)) => None,
        Err(e) => {
            tracing::warn!(%client, error = %e, "cannot take a stored will; it stays for later");
            None
        }
    }
}

/// Removes a published will through the handle [`take`] gave.
pub async fn published(taken: &Log, client: &str) {
    let entry = vec![(client.as_bytes().to_vec(), None)];
    if let Err(e) = taken.put_meta(WILLS, entry).await {
        tracing::warn!(%client, error = %e, "cannot remove a published will");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MsgProps;

    #[test]
    fn a_stored_will_reads_back_whole() {
        let will = Will {
            topic: "wills/a".into(),
            payload: Bytes::from_static(b"gone"),
            qos: 1,
            retain: true,
            delay: 5,
            props: MsgProps {
                payload_format: Some(1),
                expiry: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation: Some(Bytes::from_static(b"c")),
                user: vec![("k".into(), "v".into())],
            },
        };
        let identity = Identity {
            id: "dev".into(),
            credential: 7,
        };
        let s = Stored::new(2, 1234, &identity, &will);
        let back = Stored::decode(&s.encode()).expect("decodes");
        assert_eq!(back, s);
        let (i, w) = back.will();
        assert_eq!((i.id.as_str(), i.credential), ("dev", 7));
        assert_eq!(w, will);
        assert_eq!(Stored::decode(b"\x01garbage"), None);
    }
}
