//! One request in, one answer out: decoding ([`parse`]), the dispatch to
//! every API, and ApiVersions, Metadata, Produce, Fetch and ListOffsets
//! (groups, SASL and the admin APIs have their own modules).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, EndTxnRequest, TxnOffsetCommitRequest,
};
use kafka_protocol::messages::{
    AlterConfigsRequest, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest,
    DescribeConfigsRequest, IncrementalAlterConfigsRequest,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, BrokerId, DeleteGroupsRequest,
    DescribeGroupsRequest, FetchRequest, FetchResponse, FindCoordinatorRequest, HeartbeatRequest,
    InitProducerIdRequest, InitProducerIdResponse, JoinGroupRequest, LeaveGroupRequest,
    ListGroupsRequest, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    OffsetCommitRequest, OffsetFetchRequest, ProduceRequest, ProduceResponse, ProducerId,
    RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest, SyncGroupRequest,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::ResponseError;
use tributary_devices::auth::Action;
use tributary_frontend::budget::Reserved;
use tributary_ingest::mapping::all_publish_subjects;
use tributary_ingest::{self as ingest, Rejection};
use tributary_storage::{Error as LogError, Isolation, TopicInfo};

use crate::conn::Session;
use crate::{admin, codec, groups, sasl, versions, Api, Error, Refusal};

/// This node's id in every Metadata answer (a single broker).
pub(crate) const NODE_ID: i32 = 1;

/// A request read off the wire, decoded at its version.
#[derive(Debug)]
pub enum Request {
    /// ApiVersions at a version we know.
    ApiVersions(ApiVersionsRequest),
    /// ApiVersions newer than ours (answered at v0 with our ranges).
    NewerApiVersions,
    /// Metadata.
    Metadata(MetadataRequest),
    /// Produce.
    Produce(ProduceRequest),
    /// Fetch.
    Fetch(FetchRequest),
    /// ListOffsets.
    ListOffsets(ListOffsetsRequest),
    /// FindCoordinator.
    FindCoordinator(FindCoordinatorRequest),
    /// JoinGroup.
    JoinGroup(JoinGroupRequest),
    /// SyncGroup.
    SyncGroup(SyncGroupRequest),
    /// Heartbeat.
    Heartbeat(HeartbeatRequest),
    /// LeaveGroup.
    LeaveGroup(LeaveGroupRequest),
    /// OffsetCommit.
    OffsetCommit(OffsetCommitRequest),
    /// OffsetFetch.
    OffsetFetch(OffsetFetchRequest),
    /// OffsetDelete.
    OffsetDelete(kafka_protocol::messages::OffsetDeleteRequest),
    /// ListGroups.
    ListGroups(ListGroupsRequest),
    /// DescribeGroups.
    DescribeGroups(DescribeGroupsRequest),
    /// DeleteGroups.
    DeleteGroups(DeleteGroupsRequest),
    /// InitProducerId.
    InitProducerId(InitProducerIdRequest),
    /// SaslHandshake.
    SaslHandshake(SaslHandshakeRequest),
    /// SaslAuthenticate.
    SaslAuthenticate(SaslAuthenticateRequest),
    /// CreateTopics.
    CreateTopics(CreateTopicsRequest),
    /// DeleteTopics.
    DeleteTopics(DeleteTopicsRequest),
    /// CreatePartitions.
    CreatePartitions(CreatePartitionsRequest),
    /// DescribeConfigs.
    DescribeConfigs(DescribeConfigsRequest),
    /// AlterConfigs.
    AlterConfigs(AlterConfigsRequest),
    /// IncrementalAlterConfigs.
    IncrementalAlterConfigs(IncrementalAlterConfigsRequest),
    /// AddPartitionsToTxn.
    AddPartitionsToTxn(AddPartitionsToTxnRequest),
    /// AddOffsetsToTxn.
    AddOffsetsToTxn(AddOffsetsToTxnRequest),
    /// TxnOffsetCommit.
    TxnOffsetCommit(TxnOffsetCommitRequest),
    /// EndTxn.
    EndTxn(EndTxnRequest),
    /// DescribeTransactions.
    DescribeTransactions(kafka_protocol::messages::DescribeTransactionsRequest),
    /// ListTransactions.
    ListTransactions(kafka_protocol::messages::ListTransactionsRequest),
    /// DeleteRecords.
    DeleteRecords(kafka_protocol::messages::DeleteRecordsRequest),
    /// DescribeProducers.
    DescribeProducers(kafka_protocol::messages::DescribeProducersRequest),
}

/// A decoded request with what its answer needs.
#[derive(Debug)]
pub struct Parsed {
    /// The API.
    pub api: ApiKey,
    /// Its version.
    pub version: i16,
    /// The correlation id the answer repeats.
    pub correlation: i32,
    /// The client's id from the request header (`""` when absent).
    pub client_id: String,
    /// The body.
    pub request: Request,
}

/// Decodes one request frame (without its size prefix; at least 8 bytes):
/// the API must be served at that version and the body must decode, else the
/// refusal that closes the connection.
pub fn parse(mut frame: Bytes) -> Result<Parsed, (Refusal, Option<Error>)> {
    if frame.len() < 8 {
        return Err((Refusal::RequestTooSmall, None));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = ApiKey::try_from(key).map_err(|()| (Refusal::UnknownApiKey, None))?;
    if api == ApiKey::ApiVersions && versions::served(api, version) != Some(true) {
        return Ok(Parsed {
            api,
            version,
            correlation,
            client_id: String::new(),
            request: Request::NewerApiVersions,
        });
    }
    match versions::served(api, version) {
        None => return Err((Refusal::UnsupportedApi, None)),
        Some(false) => return Err((Refusal::UnsupportedVersion, None)),
        Some(true) => {}
    }
    let malformed = |e: anyhow::Error| {
        (
            Refusal::MalformedRequest,
            Some(Error::Malformed(e.to_string())),
        )
    };
    let header = RequestHeader::decode(&mut frame, api.request_header_version(version))
        .map_err(malformed)?;
    let client_id = header.client_id.map(|c| c.to_string()).unwrap_or_default();
    let parsed = |request| Parsed {
        api,
        version,
        correlation,
        client_id,
        request,
    };
    macro_rules! body {
        ($variant:ident, $ty:ty) => {
            Request::$variant(<$ty>::decode(&mut frame, version).map_err(malformed)?)
        };
    }
    let request = match api {
        ApiKey::ApiVersions => Request::ApiVersions(
            ApiVersionsRequest::decode(&mut frame, version).map_err(malformed)?,
        ),
        ApiKey::Metadata => {
            Request::Metadata(MetadataRequest::decode(&mut frame, version).map_err(malformed)?)
        }
        ApiKey::Produce => {
            Request::Produce(ProduceRequest::decode(&mut frame, version).map_err(malformed)?)
        }
        ApiKey::Fetch => {
            Request::Fetch(FetchRequest::decode(&mut frame, version).map_err(malformed)?)
        }
        ApiKey::ListOffsets => Request::ListOffsets(
            ListOffsetsRequest::decode(&mut frame, version).map_err(malformed)?,
        ),
        ApiKey::FindCoordinator => body!(FindCoordinator, FindCoordinatorRequest),
        ApiKey::JoinGroup => body!(JoinGroup, JoinGroupRequest),
        ApiKey::SyncGroup => body!(SyncGroup, SyncGroupRequest),
        ApiKey::Heartbeat => body!(Heartbeat, HeartbeatRequest),
        ApiKey::LeaveGroup => body!(LeaveGroup, LeaveGroupRequest),
        ApiKey::OffsetCommit => body!(OffsetCommit, OffsetCommitRequest),
        ApiKey::OffsetFetch => body!(OffsetFetch, OffsetFetchRequest),
        ApiKey::OffsetDelete => body!(OffsetDelete, kafka_protocol::messages::OffsetDeleteRequest),
        ApiKey::ListGroups => body!(ListGroups, ListGroupsRequest),
        ApiKey::DescribeGroups => body!(DescribeGroups, DescribeGroupsRequest),
        ApiKey::DeleteGroups => body!(DeleteGroups, DeleteGroupsRequest),
        ApiKey::InitProducerId => body!(InitProducerId, InitProducerIdRequest),
        ApiKey::SaslHandshake => body!(SaslHandshake, SaslHandshakeRequest),
        ApiKey::SaslAuthenticate => body!(SaslAuthenticate, SaslAuthenticateRequest),
        ApiKey::CreateTopics => body!(CreateTopics, CreateTopicsRequest),
        ApiKey::DeleteTopics => body!(DeleteTopics, DeleteTopicsRequest),
        ApiKey::CreatePartitions => body!(CreatePartitions, CreatePartitionsRequest),
        ApiKey::DescribeConfigs => body!(DescribeConfigs, DescribeConfigsRequest),
        ApiKey::AlterConfigs => body!(AlterConfigs, AlterConfigsRequest),
        ApiKey::IncrementalAlterConfigs => {
            body!(IncrementalAlterConfigs, IncrementalAlterConfigsRequest)
        }
        ApiKey::AddPartitionsToTxn => body!(AddPartitionsToTxn, AddPartitionsToTxnRequest),
        ApiKey::AddOffsetsToTxn => body!(AddOffsetsToTxn, AddOffsetsToTxnRequest),
        ApiKey::TxnOffsetCommit => body!(TxnOffsetCommit, TxnOffsetCommitRequest),
        ApiKey::EndTxn => body!(EndTxn, EndTxnRequest),
        ApiKey::DeleteRecords => body!(
            DeleteRecords,
            kafka_protocol::messages::DeleteRecordsRequest
        ),
        ApiKey::DescribeProducers => body!(
            DescribeProducers,
            kafka_protocol::messages::DescribeProducersRequest
        ),
        ApiKey::DescribeTransactions => body!(
            DescribeTransactions,
            kafka_protocol::messages::DescribeTransactionsRequest
        ),
        ApiKey::ListTransactions => {
            body!(
                ListTransactions,
                kafka_protocol::messages::ListTransactionsRequest
            )
        }
        _ => return Err((Refusal::UnsupportedApi, None)),
    };
    Ok(parsed(request))
}

/// Answers one request: `Ok(None)` for a request that gets no answer
/// (produce with acks 0); `Err` closes the connection.
pub(crate) async fn handle(
    s: Arc<Session>,
    frame: Bytes,
    _held: Reserved,
    turn: ingest::Turn,
) -> Result<Option<BytesMut>, Refusal> {
    if s.bare_token.swap(false, Relaxed) {
        return sasl::bare_token(&s, &frame).await.map(Some);
    }
    let Parsed {
        api,
        version,
        correlation,
        client_id,
        request,
    } = parse(frame).map_err(|(why, detail)| {
        if let Some(detail) = detail {
            s.server.metrics.refuse_with(why, &detail);
            // Counted here; the connection only closes.
            Refusal::Counted
        } else {
            why
        }
    })?;
    let header = api.response_header_version(version);
    let open = matches!(
        api,
        ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
    );
    if !open && !s.logged_in() {
        // Kafka closes a connection that skips its SASL login.
        return Err(Refusal::NotAuthorized);
    }
    match request {
        Request::NewerApiVersions => {
            // KIP-511: a newer ApiVersions than ours gets our ranges at v0,
            // with UNSUPPORTED_VERSION, so the client can retry at one we know.
            s.server.metrics.request(Api::Other);
            let answer = ApiVersionsResponse::default()
                .with_error_code(ResponseError::UnsupportedVersion.code())
                .with_api_keys(versions::advertised());
            respond(&s, correlation, 0, &answer, 0).map(Some)
        }
        Request::ApiVersions(_) => {
            s.server.metrics.request(Api::Other);
            let answer = ApiVersionsResponse::default().with_api_keys(versions::advertised());
            respond(&s, correlation, 0, &answer, version).map(Some)
        }
        Request::Metadata(req) => {
            s.server.metrics.request(Api::Metadata);
            let answer = metadata(&s, req, version).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::Produce(req) => {
            s.server.metrics.request(Api::Produce);
            let started = Instant::now();
            let acks = req.acks;
            let answer = produce(&s, req, turn).await;
            if acks == 0 {
                return Ok(None);
            }
            s.server.metrics.acks.observe(started.elapsed(), 1);
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::Fetch(req) => {
            s.server.metrics.request(Api::Fetch);
            let answer = fetch(&s, req).await?;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::ListOffsets(req) => {
            s.server.metrics.request(Api::Other);
            let answer = list_offsets(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::SaslHandshake(req) => {
            s.server.metrics.request(Api::Other);
            let answer = sasl::handshake(&s, req, version);
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::SaslAuthenticate(req) => {
            s.server.metrics.request(Api::Other);
            let answer = sasl::authenticate(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::InitProducerId(req) => {
            s.server.metrics.request(Api::Other);
            let answer = init_producer_id(&s, req, version).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::CreateTopics(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::create_topics(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::DeleteTopics(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::delete_topics(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::CreatePartitions(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::create_partitions(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::DescribeConfigs(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::describe_configs(&s, req);
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::AlterConfigs(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::alter_configs(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::IncrementalAlterConfigs(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::incremental_alter_configs(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::AddPartitionsToTxn(req) => {
            s.server.metrics.request(Api::Other);
            let answer = crate::txn::api::add_partitions(&s, req, version).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::AddOffsetsToTxn(req) => {
            s.server.metrics.request(Api::Other);
            let answer = crate::txn::api::add_offsets(&s, req, version).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::TxnOffsetCommit(req) => {
            s.server.metrics.request(Api::Other);
            let answer = crate::txn::api::offset_commit(&s, req, version).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::EndTxn(req) => {
            s.server.metrics.request(Api::Other);
            let answer = crate::txn::api::end(&s, req, version).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::DescribeTransactions(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = crate::txn::api::describe(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::DeleteRecords(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::delete_records(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::DescribeProducers(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = admin::describe_producers(&s, req);
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        Request::ListTransactions(req) => {
            s.server.metrics.request(Api::Admin);
            let answer = crate::txn::api::list(&s, req).await;
            respond(&s, correlation, header, &answer, version).map(Some)
        }
        group_request => {
            s.server.metrics.request(Api::Group);
            match group_request {
                Request::FindCoordinator(req) => {
                    let a = groups::find_coordinator(&s, req, version);
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::JoinGroup(req) => {
                    let a = groups::join_group(&s, req, version, &client_id).await;
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::SyncGroup(req) => {
                    let a = groups::sync_group(&s, req, version).await;
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::Heartbeat(req) => {
                    let a = groups::heartbeat(&s, req);
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::LeaveGroup(req) => {
                    let a = groups::leave_group(&s, req, version);
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::OffsetCommit(req) => {
                    let a = groups::offset_commit(&s, req).await;
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::OffsetFetch(req) => {
                    let a = groups::offset_fetch(&s, req, version);
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::OffsetDelete(req) => {
                    let a = groups::offset_delete(&s, req).await;
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::ListGroups(req) => {
                    let a = groups::list_groups(&s, req, version);
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::DescribeGroups(req) => {
                    let a = groups::describe_groups(&s, req, version);
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                Request::DeleteGroups(req) => {
                    let a = groups::delete_groups(&s, req).await;
                    respond(&s, correlation, header, &a, version).map(Some)
                }
                _ => Err(Refusal::UnsupportedApi),
            }
        }
    }
}

/// `[i32 size][response header][body]`.
fn respond<M: Encodable + HeaderVersion>(
    s: &Session,
    correlation: i32,
    header_version: i16,
    body: &M,
    version: i16,
) -> Result<BytesMut, Refusal> {
    let encode = || -> anyhow::Result<BytesMut> {
        let header = ResponseHeader::default().with_correlation_id(correlation);
        let size = header.compute_size(header_version)? + body.compute_size(version)?;
        let mut out = BytesMut::with_capacity(4 + size);
        out.put_i32(i32::try_from(size)?);
        header.encode(&mut out, header_version)?;
        body.encode(&mut out, version)?;
        Ok(out)
    };
    encode().map_err(|e| {
        s.server
            .metrics
            .refuse_with(Refusal::EncodeFailed, &Error::Encode(e.to_string()));
        Refusal::Counted
    })
}

pub(crate) fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_owned()))
}

/// Kafka's code for a refusal of the log.
fn error_code(r: Rejection) -> i16 {
    match r {
        Rejection::UnknownTopic => ResponseError::UnknownTopicOrPartition.code(),
        Rejection::TooLarge => ResponseError::MessageTooLarge.code(),
        // As Kafka refuses a keyless record for a compacted topic.
        Rejection::KeyRequired => ResponseError::InvalidRecord.code(),
        // Retriable: the disk or the quota may have room again soon.
        Rejection::Quota | Rejection::DiskFull | Rejection::Unwritable => {
            ResponseError::KafkaStorageError.code()
        }
    }
}

async fn metadata(s: &Session, req: MetadataRequest, version: i16) -> MetadataResponse {
    let log = &s.server.cx.log;
    let auth = &*s.server.cx.auth;
    // Topics named by name, or (v10+) by id: an id no topic has is
    // answered UNKNOWN_TOPIC_ID, as Kafka does.
    let mut unknown_ids = Vec::new();
    let wanted: Option<Vec<String>> = match req.topics {
        None => None,
        Some(ts) if ts.is_empty() && version == 0 => None,
        Some(ts) => Some(
            ts.into_iter()
                .filter_map(|t| match t.name {
                    Some(n) => Some(n.0.to_string()),
                    None => {
                        let named =
                            named_by_id(log, t.topic_id).filter(|n| auth.may_see(&s.who(), n));
                        if named.is_none() {
                            unknown_ids.push(t.topic_id);
                        }
                        named
                    }
                })
                .collect(),
        ),
    };
    let create = log.config().auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    let view = crate::brokers::view(s);
    let mut topics = Vec::new();
    match wanted {
        None => {
            for t in log.topics() {
                if auth.may_see(&s.who(), &t.config.name) {
                    topics.push(topic_metadata(&t, &view));
                }
            }
        }
        Some(names) => {
            for name in names {
                topics.push(named_topic(s, &name, create, &view).await);
            }
        }
    }
    topics.extend(unknown_ids.into_iter().map(|id| {
        MetadataResponseTopic::default()
            .with_topic_id(id)
            .with_error_code(ResponseError::UnknownTopicId.code())
    }));
    let brokers = view
        .brokers
        .iter()
        .map(|(id, host, port)| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(*id))
                .with_host(StrBytes::from_string(host.clone()))
                .with_port(*port)
        })
        .collect();
    let mut answer = MetadataResponse::default()
        .with_brokers(brokers)
        .with_topics(topics);
    if version >= 1 {
        answer = answer.with_controller_id(BrokerId(view.partition_leader().unwrap_or(-1)));
    }
    if version >= 2 {
        answer = answer.with_cluster_id(Some(StrBytes::from_static_str("tributary")));
    }
    answer
}

/// A topic a client named: described, created (when the node creates topics
/// on first use and the device may publish there), or an error.
async fn named_topic(
    s: &Session,
    name: &str,
    create: bool,
    view: &crate::brokers::View,
) -> MetadataResponseTopic {
    let log = &s.server.cx.log;
    let auth = &*s.server.cx.auth;
    let failed = |code: i16| {
        MetadataResponseTopic::default()
            .with_name(Some(topic_name(name)))
            .with_error_code(code)
    };
    // A name no topic can have, as Kafka answers it (before any rights).
    if tributary_storage::topic::validate_name(name).is_err() {
        return failed(ResponseError::InvalidTopicException.code());
    }
    if !auth.may_see(&s.who(), name) {
        return failed(ResponseError::TopicAuthorizationFailed.code());
    }
    match log.topic(name) {
        Ok(t) => topic_metadata(&t, view),
        Err(LogError::UnknownTopic(_)) if create => {
            if !auth.authorize(&s.who(), Action::Publish, name).allowed() {
                return failed(ResponseError::UnknownTopicOrPartition.code());
            }
            let config = log.config().topic_defaults.config(name);
            match log.create_topic(config).await {
                Ok(t) => topic_metadata(&t, view),
                Err(LogError::TopicExists(_)) => match log.topic(name) {
                    Ok(t) => topic_metadata(&t, view),
                    Err(_) => failed(ResponseError::UnknownTopicOrPartition.code()),
                },
                Err(LogError::InvalidTopic(_) | LogError::InvalidName(_)) => {
                    failed(ResponseError::InvalidTopicException.code())
                }
                Err(e) => failed(error_code(Rejection::of(&e))),
            }
        }
        Err(LogError::InvalidTopic(_) | LogError::InvalidName(_)) => {
            failed(ResponseError::InvalidTopicException.code())
        }
        Err(_) => failed(ResponseError::UnknownTopicOrPartition.code()),
    }
}

/// A topic's id as Kafka's messages carry it (all zero: none).
pub(crate) fn topic_id(config: &tributary_storage::TopicConfig) -> uuid::Uuid {
    uuid::Uuid::from_bytes(config.id)
}

/// The name of the topic whose id is `id`, if there is one.
pub(crate) fn named_by_id(log: &tributary_storage::Log, id: uuid::Uuid) -> Option<String> {
    if id.is_nil() {
        return None;
    }
    log.topics()
        .into_iter()
        .find(|t| t.config.id == *id.as_bytes())
        .map(|t| t.config.name)
}

/// A topic as Metadata describes it: on a cluster every node holds every
/// committed record (each is a replica in sync), and the leader takes the
/// writes; with no leader, each partition is `LEADER_NOT_AVAILABLE`.
fn topic_metadata(t: &TopicInfo, view: &crate::brokers::View) -> MetadataResponseTopic {
    let (leader, error) = match view.partition_leader() {
        Some(id) => (BrokerId(id), 0),
        None => (BrokerId(-1), ResponseError::LeaderNotAvailable.code()),
    };
    let replicas: Vec<BrokerId> = view
        .brokers
        .iter()
        .map(|(id, _, _)| BrokerId(*id))
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&t.config.name)))
        .with_topic_id(topic_id(&t.config))
        .with_partitions(
            t.partitions
                .iter()
                .map(|p| {
                    MetadataResponsePartition::default()
                        .with_error_code(error)
                        .with_partition_index(p.partition as i32)
                        .with_leader_id(leader)
                        .with_leader_epoch(0)
                        .with_replica_nodes(replicas.clone())
                        .with_isr_nodes(replicas.clone())
                })
                .collect(),
        )
}

/// InitProducerId for an idempotent producer: a new producer id (unique on
/// this node, also across restarts), or the same id with the next epoch when
/// the producer asks to bump its own (KIP-360, v3+: its sequences start
/// again). Transactional ids are not served: their coordinator is not
/// available.
async fn init_producer_id(
    s: &Session,
    req: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let failed = |e: ResponseError| {
        InitProducerIdResponse::default()
            .with_error_code(e.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    if (req.producer_id.0 < 0) != (req.producer_epoch < 0) {
        return failed(ResponseError::InvalidRequest);
    }
    // An empty transactional id is taken for none, as before transactions
    // were served (clients send null).
    if let Some(id) = req.transactional_id.as_ref().filter(|t| !t.is_empty()) {
        let given = (req.producer_id.0 >= 0).then_some((req.producer_id.0, req.producer_epoch));
        let result = match s.server.coordinator().await {
            Ok(c) => c.init(id, req.transaction_timeout_ms, given).await,
            Err(e) => Err(e),
        };
        return match result {
            Ok((pid, epoch)) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(pid))
                .with_producer_epoch(epoch),
            Err(r) => InitProducerIdResponse::default()
                .with_error_code(crate::txn::api::code(&r, version, 4))
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        };
    }
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        return InitProducerIdResponse::default()
            .with_producer_id(req.producer_id)
            .with_producer_epoch(req.producer_epoch + 1);
    }
    match s.server.cx.log.allocate_producer_id().await {
        Ok(id) => InitProducerIdResponse::default()
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(0),
        Err(e) => {
            s.server
                .metrics
                .refuse_with(Refusal::Log(Rejection::of(&e)), &e);
            failed(ResponseError::CoordinatorNotAvailable)
        }
    }
}

/// Host and port Metadata names: `kafka.advertised_host` or the address the
/// client reached, and the port it reached.
pub(crate) fn advertised(s: &Session) -> (String, i32) {
    let port = s.local.map_or(9092, |a| i32::from(a.port()));
    let host = match (&s.server.config.advertised_host, s.local) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.ip().to_string(),
        (None, None) => "localhost".to_owned(),
    };
    (host, port)
}

async fn produce(s: &Session, req: ProduceRequest, turn: ingest::Turn) -> ProduceResponse {
    let log = &s.server.cx.log;
    let auth = &*s.server.cx.auth;
    // (topic, partition) → its answer; records of accepted partitions go
    // into one append through the one write path.
    let mut answers: Vec<(String, Vec<PartitionProduceResponse>)> = Vec::new();
    let mut batch = ingest::Batch::default();
    let mut sequenced = Vec::new();
    // Kafka refuses transactional batches in a request naming no
    // transactional id (TRANSACTIONAL_ID_AUTHORIZATION_FAILED).
    let has_transactional_id = req.transactional_id.as_ref().is_some_and(|t| !t.is_empty());
    for (ti, topic) in req.topic_data.into_iter().enumerate() {
        let name = topic.name.0.to_string();
        let known = log.topic(&name).ok();
        let mut partitions = Vec::new();
        for (pi, p) in topic.partition_data.into_iter().enumerate() {
            let refuse = |code: i16| {
                PartitionProduceResponse::default()
                    .with_index(p.index)
                    .with_error_code(code)
                    .with_base_offset(-1)
            };
            let Ok(partition) = u32::try_from(p.index) else {
                partitions.push(refuse(ResponseError::UnknownTopicOrPartition.code()));
                continue;
            };
            if known
                .as_ref()
                .is_some_and(|t| partition >= t.config.partitions)
            {
                partitions.push(refuse(ResponseError::UnknownTopicOrPartition.code()));
                continue;
            }
            let records = p.records.unwrap_or_default();
            let (events, producer, transactional) = match codec::events_of(&records, partition) {
                Ok(decoded) => decoded,
                Err(e) => {
                    let (why, code) = match e {
                        Error::BatchTooLarge => (
                            Refusal::DecompressedTooLarge,
                            ResponseError::MessageTooLarge.code(),
                        ),
                        Error::Transactional => (
                            Refusal::UnsupportedBatch,
                            ResponseError::InvalidRecord.code(),
                        ),
                        _ => (Refusal::CorruptBatch, ResponseError::CorruptMessage.code()),
                    };
                    s.server.metrics.refuse_with(why, &e);
                    partitions.push(refuse(code));
                    continue;
                }
            };
            let allowed = events.iter().all(|r| {
                all_publish_subjects(&name, r.event.key.as_deref(), &r.event.headers)
                    .iter()
                    .all(|subject| auth.authorize(&s.who(), Action::Publish, subject).allowed())
            });
            if !allowed {
                s.server.metrics.refuse(Refusal::NotAuthorized);
                partitions.push(refuse(ResponseError::TopicAuthorizationFailed.code()));
                continue;
            }
            if events.is_empty() {
                partitions.push(refuse(0));
                continue;
            }
            if transactional && !has_transactional_id {
                s.server.metrics.refuse(Refusal::Sequence);
                partitions.push(refuse(
                    ResponseError::TransactionalIdAuthorizationFailed.code(),
                ));
                continue;
            }
            if let (true, Some(b)) = (transactional, producer.as_ref()) {
                // Only into a partition its ongoing transaction holds.
                let checked = match s.server.coordinator().await {
                    Ok(c) => {
                        c.may_produce(b.producer_id, b.epoch, &name, partition)
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(r) = checked {
                    s.server.metrics.refuse(Refusal::Sequence);
                    let code = match r {
                        // On a cluster the coordinator is on the leader, as
                        // Metadata says: the client asks it again.
                        crate::txn::Refused::NotCoordinator | crate::txn::Refused::NotAvailable => {
                            ResponseError::NotLeaderOrFollower.code()
                        }
                        r => crate::txn::api::code(&r, 0, i16::MAX),
                    };
                    partitions.push(refuse(code));
                    continue;
                }
            }
            match producer {
                Some(producer) => sequenced.push(ingest::Sequenced {
                    tag: (ti, pi),
                    topic: name.clone(),
                    producer,
                    records: events,
                    transactional,
                }),
                None => {
                    for event in events {
                        batch.push(&name, (ti, pi), event);
                    }
                }
            }
            // Filled in once the append has answered.
            partitions.push(refuse(0));
        }
        answers.push((name, partitions));
    }
    // First outcome per (topic, partition): its base offset or its refusal.
    let mut outcome: BTreeMap<(usize, usize), Result<u64, i16>> = BTreeMap::new();
    let mut stored = 0u64;
    let (plain, sequenced) = ingest::append_in_turn(log, batch, sequenced, turn).await;
    for ((ti, pi), result) in plain {
        match result {
            Ok(position) => {
                stored += 1;
                outcome.entry((ti, pi)).or_insert(Ok(position.offset));
            }
            Err(refused) => {
                s.server.metrics.refuse(Refusal::Log(refused.rejection));
                outcome.insert((ti, pi), Err(error_code(refused.rejection)));
            }
        }
    }
    for ((ti, pi), result) in sequenced {
        match result {
            Ok(positions) => {
                stored += positions.len() as u64;
                if let Some(first) = positions.first() {
                    outcome.insert((ti, pi), Ok(first.offset));
                }
            }
            Err(refused) => {
                let sequence = match &*refused.error {
                    LogError::OutOfOrderSequence { .. } => {
                        Some(ResponseError::OutOfOrderSequenceNumber)
                    }
                    LogError::ProducerFenced { .. } => Some(ResponseError::InvalidProducerEpoch),
                    LogError::UnknownProducer { .. } => Some(ResponseError::UnknownProducerId),
                    _ => None,
                };
                let code = match sequence {
                    Some(e) => {
                        s.server.metrics.refuse_with(Refusal::Sequence, &refused);
                        e.code()
                    }
                    None => {
                        s.server.metrics.refuse(Refusal::Log(refused.rejection));
                        error_code(refused.rejection)
                    }
                };
                outcome.insert((ti, pi), Err(code));
            }
        }
    }
    s.server.metrics.produced.fetch_add(stored, Relaxed);
    let responses = answers
        .into_iter()
        .enumerate()
        .map(|(ti, (name, partitions))| {
            let partitions = partitions
                .into_iter()
                .enumerate()
                .map(|(pi, mut p)| {
                    match outcome.get(&(ti, pi)) {
                        Some(Ok(base)) => p.base_offset = *base as i64,
                        Some(Err(code)) => p.error_code = *code,
                        None => {}
                    }
                    if p.error_code == 0 {
                        if let Ok(start) = log.topic(&name).map(|t| {
                            t.partitions
                                .get(p.index as usize)
                                .map_or(0, |x| x.start_offset)
                        }) {
                            p.log_start_offset = start as i64;
                        }
                    }
                    p
                })
                .collect();
            TopicProduceResponse::default()
                .with_name(topic_name(&name))
                .with_partition_responses(partitions)
        })
        .collect();
    ProduceResponse::default().with_responses(responses)
}

/// A partition a fetch asks for: (partition, offset, partition max bytes).
type Wanted = (i32, i64, usize);

/// What one partition of a fetch read.
struct PartitionRead {
    index: i32,
    error: i16,
    high_watermark: i64,
    last_stable: i64,
    log_start: i64,
    records: Bytes,
}

async fn fetch(s: &Session, req: FetchRequest) -> Result<FetchResponse, Refusal> {
    let log = &s.server.cx.log;
    let max_wait = Duration::from_millis(
        u64::try_from(req.max_wait_ms)
            .unwrap_or(0)
            .min(s.server.config.max_fetch_wait_ms),
    );
    let deadline = Instant::now() + max_wait;
    let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0);
    // read_committed: only what is decided (aborted transactions' records
    // are left out here, so the answer's list of them stays empty).
    let isolation = if req.isolation_level == 1 {
        Isolation::Committed
    } else {
        Isolation::Uncommitted
    };
    let max_bytes = usize::try_from(req.max_bytes)
        .unwrap_or(0)
        .clamp(1, s.server.config.max_fetch_bytes.max(1));
    // The answer is held in memory until sent: it comes out of the node's
    // budget. With none left the fetch answers empty (the client asks
    // again), so consumers slow down instead of being cut off.
    let Some(_held) = s
        .server
        .cx
        .budget
        .reserve(max_bytes, max_wait.min(Duration::from_secs(2)))
        .await
    else {
        s.server.metrics.refuse(Refusal::MemoryBudget);
        return Ok(FetchResponse::default());
    };
    let mut wanted: Vec<(String, Vec<Wanted>)> = Vec::new();
    for t in req.topics {
        let name = t.topic.0.to_string();
        let parts = t
            .partitions
            .into_iter()
            .map(|p| {
                let max = usize::try_from(p.partition_max_bytes).unwrap_or(0).max(1);
                (p.partition, p.fetch_offset, max)
            })
            .collect();
        wanted.push((name, parts));
    }
    loop {
        let mut total = 0usize;
        let mut out: Vec<(String, Vec<PartitionRead>)> = Vec::new();
        let mut ends = Vec::new();
        for (name, parts) in &wanted {
            let allowed = groups::may_read(s, name);
            let mut reads = Vec::new();
            for &(index, offset, part_max) in parts {
                let mut read = PartitionRead {
                    index,
                    error: 0,
                    high_watermark: -1,
                    last_stable: -1,
                    log_start: -1,
                    records: Bytes::new(),
                };
                if !allowed {
                    read.error = ResponseError::TopicAuthorizationFailed.code();
                    reads.push(read);
                    continue;
                }
                let (Ok(partition), Ok(offset)) = (u32::try_from(index), u64::try_from(offset))
                else {
                    read.error = ResponseError::OffsetOutOfRange.code();
                    reads.push(read);
                    continue;
                };
                let room = max_bytes.saturating_sub(total).min(part_max);
                // Over the response's budget only when nothing was read yet:
                // the first batch always goes (progress).
                let records = if room > 0 || total == 0 { 10_000 } else { 0 };
                let fetched = log
                    .fetch_into(
                        name,
                        partition,
                        offset,
                        (records, room.max(1)),
                        Duration::ZERO,
                        isolation,
                        codec::FetchBatches::default(),
                    )
                    .await;
                match fetched {
                    Ok((batches, r)) => {
                        if let Some(e) = batches.failed {
                            s.server.metrics.refuse_with(Refusal::EncodeFailed, &e);
                            return Err(Refusal::Counted);
                        }
                        read.high_watermark = r.end_offset as i64;
                        read.last_stable = r.last_stable as i64;
                        read.log_start = r.start_offset as i64;
                        read.records = batches.out.freeze();
                        total += read.records.len();
                        s.server
                            .metrics
                            .fetched
                            .fetch_add(r.records as u64, Relaxed);
                        if let Ok(end) = log.watch_end(name, partition) {
                            ends.push(end);
                        }
                    }
                    Err(LogError::OffsetOutOfRange { start, end, .. }) => {
                        read.error = ResponseError::OffsetOutOfRange.code();
                        read.high_watermark = end as i64;
                        read.last_stable = end as i64;
                        read.log_start = start as i64;
                    }
                    Err(LogError::UnknownTopic(_) | LogError::UnknownPartition { .. }) => {
                        read.error = ResponseError::UnknownTopicOrPartition.code();
                    }
                    Err(e) => {
                        read.error = error_code(Rejection::of(&e));
                    }
                }
                reads.push(read);
            }
            out.push((name.clone(), reads));
        }
        let now = Instant::now();
        if total >= min_bytes.max(1) || now >= deadline || ends.is_empty() {
            return Ok(fetch_response(out));
        }
        // Wait for any partition's end to move, or the deadline.
        let changed =
            futures_util::future::select_all(ends.iter_mut().map(|e| Box::pin(e.changed())));
        let _ = tokio::time::timeout(deadline - now, changed).await;
    }
}

fn fetch_response(out: Vec<(String, Vec<PartitionRead>)>) -> FetchResponse {
    FetchResponse::default().with_responses(
        out.into_iter()
            .map(|(name, reads)| {
                FetchableTopicResponse::default()
                    .with_topic(topic_name(&name))
                    .with_partitions(
                        reads
                            .into_iter()
                            .map(|r| {
                                PartitionData::default()
                                    .with_partition_index(r.index)
                                    .with_error_code(r.error)
                                    .with_high_watermark(r.high_watermark)
                                    .with_last_stable_offset(r.last_stable)
                                    .with_aborted_transactions(Some(Vec::new()))
                                    .with_log_start_offset(r.log_start)
                                    .with_records(Some(r.records))
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

/// ListOffsets timestamps with a meaning of their own.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
/// ListOffsets' "the record with the largest timestamp" (KIP-734, v7+).
const MAX_TIMESTAMP: i64 = -3;

async fn list_offsets(s: &Session, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let log = &s.server.cx.log;
    let committed = req.isolation_level == 1;
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.name.0.to_string();
            let allowed = groups::may_read(s, &name);
            let partitions = t
                .partitions
                .into_iter()
                .map(|p| {
                    let answer = ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index)
                        .with_timestamp(-1)
                        .with_offset(-1);
                    if !allowed {
                        return answer
                            .with_error_code(ResponseError::TopicAuthorizationFailed.code());
                    }
                    let offsets = u32::try_from(p.partition_index)
                        .ok()
                        .and_then(|i| log.offsets(&name, i).ok().map(|o| (i, o)));
                    let Some((partition, (start, end))) = offsets else {
                        return answer
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code());
                    };
                    // read_committed consumers end at the last stable offset.
                    let end = if committed {
                        log.last_stable(&name, partition).unwrap_or(end)
                    } else {
                        end
                    };
                    match p.timestamp {
                        LATEST => answer.with_offset(end as i64),
                        EARLIEST => answer.with_offset(start as i64),
                        ts if ts >= 0 => match log.offset_for_timestamp(&name, partition, ts) {
                            Ok(Some((offset, at))) => {
                                answer.with_offset(offset as i64).with_timestamp(at)
                            }
                            Ok(None) | Err(_) => answer,
                        },
                        MAX_TIMESTAMP => match log.max_timestamp(&name, partition, end) {
                            Ok(Some((offset, at))) => {
                                answer.with_offset(offset as i64).with_timestamp(at)
                            }
                            Ok(None) | Err(_) => answer,
                        },
                        // Other specials (tiered storage, the earliest
                        // pending upload) are not served: the client is told
                        // there is no such offset.
                        _ => answer,
                    }
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(topic_name(&name))
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}
