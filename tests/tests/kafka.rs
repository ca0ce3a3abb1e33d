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
use common::InProcessNode;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, FetchRequest, FetchResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
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

const WAIT: Duration = Duration::from_secs(10);

/// A Kafka connection speaking raw requests.
struct Client {
    s: TcpStream,
    /// Correlation id of the last request sent.
    sent: i32,
    /// Correlation id of the last answer read.
    answered: i32,
}

impl Client {
    async fn connect(node: &InProcessNode) -> Client {
        Client::at(node.kafka).await
    }

    async fn at(addr: std::net::SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.expect("connect"),
            sent: 0,
            answered: 0,
        }
    }

    /// Sends `req` at `version`; returns the answer's body (header stripped).
    async fn call<Req: Encodable + HeaderVersion + Message>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Bytes {
        self.send(key, version, req).await;
        self.answer(key, version).await.expect("an answer")
    }

    async fn send<Req: Encodable>(&mut self, key: ApiKey, version: i16, req: &Req) {
        self.send_as(key, version, version, req).await;
    }

    /// Sends `req` encoded at `body_version` under a header naming `version`
    /// (a version newer than the codec knows).
    async fn send_as<Req: Encodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body_version: i16,
        req: &Req,
    ) {
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.sent + 1)
            .with_client_id(Some(StrBytes::from_static_str("tests")));
        let hv = key.request_header_version(version);
        let mut body = BytesMut::new();
        header.encode(&mut body, hv).expect("header");
        req.encode(&mut body, body_version).expect("body");
        let mut frame = BytesMut::new();
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(&body);
        self.s.write_all(&frame).await.expect("write");
        self.sent += 1;
    }

    /// The next answer's body; `None` when the connection closed.
    async fn answer(&mut self, key: ApiKey, version: i16) -> Option<Bytes> {
        let mut size = [0u8; 4];
        tokio::time::timeout(WAIT, self.s.read_exact(&mut size))
            .await
            .expect("answer in time")
            .ok()?;
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        self.s.read_exact(&mut body).await.ok()?;
        let mut body = Bytes::from(body);
        let hv = if key == ApiKey::ApiVersions {
            0
        } else {
            key.response_header_version(version)
        };
        let header = ResponseHeader::decode(&mut body, hv).expect("response header");
        self.answered += 1;
        assert_eq!(
            header.correlation_id, self.answered,
            "answers come in order"
        );
        Some(body)
    }

    /// True when the server closed the connection (within the wait).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(WAIT, self.s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

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
            .collect::<IndexMap<_, _>>(),
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
    assert_eq!(
        range(ApiKey::JoinGroup),
        None,
        "groups are not advertised yet"
    );

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
                    &[("h", &[0, 1, 2, 255][..]), ("content-type", b"text/plain")],
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
    // The same records over HTTP: produced once, readable by every protocol.
    let values = common::stored_values(&node.url, "kt").await;
    assert_eq!(values.len(), sent.len());
    assert_eq!(values.get(&b"Zstd-14"[..]), Some(&1));
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
async fn with_device_auth_a_client_without_credentials_is_closed_and_counted() {
    // SASL is not served yet: with device authentication on, only a client a
    // verified certificate names gets in; anyone else is closed, unanswered.
    let node = InProcessNode::start(
        "[auth]\nmode = \"devices\"\nadmin_token = \"kafka-admin-token-0123456789\"\n",
    )
    .await;
    let mut c = Client::connect(&node).await;
    c.send(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default())
        .await;
    assert!(
        c.answer(ApiKey::ApiVersions, 3).await.is_none(),
        "no answer without credentials"
    );
    let text = common::metrics_text(&node.url, Some("kafka-admin-token-0123456789")).await;
    assert!(
        text.contains("tributary_kafka_rejections_total{reason=\"not_authorized\"} 1"),
        "{text}"
    );
    node.stop().await;
}
