//! kill -9 while lapin publishers pipeline confirmed publishes over AMQP:
//! after every restart, each message the server confirmed with basic.ack is in
//! the log, byte for byte, and none is stored twice.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{crash, ChildNode};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PUBLISHERS: usize = 4;
const WINDOW: usize = 64;

/// Payloads the server confirmed.
type Acked = Arc<Mutex<Vec<Vec<u8>>>>;

/// Publishes until the connection dies: up to WINDOW unconfirmed, payloads
/// of 0..2000 random bytes after a unique prefix, to two exchanges (topics).
async fn publisher(addr: std::net::SocketAddr, id: usize, cycle: usize, acked: Acked) {
    let url = format!("amqp://guest:guest@{addr}/%2f");
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    if ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .is_err()
    {
        return;
    }
    let mut rng = fastrand::Rng::with_seed((cycle * 100 + id) as u64);
    let mut inflight = VecDeque::new();
    publish_until_error(&ch, id, cycle, &mut rng, &mut inflight, &acked).await;
    // The last acks before the crash are the ones an early ack would lose:
    // record every confirm that already arrived, not only popped ones.
    for (payload, confirm) in inflight {
        if let Some(Ok(c)) = futures_util::FutureExt::now_or_never(confirm) {
            if c.is_ack() {
                acked.lock().expect("acked").push(payload);
            }
        }
    }
}

type Inflight = VecDeque<(Vec<u8>, lapin::PublisherConfirm)>;

async fn publish_until_error(
    ch: &lapin::Channel,
    id: usize,
    cycle: usize,
    rng: &mut fastrand::Rng,
    inflight: &mut Inflight,
    acked: &Acked,
) {
    for seq in 0u64.. {
        if inflight.len() >= WINDOW {
            let Some((payload, confirm)) = inflight.pop_front() else {
                return;
            };
            match tokio::time::timeout(Duration::from_secs(10), confirm).await {
                Ok(Ok(c)) if lapin::Confirmation::is_ack(&c) => {
                    acked.lock().expect("acked").push(payload)
                }
                _ => return,
            }
        }
        let mut payload = format!("a{id}-c{cycle}-s{seq}|").into_bytes();
        payload.extend((0..rng.usize(0..2000)).map(|_| rng.u8(..)));
        let exchange = if seq % 2 == 0 { "crash" } else { "crash2" };
        let Ok(confirm) = ch
            .basic_publish(
                exchange.into(),
                format!("k{id}").into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
        else {
            return;
        };
        inflight.push_back((payload, confirm));
    }
}

#[test]
fn every_confirmed_amqp_message_survives_kill_9() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let mut rng = fastrand::Rng::with_seed(7);
    for cycle in 0..crash::cycles() {
        let mut node = ChildNode::start(dir.path(), &[]);
        let addr = node.amqp;
        let workers: Vec<_> = (0..PUBLISHERS)
            .map(|id| rt.spawn(publisher(addr, id, cycle, acked.clone())))
            .collect();
        crash::kill_during(
            &rt,
            &mut node,
            &mut rng,
            300..900,
            workers,
            Duration::from_secs(15),
        );
    }
    let node = ChildNode::start(dir.path(), &[]);
    let mut have = rt.block_on(common::stored_values(&node.url, "crash"));
    for (value, n) in rt.block_on(common::stored_values(&node.url, "crash2")) {
        *have.entry(value).or_insert(0) += n;
    }
    let acked = acked.lock().expect("acked").clone();
    // Each payload was published once, so none may appear twice.
    crash::assert_each_acked_stored_once(&acked, &have, "confirmed");
    // The node still takes confirmed publishes after all that.
    rt.block_on(async {
        let url = format!("amqp://guest:guest@{}/%2f", node.amqp);
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect after the crashes");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        let c = ch
            .basic_publish(
                "crash".into(),
                "after".into(),
                BasicPublishOptions::default(),
                b"ok",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(c.is_ack());
    });
}
