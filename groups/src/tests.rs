//! The state machine under paused time: every rule is tried with the
//! answers a client would see.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tributary_storage::store::MemStore;
use tributary_storage::{GroupOffset, Log, LogConfig, TopicConfig};

use super::*;

fn coordinator(config: GroupsConfig) -> (Coordinator, CancellationToken) {
    let log = Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
    let c = Coordinator::new(log, config);
    let stop = CancellationToken::new();
    tokio::spawn(c.clone().run(stop.clone()));
    (c, stop)
}

fn quick() -> GroupsConfig {
    GroupsConfig {
        initial_rebalance_delay: Duration::from_millis(300),
        ..GroupsConfig::default()
    }
}

fn join_req(member: &str, client: &str, protocols: &[&str]) -> JoinRequest {
    JoinRequest {
        group: "g".into(),
        member_id: member.into(),
        instance_id: None,
        client_id: client.into(),
        client_host: "/127.0.0.1".into(),
        session_timeout: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(20),
        protocol_type: "consumer".into(),
        protocols: protocols
            .iter()
            .map(|p| ((*p).to_owned(), Bytes::from(format!("{client}:{p}"))))
            .collect(),
        require_known_member_id: false,
    }
}

async fn sync(c: &Coordinator, j: &Joined, assign: Vec<(String, Bytes)>) -> Synced {
    c.sync("g", j.generation, &j.member_id, None, (None, None), assign)
        .await
        .expect("sync")
}

