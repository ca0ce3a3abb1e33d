//! The Kafka front end, driven by a raw client built on the protocol crate
//! (the installed tier drives it with librdkafka, kafka-python and kcat):
//! version negotiation, metadata with topic creation, produce with every
//! codec and a fetch that returns the records byte for byte, records crossing
//! to HTTP, long-poll fetch, list offsets, and bad input that closes only the
//! connection that sent it.

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::kafka::{name, sasl_plain, Client};
use common::InProcessNode;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, DeleteGroupsRequest, DeleteGroupsResponse,
    DescribeGroupsRequest, DescribeGroupsResponse, FetchRequest, FetchResponse,
    FindCoordinatorRequest, FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse,
    InitProducerIdRequest, InitProducerIdResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    ProduceRequest, ProduceResponse, ProducerId, SyncGroupRequest, SyncGroupResponse,
    TransactionalId,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use kafka_protocol::ResponseError;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tributary_frontend::listener::LimitedListener;
use tributary_frontend::FrontendContext;
use tributary_kafka::KafkaConfig;
use tributary_storage::log::LogConfig;
use tributary_storage::store::MemStore;
use tributary_storage::Log;

async fn metadata(c: &mut Client, topic: &str) -> MetadataResponse {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(name(topic)))
        ]))
        .with_allow_auto_topic_creation(true);
    let mut b = c.call(ApiKey::Metadata, 12, &req).await;
    MetadataResponse::decode(&mut b, 12).expect("metadata")
}

fn record(i: i64, key: &str, value: &[u8], headers: &[(&str, &[u8])]) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i,
        sequence: i as i32,
        timestamp: 1_700_000_000_000 + i,
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        value: Some(Bytes::copy_from_slice(value)),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    StrBytes::from_string((*k).to_owned()),
                    Some(Bytes::copy_from_slice(v)),
                )
            })
            .collect(),
    }
}

/// A v2 batch of `records` compressed with `c`, by codecs other than ours.
fn batch(records: &[Record], c: Compression) -> Bytes {
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: c,
    };
    RecordBatchEncoder::encode_with_custom_compression(
        &mut buf,
        records,
        &options,
        Some(|src: &mut BytesMut, dst: &mut BytesMut, c: Compression| {
            let out: Vec<u8> = match c {
                Compression::None => src.to_vec(),
                Compression::Gzip => {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(src).expect("gzip");
                    e.finish().expect("gzip")
                }
                Compression::Snappy => snap::raw::Encoder::new().compress_vec(src).expect("snappy"),
                Compression::Lz4 => {
                    let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                    e.write_all(src).expect("lz4");
                    e.finish().expect("lz4")
                }
                Compression::Zstd => zstd::stream::encode_all(&src[..], 3).expect("zstd"),
            };
            dst.put_slice(&out);
            Ok(())
        }),
    )
    .expect("encode batch");
    buf.freeze()
}

async fn produce(c: &mut Client, topic: &str, partition: i32, records: Bytes, acks: i16) -> i64 {
    let req = ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(records))])]);
    let mut b = c.call(ApiKey::Produce, 9, &req).await;
    let answer = ProduceResponse::decode(&mut b, 9).expect("produce answer");
    let p = &answer.responses[0].partition_responses[0];
    assert_eq!(p.error_code, 0, "produce refused");
    p.base_offset
}

