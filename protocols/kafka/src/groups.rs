//! Kafka's classic consumer-group APIs over the node's one coordinator
//! (`tributary-groups`): FindCoordinator, JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup, OffsetCommit, OffsetFetch, OffsetDelete, ListGroups,
//! DescribeGroups and DeleteGroups. The coordinator carries the client assignors' bytes
//! untouched, so range, roundrobin and cooperative-sticky all work; offsets
//! are the same committed positions the HTTP API reads and writes.
//!
//! Devices mode: a group needs subscribe on `$groups/NAME` (as over HTTP),
//! an offset commit or fetch subscribe on the topic too.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorAnswer;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    BrokerId, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use tributary_devices::auth::Action;
use tributary_groups::{GroupError, JoinRequest};
use tributary_ingest::mapping::group_subject;
use tributary_storage::{Error as LogError, GroupOffset, MAX_COMMIT_METADATA};

use crate::conn::Session;

fn st(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

/// Kafka's code for a coordinator refusal.
pub(crate) fn group_code(e: &GroupError) -> i16 {
    match e {
        GroupError::InvalidGroupId => ResponseError::InvalidGroupId,
        GroupError::InvalidSessionTimeout => ResponseError::InvalidSessionTimeout,
        GroupError::InconsistentGroupProtocol => ResponseError::InconsistentGroupProtocol,
        GroupError::UnknownMemberId => ResponseError::UnknownMemberId,
        GroupError::MemberIdRequired(_) => ResponseError::MemberIdRequired,
        GroupError::FencedInstanceId => ResponseError::FencedInstanceId,
        GroupError::IllegalGeneration => ResponseError::IllegalGeneration,
        GroupError::RebalanceInProgress => ResponseError::RebalanceInProgress,
        GroupError::GroupMaxSizeReached => ResponseError::GroupMaxSizeReached,
        GroupError::GroupIdNotFound => ResponseError::GroupIdNotFound,
        GroupError::NonEmptyGroup => ResponseError::NonEmptyGroup,
        GroupError::GroupSubscribedToTopic => ResponseError::GroupSubscribedToTopic,
        GroupError::CoordinatorNotAvailable => ResponseError::CoordinatorNotAvailable,
        GroupError::NotCoordinator => ResponseError::NotCoordinator,
    }
    .code()
}

/// Whether the client may use `group`.
fn may_use(s: &Session, group: &str) -> bool {
    s.server
        .cx
        .auth
        .authorize(&s.who(), Action::Subscribe, &group_subject(group))
        .allowed()
}

/// Whether the client may read `topic` (subscribe on `topic/#` in devices
/// mode): fetching, listing offsets, its group positions, its producers.
pub(crate) fn may_read(s: &Session, topic: &str) -> bool {
    s.server
        .cx
        .auth
        .authorize(&s.who(), Action::Subscribe, &format!("{topic}/#"))
        .allowed()
}

pub(crate) fn find_coordinator(
    s: &Session,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    // The node that coordinates both groups and transactional ids: this
    // one, or on a cluster the leader (none while this node leads cut off
    // from the majority: it may not lead any more).
    let view = crate::brokers::view(s);
    let coordinator = view
        .leader
        .and_then(|id| view.endpoint(id).map(|(host, port)| (id, host, port)));
    let answer = |key: &StrBytes| -> (i16, i32, String, i32) {
        let Some((node, host, port)) = coordinator.clone() else {
            return (
                ResponseError::CoordinatorNotAvailable.code(),
                -1,
                String::new(),
                -1,
            );
        };
        // Key type 0 is a group, 1 a transactional id.
        if req.key_type == 1 {
            return (0, node, host, port);
        }
        if req.key_type != 0 {
            return (
                ResponseError::CoordinatorNotAvailable.code(),
                -1,
                String::new(),
                -1,
            );
        }
        if !may_use(s, key) {
            return (
                ResponseError::GroupAuthorizationFailed.code(),
                -1,
                String::new(),
                -1,
            );
        }
        (0, node, host, port)
    };
    if version >= 4 {
        let coordinators = req
            .coordinator_keys
            .iter()
            .map(|key| {
                let (code, node, host, port) = answer(key);
                CoordinatorAnswer::default()
                    .with_key(key.clone())
                    .with_node_id(BrokerId(node))
                    .with_host(st(&host))
                    .with_port(port)
                    .with_error_code(code)
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    let (code, node, host, port) = answer(&req.key);
    FindCoordinatorResponse::default()
        .with_error_code(code)
        .with_node_id(BrokerId(node))
        .with_host(st(&host))
        .with_port(port)
}

pub(crate) async fn join_group(
    s: &Session,
    req: JoinGroupRequest,
    version: i16,
    client_id: &str,
) -> JoinGroupResponse {
    let group = req.group_id.0.to_string();
    let failed = |code: i16, member: &str| {
        let mut r = JoinGroupResponse::default()
            .with_error_code(code)
            .with_generation_id(-1)
            .with_member_id(st(member));
        if version < 7 {
            r.protocol_name = Some(StrBytes::default());
        }
        r
    };
    if !may_use(s, &group) {
        return failed(ResponseError::GroupAuthorizationFailed.code(), "");
    }
    let session_timeout = Duration::from_millis(u64::try_from(req.session_timeout_ms).unwrap_or(0));
    // v0 has no rebalance timeout: the session timeout stands for it.
    let rebalance_timeout = if version == 0 || req.rebalance_timeout_ms <= 0 {
        session_timeout
    } else {
        Duration::from_millis(u64::try_from(req.rebalance_timeout_ms).unwrap_or(0))
    };
    let member = req.member_id.to_string();
    let joined = s
        .server
        .cx
        .groups
        .join(JoinRequest {
            group,
            member_id: member.clone(),
            instance_id: req.group_instance_id.map(|i| i.to_string()),
            client_id: client_id.to_owned(),
            client_host: s.peer.map_or_else(String::new, |p| format!("/{}", p.ip())),
            session_timeout,
            rebalance_timeout,
            protocol_type: req.protocol_type.to_string(),
            protocols: req
                .protocols
                .into_iter()
                .map(|p| (p.name.to_string(), p.metadata))
                .collect(),
            require_known_member_id: version >= 4,
        })
        .await;
    match joined {
        Ok(j) => {
            let mut r = JoinGroupResponse::default()
                .with_generation_id(j.generation)
                .with_protocol_name(Some(st(j.protocol_name.as_deref().unwrap_or(""))))
                .with_leader(st(&j.leader))
                .with_member_id(st(&j.member_id))
                .with_members(
                    j.members
                        .into_iter()
                        .map(|m| {
                            let mut jm = JoinGroupResponseMember::default()
                                .with_member_id(st(&m.member_id))
                                .with_metadata(m.metadata);
                            if version >= 5 {
                                jm.group_instance_id = m.instance_id.map(|i| st(&i));
                            }
                            jm
                        })
                        .collect(),
                );
            if version >= 7 {
                r.protocol_type = j.protocol_type.map(|t| st(&t));
            }
            r
        }
        Err(GroupError::MemberIdRequired(id)) => {
            failed(ResponseError::MemberIdRequired.code(), &id)
        }
        Err(e) => failed(group_code(&e), &member),
    }
}

pub(crate) async fn sync_group(
    s: &Session,
    req: SyncGroupRequest,
    version: i16,
) -> SyncGroupResponse {
    let group = req.group_id.0.to_string();
    if !may_use(s, &group) {
        return SyncGroupResponse::default()
            .with_error_code(ResponseError::GroupAuthorizationFailed.code());
    }
    let protocol_type = req.protocol_type.as_ref().map(|t| t.to_string());
    let protocol_name = req.protocol_name.as_ref().map(|t| t.to_string());
    let synced = s
        .server
        .cx
        .groups
        .sync(
            &group,
            req.generation_id,
            &req.member_id,
            req.group_instance_id.as_deref(),
            (protocol_type.as_deref(), protocol_name.as_deref()),
            req.assignments
                .into_iter()
                .map(|a| (a.member_id.to_string(), a.assignment))
                .collect(),
        )
        .await;
    match synced {
        Ok(sy) => {
            let mut r = SyncGroupResponse::default().with_assignment(sy.assignment);
            if version >= 5 {
                r.protocol_type = sy.protocol_type.map(|t| st(&t));
                r.protocol_name = sy.protocol_name.map(|t| st(&t));
            }
            r
        }
        Err(e) => SyncGroupResponse::default()
            .with_error_code(group_code(&e))
            .with_assignment(Bytes::new()),
    }
}

pub(crate) fn heartbeat(s: &Session, req: HeartbeatRequest) -> HeartbeatResponse {
    let group = req.group_id.0.to_string();
    if !may_use(s, &group) {
        return HeartbeatResponse::default()
            .with_error_code(ResponseError::GroupAuthorizationFailed.code());
    }
    let code = match s.server.cx.groups.heartbeat(
        &group,
        req.generation_id,
        &req.member_id,
        req.group_instance_id.as_deref(),
    ) {
        Ok(()) => 0,
        Err(e) => group_code(&e),
    };
    HeartbeatResponse::default().with_error_code(code)
}

pub(crate) fn leave_group(s: &Session, req: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let group = req.group_id.0.to_string();
    if !may_use(s, &group) {
        return LeaveGroupResponse::default()
            .with_error_code(ResponseError::GroupAuthorizationFailed.code());
    }
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|i| i.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    match s.server.cx.groups.leave(&group, &members) {
        Err(e) => LeaveGroupResponse::default().with_error_code(group_code(&e)),
        Ok(answers) if version >= 3 => LeaveGroupResponse::default().with_members(
            members
                .into_iter()
                .zip(answers)
                .map(|((id, instance), r)| {
                    MemberResponse::default()
                        .with_member_id(st(&id))
                        .with_group_instance_id(instance.map(|i| st(&i)))
                        .with_error_code(r.err().map_or(0, |e| group_code(&e)))
                })
                .collect(),
        ),
        Ok(answers) => LeaveGroupResponse::default().with_error_code(
            answers
                .into_iter()
                .find_map(Result::err)
                .map_or(0, |e| group_code(&e)),
        ),
    }
}

/// A partition of a commit: its index and `Some(code)` when refused up
/// front, `None` when it went into the commit.
type CommitAnswer = (i32, Option<i16>);

pub(crate) async fn offset_commit(s: &Session, req: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let log = &s.server.cx.log;
    let mut answers: Vec<(TopicName, Vec<CommitAnswer>)> = Vec::new();
    let mut offsets = Vec::new();
    let mut metadata = Vec::new();
    let group_ok = may_use(s, &group);
    for t in &req.topics {
        let name = t.name.0.to_string();
        let known = log.topic(&name).ok();
        let readable = may_read(s, &name);
        let parts = t
            .partitions
            .iter()
            .map(|p| {
                let code = if !group_ok {
                    Some(ResponseError::GroupAuthorizationFailed.code())
                } else if !readable {
                    Some(ResponseError::TopicAuthorizationFailed.code())
                } else if !known.as_ref().is_some_and(|k| {
                    u32::try_from(p.partition_index).is_ok_and(|i| i < k.config.partitions)
                }) {
                    Some(ResponseError::UnknownTopicOrPartition.code())
                } else if p.committed_offset < 0 {
                    Some(ResponseError::OffsetOutOfRange.code())
                } else if p
                    .committed_metadata
                    .as_ref()
                    .is_some_and(|m| m.len() > MAX_COMMIT_METADATA)
                {
                    Some(ResponseError::OffsetMetadataTooLarge.code())
                } else {
                    offsets.push(GroupOffset {
                        topic: name.clone(),
                        partition: p.partition_index as u32,
                        offset: p.committed_offset as u64,
                    });
                    metadata.push(
                        p.committed_metadata
                            .as_ref()
                            .map_or_else(String::new, |m| m.to_string()),
                    );
                    None
                };
                (p.partition_index, code)
            })
            .collect();
        answers.push((t.name.clone(), parts));
    }
    let outcome: i16 = if offsets.is_empty() {
        0
    } else {
        match s
            .server
            .cx
            .groups
            .commit(
                &group,
                req.generation_id_or_member_epoch,
                &req.member_id,
                req.group_instance_id.as_deref(),
                offsets,
                metadata,
            )
            .await
        {
            Err(e) => group_code(&e),
            Ok(Ok(())) => 0,
            Ok(Err(LogError::OffsetOutOfRange { .. })) => ResponseError::OffsetOutOfRange.code(),
            Ok(Err(LogError::UnknownTopic(_) | LogError::UnknownPartition { .. })) => {
                ResponseError::UnknownTopicOrPartition.code()
            }
            Ok(Err(_)) => ResponseError::CoordinatorNotAvailable.code(),
        }
    };
    OffsetCommitResponse::default().with_topics(
        answers
            .into_iter()
            .map(|(name, parts)| {
                OffsetCommitResponseTopic::default()
                    .with_name(name)
                    .with_partitions(
                        parts
                            .into_iter()
                            .map(|(i, code)| {
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(i)
                                    .with_error_code(code.unwrap_or(outcome))
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

/// One group's committed offsets, as OffsetFetch answers: the partitions
/// asked for (or every committed one) with offset, metadata and error code;
/// -1 and no metadata where nothing is committed.
type Fetched = Result<Vec<(String, Vec<(i32, i64, String, i16)>)>, i16>;

/// With `require_stable`, a partition whose offset an open transaction
/// holds answers UNSTABLE_OFFSET_COMMIT (the client asks again).
fn fetch_offsets(
    s: &Session,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Fetched {
    if !may_use(s, group) {
        return Err(ResponseError::GroupAuthorizationFailed.code());
    }
    s.server
        .cx
        .groups
        .coordinating()
        .map_err(|e| group_code(&e))?;
    let committed = s
        .server
        .cx
        .log
        .group_offsets_with_metadata(group)
        .map_err(|_| ResponseError::InvalidGroupId.code())?;
    let wanted: Vec<(String, Vec<i32>)> = match topics {
        Some(t) => t,
        None => {
            let mut all: Vec<(String, Vec<i32>)> = Vec::new();
            for (o, _) in &committed {
                match all.last_mut() {
                    Some((t, ps)) if *t == o.topic => ps.push(o.partition as i32),
                    _ => all.push((o.topic.clone(), vec![o.partition as i32])),
                }
            }
            all.retain(|(t, _)| may_read(s, t));
            all
        }
    };
    Ok(wanted
        .into_iter()
        .map(|(topic, parts)| {
            let readable = may_read(s, &topic);
            let parts = parts
                .into_iter()
                .map(|p| {
                    if !readable {
                        let code = ResponseError::TopicAuthorizationFailed.code();
                        return (p, -1, String::new(), code);
                    }
                    if require_stable && s.server.offsets_pending(group, &topic, p) {
                        let code = ResponseError::UnstableOffsetCommit.code();
                        return (p, -1, String::new(), code);
                    }
                    match committed
                        .iter()
                        .find(|(o, _)| o.topic == topic && o.partition as i32 == p)
                    {
                        Some((o, metadata)) => (p, o.offset as i64, metadata.clone(), 0),
                        None => (p, -1, String::new(), 0),
                    }
                })
                .collect();
            (topic, parts)
        })
        .collect())
}

pub(crate) fn offset_fetch(
    s: &Session,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    if version >= 8 {
        let groups = req
            .groups
            .into_iter()
            .map(|g| {
                let topics = g.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes))
                        .collect()
                });
                let answer = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
                match fetch_offsets(s, &g.group_id, topics, req.require_stable) {
                    Err(code) => answer.with_error_code(code),
                    Ok(found) => answer.with_topics(
                        found
                            .into_iter()
                            .map(|(t, parts)| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(TopicName(st(&t)))
                                    .with_partitions(
                                        parts
                                            .into_iter()
                                            .map(|(p, o, m, code)| {
                                                OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(p)
                                                    .with_committed_offset(o)
                                                    .with_committed_leader_epoch(-1)
                                                    .with_metadata(Some(st(&m)))
                                                    .with_error_code(code)
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    ),
                }
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let topics = req.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    let found = fetch_offsets(s, &req.group_id, topics, req.require_stable);
    let (code, found) = match found {
        Ok(f) => (0, f),
        Err(code) => (code, Vec::new()),
    };
    let topics = found
        .into_iter()
        .map(|(t, parts)| {
            OffsetFetchResponseTopic::default()
                .with_name(TopicName(st(&t)))
                .with_partitions(
                    parts
                        .into_iter()
                        .map(|(p, o, m, c)| {
                            let mut r = OffsetFetchResponsePartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(o)
                                .with_metadata(Some(st(&m)))
                                .with_error_code(c);
                            if version >= 5 {
                                r.committed_leader_epoch = -1;
                            }
                            r
                        })
                        .collect(),
                )
        })
        .collect();
    let mut r = OffsetFetchResponse::default().with_topics(topics);
    if version >= 2 {
        r.error_code = code;
    }
    r
}

pub(crate) fn list_groups(s: &Session, req: ListGroupsRequest, version: i16) -> ListGroupsResponse {
    let states: Vec<String> = req.states_filter.iter().map(|x| x.to_lowercase()).collect();
    // Each broker lists the groups it coordinates (admin clients ask every
    // broker): on a cluster, a node that does not lead has none.
    match s.server.cx.groups.coordinating() {
        Ok(()) => {}
        Err(GroupError::NotCoordinator) => return ListGroupsResponse::default(),
        Err(e) => return ListGroupsResponse::default().with_error_code(group_code(&e)),
    }
    let groups = s
        .server
        .cx
        .groups
        .list()
        .into_iter()
        .filter(|g| may_use(s, &g.name))
        .filter(|g| states.is_empty() || states.contains(&g.state.name().to_lowercase()))
        .map(|g| {
            let mut l = ListedGroup::default()
                .with_group_id(GroupId(st(&g.name)))
                .with_protocol_type(st(&g.protocol_type));
            if version >= 4 {
                l.group_state = st(g.state.name());
            }
            if version >= 5 {
                l.group_type = st("classic");
            }
            l
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

pub(crate) fn describe_groups(
    s: &Session,
    req: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let groups = req
        .groups
        .into_iter()
        .map(|name| {
            let mut d = DescribedGroup::default().with_group_id(name.clone());
            if !may_use(s, &name) {
                return d.with_error_code(ResponseError::GroupAuthorizationFailed.code());
            }
            if let Err(e) = s.server.cx.groups.coordinating() {
                return d.with_error_code(group_code(&e));
            }
            let Some(g) = s.server.cx.groups.describe(&name) else {
                // A group whose members all left long ago (or before a
                // restart) is still there while it has positions: Empty.
                let positions = s.server.cx.log.group_offsets(&name);
                if positions.is_ok_and(|o| !o.is_empty()) {
                    return d.with_group_state(st("Empty"));
                }
                // An unknown group: v6 says so, as Kafka does; older
                // versions describe it as Dead, without an error.
                if version >= 6 {
                    return d
                        .with_group_state(st("Dead"))
                        .with_error_code(ResponseError::GroupIdNotFound.code())
                        .with_error_message(Some(st(&format!("Group {} not found.", name.0))));
                }
                return d.with_group_state(st("Dead"));
            };
            d = d
                .with_group_state(st(g.state.name()))
                .with_protocol_type(st(&g.protocol_type))
                .with_protocol_data(st(&g.protocol))
                .with_members(
                    g.members
                        .into_iter()
                        .map(|m| {
                            let mut dm = DescribedGroupMember::default()
                                .with_member_id(st(&m.member_id))
                                .with_client_id(st(&m.client_id))
                                .with_client_host(st(&m.client_host))
                                .with_member_metadata(m.metadata)
                                .with_member_assignment(m.assignment);
                            if version >= 4 {
                                dm.group_instance_id = m.instance_id.map(|i| st(&i));
                            }
                            dm
                        })
                        .collect(),
                );
            d
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

pub(crate) async fn delete_groups(s: &Session, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut results = Vec::new();
    for name in req.groups_names {
        let code = if !may_use(s, &name) {
            ResponseError::GroupAuthorizationFailed.code()
        } else {
            match s.server.cx.groups.delete(&name).await {
                Ok(()) => 0,
                Err(e) => group_code(&e),
            }
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(name)
                .with_error_code(code),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}

/// OffsetDelete (`kafka-consumer-groups --delete-offsets`,
/// `Admin.deleteConsumerGroupOffsets`): as Kafka, per partition
/// TOPIC_AUTHORIZATION_FAILED or UNKNOWN_TOPIC_OR_PARTITION first, then the
/// coordinator's answer (GROUP_SUBSCRIBED_TO_TOPIC for a topic a member
/// reads); a group-wide refusal is the top-level code with no topics.
pub(crate) async fn offset_delete(s: &Session, req: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let group = req.group_id.0.to_string();
    if !may_use(s, &group) {
        return OffsetDeleteResponse::default()
            .with_error_code(ResponseError::GroupAuthorizationFailed.code());
    }
    let log = &s.server.cx.log;
    let mut answers: Vec<(TopicName, i32, i16)> = Vec::new();
    let mut wanted: Vec<(String, u32)> = Vec::new();
    for topic in req.topics {
        let name = topic.name.0.to_string();
        let known = log.topic(&name).ok();
        let readable = may_read(s, &name);
        for p in topic.partitions {
            let index = p.partition_index;
            let partition = u32::try_from(index)
                .ok()
                .filter(|i| known.as_ref().is_some_and(|k| *i < k.config.partitions));
            match (readable, partition) {
                (false, _) => answers.push((
                    topic.name.clone(),
                    index,
                    ResponseError::TopicAuthorizationFailed.code(),
                )),
                (true, None) => answers.push((
                    topic.name.clone(),
                    index,
                    ResponseError::UnknownTopicOrPartition.code(),
                )),
                (true, Some(i)) => wanted.push((name.clone(), i)),
            }
        }
    }
    match s.server.cx.groups.delete_offsets(&group, wanted).await {
        Err(e) => OffsetDeleteResponse::default().with_error_code(group_code(&e)),
        Ok(done) => {
            for (topic, partition, r) in done {
                let code = r.err().map_or(0, |e| group_code(&e));
                answers.push((TopicName(st(&topic)), partition as i32, code));
            }
            let mut topics: Vec<OffsetDeleteResponseTopic> = Vec::new();
            for (name, index, code) in answers {
                let p = OffsetDeleteResponsePartition::default()
                    .with_partition_index(index)
                    .with_error_code(code);
                match topics.iter_mut().find(|t| t.name == name) {
                    Some(t) => t.partitions.push(p),
                    None => topics.push(
                        OffsetDeleteResponseTopic::default()
                            .with_name(name)
                            .with_partitions(vec![p]),
                    ),
                }
            }
            OffsetDeleteResponse::default().with_topics(topics)
        }
    }
}
