//! The Raft group's types: an entry carries one write of the log (an
//! [`Op`]); applying it answers what the log answered.

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tributary_storage::{Applied, Error, Op};

/// A node's id in the cluster (`cluster.node_id`).
pub type NodeId = u64;

/// One entry of the replicated log: a write of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request(pub Op);

/// What applying an entry gave on the node that applied it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response(pub Result<Applied, Error>);

openraft::declare_raft_types!(
    /// The cluster's Raft types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot_data::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A storage error of the Raft group.
pub type StorageError = openraft::StorageError<NodeId>;

/// The group's handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// An append of one record of `bytes` bytes, at index `i`.
#[cfg(test)]
pub(crate) fn big_entry(i: u64, bytes: usize) -> openraft::Entry<TypeConfig> {
    let mut chunk = tributary_storage::batch::BatchBuilder::with_capacity(bytes + 64);
    chunk.push(&tributary_storage::Event::new(vec![7u8; bytes]), 0);
    let op = Op::Append {
        topic: "t".into(),
        parts: vec![tributary_storage::OpPart {
            partition: 0,
            count: 1,
            chunks: vec![chunk],
        }],
        producer: None,
        transactional: false,
    };
    openraft::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
        payload: openraft::EntryPayload::Normal(crate::types::Request(op)),
    }
}
