//! Kafka through clients we did not write: kcat (Debian; librdkafka),
//! confluent-kafka (PyPI; the librdkafka it bundles), kafka-python (PyPI;
//! pure Python), kafkajs (npm), and mosquitto for MQTT ↔ Kafka. Ignored by
//! plain `cargo test`; `scripts/test` installs the clients and runs them.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::{clients_dir, summary_of, ChildNode};

#[test]
#[ignore = "needs kcat (scripts/test installs it)"]
fn kcat_produces_keys_and_consumes_them_back_also_over_http_and_lists_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let broker = node.kafka.to_string();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let mut p = Command::new("kcat")
            .args(["-b", &broker, "-t", "kc", "-P", "-K:", "-z", codec])
            .stdin(Stdio::piped())
            .spawn()
            .expect("kcat is installed (scripts/test installs it)");
        let lines: String = (0..5)
            .map(|i| format!("{codec}-{i}:v-{codec}-{i}\n"))
            .collect();
        p.stdin
            .take()
            .expect("stdin")
            .write_all(lines.as_bytes())
            .expect("write");
        assert!(
            p.wait().expect("kcat -P").success(),
            "{codec}: kcat -P failed"
        );
    }
    let out = Command::new("kcat")
        .args(["-b", &broker, "-t", "kc", "-C", "-o", "beginning", "-e"])
        .args(["-f", "%k=%s\\n"])
        .output()
        .expect("kcat -C");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8_lossy(&out.stdout);
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        for i in 0..5 {
            assert!(
                got.contains(&format!("{codec}-{i}=v-{codec}-{i}")),
                "missing {codec}-{i} in {got}"
            );
        }
    }
    // Produced over Kafka, read over HTTP: one log.
    let rt = common::runtime();
    let stored = rt.block_on(common::stored_values(&node.url, "kc"));
    assert_eq!(stored.len(), 25);
    assert_eq!(stored.get(&b"v-zstd-4"[..]), Some(&1));

    let meta = Command::new("kcat")
        .args(["-b", &broker, "-L", "-t", "kc"])
        .output()
        .expect("kcat -L");
    let meta = String::from_utf8_lossy(&meta.stdout);
    assert!(meta.contains(&format!("broker 1 at {broker}")), "{meta}");
    assert!(meta.contains("topic \"kc\""), "{meta}");
}

#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn librdkafka_produces_with_every_codec_and_consumes_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let out = Command::new("python3")
        .arg(clients_dir().join("kafka_check.py"))
        .args([&node.kafka.to_string(), "rdk"])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line");
    assert_eq!(summary["produced"], 1000);
    assert_eq!(summary["consumed"], 1000);
    assert_eq!(summary["mismatched"], 0);
    assert_eq!(
        summary["nulls"], 100,
        "tombstones come back null: {summary}"
    );
}

