//! kill -9 while QoS 1 publishers pipeline PUBLISHes over MQTT: after every
//! restart, each PUBACKed payload is in the log, byte for byte, and the node
//! takes new publishes. The publishers are raw 3.1.1 sockets so the test knows
//! exactly which payload each PUBACK covers.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::{crash, ChildNode};
use rumqttc::mqttbytes::v4 as raw4;
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PUBLISHERS: usize = 4;
const WINDOW: usize = 64;

/// payload → acknowledged.
type Acked = Arc<Mutex<Vec<Vec<u8>>>>;

/// Publishes until the connection dies: up to WINDOW in flight, payloads of
/// 0..2000 random bytes after a unique prefix.
async fn publisher(addr: std::net::SocketAddr, id: usize, cycle: usize, acked: Acked) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let mut b = BytesMut::new();
    let _ = raw4::Connect::new(format!("crash-{id}")).write(&mut b);
    if s.write_all(&b).await.is_err() {
        return;
    }
    let mut rng = fastrand::Rng::with_seed((cycle * 100 + id) as u64);
    let mut inflight: HashMap<u16, Vec<u8>> = HashMap::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut next_pkid: u16 = 1;
    let mut seq = 0u64;
    let mut connected = false;
    loop {
        if connected {
            let mut out = BytesMut::new();
            while inflight.len() < WINDOW {
                let mut payload = format!("p{id}-c{cycle}-s{seq}|").into_bytes();
                payload.extend((0..rng.usize(0..2000)).map(|_| rng.u8(..)));
                seq += 1;
                let mut p =
                    raw4::Publish::new(format!("crash/p{id}"), QoS::AtLeastOnce, payload.clone());
                p.pkid = next_pkid;
                inflight.insert(next_pkid, payload);
                next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                if p.write(&mut out).is_err() {
                    return;
                }
            }
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            match raw4::Packet::read(&mut buf, 1 << 20) {
                Ok(raw4::Packet::ConnAck(_)) => connected = true,
                Ok(raw4::Packet::PubAck(a)) => {
                    if let Some(p) = inflight.remove(&a.pkid) {
                        acked.lock().expect("acked").push(p);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

#[test]
fn every_pubacked_message_survives_kill_9() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let mut rng = fastrand::Rng::with_seed(42);
    for cycle in 0..crash::cycles() {
        let mut node = ChildNode::start(dir.path(), &[]);
        let addr = node.mqtt;
        let workers: Vec<_> = (0..PUBLISHERS)
            .map(|id| rt.spawn(publisher(addr, id, cycle, acked.clone())))
            .collect();
        crash::kill_during(
            &rt,
            &mut node,
            &mut rng,
            150..700,
            workers,
            Duration::from_secs(10),
        );
    }
    let node = ChildNode::start(dir.path(), &[]);
    let have = rt.block_on(common::stored_values(&node.url, "crash"));
    let acked = acked.lock().expect("acked").clone();
    // Each payload was sent once (no resends here), so none may appear twice.
    crash::assert_each_acked_stored_once(&acked, &have, "PUBACKed");
    // The node still takes publishes after all that.
    rt.block_on(async {
        let mut s = TcpStream::connect(node.mqtt).await.expect("connect");
        let mut b = BytesMut::new();
        raw4::Connect::new("after").write(&mut b).expect("encode");
        let mut p = raw4::Publish::new("crash/after", QoS::AtLeastOnce, "ok");
        p.pkid = 1;
        p.write(&mut b).expect("encode");
        s.write_all(&b).await.expect("write");
        let mut acks = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut acks))
            .await
            .expect("in time")
            .expect("connack + puback");
        assert_eq!(acks, [0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x01]);
    });
}

/// A delayed will outlives a kill -9 of its node (MQTT 5 section 3.1.2.5
/// lets a server that failed publish it at its restart): the client drops
/// its connection, the node is killed before the will is due and stays
/// down past it; started again, it publishes the will, once. Before, the
/// will lived in memory only and was lost.
#[test]
fn a_delayed_will_outlives_a_kill_9_of_its_node() {
    use common::mqtt5::{connect_v5_session, raw_connect};
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ChildNode::start(dir.path(), &[]);
    rt.block_on(async {
        let (s, ack) =
            raw_connect(node.mqtt, &connect_v5_session("leaver", 10, 300, Some(2))).await;
        assert_eq!((ack[0], ack[3]), (0x20, 0), "connected");
        drop(s);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            common::stored_values(&node.url, "wills").await.is_empty(),
            "the will came before its delay"
        );
    });
    node.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let node = ChildNode::start(dir.path(), &[]);
    rt.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let wills = common::stored_values(&node.url, "wills").await;
            if !wills.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the will never came after the restart"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let wills = common::stored_values(&node.url, "wills").await;
        assert_eq!(
            wills.into_iter().collect::<Vec<_>>(),
            [(b"gone".to_vec(), 1)],
            "published once"
        );
    });
}
