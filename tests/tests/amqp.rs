//! The AMQP 0-9-1 front end, driven by lapin (a client we did not write) and
//! by raw frames where a test must send what no client library would.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, channel, confirm, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use common::InProcessNode;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tributary_amqp::{self as amqp, frame, AmqpConfig};
use tributary_devices::auth::{
    Action, Authenticator, Credentials, Decision, Denial, Identity, Refusal,
};
use tributary_frontend as frontend;
use tributary_frontend::listener::LimitedListener;
use tributary_frontend::FrontendContext;
use tributary_storage::{Log, LogConfig, MemStore};

/// Logins: `dev`/`secret` is in, `off`/any is a disabled device, the rest is
/// refused. Publishing to anything under `forbidden` is denied.
#[derive(Debug)]
struct TestAuth;

impl Authenticator for TestAuth {
    fn authenticate(&self, c: &Credentials<'_>) -> Result<Identity, Refusal> {
        match (c.username, c.password) {
            (Some("dev"), Some("secret")) => Ok(Identity::new("dev")),
            (Some("off"), _) => Err(Refusal::NotAuthorized),
            _ => Err(Refusal::BadCredentials),
        }
    }

    fn authorize(&self, _: &Identity, _: Action, topic: &str) -> Decision {
        Decision::from_bool(!topic.starts_with("forbidden"), Denial::NotInAcl)
    }
}

struct Server {
    log: Log,
    store: MemStore,
    addr: SocketAddr,
    server: Arc<amqp::Server>,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An AMQP server over a MemStore (whose syncs a test may hold), with
/// [`TestAuth`]; `core` turns topic auto-creation off.
async fn server(core: bool, config: AmqpConfig) -> Server {
    server_with_budget(
        core,
        config,
        tributary_frontend::budget::MemoryBudget::default(),
    )
    .await
}

async fn server_with_budget(
    core: bool,
    config: AmqpConfig,
    budget: tributary_frontend::budget::MemoryBudget,
) -> Server {
    let store = MemStore::new();
    let log_config = LogConfig {
        auto_create_topics: !core,
        ..LogConfig::default()
    };
    let log = Log::with_store(Arc::new(store.clone()), log_config).expect("log");
    let shutdown = CancellationToken::new();
    let mut cx = FrontendContext::new(
        log.clone(),
        shutdown.clone(),
        if core { "core" } else { "edge" },
    );
    cx.auth = Arc::new(TestAuth);
    cx.budget = budget;
    let server = amqp::Server::new(cx, config);
    let l = LimitedListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        64,
    );
    let addr = l.local_addr().expect("addr");
    tokio::spawn(frontend::serve(server.clone(), l, None));
    Server {
        log,
        store,
        addr,
        server,
        shutdown,
    }
}

async fn lapin_connect(url: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

fn dev_url(addr: SocketAddr) -> String {
    format!("amqp://dev:secret@{addr}/%2f")
}

fn header<'a>(r: &'a Value, name: &str) -> Option<&'a str> {
    r["headers"]
        .as_array()?
        .iter()
        .find(|h| h["key"] == name)
        .and_then(|h| h["value"].as_str())
}