/// Runs the group scenario (three members; one killed, one leaving, one
/// joining late) with one client-side assignor, then checks what the node
/// itself says about the group.
async fn group_of_librdkafka_consumers(assignor: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    // A short first-rebalance delay keeps the scenario quick; the rest is
    // Kafka's defaults.
    let node = ChildNode::start(
        dir.path(),
        &[("TRIBUTARY_GROUPS__INITIAL_REBALANCE_DELAY_MS", "500")],
    );
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/v1/topics", node.url))
        .json(&serde_json::json!({"name": "grp", "partitions": 6}))
        .send()
        .await
        .expect("create topic");
    assert!(created.status().is_success(), "{}", created.status());
    let group = format!("g-{assignor}");
    let args = [
        clients_dir()
            .join("kafka_group_check.py")
            .to_string_lossy()
            .into_owned(),
        node.kafka.to_string(),
        "grp".into(),
        group.clone(),
        assignor.into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(&args)
            .output()
            .expect("python3")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line");
    assert_eq!(summary["produced"], 1800);
    assert_eq!(summary["consumed_distinct"], 1800);
    assert_eq!(summary["committed"], 1800);

    // The node's own view: every member gone, nothing left to read.
    let g: serde_json::Value = http
        .get(format!("{}/v1/groups/{group}", node.url))
        .send()
        .await
        .expect("describe")
        .json()
        .await
        .expect("json");
    assert_eq!(g["state"], "Empty", "{g}");
    assert_eq!(g["lag"], 0, "{g}");
    assert_eq!(g["offsets"].as_array().map(Vec::len), Some(6), "{g}");
    let metrics = common::metrics_text(&node.url, None).await;
    let expired = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tributary_group_sessions_expired_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        expired.is_some_and(|n| n >= 1),
        "the killed member's session ended: {expired:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
async fn a_group_of_librdkafka_consumers_with_the_range_assignor_survives_a_kill_a_leave_and_a_late_join(
) {
    group_of_librdkafka_consumers("range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
async fn a_group_of_librdkafka_consumers_with_the_cooperative_sticky_assignor_survives_a_kill_a_leave_and_a_late_join(
) {
    group_of_librdkafka_consumers("cooperative-sticky").await;
}

#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn an_idempotent_librdkafka_producer_across_repeated_kill_9_stores_each_acked_record_once_in_order()
{
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    // The producer reconnects to the same address after every restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("TRIBUTARY_KAFKA__LISTEN", listen.as_str())];
    let mut node = ChildNode::start(dir.path(), &env);
    rt.block_on(async {
        let r = common::client()
            .post(format!("{}/v1/topics", node.url))
            .json(&serde_json::json!({"name": "idem", "partitions": 3}))
            .send()
            .await
            .expect("create topic");
        assert!(r.status().is_success(), "{}", r.status());
    });
    let producer = Command::new("python3")
        .arg(clients_dir().join("kafka_idempotent.py"))
        .args([&listen, "idem", "3"])
        .stdout(Stdio::piped())
        // librdkafka logs every lost connection: kept for a failure message.
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut rng = fastrand::Rng::with_seed(23);
    let cycles = common::crash::cycles().div_ceil(2);
    for _ in 0..cycles {
        std::thread::sleep(std::time::Duration::from_millis(rng.u64(400..1500)));
        node.kill9();
        std::thread::sleep(std::time::Duration::from_millis(rng.u64(20..400)));
        node = ChildNode::start(dir.path(), &env);
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let stopped = Command::new("kill")
        .args(["-TERM", &producer.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let out = producer.wait_with_output().expect("producer output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n");
    assert!(summary["fatal"].is_null(), "{}\n{tail}", summary["fatal"]);
    assert_eq!(summary["errors"], serde_json::json!([]), "{stdout}");
    let acked: Vec<(u64, String)> = summary["acked"]
        .as_array()
        .expect("acked")
        .iter()
        .map(|a| {
            (
                a[0].as_u64().expect("partition"),
                a[1].as_str().expect("value").to_owned(),
            )
        })
        .collect();
    assert!(acked.len() > 1000, "too few acknowledged: {}", acked.len());

    // Per partition: every acknowledged value once, and all stored values in
    // the order they were sent (each value was sent once, so no repeats).
    let c = common::client();
    for partition in 0..3u32 {
        let stored: Vec<String> = rt
            .block_on(common::read_all(&c, &node.url, "idem", partition))
            .into_iter()
            .map(|(_, _, v)| String::from_utf8(v).expect("utf-8"))
            .collect();
        let numbers: Vec<u64> = stored
            .iter()
            .map(|v| {
                let (p, n) = v.split_once('-').expect("p<partition>-<n>");
                assert_eq!(p, format!("p{partition}"), "{v} in partition {partition}");
                n.parse().expect("n")
            })
            .collect();
        let in_order = numbers.windows(2).all(|w| w[0] < w[1]);
        assert!(
            in_order,
            "partition {partition}: stored twice or out of order: {:?}",
            numbers
                .windows(2)
                .find(|w| w[0] >= w[1])
                .expect("a pair out of order")
        );
        let have: std::collections::HashSet<&str> = stored.iter().map(String::as_str).collect();
        let missing: Vec<&str> = acked
            .iter()
            .filter(|(p, _)| *p == u64::from(partition))
            .map(|(_, v)| v.as_str())
            .filter(|v| !have.contains(v))
            .collect();
        assert!(
            missing.is_empty(),
            "partition {partition}: {} acknowledged records missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kcat (scripts/test installs it)"]
async fn kcat_logs_in_with_sasl_plain_as_a_device_and_its_acls_apply() {
    const ADMIN: &str = "kcat-admin-token-0123456789abcdef";
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(
        dir.path(),
        &[
            ("TRIBUTARY_AUTH__MODE", "devices"),
            ("TRIBUTARY_AUTH__ADMIN_TOKEN", ADMIN),
        ],
    );
    let token = common::add_device(&node.url, ADMIN, "gw-1", &["site/#"], &["site/#"]).await;
    let broker = node.kafka.to_string();
    let kcat = move |topic: &str, password: &str, input: Option<&str>| {
        let mut cmd = Command::new("kcat");
        cmd.args(["-b", &broker, "-t", topic])
            .args(["-X", "security.protocol=SASL_PLAINTEXT"])
            .args(["-X", "sasl.mechanisms=PLAIN"])
            .args(["-X", "sasl.username=gw-1"])
            .args(["-X", &format!("sasl.password={password}")])
            .args(["-m", "10"]);
        match input {
            Some(lines) => {
                let mut p = cmd
                    .args(["-P", "-X", "message.timeout.ms=5000"])
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("kcat");
                p.stdin
                    .take()
                    .expect("stdin")
                    .write_all(lines.as_bytes())
                    .expect("write");
                p.wait_with_output().expect("kcat -P")
            }
            None => cmd
                .args(["-C", "-o", "beginning", "-e", "-f", "%s\\n"])
                .output()
                .expect("kcat -C"),
        }
    };
    let (k, t) = (kcat.clone(), token.clone());
    let produced = tokio::task::spawn_blocking(move || k("site", &t, Some("a\nb\n")))
        .await
        .expect("join");
    assert!(produced.status.success(), "{produced:?}");
    let (k, t) = (kcat.clone(), token.clone());
    let read = tokio::task::spawn_blocking(move || k("site", &t, None))
        .await
        .expect("join");
    assert_eq!(String::from_utf8_lossy(&read.stdout), "a\nb\n", "{read:?}");
    // A wrong password is refused; a topic outside the ACL is refused.
    let k = kcat.clone();
    let wrong = tokio::task::spawn_blocking(move || k("site", "wrong", Some("c\n")))
        .await
        .expect("join");
    assert!(!wrong.status.success(), "{wrong:?}");
    let (k, t) = (kcat, token);
    let other = tokio::task::spawn_blocking(move || k("office", &t, Some("d\n")))
        .await
        .expect("join");
    assert!(!other.status.success(), "{other:?}");
}

/// Runs a client script (`python3` or `node`) against a fresh node whose
/// topic `name` has 3 partitions; asserts it succeeded and returns its
/// summary line.
async fn client_script(program: &str, script: &str, name: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(
        dir.path(),
        &[("TRIBUTARY_GROUPS__INITIAL_REBALANCE_DELAY_MS", "300")],
    );
    let r = common::client()
        .post(format!("{}/v1/topics", node.url))
        .json(&serde_json::json!({"name": name, "partitions": 3}))
        .send()
        .await
        .expect("create topic");
    assert!(r.status().is_success(), "{}", r.status());
    let (program, script, broker, name) = (
        program.to_owned(),
        clients_dir().join(script),
        node.kafka.to_string(),
        name.to_owned(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .arg(script)
            .args([&broker, &name, &format!("{name}-group")])
            .output()
            .expect("the client runs")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node and kafkajs (scripts/test installs them)"]
async fn kafkajs_produces_and_a_group_of_two_consumes_and_commits_everything() {
    let s = client_script("node", "kafkajs_check.js", "kjs").await;
    assert_eq!(s["produced"], 400, "{s}");
    assert_eq!(s["consumed"], 400, "{s}");
    assert_eq!(s["committed"], s["ends"], "{s}");
    assert_eq!(s["ends"], 400, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kafka-python (scripts/test installs it)"]
async fn kafka_python_produces_and_a_group_consumer_reads_and_commits_everything() {
    let s = client_script("python3", "kafka_python_check.py", "kpy").await;
    assert_eq!(s["produced"], 400, "{s}");
    assert_eq!(s["consumed"], 400, "{s}");
    assert_eq!(s["committed"], 400, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
async fn librdkafkas_admin_client_creates_describes_changes_grows_and_deletes_a_topic() {
    let s = client_script("python3", "kafka_admin_check.py", "rdk").await;
    assert_eq!(s["created"], 3, "{s}");
    assert_eq!(s["again"], "TOPIC_ALREADY_EXISTS", "{s}");
    assert_eq!(s["retention_ms"], "3600000", "{s}");
    assert_eq!(s["max_message_bytes"], "4096", "{s}");
    assert_eq!(s["retention_bytes"], "1048576", "{s}");
    assert_eq!(s["max_message_bytes_after"], "1048576", "{s}");
    assert_eq!(s["bad_policy"], "INVALID_CONFIG", "{s}");
    assert_eq!(s["cleanup_policy"], "compact,delete", "{s}");
    assert_eq!(s["dirty_ratio"], "0.2", "{s}");
    assert_eq!(s["partitions"], 5, "{s}");
    assert_eq!(s["read_back"], "in the fifth", "{s}");
    assert_eq!(s["listed_after_delete"], false, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node and kafkajs (scripts/test installs them)"]
async fn kafkajs_admin_creates_describes_changes_grows_and_deletes_a_topic() {
    let s = client_script("node", "kafkajs_admin.js", "kjs").await;
    assert_eq!(s["created"], true, "{s}");
    assert_eq!(
        s["created_again"], false,
        "an existing topic is not created: {s}"
    );
    assert_eq!(s["retention_ms"], "60000", "{s}");
    assert_eq!(s["retention_bytes"], "2097152", "{s}");
    // AlterConfigs replaces the whole set: what it did not name is reset.
    assert_eq!(s["retention_ms_after"], "-1", "{s}");
    assert_eq!(s["partitions"], 4, "{s}");
    assert_eq!(s["listed_after_delete"], false, "{s}");
}

#[test]
#[ignore = "needs mosquitto-clients and kcat (scripts/test installs them)"]
fn records_cross_between_mqtt_and_kafka_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let broker = node.kafka.to_string();
    let mqtt_port = node.mqtt.port().to_string();
    // MQTT → Kafka: a QoS 1 publish is read by a Kafka consumer, topic
    // levels as the key.
    let published = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port, "-q", "1"])
        .args(["-t", "plant/line1/temp", "-m", "21.5 from mqtt"])
        .status()
        .expect("mosquitto_pub");
    assert!(published.success());
    let read = Command::new("kcat")
        .args(["-b", &broker, "-t", "plant", "-C", "-o", "beginning", "-e"])
        .args(["-f", "%k=%s\\n"])
        .output()
        .expect("kcat -C");
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        "plant/line1/temp=21.5 from mqtt\n"
    );
    // Kafka → MQTT: a subscriber gets what kcat produces, the key as the
    // topic's levels.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port, "-q", "1"])
        .args(["-t", "plant/line2/#", "-C", "1", "-v", "-W", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut p = Command::new("kcat")
        .args(["-b", &broker, "-t", "plant", "-P", "-K:"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat -P");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(b"line2/pressure:3.2 from kafka\n")
        .expect("write");
    assert!(p.wait().expect("kcat -P").success());
    let got = sub.wait_with_output().expect("mosquitto_sub");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "plant/line2/pressure 3.2 from kafka\n"
    );
}

/// Runs `kafka_compaction_check.py` (confluent-kafka) with `args`; asserts it
/// succeeded and returns its summary line.
fn compaction_check(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(clients_dir().join("kafka_compaction_check.py"))
        .args(args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // librdkafka logs every lost connection: only the end is of interest.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
    assert!(
        out.status.success(),
        "kafka_compaction_check.py {args:?}:\n{stdout}\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line")
}

/// A topic's records read over HTTP: key (`None`: keyless) → (partition,
/// offset, value (`None`: a tombstone)) in offset order.
type RecordsByKey = std::collections::BTreeMap<Option<String>, Vec<(u64, u64, Option<String>)>>;

/// Every record of `topic` over HTTP (`format=binary`), each partition from
/// its earliest offset to its end, stepping over the offsets compaction
/// removed: a page may come back empty with `next_offset` past a gap, but a
/// `next_offset` that does not move before the end is a reader stuck.
async fn http_records_by_key(base: &str, topic: &str, partitions: u64) -> RecordsByKey {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = |v: &serde_json::Value| {
        v.as_str().map(|s| {
            String::from_utf8(b64.decode(s).expect("base64")).expect("utf-8 from the script")
        })
    };
    let c = common::client();
    let mut out = RecordsByKey::new();
    for partition in 0..partitions {
        let mut offset: Option<u64> = None;
        for page_no in 0.. {
            assert!(
                page_no < 100_000,
                "{topic}/{partition}: no end after {page_no} pages"
            );
            let at = offset.map_or_else(|| "earliest".to_owned(), |o| o.to_string());
            let (s, page) = common::get(
                &c,
                &format!("{base}/v1/topics/{topic}/partitions/{partition}/records?offset={at}&limit=1000&format=binary"),
            )
            .await;
            assert_eq!(s, 200, "fetch {topic}/{partition}@{at}: {page}");
            for r in page["records"].as_array().expect("records array") {
                out.entry(text(&r["key"])).or_default().push((
                    r["partition"].as_u64().expect("partition"),
                    r["offset"].as_u64().expect("offset"),
                    text(&r["value"]),
                ));
            }
            let next = page["next_offset"].as_u64().expect("next_offset");
            let end = page["end_offset"].as_u64().expect("end_offset");
            if next >= end {
                break;
            }
            assert!(
                offset.is_none_or(|o| next > o),
                "{topic}/{partition}: a fetch at {at} answers next_offset {next} (end {end}): \
                 an HTTP reader does not get past the gap"
            );
            offset = Some(next);
        }
    }
    out
}

/// A key's final acknowledged write as the script's state file has it:
/// (partition, offset, value), the value `None` for a tombstone.
/// A `verify` summary that found exactly the latest record of each live
/// key at its offset, no deleted key, nothing twice, nothing unexpected.
fn assert_verified(s: &serde_json::Value) {
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["latest_ok"], true, "{s}");
    assert_eq!(s["offsets_ok"], true, "{s}");
    assert_eq!(s["deleted_seen"], 0, "{s}");
    assert_eq!(s["duplicates"], 0, "{s}");
    assert_eq!(s["unexpected"], 0, "{s}");
}

/// A key's final write: (partition, offset, value; `None` for a tombstone).
type FinalWrite = (u64, u64, Option<String>);

fn final_writes(state: &serde_json::Value) -> Vec<(String, FinalWrite)> {
    state["keys"]
        .as_object()
        .expect("keys in the state file")
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                (
                    e["partition"].as_u64().expect("partition"),
                    e["offset"].as_u64().expect("offset"),
                    e["value"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

/// Fully compacted: every live key is exactly its final write (that value,
/// at the offset it was acknowledged with), a deleted key is not there at
/// all, and there is no other record.
fn assert_compacted(via: &str, state: &serde_json::Value, got: &RecordsByKey) {
    let finals = final_writes(state);
    let mut wrong = Vec::new();
    for (k, last) in &finals {
        let have = got.get(&Some(k.clone())).map_or(&[][..], Vec::as_slice);
        let want = if last.2.is_some() {
            vec![last.clone()]
        } else {
            Vec::new()
        };
        if have != want.as_slice() {
            wrong.push(format!(
                "{k}: want {want:?}, have {:?}",
                &have[have.len().saturating_sub(3)..]
            ));
        }
    }
    let known: std::collections::HashSet<&str> = finals.iter().map(|(k, _)| k.as_str()).collect();
    for (k, records) in got {
        if !k.as_deref().is_some_and(|k| known.contains(k)) {
            wrong.push(format!("unexpected key {k:?}: {} records", records.len()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{via}: {} keys differ from their final acknowledged write, e.g.\n{}",
        wrong.len(),
        wrong[..wrong.len().min(8)].join("\n")
    );
}

/// What holds at every moment, mid-pass and right after a crash alike: the
/// newest record of each key is its final acknowledged write (older ones may
/// wait for a pass), and a key whose final write was a tombstone has either
/// that tombstone newest or nothing left. Reads racing a pass are fine as
/// long as one read takes less than `delete.retention.ms`.
fn assert_latest_kept(via: &str, state: &serde_json::Value, got: &RecordsByKey) {
    let finals = final_writes(state);
    let mut wrong = Vec::new();
    for (k, last) in &finals {
        let have = got.get(&Some(k.clone())).map_or(&[][..], Vec::as_slice);
        let fine = match have.last() {
            None => last.2.is_none(),
            Some(newest) => newest == last,
        };
        if !fine {
            wrong.push(format!(
                "{k}: final {last:?}, newest read {:?}",
                have.last()
            ));
        }
    }
    let known: std::collections::HashSet<&str> = finals.iter().map(|(k, _)| k.as_str()).collect();
    for (k, records) in got {
        if !k.as_deref().is_some_and(|k| known.contains(k)) {
            wrong.push(format!("unexpected key {k:?}: {} records", records.len()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{via}: {} keys lost their final write or came back from a tombstone, e.g.\n{}",
        wrong.len(),
        wrong[..wrong.len().min(8)].join("\n")
    );
}

fn read_state(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("state file")).expect("state JSON")
}

#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn librdkafka_reads_a_compacted_topic_as_the_latest_value_of_every_live_key() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let statefile = scratch.path().join("state.json");
    let statefile = statefile.to_str().expect("utf-8 path");
    let node = ChildNode::start(
        dir.path(),
        &[("TRIBUTARY_STORAGE__RETENTION_CHECK_MS", "100")],
    );
    let broker = node.kafka.to_string();
    let mqtt = node.mqtt.to_string();
    let common_args = ["--partitions", "3", "--delete-retention-ms", "3000"];
    let run = |mode: &str, extra: &[&str]| {
        let mut args = vec![broker.as_str(), "cmp", mode, statefile];
        args.extend_from_slice(&common_args);
        args.extend_from_slice(extra);
        compaction_check(&args)
    };

    // Created over Kafka with Kafka's names, and described back.
    let s = run("create", &[]);
    let configs = &s["configs"];
    assert_eq!(configs["cleanup.policy"], "compact", "{s}");
    assert_eq!(configs["delete.retention.ms"], "3000", "{s}");
    assert_eq!(configs["min.compaction.lag.ms"], "0", "{s}");
    assert_eq!(configs["max.compaction.lag.ms"], "100", "{s}");
    assert_eq!(configs["min.cleanable.dirty.ratio"], "0.01", "{s}");

    // A persistent MQTT session subscribed before anything is written, then
    // away: when it comes back it reads the topic from where it left, as
    // compaction has left it.
    let s = run(
        "mqtt-subscribe",
        &["--mqtt", &mqtt, "--client-id", "cmp-session"],
    );
    assert_eq!(s["granted"], serde_json::json!([1]), "{s}");

    let s = run("produce", &["--records", "100000", "--keys", "1000"]);
    assert_eq!(s["produced"], 100_003, "{s}");
    assert_eq!(s["keyless_error"], "INVALID_RECORD", "{s}");
    assert_eq!(s["order_ok"], true, "{s}");
    assert_eq!(s["live_keys"], 900, "{s}");
    assert_eq!(s["deleted_keys"], 100, "{s}");

    let s = run("verify", &["--deadline-s", "60"]);
    assert_verified(&s);
    assert_eq!(s["read"], 903, "900 live keys and 3 filler records: {s}");

    // Over HTTP: the same records at the same offsets.
    let state = read_state(std::path::Path::new(statefile));
    let got = rt.block_on(http_records_by_key(&node.url, "cmp", 3));
    assert_compacted("HTTP", &state, &got);

    // The topic as HTTP describes it, and what its cleaner did: every record
    // acknowledged and not read back was removed by a pass (no restart, so
    // the counters cover the topic's whole life).
    let (status, t) = rt.block_on(common::get(
        &common::client(),
        &format!("{}/v1/topics/cmp", node.url),
    ));
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["cleanup_policy"], "compact", "{t}");
    assert_eq!(t["delete_retention_ms"], 3000, "{t}");
    assert_eq!(t["min_compaction_lag_ms"], 0, "{t}");
    assert_eq!(t["max_compaction_lag_ms"], 100, "{t}");
    assert_eq!(t["min_cleanable_dirty_ratio"], 0.01, "{t}");
    let compaction = &t["compaction"];
    assert!(compaction["passes"].as_u64().is_some_and(|n| n >= 1), "{t}");
    assert_eq!(
        compaction["records_removed"].as_u64(),
        Some(100_003 - 903),
        "{t}"
    );
    assert!(
        compaction["bytes_reclaimed"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{t}"
    );
    assert!(
        compaction["dirty_ratio"]
            .as_f64()
            .is_some_and(|r| (0.0..=1.0).contains(&r)),
        "{t}"
    );

    // Over MQTT: the session resumes at offset 0 of a compacted log and gets
    // one message per live key (topic `cmp/<key>`), its latest value.
    let s = run(
        "mqtt-verify",
        &[
            "--mqtt",
            &mqtt,
            "--client-id",
            "cmp-session",
            "--deadline-s",
            "60",
        ],
    );
    assert_eq!(s["session_present"], true, "{s}");
    assert_eq!(s["received"], 903, "{s}");
    assert_eq!(s["missing"], 0, "{s}");
    assert_eq!(s["duplicates"], 0, "{s}");
    assert_eq!(s["stale"], 0, "{s}");
    assert_eq!(s["deleted_seen"], 0, "{s}");
    assert_eq!(s["unexpected"], 0, "{s}");
}

#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn a_compacted_topic_survives_kill_9_during_cleaning_passes() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let statefile = scratch.path().join("state.json");
    let statefile_str = statefile.to_str().expect("utf-8 path");
    let env = [("TRIBUTARY_STORAGE__RETENTION_CHECK_MS", "100")];
    // One partition, larger values: one long pass to kill. Tombstones stay
    // 10 s after the pass that first cleaned them, longer than a full read,
    // so the reads between kills cannot race their removal.
    let run = |kafka: &std::net::SocketAddr, mode: &str, extra: &[&str]| {
        let broker = kafka.to_string();
        let mut args = vec![broker.as_str(), "cmpkill", mode, statefile_str];
        args.extend_from_slice(&["--partitions", "1", "--delete-retention-ms", "10000"]);
        args.extend_from_slice(&["--value-bytes", "200"]);
        args.extend_from_slice(extra);
        compaction_check(&args)
    };
    let mut rng = fastrand::Rng::with_seed(29);
    let ms = |rng: &mut fastrand::Rng, r: std::ops::Range<u64>| {
        std::time::Duration::from_millis(rng.u64(r))
    };

    // Round 0: 200,000 updates over 1,000 keys. Passes run while they come
    // in (max.compaction.lag.ms 100); the first kill lands right after.
    let mut node = ChildNode::start(dir.path(), &env);
    let s = run(
        &node.kafka,
        "produce",
        &["--records", "200000", "--keys", "1000"],
    );
    assert_eq!(s["produced"], 200_001, "{s}");
    assert_eq!(s["keyless_error"], "INVALID_RECORD", "{s}");
    std::thread::sleep(ms(&mut rng, 0..300));
    node.kill9();

    // The restarted node resumes cleaning what the cut pass left: killed
    // again at once, without a read in between to keep the timing.
    node = ChildNode::start(dir.path(), &env);
    std::thread::sleep(ms(&mut rng, 50..500));
    node.kill9();

    // What two kills left, read while the third node cleans; then round 1
    // deletes other keys and brings the deleted ones back, and the third
    // kill lands in its passes.
    node = ChildNode::start(dir.path(), &env);
    let state = read_state(&statefile);
    let got = rt.block_on(http_records_by_key(&node.url, "cmpkill", 1));
    assert_latest_kept("HTTP after two kills", &state, &got);
    let s = run(
        &node.kafka,
        "produce",
        &["--records", "100000", "--keys", "1000", "--round", "1"],
    );
    assert_eq!(s["produced"], 100_001, "{s}");
    assert_eq!(s["order_ok"], true, "{s}");
    std::thread::sleep(ms(&mut rng, 0..300));
    node.kill9();

    node = ChildNode::start(dir.path(), &env);
    let state = read_state(&statefile);
    let got = rt.block_on(http_records_by_key(&node.url, "cmpkill", 1));
    assert_latest_kept("HTTP after three kills", &state, &got);

    // Then, cleaned to the end: over Kafka and over HTTP, exactly the final
    // write of each live key, nothing of a deleted one.
    let s = run(&node.kafka, "verify", &["--deadline-s", "120"]);
    assert_verified(&s);
    assert_eq!(
        s["live_keys"], 901,
        "900 keys and the first round's filler: {s}"
    );
    assert_eq!(s["read"], 902, "901 live keys and the last filler: {s}");
    let state = read_state(&statefile);
    let got = rt.block_on(http_records_by_key(&node.url, "cmpkill", 1));
    assert_compacted("HTTP after three kills", &state, &got);
    let (status, t) = rt.block_on(common::get(
        &common::client(),
        &format!("{}/v1/topics/cmpkill", node.url),
    ));
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["cleanup_policy"], "compact", "the policy survives: {t}");
}

/// `kafka_txn_check.py` (confluent-kafka): the transactional scenarios.
fn txn_script() -> std::path::PathBuf {
    clients_dir().join("kafka_txn_check.py")
}

/// The `basic` transactional scenario as a client reports it (Python and
/// Java alike): 10 committed transactions of 30 records, 5 aborted, a zombie
/// fenced with one of `fenced`, a transaction the node aborted on its
/// timeout; read_committed sees exactly the committed records, once each and
/// in order, read_uncommitted every record written, neither a control record.
fn assert_transactions_seen_right(s: &serde_json::Value, fenced: &[&str]) {
    // Committed: 10 × 30, the fencer's 30 and the 30 after the hung one.
    assert_eq!(s["rc_expected"], 360, "{s}");
    assert_eq!(s["rc_seen"], 360, "read_committed: {s}");
    // Also the 5 aborted, the zombie's and the hung transaction's.
    assert_eq!(s["ru_expected"], 570, "{s}");
    assert_eq!(s["ru_seen"], 570, "read_uncommitted: {s}");
    assert_eq!(s["ru_aborted_seen"], 210, "{s}");
    for zero in [
        "rc_missing",
        "rc_duplicates",
        "rc_unexpected",
        "rc_aborted_seen",
        "ru_missing",
        "ru_duplicates",
        "ru_unexpected",
        "zombie_late_stored",
        "hung_after_seen_early",
        "hung_seen_read_committed",
    ] {
        assert_eq!(s[zero], 0, "{zero}: {s}");
    }
    for yes in [
        "rc_order_ok",
        "ru_order_ok",
        "rc_to_end",
        "ru_to_end",
        "hung_blocked",
    ] {
        assert_eq!(s[yes], true, "{yes}: {s}");
    }
    assert_eq!(s["zombie_committed"], false, "{s}");
    let name = s["fenced_error"].as_str().unwrap_or_default();
    assert!(
        fenced.contains(&name),
        "the zombie's commit fails with one of {fenced:?}: {s}"
    );
    assert!(
        s["hung_released_s"].as_f64().is_some(),
        "the node never aborted the hung transaction (transaction.timeout.ms): {s}"
    );
    assert_eq!(s["delivery_errors"], serde_json::json!([]), "{s}");
    assert_eq!(s["ok"], true, "{s}");
}

/// The values of one partition over HTTP (`format=binary`), in offset order.
/// A page may come back empty with `next_offset` moved past what a reader
/// must not see (aborted records, control records); a `next_offset` that
/// does not move before the end is a reader stuck.
async fn http_values(base: &str, topic: &str, partition: u64) -> Vec<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let c = common::client();
    let mut values = Vec::new();
    let mut offset = 0u64;
    for page_no in 0.. {
        assert!(
            page_no < 10_000,
            "{topic}/{partition}: no end after {page_no} pages"
        );
        let (s, page) = common::get(
            &c,
            &format!("{base}/v1/topics/{topic}/partitions/{partition}/records?offset={offset}&limit=1000&format=binary"),
        )
        .await;
        assert_eq!(s, 200, "fetch {topic}/{partition}@{offset}: {page}");
        for r in page["records"].as_array().expect("records array") {
            values.push(r["value"].as_str().map_or_else(
                || "<null>".to_owned(),
                |v| String::from_utf8_lossy(&b64.decode(v).expect("base64")).into_owned(),
            ));
        }
        let next = page["next_offset"].as_u64().expect("next_offset");
        let end = page["end_offset"].as_u64().expect("end_offset");
        if next >= end {
            break;
        }
        assert!(
            next > offset,
            "{topic}/{partition}: a fetch at {offset} answers next_offset {next} (end {end})"
        );
        offset = next;
    }
    values
}

/// `have` is `want`, value for value, in order: otherwise how many are
/// missing, extra or repeated, and the first difference.
fn assert_same_values(via: &str, have: &[String], want: &[String]) {
    if have == want {
        return;
    }
    let want_set: std::collections::HashSet<&String> = want.iter().collect();
    let have_set: std::collections::HashSet<&String> = have.iter().collect();
    let extra: Vec<&String> = have.iter().filter(|v| !want_set.contains(v)).collect();
    let missing = want.iter().filter(|v| !have_set.contains(v)).count();
    let first = have
        .iter()
        .zip(want)
        .position(|(h, w)| h != w)
        .unwrap_or(have.len().min(want.len()));
    panic!(
        "{via}: {} values, {} wanted; {missing} missing, {} not wanted (e.g. {:?}), {} repeated; \
         first difference at {first}: have {:?}, want {:?}",
        have.len(),
        want.len(),
        extra.len(),
        &extra[..extra.len().min(3)],
        have.len() - have_set.len(),
        have.get(first),
        want.get(first),
    );
}

/// Over HTTP, each partition of `topic` holds the committed values of the
/// summary's `committed_by_partition`, in order, and nothing else: no
/// aborted record, no control record.
async fn assert_http_reads_committed_only(base: &str, topic: &str, s: &serde_json::Value) {
    for partition in 0..3u64 {
        let want: Vec<String> = s["committed_by_partition"][partition.to_string()]
            .as_array()
            .expect("committed_by_partition")
            .iter()
            .map(|v| v.as_str().expect("a value").to_owned())
            .collect();
        let have = http_values(base, topic, partition).await;
        assert_same_values(&format!("{topic}/{partition} over HTTP"), &have, &want);
    }
}

#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn librdkafka_transactions_commit_abort_fence_a_zombie_and_time_out_and_http_reads_committed_records_only(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let out = Command::new("python3")
        .arg(txn_script())
        .args(["basic", &node.kafka.to_string(), "rtx"])
        .output()
        .expect("python3");
    let s = summary_of("kafka_txn_check.py basic", &out);
    assert_transactions_seen_right(
        &s,
        &["_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH"],
    );
    common::runtime().block_on(assert_http_reads_committed_only(&node.url, "rtx", &s));
}

/// Compiles `tests/clients/java/TxnCheck.java` against the jars
/// `scripts/test` downloads into `target/java-clients`; returns the class
/// directory (kept while it lives) and the class path to run it with.
fn java_txn_check() -> (tempfile::TempDir, String) {
    let jars = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/java-clients");
    let mut cp: Vec<String> = std::fs::read_dir(&jars)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/test downloads kafka-clients there)",
                jars.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jar"))
        .map(|p| p.display().to_string())
        .collect();
    cp.sort();
    assert!(
        cp.iter().any(|j| j.contains("kafka-clients-")),
        "no kafka-clients jar in {} (scripts/test downloads it)",
        jars.display()
    );
    let classes = tempfile::tempdir().expect("tempdir");
    let out = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .arg("-cp")
        .arg(cp.join(":"))
        .arg(clients_dir().join("java").join("TxnCheck.java"))
        .output()
        .expect("javac (scripts/test installs a JDK)");
    assert!(
        out.status.success(),
        "javac TxnCheck.java:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.push(classes.path().display().to_string());
    (classes, cp.join(":"))
}

#[test]
#[ignore = "needs a JDK and kafka-clients (scripts/test installs them)"]
fn the_java_client_commits_aborts_is_fenced_describes_and_lists_transactions_and_http_reads_committed_records_only(
) {
    let (_classes, cp) = java_txn_check();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let out = Command::new("java")
        .args([
            "-cp",
            &cp,
            "TxnCheck",
            "basic",
            &node.kafka.to_string(),
            "jtx",
        ])
        .output()
        .expect("java (scripts/test installs a JDK)");
    let s = summary_of("TxnCheck basic", &out);
    assert_transactions_seen_right(
        &s,
        &["ProducerFencedException", "InvalidProducerEpochException"],
    );
    // DescribeTransactions: the hung one while open and once aborted, the
    // main one after its last commit (its epoch bumped by the fencing).
    assert_eq!(s["describe_hung_open_state"], "Ongoing", "{s}");
    assert_eq!(s["describe_hung_open_partitions"], 3, "{s}");
    assert_eq!(s["describe_hung_open_timeout_ms"], 6000, "{s}");
    assert_eq!(s["describe_hung_final_state"], "CompleteAbort", "{s}");
    assert_eq!(s["describe_txn_state"], "CompleteCommit", "{s}");
    assert!(
        s["describe_txn_epoch"].as_i64().is_some_and(|e| e >= 1),
        "{s}"
    );
    // ListTransactions: both transactional ids.
    assert_eq!(s["listed"]["jtx-txn"], "CompleteCommit", "{s}");
    assert_eq!(s["listed"]["jtx-hung"], "CompleteAbort", "{s}");
    common::runtime().block_on(assert_http_reads_committed_only(&node.url, "jtx", &s));
}

/// A child process killed (SIGKILL) when dropped: a failed assertion leaves
/// no client running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn a_librdkafka_consume_transform_produce_loop_across_repeated_kill_9_turns_each_input_into_exactly_one_output(
) {
    const CHUNK: u64 = 3000;
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let statefile = scratch.path().join("ctp-state.json");
    // The clients reconnect to the same address after every restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("TRIBUTARY_KAFKA__LISTEN", listen.as_str()),
        ("TRIBUTARY_GROUPS__INITIAL_REBALANCE_DELAY_MS", "300"),
    ];
    let mut node = ChildNode::start(dir.path(), &env);
    rt.block_on(async {
        let c = common::client();
        common::create_topic(&c, &node.url, "ctpin", 3).await;
        common::create_topic(&c, &node.url, "ctpout", 3).await;
    });
    let script = txn_script();
    // More input while the loop runs: CHUNK records from `from` on.
    let seed = |from: u64| {
        let out = Command::new("python3")
            .arg(script.as_path())
            .args(["ctp-seed", &listen, "ctpin", "3"])
            .args([from.to_string(), CHUNK.to_string()])
            .output()
            .expect("python3");
        let s = summary_of("kafka_txn_check.py ctp-seed", &out);
        assert_eq!(s["seeded"], CHUNK, "{s}");
    };
    // The loop in the background, its output in files (a full pipe would
    // block it): ctp-<run>.out, ctp-<run>.err.
    let log = |run: usize, ext: &str| scratch.path().join(format!("ctp-{run}.{ext}"));
    let spawn_loop = |run: usize| {
        let file = |ext| std::fs::File::create(log(run, ext)).expect("log file");
        Command::new("python3")
            .arg(script.as_path())
            .args(["ctp", &listen, "ctpin", "ctpout", "ctp-group"])
            .arg(statefile.as_path())
            .args(["--follow", "--deadline-s", "1800"])
            .stdout(file("out"))
            .stderr(file("err"))
            .spawn()
            .map(KillOnDrop)
            .expect("python3")
    };
    let output_of = |run: usize| {
        let out = std::fs::read_to_string(log(run, "out")).unwrap_or_default();
        let err = std::fs::read_to_string(log(run, "err")).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        format!(
            "{out}\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };

    seed(0);
    let mut seeded = CHUNK;
    let mut run = 0;
    let mut ctp = spawn_loop(run);
    let mut rng = fastrand::Rng::with_seed(31);
    let ms = |rng: &mut fastrand::Rng, r: std::ops::Range<u64>| {
        std::time::Duration::from_millis(rng.u64(r))
    };
    let cycles = common::crash::cycles().div_ceil(2);
    for cycle in 0..cycles {
        seed(seeded);
        seeded += CHUNK;
        std::thread::sleep(ms(&mut rng, 200..1500));
        node.kill9();
        // Every third cycle the loop dies with the node: the next one
        // resumes from the group's committed offsets, and its
        // init_transactions ends the transaction the dead one left open.
        let kill_loop = cycle % 3 == 2;
        if kill_loop {
            let _ = ctp.0.kill();
            let _ = ctp.0.wait();
        }
        std::thread::sleep(ms(&mut rng, 20..400));
        node = ChildNode::start(dir.path(), &env);
        if kill_loop {
            run += 1;
            ctp = spawn_loop(run);
        } else if let Some(status) = ctp.0.try_wait().expect("try_wait") {
            panic!(
                "the loop ended by itself ({status}) in cycle {cycle}:\n{}",
                output_of(run)
            );
        }
    }
    // Some work on a node left up, then the loop stops between transactions.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let stopped = Command::new("kill")
        .args(["-TERM", &ctp.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let waited = std::time::Instant::now();
    let status = loop {
        if let Some(status) = ctp.0.try_wait().expect("try_wait") {
            break status;
        }
        if waited.elapsed() > std::time::Duration::from_secs(120) {
            panic!("the loop did not stop on SIGTERM:\n{}", output_of(run));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status}:\n{}", output_of(run));

    // The rest of the input, by a loop that ends once the group's committed
    // offsets are at the input's ends.
    let out = Command::new("python3")
        .arg(script.as_path())
        .args(["ctp", &listen, "ctpin", "ctpout", "ctp-group"])
        .arg(statefile.as_path())
        .args(["--deadline-s", "300"])
        .output()
        .expect("python3");
    let s = summary_of("kafka_txn_check.py ctp (the rest)", &out);
    assert_eq!(s["done"], true, "{s}");
    eprintln!(
        "consume-transform-produce across {cycles} kill -9: {}",
        s["state"]
    );

    // Over Kafka (read_committed): each input's result once, in order.
    let v = common::assert_ctp_verified(&listen, seeded);
    eprintln!(
        "results of aborted transactions left in the log: {}",
        v["aborted_outputs"]
    );

    // Over HTTP: the same, and no record of an aborted transaction, no
    // control record.
    rt.block_on(async {
        for partition in 0..3u64 {
            let inputs = http_values(&node.url, "ctpin", partition).await;
            assert!(!inputs.is_empty(), "ctpin/{partition} over HTTP is empty");
            let want: Vec<String> = inputs.iter().map(|v| format!("f({v})")).collect();
            let have = http_values(&node.url, "ctpout", partition).await;
            assert_same_values(&format!("ctpout/{partition} over HTTP"), &have, &want);
        }
    });
}

/// The edge → core path with a transactional producer at the edge: the
/// `basic` scenario (commits, aborts, a fenced zombie, a hung transaction
/// the edge aborts on its timeout) runs against an edge whose link to the
/// core is cut for a while in the middle, so part goes live and part from
/// the backlog. The core then holds exactly the committed records, once
/// each, in edge order per partition; it never received an aborted record,
/// a record of a transaction still open or a control record (its received
/// count is the committed count).
#[test]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
fn a_transactional_producer_at_the_edge_reaches_the_core_committed_records_only_exactly_once() {
    use common::sync::{http_addr, start_core, start_edge, sync_url, wait_drained};
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let core = start_core(&dir.path().join("core"), &[]);
    let proxy = rt.block_on(common::proxy::Proxy::start(
        http_addr(&core).parse().expect("addr"),
    ));
    let edge = start_edge(
        &dir.path().join("edge"),
        &sync_url(&proxy.addr().to_string()),
        "edge-tx",
        &[],
    );
    let child = Command::new("python3")
        .arg(txn_script())
        .args(["basic", &edge.kafka.to_string(), "etx"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    // Live for the first seconds, then cut off for a while: the rest
    // (aborts, the zombie, the hung transaction) waits in the backlog.
    std::thread::sleep(std::time::Duration::from_secs(3));
    proxy.refuse(true);
    proxy.cut();
    std::thread::sleep(std::time::Duration::from_secs(8));
    proxy.refuse(false);
    let out = child.wait_with_output().expect("kafka_txn_check.py");
    let s = summary_of("kafka_txn_check.py basic at the edge", &out);
    assert_transactions_seen_right(
        &s,
        &["_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH"],
    );
    rt.block_on(async {
        wait_drained(&edge.url, std::time::Duration::from_secs(120)).await;
        assert_http_reads_committed_only(&edge.url, "etx", &s).await;
        assert_http_reads_committed_only(&core.url, "etx", &s).await;
        assert_eq!(
            common::metric(&core.url, "tributary_sync_received_events_total", None).await,
            360,
            "the core received the committed records and nothing else"
        );
        assert_eq!(
            common::metric(&core.url, "tributary_sync_duplicate_events_total", None).await,
            0
        );
    });
}