async fn fetch(
    c: &mut Client,
    topic: &str,
    partition: i32,
    offset: i64,
    wait_ms: i32,
) -> (i16, Vec<Record>, i64) {
    let req = FetchRequest::default()
        .with_max_wait_ms(wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(1 << 20)])]);
    let mut b = c.call(ApiKey::Fetch, 12, &req).await;
    let answer = FetchResponse::decode(&mut b, 12).expect("fetch answer");
    let p = &answer.responses[0].partitions[0];
    let mut records = Vec::new();
    let mut bytes = p.records.clone().unwrap_or_default();
    while bytes.has_remaining() {
        records.extend(
            RecordBatchDecoder::decode(&mut bytes)
                .expect("batch")
                .records,
        );
    }
    (p.error_code, records, p.high_watermark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_versions_names_what_is_served_and_answers_newer_versions_at_v0() {
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    let mut b = c
        .call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
        .await;
    let v = ApiVersionsResponse::decode(&mut b, 3).expect("api versions");
    assert_eq!(v.error_code, 0);
    let range = |k: ApiKey| {
        v.api_keys
            .iter()
            .find(|a| a.api_key == k as i16)
            .map(|a| (a.min_version, a.max_version))
    };
    assert_eq!(range(ApiKey::Produce), Some((0, 12)));
    assert_eq!(range(ApiKey::Fetch), Some((4, 12)));
    assert_eq!(range(ApiKey::Metadata), Some((0, 12)));
    assert_eq!(range(ApiKey::JoinGroup), Some((0, 9)));
    assert_eq!(range(ApiKey::OffsetCommit), Some((2, 9)));
    assert_eq!(range(ApiKey::InitProducerId), Some((0, 5)));
    // Transactions, protocol V1: what librdkafka and the Java client use.
    assert_eq!(range(ApiKey::AddPartitionsToTxn), Some((0, 3)));
    assert_eq!(range(ApiKey::EndTxn), Some((0, 4)));
    assert_eq!(range(ApiKey::TxnOffsetCommit), Some((0, 4)));
    assert_eq!(range(ApiKey::ListTransactions), Some((0, 2)));
    assert_eq!(range(ApiKey::DescribeProducers), Some((0, 0)));
    assert_eq!(range(ApiKey::OffsetDelete), Some((0, 0)));
    assert_eq!(range(ApiKey::AlterReplicaLogDirs), None);

    // A version newer than ours: our ranges at v0 with UNSUPPORTED_VERSION.
    c.send_as(ApiKey::ApiVersions, 9, 3, &ApiVersionsRequest::default())
        .await;
    let mut b = c.answer(ApiKey::ApiVersions, 0).await.expect("answer");
    let v = ApiVersionsResponse::decode(&mut b, 0).expect("v0 answer");
    assert_eq!(v.error_code, 35);
    assert!(!v.api_keys.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_records_come_back_byte_for_byte_with_every_codec_and_over_http() {
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    let m = metadata(&mut c, "kt").await;
    assert_eq!(m.topics[0].error_code, 0, "created on first use");
    assert!(!m.topics[0].partitions.is_empty());
    assert_eq!(m.brokers[0].port, i32::from(node.kafka.port()));

    let mut sent = Vec::new();
    let mut next = 0i64;
    for c_ in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let records: Vec<Record> = (0..3)
            .map(|i| {
                let n = next + i;
                record(
                    n,
                    &format!("k{n}"),
                    format!("{c_:?}-{n}").as_bytes(),
                    // A name given twice keeps both values, in order.
                    &[
                        ("h", &[0, 1, 2, 255][..]),
                        ("content-type", b"text/plain"),
                        ("h", b"again"),
                    ],
                )
            })
            .collect();
        let base = produce(&mut c, "kt", 0, batch(&records, c_), -1).await;
        assert_eq!(base, next, "{c_:?}: dense offsets");
        next += 3;
        sent.extend(records);
    }
    let (code, got, high) = fetch(&mut c, "kt", 0, 0, 0).await;
    assert_eq!((code, high), (0, next));
    assert_eq!(got.len(), sent.len());
    for (g, s) in got.iter().zip(&sent) {
        assert_eq!(g.offset, s.offset);
        assert_eq!(g.key, s.key);
        assert_eq!(g.value, s.value);
        assert_eq!(g.timestamp, s.timestamp);
        assert_eq!(g.headers, s.headers);
    }
    // The same records over HTTP: produced once, readable by every protocol,
    // the repeated header too.
    let (_, page) = common::get(
        &common::client(),
        &format!(
            "{}/v1/topics/kt/partitions/0/records?offset=0&limit=1",
            node.url
        ),
    )
    .await;
    let names: Vec<&str> = page["records"][0]["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter_map(|h| h["key"].as_str())
        .collect();
    assert_eq!(names, ["h", "content-type", "h"], "{page}");
    let values = common::stored_values(&node.url, "kt").await;
    assert_eq!(values.len(), sent.len());
    assert_eq!(values.get(&b"Zstd-14"[..]), Some(&1));
    node.stop().await;
}

/// A null value (a tombstone) is not an empty one: it stays null from a
/// Kafka producer to a Kafka consumer and to HTTP (`"value": null`), and
/// from HTTP to Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_value_stays_null_across_kafka_and_http() {
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    metadata(&mut c, "states").await;
    let mut gone = record(0, "pump-1", b"", &[]);
    gone.value = None;
    let empty = record(1, "pump-2", b"", &[]);
    produce(
        &mut c,
        "states",
        0,
        batch(&[gone, empty], Compression::None),
        -1,
    )
    .await;
    let (s, b) = common::post(
        &common::client(),
        &format!("{}/v1/topics/states/records", node.url),
        &serde_json::json!({"records": [
            {"key": "pump-3", "value": null, "partition": 0},
            {"key": "pump-4", "partition": 0},
        ]}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (code, got, _) = fetch(&mut c, "states", 0, 0, 0).await;
    assert_eq!(code, 0);
    let values: Vec<Option<Bytes>> = got.iter().map(|r| r.value.clone()).collect();
    assert_eq!(
        values,
        [None, Some(Bytes::new()), None, Some(Bytes::new())],
        "null, empty, null over HTTP, absent over HTTP (empty)"
    );
    let (_, page) = common::get(
        &common::client(),
        &format!(
            "{}/v1/topics/states/partitions/0/records?offset=0",
            node.url
        ),
    )
    .await;
    let over_http: Vec<&serde_json::Value> = page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| &r["value"])
        .collect();
    assert_eq!(over_http[0], &serde_json::Value::Null, "{page}");
    assert_eq!(over_http[2], &serde_json::Value::Null, "{page}");
    assert_ne!(over_http[1], &serde_json::Value::Null, "{page}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_at_the_end_waits_for_the_next_record_and_list_offsets_answers() {
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    metadata(&mut c, "lp").await;
    produce(
        &mut c,
        "lp",
        0,
        batch(&[record(0, "a", b"first", &[])], Compression::None),
        1,
    )
    .await;

    let mut waiter = Client::connect(&node).await;
    let started = Instant::now();
    let wait = tokio::spawn(async move {
        let got = fetch(&mut waiter, "lp", 0, 1, 5000).await;
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce(
        &mut c,
        "lp",
        0,
        batch(&[record(1, "b", b"second", &[])], Compression::None),
        1,
    )
    .await;
    let ((code, got, _), took) = wait.await.expect("fetch task");
    assert_eq!(code, 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value.as_deref(), Some(&b"second"[..]));
    assert!(
        took < Duration::from_secs(5),
        "answered when the record came, not at max_wait"
    );

    let list = |ts: i64| {
        ListOffsetsRequest::default().with_topics(vec![ListOffsetsTopic::default()
            .with_name(name("lp"))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_timestamp(ts)])])
    };
    for (ts, want) in [
        (-2, 0),
        (-1, 2),
        (1_700_000_000_001, 1),
        (1_700_000_000_000, 0),
    ] {
        let mut b = c.call(ApiKey::ListOffsets, 7, &list(ts)).await;
        let a = ListOffsetsResponse::decode(&mut b, 7).expect("list offsets");
        let p = &a.topics[0].partitions[0];
        assert_eq!((p.error_code, p.offset), (0, want), "timestamp {ts}");
    }
    // Past the end: the offset is out of range, with the range to go back to.
    let (code, _, high) = fetch(&mut c, "lp", 0, 99, 0).await;
    assert_eq!((code, high), (1, 2));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_its_connection_and_is_counted() {
    let node = InProcessNode::start("[kafka]\nmax_request_bytes = 65536\n").await;
    // A size prefix over the limit: closed before the body is read.
    let mut c = Client::connect(&node).await;
    c.s.write_all(&(1i32 << 24).to_be_bytes())
        .await
        .expect("write");
    assert!(
        c.closed().await,
        "an oversized request closes the connection"
    );
    // An API key Kafka does not define.
    let mut c = Client::connect(&node).await;
    let mut frame = BytesMut::new();
    frame.put_i32(10);
    frame.put_i16(999);
    frame.put_i16(0);
    frame.put_i32(7);
    frame.put_i16(-1);
    c.s.write_all(&frame).await.expect("write");
    assert!(c.closed().await, "an unknown API key closes the connection");
    // A produce whose batch is not a record batch: refused with CORRUPT_MESSAGE.
    let mut c = Client::connect(&node).await;
    metadata(&mut c, "bad").await;
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name("bad"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(Bytes::from_static(&[0u8; 80])))])]);
    let mut b = c.call(ApiKey::Produce, 9, &req).await;
    let a = ProduceResponse::decode(&mut b, 9).expect("answer");
    assert_eq!(a.responses[0].partition_responses[0].error_code, 2);
    // Random frames on many connections: every one is closed or answered,
    // and the node keeps serving.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let addr = node.kafka;
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(i);
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let len = rng.usize(0..2048);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if i % 2 == 0 && junk.len() >= 4 {
                junk[..4].copy_from_slice(&((len as i32) - 4).to_be_bytes());
            }
            let _ = s.write_all(&junk).await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut sink)).await;
        }));
    }
    for t in tasks {
        t.await.expect("junk task");
    }
    let mut c = Client::connect(&node).await;
    let m = metadata(&mut c, "bad").await;
    assert_eq!(m.topics[0].error_code, 0, "the node still serves");
    let text = common::metrics_text(&node.url, None).await;
    for reason in ["request_too_large", "unknown_api_key", "corrupt_batch"] {
        assert!(
            text.contains(&format!(
                "tributary_kafka_rejections_total{{reason=\"{reason}\"}}"
            )),
            "{reason} counted"
        );
    }
    node.stop().await;
}