async fn fetch_all(url: &str, topic: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let info: Value = client
        .get(format!("{url}/v1/topics/{topic}"))
        .send()
        .await
        .expect("describe")
        .json()
        .await
        .expect("json");
    let partitions = info["partitions"].as_array().map_or(0, Vec::len);
    let mut out = Vec::new();
    for p in 0..partitions {
        let body: Value = client
            .get(format!(
                "{url}/v1/topics/{topic}/partitions/{p}/records?offset=0&limit=10000"
            ))
            .send()
            .await
            .expect("fetch")
            .json()
            .await
            .expect("json");
        out.extend(body["records"].as_array().cloned().unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publishes_round_trip_through_the_http_fetch_api() {
    let node = InProcessNode::start("[storage]\ndefault_partitions = 2\n").await;
    let conn = lapin_connect(&format!("amqp://guest:guest@{}/%2f", node.amqp)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let mut headers = FieldTable::default();
    headers.insert("site".into(), AMQPValue::LongString("north".into()));
    headers.insert("seq".into(), AMQPValue::LongInt(7));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("m-7".into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    // Named exchange: topic `plant`, key = routing key.
    let confirm = ch
        .basic_publish(
            "plant".into(),
            "line.3".into(),
            BasicPublishOptions::default(),
            br#"{"t":21.5}"#,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    // Default exchange: the routing key names the topic.
    for i in 0..50 {
        ch.basic_publish(
            "".into(),
            "sensors".into(),
            BasicPublishOptions::default(),
            format!("reading {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    let returned = ch.wait_for_confirms().await.expect("confirms");
    assert!(returned.is_empty());

    let plant = fetch_all(&node.url, "plant").await;
    assert_eq!(plant.len(), 1, "{plant:?}");
    let r = &plant[0];
    assert_eq!(r["key"], "line.3");
    assert_eq!(r["value"], serde_json::json!({"t": 21.5}));
    assert_eq!(r["timestamp"], 1_700_000_000_000i64);
    assert_eq!(header(r, "content-type"), Some("application/json"), "{r}");
    assert_eq!(header(r, "amqp.message_id"), Some("m-7"), "{r}");
    assert_eq!(header(r, "site"), Some("north"), "{r}");
    assert_eq!(header(r, "seq"), Some("7"), "{r}");
    let sensors = fetch_all(&node.url, "sensors").await;
    let mut values: Vec<String> = sensors
        .iter()
        .map(|r| r["value"].as_str().unwrap_or_default().to_owned())
        .collect();
    values.sort();
    let mut want: Vec<String> = (0..50).map(|i| format!("reading {i}")).collect();
    want.sort();
    assert_eq!(values, want);
    assert!(sensors.iter().all(|r| r["key"] == "sensors"));
    conn.close(200, "bye".into()).await.expect("close");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_wait_for_durability_and_share_syncs() {
    let s = server(false, AmqpConfig::default()).await;
    let conn = lapin_connect(&dev_url(s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    // The topics exist (and are durable) before the sync is held.
    for t in ["a", "b"] {
        ch.basic_publish(
            "".into(),
            t.into(),
            BasicPublishOptions::default(),
            b"warm-up",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    s.store.hold_sync();
    let mut confirms = Vec::new();
    for i in 0..200 {
        let topic = if i % 3 == 0 { "a" } else { "b" };
        confirms.push(
            ch.basic_publish(
                "".into(),
                topic.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    let all = futures_util::future::join_all(confirms);
    tokio::pin!(all);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut all)
            .await
            .is_err(),
        "a confirm arrived before the log was durable"
    );
    let syncs_before = s.store.syncs();
    s.store.release_sync();
    let results = tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("confirms after the sync");
    for r in results {
        assert!(r.expect("confirm").is_ack());
    }
    let syncs = s.store.syncs() - syncs_before;
    assert!(syncs <= 6, "200 pipelined publishes took {syncs} syncs");
    let n = |t| {
        let (start, end) = s.log.offsets(t, 0).expect("offsets");
        end - start
    };
    assert_eq!((n("a"), n("b")), (1 + 67, 1 + 133));
    assert_eq!(s.server.metrics().rejections("no_route"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_bind_and_qos_are_accepted_and_exchange_declare_creates_the_topic() {
    let s = server(true, AmqpConfig::default()).await;
    let conn = lapin_connect(&dev_url(s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    ch.exchange_declare(
        "plant".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange.declare");
    assert!(
        s.log.topic("plant").is_ok(),
        "declare created the topic on a core"
    );
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    assert!(q.name().as_str().starts_with("amq.gen-"), "{}", q.name());
    ch.queue_bind(
        q.name().clone(),
        "plant".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.bind");
    // nowait: no answer expected, and the channel keeps working.
    ch.exchange_declare(
        "plant".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            nowait: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("nowait declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let c = ch
        .basic_publish(
            "plant".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"v",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(c.is_ack());
    // A passive declare of a missing exchange closes the channel with 404.
    let err = ch
        .exchange_declare(
            "missing".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("passive declare of a missing topic");
    assert!(
        format!("{err:?}").contains("NOTFOUND") || err.to_string().contains("404"),
        "{err:?}"
    );
    // The connection serves a new channel.
    let ch2 = conn.create_channel().await.expect("channel after 404");
    ch2.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    assert!(ch2
        .basic_publish(
            "plant".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"v2",
            BasicProperties::default()
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
        .is_ack());
    let (start, end) = s.log.offsets("plant", 0).expect("offsets");
    assert_eq!(end - start, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_are_nacked_and_mandatory_ones_returned_before_the_ack() {
    let s = server(
        true,
        AmqpConfig {
            max_message_bytes: 1000,
            ..AmqpConfig::default()
        },
    )
    .await;
    s.log
        .create_topic(s.log.config().topic_defaults.config("known"))
        .await
        .expect("topic");
    let conn = lapin_connect(&dev_url(s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    // The answer to basic.publish is itself a future: the confirm.
    #[allow(clippy::async_yields_async)]
    let publish = |exchange: &'static str, body: Vec<u8>, mandatory: bool| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                exchange.into(),
                "k".into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                &body,
                BasicProperties::default(),
            )
            .await
            .expect("publish")
        }
    };
    // In order: ok, unknown topic (nack), too large (nack), ok, unknown+mandatory (return, ack), ok.
    let c1 = publish("known", b"1".to_vec(), false).await;
    let c2 = publish("nowhere", b"2".to_vec(), false).await;
    let c3 = publish("known", vec![b'x'; 5000], false).await;
    let c4 = publish("known", b"4".to_vec(), false).await;
    let c5 = publish("nowhere", b"5".to_vec(), true).await;
    let c6 = publish("known", b"6".to_vec(), false).await;
    let wait = |c: lapin::PublisherConfirm| async move {
        tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("confirm in time")
            .expect("confirm")
    };
    assert!(wait(c1).await.is_ack());
    assert!(wait(c2).await.is_nack());
    assert!(wait(c3).await.is_nack());
    assert!(wait(c4).await.is_ack());
    let returned = wait(c5).await;
    assert!(returned.is_ack());
    let msg = returned
        .take_message()
        .expect("basic.return before the ack");
    assert_eq!(msg.reply_code, 312);
    assert_eq!(msg.data, b"5");
    assert!(wait(c6).await.is_ack());
    let (start, end) = s.log.offsets("known", 0).expect("offsets");
    assert_eq!(end - start, 3);
    assert!(s.log.topic("nowhere").is_err());
    assert_eq!(s.server.metrics().rejections("message_too_large"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_get_403_and_acl_denials_close_the_channel() {
    let s = server(false, AmqpConfig::default()).await;
    for url in [
        format!("amqp://dev:wrong@{}/%2f", s.addr),
        format!("amqp://nobody:x@{}/%2f", s.addr),
        format!("amqp://off:secret@{}/%2f", s.addr),
    ] {
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        .expect("answer in time")
        .expect_err("refused login");
        let text = format!("{err:?} {err}");
        assert!(
            text.contains("403")
                || text.contains("ACCESS_REFUSED")
                || text.contains("AuthenticationFailure")
                || text.contains("AccessRefused"),
            "{text}"
        );
    }
    assert_eq!(s.server.metrics().rejections("bad_credentials"), 3);

    let conn = lapin_connect(&dev_url(s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let denied = ch
        .basic_publish(
            "forbidden".into(),
            "x".into(),
            BasicPublishOptions::default(),
            b"no",
            BasicProperties::default(),
        )
        .await;
    let outcome = match denied {
        Ok(c) => tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("answer in time")
            .map(|_| ()),
        Err(e) => Err(e),
    };
    let err = outcome.expect_err("ACL denial");
    let text = format!("{err:?} {err}");
    assert!(
        text.contains("403") || text.contains("ACCESS_REFUSED") || text.contains("AccessRefused"),
        "{text}"
    );
    assert!(s.log.topic("forbidden").is_err());
    // The connection lives on.
    let ch2 = conn
        .create_channel()
        .await
        .expect("channel after the denial");
    ch2.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    assert!(ch2
        .basic_publish(
            "allowed".into(),
            "x".into(),
            BasicPublishOptions::default(),
            b"yes",
            BasicProperties::default()
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
        .is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_frame_bodies_and_empty_bodies_arrive_whole() {
    let s = server(false, AmqpConfig::default()).await;
    // frame_max 4096: a 100 KB body crosses 25 body frames.
    let conn = lapin_connect(&format!("amqp://dev:secret@{}/%2f?frame_max=4096", s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for body in [big.clone(), Vec::new(), b"small".to_vec()] {
        assert!(ch
            .basic_publish(
                "".into(),
                "blobs".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
            )
            .await
            .expect("publish")
            .await
            .expect("confirm")
            .is_ack());
    }
    let read = s.log.read("blobs", 0, 0, 10, 1 << 22).expect("read");
    let values: Vec<&[u8]> = read.records.iter().map(|r| r.bytes()).collect();
    assert_eq!(values, vec![&big[..], &b""[..], &b"small"[..]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_is_refused_with_540_naming_the_method() {
    let s = server(false, AmqpConfig::default()).await;
    let conn = lapin_connect(&dev_url(s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        ch.basic_consume(
            "q".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("answer in time")
    .expect_err("basic.consume is not implemented");
    let text = format!("{err:?} {err}");
    assert!(
        text.contains("540") || text.contains("NotImplemented") || text.contains("NOT_IMPLEMENTED"),
        "{text}"
    );
    assert_eq!(s.server.metrics().rejections("not_implemented"), 1);
    // Raw: the close names the method.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.open_channel(1).await;
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "q".into(),
            no_ack: true,
        })),
    ))
    .await;
    let close = raw.expect_close().await;
    assert_eq!(close.reply_code, 540);
    assert!(close.reply_text.as_str().contains("basic.get"), "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 70));
}

/// A hand-driven AMQP client for what libraries never send.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr, heartbeat: u16, blocked_capability: bool) -> Raw {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"AMQP\x00\x00\x09\x01").await.expect("header");
        let mut raw = Raw {
            s,
            buf: BytesMut::new(),
        };
        match raw.recv().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))) => {
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        let mut caps = FieldTable::default();
        caps.insert(
            "connection.blocked".into(),
            AMQPValue::Boolean(blocked_capability),
        );
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        raw.send(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: "\0dev\0secret".into(),
                locale: "en_US".into(),
            })),
        ))
        .await;
        match raw.recv().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) => {}
            other => panic!("expected connection.tune, got {other:?}"),
        }
        raw.send(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max: 131_072,
                heartbeat,
            })),
        ))
        .await;
        raw.send(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ))
        .await;
        match raw.recv().await {
            Some(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)),
            )) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        raw
    }

    /// channel.open on `ch`, and its open-ok.
    async fn open_channel(&mut self, ch: u16) {
        self.send(AMQPFrame::Method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ))
        .await;
        match self.recv().await {
            Some(AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
                if c == ch => {}
            other => panic!("expected channel.open-ok on {ch}, got {other:?}"),
        }
    }

    async fn send(&mut self, f: AMQPFrame) {
        let mut out = Vec::new();
        frame::encode(&f, &mut out);
        self.s.write_all(&out).await.expect("send");
    }

    /// The next frame, or None at EOF.
    async fn recv(&mut self) -> Option<AMQPFrame> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(f) =
                    frame::next_frame(&mut self.buf, 1 << 20).expect("server frames parse")
                {
                    return Some(f);
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a frame or EOF in time")
    }

    /// Reads until connection.close (answering close-ok), skipping heartbeats.
    async fn expect_close(&mut self) -> connection::Close {
        loop {
            match self.recv().await {
                Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                )) => {
                    self.send(AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    ))
                    .await;
                    return c;
                }
                Some(AMQPFrame::Heartbeat) => {}
                Some(other) => panic!("expected connection.close, got {other}"),
                None => panic!("EOF before connection.close"),
            }
        }
    }

    /// True once the server has closed the socket.
    async fn eof(&mut self) -> bool {
        loop {
            if self.recv().await.is_none() {
                return true;
            }
        }
    }
}

fn publish_frames(ch: u16, exchange: &str, body: &[u8]) -> Vec<AMQPFrame> {
    vec![
        AMQPFrame::Method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange.into(),
                routing_key: "k".into(),
                mandatory: false,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            ch,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: AMQPProperties::default(),
            },
        ),
        AMQPFrame::Body(ch, body.to_vec()),
    ]
}

/// channel.open then confirm.select (nowait) on channel 1, in one write.
async fn open_confirm(raw: &mut Raw) {
    let frames = [
        AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: true,
            })),
        ),
    ];
    let mut out = Vec::new();
    for f in &frames {
        frame::encode(f, &mut out);
    }
    raw.s.write_all(&out).await.expect("open and select");
}

async fn still_serves(addr: SocketAddr) {
    let conn = lapin_connect(&dev_url(addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    assert!(ch
        .basic_publish(
            "".into(),
            "alive".into(),
            BasicPublishOptions::default(),
            b"ok",
            BasicProperties::default()
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
        .is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_specification_codes_and_the_node_keeps_serving() {
    let s = server(false, AmqpConfig::default()).await;

    // A protocol header we do not speak: ours comes back, then EOF.
    let mut t = TcpStream::connect(s.addr).await.expect("connect");
    t.write_all(b"AMQP\x01\x01\x00\x0a").await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), t.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(got, b"AMQP\x00\x00\x09\x01");
    let mut t = TcpStream::connect(s.addr).await.expect("connect");
    t.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), t.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(got, b"AMQP\x00\x00\x09\x01");

    // A frame over frame_max, refused from its header alone: 501.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.s
        .write_all(&[3, 0, 1, 0, 0x10, 0, 0])
        .await
        .expect("oversize header");
    let close = raw.expect_close().await;
    assert_eq!(close.reply_code, 501, "{close:?}");
    assert!(raw.eof().await);

    // Garbage after the handshake: 501.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.s.write_all(&[0x42; 64]).await.expect("garbage");
    assert_eq!(raw.expect_close().await.reply_code, 501);

    // Content before a method: 505.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.open_channel(1).await;
    raw.send(AMQPFrame::Body(1, b"stray".to_vec())).await;
    assert_eq!(raw.expect_close().await.reply_code, 505);

    // A method on a channel that is not open: 504. A second open: 504.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.send(publish_frames(9, "x", b"v").remove(0)).await;
    assert_eq!(raw.expect_close().await.reply_code, 504);
    let mut raw = Raw::connect(s.addr, 0, false).await;
    for _ in 0..2 {
        raw.send(AMQPFrame::Method(
            2,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ))
        .await;
    }
    raw.recv().await.expect("open-ok");
    assert_eq!(raw.expect_close().await.reply_code, 504);

    // A channel above channel_max (16 here): 504.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.send(AMQPFrame::Method(
        17,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    ))
    .await;
    assert_eq!(raw.expect_close().await.reply_code, 504);

    // An unknown method: 540; a known one with broken fields: 502.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.s
        .write_all(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, 0xCE])
        .await
        .expect("unknown method");
    let close = raw.expect_close().await;
    assert_eq!(
        (close.reply_code, close.class_id, close.method_id),
        (540, 60, 99)
    );
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.s
        .write_all(&[1, 0, 1, 0, 0, 0, 5, 0, 20, 0, 40, 1, 0xCE])
        .await
        .expect("broken channel.close");
    assert_eq!(raw.expect_close().await.reply_code, 502);

    // A method in the middle of a message's content: 505.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.open_channel(1).await;
    let mut frames = publish_frames(1, "x", b"v");
    frames.truncate(2);
    for f in frames {
        raw.send(f).await;
    }
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close::default())),
    ))
    .await;
    assert_eq!(raw.expect_close().await.reply_code, 505);

    // A ack for a tag we never delivered closes the channel with 406.
    let mut raw = Raw::connect(s.addr, 0, false).await;
    raw.open_channel(1).await;
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 5,
            multiple: false,
        })),
    ))
    .await;
    match raw.recv().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 406)
        }
        other => panic!("expected channel.close, got {other:?}"),
    }

    still_serves(s.addr).await;
    assert!(s.server.metrics().rejections("frame_too_large") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_after_two_heartbeat_periods() {
    let s = server(false, AmqpConfig::default()).await;
    // heartbeat = 1 s: the server beats every 0.5 s and gives up after 2 s of silence.
    let mut raw = Raw::connect(s.addr, 1, false).await;
    let mut beats = 0;
    loop {
        match raw.recv().await {
            Some(AMQPFrame::Heartbeat) => beats += 1,
            Some(other) => panic!("unexpected {other}"),
            None => break,
        }
    }
    assert!(beats >= 1, "the server sent no heartbeat before closing");
    assert_eq!(s.server.metrics().rejections("heartbeat_timeout"), 1);
    // A peer that beats stays connected.
    let mut raw = Raw::connect(s.addr, 1, false).await;
    for _ in 0..8 {
        raw.send(AMQPFrame::Heartbeat).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    ))
    .await;
    loop {
        match raw.recv().await {
            Some(AMQPFrame::Heartbeat) => {}
            Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))) => break,
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_blocks_capable_clients_and_unblocks_them_after() {
    let s = server(
        false,
        AmqpConfig {
            max_pending_appends: 1,
            ..AmqpConfig::default()
        },
    )
    .await;
    let mut raw = Raw::connect(s.addr, 0, true).await;
    raw.open_channel(1).await;
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    ))
    .await;
    raw.recv().await.expect("select-ok");
    for f in publish_frames(1, "", b"first") {
        raw.send(f).await;
    }
    match raw.recv().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))) => {
            assert_eq!(a.delivery_tag, 1)
        }
        other => panic!("expected basic.ack, got {other:?}"),
    }
    s.store.hold_sync();
    for f in publish_frames(1, "", b"second") {
        raw.send(f).await;
    }
    match raw.recv().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(b)))) => {
            assert!(!b.reason.as_str().is_empty())
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    s.store.release_sync();
    let mut acked = false;
    let mut unblocked = false;
    while !(acked && unblocked) {
        match raw.recv().await {
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))) => {
                assert_eq!(a.delivery_tag, 2);
                acked = true;
            }
            Some(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)),
            )) => {
                assert!(acked, "unblocked before the stalled append finished");
                unblocked = true;
            }
            other => panic!("expected ack and unblocked, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_from_many_connections_never_panic_or_stop_the_node() {
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        default_hook(info);
    }));
    let s = server(false, AmqpConfig::default()).await;
    let mut tasks = Vec::new();
    for seed in 0..200u64 {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut raw = Raw::connect(addr, 0, false).await;
            raw.send(AMQPFrame::Method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ))
            .await;
            // Frames with valid framing and random payloads, then raw noise.
            for _ in 0..20 {
                let kind = [1u8, 2, 3, 8][rng.usize(0..4)];
                let len = rng.usize(0..64);
                let mut f = vec![kind, 0, rng.u8(0..3)];
                f.extend_from_slice(&(len as u32).to_be_bytes());
                f.extend((0..len).map(|_| rng.u8(..)));
                f.push(0xCE);
                if raw.s.write_all(&f).await.is_err() {
                    return;
                }
            }
            let noise: Vec<u8> = (0..rng.usize(0..256)).map(|_| rng.u8(..)).collect();
            let _ = raw.s.write_all(&noise).await;
            let mut sink = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), raw.s.read_to_end(&mut sink)).await;
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    still_serves(s.addr).await;
    assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_headers_are_refused_without_touching_the_stack() {
    let s = server(false, AmqpConfig::default()).await;
    // 0x2001: a continuation bit the parser ignores must not move the check.
    for flags in [0x2000u16, 0x2001] {
        let mut raw = Raw::connect(s.addr, 0, false).await;
        raw.open_channel(1).await;
        raw.send(publish_frames(1, "x", b"v").remove(0)).await;
        raw.s
            .write_all(&deep_header(20_000, flags))
            .await
            .expect("deep header");
        let close = raw.expect_close().await;
        assert_eq!(close.reply_code, 502, "{close:?}");
        assert!(close.reply_text.as_str().contains("nested"), "{close:?}");
    }
    still_serves(s.addr).await;
    assert_eq!(s.server.metrics().rejections("nesting_too_deep"), 2);
}

