//! The Kafka admin APIs, driven request by request with a raw client (the
//! installed tier drives them with librdkafka's and kafkajs's admin
//! clients): topics created with configs, described, changed, grown and
//! deleted, every refusal with Kafka's own code, what is done visible over
//! HTTP at once, and device auth keeping deletion and changes for the admin.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::kafka::{name, sasl_plain, Client};
use common::{get, InProcessNode};
use kafka_protocol::messages::alter_configs_request::{AlterConfigsResource, AlterableConfig};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request as incremental;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, ApiKey, CreatePartitionsRequest,
    CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, MetadataRequest,
    MetadataResponse,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::ResponseError;
use serde_json::json;

fn st(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

fn topic(n: &str, partitions: i32, configs: &[(&str, &str)]) -> CreatableTopic {
    CreatableTopic::default()
        .with_name(name(n))
        .with_num_partitions(partitions)
        .with_replication_factor(-1)
        .with_configs(
            configs
                .iter()
                .map(|(k, v)| {
                    CreatableTopicConfig::default()
                        .with_name(st(k))
                        .with_value(Some(st(v)))
                })
                .collect(),
        )
}

async fn create(
    c: &mut Client,
    topics: Vec<CreatableTopic>,
    validate_only: bool,
) -> CreateTopicsResponse {
    let req = CreateTopicsRequest::default()
        .with_topics(topics)
        .with_timeout_ms(5000)
        .with_validate_only(validate_only);
    let mut b = c.call(ApiKey::CreateTopics, 7, &req).await;
    CreateTopicsResponse::decode(&mut b, 7).expect("create topics")
}

async fn describe(
    c: &mut Client,
    resource_type: i8,
    n: &str,
    keys: Option<&[&str]>,
) -> DescribeConfigsResponse {
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(resource_type)
            .with_resource_name(st(n))
            .with_configuration_keys(keys.map(|k| k.iter().map(|k| st(k)).collect()))]);
    let mut b = c.call(ApiKey::DescribeConfigs, 4, &req).await;
    DescribeConfigsResponse::decode(&mut b, 4).expect("describe configs")
}

fn config_value(r: &DescribeConfigsResponse, key: &str) -> (String, i8) {
    let e = r.results[0]
        .configs
        .iter()
        .find(|e| &*e.name == key)
        .unwrap_or_else(|| panic!("{key} not described"));
    (e.value.as_deref().unwrap_or("").to_owned(), e.config_source)
}

async fn incremental_alter(c: &mut Client, n: &str, ops: &[(&str, i8, Option<&str>)]) -> i16 {
    let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
        incremental::AlterConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(st(n))
            .with_configs(
                ops.iter()
                    .map(|(k, op, v)| {
                        incremental::AlterableConfig::default()
                            .with_name(st(k))
                            .with_config_operation(*op)
                            .with_value(v.map(st))
                    })
                    .collect(),
            ),
    ]);
    let mut b = c.call(ApiKey::IncrementalAlterConfigs, 1, &req).await;
    IncrementalAlterConfigsResponse::decode(&mut b, 1)
        .expect("incremental alter")
        .responses[0]
        .error_code
}

async fn alter(c: &mut Client, n: &str, configs: &[(&str, &str)]) -> i16 {
    let req = AlterConfigsRequest::default().with_resources(vec![AlterConfigsResource::default()
        .with_resource_type(2)
        .with_resource_name(st(n))
        .with_configs(
            configs
                .iter()
                .map(|(k, v)| {
                    AlterableConfig::default()
                        .with_name(st(k))
                        .with_value(Some(st(v)))
                })
                .collect(),
        )]);
    let mut b = c.call(ApiKey::AlterConfigs, 2, &req).await;
    AlterConfigsResponse::decode(&mut b, 2)
        .expect("alter configs")
        .responses[0]
        .error_code
}

async fn grow(c: &mut Client, n: &str, count: i32) -> i16 {
    let req = CreatePartitionsRequest::default()
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(name(n))
            .with_count(count)])
        .with_timeout_ms(5000);
    let mut b = c.call(ApiKey::CreatePartitions, 3, &req).await;
    CreatePartitionsResponse::decode(&mut b, 3)
        .expect("create partitions")
        .results[0]
        .error_code
}

