//! The edge disk quota (`storage.max_disk_bytes`) through the front ends: a
//! `reject` topic answers each protocol's "full" (HTTP 507 `quota_exceeded`,
//! MQTT 5 PUBACK 0x97, AMQP basic.nack) and loses nothing it acknowledged; a
//! `drop_oldest` topic keeps taking events, evicting its oldest, and the
//! metric counts exactly what was evicted.

mod common;

use std::time::Duration;

use common::{client, InProcessNode};
use serde_json::{json, Value};

const QUOTA: u64 = 128 * 1024;

async fn node() -> InProcessNode {
    InProcessNode::start(&format!(
        r#"
[storage]
max_disk_bytes = {QUOTA}
max_event_bytes = 16384

[[topics]]
name = "keep"
partitions = 1

[[topics]]
name = "ring"
partitions = 2
on_full = "drop_oldest"
"#
    ))
    .await
}

fn batch(tag: &str) -> Value {
    let records: Vec<Value> = (0..50)
        .map(|i| json!({"value": format!("{tag}-{i:0>180}")}))
        .collect();
    json!({ "records": records })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_answers_each_protocols_full_and_drop_oldest_counts_what_it_evicts() {
    let node = node().await;
    let c = client();
    let url = |t: &str| format!("{}/v1/topics/{t}/records", node.url);
    // HTTP: fill `keep` until 507.
    let mut acked = 0u64;
    let refusal = loop {
        let r = c
            .post(url("keep"))
            .json(&batch("keep"))
            .send()
            .await
            .expect("post");
        if r.status() != 200 {
            break r;
        }
        acked += 50;
        assert!(acked < 100_000, "the quota never refused");
    };
    assert_eq!(refusal.status(), 507);
    let body: Value = refusal.json().await.expect("json");
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    // Then single records until not even one 200-byte record fits.
    loop {
        let one = json!({"records": [{"value": format!("{:0>200}", acked)}]});
        let r = c.post(url("keep")).json(&one).send().await.expect("post");
        if r.status() != 200 {
            assert_eq!(r.status(), 507);
            break;
        }
        acked += 1;
    }
    // MQTT 5: PUBACK 0x97 (quota exceeded).
    {
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let (mc, mut el) = AsyncClient::new(
            MqttOptions::new("quota-v5", "127.0.0.1", node.mqtt.port()),
            10,
        );
        mc.publish("keep/x", QoS::AtLeastOnce, false, vec![b'x'; 200])
            .await
            .expect("queue");
        let reason = loop {
            match tokio::time::timeout(Duration::from_secs(20), el.poll())
                .await
                .expect("answer in time")
            {
                Ok(Event::Incoming(Packet::PubAck(a))) => break a.reason,
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(reason, PubAckReason::QuotaExceeded);
    }
    // AMQP: basic.nack.
    let conn = lapin::Connection::connect(
        &format!("amqp://guest:guest@{}/%2f", node.amqp),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("amqp");
    let ch = common::confirm_channel(&conn).await;
    let acked_amqp = common::publish_confirmed(&ch, "keep", "k", &[b'y'; 200]).await;
    assert!(matches!(acked_amqp, Ok(false)), "{acked_amqp:?}");
    // Everything `keep` acknowledged is there.
    let (_, info) = common::get(&c, &format!("{}/v1/topics/keep", node.url)).await;
    assert_eq!(info["partitions"][0]["start_offset"], 0);
    assert_eq!(info["partitions"][0]["end_offset"], acked);

    // `ring` cannot take `keep`'s room: refused too while only `keep` holds data.
    let r = c
        .post(url("ring"))
        .json(&batch("ring"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 507);
    let rejected = common::metric(&node.url, "tributary_quota_rejected_appends_total", None).await;
    assert!(rejected >= 4, "{rejected}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_taking_events_and_the_metric_matches() {
    let node = node().await;
    let c = client();
    let url = format!("{}/v1/topics/ring/records", node.url);
    let mut acked = 0u64;
    for round in 0..60 {
        let r = c
            .post(&url)
            .json(&batch(&format!("r{round}")))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200, "round {round}");
        acked += 50;
    }
    let (_, info) = common::get(&c, &format!("{}/v1/topics/ring", node.url)).await;
    let parts = info["partitions"].as_array().expect("partitions");
    let dropped: u64 = parts
        .iter()
        .map(|p| p["start_offset"].as_u64().expect("start"))
        .sum();
    let ends: u64 = parts
        .iter()
        .map(|p| p["end_offset"].as_u64().expect("end"))
        .sum();
    assert_eq!(ends, acked);
    assert!(dropped > 0);
    assert_eq!(
        common::metric(&node.url, "tributary_quota_dropped_events_total", None).await,
        dropped
    );
    let (_, stats) = common::get(&c, &format!("{}/v1/stats", node.url)).await;
    assert_eq!(stats["quota"]["max_bytes"], QUOTA);
    assert_eq!(stats["quota"]["dropped_events"], dropped);
    assert!(stats["quota"]["stored_bytes"].as_u64().expect("stored") <= QUOTA);
    node.stop().await;
}