/// A content header frame on channel 1 whose `headers` nests `depth` arrays
/// (20,000 make 100 KB: the recursive parser would overflow a worker's stack).
fn deep_header(depth: usize, flags: u16) -> Vec<u8> {
    let mut value = vec![b'V'];
    for _ in 0..depth {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
        outer.extend_from_slice(&value);
        value = outer;
    }
    let mut table = vec![1u8, b'h'];
    table.extend_from_slice(&value);
    let mut payload = vec![0u8, 60, 0, 0];
    payload.extend_from_slice(&1u64.to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
    payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
    payload.extend_from_slice(&table);
    let mut f = vec![2u8, 0, 1];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&payload);
    f.push(0xCE);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_bodies_count_against_the_content_budget_before_they_arrive() {
    let s = server(
        false,
        AmqpConfig {
            max_message_bytes: 1 << 20,
            max_content_bytes: 4 << 20,
            ..AmqpConfig::default()
        },
    )
    .await;
    let mut raw = Raw::connect(s.addr, 0, false).await;
    // Four channels each announce 1 MiB and send nothing more: the budget is
    // spent. The fifth announcement closes the connection with 506.
    for ch in 1..=5u16 {
        raw.send(AMQPFrame::Method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ))
        .await;
        raw.recv().await.expect("open-ok");
        let mut frames = publish_frames(ch, "x", &[0u8; 1 << 20]);
        frames.truncate(2);
        for f in frames {
            raw.send(f).await;
        }
    }
    let close = raw.expect_close().await;
    assert_eq!(close.reply_code, 506, "{close:?}");
    still_serves(s.addr).await;
}

