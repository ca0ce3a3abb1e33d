//! MQTT 3.1.1 and 5 through the real gateway, driven by rumqttc (a client we
//! did not write) and by raw sockets for the packets no client would send.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::mqtt5::{connect_v5_session, raw_connect};
use common::{client, get, post, InProcessNode};
use rumqttc::mqttbytes::v4 as raw4;
use rumqttc::v5::mqttbytes::v5 as raw5;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_frontend as frontend;
use tributary_frontend::listener::LimitedListener;
use tributary_frontend::FrontendContext;
use tributary_mqtt::{self as mqtt, MqttConfig};
use tributary_storage::{Log, LogConfig, MemStore};

const WAIT: Duration = Duration::from_secs(10);

/// A rumqttc 3.1.1 client whose incoming packets arrive on a channel.
struct V4 {
    c: AsyncClient,
    rx: mpsc::Receiver<Result<Packet, String>>,
    stop: CancellationToken,
}

impl V4 {
    async fn connect(addr: std::net::SocketAddr, id: &str, clean: bool) -> V4 {
        Self::connect_with(addr, id, |o| {
            o.set_clean_session(clean);
        })
        .await
    }

    async fn connect_with(
        addr: std::net::SocketAddr,
        id: &str,
        f: impl FnOnce(&mut MqttOptions),
    ) -> V4 {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        f(&mut o);
        let (c, mut el) = AsyncClient::new(o, 1000);
        let (tx, rx) = mpsc::channel(10_000);
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    () = s.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        let mut v = V4 { c, rx, stop };
        let ack = v.next(|p| matches!(p, Packet::ConnAck(_))).await;
        assert!(matches!(ack, Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success));
        v
    }

    /// The next incoming packet matching `want` (others are skipped).
    async fn next(&mut self, want: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(p))) if want(&p) => return p,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("connection error: {e}"),
                Ok(None) => panic!("event loop ended"),
                Err(_) => panic!("timed out waiting for a packet"),
            }
        }
    }

    /// Collects `n` PUBLISH packets.
    async fn publishes(&mut self, n: usize) -> Vec<rumqttc::Publish> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Packet::Publish(p) = self.next(|p| matches!(p, Packet::Publish(_))).await {
                out.push(p);
            }
        }
        out
    }

    /// No PUBLISH arrives within `d`.
    async fn quiet(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(Packet::Publish(p)))) => panic!("unexpected publish {p:?}"),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Drops the socket without DISCONNECT.
    fn vanish(self) {
        self.stop.cancel();
    }
}