/// A log over a MemStore whose syncs the test holds, with a Kafka listener.
async fn held_node() -> (MemStore, Log, std::net::SocketAddr, CancellationToken) {
    let store = MemStore::new();
    let log = Log::with_store(Arc::new(store.clone()), LogConfig::default()).expect("log");
    let shutdown = CancellationToken::new();
    let cx = FrontendContext::new(log.clone(), shutdown.clone(), "edge");
    let server = tributary_kafka::Server::new(cx, KafkaConfig::default());
    let l = LimitedListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        64,
    );
    let addr = l.local_addr().expect("addr");
    tokio::spawn(tributary_frontend::serve(server, l, None));
    (store, log, addr, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_is_answered_only_once_durable_and_pipelined_answers_keep_their_order() {
    let (store, log, addr, shutdown) = held_node().await;
    let mut c = Client::at(addr).await;
    // The topic exists (and is durable) before the sync is held.
    metadata(&mut c, "d").await;
    produce(
        &mut c,
        "d",
        0,
        batch(&[record(0, "k", b"warm-up", &[])], Compression::None),
        -1,
    )
    .await;

    store.hold_sync();
    let first = c.answered;
    for i in 0..5i64 {
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(5000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(name("d"))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch(
                        &[record(i, "k", format!("m{i}").as_bytes(), &[])],
                        Compression::Lz4,
                    )))])]);
        c.send(ApiKey::Produce, 9, &req).await;
    }
    let mut size = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_millis(500), c.s.read_exact(&mut size)).await;
    assert!(early.is_err(), "an answer came before the log was durable");
    store.release_sync();
    let mut bases = Vec::new();
    for _ in 0..5 {
        let mut b = c.answer(ApiKey::Produce, 9).await.expect("answer");
        let a = ProduceResponse::decode(&mut b, 9).expect("produce answer");
        let p = &a.responses[0].partition_responses[0];
        assert_eq!(p.error_code, 0);
        bases.push(p.base_offset);
    }
    assert_eq!(c.answered, first + 5, "every request answered, in order");
    assert_eq!(bases, [1, 2, 3, 4, 5]);
    assert_eq!(log.offsets("d", 0).expect("offsets"), (0, 6));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_device_auth_sasl_plain_logs_in_and_the_devices_acls_apply() {
    const ADMIN: &str = "kafka-admin-token-0123456789";
    let node = InProcessNode::start(&format!(
        "[auth]\nmode = \"devices\"\nadmin_token = \"{ADMIN}\"\n"
    ))
    .await;
    let token = common::add_device(
        &node.url,
        ADMIN,
        "pump-7",
        &["plant/#"],
        &["plant/#", "$groups/pumps"],
    )
    .await;

    // Without a login: ApiVersions is answered, anything else closes.
    let mut c = Client::connect(&node).await;
    c.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
        .await;
    c.send(ApiKey::Metadata, 12, &MetadataRequest::default())
        .await;
    assert!(c.answer(ApiKey::Metadata, 12).await.is_none(), "closed");

    // A wrong token: SASL_AUTHENTICATION_FAILED, then closed.
    let mut c = Client::connect(&node).await;
    let r = sasl_plain(&mut c, "pump-7", "not-the-token").await;
    assert_eq!(r.error_code, ResponseError::SaslAuthenticationFailed.code());
    assert!(c.closed().await);

    // The device's token: its ACLs apply to produce, groups and offsets.
    let mut c = Client::connect(&node).await;
    let r = sasl_plain(&mut c, "pump-7", &token).await;
    assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    let m = metadata(&mut c, "plant").await;
    assert_eq!(m.topics[0].error_code, 0);
    produce(
        &mut c,
        "plant",
        0,
        batch(&[record(0, "k", b"v", &[])], Compression::None),
        -1,
    )
    .await;
    let m = metadata(&mut c, "office").await;
    assert_eq!(
        m.topics[0].error_code,
        ResponseError::TopicAuthorizationFailed.code()
    );
    let find = |group: &str| {
        FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.to_owned()))
    };
    let mut b = c.call(ApiKey::FindCoordinator, 2, &find("pumps")).await;
    assert_eq!(
        FindCoordinatorResponse::decode(&mut b, 2)
            .expect("find")
            .error_code,
        0
    );
    let mut b = c.call(ApiKey::FindCoordinator, 2, &find("others")).await;
    assert_eq!(
        FindCoordinatorResponse::decode(&mut b, 2)
            .expect("find")
            .error_code,
        ResponseError::GroupAuthorizationFailed.code()
    );
    let text = common::metrics_text(&node.url, Some(ADMIN)).await;
    assert!(
        text.contains("tributary_kafka_rejections_total{reason=\"not_authorized\"} 2"),
        "{text}"
    );
    node.stop().await;
}

