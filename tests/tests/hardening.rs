//! Regressions of an attack run: what a hostile device or a careless client
//! did to a node, each tried again here. A stored record must never panic a
//! reader; a bug is contained to its connection; memory is bounded for the
//! whole node; HTTP slots cannot be held by idle or partial connections; a full
//! disk hides nothing and recovers by itself.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{client, create_topic, get, post, ChildNode};
use serde_json::{json, Value};

/// `[` × n then `]` × n: valid JSON deeper than serde_json's default limit.
fn deep_json(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

/// Every reader of a partition, in every format, answers for a poison record,
/// and the node is still there afterwards.
async fn read_every_way(c: &reqwest::Client, base: &str, topic: &str, expect: &[String]) {
    for format in ["json", "binary"] {
        let (s, b) = get(
            c,
            &format!("{base}/v1/topics/{topic}/partitions/0/records?offset=0&format={format}"),
        )
        .await;
        assert_eq!(s, 200, "fetch format={format}: {b}");
        let records = b["records"].as_array().expect("records");
        assert_eq!(records.len(), expect.len(), "format={format}");
        for (r, want) in records.iter().zip(expect) {
            let got = if format == "binary" || r.get("encoding").is_some() {
                use base64::Engine as _;
                let b64 = r["value"].as_str().expect("base64");
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .expect("base64"),
                )
                .expect("utf-8")
            } else if let Some(s) = r["value"].as_str() {
                s.to_owned()
            } else {
                r["value"].to_string()
            };
            assert_eq!(&got, want, "format={format}");
        }
    }
    let (s, _) = get(c, &format!("{base}/health")).await;
    assert_eq!(s, 200, "the node still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_record_is_served_as_text_and_kills_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ChildNode::start(dir.path(), &[]);
    let c = client();
    create_topic(&c, &node.url, "deep", 1).await;
    let values: Vec<String> = [5, 100, 101, 129, 10_000]
        .into_iter()
        .map(deep_json)
        .collect();
    for v in &values {
        // Stored as its exact JSON text (encoding json: the value is raw JSON).
        let body = format!(r#"{{"records":[{{"value":{v}}}]}}"#);
        let r = c
            .post(format!("{}/v1/topics/deep/records", node.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("produce");
        // A parser may refuse a request nested past its limit: then a clear
        // 400, and the same bytes sent raw are stored instead.
        if r.status().as_u16() == 400 {
            assert!(v.len() / 2 > 128, "only past serde_json's limit");
            let raw = c
                .post(format!("{}/v1/topics/deep/records", node.url))
                .header("content-type", "application/octet-stream")
                .body(v.clone())
                .send()
                .await
                .expect("produce raw");
            assert_eq!(raw.status().as_u16(), 200, "raw bytes are accepted");
        } else {
            assert_eq!(r.status().as_u16(), 200);
        }
    }
    read_every_way(&c, &node.url, "deep", &values).await;
    // What is stored stays readable after a restart, by every reader.
    node.terminate();
    let node = ChildNode::start(dir.path(), &[]);
    read_every_way(&c, &node.url, "deep", &values).await;
    // The WebSocket tail renders the same records.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/v1/topics/deep/live?from=earliest",
        node.url.replace("http://", "ws://")
    ))
    .await
    .expect("ws connect");
    use futures_util::StreamExt as _;
    for _ in &values {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a record in time")
            .expect("open")
            .expect("message");
        let v: Value = serde_json::from_str(msg.to_text().expect("text")).expect("json");
        assert!(v.get("offset").is_some(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto-clients (scripts/test installs it)"]
async fn a_poison_record_from_mosquitto_pub_is_fetched_without_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let c = client();
    let value = deep_json(129);
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &node.mqtt.port().to_string()])
        .args(["-q", "1", "-t", "deep/x", "-m", &value])
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    read_every_way(&c, &node.url, "deep", &[value]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_closes_its_connection_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let c = client();
    // Debug builds let a request inject a bug (x-tributary-fault: panic).
    let r = c
        .get(format!("{}/health", node.url))
        .header("x-tributary-fault", "panic")
        .send()
        .await;
    assert!(
        r.is_err(),
        "the panicking request's connection is closed: {r:?}"
    );
    let (s, _) = get(&c, &format!("{}/health", node.url)).await;
    assert_eq!(s, 200);
    create_topic(&c, &node.url, "after", 1).await;
    let (s, b) = post(
        &c,
        &format!("{}/v1/topics/after/records", node.url),
        &json!({"records": [{"value": 1}]}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        common::metric(&node.url, "tributary_panics_total", None).await,
        1
    );
}
