//! The Kafka connectors. Without outside tools: a second node's Kafka port
//! is the "existing cluster" (it speaks transactions and read_committed
//! like Kafka): a `kafka_sink` forwards exactly once and a `kafka_source`
//! copies exactly once, each while the gateway running it is killed -9
//! again and again. With Apache Kafka (scripts/kafka-reference, the
//! installed tier): the same guarantees against the reference broker,
//! counted by a read_committed consumer we did not write (kcat).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{client, create_topic, get, post, stored_values};
use serde_json::{json, Value};

async fn produce(base: &str, topic: &str, ids: std::ops::Range<u64>) {
    let c = client();
    for chunk in ids.collect::<Vec<_>>().chunks(1000) {
        let records: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"key": format!("s{}", i % 11), "value": format!("n={i}"), "encoding": "string"}))
            .collect();
        let (s, b) = post(
            &c,
            &format!("{base}/v1/topics/{topic}/records"),
            &json!({ "records": records }),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
}

async fn create(base: &str, body: Value) {
    let (s, v) = post(&client(), &format!("{base}/v1/connectors"), &body).await;
    assert_eq!(s, 201, "{v}");
}

fn total(values: &BTreeMap<Vec<u8>, usize>) -> usize {
    values.values().sum()
}

/// Waits until `topic` at `base` holds `n` records (or the time is up).
async fn wait_count(base: &str, topic: &str, n: usize, secs: u64) -> BTreeMap<Vec<u8>, usize> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = stored_values(base, topic).await;
        if total(&v) >= n || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every value `n=0..n` exactly once.
fn assert_exactly_once(values: &BTreeMap<Vec<u8>, usize>, n: u64, what: &str) {
    let missing: Vec<u64> = (0..n)
        .filter(|i| !values.contains_key(format!("n={i}").as_bytes()))
        .take(10)
        .collect();
    let doubled: Vec<(String, usize)> = values
        .iter()
        .filter(|(_, &c)| c > 1)
        .take(10)
        .map(|(v, c)| (String::from_utf8_lossy(v).into_owned(), *c))
        .collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && total(values) as u64 == n,
        "{what}: {} stored for {n}; missing (first 10) {missing:?}; doubled {doubled:?}",
        total(values)
    );
}

