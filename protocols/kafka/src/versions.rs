//! The APIs this node serves and the versions it advertises in ApiVersions.
//!
//! A client uses, per API, the highest version both sides know, so these
//! ranges decide what clients send. The choices (each checked against the
//! clients' own sources; the ranges are listed in `docs/contract.md` §5a):
//! - Produce is advertised from v0 although only v3+ (record batch v2) is
//!   decoded: librdkafka up to 2.11.0 turns gzip, snappy and lz4 off when a
//!   broker's Produce range does not start at 0 (Apache Kafka 4 does the same;
//!   v0–2 requests close the connection, as there).
//! - Produce and Fetch stop at v12: v13 names topics by id.
//! - Fetch starts at v4 (record batch v2); ListOffsets at v1 (lookup by
//!   timestamp).
//! - The admin APIs start where the codec does (CreateTopics v2,
//!   DeleteTopics v1, DescribeConfigs v1): Apache Kafka 4 starts there too.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::ApiKey;

/// (API, lowest advertised, lowest decoded, highest).
const SERVED: &[(ApiKey, i16, i16, i16)] = &[
    (ApiKey::Produce, 0, 3, 12),
    (ApiKey::Fetch, 4, 4, 12),
    (ApiKey::ListOffsets, 1, 1, 10),
    (ApiKey::Metadata, 0, 0, 12),
    (ApiKey::ApiVersions, 0, 0, 4),
    (ApiKey::OffsetCommit, 2, 2, 9),
    (ApiKey::OffsetFetch, 1, 1, 9),
    (ApiKey::OffsetDelete, 0, 0, 0),
    (ApiKey::FindCoordinator, 0, 0, 6),
    (ApiKey::JoinGroup, 0, 0, 9),
    (ApiKey::Heartbeat, 0, 0, 4),
    (ApiKey::LeaveGroup, 0, 0, 5),
    (ApiKey::SyncGroup, 0, 0, 5),
    (ApiKey::DescribeGroups, 0, 0, 6),
    (ApiKey::ListGroups, 0, 0, 5),
    (ApiKey::DeleteGroups, 0, 0, 2),
    (ApiKey::InitProducerId, 0, 0, 5),
    (ApiKey::SaslHandshake, 0, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 0, 2),
    (ApiKey::CreateTopics, 2, 2, 7),
    (ApiKey::DeleteTopics, 1, 1, 6),
    (ApiKey::CreatePartitions, 0, 0, 3),
    (ApiKey::DescribeConfigs, 1, 1, 4),
    (ApiKey::DeleteRecords, 0, 0, 2),
    (ApiKey::AlterConfigs, 0, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 0, 1),
    // Transactions, protocol V1 (no `transaction.version` feature is
    // advertised, so Kafka 4 Java clients use it too).
    (ApiKey::AddPartitionsToTxn, 0, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 0, 4),
    (ApiKey::TxnOffsetCommit, 0, 0, 4),
    (ApiKey::EndTxn, 0, 0, 4),
    (ApiKey::DescribeTransactions, 0, 0, 0),
    (ApiKey::DescribeProducers, 0, 0, 0),
    (ApiKey::ListTransactions, 0, 0, 2),
];

/// What ApiVersions answers.
pub fn advertised() -> Vec<ApiVersion> {
    SERVED
        .iter()
        .map(|&(key, min, _, max)| {
            ApiVersion::default()
                .with_api_key(key as i16)
                .with_min_version(min)
                .with_max_version(max)
        })
        .collect()
}