async fn delete(c: &mut Client, n: &str) -> i16 {
    let req = DeleteTopicsRequest::default()
        .with_topics(vec![DeleteTopicState::default().with_name(Some(name(n)))])
        .with_timeout_ms(5000);
    let mut b = c.call(ApiKey::DeleteTopics, 6, &req).await;
    DeleteTopicsResponse::decode(&mut b, 6)
        .expect("delete topics")
        .responses[0]
        .error_code
}

async fn partitions_in_metadata(c: &mut Client, n: &str) -> Result<usize, i16> {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(name(n)))
        ]))
        .with_allow_auto_topic_creation(false);
    let mut b = c.call(ApiKey::Metadata, 12, &req).await;
    let m = MetadataResponse::decode(&mut b, 12).expect("metadata");
    match m.topics[0].error_code {
        0 => Ok(m.topics[0].partitions.len()),
        code => Err(code),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_described_changed_grown_and_deleted_with_kafkas_codes() {
    let node = InProcessNode::start("").await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&node).await;

    let r = create(
        &mut c,
        vec![topic(
            "orders",
            3,
            &[
                ("retention.ms", "3600000"),
                ("max.message.bytes", "2048"),
                ("segment.bytes", "1048576"),
            ],
        )],
        false,
    )
    .await;
    let t = &r.topics[0];
    assert_eq!(t.error_code, 0, "{:?}", t.error_message);
    assert_eq!((t.num_partitions, t.replication_factor), (3, 1));
    let shown = t.configs.as_ref().expect("configs");
    assert!(shown
        .iter()
        .any(|e| &*e.name == "retention.ms" && e.value.as_deref() == Some("3600000")));
    let (status, t) = get(&http, &format!("{}/v1/topics/orders", node.url)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            t["partition_count"].clone(),
            t["retention_ms"].clone(),
            t["max_event_bytes"].clone()
        ),
        (json!(3), json!(3_600_000), json!(2048))
    );

    // Every refusal with Kafka's code; one bad topic does not stop the others.
    let mut bad_factor = topic("replicated", 1, &[]);
    bad_factor.replication_factor = 3;
    let r = create(
        &mut c,
        vec![
            topic("orders", 1, &[]),
            bad_factor,
            topic("compacted", 1, &[("cleanup.policy", "compact,shred")]),
            topic("odd", 1, &[("no.such.config", "1")]),
            topic("bad name", 1, &[]),
            topic("empty", 0, &[]),
            topic("fine", 2, &[]),
        ],
        false,
    )
    .await;
    let codes: Vec<i16> = r.topics.iter().map(|t| t.error_code).collect();
    assert_eq!(
        codes,
        vec![
            ResponseError::TopicAlreadyExists.code(),
            ResponseError::InvalidReplicationFactor.code(),
            ResponseError::InvalidConfig.code(),
            ResponseError::InvalidConfig.code(),
            ResponseError::InvalidTopicException.code(),
            ResponseError::InvalidPartitions.code(),
            0,
        ]
    );
    assert!(r.topics.iter().take(6).all(|t| t.error_message.is_some()));
    // validate_only checks and creates nothing.
    let r = create(&mut c, vec![topic("dry", 2, &[])], true).await;
    assert_eq!(r.topics[0].error_code, 0);
    assert_eq!(
        partitions_in_metadata(&mut c, "dry").await,
        Err(ResponseError::UnknownTopicOrPartition.code())
    );

    // Describe: all, or the keys asked for; where a value comes from.
    let d = describe(&mut c, 2, "orders", None).await;
    assert_eq!(d.results[0].error_code, 0);
    assert_eq!(config_value(&d, "retention.ms"), ("3600000".into(), 1));
    assert_eq!(config_value(&d, "retention.bytes"), ("-1".into(), 5));
    assert_eq!(config_value(&d, "cleanup.policy").0, "delete");
    let d = describe(&mut c, 2, "orders", Some(&["retention.bytes"])).await;
    assert_eq!(d.results[0].configs.len(), 1);
    let d = describe(&mut c, 2, "nope", None).await;
    assert_eq!(
        d.results[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    assert_eq!(
        describe(&mut c, 4, "1", None).await.results[0].error_code,
        0
    );

    // Incremental: set one, reset another; AlterConfigs: the whole set.
    assert_eq!(
        incremental_alter(
            &mut c,
            "orders",
            &[
                ("retention.bytes", 0, Some("1048576")),
                ("max.message.bytes", 1, None)
            ],
        )
        .await,
        0
    );
    let (_, t) = get(&http, &format!("{}/v1/topics/orders", node.url)).await;
    assert_eq!(
        (
            t["retention_bytes"].clone(),
            t["max_event_bytes"].clone(),
            t["retention_ms"].clone()
        ),
        (json!(1_048_576), json!(1_048_576), json!(3_600_000))
    );
    assert_eq!(
        incremental_alter(
            &mut c,
            "orders",
            &[("min.cleanable.dirty.ratio", 0, Some("2"))]
        )
        .await,
        ResponseError::InvalidConfig.code()
    );
    assert_eq!(
        incremental_alter(&mut c, "orders", &[("retention.ms", 0, Some("soon"))]).await,
        ResponseError::InvalidConfig.code()
    );
    assert_eq!(
        alter(&mut c, "orders", &[("retention.ms", "60000")]).await,
        0
    );
    let (_, t) = get(&http, &format!("{}/v1/topics/orders", node.url)).await;
    assert_eq!(
        (t["retention_ms"].clone(), t["retention_bytes"].clone()),
        (json!(60_000), json!(null)),
        "AlterConfigs resets what it does not name"
    );
    assert_eq!(
        alter(&mut c, "nope", &[]).await,
        ResponseError::UnknownTopicOrPartition.code()
    );

    // More partitions, never fewer; the new ones take records.
    assert_eq!(grow(&mut c, "orders", 5).await, 0);
    assert_eq!(partitions_in_metadata(&mut c, "orders").await, Ok(5));
    assert_eq!(
        grow(&mut c, "orders", 2).await,
        ResponseError::InvalidPartitions.code()
    );
    assert_eq!(
        grow(&mut c, "orders", 5).await,
        ResponseError::InvalidPartitions.code()
    );
    let (status, _) = common::post(
        &http,
        &format!("{}/v1/topics/orders/records", node.url),
        &json!({"records": [{"value": "in four", "partition": 4}]}),
    )
    .await;
    assert_eq!(status, 200);

    // Deleted: with its records and the groups' positions in it.
    let (status, _) = common::post(
        &http,
        &format!("{}/v1/groups/g/offsets", node.url),
        &json!({"offsets": [{"topic": "orders", "partition": 4, "offset": 1}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(delete(&mut c, "orders").await, 0);
    assert_eq!(
        partitions_in_metadata(&mut c, "orders").await,
        Err(ResponseError::UnknownTopicOrPartition.code())
    );
    assert_eq!(
        get(&http, &format!("{}/v1/topics/orders", node.url))
            .await
            .0,
        404
    );
    let (_, offsets) = get(&http, &format!("{}/v1/groups/g/offsets", node.url)).await;
    assert_eq!(offsets["offsets"], json!([]), "{offsets}");
    assert_eq!(
        delete(&mut c, "orders").await,
        ResponseError::UnknownTopicOrPartition.code()
    );
    // By an id no topic has (v6).
    let req = DeleteTopicsRequest::default()
        .with_topics(vec![DeleteTopicState::default()])
        .with_timeout_ms(5000);
    let mut b = c.call(ApiKey::DeleteTopics, 6, &req).await;
    assert_eq!(
        DeleteTopicsResponse::decode(&mut b, 6)
            .expect("delete")
            .responses[0]
            .error_code,
        ResponseError::UnknownTopicId.code()
    );
    // The name again: a new, empty topic, whose offsets go on where the
    // deleted one's ended.
    let r = create(&mut c, vec![topic("orders", 5, &[])], false).await;
    assert_eq!(r.topics[0].error_code, 0);
    let (_, t) = get(&http, &format!("{}/v1/topics/orders", node.url)).await;
    assert_eq!(t["partitions"][4]["start_offset"], json!(1), "{t}");
    assert_eq!(t["partitions"][4]["end_offset"], json!(1), "{t}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_device_auth_deleting_and_changing_topics_take_the_admin() {
    const ADMIN: &str = "kafka-admin-token-0123456789";
    let node = InProcessNode::start(&format!(
        "[auth]\nmode = \"devices\"\nadmin_token = \"{ADMIN}\"\n"
    ))
    .await;
    let http = reqwest::Client::new();
    let token = common::add_device(&node.url, ADMIN, "pump-7", &["plant/#"], &["plant/#"]).await;
    let mut c = Client::connect(&node).await;
    assert_eq!(sasl_plain(&mut c, "pump-7", &token).await.error_code, 0);

    // Creating takes publish: `plant` yes, `office` no.
    let r = create(
        &mut c,
        vec![topic("plant", 1, &[]), topic("office", 1, &[])],
        false,
    )
    .await;
    assert_eq!(r.topics[0].error_code, 0);
    assert_eq!(
        r.topics[1].error_code,
        ResponseError::TopicAuthorizationFailed.code()
    );
    // Deleting, growing and changing take the admin.
    let refused = ResponseError::TopicAuthorizationFailed.code();
    assert_eq!(delete(&mut c, "plant").await, refused);
    assert_eq!(grow(&mut c, "plant", 2).await, refused);
    assert_eq!(
        alter(&mut c, "plant", &[("retention.ms", "1000")]).await,
        refused
    );
    assert_eq!(
        incremental_alter(&mut c, "plant", &[("retention.ms", 0, Some("1000"))]).await,
        refused
    );
    assert_eq!(partitions_in_metadata(&mut c, "plant").await, Ok(1));
    // Over HTTP: the device's token is refused, the admin's works.
    let url = format!("{}/v1/topics/plant", node.url);
    let r = http
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 403);
    let r = http
        .patch(&url)
        .bearer_auth(&token)
        .json(&json!({"partitions": 2}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 403);
    let r = http
        .patch(&url)
        .bearer_auth(ADMIN)
        .json(&json!({"partitions": 2}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    assert_eq!(partitions_in_metadata(&mut c, "plant").await, Ok(2));
    let r = http
        .delete(&url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(
        partitions_in_metadata(&mut c, "plant").await,
        Err(ResponseError::UnknownTopicOrPartition.code())
    );
    // Over Kafka: SASL as `admin` with the admin token may; a wrong admin
    // token is a failed login.
    let mut admin = Client::connect(&node).await;
    assert_eq!(sasl_plain(&mut admin, "admin", ADMIN).await.error_code, 0);
    let r = create(&mut admin, vec![topic("office", 1, &[])], false).await;
    assert_eq!(r.topics[0].error_code, 0, "the admin may publish anywhere");
    assert_eq!(grow(&mut admin, "office", 3).await, 0);
    assert_eq!(
        alter(&mut admin, "office", &[("retention.ms", "1000")]).await,
        0
    );
    assert_eq!(delete(&mut admin, "office").await, 0);
    let mut wrong = Client::connect(&node).await;
    assert_eq!(
        sasl_plain(&mut wrong, "admin", "not-the-admin-token")
            .await
            .error_code,
        ResponseError::SaslAuthenticationFailed.code()
    );
    assert!(wrong.closed().await);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_device_auth_offset_delete_and_describe_producers_take_reading_rights() {
    use kafka_protocol::messages::offset_delete_request::{
        OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
    };
    use kafka_protocol::messages::{
        describe_producers_request::TopicRequest, DescribeProducersRequest,
        DescribeProducersResponse, GroupId, OffsetDeleteRequest, OffsetDeleteResponse,
    };
    const ADMIN: &str = "kafka-admin-token-0123456789";
    let node = InProcessNode::start(&format!(
        "[auth]\nmode = \"devices\"\nadmin_token = \"{ADMIN}\"\n"
    ))
    .await;
    let http = reqwest::Client::new();
    for (t, events) in [("plant", "a"), ("office", "b")] {
        let r = http
            .post(format!("{}/v1/topics/{t}/records", node.url))
            .bearer_auth(ADMIN)
            .json(&json!({"records": [{"value": events}]}))
            .send()
            .await
            .expect("publish");
        assert!(r.status().is_success(), "{}", r.status());
    }
    let r = http
        .post(format!("{}/v1/groups/mine/offsets", node.url))
        .bearer_auth(ADMIN)
        .json(
            &json!({"offsets": [{"topic": "plant", "partition": 0, "offset": 1},
                                  {"topic": "office", "partition": 0, "offset": 1}]}),
        )
        .send()
        .await
        .expect("commit");
    assert!(r.status().is_success(), "{}", r.status());
    let token = common::add_device(
        &node.url,
        ADMIN,
        "pump-7",
        &["plant/#"],
        &["plant/#", "$groups/mine"],
    )
    .await;
    let mut c = Client::connect(&node).await;
    assert_eq!(sasl_plain(&mut c, "pump-7", &token).await.error_code, 0);

    let offset_delete = |group: &str, topics: &[(&str, &[i32])]| {
        OffsetDeleteRequest::default()
            .with_group_id(GroupId(st(group)))
            .with_topics(
                topics
                    .iter()
                    .map(|(t, ps)| {
                        OffsetDeleteRequestTopic::default()
                            .with_name(name(t))
                            .with_partitions(
                                ps.iter()
                                    .map(|p| {
                                        OffsetDeleteRequestPartition::default()
                                            .with_partition_index(*p)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            )
    };
    let mut b = c
        .call(
            ApiKey::OffsetDelete,
            0,
            &offset_delete("theirs", &[("plant", &[0])]),
        )
        .await;
    let r = OffsetDeleteResponse::decode(&mut b, 0).expect("offset delete");
    assert_eq!(r.error_code, ResponseError::GroupAuthorizationFailed.code());
    assert!(r.topics.is_empty());

    let mut b = c
        .call(
            ApiKey::OffsetDelete,
            0,
            &offset_delete("mine", &[("office", &[0]), ("plant", &[0, 9])]),
        )
        .await;
    let r = OffsetDeleteResponse::decode(&mut b, 0).expect("offset delete");
    assert_eq!(r.error_code, 0);
    let codes: Vec<(String, i32, i16)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.name.0.to_string(), p.partition_index, p.error_code))
        })
        .collect();
    assert_eq!(
        codes,
        [
            (
                "office".to_owned(),
                0,
                ResponseError::TopicAuthorizationFailed.code()
            ),
            (
                "plant".to_owned(),
                9,
                ResponseError::UnknownTopicOrPartition.code()
            ),
            ("plant".to_owned(), 0, 0),
        ]
    );
    let left = node
        .running
        .as_ref()
        .expect("running")
        .log
        .group_offsets("mine")
        .expect("offsets");
    assert_eq!(left.len(), 1, "office's position stays: {left:?}");
    assert_eq!(left[0].topic, "office");

    let describe = DescribeProducersRequest::default().with_topics(vec![
        TopicRequest::default()
            .with_name(name("plant"))
            .with_partition_indexes(vec![0, 9]),
        TopicRequest::default()
            .with_name(name("office"))
            .with_partition_indexes(vec![0]),
    ]);
    let mut b = c.call(ApiKey::DescribeProducers, 0, &describe).await;
    let r = DescribeProducersResponse::decode(&mut b, 0).expect("describe producers");
    let codes: Vec<(i32, i16)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (p.partition_index, p.error_code))
        })
        .collect();
    assert_eq!(
        codes,
        [
            (0, 0),
            (9, ResponseError::UnknownTopicOrPartition.code()),
            (0, ResponseError::TopicAuthorizationFailed.code()),
        ]
    );
    assert!(
        r.topics[0].partitions[0].active_producers.is_empty(),
        "HTTP appends have no producer state"
    );
    node.stop().await;
}

async fn metadata_by_id(c: &mut Client, id: uuid::Uuid) -> MetadataResponse {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default()
            .with_name(None)
            .with_topic_id(id)]))
        .with_allow_auto_topic_creation(false);
    let mut b = c.call(ApiKey::Metadata, 12, &req).await;
    MetadataResponse::decode(&mut b, 12).expect("metadata")
}

/// Topics have ids, as Kafka's: a random UUID given at creation, kept
/// across a restart, new for a topic created again under the same name;
/// Metadata and DeleteTopics take a topic by id. A config given explicitly
/// at the default's value is described as the topic's own, and
/// `cleanup.policy` keeps its order through an APPEND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_have_ids_and_configs_given_explicitly_are_the_topics_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcessNode::start_in(dir.path(), tributary_gateway::config::Mode::Edge, "").await;
    let mut c = Client::connect(&node).await;
    let r = create(
        &mut c,
        vec![
            topic("a", 1, &[("cleanup.policy", "delete")]),
            topic("b", 2, &[]),
        ],
        false,
    )
    .await;
    let (a, b) = (r.topics[0].topic_id, r.topics[1].topic_id);
    assert!(!a.is_nil() && !b.is_nil() && a != b, "{a} {b}");
    assert_eq!(a.get_version_num(), 4, "{a}");
    // Given explicitly at the default's value: the topic's own (source 1);
    // left out: the default (source 5).
    let d = describe(&mut c, 2, "a", Some(&["cleanup.policy"])).await;
    assert_eq!(config_value(&d, "cleanup.policy"), ("delete".into(), 1));
    let d = describe(&mut c, 2, "b", Some(&["cleanup.policy"])).await;
    assert_eq!(config_value(&d, "cleanup.policy"), ("delete".into(), 5));
    // APPEND adds at the end; DELETE of another key leaves it explicit.
    assert_eq!(
        incremental_alter(&mut c, "b", &[("cleanup.policy", 2, Some("compact"))]).await,
        0
    );
    assert_eq!(
        incremental_alter(&mut c, "a", &[("retention.ms", 1, None)]).await,
        0
    );
    let d = describe(&mut c, 2, "b", Some(&["cleanup.policy"])).await;
    assert_eq!(
        config_value(&d, "cleanup.policy"),
        ("delete,compact".into(), 1)
    );
    let d = describe(&mut c, 2, "a", Some(&["cleanup.policy", "retention.ms"])).await;
    assert_eq!(config_value(&d, "cleanup.policy"), ("delete".into(), 1));
    assert_eq!(config_value(&d, "retention.ms").1, 5);
    // DELETE of the key itself: the default again.
    assert_eq!(
        incremental_alter(&mut c, "a", &[("cleanup.policy", 1, None)]).await,
        0
    );
    let d = describe(&mut c, 2, "a", Some(&["cleanup.policy"])).await;
    assert_eq!(config_value(&d, "cleanup.policy"), ("delete".into(), 5));
    drop(c);
    node.stop().await;

    // After a restart: the same ids, the same configs.
    let node = InProcessNode::start_in(dir.path(), tributary_gateway::config::Mode::Edge, "").await;
    let mut c = Client::connect(&node).await;
    let m = metadata_by_id(&mut c, a).await;
    assert_eq!(m.topics.len(), 1);
    assert_eq!((m.topics[0].error_code, m.topics[0].topic_id), (0, a));
    assert_eq!(
        m.topics[0].name.as_ref().map(|n| n.0.to_string()),
        Some("a".into())
    );
    let d = describe(&mut c, 2, "b", Some(&["cleanup.policy"])).await;
    assert_eq!(
        config_value(&d, "cleanup.policy"),
        ("delete,compact".into(), 1)
    );
    // Deleted by id; the id is then unknown, and the name, created again,
    // has a new one.
    let req = DeleteTopicsRequest::default()
        .with_topics(vec![DeleteTopicState::default().with_topic_id(a)])
        .with_timeout_ms(5000);
    let mut bytes = c.call(ApiKey::DeleteTopics, 6, &req).await;
    let deleted = DeleteTopicsResponse::decode(&mut bytes, 6).expect("delete");
    assert_eq!(deleted.responses[0].error_code, 0, "{deleted:?}");
    assert_eq!(
        deleted.responses[0].name.as_ref().map(|n| n.0.to_string()),
        Some("a".into())
    );
    let m = metadata_by_id(&mut c, a).await;
    assert_eq!(
        (m.topics[0].error_code, m.topics[0].topic_id),
        (ResponseError::UnknownTopicId.code(), a)
    );
    assert_eq!(partitions_in_metadata(&mut c, "b").await, Ok(2));
    let r = create(&mut c, vec![topic("a", 1, &[])], false).await;
    assert_eq!(r.topics[0].error_code, 0);
    let again = r.topics[0].topic_id;
    assert!(!again.is_nil() && again != a, "{again}");
    let m = metadata_by_id(&mut c, b).await;
    assert_eq!((m.topics[0].error_code, m.topics[0].topic_id), (0, b));
    node.stop().await;
}