/// Three members join together, the leader assigns, everyone gets its part.
async fn three_stable(c: &Coordinator) -> Vec<Joined> {
    let joins = ["a", "b", "c"].map(|n| {
        let c = c.clone();
        tokio::spawn(async move { c.join(join_req("", n, &["range", "roundrobin"])).await })
    });
    let mut joined = Vec::new();
    for j in joins {
        joined.push(j.await.expect("task").expect("join"));
    }
    let leader = joined
        .iter()
        .find(|j| j.leader == j.member_id)
        .expect("leader");
    let assign: Vec<(String, Bytes)> = leader
        .members
        .iter()
        .map(|m| {
            (
                m.member_id.clone(),
                Bytes::from(format!("for {}", m.member_id)),
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for j in joined.clone() {
        let c = c.clone();
        let a = if j.leader == j.member_id {
            assign.clone()
        } else {
            Vec::new()
        };
        tasks.push(tokio::spawn(async move { sync(&c, &j, a).await }));
    }
    for (t, j) in tasks.into_iter().zip(&joined) {
        let s = t.await.expect("task");
        assert_eq!(s.assignment, Bytes::from(format!("for {}", j.member_id)));
        assert_eq!(s.protocol_name.as_deref(), Some("range"));
    }
    joined
}

#[tokio::test(start_paused = true)]
async fn members_joining_together_form_one_generation_and_get_the_leaders_assignment() {
    let (c, _stop) = coordinator(quick());
    let joined = three_stable(&c).await;
    assert!(joined.iter().all(|j| j.generation == 1));
    let leaders: Vec<_> = joined.iter().filter(|j| !j.members.is_empty()).collect();
    assert_eq!(leaders.len(), 1, "only the leader sees the members");
    assert_eq!(leaders[0].members.len(), 3);
    // The leader sees each member's metadata for the chosen protocol.
    for m in &leaders[0].members {
        let j = joined
            .iter()
            .find(|j| j.member_id == m.member_id)
            .expect("member");
        let client = j.member_id.split('-').next().expect("prefix");
        assert_eq!(m.metadata, Bytes::from(format!("{client}:range")));
    }
    for j in &joined {
        c.heartbeat("g", j.generation, &j.member_id, None)
            .expect("heartbeat");
    }
    let view = c.describe("g").expect("described");
    assert_eq!(view.state, State::Stable);
    assert_eq!(view.members.len(), 3);
    assert_eq!(c.member_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_member_that_stops_heartbeating_is_removed_and_the_others_rebalance() {
    let (c, _stop) = coordinator(quick());
    let joined = three_stable(&c).await;
    let (dead, alive) = (&joined[0], &joined[1..]);
    // The others keep heartbeating; the first falls silent.
    for _ in 0..12 {
        sleep(Duration::from_secs(1)).await;
        for j in alive {
            match c.heartbeat("g", j.generation, &j.member_id, None) {
                Ok(()) | Err(GroupError::RebalanceInProgress) => {}
                Err(e) => panic!("heartbeat: {e}"),
            }
        }
    }
    assert_eq!(
        c.heartbeat("g", dead.generation, &dead.member_id, None),
        Err(GroupError::UnknownMemberId)
    );
    assert_eq!(
        c.heartbeat("g", alive[0].generation, &alive[0].member_id, None),
        Err(GroupError::RebalanceInProgress)
    );
    // The survivors rejoin with their ids and form generation 2.
    let rejoins: Vec<_> = alive
        .iter()
        .map(|j| {
            let c = c.clone();
            let client = j.member_id.split('-').next().expect("prefix").to_owned();
            let req = join_req(&j.member_id, &client, &["range", "roundrobin"]);
            tokio::spawn(async move { c.join(req).await })
        })
        .collect();
    for r in rejoins {
        let j = r.await.expect("task").expect("rejoin");
        assert_eq!(j.generation, 2);
        if j.leader == j.member_id {
            assert_eq!(j.members.len(), 2);
        }
    }
    assert_eq!(c.member_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_new_member_gets_an_id_first_and_an_unknown_id_is_refused() {
    let (c, _stop) = coordinator(quick());
    let mut req = join_req("", "x", &["range"]);
    req.require_known_member_id = true;
    let Err(GroupError::MemberIdRequired(id)) = c.join(req.clone()).await else {
        panic!("expected MEMBER_ID_REQUIRED");
    };
    assert!(id.starts_with("x-"));
    req.member_id = id.clone();
    let j = c.join(req.clone()).await.expect("join with the id");
    assert_eq!(j.member_id, id);
    assert_eq!(j.leader, id);
    req.member_id = "nobody".into();
    assert_eq!(c.join(req).await.err(), Some(GroupError::UnknownMemberId));
    // The wrong generation, a stranger, a rebalance: Kafka's codes.
    assert_eq!(
        c.heartbeat("g", j.generation + 1, &id, None),
        Err(GroupError::IllegalGeneration)
    );
    assert_eq!(
        c.heartbeat("g", j.generation, "nobody", None),
        Err(GroupError::UnknownMemberId)
    );
}

#[tokio::test(start_paused = true)]
async fn protocols_must_agree_and_session_timeouts_stay_in_bounds() {
    let (c, _stop) = coordinator(quick());
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.join(join_req("", "a", &["range"])).await }
    });
    sleep(Duration::from_millis(10)).await;
    assert_eq!(
        c.join(join_req("", "b", &["sticky"])).await.err(),
        Some(GroupError::InconsistentGroupProtocol)
    );
    let mut short = join_req("", "b", &["range"]);
    short.session_timeout = Duration::from_secs(1);
    assert_eq!(
        c.join(short).await.err(),
        Some(GroupError::InvalidSessionTimeout)
    );
    first.await.expect("task").expect("join");
}

#[tokio::test(start_paused = true)]
async fn a_static_member_that_comes_back_keeps_its_assignment_without_a_rebalance() {
    let (c, _stop) = coordinator(quick());
    let mut req = join_req("", "s", &["range"]);
    req.instance_id = Some("pump-1".into());
    let j = c.join(req.clone()).await.expect("join");
    let s = sync(
        &c,
        &j,
        vec![(j.member_id.clone(), Bytes::from_static(b"p0"))],
    )
    .await;
    assert_eq!(s.assignment, Bytes::from_static(b"p0"));
    let rebalances = c.rebalances();
    // The client restarts: a new connection, no member id, the same instance.
    let again = c.join(req.clone()).await.expect("rejoin");
    assert_ne!(again.member_id, j.member_id);
    assert_eq!(again.generation, j.generation, "no new generation");
    assert_eq!(c.rebalances(), rebalances, "no rebalance");
    let s = c
        .sync(
            "g",
            again.generation,
            &again.member_id,
            Some("pump-1"),
            (None, None),
            Vec::new(),
        )
        .await
        .expect("sync");
    assert_eq!(s.assignment, Bytes::from_static(b"p0"));
    // The old incarnation is fenced.
    assert_eq!(
        c.heartbeat("g", j.generation, &j.member_id, Some("pump-1")),
        Err(GroupError::FencedInstanceId)
    );
}

// Real time: this test waits on the log's committer thread, and paused time
// would race the coordinator's timer (and the members' sessions) forward
// while the runtime waits on it.
#[tokio::test]
async fn leaving_rebalances_and_only_an_empty_group_is_deleted() {
    let (c, _stop) = coordinator(quick());
    c.log()
        .create_topic(TopicConfig::new("t", 2))
        .await
        .expect("topic");
    let joined = three_stable(&c).await;
    let j = &joined[0];
    // A member commits; a stale generation may not.
    let offsets = vec![GroupOffset {
        topic: "t".into(),
        partition: 0,
        offset: 0,
    }];
    c.commit(
        "g",
        j.generation,
        &j.member_id,
        None,
        offsets.clone(),
        Vec::new(),
    )
    .await
    .expect("allowed")
    .expect("stored");
    assert_eq!(
        c.commit(
            "g",
            j.generation - 1,
            &j.member_id,
            None,
            offsets.clone(),
            Vec::new()
        )
        .await
        .err(),
        Some(GroupError::IllegalGeneration)
    );
    assert_eq!(
        c.commit("g", -1, "", None, offsets.clone(), Vec::new())
            .await
            .err(),
        Some(GroupError::UnknownMemberId),
        "a plain commit may not move a live group's positions"
    );
    assert_eq!(c.delete("g").await, Err(GroupError::NonEmptyGroup));
    let all: Vec<(String, Option<String>)> =
        joined.iter().map(|j| (j.member_id.clone(), None)).collect();
    let answers = c.leave("g", &all).expect("leave");
    assert!(answers.iter().all(Result::is_ok));
    assert_eq!(c.member_count(), 0);
    assert_eq!(c.describe("g").map(|v| v.state), Some(State::Empty));
    // Once the emptied group has left memory, its protocol type is still
    // given (as Kafka gives it: the group is not a simple consumer's).
    c.tick(tokio::time::Instant::now());
    let described = c.describe("g").expect("positions");
    assert_eq!(
        (described.state, described.protocol_type.as_str()),
        (State::Empty, "consumer")
    );
    assert_eq!(
        c.list()
            .iter()
            .map(|v| (v.name.as_str(), v.protocol_type.as_str()))
            .collect::<Vec<_>>(),
        [("g", "consumer")]
    );
    c.delete("g").await.expect("deleted");
    assert_eq!(c.log().meta_get(TYPE_SPACE, b"g").expect("meta"), None);
    assert!(c.describe("g").is_none());
    assert!(c.log().group_offsets("g").expect("offsets").is_empty());
    assert_eq!(c.delete("g").await, Err(GroupError::GroupIdNotFound));
}

#[tokio::test(start_paused = true)]
async fn the_node_wide_member_limit_refuses_more_members() {
    let (c, _stop) = coordinator(GroupsConfig {
        max_members: 2,
        ..quick()
    });
    let mut req = join_req("", "a", &["range"]);
    req.require_known_member_id = true;
    for _ in 0..2 {
        assert!(matches!(
            c.join(req.clone()).await,
            Err(GroupError::MemberIdRequired(_))
        ));
    }
    assert_eq!(
        c.join(req).await.err(),
        Some(GroupError::GroupMaxSizeReached)
    );
    // Ids handed out and never used are forgotten after their session.
    sleep(Duration::from_secs(25)).await;
    assert_eq!(c.member_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_never_assigns_lets_the_waiting_members_rejoin() {
    let (c, _stop) = coordinator(quick());
    let joined = {
        let a = tokio::spawn({
            let c = c.clone();
            async move { c.join(join_req("", "a", &["range"])).await }
        });
        let b = tokio::spawn({
            let c = c.clone();
            async move { c.join(join_req("", "b", &["range"])).await }
        });
        [
            a.await.expect("a").expect("a"),
            b.await.expect("b").expect("b"),
        ]
    };
    let follower = joined
        .iter()
        .find(|j| j.leader != j.member_id)
        .expect("follower")
        .clone();
    // The follower asks for its assignment; the leader never sends one.
    let waiting = c
        .sync(
            "g",
            follower.generation,
            &follower.member_id,
            None,
            (None, None),
            Vec::new(),
        )
        .await;
    assert_eq!(waiting.err(), Some(GroupError::RebalanceInProgress));
    // The leader is gone; the follower rejoins alone.
    let j = c
        .join(join_req(&follower.member_id, "b", &["range"]))
        .await
        .expect("rejoin");
    assert_eq!(j.leader, follower.member_id);
    assert_eq!(c.member_count(), 1);
}

/// A `consumer`-protocol subscription (version 1) to these topics.
fn subscription(topics: &[&str]) -> Bytes {
    let mut b = vec![0, 1];
    b.extend_from_slice(&(topics.len() as i32).to_be_bytes());
    for t in topics {
        b.extend_from_slice(&(t.len() as i16).to_be_bytes());
        b.extend_from_slice(t.as_bytes());
    }
    // Null user data, no owned partitions.
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    Bytes::from(b)
}

#[test]
fn a_consumer_subscription_decodes_and_garbage_does_not() {
    assert_eq!(
        consumer_subscription(&subscription(&["a", "bc"])),
        Some(vec!["a".to_owned(), "bc".to_owned()])
    );
    assert_eq!(consumer_subscription(&[]), None);
    assert_eq!(consumer_subscription(&[0, 1, 0x7f, 0xff, 0xff, 0xff]), None);
    assert_eq!(consumer_subscription(&[0, 1, 0, 0, 0, 1, 0, 5, b'a']), None);
    assert_eq!(consumer_subscription(&[0, 1, 0, 0, 0, 1, 0, 1, 0xff]), None);
}

// Real time: with a paused clock, the wait for the log's committer thread
// lets tokio jump to the member's session timeout, and the member is gone.
#[tokio::test]
async fn offsets_are_deleted_only_in_topics_no_member_subscribes_to() {
    let (c, _stop) = coordinator(quick());
    for t in ["t", "u"] {
        c.log()
            .create_topic(TopicConfig::new(t, 2))
            .await
            .expect("topic");
    }
    assert_eq!(
        c.delete_offsets("g", vec![("t".into(), 0)]).await.err(),
        Some(GroupError::GroupIdNotFound)
    );
    let mut req = join_req("", "a", &["range"]);
    req.protocols = vec![("range".into(), subscription(&["t"]))];
    let j = c.join(req).await.expect("join");
    sync(&c, &j, vec![(j.member_id.clone(), Bytes::new())]).await;
    let at = |topic: &str, partition: u32| GroupOffset {
        topic: topic.into(),
        partition,
        offset: 0,
    };
    c.commit(
        "g",
        j.generation,
        &j.member_id,
        None,
        vec![at("t", 0), at("t", 1), at("u", 0), at("u", 1)],
        Vec::new(),
    )
    .await
    .expect("allowed")
    .expect("stored");
    // With a member subscribed to t: t's positions stay, u's go.
    let answers = c
        .delete_offsets("g", vec![("t".into(), 0), ("u".into(), 1)])
        .await
        .expect("answered");
    assert_eq!(
        answers,
        vec![
            ("u".to_owned(), 1, Ok(())),
            ("t".to_owned(), 0, Err(GroupError::GroupSubscribedToTopic)),
        ]
    );
    assert_eq!(
        c.log().group_offsets("g").expect("offsets"),
        vec![at("t", 0), at("t", 1), at("u", 0)]
    );
    // Once the group is empty, t's go too.
    c.leave("g", &[(j.member_id.clone(), None)]).expect("leave");
    let answers = c
        .delete_offsets("g", vec![("t".into(), 0), ("t".into(), 1)])
        .await
        .expect("answered");
    assert!(answers.iter().all(|(_, _, r)| r.is_ok()), "{answers:?}");
    assert_eq!(
        c.log().group_offsets("g").expect("offsets"),
        vec![at("u", 0)]
    );
    assert_eq!(
        c.delete_offsets("", vec![]).await.err(),
        Some(GroupError::InvalidGroupId)
    );
}

// Real time, as above: the member must outlive the log's writes.
#[tokio::test]
async fn a_group_of_another_protocol_with_members_keeps_its_offsets() {
    let (c, _stop) = coordinator(quick());
    c.log()
        .create_topic(TopicConfig::new("t", 1))
        .await
        .expect("topic");
    let mut req = join_req("", "a", &["x"]);
    req.protocol_type = "connect".into();
    let j = c.join(req).await.expect("join");
    sync(&c, &j, vec![(j.member_id.clone(), Bytes::new())]).await;
    assert_eq!(
        c.delete_offsets("g", vec![("t".into(), 0)]).await.err(),
        Some(GroupError::NonEmptyGroup)
    );
}

#[test]
fn a_consumer_assignment_decodes_and_garbage_does_not() {
    // version 3, topics [("t", [0, 2])], no user data.
    let mut b = vec![
        0, 3, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2,
    ];
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(
        consumer_assignment(&b),
        Some(vec![("t".to_owned(), vec![0, 2])])
    );
    assert_eq!(consumer_assignment(&[]), Some(Vec::new()));
    assert_eq!(consumer_assignment(&[0, 3, 0, 0, 0, 9]), None);
    assert_eq!(
        consumer_assignment(&[0, 3, 0, 0, 0, 1, 0, 1, b't', 0x7f, 0xff, 0xff, 0xff]),
        None
    );
}

/// A replicated log of one node for these tests: each op is applied in
/// turn as a cluster's state machine would, and the leadership is the
/// test's to change.
struct Loopback {
    ops: tokio::sync::mpsc::Sender<(tributary_storage::Op, Reply)>,
    leadership: tokio::sync::watch::Receiver<tributary_storage::Leadership>,
}

type Reply = tokio::sync::oneshot::Sender<tributary_storage::Result<tributary_storage::Applied>>;

impl tributary_storage::Replicator for Loopback {
    fn submit(
        &self,
        op: tributary_storage::Op,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = tributary_storage::Result<tributary_storage::Pending>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.ops
                .send((op, reply))
                .await
                .map_err(|_| tributary_storage::Error::Closed)?;
            let pending: tributary_storage::Pending =
                Box::pin(
                    async move { answer.await.map_err(|_| tributary_storage::Error::Closed)? },
                );
            Ok(pending)
        })
    }

    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<tributary_storage::Leadership>> {
        Some(self.leadership.clone())
    }
}

fn leader(node: u64, term: u64) -> tributary_storage::Leadership {
    tributary_storage::Leadership {
        node: 1,
        leader: Some(node),
        term,
        voters: vec![1, 2, 3],
        cut_off: false,
    }
}

/// A leader cut off from the majority stops coordinating (its members look
/// for the coordinator again) but keeps its groups: heard from the majority
/// again, still leading, its members go on in the same generation; once it
/// knows another node leads, the groups are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_stops_coordinating_and_keeps_its_groups() {
    let log = Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
    let (ops, _queued) = tokio::sync::mpsc::channel(16);
    let (lead, leadership) = tokio::sync::watch::channel(leader(1, 1));
    log.replicate_with(Arc::new(Loopback { ops, leadership }))
        .expect("replicator");
    let stop = CancellationToken::new();
    let c = Coordinator::start(log.clone(), quick(), stop.clone());
    let joined = c.join(join_req("", "a", &["range"])).await.expect("join");
    let (generation, member) = (joined.generation, joined.member_id);
    c.heartbeat("g", generation, &member, None)
        .expect("coordinating");
    lead.send(tributary_storage::Leadership {
        cut_off: true,
        ..leader(1, 1)
    })
    .expect("leadership");
    assert_eq!(
        c.heartbeat("g", generation, &member, None).err(),
        Some(GroupError::CoordinatorNotAvailable)
    );
    assert_eq!(
        c.join(join_req("", "b", &["range"])).await.err(),
        Some(GroupError::CoordinatorNotAvailable)
    );
    // Ticks pass (the coordinator ticks every few hundred ms).
    sleep(Duration::from_secs(1)).await;
    lead.send(leader(1, 1)).expect("leadership");
    c.heartbeat("g", generation, &member, None)
        .expect("the same member, the same generation");
    // Another node leads: the groups go.
    lead.send(leader(2, 2)).expect("leadership");
    sleep(Duration::from_secs(1)).await;
    lead.send(leader(1, 3)).expect("leadership");
    assert_eq!(
        c.heartbeat("g", generation, &member, None).err(),
        Some(GroupError::UnknownMemberId)
    );
    stop.cancel();
}

/// On a cluster, the leader writes positions under its claim for the term
/// it leads. Once another node has claimed the groups (a newer leader that
/// this one has not heard of yet), its commits and removals are refused
/// with NOT_COORDINATOR and move nothing; leading again in a later term,
/// it claims again and writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_was_replaced_cannot_move_a_position() {
    let log = Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
    let (ops, mut queued) = tokio::sync::mpsc::channel(16);
    let (lead, leadership) = tokio::sync::watch::channel(leader(1, 1));
    log.replicate_with(Arc::new(Loopback { ops, leadership }))
        .expect("replicator");
    let applier = log.clone();
    tokio::spawn(async move {
        let mut index = 0;
        while let Some((op, reply)) = queued.recv().await {
            index += 1;
            let outcome = applier.apply_all(vec![(index, op)]).await.pop();
            let _ = reply.send(outcome.unwrap_or(Err(tributary_storage::Error::Closed)));
        }
    });
    let (c, _stop) = (
        Coordinator::new(log.clone(), quick()),
        CancellationToken::new(),
    );
    log.create_topic(TopicConfig::new("t", 1))
        .await
        .expect("topic");
    let events: Vec<tributary_storage::Event> = (0..5)
        .map(|i| tributary_storage::Event::new(format!("e{i}")))
        .collect();
    log.append("t", events.into_iter().map(Into::into).collect())
        .await
        .expect("append");
    let at = |offset| {
        vec![GroupOffset {
            topic: "t".into(),
            partition: 0,
            offset,
        }]
    };
    let commit = |offset| c.commit("g", -1, "", None, at(offset), Vec::new());
    commit(1).await.expect("leading").expect("stored");
    assert_eq!(
        log.meta_get(CLAIM_SPACE, CLAIM_KEY).expect("claim"),
        Some(b"1:1".to_vec())
    );
    // Node 2 is elected for term 2 and claims the groups; node 1 has not
    // heard yet and still takes itself for the leader of term 1.
    log.claim(&Guard {
        space: CLAIM_SPACE.into(),
        key: CLAIM_KEY.to_vec(),
        value: b"2:2".to_vec(),
    })
    .await
    .expect("node 2's claim");
    assert_eq!(commit(2).await.err(), Some(GroupError::NotCoordinator));
    // The HTTP API's plain commit too.
    assert_eq!(
        c.commit_plain("g", at(2)).await.err(),
        Some(GroupError::NotCoordinator)
    );
    assert_eq!(c.delete("g").await.err(), Some(GroupError::NotCoordinator));
    assert_eq!(
        c.delete_offsets("g", vec![("t".into(), 0)]).await.err(),
        Some(GroupError::NotCoordinator)
    );
    assert_eq!(log.group_offsets("g").expect("positions"), at(1));
    // Once it knows, it refuses before writing.
    lead.send(leader(2, 2)).expect("leadership");
    assert_eq!(commit(2).await.err(), Some(GroupError::NotCoordinator));
    // Elected again, for term 3: it claims again, and its writes count.
    lead.send(leader(1, 3)).expect("leadership");
    commit(3).await.expect("leading").expect("stored");
    assert_eq!(
        log.meta_get(CLAIM_SPACE, CLAIM_KEY).expect("claim"),
        Some(b"1:3".to_vec())
    );
    assert_eq!(log.group_offsets("g").expect("positions"), at(3));
}
