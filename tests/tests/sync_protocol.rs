//! `/v1/sync` frame by frame, with a raw WebSocket client (tokio-tungstenite)
//! and the wire types: acknowledgements only after durable, replays as
//! no-ops, gaps refused, and every kind of bad input answered with the
//! protocol's error and a closed connection, the core serving on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tributary_storage::{Event, Log, LogConfig, MemStore, Record};
use tributary_sync::wire::{self, code, Batch, Compression, Frame, Hello, Open, Skip};

use common::sync::{
    assert_forwarded, http_addr, read_topic, start_core, start_edge, sync_url, wait_drained,
};
use common::{client, create_topic, get, post};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket");
    ws
}

async fn send(ws: &mut Ws, f: Frame) {
    ws.send(Message::Binary(f.encode().into()))
        .await
        .expect("send");
}

/// The next frame (pings skipped); `None` when the connection closed.
async fn next(ws: &mut Ws) -> Option<Frame> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an answer in time");
        match m {
            Some(Ok(Message::Binary(b))) => return Some(Frame::decode(&b).expect("a frame")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return None,
        }
    }
}

/// Expects an Error frame with `c`, then the close.
async fn expect_error(ws: &mut Ws, c: u16) -> wire::ErrorFrame {
    match next(ws).await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, c, "{e:?}");
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return true,
                        _ => continue,
                    }
                }
            })
            .await;
            assert_eq!(closed, Ok(true), "closed after the error");
            e
        }
        other => panic!("expected error {c}, got {other:?}"),
    }
}

fn hello(edge: &str, token: Option<&str>) -> Frame {
    Frame::Hello(Hello {
        min_version: wire::MIN_VERSION,
        max_version: wire::VERSION,
        edge_id: edge.into(),
        instance: 42,
        token: token.map(str::to_owned),
    })
}

fn records(from: u64, n: u64) -> Vec<Record> {
    (from..from + n)
        .map(|i| Record {
            partition: 0,
            offset: i,
            key: Some(format!("k{i}").into_bytes()),
            value: Some(format!("{{\"v\":{i}}}").into_bytes()),
            timestamp: 1_700_000_000_000 + i as i64,
            headers: vec![("h".into(), vec![0, 255])],
        })
        .collect()
}

fn batch(topic: &str, from: u64, n: u64) -> Frame {
    let mut raw = Vec::new();
    wire::encode_records(&records(from, n), &mut raw, wire::VERSION);
    let raw_len = raw.len() as u32;
    let (compression, records) = wire::compress(raw, 1);
    Frame::Batch(Batch {
        topic: topic.into(),
        partition: 0,
        base_offset: from,
        count: n as u32,
        new_lane: false,
        edge_end: from + n,
        compression,
        raw_len,
        records,
    })
}

async fn handshake(url: &str, edge: &str, topic: &str) -> Ws {
    open_topic(url, edge, topic).await.0
}

/// Hello, Welcome, Open, Opened: the connection and what the core holds.
async fn open_topic(url: &str, edge: &str, topic: &str) -> (Ws, Vec<Vec<(u64, u64)>>) {
    let mut ws = connect(url).await;
    send(&mut ws, hello(edge, None)).await;
    assert!(matches!(next(&mut ws).await, Some(Frame::Welcome(_))));
    send(
        &mut ws,
        Frame::Open(Open {
            topic: topic.into(),
            partitions: 1,
        }),
    )
    .await;
    match next(&mut ws).await {
        Some(Frame::Opened(o)) => {
            assert_eq!(o.topic, topic);
            (ws, o.held)
        }
        other => panic!("expected Opened, got {other:?}"),
    }
}

fn ack_of(f: Option<Frame>) -> (u64, u64) {
    match f {
        Some(Frame::Ack(a)) => (a.base_offset, a.next_offset),
        other => panic!("expected Ack, got {other:?}"),
    }
}