fn group(s: &str) -> kafka_protocol::messages::GroupId {
    kafka_protocol::messages::GroupId(StrBytes::from_string(s.to_owned()))
}

fn join_request(member: &str) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(group("g"))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_member_id(StrBytes::from_string(member.to_owned()))
        .with_protocol_type(StrBytes::from_static_str("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(StrBytes::from_static_str("range"))
            .with_metadata(Bytes::from_static(b"subscription"))])
}

async fn join_answer(c: &mut Client) -> JoinGroupResponse {
    let mut b = c.answer(ApiKey::JoinGroup, 5).await.expect("join answer");
    JoinGroupResponse::decode(&mut b, 5).expect("join")
}

async fn heartbeat(c: &mut Client, generation: i32, member: &str) -> i16 {
    let req = HeartbeatRequest::default()
        .with_group_id(group("g"))
        .with_generation_id(generation)
        .with_member_id(StrBytes::from_string(member.to_owned()));
    let mut b = c.call(ApiKey::Heartbeat, 4, &req).await;
    HeartbeatResponse::decode(&mut b, 4)
        .expect("heartbeat")
        .error_code
}

async fn commit(c: &mut Client, generation: i32, member: &str, offset: i64) -> i16 {
    let req = OffsetCommitRequest::default()
        .with_group_id(group("g"))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(StrBytes::from_string(member.to_owned()))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(name("gt"))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(offset)])]);
    let mut b = c.call(ApiKey::OffsetCommit, 8, &req).await;
    let r = OffsetCommitResponse::decode(&mut b, 8).expect("commit");
    r.topics[0].partitions[0].error_code
}

/// OffsetFetch v8 of group g's position in gt/0.
async fn position(
    c: &mut Client,
    require_stable: bool,
) -> kafka_protocol::messages::offset_fetch_response::OffsetFetchResponsePartitions {
    let req = OffsetFetchRequest::default()
        .with_require_stable(require_stable)
        .with_groups(vec![OffsetFetchRequestGroup::default()
            .with_group_id(group("g"))
            .with_topics(Some(vec![OffsetFetchRequestTopics::default()
                .with_name(name("gt"))
                .with_partition_indexes(vec![0])]))]);
    let mut b = c.call(ApiKey::OffsetFetch, 8, &req).await;
    let mut r = OffsetFetchResponse::decode(&mut b, 8).expect("offset fetch v8");
    r.groups
        .swap_remove(0)
        .topics
        .swap_remove(0)
        .partitions
        .swap_remove(0)
}