/// Finding 4 of the attack run: many connections each announcing a large
/// body and holding it. The per-connection budget allowed that on every
/// connection; the node-wide one refuses the newest announcement past it
/// (506 on a plain channel, nack on a confirm channel) and every byte comes
/// back when the holders leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_bodies_across_connections_draw_from_the_node_budget() {
    let budget = tributary_frontend::budget::MemoryBudget::new(3 << 20);
    let s = server_with_budget(
        false,
        AmqpConfig {
            max_message_bytes: 1 << 20,
            ..AmqpConfig::default()
        },
        budget.clone(),
    )
    .await;
    // basic.publish and a header announcing 1 MiB; no body follows.
    let announce = |ch: u16| {
        let mut frames = publish_frames(ch, "x", &[0u8; 1 << 20]);
        frames.truncate(2);
        frames
    };
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(s.addr, 0, false).await;
        raw.open_channel(1).await;
        for f in announce(1) {
            raw.send(f).await;
        }
        holders.push(raw);
    }
    // Each connection is far below its own max_content_bytes (16 MiB), but
    // the node holds 3 MiB: the next announcement is refused.
    let mut late = Raw::connect(s.addr, 0, false).await;
    late.open_channel(1).await;
    for f in announce(1) {
        late.send(f).await;
    }
    match late.recv().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 506, "{c:?}");
        }
        other => panic!("expected channel.close 506, got {other:?}"),
    }
    assert_eq!(budget.available(), 0, "the three holders keep their bytes");
    drop(holders);
    drop(late);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while budget.available() < budget.total() {
        assert!(
            std::time::Instant::now() < deadline,
            "the budget never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_serves(s.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_of_a_closed_channel_never_reach_its_reopened_successor() {
    let s = server(false, AmqpConfig::default()).await;
    let mut raw = Raw::connect(s.addr, 0, false).await;
    open_confirm(&mut raw).await;
    raw.recv().await.expect("open-ok");
    // Warm the topic, then hold the disk.
    for f in publish_frames(1, "", b"warm") {
        raw.send(f).await;
    }
    assert!(matches!(
        raw.recv().await,
        Some(AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(_))
        ))
    ));
    s.store.hold_sync();
    for body in [&b"old-1"[..], b"old-2"] {
        for f in publish_frames(1, "", body) {
            raw.send(f).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close::default())),
    ))
    .await;
    match raw.recv().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected channel.close-ok, got {other:?}"),
    }
    open_confirm(&mut raw).await;
    raw.recv().await.expect("open-ok");
    for f in publish_frames(1, "", b"new-1") {
        raw.send(f).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.store.release_sync();
    // Exactly one confirm follows: tag 1 of the new channel, alone.
    match raw.recv().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))) => {
            assert_eq!((a.delivery_tag, a.multiple), (1, false))
        }
        other => panic!("expected the new channel's ack, got {other:?}"),
    }
    raw.send(AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close::default())),
    ))
    .await;
    match raw.recv().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected only close-ok after the ack, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_channels_gives_back_what_their_held_confirms_took() {
    // Returned bodies held behind a slower tag count against max_content_bytes;
    // a channel closed by the client must give them back, or the connection
    // would stop reading for good after a few open-publish-close rounds.
    let s = server(
        true,
        AmqpConfig {
            max_message_bytes: 32 * 1024,
            max_content_bytes: 64 * 1024,
            ..AmqpConfig::default()
        },
    )
    .await;
    s.log
        .create_topic(s.log.config().topic_defaults.config("known"))
        .await
        .expect("topic");
    s.store.hold_sync();
    let mut raw = Raw::connect(s.addr, 0, false).await;
    for round in 0..12 {
        open_confirm(&mut raw).await;
        match raw.recv().await {
            Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))) => {}
            other => panic!("round {round}: expected channel.open-ok, got {other:?}"),
        }
        // Tag 1 waits for the held disk; tag 2 (mandatory, no topic) is
        // returned, and its 16 KiB return waits behind tag 1.
        for f in publish_frames(1, "known", b"waits") {
            raw.send(f).await;
        }
        let mut frames = publish_frames(1, "nowhere", &[7u8; 16 * 1024]);
        if let AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) =
            &mut frames[0]
        {
            p.mandatory = true;
        }
        for f in frames {
            raw.send(f).await;
        }
        raw.send(AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close::default())),
        ))
        .await;
        match raw.recv().await {
            Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => {}
            other => panic!("round {round}: expected channel.close-ok, got {other:?}"),
        }
    }
    s.store.release_sync();
    // The same connection still reads and confirms.
    open_confirm(&mut raw).await;
    raw.recv().await.expect("open-ok");
    for f in publish_frames(1, "known", b"after") {
        raw.send(f).await;
    }
    match raw.recv().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))) => {
            assert_eq!(a.delivery_tag, 1)
        }
        other => panic!("expected basic.ack, got {other:?}"),
    }
    let (start, end) = s.log.offsets("known", 0).expect("offsets");
    assert_eq!(end - start, 13, "12 held publishes and the last one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_without_confirms_are_stored_when_the_client_closes_right_after() {
    let s = server(false, AmqpConfig::default()).await;
    let conn = lapin_connect(&dev_url(s.addr)).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_publish(
        "".into(),
        "burst".into(),
        BasicPublishOptions::default(),
        b"warm-up",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    // The disk is held while the burst arrives and the client closes, so the
    // appends are still pending (some gathered) when the connection ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.store.hold_sync();
    for i in 0..500 {
        ch.basic_publish(
            "".into(),
            "burst".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    conn.close(200, "done".into()).await.expect("close");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.store.release_sync();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (start, end) = s.log.offsets("burst", 0).expect("offsets");
        if end - start == 501 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 501 publishes stored after the client closed",
            end - start
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