/// A core over a [`MemStore`] whose syncs the test holds, served on a port.
async fn mem_core(store: &MemStore) -> (String, Log, CancellationToken) {
    let log = Log::with_store(
        Arc::new(store.clone()),
        LogConfig {
            auto_create_topics: false,
            ..LogConfig::default()
        },
    )
    .expect("log");
    let core = tributary_sync::SyncCore::open(
        log.clone(),
        Arc::new(tributary_devices::auth::Anonymous),
        Default::default(),
    )
    .await
    .expect("sync state");
    let shutdown = CancellationToken::new();
    let app = tributary_gateway::sync_link::routes(Some(core), shutdown.clone(), 4 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    (format!("ws://{addr}/v1/sync"), log, shutdown)
}

/// An edge of an earlier build speaks only version 1: the core answers at
/// version 1 and reads its records (values as version 1 writes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_speaking_only_version_1_is_served_at_version_1() {
    let store = MemStore::new();
    let (url, log, shutdown) = mem_core(&store).await;
    log.create_topic(tributary_storage::TopicConfig::new("old", 1))
        .await
        .expect("topic");
    let mut ws = connect(&url).await;
    send(
        &mut ws,
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            edge_id: "old-edge".into(),
            instance: 1,
            token: None,
        }),
    )
    .await;
    let Some(Frame::Welcome(w)) = next(&mut ws).await else {
        panic!("no Welcome")
    };
    assert_eq!(w.version, 1);
    send(
        &mut ws,
        Frame::Open(Open {
            topic: "old".into(),
            partitions: 1,
        }),
    )
    .await;
    assert!(matches!(next(&mut ws).await, Some(Frame::Opened(_))));
    let mut sent = records(0, 3);
    sent[1].value = None;
    let mut raw = Vec::new();
    wire::encode_records(&sent, &mut raw, 1);
    let raw_len = raw.len() as u32;
    send(
        &mut ws,
        Frame::Batch(Batch {
            topic: "old".into(),
            partition: 0,
            base_offset: 0,
            count: 3,
            new_lane: false,
            edge_end: 3,
            compression: wire::Compression::None,
            raw_len,
            records: raw,
        }),
    )
    .await;
    assert_eq!(ack_of(next(&mut ws).await), (0, 3));
    let stored = log.read("old", 0, 0, 10, usize::MAX).expect("read").records;
    assert_eq!(stored[0].value, sent[0].value);
    assert_eq!(
        stored[1].value,
        Some(Vec::new()),
        "version 1 has no null values"
    );
    assert_eq!(stored[2].value, sent[2].value);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_for_durability_and_replays_are_no_ops() {
    let store = MemStore::new();
    let (url, log, shutdown) = mem_core(&store).await;
    let mut ws = handshake(&url, "edge-1", "t").await;
    store.hold_sync();
    send(&mut ws, batch("t", 0, 10)).await;
    // Held: no Ack may come, and no reader may see the records.
    let early = tokio::time::timeout(Duration::from_millis(500), next(&mut ws)).await;
    assert!(early.is_err(), "an Ack before the sync: {early:?}");
    assert_eq!(log.offsets("t", 0).expect("offsets"), (0, 0));
    store.release_sync();
    assert_eq!(ack_of(next(&mut ws).await), (0, 10));
    // A replay of the same batch, and one overlapping it: acked, stored once.
    send(&mut ws, batch("t", 0, 10)).await;
    send(&mut ws, batch("t", 5, 10)).await;
    assert_eq!(ack_of(next(&mut ws).await), (0, 10));
    assert_eq!(ack_of(next(&mut ws).await), (5, 15));
    let got = log.read("t", 0, 0, 100, 1 << 20).expect("read");
    assert_eq!(got.records.len(), 15);
    for (i, r) in got.records.iter().enumerate() {
        let want = &records(i as u64, 1)[0];
        assert_eq!(
            (&r.key, &r.value, r.timestamp),
            (&want.key, &want.value, want.timestamp)
        );
        assert_eq!(&r.headers[0], &want.headers[0]);
        assert_eq!(
            r.headers[3],
            (
                "tributary.edge.offset".to_owned(),
                i.to_string().into_bytes()
            )
        );
    }
    // A gap: offset 20 continues nothing the core holds.
    send(&mut ws, batch("t", 20, 5)).await;
    let e = expect_error(&mut ws, code::GAP).await;
    assert_eq!(e.expected, Some(15));
    assert_eq!(log.offsets("t", 0).expect("offsets"), (0, 15));
    // A new connection learns what the core holds, and may skip what the
    // edge lost; the skip is acknowledged once durable.
    let (mut ws, held) = open_topic(&url, "edge-1", "t").await;
    assert_eq!(held, vec![vec![(0, 15)]]);
    store.hold_sync();
    send(
        &mut ws,
        Frame::Skip(Skip {
            topic: "t".into(),
            partition: 0,
            from: 15,
            to: 20,
        }),
    )
    .await;
    let early = tokio::time::timeout(Duration::from_millis(500), next(&mut ws)).await;
    assert!(early.is_err(), "a skip acknowledged before it was durable");
    store.release_sync();
    assert_eq!(ack_of(next(&mut ws).await), (15, 20));
    send(&mut ws, batch("t", 20, 5)).await;
    assert_eq!(ack_of(next(&mut ws).await), (20, 25));
    assert_eq!(log.offsets("t", 0).expect("offsets"), (0, 20));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_core_rebuilds_what_it_holds_from_the_log() {
    let store = MemStore::new();
    let (url, log, shutdown) = mem_core(&store).await;
    log.create_topic(tributary_storage::TopicConfig::new("t", 1))
        .await
        .expect("topic");
    let mut ws = handshake(&url, "edge-1", "t").await;
    send(&mut ws, batch("t", 0, 30)).await;
    assert_eq!(ack_of(next(&mut ws).await), (0, 30));
    // What a crash between a round's records and its checkpoint leaves:
    // records 30..40 durable, no checkpoint covering them.
    let tail: Vec<tributary_storage::AppendRecord> = (30..40u64)
        .map(|o| {
            Event::new(format!("{{\"v\":{o}}}"))
                .with_header(wire::HEADER_EDGE, "edge-1")
                .with_header(wire::HEADER_PARTITION, "0")
                .with_header(wire::HEADER_OFFSET, o.to_string())
                .into()
        })
        .collect();
    log.append("t", tail).await.expect("append");
    let crashed = store.crashed();
    shutdown.cancel();
    drop(ws);
    let (url, log, shutdown) = mem_core(&crashed).await;
    let (mut ws, held) = open_topic(&url, "edge-1", "t").await;
    assert_eq!(held, vec![vec![(0, 40)]]);
    send(&mut ws, batch("t", 0, 50)).await;
    assert_eq!(ack_of(next(&mut ws).await), (0, 50));
    assert_eq!(
        log.offsets("t", 0).expect("offsets"),
        (0, 50),
        "40 replayed, 10 new"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_protocols_error_and_a_closed_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let core = start_core(
        &dir.path().join("core"),
        &[("TRIBUTARY_SYNC__AUTO_CREATE_TOPICS", "false")],
    );
    let url = sync_url(&http_addr(&core));
    let c = client();
    create_topic(&c, &core.url, "known", 1).await;

    // Garbage, text, no Hello, a frame other than Hello.
    let mut ws = connect(&url).await;
    ws.send(Message::Binary(vec![0xde, 0xad, 0xbe, 0xef, 7, 7].into()))
        .await
        .expect("send");
    expect_error(&mut ws, code::BAD_FRAME).await;
    let mut ws = connect(&url).await;
    ws.send(Message::Text("{\"hello\":1}".into()))
        .await
        .expect("send");
    expect_error(&mut ws, code::BAD_FRAME).await;
    let mut ws = connect(&url).await;
    send(&mut ws, batch("known", 0, 1)).await;
    expect_error(&mut ws, code::BAD_FRAME).await;
    // A version from the future.
    let mut ws = connect(&url).await;
    send(
        &mut ws,
        Frame::Hello(Hello {
            min_version: 7,
            max_version: 9,
            edge_id: "e".into(),
            instance: 1,
            token: None,
        }),
    )
    .await;
    expect_error(&mut ws, code::UNSUPPORTED_VERSION).await;
    // A bad edge id.
    let mut ws = connect(&url).await;
    send(&mut ws, hello("no spaces/slashes", None)).await;
    expect_error(&mut ws, code::BAD_FRAME).await;
    // Garbage after a good handshake.
    let mut ws = handshake(&url, "edge-g", "known").await;
    ws.send(Message::Binary(vec![3, 200, 200, 200].into()))
        .await
        .expect("send");
    expect_error(&mut ws, code::BAD_FRAME).await;
    // A batch whose block lies about its records.
    let mut ws = handshake(&url, "edge-g", "known").await;
    let Frame::Batch(mut b) = batch("known", 0, 5) else {
        unreachable!()
    };
    b.count = 6;
    send(&mut ws, Frame::Batch(b)).await;
    expect_error(&mut ws, code::BAD_FRAME).await;
    // A block over the limit (declared), and a zip bomb declaring little.
    let mut ws = handshake(&url, "edge-g", "known").await;
    let Frame::Batch(mut b) = batch("known", 0, 5) else {
        unreachable!()
    };
    b.raw_len = 64 << 20;
    send(&mut ws, Frame::Batch(b)).await;
    expect_error(&mut ws, code::TOO_LARGE).await;
    let mut ws = handshake(&url, "edge-g", "known").await;
    let (compression, packed) = wire::compress(vec![0u8; 32 << 20], 1);
    assert_eq!(compression, Compression::Zstd);
    let bomb = Batch {
        topic: "known".into(),
        partition: 0,
        base_offset: 0,
        count: 1,
        new_lane: false,
        edge_end: 1,
        compression,
        raw_len: 100,
        records: packed,
    };
    send(&mut ws, Frame::Batch(bomb)).await;
    expect_error(&mut ws, code::BAD_FRAME).await;
    // A partition the topic lacks.
    let mut ws = handshake(&url, "edge-g", "known").await;
    let Frame::Batch(mut b) = batch("known", 0, 1) else {
        unreachable!()
    };
    b.partition = 3;
    send(&mut ws, Frame::Batch(b)).await;
    expect_error(&mut ws, code::BAD_FRAME).await;
    // An unknown topic on a core that does not create them: the Open is
    // refused alone, a batch for it ends the connection.
    let mut ws = handshake(&url, "edge-u", "known").await;
    send(
        &mut ws,
        Frame::Open(Open {
            topic: "nope".into(),
            partitions: 1,
        }),
    )
    .await;
    match next(&mut ws).await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, code::UNKNOWN_TOPIC);
            assert_eq!(e.topic.as_deref(), Some("nope"));
        }
        other => panic!("{other:?}"),
    }
    send(&mut ws, batch("known", 0, 3)).await;
    assert_eq!(
        ack_of(next(&mut ws).await),
        (0, 3),
        "the connection still serves known topics"
    );
    send(&mut ws, batch("nope", 0, 3)).await;
    expect_error(&mut ws, code::UNKNOWN_TOPIC).await;
    let (s, _) = get(&c, &format!("{}/v1/topics/nope", core.url)).await;
    assert_eq!(s, 404, "nothing was created");
    // A plain GET is not a WebSocket.
    let r = c
        .get(format!("{}/v1/sync", core.url))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 400);
    // After all that the core serves a real edge.
    let edge = start_edge(&dir.path().join("edge"), &url, "edge-ok", &[]);
    create_topic(&c, &edge.url, "known", 1).await;
    let (s, _) = post(
        &c,
        &format!("{}/v1/topics/known/records", edge.url),
        &serde_json::json!({"records": [{"value": "after"}]}),
    )
    .await;
    assert_eq!(s, 200);
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    let f = assert_forwarded(
        "edge-ok",
        &read_topic(&edge.url, "known").await,
        &read_topic(&core.url, "known").await,
    );
    assert_eq!(f.records, 1);
    let (s, _) = get(&c, &format!("{}/health", core.url)).await;
    assert_eq!(s, 200);
    // An edge's own /v1/sync says it is no core.
    let r = c
        .get(format!("{}/v1/sync", edge.url))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 404);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_a_core");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_in_the_hello() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = "admin-token-0123456789";
    let core = start_core(
        &dir.path().join("core"),
        &[
            ("TRIBUTARY_AUTH__MODE", "devices"),
            ("TRIBUTARY_AUTH__ADMIN_TOKEN", admin),
        ],
    );
    let url = sync_url(&http_addr(&core));
    let c = client();
    let made = c
        .post(format!("{}/v1/devices", core.url))
        .bearer_auth(admin)
        .json(&serde_json::json!({"id": "edge-1", "publish": ["allowed/#"]}))
        .send()
        .await
        .expect("add device");
    assert_eq!(made.status().as_u16(), 201);
    let token = made.json::<serde_json::Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    for bad in [None, Some("trb_wrong")] {
        let mut ws = connect(&url).await;
        send(&mut ws, hello("edge-1", bad)).await;
        expect_error(&mut ws, code::UNAUTHORIZED).await;
    }
    // Right token, wrong edge id.
    let mut ws = connect(&url).await;
    send(&mut ws, hello("edge-2", Some(&token))).await;
    expect_error(&mut ws, code::UNAUTHORIZED).await;
    // Right token: in; a topic outside its ACL is refused alone.
    let mut ws = connect(&url).await;
    send(&mut ws, hello("edge-1", Some(&token))).await;
    assert!(matches!(next(&mut ws).await, Some(Frame::Welcome(_))));
    send(
        &mut ws,
        Frame::Open(Open {
            topic: "secret".into(),
            partitions: 1,
        }),
    )
    .await;
    match next(&mut ws).await {
        Some(Frame::Error(e)) => assert_eq!(e.code, code::FORBIDDEN),
        other => panic!("{other:?}"),
    }
    send(
        &mut ws,
        Frame::Open(Open {
            topic: "allowed".into(),
            partitions: 1,
        }),
    )
    .await;
    assert!(matches!(next(&mut ws).await, Some(Frame::Opened(_))));
    send(&mut ws, batch("allowed", 0, 2)).await;
    assert_eq!(ack_of(next(&mut ws).await), (0, 2));
    // A second connection of the same edge takes over: the first is told.
    let mut second = connect(&url).await;
    send(&mut second, hello("edge-1", Some(&token))).await;
    expect_error(&mut ws, code::REPLACED).await;
    assert!(matches!(next(&mut second).await, Some(Frame::Welcome(_))));
    // Through the real uploader, with the token in its config.
    let edge = start_edge(
        &dir.path().join("edge"),
        &url,
        "edge-1",
        &[("TRIBUTARY_UPSTREAM__TOKEN", &token)],
    );
    create_topic(&c, &edge.url, "allowed", 1).await;
    let (s, _) = post(
        &c,
        &format!("{}/v1/topics/allowed/records", edge.url),
        &serde_json::json!({"records": [{"value": "x"}, {"value": "y"}]}),
    )
    .await;
    assert_eq!(s, 200);
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    // The raw client's two records (instance 42) and the uploader's two (a
    // new data directory for the same edge: its offsets start again).
    let at_core = common::sync::read_topic_as(&core.url, "allowed", Some(admin)).await;
    assert_eq!(at_core.len(), 4);
    for v in [b"\"x\"", b"\"y\""] {
        assert_eq!(at_core.iter().filter(|r| r.value == v).count(), 1);
    }
}