async fn committed(c: &mut Client) -> (i64, i64) {
    // v8+ asks per group; v5 is the older single-group form: both answer.
    let new = position(c, false).await.committed_offset;
    let req = OffsetFetchRequest::default()
        .with_group_id(group("g"))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(name("gt"))
            .with_partition_indexes(vec![0])]));
    let mut b = c.call(ApiKey::OffsetFetch, 5, &req).await;
    let r = OffsetFetchResponse::decode(&mut b, 5).expect("offset fetch v5");
    (new, r.topics[0].partitions[0].committed_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_join_sync_heartbeat_commit_and_leave_with_kafkas_error_codes() {
    let node = InProcessNode::start("[groups]\ninitial_rebalance_delay_ms = 200\n").await;
    let (mut a, mut b) = (Client::connect(&node).await, Client::connect(&node).await);
    metadata(&mut a, "gt").await;
    produce(
        &mut a,
        "gt",
        0,
        batch(&[record(0, "k", b"v", &[])], Compression::None),
        -1,
    )
    .await;

    // JoinGroup v4+: a new member is handed its id first (KIP-394).
    let mut ids = Vec::new();
    for c in [&mut a, &mut b] {
        c.send(ApiKey::JoinGroup, 5, &join_request("")).await;
        let r = join_answer(c).await;
        assert_eq!(r.error_code, ResponseError::MemberIdRequired.code());
        assert!(r.member_id.starts_with("tests-"), "{:?}", r.member_id);
        ids.push(r.member_id.to_string());
    }
    // Both rejoin with their ids; one generation forms with both.
    a.send(ApiKey::JoinGroup, 5, &join_request(&ids[0])).await;
    b.send(ApiKey::JoinGroup, 5, &join_request(&ids[1])).await;
    let (ja, jb) = (join_answer(&mut a).await, join_answer(&mut b).await);
    assert_eq!((ja.error_code, jb.error_code), (0, 0));
    assert_eq!((ja.generation_id, jb.generation_id), (1, 1));
    assert_eq!(ja.leader, jb.leader);
    assert_eq!(ja.protocol_name.as_deref(), Some("range"));
    let (leader, follower) = if ja.leader == ja.member_id {
        ((&mut a, &ja), (&mut b, &jb))
    } else {
        ((&mut b, &jb), (&mut a, &ja))
    };
    assert_eq!(leader.1.members.len(), 2, "the leader sees every member");
    assert!(follower.1.members.is_empty());
    assert_eq!(
        leader.1.members[0].metadata,
        Bytes::from_static(b"subscription")
    );

    // The leader's assignment reaches both.
    let assignments = vec![
        SyncGroupRequestAssignment::default()
            .with_member_id(leader.1.member_id.clone())
            .with_assignment(Bytes::from_static(b"for the leader")),
        SyncGroupRequestAssignment::default()
            .with_member_id(follower.1.member_id.clone())
            .with_assignment(Bytes::from_static(b"for the follower")),
    ];
    let sync = |member: &StrBytes, assignments| {
        SyncGroupRequest::default()
            .with_group_id(group("g"))
            .with_generation_id(1)
            .with_member_id(member.clone())
            .with_assignments(assignments)
    };
    follower
        .0
        .send(ApiKey::SyncGroup, 3, &sync(&follower.1.member_id, vec![]))
        .await;
    let mut l = leader
        .0
        .call(
            ApiKey::SyncGroup,
            3,
            &sync(&leader.1.member_id, assignments),
        )
        .await;
    let mut f = follower.0.answer(ApiKey::SyncGroup, 3).await.expect("sync");
    let (l, f) = (
        SyncGroupResponse::decode(&mut l, 3).expect("sync"),
        SyncGroupResponse::decode(&mut f, 3).expect("sync"),
    );
    assert_eq!(l.assignment, Bytes::from_static(b"for the leader"));
    assert_eq!(f.assignment, Bytes::from_static(b"for the follower"));

    let (lid, fid) = (
        leader.1.member_id.to_string(),
        follower.1.member_id.to_string(),
    );
    let (lc, fc) = (leader.0, follower.0);
    assert_eq!(heartbeat(lc, 1, &lid).await, 0);
    assert_eq!(
        heartbeat(lc, 2, &lid).await,
        ResponseError::IllegalGeneration.code()
    );
    assert_eq!(
        heartbeat(lc, 1, "stranger").await,
        ResponseError::UnknownMemberId.code()
    );
    // A member commits; a stale generation may not; past the end is refused.
    assert_eq!(commit(lc, 1, &lid, 1).await, 0);
    assert_eq!(
        commit(lc, 0, &lid, 0).await,
        ResponseError::IllegalGeneration.code()
    );
    assert_eq!(
        commit(lc, 1, &lid, 99).await,
        ResponseError::OffsetOutOfRange.code()
    );
    assert_eq!(committed(lc).await, (1, 1));

    // The node describes the group over Kafka and over HTTP alike.
    let req = DescribeGroupsRequest::default().with_groups(vec![group("g")]);
    let mut d = lc.call(ApiKey::DescribeGroups, 5, &req).await;
    let d = DescribeGroupsResponse::decode(&mut d, 5).expect("describe");
    assert_eq!(d.groups[0].group_state.as_str(), "Stable");
    assert_eq!(d.groups[0].protocol_data.as_str(), "range");
    assert_eq!(d.groups[0].members.len(), 2);
    assert!(d.groups[0]
        .members
        .iter()
        .all(|m| m.client_id.as_str() == "tests"));
    let http = reqwest::Client::new();
    let g: serde_json::Value = http
        .get(format!("{}/v1/groups/g", node.url))
        .send()
        .await
        .expect("describe")
        .json()
        .await
        .expect("json");
    assert_eq!(g["state"], "Stable", "{g}");
    assert_eq!(g["members"].as_array().map(Vec::len), Some(2), "{g}");
    assert_eq!(g["offsets"][0]["offset"], 1, "{g}");
    assert_eq!(g["offsets"][0]["lag"], 0, "{g}");
    let plain = http
        .post(format!("{}/v1/groups/g/offsets", node.url))
        .json(&serde_json::json!({"offsets": [{"topic": "gt", "partition": 0, "offset": 0}]}))
        .send()
        .await
        .expect("commit");
    assert_eq!(
        plain.status(),
        409,
        "a plain commit may not move members' positions"
    );
    let mut lg = lc
        .call(ApiKey::ListGroups, 4, &ListGroupsRequest::default())
        .await;
    let lg = ListGroupsResponse::decode(&mut lg, 4).expect("list");
    assert!(lg
        .groups
        .iter()
        .any(|x| x.group_id.as_str() == "g" && x.group_state.as_str() == "Stable"));

    // The follower leaves: the leader must rejoin and forms generation 2 alone.
    let leave = LeaveGroupRequest::default()
        .with_group_id(group("g"))
        .with_members(vec![
            MemberIdentity::default().with_member_id(StrBytes::from_string(fid.clone()))
        ]);
    let mut lv = fc.call(ApiKey::LeaveGroup, 3, &leave).await;
    let lv = LeaveGroupResponse::decode(&mut lv, 3).expect("leave");
    assert_eq!((lv.error_code, lv.members[0].error_code), (0, 0));
    assert_eq!(
        heartbeat(lc, 1, &lid).await,
        ResponseError::RebalanceInProgress.code()
    );
    lc.send(ApiKey::JoinGroup, 5, &join_request(&lid)).await;
    let j = join_answer(lc).await;
    assert_eq!((j.error_code, j.generation_id, j.members.len()), (0, 2, 1));

    // Only an empty group is deleted; its offsets go with it.
    let del = DeleteGroupsRequest::default().with_groups_names(vec![group("g")]);
    let mut r = lc.call(ApiKey::DeleteGroups, 2, &del).await;
    let r = DeleteGroupsResponse::decode(&mut r, 2).expect("delete");
    assert_eq!(r.results[0].error_code, ResponseError::NonEmptyGroup.code());
    let leave = LeaveGroupRequest::default()
        .with_group_id(group("g"))
        .with_member_id(StrBytes::from_string(lid));
    let mut lv = lc.call(ApiKey::LeaveGroup, 1, &leave).await;
    assert_eq!(
        LeaveGroupResponse::decode(&mut lv, 1)
            .expect("leave")
            .error_code,
        0
    );
    let mut r = lc.call(ApiKey::DeleteGroups, 2, &del).await;
    let r = DeleteGroupsResponse::decode(&mut r, 2).expect("delete");
    assert_eq!(r.results[0].error_code, 0);
    assert_eq!(committed(lc).await, (-1, -1));
    node.stop().await;
}

/// A batch from an idempotent producer: `n` records from `first`.
fn idempotent_batch(id: i64, epoch: i16, first: i32, n: i32) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut r = record(
                i64::from(i),
                "k",
                format!("{id}/{epoch}/{}", first + i).as_bytes(),
                &[],
            );
            r.producer_id = id;
            r.producer_epoch = epoch;
            r.sequence = first + i;
            r
        })
        .collect();
    batch(&records, Compression::None)
}