async fn records(base: &str, topic: &str) -> Vec<Value> {
    let c = client();
    let (s, t) = get(&c, &format!("{base}/v1/topics/{topic}")).await;
    assert_eq!(s, 200, "{t}");
    let mut out = Vec::new();
    for p in t["partitions"].as_array().expect("partitions") {
        let id = p["partition"].as_u64().expect("id");
        let (s, r) = get(
            &c,
            &format!(
                "{base}/v1/topics/{topic}/partitions/{id}/records?offset=earliest&limit=10000"
            ),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        out.extend(r["records"].as_array().expect("records").iter().cloned());
    }
    out
}

fn header<'a>(r: &'a Value, name: &str) -> Option<&'a str> {
    r["headers"]
        .as_array()?
        .iter()
        .find(|h| h["key"] == name)
        .and_then(|h| h["value"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_publishes_land_in_the_log_with_key_and_topic_header() {
    let node = InProcessNode::start("").await;
    let mut c = V4::connect(node.mqtt, "pub-v4", true).await;
    for (i, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        c.c.publish("sensors/a/temp", q, false, format!("{{\"v\":{i}}}"))
            .await
            .expect("publish");
    }
    c.next(|p| matches!(p, Packet::PubAck(_))).await;
    c.next(|p| matches!(p, Packet::PubComp(_))).await;
    // QoS 0 has no ack: its record shows up at the latest with the others'.
    let got = records(&node.url, "sensors").await;
    assert_eq!(got.len(), 3, "{got:?}");
    let mut values: Vec<i64> = got
        .iter()
        .map(|r| r["value"]["v"].as_i64().expect("v"))
        .collect();
    values.sort_unstable();
    assert_eq!(values, vec![0, 1, 2]);
    for r in &got {
        assert_eq!(r["key"], "sensors/a/temp");
        assert_eq!(header(r, "mqtt.topic"), Some("sensors/a/temp"), "{r}");
    }

    // MQTT 5: user properties become headers, content type too.
    let o5 = {
        let mut o = rumqttc::v5::MqttOptions::new("pub-v5", "127.0.0.1", node.mqtt.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let (c5, mut el5) = rumqttc::v5::AsyncClient::new(o5, 10);
    let props = raw5::PublishProperties {
        user_properties: vec![("site".into(), "north".into())],
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    c5.publish_with_properties(
        "sensors/b/temp",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "{\"v\":5}",
        props,
    )
    .await
    .expect("publish v5");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, el5.poll())
            .await
            .expect("v5 puback in time")
            .expect("v5 connection");
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) = ev {
            assert_eq!(a.reason, raw5::PubAckReason::Success);
            break;
        }
    }
    let got = records(&node.url, "sensors").await;
    let r = got
        .iter()
        .find(|r| r["key"] == "sensors/b/temp")
        .expect("v5 record");
    assert_eq!(header(r, "site"), Some("north"), "{r}");
    assert_eq!(header(r, "content-type"), Some("application/json"), "{r}");
    node.stop().await;
}

/// A log over a MemStore whose syncs the test holds, with an MQTT listener.
async fn held_broker() -> (MemStore, Log, std::net::SocketAddr, CancellationToken) {
    let store = MemStore::new();
    let log = Log::with_store(Arc::new(store.clone()), LogConfig::default()).expect("log");
    let shutdown = CancellationToken::new();
    let cx = FrontendContext::new(log.clone(), shutdown.clone(), "edge");
    let broker = mqtt::Server::new(cx, MqttConfig::default()).expect("broker");
    let l = LimitedListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        64,
    );
    let addr = l.local_addr().expect("addr");
    tokio::spawn(frontend::serve(broker, l, None));
    (store, log, addr, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_never_precedes_durability_and_one_sync_covers_many_publishes() {
    let (store, log, addr, shutdown) = held_broker().await;
    let mut c = V4::connect_with(addr, "durable", |o| {
        o.set_inflight(200);
    })
    .await;
    // The topic exists (and is durable) before the sync is held.
    c.c.publish("d/x", QoS::AtLeastOnce, false, "warm-up")
        .await
        .expect("publish");
    c.next(|p| matches!(p, Packet::PubAck(_))).await;

    store.hold_sync();
    for i in 0..100 {
        c.c.publish("d/x", QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .expect("publish");
    }
    c.c.publish("d/y", QoS::ExactlyOnce, false, "q2")
        .await
        .expect("publish");
    let early = tokio::time::timeout(Duration::from_millis(500), c.rx.recv()).await;
    match early {
        Err(_) => {}
        Ok(Some(Ok(p @ (Packet::PubAck(_) | Packet::PubRec(_))))) => {
            panic!("{p:?} before the log was durable")
        }
        Ok(other) => panic!("unexpected {other:?}"),
    }
    let syncs_before = store.syncs();
    store.release_sync();
    let mut acks = 0;
    while acks < 100 {
        c.next(|p| matches!(p, Packet::PubAck(_))).await;
        acks += 1;
    }
    c.next(|p| matches!(p, Packet::PubRec(_))).await;
    let syncs = store.syncs() - syncs_before;
    assert!(syncs <= 4, "100 in-flight publishes took {syncs} syncs");
    let (start, end) = log.offsets("d", 0).expect("offsets");
    assert_eq!(end - start, 102);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscriptions_are_served_from_the_log() {
    let node = InProcessNode::start("").await;
    let mut sub = V4::connect(node.mqtt, "sub", true).await;
    sub.c
        .subscribe("sensors/+/temp", QoS::AtLeastOnce)
        .await
        .expect("sub");
    sub.next(|p| matches!(p, Packet::SubAck(_))).await;
    let mut all = V4::connect(node.mqtt, "all", true).await;
    all.c.subscribe("#", QoS::AtMostOnce).await.expect("sub");
    all.next(|p| matches!(p, Packet::SubAck(_))).await;

    let mut p = V4::connect(node.mqtt, "pub", true).await;
    for t in [
        "sensors/a/temp",
        "sensors/a/hum",
        "sensors/b/temp",
        "fresh/topic/created/later",
    ] {
        p.c.publish(t, QoS::AtLeastOnce, false, t)
            .await
            .expect("publish");
        p.next(|p| matches!(p, Packet::PubAck(_))).await;
    }
    // A record produced over HTTP is delivered too, by its key.
    let c = client();
    let (s, _) = post(
        &c,
        &format!("{}/v1/topics/sensors/records", node.url),
        &json!({"records": [{"key": "sensors/http/temp", "value": "from-http"}]}),
    )
    .await;
    assert_eq!(s, 200);

    let got = sub.publishes(3).await;
    let mut topics: Vec<String> = got.iter().map(|p| p.topic.clone()).collect();
    topics.sort();
    assert_eq!(
        topics,
        vec!["sensors/a/temp", "sensors/b/temp", "sensors/http/temp"]
    );
    assert!(got
        .iter()
        .all(|p| p.qos == QoS::AtLeastOnce || p.topic == "sensors/http/temp"));
    sub.quiet(Duration::from_millis(300)).await;

    let got = all.publishes(5).await;
    let mut topics: Vec<String> = got.iter().map(|p| p.topic.clone()).collect();
    topics.sort();
    assert_eq!(
        topics,
        vec![
            "fresh/topic/created/later",
            "sensors/a/hum",
            "sensors/a/temp",
            "sensors/b/temp",
            "sensors/http/temp"
        ]
    );
    assert!(got.iter().all(|p| p.qos == QoS::AtMostOnce));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_what_was_published_while_offline_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcessNode::start_in(dir.path(), tributary_gateway::config::Mode::Edge, "").await;
    let mut dev = V4::connect(node.mqtt, "device-7", false).await;
    dev.c
        .subscribe("cmd/device-7/#", QoS::AtLeastOnce)
        .await
        .expect("sub");
    dev.next(|p| matches!(p, Packet::SubAck(_))).await;
    dev.c.disconnect().await.expect("disconnect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.vanish();

    let mut p = V4::connect(node.mqtt, "ops", true).await;
    for i in 0..5 {
        p.c.publish(
            format!("cmd/device-7/set/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("a{i}"),
        )
        .await
        .expect("publish");
        p.next(|p| matches!(p, Packet::PubAck(_))).await;
    }
    p.vanish();

    let mut dev = V4::connect_with(node.mqtt, "device-7", |o| {
        o.set_clean_session(false);
    })
    .await;
    let got = dev.publishes(5).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, vec![&b"a0"[..], b"a1", b"a2", b"a3", b"a4"]);
    dev.c.disconnect().await.expect("disconnect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    dev.vanish();
    node.stop().await;

    // Offline across a restart: the session and its cursor are durable.
    let node = InProcessNode::start_in(dir.path(), tributary_gateway::config::Mode::Edge, "").await;
    let mut p = V4::connect(node.mqtt, "ops", true).await;
    p.c.publish("cmd/device-7/set/5", QoS::AtLeastOnce, false, "a5")
        .await
        .expect("publish");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;
    let mut dev = V4::connect_with(node.mqtt, "device-7", |o| {
        o.set_clean_session(false);
    })
    .await;
    let got = dev.publishes(1).await;
    assert_eq!(&got[0].payload[..], b"a5", "only what it had not received");
    dev.quiet(Duration::from_millis(300)).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_delivered_on_subscribe_and_cleared_by_an_empty_payload() {
    let node = InProcessNode::start("").await;
    let mut p = V4::connect(node.mqtt, "p", true).await;
    p.c.publish("home/lamp/state", QoS::AtLeastOnce, true, "on")
        .await
        .expect("publish");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;
    p.c.publish("home/door/state", QoS::AtLeastOnce, true, "closed")
        .await
        .expect("publish");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;

    let mut s = V4::connect(node.mqtt, "s", true).await;
    s.c.subscribe("home/+/state", QoS::AtLeastOnce)
        .await
        .expect("sub");
    let mut got = s.publishes(2).await;
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..], got[0].retain),
        ("home/door/state", &b"closed"[..], true)
    );
    assert_eq!(
        (got[1].topic.as_str(), &got[1].payload[..], got[1].retain),
        ("home/lamp/state", &b"on"[..], true)
    );

    p.c.publish("home/lamp/state", QoS::AtLeastOnce, true, "")
        .await
        .expect("clear");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;
    let mut s2 = V4::connect(node.mqtt, "s2", true).await;
    s2.c.subscribe("home/#", QoS::AtMostOnce)
        .await
        .expect("sub");
    let got = s2.publishes(1).await;
    assert_eq!(got[0].topic, "home/door/state");
    s2.quiet(Duration::from_millis(300)).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_on_an_ungraceful_disconnect_only() {
    let node = InProcessNode::start("").await;
    let mut s = V4::connect(node.mqtt, "watcher", true).await;
    s.c.subscribe("status/#", QoS::AtLeastOnce)
        .await
        .expect("sub");
    s.next(|p| matches!(p, Packet::SubAck(_))).await;

    let polite = V4::connect_with(node.mqtt, "polite", |o| {
        o.set_last_will(LastWill::new(
            "status/polite",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
    })
    .await;
    polite.c.disconnect().await.expect("disconnect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    polite.vanish();

    let rude = V4::connect_with(node.mqtt, "rude", |o| {
        o.set_last_will(LastWill::new(
            "status/rude",
            "lost",
            QoS::AtLeastOnce,
            false,
        ));
    })
    .await;
    rude.vanish();
    let got = s.publishes(1).await;
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..]),
        ("status/rude", &b"lost"[..])
    );
    s.quiet(Duration::from_millis(300)).await;
    node.stop().await;
}

fn connect_v4(id: &str, keep_alive: u16) -> Vec<u8> {
    let mut c = raw4::Connect::new(id);
    c.keep_alive = keep_alive;
    let mut b = BytesMut::new();
    c.write(&mut b).expect("encode");
    b.to_vec()
}

fn connect_v5(id: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    raw5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start: true,
        properties: None,
    }
    .write(&None, &None, &mut b)
    .expect("encode");
    b.to_vec()
}

/// Reads until EOF (or the deadline); returns what arrived.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    assert!(
        r.is_ok(),
        "the server did not close the connection in {within:?}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_and_keep_alive_expiry_close_the_old_connection() {
    let node = InProcessNode::start("").await;
    // v5 takeover: the first connection gets DISCONNECT 0x8E.
    let (mut first, ack) = raw_connect(node.mqtt, &connect_v5("same")).await;
    assert_eq!(ack[0], 0x20);
    let (_second, ack2) = raw_connect(node.mqtt, &connect_v5("same")).await;
    assert_eq!(ack2[0], 0x20);
    let rest = read_to_close(&mut first, WAIT).await;
    let tail = rest.windows(3).any(|w| w == [0xE0, 0x01, 0x8E]);
    assert!(tail, "no DISCONNECT 0x8E in {rest:02x?}");

    // Keep-alive 1 s, then silence: closed after 1.5 s, before long.
    let (mut quiet, ack) = raw_connect(node.mqtt, &connect_v4("sleepy", 1)).await;
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
    let started = std::time::Instant::now();
    read_to_close(&mut quiet, WAIT).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed too early"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_resend_is_stored_once() {
    let node = InProcessNode::start("").await;
    let (mut s, _) = raw_connect(node.mqtt, &connect_v4("q2", 30)).await;
    let mut b = BytesMut::new();
    let mut p = raw4::Publish::new("once/x", rumqttc::QoS::ExactlyOnce, "exactly");
    p.pkid = 7;
    p.write(&mut b).expect("encode");
    // Resent before the first copy is durable: one PUBREC answers both.
    p.dup = true;
    p.write(&mut b).expect("encode");
    s.write_all(&b).await.expect("write");
    let mut rec = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut rec))
        .await
        .expect("in time")
        .expect("pubrec");
    assert_eq!(rec, [0x50, 0x02, 0x00, 0x07]);
    // Resent after PUBREC (its PUBREC was lost, say): acknowledged again, not stored again.
    let mut b = BytesMut::new();
    p.write(&mut b).expect("encode");
    s.write_all(&b).await.expect("write");
    tokio::time::timeout(WAIT, s.read_exact(&mut rec))
        .await
        .expect("in time")
        .expect("second pubrec");
    assert_eq!(rec, [0x50, 0x02, 0x00, 0x07]);
    s.write_all(&[0x62, 0x02, 0x00, 0x07])
        .await
        .expect("pubrel");
    let mut comp = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut comp))
        .await
        .expect("in time")
        .expect("pubcomp");
    assert_eq!(comp, [0x70, 0x02, 0x00, 0x07]);
    assert_eq!(records(&node.url, "once").await.len(), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_and_the_node_keeps_serving() {
    let node = InProcessNode::start("").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "publish before connect",
            vec![0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'],
        ),
        (
            "wrong protocol name",
            b"\x10\x0c\x00\x04HTTP\x04\x02\x00\x1e\x00\x00".to_vec(),
        ),
        (
            "oversize declared length",
            vec![0x10, 0xff, 0xff, 0xff, 0x7f],
        ),
        (
            "truncated connect",
            vec![0x10, 0x20, 0x00, 0x04, b'M', b'Q'],
        ),
        (
            "malformed remaining length",
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
    ];
    for (name, bytes) in cases {
        let mut s = TcpStream::connect(node.mqtt).await.expect("connect");
        s.write_all(&bytes).await.expect("write");
        if name == "truncated connect" {
            // Half a packet, then nothing: the CONNECT timeout ends it; we hang up first.
            drop(s);
            continue;
        }
        let got = read_to_close(&mut s, WAIT).await;
        assert!(got.is_empty(), "{name}: answered {got:02x?}");
    }
    // MQTT 3.1 (MQIsdp) gets CONNACK 1 (unacceptable protocol version).
    let mut s = TcpStream::connect(node.mqtt).await.expect("connect");
    s.write_all(b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x00")
        .await
        .expect("write");
    assert_eq!(
        read_to_close(&mut s, WAIT).await,
        vec![0x20, 0x02, 0x00, 0x01]
    );

    // v5 after CONNECT: a bad packet gets DISCONNECT 0x81; an oversize one 0x95.
    let (mut s, ack) = raw_connect(node.mqtt, &connect_v5("bad5")).await;
    assert_eq!(ack[0], 0x20);
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    s.read_exact(&mut rest).await.expect("connack rest");
    s.write_all(&[0x82, 0x01, 0x00]).await.expect("write");
    let got = read_to_close(&mut s, WAIT).await;
    assert_eq!(got, vec![0xE0, 0x01, 0x81]);
    let (mut s, ack) = raw_connect(node.mqtt, &connect_v5("big5")).await;
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    s.read_exact(&mut rest).await.expect("connack rest");
    s.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f])
        .await
        .expect("write");
    assert_eq!(read_to_close(&mut s, WAIT).await, vec![0xE0, 0x01, 0x95]);

    // Still serving.
    let mut ok = V4::connect(node.mqtt, "after", true).await;
    ok.c.publish("still/ok", QoS::AtLeastOnce, false, "yes")
        .await
        .expect("publish");
    ok.next(|p| matches!(p, Packet::PubAck(_))).await;
    let (s, m) = {
        let r = client()
            .get(format!("{}/metrics", node.url))
            .send()
            .await
            .expect("metrics");
        (r.status().as_u16(), r.text().await.expect("text"))
    };
    assert_eq!(s, 200);
    for reason in [
        "not_mqtt",
        "packet_too_large",
        "malformed_packet",
        "unsupported_protocol_version",
    ] {
        assert!(
            m.contains(&format!(
                "tributary_mqtt_rejections_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{m}"
        );
    }
    assert!(
        m.contains("tributary_mqtt_publishes_total{qos=\"1\"} 1"),
        "{m}"
    );
    node.stop().await;
}

/// Reads v5 packets from a raw socket until `n` PUBLISHes arrived (or `within` passed).
async fn read_publishes5(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    n: usize,
    within: Duration,
) -> Vec<raw5::Publish> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        while let Ok(p) = raw5::Packet::read(buf, Some(1 << 20)) {
            if let raw5::Packet::Publish(p) = p {
                out.push(p);
            }
        }
        if out.len() >= n {
            break;
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    out
}

fn connect_v5_persistent(id: &str, receive_max: u16) -> Vec<u8> {
    connect_v5_session(id, receive_max, 300, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_stop_at_the_receive_window_and_come_back_with_dup_after_a_reconnect() {
    let node = InProcessNode::start("").await;
    let connect = connect_v5_persistent("slow", 5);
    let (mut s, ack) = raw_connect(node.mqtt, &connect).await;
    assert_eq!(ack[0], 0x20);
    let mut buf = BytesMut::new();
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    s.read_exact(&mut rest).await.expect("connack rest");
    let mut sub = BytesMut::new();
    raw5::Subscribe::new(
        raw5::Filter::new("win/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    )
    .write(&mut sub)
    .expect("encode");
    s.write_all(&sub).await.expect("subscribe");
    let mut suback = [0u8; 6];
    s.read_exact(&mut suback).await.expect("suback");
    assert_eq!(suback[0], 0x90);

    let mut p = V4::connect(node.mqtt, "fast", true).await;
    for i in 0..200 {
        p.c.publish(format!("win/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .expect("publish");
    }
    for _ in 0..200 {
        p.next(|p| matches!(p, Packet::PubAck(_))).await;
    }
    // Only the window's worth arrives while nothing is acknowledged.
    let first = read_publishes5(&mut s, &mut buf, 6, Duration::from_secs(2)).await;
    assert_eq!(
        first.len(),
        5,
        "the server exceeded the receive maximum of 5"
    );
    assert!(first.iter().all(|p| !p.dup));
    let ids: Vec<u16> = first.iter().map(|p| p.pkid).collect();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Reconnect: the session is present, the same five come again with DUP.
    let (mut s, ack) = raw_connect(node.mqtt, &connect).await;
    assert_eq!((ack[0], ack[2] & 1), (0x20, 1), "session present");
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    s.read_exact(&mut rest).await.expect("connack rest");
    let mut buf = BytesMut::new();
    let again = read_publishes5(&mut s, &mut buf, 5, WAIT).await;
    assert_eq!(again.iter().map(|p| p.pkid).collect::<Vec<_>>(), ids);
    assert!(again.iter().all(|p| p.dup), "redeliveries carry DUP");
    assert_eq!(
        again.iter().map(|p| p.payload.clone()).collect::<Vec<_>>(),
        first.iter().map(|p| p.payload.clone()).collect::<Vec<_>>()
    );
    // Acknowledge everything as it comes: all 200 arrive, in order, once.
    let mut seen: Vec<String> = first
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    let mut pending = again;
    while seen.len() < 200 {
        let mut acks = BytesMut::new();
        for p in &pending {
            raw5::PubAck::new(p.pkid, None)
                .write(&mut acks)
                .expect("encode");
        }
        s.write_all(&acks).await.expect("acks");
        pending = read_publishes5(&mut s, &mut buf, 5, WAIT).await;
        assert!(
            !pending.is_empty() && pending.len() <= 5,
            "{}",
            pending.len()
        );
        seen.extend(
            pending
                .iter()
                .map(|p| String::from_utf8_lossy(&p.payload).into_owned()),
        );
    }
    let want: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(seen, want);
    node.stop().await;
}

fn connect_v5_with_will(id: &str, will_topic: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    let will = raw5::LastWill {
        topic: bytes::Bytes::from(will_topic.to_owned()),
        message: bytes::Bytes::from_static(b"gone"),
        qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        retain: false,
        properties: None,
    };
    raw5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start: true,
        properties: None,
    }
    .write(&Some(will), &None, &mut b)
    .expect("encode");
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_reason_decides_the_will() {
    let node = InProcessNode::start("").await;
    let mut s = V4::connect(node.mqtt, "will-watch", true).await;
    s.c.subscribe("wills/#", QoS::AtLeastOnce)
        .await
        .expect("sub");
    s.next(|p| matches!(p, Packet::SubAck(_))).await;
    // `E0 01 00`: normal disconnection with the short form: no will.
    let (mut a, ack) = raw_connect(node.mqtt, &connect_v5_with_will("wa", "wills/a")).await;
    assert_eq!(ack[0], 0x20);
    a.write_all(&[0xE0, 0x01, 0x00]).await.expect("disconnect");
    read_to_close(&mut a, WAIT).await;
    // `E0 01 04`: disconnect with will message: the will is published.
    let (mut b, _) = raw_connect(node.mqtt, &connect_v5_with_will("wb", "wills/b")).await;
    b.write_all(&[0xE0, 0x01, 0x04]).await.expect("disconnect");
    read_to_close(&mut b, WAIT).await;
    let got = s.publishes(1).await;
    assert_eq!(got[0].topic, "wills/b");
    s.quiet(Duration::from_millis(300)).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_of_a_persistent_session_keeps_its_subscriptions() {
    let node = InProcessNode::start("").await;
    let connect = connect_v5_persistent("roamer", 10);
    let (mut first, ack) = raw_connect(node.mqtt, &connect).await;
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    first.read_exact(&mut rest).await.expect("connack rest");
    let mut sub = BytesMut::new();
    raw5::Subscribe::new(
        raw5::Filter::new("roam/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    )
    .write(&mut sub)
    .expect("encode");
    first.write_all(&sub).await.expect("subscribe");
    let mut suback = [0u8; 6];
    first.read_exact(&mut suback).await.expect("suback");
    // The old socket stays open, unread; the same id connects again.
    let (mut second, ack) = raw_connect(node.mqtt, &connect).await;
    assert_eq!(
        (ack[0], ack[2] & 1),
        (0x20, 1),
        "the session was handed over"
    );
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    second.read_exact(&mut rest).await.expect("connack rest");
    let mut p = V4::connect(node.mqtt, "roam-pub", true).await;
    p.c.publish("roam/x", QoS::AtLeastOnce, false, "here")
        .await
        .expect("publish");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;
    let mut buf = BytesMut::new();
    let got = read_publishes5(&mut second, &mut buf, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"here");
    drop(first);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_capped_and_a_retained_message_is_sent_once() {
    let node = InProcessNode::start("[mqtt]\nmax_subscriptions = 5\n").await;
    let mut p = V4::connect(node.mqtt, "rp", true).await;
    p.c.publish("r/x", QoS::AtLeastOnce, true, "kept")
        .await
        .expect("publish");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;
    let (mut s, _) = raw_connect(node.mqtt, &connect_v4("many", 30)).await;
    let filters = ["r/#", "+/x", "#", "r/x", "a", "b", "c", "d"];
    let mut b = BytesMut::new();
    raw4::Subscribe::new_many(
        filters
            .iter()
            .map(|f| raw4::SubscribeFilter::new((*f).to_owned(), rumqttc::QoS::AtLeastOnce)),
    )
    .write(&mut b)
    .expect("encode");
    s.write_all(&b).await.expect("subscribe");
    let mut buf = BytesMut::new();
    let mut suback = None;
    let mut retained = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        while let Ok(pkt) = raw4::Packet::read(&mut buf, 1 << 20) {
            match pkt {
                raw4::Packet::SubAck(a) => suback = Some(a),
                raw4::Packet::Publish(p) => retained.push(p),
                _ => {}
            }
        }
        if tokio::time::timeout_at(deadline, s.read_buf(&mut buf))
            .await
            .is_err()
        {
            break;
        }
    }
    let codes = suback.expect("suback").return_codes;
    let granted = codes
        .iter()
        .filter(|c| matches!(c, raw4::SubscribeReasonCode::Success(_)))
        .count();
    assert_eq!(granted, 5, "{codes:?}");
    assert_eq!(codes.len(), 8);
    assert_eq!(
        retained.len(),
        1,
        "one retained message, matched by four filters"
    );
    assert_eq!(&retained[0].payload[..], b"kept");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_and_will_delay_are_honoured() {
    let node = InProcessNode::start("").await;
    let mut watch = V4::connect(node.mqtt, "delay-watch", true).await;
    watch
        .c
        .subscribe("wills/#", QoS::AtLeastOnce)
        .await
        .expect("sub");
    watch.next(|p| matches!(p, Packet::SubAck(_))).await;

    // A session with a 1 s expiry is gone after 3 s offline.
    let short = connect_v5_session("short", 10, 1, None);
    let (s, ack) = raw_connect(node.mqtt, &short).await;
    assert_eq!((ack[0], ack[2] & 1), (0x20, 0));
    drop(s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_s, ack) = raw_connect(node.mqtt, &short).await;
    assert_eq!(
        (ack[0], ack[2] & 1),
        (0x20, 0),
        "an expired session is not present"
    );

    // Will delay 2 s, client back after 0.5 s: the will is never published.
    let back = connect_v5_session("back", 10, 300, Some(2));
    let (s, _) = raw_connect(node.mqtt, &back).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s2, ack) = raw_connect(node.mqtt, &back).await;
    assert_eq!((ack[0], ack[2] & 1), (0x20, 1));
    // Will delay 1 s, client gone for good: published after the delay, not before.
    let (gone, _) = raw_connect(node.mqtt, &connect_v5_session("gone", 10, 300, Some(1))).await;
    let lost_at = std::time::Instant::now();
    drop(gone);
    let got = watch.publishes(1).await;
    assert_eq!(got[0].topic, "wills/gone");
    assert!(
        lost_at.elapsed() >= Duration::from_millis(900),
        "the will came before its delay"
    );
    watch.quiet(Duration::from_secs(2)).await;
    drop(s2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_packets_after_connect_never_stop_the_node() {
    // A panic in a connection task would only end that task: count them all.
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        default_hook(info);
    }));
    let node = InProcessNode::start("").await;
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..1000 {
        let v5 = round % 2 == 0;
        let connect = if v5 {
            connect_v5(&format!("fuzz{round}"))
        } else {
            connect_v4(&format!("fuzz{round}"), 30)
        };
        let Ok(mut s) = TcpStream::connect(node.mqtt).await else {
            panic!("the node stopped accepting at round {round}");
        };
        let mut bytes = connect;
        // Plausible fixed headers with random bodies, then pure noise.
        for _ in 0..rng.usize(1..6) {
            let kind = rng.u8(1..16) << 4 | rng.u8(0..16);
            let len = rng.usize(0..40);
            bytes.push(kind);
            bytes.push(len as u8);
            bytes.extend((0..len).map(|_| rng.u8(..)));
        }
        bytes.extend((0..rng.usize(0..32)).map(|_| rng.u8(..)));
        let _ = s.write_all(&bytes).await;
        // Whatever it answers, it answers in time and closes or keeps serving.
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read_to_end(&mut sink)).await;
    }
    let mut ok = V4::connect(node.mqtt, "after-fuzz", true).await;
    ok.c.publish("fuzz/ok", QoS::AtLeastOnce, false, "alive")
        .await
        .expect("publish");
    ok.next(|p| matches!(p, Packet::PubAck(_))).await;
    node.stop().await;
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a connection task panicked on random input"
    );
}

/// A fixed header with a remaining length (variable byte integer).
fn fixed_header(first: u8, mut remaining: usize) -> Vec<u8> {
    let mut out = vec![first];
    loop {
        let byte = (remaining & 0x7F) as u8;
        remaining >>= 7;
        if remaining == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A raw packet: first byte, remaining length, body.
fn raw_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = fixed_header(first, body.len());
    p.extend_from_slice(body);
    p
}

/// v5 CONNECT without keep-alive (only the server's refusal can end it),
/// with these raw CONNECT properties.
fn connect_v5_props(id: &str, props: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 0];
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    raw_packet(0x10, &body)
}

/// Connects raw bytes and reads the whole CONNACK.
async fn raw_connect_all(addr: std::net::SocketAddr, connect: &[u8]) -> TcpStream {
    let (mut s, ack) = raw_connect(addr, connect).await;
    assert_eq!(ack[0], 0x20, "{ack:02x?}");
    assert_eq!(ack[3], 0x00, "refused: {ack:02x?}");
    let mut rest = vec![0u8; usize::from(ack[1]) - 2];
    s.read_exact(&mut rest).await.expect("connack rest");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_a_property_given_twice_is_a_protocol_error() {
    let node = InProcessNode::start("").await;
    let mut p = V4::connect(node.mqtt, "dup-witness", true).await;
    p.c.publish("dup/x", QoS::AtLeastOnce, false, "kept")
        .await
        .expect("publish");
    p.next(|p| matches!(p, Packet::PubAck(_))).await;
    let receive_max = [0x21, 0, 10];
    let user = [0x26, 0, 1, b'k', 0, 1, b'v'];

    // CONNECT with Receive Maximum twice: CONNACK 0x82, then close.
    let (mut s, ack) = raw_connect(
        node.mqtt,
        &connect_v5_props("dup-connect", &[receive_max, receive_max].concat()),
    )
    .await;
    assert_eq!((ack[0], ack[3]), (0x20, 0x82), "{ack:02x?}");
    read_to_close(&mut s, WAIT).await;
    // User properties may repeat.
    let _ok = raw_connect_all(
        node.mqtt,
        &connect_v5_props("dup-user", &[&receive_max[..], &user, &user].concat()),
    )
    .await;

    // After CONNECT: DISCONNECT 0x82, then close, and nothing is stored.
    let expiry = [0x02, 0, 0, 0, 60];
    // Topic `dup/x`, packet id 1, Message Expiry Interval twice.
    let mut publish = vec![0, 5, b'd', b'u', b'p', b'/', b'x', 0, 1, 10];
    publish.extend_from_slice(&[expiry, expiry].concat());
    publish.extend_from_slice(b"twice");
    // Packet id 1, Subscription Identifier 1 and 2, filter `dup/#` QoS 1.
    let subscribe = [
        &[0, 1, 4, 0x0B, 0x01, 0x0B, 0x02][..],
        &[0, 5, b'd', b'u', b'p', b'/', b'#', 0x01],
    ]
    .concat();
    for (name, packet) in [
        ("publish", raw_packet(0x32, &publish)),
        ("subscribe", raw_packet(0x82, &subscribe)),
    ] {
        let mut s = raw_connect_all(node.mqtt, &connect_v5_props(name, &[])).await;
        s.write_all(&packet).await.expect("write");
        let got = read_to_close(&mut s, WAIT).await;
        assert_eq!(got, vec![0xE0, 0x01, 0x82], "{name}");
    }
    let stored = records(&node.url, "dup").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let m = common::metrics_text(&node.url, None).await;
    assert!(
        m.contains("tributary_mqtt_rejections_total{reason=\"duplicate_property\"} 3"),
        "{m}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_packet_type_is_refused_from_its_fixed_header() {
    let node = InProcessNode::start("").await;
    // Generous: the point is that the server does not wait for the body
    // (about 1 MB announced, none sent), not how fast it answers.
    let within = Duration::from_secs(60);
    let header = |first: u8| fixed_header(first, 1_000_000);
    // 3.1.1: types 0 and 15 are reserved; the connection just closes.
    for first in [0x00, 0xF0] {
        let (mut s, ack) = raw_connect(node.mqtt, &connect_v4("reserved4", 0)).await;
        assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
        s.write_all(&header(first)).await.expect("write");
        let got = read_to_close(&mut s, within).await;
        assert!(got.is_empty(), "{first:#04x}: {got:02x?}");
    }
    // v5: type 0 gets DISCONNECT 0x81 (malformed packet) first.
    let mut s = raw_connect_all(node.mqtt, &connect_v5_props("reserved5", &[])).await;
    s.write_all(&header(0x00)).await.expect("write");
    assert_eq!(read_to_close(&mut s, within).await, vec![0xE0, 0x01, 0x81]);
    // v5 type 15 is AUTH, which we never invite: DISCONNECT 0x82, same haste.
    let mut s = raw_connect_all(node.mqtt, &connect_v5_props("auth5", &[])).await;
    s.write_all(&header(0xF0)).await.expect("write");
    assert_eq!(read_to_close(&mut s, within).await, vec![0xE0, 0x01, 0x82]);
    node.stop().await;
}
