//! MQTT deliveries at the packet level, across restarts: the QoS 2 state
//! machine on the way out (PUBLISH → PUBREC → PUBREL → PUBCOMP, the same
//! packet id after a restart, never a completed message again), shared
//! subscription groups (one member per message, what a departed member did
//! not acknowledge goes to another, the group's cursor survives a restart),
//! and topic aliases on deliveries. Raw sockets, so every packet is seen.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::InProcessNode;
use rumqttc::mqttbytes::v4 as raw4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5 as raw5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tributary_gateway::config::Mode;

const WAIT: Duration = Duration::from_secs(10);

/// What [`Raw::ack`] sends: PUBACK for a QoS 1 delivery, PUBREC for a QoS 2
/// delivery, PUBREL for a QoS 2 publish, PUBCOMP for a released delivery.
#[derive(Debug, Clone, Copy)]
enum Ack {
    Puback,
    Pubrec,
    Pubrel,
    Pubcomp,
}

/// A raw 3.1.1 connection.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
    next_id: u16,
}

impl Raw {
    /// CONNECT (clean session or not); returns the connection and CONNACK's
    /// session-present flag.
    async fn connect(addr: std::net::SocketAddr, id: &str, clean: bool) -> (Raw, bool) {
        let mut c = raw4::Connect::new(id);
        c.keep_alive = 60;
        c.clean_session = clean;
        let mut b = BytesMut::new();
        c.write(&mut b).expect("encode");
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&b).await.expect("write");
        let mut raw = Raw {
            s,
            buf: BytesMut::new(),
            next_id: 1,
        };
        match raw.next().await {
            raw4::Packet::ConnAck(a) => {
                assert_eq!(a.code, raw4::ConnectReturnCode::Success);
                (raw, a.session_present)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, write: impl FnOnce(&mut BytesMut)) {
        let mut b = BytesMut::new();
        write(&mut b);
        self.s.write_all(&b).await.expect("write");
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let sub = raw4::Subscribe::new(filter, qos);
        self.send(|b| {
            sub.write(b).expect("encode");
        })
        .await;
        match self.next().await {
            raw4::Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                vec![raw4::SubscribeReasonCode::Success(qos)],
                "granted as asked"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// An acknowledgement packet for `pkid`.
    async fn ack(&mut self, kind: Ack, pkid: u16) {
        self.send(|b| {
            match kind {
                Ack::Puback => raw4::PubAck::new(pkid).write(b),
                Ack::Pubrec => raw4::PubRec::new(pkid).write(b),
                Ack::Pubrel => raw4::PubRel::new(pkid).write(b),
                Ack::Pubcomp => raw4::PubComp::new(pkid).write(b),
            }
            .expect("encode");
        })
        .await;
    }

    /// A QoS 1 publish, once acknowledged.
    async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) {
        let mut m = raw4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        m.pkid = self.next_id;
        self.next_id += 1;
        self.send(|b| {
            m.write(b).expect("encode");
        })
        .await;
        assert!(matches!(self.next().await, raw4::Packet::PubAck(a) if a.pkid == m.pkid));
    }

    /// The next packet (bounded wait).
    async fn next(&mut self) -> raw4::Packet {
        self.try_next(WAIT).await.expect("a packet arrives in time")
    }

    /// The next packet within `d`, if any.
    async fn try_next(&mut self, d: Duration) -> Option<raw4::Packet> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Ok(p) = raw4::Packet::read(&mut self.buf, 1 << 20) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
}

/// Publishes `n` QoS 2 messages `m0..` to `topic` through a client of its own.
async fn publish_qos2(addr: std::net::SocketAddr, topic: &str, n: usize) {
    let (mut p, _) = Raw::connect(addr, "publisher", true).await;
    for i in 0..n {
        let mut m = raw4::Publish::new(topic, QoS::ExactlyOnce, format!("m{i}"));
        m.pkid = (i + 1) as u16;
        p.send(|b| {
            m.write(b).expect("encode");
        })
        .await;
        assert!(matches!(p.next().await, raw4::Packet::PubRec(_)));
        p.ack(Ack::Pubrel, (i + 1) as u16).await;
        assert!(matches!(p.next().await, raw4::Packet::PubComp(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_deliveries_keep_their_packet_id_and_state_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let (mut sub, present) = Raw::connect(node.mqtt, "q2-sub", false).await;
    assert!(!present);
    sub.subscribe("q2/#", QoS::ExactlyOnce).await;
    publish_qos2(node.mqtt, "q2/a", 3).await;

    // Three deliveries at QoS 2; the client acknowledges none of them yet.
    let mut ids = Vec::new();
    for i in 0..3 {
        match sub.next().await {
            raw4::Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::ExactlyOnce);
                assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
                assert!(!p.dup);
                ids.push(p.pkid);
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // m0 is received (PUBREC → PUBREL) and completed; m1 is received only.
    sub.ack(Ack::Pubrec, ids[0]).await;
    assert!(matches!(sub.next().await, raw4::Packet::PubRel(r) if r.pkid == ids[0]));
    sub.ack(Ack::Pubcomp, ids[0]).await;
    sub.ack(Ack::Pubrec, ids[1]).await;
    assert!(matches!(sub.next().await, raw4::Packet::PubRel(r) if r.pkid == ids[1]));
    drop(sub);
    node.stop().await;

    // After a restart: m1 gets its PUBREL again, m2 its PUBLISH again with
    // the same packet id and DUP; m0 is never sent again.
    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let (mut sub, present) = Raw::connect(node.mqtt, "q2-sub", false).await;
    assert!(present, "the session survived the restart");
    let mut saw_rel = false;
    let mut saw_publish = false;
    for _ in 0..2 {
        match sub.next().await {
            raw4::Packet::PubRel(r) => {
                assert_eq!(r.pkid, ids[1]);
                saw_rel = true;
            }
            raw4::Packet::Publish(p) => {
                assert_eq!((p.pkid, p.dup, p.qos), (ids[2], true, QoS::ExactlyOnce));
                assert_eq!(&p.payload[..], b"m2");
                saw_publish = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_rel && saw_publish);
    assert!(
        sub.try_next(Duration::from_millis(500)).await.is_none(),
        "nothing else: m0 was completed"
    );
    // m1 completes; m2 is received, then the node restarts again (the crash
    // case, kill -9 between the packets, is in mqtt_complete.rs).
    sub.ack(Ack::Pubcomp, ids[1]).await;
    sub.ack(Ack::Pubrec, ids[2]).await;
    assert!(matches!(sub.next().await, raw4::Packet::PubRel(r) if r.pkid == ids[2]));
    drop(sub);
    node.stop().await;

    // Third life: only m2's release is left; one more message is new.
    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let (mut sub, _) = Raw::connect(node.mqtt, "q2-sub", false).await;
    assert!(matches!(sub.next().await, raw4::Packet::PubRel(r) if r.pkid == ids[2]));
    sub.ack(Ack::Pubcomp, ids[2]).await;
    assert!(sub.try_next(Duration::from_millis(500)).await.is_none());
    publish_qos2(node.mqtt, "q2/b", 1).await;
    match sub.next().await {
        raw4::Packet::Publish(p) => {
            assert_eq!((&p.payload[..], p.dup), (&b"m0"[..], false));
            assert_eq!(p.topic, "q2/b");
        }
        other => panic!("expected the new PUBLISH, got {other:?}"),
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_and_pubrec_for_unknown_ids_get_their_answers() {
    let node = InProcessNode::start("").await;
    let (mut c, _) = Raw::connect(node.mqtt, "strays", true).await;
    // A PUBREL for an id never received: PUBCOMP anyway (3.1.1 has no code).
    c.ack(Ack::Pubrel, 77).await;
    assert!(matches!(c.next().await, raw4::Packet::PubComp(p) if p.pkid == 77));
    // A PUBREC for a delivery that does not exist: PUBREL, the flow can end.
    c.ack(Ack::Pubrec, 78).await;
    assert!(matches!(c.next().await, raw4::Packet::PubRel(p) if p.pkid == 78));
    c.subscribe("still/#", QoS::AtLeastOnce).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_gives_each_message_to_one_member_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let (mut a, _) = Raw::connect(node.mqtt, "member-a", true).await;
    let (mut b, _) = Raw::connect(node.mqtt, "member-b", false).await;
    a.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce).await;
    b.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect(node.mqtt, "jobs-pub", true).await;
    for i in 0..10 {
        p.publish_qos1(&format!("jobs/{i}"), format!("j{i}").as_bytes())
            .await;
    }
    // Each member gets its share; neither acknowledges yet.
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    while got_a.len() + got_b.len() < 10 {
        tokio::select! {
            Some(raw4::Packet::Publish(x)) = a.try_next(WAIT) => got_a.push(x),
            Some(raw4::Packet::Publish(x)) = b.try_next(WAIT) => got_b.push(x),
            else => panic!("deliveries stopped at {} + {}", got_a.len(), got_b.len()),
        }
    }
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "round robin: {} and {}",
        got_a.len(),
        got_b.len()
    );
    let payload = |p: &raw4::Publish| String::from_utf8_lossy(&p.payload).into_owned();
    let mut all: Vec<String> = got_a.iter().chain(&got_b).map(payload).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "each message to one member");

    // b acknowledges its own; a leaves without acknowledging: a's messages go to b.
    for x in &got_b {
        b.ack(Ack::Puback, x.pkid).await;
    }
    drop(a);
    let mut again = Vec::new();
    while again.len() < got_a.len() {
        match b.next().await {
            raw4::Packet::Publish(x) => {
                b.ack(Ack::Puback, x.pkid).await;
                again.push(payload(&x));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut want: Vec<String> = got_a.iter().map(payload).collect();
    want.sort();
    again.sort();
    assert_eq!(again, want, "what a did not acknowledge, b gets");
    // Let the group's cursor be stored (once a second), then restart with
    // no member connected; what is published meanwhile waits for the group.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(b);
    node.stop().await;

    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let (mut p, _) = Raw::connect(node.mqtt, "jobs-pub", true).await;
    p.publish_qos1("jobs/late", b"late").await;
    let (mut b, present) = Raw::connect(node.mqtt, "member-b", false).await;
    assert!(present);
    match b.next().await {
        raw4::Packet::Publish(x) => assert_eq!(&x.payload[..], b"late"),
        other => panic!("expected the message published while the group was away, got {other:?}"),
    }
    assert!(
        b.try_next(Duration::from_millis(500)).await.is_none(),
        "acknowledged messages are not delivered again"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_use_topic_aliases_within_the_clients_maximum() {
    let node = InProcessNode::start("").await;
    let mut b = BytesMut::new();
    raw5::Connect {
        keep_alive: 30,
        client_id: "aliased".into(),
        clean_start: true,
        properties: Some(raw5::ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: Some(1),
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }),
    }
    .write(&None, &None, &mut b)
    .expect("encode");
    let mut s = TcpStream::connect(node.mqtt).await.expect("connect");
    s.write_all(&b).await.expect("write");
    let mut buf = BytesMut::new();
    assert!(matches!(
        read5(&mut s, &mut buf).await,
        raw5::Packet::ConnAck(_)
    ));
    let mut b = BytesMut::new();
    raw5::Subscribe::new(
        raw5::Filter::new("al/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce),
        None,
    )
    .write(&mut b)
    .expect("encode");
    s.write_all(&b).await.expect("write");
    assert!(matches!(
        read5(&mut s, &mut buf).await,
        raw5::Packet::SubAck(_)
    ));
    let (mut p, _) = Raw::connect(node.mqtt, "al-pub", true).await;
    for t in ["al/x", "al/x", "al/y", "al/y"] {
        p.publish_qos1(t, b"v").await;
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        match read5(&mut s, &mut buf).await {
            raw5::Packet::Publish(x) => seen.push((
                String::from_utf8_lossy(&x.topic).into_owned(),
                x.properties.and_then(|p| p.topic_alias),
            )),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // One alias allowed: `al/x` takes it (topic sent once, then only the
    // alias); `al/y` goes by name every time.
    assert_eq!(
        seen,
        vec![
            ("al/x".to_owned(), Some(1)),
            (String::new(), Some(1)),
            ("al/y".to_owned(), None),
            ("al/y".to_owned(), None),
        ]
    );
    node.stop().await;
}

/// The next v5 packet (bounded wait).
async fn read5(s: &mut TcpStream, buf: &mut BytesMut) -> raw5::Packet {
    loop {
        if let Ok(p) = raw5::Packet::read(buf, Some(1 << 20)) {
            return p;
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_the_same_read_as_disconnect_are_stored() {
    let node = InProcessNode::start("").await;
    for round in 0..20 {
        let (mut c, _) = Raw::connect(node.mqtt, &format!("last-words-{round}"), true).await;
        // QoS 0, QoS 1 and a retained clear, then DISCONNECT: one write, so
        // the node reads them together (the PUBACK is never waited for).
        let mut b = BytesMut::new();
        raw4::Publish::new("lw/a", QoS::AtMostOnce, format!("q0-{round}"))
            .write(&mut b)
            .expect("encode");
        let mut q1 = raw4::Publish::new("lw/b", QoS::AtLeastOnce, format!("q1-{round}"));
        q1.pkid = 1;
        q1.write(&mut b).expect("encode");
        raw4::Disconnect.write(&mut b).expect("encode");
        c.s.write_all(&b).await.expect("write");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.s.read_to_end(&mut rest)).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored = common::stored_values(&node.url, "lw").await;
        let missing: Vec<String> = (0..20)
            .flat_map(|r| [format!("q0-{r}"), format!("q1-{r}")])
            .filter(|v| !stored.contains_key(v.as_bytes()))
            .collect();
        if missing.is_empty() {
            assert!(stored.values().all(|n| *n == 1), "stored once each");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stored: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publishes_count_against_receive_maximum_until_pubcomp() {
    let node = InProcessNode::start("[mqtt]\nmax_inflight = 4\n").await;
    let mut b = BytesMut::new();
    raw5::Connect {
        keep_alive: 30,
        client_id: "flow2".into(),
        clean_start: true,
        properties: None,
    }
    .write(&None, &None, &mut b)
    .expect("encode");
    let mut s = TcpStream::connect(node.mqtt).await.expect("connect");
    s.write_all(&b).await.expect("write");
    let mut buf = BytesMut::new();
    match read5(&mut s, &mut buf).await {
        raw5::Packet::ConnAck(a) => assert_eq!(
            a.properties.and_then(|p| p.receive_max),
            Some(4),
            "our receive maximum"
        ),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // Four QoS 2 publishes, each PUBREC'd, none released: all four still count.
    for pkid in 1..=4u16 {
        let mut p = raw5::Publish::new(
            "flow/x",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            b"v".to_vec(),
            None,
        );
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).expect("encode");
        s.write_all(&b).await.expect("write");
        assert!(matches!(read5(&mut s, &mut buf).await, raw5::Packet::PubRec(r) if r.pkid == pkid));
    }
    // Releasing one frees one place.
    let mut b = BytesMut::new();
    raw5::PubRel::new(1, None).write(&mut b).expect("encode");
    s.write_all(&b).await.expect("write");
    assert!(matches!(read5(&mut s, &mut buf).await, raw5::Packet::PubComp(c) if c.pkid == 1));
    for pkid in [5u16, 6] {
        let mut p = raw5::Publish::new(
            "flow/x",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            b"v".to_vec(),
            None,
        );
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).expect("encode");
        s.write_all(&b).await.expect("write");
    }
    // The 5th fits (1 released); the 6th exceeds: DISCONNECT 0x93, last.
    let mut rest = buf.to_vec();
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the node closes the connection");
    assert!(
        rest.ends_with(&[0xE0, 0x01, 0x93]),
        "ends with DISCONNECT 0x93: {rest:02x?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_group_keeps_each_topic_with_one_member() {
    let node = InProcessNode::start("[mqtt]\nshared_policy = \"sticky\"\n").await;
    let (mut a, _) = Raw::connect(node.mqtt, "sticky-a", true).await;
    let (mut b, _) = Raw::connect(node.mqtt, "sticky-b", true).await;
    a.subscribe("$share/s/st/#", QoS::AtLeastOnce).await;
    b.subscribe("$share/s/st/#", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::connect(node.mqtt, "sticky-pub", true).await;
    let topics: Vec<String> = (0..8).map(|t| format!("st/{t}")).collect();
    for round in 0..5 {
        for t in &topics {
            p.publish_qos1(t, format!("{t}#{round}").as_bytes()).await;
        }
    }
    // Who got which topic, and in which order.
    let mut by_member: Vec<Vec<(String, String)>> = vec![Vec::new(), Vec::new()];
    while by_member[0].len() + by_member[1].len() < 40 {
        let (m, x) = tokio::select! {
            Some(raw4::Packet::Publish(x)) = a.try_next(WAIT) => (0, x),
            Some(raw4::Packet::Publish(x)) = b.try_next(WAIT) => (1, x),
            else => panic!("deliveries stopped"),
        };
        let conn = if m == 0 { &mut a } else { &mut b };
        conn.ack(Ack::Puback, x.pkid).await;
        by_member[m].push((
            x.topic.clone(),
            String::from_utf8_lossy(&x.payload).into_owned(),
        ));
    }
    for t in &topics {
        let holders: Vec<usize> = (0..2)
            .filter(|&m| by_member[m].iter().any(|(tt, _)| tt == t))
            .collect();
        assert_eq!(holders.len(), 1, "{t} went to one member: {by_member:?}");
        let rounds: Vec<&str> = by_member[holders[0]]
            .iter()
            .filter(|(tt, _)| tt == t)
            .map(|(_, v)| v.as_str())
            .collect();
        let want: Vec<String> = (0..5).map(|r| format!("{t}#{r}")).collect();
        assert_eq!(rounds, want, "{t} in order");
    }
    assert!(
        !by_member[0].is_empty() && !by_member[1].is_empty(),
        "8 topics spread over both members"
    );
    node.stop().await;
}