async fn produce_code(c: &mut Client, records: Bytes) -> (i16, i64) {
    produce_code_as(c, records, None).await
}

/// [`produce_code`] in the name of a transactional id.
async fn produce_code_as(
    c: &mut Client,
    records: Bytes,
    transactional_id: Option<&'static str>,
) -> (i16, i64) {
    let req = ProduceRequest::default()
        .with_transactional_id(
            transactional_id.map(|t| TransactionalId(StrBytes::from_static_str(t))),
        )
        .with_acks(-1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name("idem"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records))])]);
    let mut b = c.call(ApiKey::Produce, 9, &req).await;
    let r = ProduceResponse::decode(&mut b, 9).expect("produce");
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_s_retried_batch_is_stored_once_and_sequences_are_enforced() {
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    metadata(&mut c, "idem").await;
    let mut b = c
        .call(
            ApiKey::InitProducerId,
            4,
            &InitProducerIdRequest::default()
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        )
        .await;
    let init = InitProducerIdResponse::decode(&mut b, 4).expect("init");
    assert_eq!(init.error_code, 0);
    let (id, epoch) = (init.producer_id.0, init.producer_epoch);
    assert!(id >= 0);

    assert_eq!(
        produce_code(&mut c, idempotent_batch(id, epoch, 0, 3)).await,
        (0, 0)
    );
    assert_eq!(
        produce_code(&mut c, idempotent_batch(id, epoch, 3, 2)).await,
        (0, 3)
    );
    // The same batch again (its answer was lost): the first answer again.
    assert_eq!(
        produce_code(&mut c, idempotent_batch(id, epoch, 3, 2)).await,
        (0, 3)
    );
    let (code, records, end) = fetch(&mut c, "idem", 0, 0, 0).await;
    assert_eq!((code, records.len(), end), (0, 5, 5), "stored once");
    // A gap: OUT_OF_ORDER_SEQUENCE_NUMBER; a stranger: UNKNOWN_PRODUCER_ID.
    assert_eq!(
        produce_code(&mut c, idempotent_batch(id, epoch, 9, 1))
            .await
            .0,
        ResponseError::OutOfOrderSequenceNumber.code()
    );
    assert_eq!(
        produce_code(&mut c, idempotent_batch(id + 1000, 0, 7, 1))
            .await
            .0,
        ResponseError::UnknownProducerId.code()
    );
    // The producer bumps its epoch (KIP-360): sequences start again and the
    // old epoch is fenced.
    let mut b = c
        .call(
            ApiKey::InitProducerId,
            4,
            &InitProducerIdRequest::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(epoch),
        )
        .await;
    let bumped = InitProducerIdResponse::decode(&mut b, 4).expect("init");
    assert_eq!(
        (bumped.producer_id.0, bumped.producer_epoch),
        (id, epoch + 1)
    );
    assert_eq!(
        produce_code(&mut c, idempotent_batch(id, epoch + 1, 0, 1)).await,
        (0, 5)
    );
    assert_eq!(
        produce_code(&mut c, idempotent_batch(id, epoch, 5, 1))
            .await
            .0,
        ResponseError::InvalidProducerEpoch.code()
    );
    // A transactional id: a timeout outside 1..=900000 ms is refused, a
    // good one gets an id at epoch 0, and asking again bumps the epoch.
    let mut init_tx = async |timeout: i32| {
        let mut b = c
            .call(
                ApiKey::InitProducerId,
                4,
                &InitProducerIdRequest::default()
                    .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx"))))
                    .with_transaction_timeout_ms(timeout)
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1),
            )
            .await;
        InitProducerIdResponse::decode(&mut b, 4).expect("init")
    };
    let tx = init_tx(0).await;
    assert_eq!(
        tx.error_code,
        ResponseError::InvalidTransactionTimeout.code()
    );
    let tx = init_tx(60_000).await;
    assert_eq!((tx.error_code, tx.producer_epoch), (0, 0));
    let again = init_tx(60_000).await;
    assert_eq!(
        (again.producer_id, again.producer_epoch),
        (tx.producer_id, 1)
    );
    node.stop().await;
}

/// InitProducerId v4 for transactional id `id` (timeout 60 s), as a fresh
/// producer asks it.
async fn init_txn(c: &mut Client, id: &'static str) -> InitProducerIdResponse {
    let mut b = c
        .call(
            ApiKey::InitProducerId,
            4,
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str(id))))
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        )
        .await;
    InitProducerIdResponse::decode(&mut b, 4).expect("init")
}