/// Whether `version` of `key` is served: `None` when the API is not served
/// at all, `Some(false)` for a version outside what is decoded.
pub fn served(key: ApiKey, version: i16) -> Option<bool> {
    SERVED
        .iter()
        .find(|(k, ..)| *k == key)
        .map(|&(_, _, min, max)| (min..=max).contains(&version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{
        AlterConfigsRequest, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest,
        DescribeConfigsRequest, IncrementalAlterConfigsRequest,
    };
    use kafka_protocol::messages::{
        ApiVersionsRequest, DeleteGroupsRequest, DescribeGroupsRequest, FetchRequest,
        FindCoordinatorRequest, HeartbeatRequest, InitProducerIdRequest, JoinGroupRequest,
        LeaveGroupRequest, ListGroupsRequest, ListOffsetsRequest, MetadataRequest,
        OffsetCommitRequest, OffsetFetchRequest, ProduceRequest, SaslAuthenticateRequest,
        SaslHandshakeRequest, SyncGroupRequest,
    };
    use kafka_protocol::protocol::Message;

    #[test]
    fn every_decoded_range_is_within_what_the_codec_supports() {
        for &(key, _, min, max) in SERVED {
            let codec = match key {
                ApiKey::Produce => ProduceRequest::VERSIONS,
                ApiKey::Fetch => FetchRequest::VERSIONS,
                ApiKey::ListOffsets => ListOffsetsRequest::VERSIONS,
                ApiKey::Metadata => MetadataRequest::VERSIONS,
                ApiKey::ApiVersions => ApiVersionsRequest::VERSIONS,
                ApiKey::OffsetCommit => OffsetCommitRequest::VERSIONS,
                ApiKey::OffsetFetch => OffsetFetchRequest::VERSIONS,
                ApiKey::FindCoordinator => FindCoordinatorRequest::VERSIONS,
                ApiKey::JoinGroup => JoinGroupRequest::VERSIONS,
                ApiKey::Heartbeat => HeartbeatRequest::VERSIONS,
                ApiKey::LeaveGroup => LeaveGroupRequest::VERSIONS,
                ApiKey::SyncGroup => SyncGroupRequest::VERSIONS,
                ApiKey::DescribeGroups => DescribeGroupsRequest::VERSIONS,
                ApiKey::ListGroups => ListGroupsRequest::VERSIONS,
                ApiKey::DeleteGroups => DeleteGroupsRequest::VERSIONS,
                ApiKey::InitProducerId => InitProducerIdRequest::VERSIONS,
                ApiKey::SaslHandshake => SaslHandshakeRequest::VERSIONS,
                ApiKey::SaslAuthenticate => SaslAuthenticateRequest::VERSIONS,
                ApiKey::CreateTopics => CreateTopicsRequest::VERSIONS,
                ApiKey::DeleteTopics => DeleteTopicsRequest::VERSIONS,
                ApiKey::CreatePartitions => CreatePartitionsRequest::VERSIONS,
                ApiKey::DescribeConfigs => DescribeConfigsRequest::VERSIONS,
                ApiKey::AlterConfigs => AlterConfigsRequest::VERSIONS,
                ApiKey::IncrementalAlterConfigs => IncrementalAlterConfigsRequest::VERSIONS,
                ApiKey::AddPartitionsToTxn => {
                    kafka_protocol::messages::AddPartitionsToTxnRequest::VERSIONS
                }
                ApiKey::AddOffsetsToTxn => {
                    kafka_protocol::messages::AddOffsetsToTxnRequest::VERSIONS
                }
                ApiKey::TxnOffsetCommit => {
                    kafka_protocol::messages::TxnOffsetCommitRequest::VERSIONS
                }
                ApiKey::EndTxn => kafka_protocol::messages::EndTxnRequest::VERSIONS,
                ApiKey::DescribeTransactions => {
                    kafka_protocol::messages::DescribeTransactionsRequest::VERSIONS
                }
                ApiKey::ListTransactions => {
                    kafka_protocol::messages::ListTransactionsRequest::VERSIONS
                }
                ApiKey::DeleteRecords => kafka_protocol::messages::DeleteRecordsRequest::VERSIONS,
                ApiKey::OffsetDelete => kafka_protocol::messages::OffsetDeleteRequest::VERSIONS,
                ApiKey::DescribeProducers => {
                    kafka_protocol::messages::DescribeProducersRequest::VERSIONS
                }
                other => panic!("{other:?} has no codec check"),
            };
            assert!(codec.min <= min && max <= codec.max, "{key:?}");
        }
        assert_eq!(served(ApiKey::Produce, 2), Some(false));
        assert_eq!(served(ApiKey::Produce, 3), Some(true));
        assert_eq!(served(ApiKey::AddPartitionsToTxn, 4), Some(false));
        assert_eq!(served(ApiKey::DescribeProducers, 0), Some(true));
        assert_eq!(served(ApiKey::DescribeProducers, 1), Some(false));
        assert_eq!(served(ApiKey::AlterReplicaLogDirs, 0), None);
    }
}