/// A round in which one topic's append fails and another's succeeds: the
/// durable one is acknowledged and held, so the edge never resends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_fails_for_one_topic_keeps_what_the_others_stored() {
    let store = MemStore::new();
    let (url, log, shutdown) = mem_core(&store).await;
    let mut small = tributary_storage::TopicConfig::new("small", 1);
    small.max_event_bytes = 64;
    log.create_topic(small).await.expect("topic");
    let (mut ws, _) = open_topic(&url, "edge-1", "first").await;
    for topic in ["ok", "small"] {
        send(
            &mut ws,
            Frame::Open(Open {
                topic: topic.into(),
                partitions: 1,
            }),
        )
        .await;
        assert!(matches!(next(&mut ws).await, Some(Frame::Opened(_))));
    }
    // Round 1 waits on a held sync, so the next two batches queue up and
    // form round 2 together: "ok" fits, "small"'s records are too large.
    store.hold_sync();
    send(&mut ws, batch("first", 0, 1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&mut ws, batch("ok", 0, 4)).await;
    send(&mut ws, batch("small", 0, 4)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.release_sync();
    assert_eq!(ack_of(next(&mut ws).await), (0, 1));
    assert_eq!(
        ack_of(next(&mut ws).await),
        (0, 4),
        "the durable topic is acknowledged"
    );
    expect_error(&mut ws, code::TOO_LARGE).await;
    let (_ws, held) = open_topic(&url, "edge-1", "ok").await;
    assert_eq!(held, vec![vec![(0, 4)]], "and held: a resend is a replay");
    assert_eq!(log.offsets("ok", 0).expect("offsets"), (0, 4));
    assert_eq!(log.offsets("small", 0).expect("offsets"), (0, 0));
    shutdown.cancel();
}

/// Records of this edge from before a stream existed (an earlier data
/// directory of the same edge id) are never taken for the stream's own
/// after a crash: its checkpoint is durable from the moment it is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_never_adopts_records_older_than_the_stream() {
    let store = MemStore::new();
    let (url, log, shutdown) = mem_core(&store).await;
    log.create_topic(tributary_storage::TopicConfig::new("t", 1))
        .await
        .expect("topic");
    let old: Vec<tributary_storage::AppendRecord> = (0..5u64)
        .map(|o| {
            Event::new("old")
                .with_header(wire::HEADER_EDGE, "edge-1")
                .with_header(wire::HEADER_PARTITION, "0")
                .with_header(wire::HEADER_OFFSET, o.to_string())
                .into()
        })
        .collect();
    log.append("t", old).await.expect("append");
    let (mut ws, held) = open_topic(&url, "edge-1", "t").await;
    assert_eq!(held, vec![Vec::<(u64, u64)>::new()]);
    send(&mut ws, batch("t", 0, 3)).await;
    assert_eq!(ack_of(next(&mut ws).await), (0, 3));
    let crashed = store.crashed();
    shutdown.cancel();
    let (url, _log, shutdown) = mem_core(&crashed).await;
    let (_ws, held) = open_topic(&url, "edge-1", "t").await;
    assert_eq!(held, vec![vec![(0, 3)]], "only what this stream stored");
    shutdown.cancel();
}