/// Transactions refused with Kafka's own codes, raw: an unknown
/// transactional id (49), EndTxn with nothing begun (48), an unknown
/// partition (3, the rest of the request 55), a stale epoch (90 at v2+, 47
/// below), a transactional batch for a partition not in the transaction
/// (48), a transactional batch in a request naming no transactional id
/// (53), a control batch from a client (87); then the same producer commits
/// normally, the node keeps serving, and `/v1/stats` and `/metrics` count
/// the commit and the fenced requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_requests_are_refused_with_kafkas_codes() {
    use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
    use kafka_protocol::messages::{
        AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, EndTxnRequest, EndTxnResponse,
    };
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    metadata(&mut c, "idem").await;
    let init = init_txn(&mut c, "t1").await;
    assert_eq!(init.error_code, 0);
    let (pid, epoch) = (init.producer_id, init.producer_epoch);
    let end = async |c: &mut Client, id: &'static str, pid: ProducerId, epoch: i16| {
        let req = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str(id)))
            .with_producer_id(pid)
            .with_producer_epoch(epoch)
            .with_committed(true);
        let mut b = c.call(ApiKey::EndTxn, 3, &req).await;
        EndTxnResponse::decode(&mut b, 3).expect("end").error_code
    };
    assert_eq!(
        end(&mut c, "nope", pid, epoch).await,
        ResponseError::InvalidProducerIdMapping.code()
    );
    assert_eq!(
        end(&mut c, "t1", pid, epoch).await,
        ResponseError::InvalidTxnState.code(),
        "nothing begun"
    );
    let add = async |c: &mut Client, version: i16, epoch: i16, topics: &[(&str, i32)]| {
        let req = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_static_str("t1")))
            .with_v3_and_below_producer_id(pid)
            .with_v3_and_below_producer_epoch(epoch)
            .with_v3_and_below_topics(
                topics
                    .iter()
                    .map(|(t, p)| {
                        AddPartitionsToTxnTopic::default()
                            .with_name(name(t))
                            .with_partitions(vec![*p])
                    })
                    .collect(),
            );
        let mut b = c.call(ApiKey::AddPartitionsToTxn, version, &req).await;
        let r = AddPartitionsToTxnResponse::decode(&mut b, version).expect("add");
        r.results_by_topic_v3_and_below
            .iter()
            .map(|t| t.results_by_partition[0].partition_error_code)
            .collect::<Vec<i16>>()
    };
    assert_eq!(
        add(&mut c, 3, epoch, &[("idem", 0), ("missing", 0)]).await,
        vec![
            ResponseError::OperationNotAttempted.code(),
            ResponseError::UnknownTopicOrPartition.code()
        ]
    );
    assert_eq!(
        add(&mut c, 3, epoch + 1, &[("idem", 0)]).await,
        vec![ResponseError::ProducerFenced.code()]
    );
    assert_eq!(
        add(&mut c, 1, epoch + 1, &[("idem", 0)]).await,
        vec![ResponseError::InvalidProducerEpoch.code()]
    );
    // Not added yet: a transactional batch is refused.
    let txn_batch = |seq: i32| {
        let mut r = record(0, "k", b"in a transaction", &[]);
        r.producer_id = pid.0;
        r.producer_epoch = epoch;
        r.sequence = seq;
        r.transactional = true;
        batch(&[r], Compression::None)
    };
    assert_eq!(
        produce_code_as(&mut c, txn_batch(0), Some("t1")).await.0,
        ResponseError::InvalidTxnState.code()
    );
    assert_eq!(
        produce_code(&mut c, txn_batch(0)).await.0,
        ResponseError::TransactionalIdAuthorizationFailed.code(),
        "a transactional batch without a transactional id"
    );
    let mut marker = record(0, "k", b"forged", &[]);
    marker.transactional = true;
    marker.control = true;
    marker.producer_id = pid.0;
    marker.producer_epoch = epoch;
    marker.sequence = -1;
    assert_eq!(
        produce_code_as(&mut c, batch(&[marker], Compression::None), Some("t1"))
            .await
            .0,
        ResponseError::InvalidRecord.code()
    );
    // Added: written, committed, readable.
    assert_eq!(add(&mut c, 3, epoch, &[("idem", 0)]).await, vec![0]);
    let (code, offset) = produce_code_as(&mut c, txn_batch(0), Some("t1")).await;
    assert_eq!(code, 0);
    let (_, stats) = common::get(&common::client(), &format!("{}/v1/stats", node.url)).await;
    assert_eq!(stats["transactions"]["open"], 1, "{stats}");
    assert_eq!(end(&mut c, "t1", pid, epoch).await, 0);
    let (_, stats) = common::get(&common::client(), &format!("{}/v1/stats", node.url)).await;
    let t = &stats["transactions"];
    assert_eq!(
        (
            &t["open"],
            &t["committed"],
            &t["aborted"],
            &t["fenced_requests"]
        ),
        (
            &serde_json::json!(0),
            &serde_json::json!(1),
            &serde_json::json!(0),
            &serde_json::json!(2)
        ),
        "{stats}"
    );
    for (name, want) in [
        ("tributary_transactions_committed_total", 1),
        ("tributary_transactions_fenced_requests_total", 2),
        ("tributary_transactions_open", 0),
    ] {
        assert_eq!(common::metric(&node.url, name, None).await, want, "{name}");
    }
    let (status, page) = common::get(
        &common::client(),
        &format!(
            "{}/v1/topics/idem/partitions/0/records?offset={offset}",
            node.url
        ),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["records"][0]["value"], "in a transaction", "{page}");
    node.stop().await;
}