/// Kills `node` -9 and starts it again on its data once `topic` at `watch`
/// holds `at` records.
async fn kill_at(
    node: &mut common::ChildNode,
    dir: &std::path::Path,
    watch: &str,
    topic: &str,
    at: usize,
) {
    wait_count(watch, topic, at, 60).await;
    node.kill9();
    *node = common::ChildNode::start(dir, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_delivers_exactly_once_into_a_kafka_port_through_kill_9() {
    let cluster = common::InProcessNode::start("").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = common::ChildNode::start(dir.path(), &[]);
    create_topic(&client(), &node.url, "events", 3).await;
    let n = 20_000u64;
    produce(&node.url, "events", 0..n).await;
    create(
        &node.url,
        json!({"name": "fwd", "kind": "kafka_sink", "topics": ["events"],
               "bootstrap_servers": [cluster.kafka.to_string()], "kafka_topic": "edge.{topic}",
               "batch_size": 100, "min_backoff_ms": 50, "max_backoff_ms": 500,
               "compression": "zstd"}),
    )
    .await;
    for at in [2_000, 8_000, 14_000] {
        kill_at(&mut node, dir.path(), &cluster.url, "edge.events", at).await;
    }
    let values = wait_count(&cluster.url, "edge.events", n as usize, 120).await;
    // A moment more: nothing beyond n may arrive late.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let values = if total(&values) as u64 == n {
        stored_values(&cluster.url, "edge.events").await
    } else {
        values
    };
    assert_exactly_once(&values, n, "the cluster's copy");
    // Created with the topic's partitions; keyed records in Kafka's
    // partition for their key (murmur2, as on the edge): the same split.
    let c = client();
    for p in 0..3u32 {
        let here = common::read_all(&c, &node.url, "events", p).await;
        let there = common::read_all(&c, &cluster.url, "edge.events", p).await;
        let mut a: Vec<Vec<u8>> = here.into_iter().map(|r| r.2).collect();
        let mut b: Vec<Vec<u8>> = there.into_iter().map(|r| r.2).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "partition {p} holds the same records on both sides");
    }
    let (s, v) = get(&c, &format!("{}/v1/connectors/fwd", node.url)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["lag_records"], 0, "{v}");
    assert_eq!(v["dead_letters"], 0, "{v}");
    // The positions live on the cluster, compacted.
    let (s, t) = get(
        &c,
        &format!("{}/v1/topics/tributary-sink-positions", cluster.url),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["cleanup_policy"], "compact", "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_source_copies_exactly_once_from_a_kafka_port_through_kill_9() {
    let cluster = common::InProcessNode::start("").await;
    create_topic(&client(), &cluster.url, "remote", 2).await;
    let first = 20_000u64;
    produce(&cluster.url, "remote", 0..first).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = common::ChildNode::start(dir.path(), &[]);
    create(
        &node.url,
        json!({"name": "pull", "kind": "kafka_source", "kafka_topics": ["remote"], "topic": "copy",
               "bootstrap_servers": [cluster.kafka.to_string()], "fetch_max_bytes": 65536,
               "min_backoff_ms": 50, "max_backoff_ms": 500}),
    )
    .await;
    let url = node.url.clone();
    kill_at(&mut node, dir.path(), &url, "copy", 3_000).await;
    produce(&cluster.url, "remote", first..first + 5_000).await;
    let url = node.url.clone();
    kill_at(&mut node, dir.path(), &url, "copy", 12_000).await;
    let n = first + 5_000;
    let values = wait_count(&node.url, "copy", n as usize, 120).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let values = if total(&values) as u64 == n {
        stored_values(&node.url, "copy").await
    } else {
        values
    };
    assert_exactly_once(&values, n, "the node's copy");
    // Each record says where it came from; the topic got the partitions.
    let (s, r) = get(
        &client(),
        &format!(
            "{}/v1/topics/copy/partitions/1/records?offset=0&limit=1",
            node.url
        ),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let headers = r["records"][0]["headers"].to_string();
    assert!(headers.contains("pull/remote/1/0"), "{headers}");
    let (_, t) = get(&client(), &format!("{}/v1/topics/copy", node.url)).await;
    assert_eq!(t["partitions"].as_array().map(Vec::len), Some(2), "{t}");
}

/// A record larger than `max_record_bytes` goes to the dead-letter topic
/// (before its batch's transaction commits); the rest of its batch is
/// delivered; the sink does not stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_dead_letters_records_too_large_and_delivers_the_rest() {
    let cluster = common::InProcessNode::start("").await;
    let node = common::InProcessNode::start("").await;
    create_topic(&client(), &node.url, "events", 1).await;
    let mut records: Vec<Value> = (0..20u64)
        .map(|i| json!({"value": format!("n={i}"), "encoding": "string"}))
        .collect();
    records.insert(7, json!({"value": "x".repeat(5000), "encoding": "string"}));
    let (s, b) = post(
        &client(),
        &format!("{}/v1/topics/events/records", node.url),
        &json!({ "records": records }),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    create(
        &node.url,
        json!({"name": "fwd", "kind": "kafka_sink", "topics": ["events"],
               "bootstrap_servers": [cluster.kafka.to_string()], "max_record_bytes": 1024}),
    )
    .await;
    let values = wait_count(&cluster.url, "events", 20, 60).await;
    assert_exactly_once(&values, 20, "the records that fit");
    let dead = wait_count(&node.url, "fwd.dead-letter", 1, 30).await;
    assert_eq!(total(&dead), 1, "one dead letter");
    assert!(
        dead.contains_key("x".repeat(5000).as_bytes()),
        "the large record"
    );
    let (_, v) = get(&client(), &format!("{}/v1/connectors/fwd", node.url)).await;
    assert_eq!(v["dead_letters"], 1, "{v}");
}

/// SASL PLAIN with the password as a secret reference: a cluster that
/// checks logins (the node's devices) takes the sink's records under the
/// device's name; a wrong password is refused at creation, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_logs_in_with_sasl_plain() {
    const ADMIN: &str = "admin-token-of-the-test-cluster";
    let cluster = common::InProcessNode::start(&format!(
        "[auth]\nmode = \"devices\"\nadmin_token = \"{ADMIN}\"\n"
    ))
    .await;
    let token = common::add_device(&cluster.url, ADMIN, "edge-7", &["#"], &["#"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good");
    std::fs::write(&good, format!("{token}\n")).expect("write");
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "not-the-token").expect("write");
    let node = common::InProcessNode::start("").await;
    create_topic(&client(), &node.url, "events", 2).await;
    produce(&node.url, "events", 0..500).await;
    let sink = |name: &str, secret: &std::path::Path| {
        json!({"name": name, "kind": "kafka_sink", "topics": ["events"],
               "bootstrap_servers": [cluster.kafka.to_string()], "sasl_mechanism": "PLAIN",
               "username": "edge-7", "password": format!("${{file:{}}}", secret.display())})
    };
    let (s, v) = post(
        &client(),
        &format!("{}/v1/connectors", node.url),
        &sink("nope", &bad),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("bootstrap_servers"), "{v}");
    assert!(
        !v.to_string().contains("not-the-token"),
        "no secret in errors: {v}"
    );
    create(&node.url, sink("fwd", &good)).await;
    // The cluster's HTTP API needs the admin token to read.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while Instant::now() < deadline {
        let (_, t) = get(&client(), &format!("{}/v1/connectors/fwd", node.url)).await;
        n = t["delivered_records"].as_u64().unwrap_or(0);
        if n >= 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 500, "delivered through a SASL login");
    let log = cluster.running.as_ref().expect("running").log.clone();
    let stored: u64 = (0..2)
        .map(|p| {
            let r = log.read("events", p, 0, 10_000, 64 << 20).expect("read");
            r.records.len() as u64
        })
        .sum();
    assert_eq!(
        stored, 500,
        "on the cluster, committed (markers are not records)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_connector_settings_are_checked_and_named() {
    let node = common::InProcessNode::start("").await;
    let c = client();
    for (body, names) in [
        (
            json!({"name": "k", "kind": "kafka_sink", "topics": ["t"]}),
            "bootstrap_servers",
        ),
        (
            json!({"name": "k", "kind": "kafka_sink", "topics": ["t"], "bootstrap_servers": ["kafka"]}),
            "bootstrap_servers",
        ),
        (
            json!({"name": "k", "kind": "kafka_sink", "topics": ["t"], "bootstrap_servers": ["h:9092"],
                   "compression": "snappy"}),
            "compression",
        ),
        (
            json!({"name": "k", "kind": "kafka_sink", "topics": ["t"], "bootstrap_servers": ["h:9092"],
                   "sasl_mechanism": "PLAIN", "username": "u", "password": "plain-text"}),
            "password",
        ),
        (
            json!({"name": "k", "kind": "kafka_sink", "topics": ["t"], "bootstrap_servers": ["h:9092"],
                   "sasl_mechanism": "GSSAPI", "username": "u"}),
            "sasl_mechanism",
        ),
        (
            json!({"name": "k", "kind": "kafka_source", "bootstrap_servers": ["h:9092"]}),
            "kafka_topics",
        ),
        (
            json!({"name": "k", "kind": "kafka_source", "bootstrap_servers": ["h:9092"],
                   "kafka_topics": ["a/b"]}),
            "kafka_topics",
        ),
    ] {
        let (s, v) = post(&c, &format!("{}/v1/connectors", node.url), &body).await;
        assert_eq!(s, 400, "{body} → {v}");
        assert!(
            v.to_string().contains(names),
            "{body} → {v} should name {names}"
        );
    }
    // A cluster nobody listens on: refused with the address, not created.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let (s, v) = post(
        &c,
        &format!("{}/v1/connectors", node.url),
        &json!({"name": "k", "kind": "kafka_source", "bootstrap_servers": [dead.to_string()],
                "kafka_topics": ["t"]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("bootstrap_servers"), "{v}");
}

// ------------------------------------------------- against Apache Kafka

use common::reference::Kafka;

/// kcat's `key:value` lines of values `n=i`.
fn lines(ids: std::ops::Range<u64>) -> impl Iterator<Item = String> {
    ids.map(|i| format!("s{}:n={i}", i % 11))
}

/// The sink's own account of each batch, printed when the test fails.
const DEBUG_SINK: &[(&str, &str)] = &[("TRIBUTARY_LOG", "info,tributary_connectors::kafka=debug")];

/// The test: 100,000 records forwarded into Apache Kafka with the
/// gateway killed -9 five times and the broker restarted once; a
/// read_committed consumer counts each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Apache Kafka 4.4 from Maven Central (scripts/kafka-reference, a JDK) and kcat; scripts/test installs them"]
async fn a_kafka_sink_delivers_exactly_once_into_apache_kafka_through_kills_and_a_broker_restart() {
    let kafka = Kafka::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = common::ChildNode::start(dir.path(), DEBUG_SINK);
    create_topic(&client(), &node.url, "events", 3).await;
    let n = 100_000u64;
    produce(&node.url, "events", 0..n).await;
    create(
        &node.url,
        json!({"name": "fwd", "kind": "kafka_sink", "topics": ["events"],
               "bootstrap_servers": [kafka.bootstrap.clone()], "batch_size": 1000,
               "min_backoff_ms": 50, "max_backoff_ms": 1000, "compression": "lz4"}),
    )
    .await;
    let mut seen = 0;
    for (i, at) in [5_000, 20_000, 40_000, 60_000, 75_000, 90_000]
        .into_iter()
        .enumerate()
    {
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen < at && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            seen = total(&kafka.committed_values("events"));
        }
        if i == 3 {
            // A controlled shutdown while the sink commits: Apache Kafka
            // can skip a transaction's markers then (docs/kafka-compatibility.md,
            // "Found in Apache Kafka itself"), which the sink has to settle.
            kafka.run("restart");
        } else {
            node.kill9();
            node = common::ChildNode::start(dir.path(), DEBUG_SINK);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut values = kafka.committed_values("events");
    while (total(&values) as u64) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        values = kafka.committed_values("events");
    }
    let (_, v) = get(&client(), &format!("{}/v1/connectors/fwd", node.url)).await;
    // On a failure, what the connector says and what Kafka holds
    // uncommitted, to tell a lost transaction from a hanging one.
    if (total(&values) as u64) != n || values.values().any(|c| *c != 1) {
        let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("fwd") || l.contains("kafka"))
            .collect();
        eprintln!("the connector: {v}\nits log lines:\n{}", tail.join("\n"));
        let out = std::process::Command::new("kcat")
            .args([
                "-C",
                "-b",
                &kafka.bootstrap,
                "-t",
                "events",
                "-e",
                "-q",
                "-u",
            ])
            .args([
                "-X",
                "isolation.level=read_uncommitted",
                "-f",
                "%p %o %s\\n",
            ])
            .output()
            .expect("kcat");
        let text = String::from_utf8_lossy(&out.stdout);
        let missing_there: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(2)
                    .is_some_and(|v| !values.contains_key(v.as_bytes()))
            })
            .take(5)
            .collect();
        eprintln!(
            "read_uncommitted: {} records; missing ones there (first 5): {missing_there:?}",
            text.lines().count()
        );
        let doubled: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(2)
                    .is_some_and(|v| values.get(v.as_bytes()).is_some_and(|c| *c > 1))
            })
            .take(4)
            .collect();
        eprintln!("doubled ones there (partition offset value, first 4): {doubled:?}");
        let server = std::fs::read_to_string(kafka.dir().join("server.log")).unwrap_or_default();
        let about: Vec<&str> = server
            .lines()
            .filter(|l| l.contains("tributary-fwd"))
            .collect();
        eprintln!(
            "the broker's log on the sink's transactions:\n{}",
            about.join("\n")
        );
        let positions = std::process::Command::new("kcat")
            .args([
                "-C",
                "-b",
                &kafka.bootstrap,
                "-t",
                "tributary-sink-positions",
            ])
            .args(["-e", "-q", "-u", "-X", "isolation.level=read_uncommitted"])
            .args(["-f", "%o %T %k %s\\n"])
            .output()
            .expect("kcat");
        eprintln!(
            "the positions topic, read_uncommitted:\n{}",
            String::from_utf8_lossy(&positions.stdout)
        );
    }
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    eprintln!(
        "last transactions the sink ended itself where no marker had: {}",
        log.matches("no marker ended it in").count()
    );
    assert_exactly_once(&values, n, "Apache Kafka's copy (read_committed)");
    assert_eq!(v["dead_letters"], 0, "{v}");
}