/// The coordinator keeps at most `kafka.max_transactional_ids`: a new id
/// beyond is refused with THROTTLING_QUOTA_EXCEEDED while the node keeps
/// serving the ids it has; once idle ids expire
/// (`kafka.transactional_id_expiration_ms`) the new one gets in, and an
/// expired id starts again with a new producer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_ids_are_bounded_and_idle_ones_expire() {
    use kafka_protocol::messages::{ListTransactionsRequest, ListTransactionsResponse};
    let node = InProcessNode::start(
        "[kafka]\nmax_transactional_ids = 2\ntransactional_id_expiration_ms = 1500\n",
    )
    .await;
    let mut c = Client::connect(&node).await;
    let a = init_txn(&mut c, "a").await;
    assert_eq!(a.error_code, 0);
    assert_eq!(init_txn(&mut c, "b").await.error_code, 0);
    assert_eq!(
        init_txn(&mut c, "c").await.error_code,
        ResponseError::ThrottlingQuotaExceeded.code()
    );
    let again = init_txn(&mut c, "a").await;
    assert_eq!(
        (again.error_code, again.producer_id, again.producer_epoch),
        (0, a.producer_id, a.producer_epoch + 1),
        "a kept id is still served"
    );
    // Idle ids expire (checked every second): ListTransactions empties,
    // then "c" gets in.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut b = c
            .call(
                ApiKey::ListTransactions,
                0,
                &ListTransactionsRequest::default(),
            )
            .await;
        let listed = ListTransactionsResponse::decode(&mut b, 0).expect("list");
        assert_eq!(listed.error_code, 0);
        if listed.transaction_states.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle ids never expired: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(init_txn(&mut c, "c").await.error_code, 0);
    let fresh = init_txn(&mut c, "a").await;
    assert_eq!(fresh.error_code, 0);
    assert_ne!(
        fresh.producer_id, a.producer_id,
        "an expired id starts again with a new producer id"
    );
    assert_eq!(fresh.producer_epoch, 0);
    node.stop().await;
}

/// Offsets committed inside a transaction are pending until it ends:
/// OffsetFetch with `require_stable` answers UNSTABLE_OFFSET_COMMIT (88)
/// for them (read_committed consumers ask so, and retry), without it the
/// offset before; after the commit both see the new offset. A TxnOffsetCommit
/// v3 naming a member the group does not have is refused (25), one with
/// metadata over 4,096 bytes too (12); the committed position keeps the
/// metadata it was sent with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_pending_in_a_transaction_are_unstable_until_it_commits() {
    use kafka_protocol::messages::txn_offset_commit_request::{
        TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::{
        AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, EndTxnRequest, EndTxnResponse,
        TxnOffsetCommitRequest, TxnOffsetCommitResponse,
    };
    let node = InProcessNode::start("").await;
    let mut c = Client::connect(&node).await;
    metadata(&mut c, "gt").await;
    let id = || TransactionalId(StrBytes::from_static_str("stable"));
    let init = init_txn(&mut c, "stable").await;
    assert_eq!(init.error_code, 0);
    let (pid, epoch) = (init.producer_id, init.producer_epoch);
    let fetch = async |c: &mut Client, require_stable: bool| {
        let p = position(c, require_stable).await;
        (p.error_code, p.committed_offset)
    };
    let req = AddOffsetsToTxnRequest::default()
        .with_transactional_id(id())
        .with_producer_id(pid)
        .with_producer_epoch(epoch)
        .with_group_id(group("g"));
    let mut b = c.call(ApiKey::AddOffsetsToTxn, 3, &req).await;
    assert_eq!(
        AddOffsetsToTxnResponse::decode(&mut b, 3)
            .expect("add offsets")
            .error_code,
        0
    );
    let req = TxnOffsetCommitRequest::default()
        .with_transactional_id(id())
        .with_group_id(group("g"))
        .with_producer_id(pid)
        .with_producer_epoch(epoch)
        .with_topics(vec![TxnOffsetCommitRequestTopic::default()
            .with_name(name("gt"))
            .with_partitions(vec![TxnOffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(0)
                .with_committed_metadata(Some(StrBytes::from_static_str(
                    "in the txn",
                )))])]);
    // Metadata over Kafka's 4,096 bytes: refused for the partition.
    let mut long = req.clone();
    long.topics[0].partitions[0].committed_metadata = Some(StrBytes::from_string("m".repeat(4097)));
    let mut b = c.call(ApiKey::TxnOffsetCommit, 3, &long).await;
    let r = TxnOffsetCommitResponse::decode(&mut b, 3).expect("txn offset commit");
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        ResponseError::OffsetMetadataTooLarge.code()
    );
    // Past the partition's end: refused as OffsetCommit refuses it.
    let mut beyond = req.clone();
    beyond.topics[0].partitions[0].committed_offset = 5;
    let mut b = c.call(ApiKey::TxnOffsetCommit, 3, &beyond).await;
    let r = TxnOffsetCommitResponse::decode(&mut b, 3).expect("txn offset commit");
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        ResponseError::OffsetOutOfRange.code()
    );
    // v3 names a member: one the group does not have is refused, as by
    // OffsetCommit.
    let ghost = req
        .clone()
        .with_generation_id(7)
        .with_member_id(StrBytes::from_static_str("ghost"));
    let mut b = c.call(ApiKey::TxnOffsetCommit, 3, &ghost).await;
    let r = TxnOffsetCommitResponse::decode(&mut b, 3).expect("txn offset commit");
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        ResponseError::UnknownMemberId.code()
    );
    assert_eq!(fetch(&mut c, true).await, (0, -1), "nothing pending");
    let mut b = c.call(ApiKey::TxnOffsetCommit, 3, &req).await;
    let r = TxnOffsetCommitResponse::decode(&mut b, 3).expect("txn offset commit");
    assert_eq!(r.topics[0].partitions[0].error_code, 0);
    assert_eq!(
        fetch(&mut c, true).await,
        (ResponseError::UnstableOffsetCommit.code(), -1)
    );
    assert_eq!(fetch(&mut c, false).await, (0, -1), "nothing committed yet");
    let req = EndTxnRequest::default()
        .with_transactional_id(id())
        .with_producer_id(pid)
        .with_producer_epoch(epoch)
        .with_committed(true);
    let mut b = c.call(ApiKey::EndTxn, 3, &req).await;
    assert_eq!(
        EndTxnResponse::decode(&mut b, 3).expect("end").error_code,
        0
    );
    assert_eq!(fetch(&mut c, true).await, (0, 0));
    assert_eq!(fetch(&mut c, false).await, (0, 0));
    // The position carries the metadata it was committed with.
    assert_eq!(
        position(&mut c, false).await.metadata.as_deref(),
        Some("in the txn")
    );
    node.stop().await;
}