/// A topic of Apache Kafka copied into the log exactly once while the
/// gateway is killed -9 twice and the broker restarted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Apache Kafka 4.4 from Maven Central (scripts/kafka-reference, a JDK) and kcat; scripts/test installs them"]
async fn a_kafka_source_copies_apache_kafka_exactly_once_through_kills_and_a_broker_restart() {
    let kafka = Kafka::start(&[]);
    kafka.produce("remote", lines(0..30_000));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = common::ChildNode::start(dir.path(), DEBUG_SINK);
    create(
        &node.url,
        json!({"name": "pull", "kind": "kafka_source", "kafka_topics": ["remote"], "topic": "copy",
               "bootstrap_servers": [kafka.bootstrap.clone()], "fetch_max_bytes": 65536,
               "min_backoff_ms": 50, "max_backoff_ms": 1000}),
    )
    .await;
    let url = node.url.clone();
    kill_at(&mut node, dir.path(), &url, "copy", 5_000).await;
    kafka.run("restart");
    kafka.produce("remote", lines(30_000..40_000));
    let url = node.url.clone();
    kill_at(&mut node, dir.path(), &url, "copy", 20_000).await;
    let values = wait_count(&node.url, "copy", 40_000, 180).await;
    assert_exactly_once(&values, 40_000, "the node's copy of Apache Kafka's topic");
}
