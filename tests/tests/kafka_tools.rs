//! Apache Kafka's own command-line tools against Tributary's Kafka port:
//! `kafka-topics`, `kafka-configs`, the console producer and consumer,
//! `kafka-consumer-groups` (list, describe with lag, reset offsets),
//! `kafka-transactions` (list, describe), the producer and consumer perf
//! tests, `kafka-delete-records` and `kafka-get-offsets` — run from Maven Central's jars (scripts/kafka-reference `tool`,
//! as the shell wrappers are not in Maven). Each asserts on what the tool
//! printed, as an operator would read it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

const TOPICS: &str = "org.apache.kafka.tools.TopicCommand";
const CONFIGS: &str = "org.apache.kafka.tools.ConfigCommand";
const PRODUCER: &str = "org.apache.kafka.tools.ConsoleProducer";
const CONSUMER: &str = "org.apache.kafka.tools.consumer.ConsoleConsumer";
const GROUPS: &str = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand";
const TRANSACTIONS: &str = "org.apache.kafka.tools.TransactionsCommand";
const PRODUCER_PERF: &str = "org.apache.kafka.tools.ProducerPerformance";
const CONSUMER_PERF: &str = "org.apache.kafka.tools.ConsumerPerformance";
const DELETE_RECORDS: &str = "org.apache.kafka.tools.DeleteRecordsCommand";
const OFFSETS: &str = "org.apache.kafka.tools.GetOffsetShell";

/// Runs a Kafka tool with `stdin`; its stdout (asserting it succeeded).
fn tool(class: &str, args: &[&str], stdin: &str) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-reference");
    let mut child = Command::new(script)
        .arg("tool")
        .arg(class)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("scripts/kafka-reference tool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("the tool ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{class} {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The LAG column of `kafka-consumer-groups --describe`, summed.
fn total_lag(describe: &str) -> u64 {
    let mut lines = describe.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .by_ref()
        .find(|l| l.contains("LAG"))
        .expect("a header line")
        .split_whitespace()
        .collect();
    let col = header.iter().position(|&h| h == "LAG").expect("LAG column");
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells[col].parse::<u64>().expect("a lag")
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Apache Kafka 4.4's tools from Maven Central (scripts/kafka-reference: a JDK and maven); scripts/test installs them"]
async fn kafkas_own_tools_manage_and_move_data_on_tributary() {
    let node = common::InProcessNode::start("").await;
    let b = node.kafka.to_string();
    let b = b.as_str();

    // kafka-topics: create with a config, describe, alter partitions, list.
    tool(
        TOPICS,
        &[
            "--bootstrap-server",
            b,
            "--create",
            "--topic",
            "tools.a",
            "--partitions",
            "3",
            "--config",
            "retention.ms=3600000",
        ],
        "",
    );
    let d = tool(
        TOPICS,
        &["--bootstrap-server", b, "--describe", "--topic", "tools.a"],
        "",
    );
    assert!(d.contains("PartitionCount: 3"), "{d}");
    assert!(d.contains("retention.ms=3600000"), "{d}");
    // The topic's id (base64 of its UUID; all `A`: none).
    let topic_id = |d: &str| {
        d.split_whitespace()
            .skip_while(|w| *w != "TopicId:")
            .nth(1)
            .map(str::to_owned)
    };
    let id = topic_id(&d).unwrap_or_default();
    assert!(id.len() == 22 && id != "A".repeat(22), "{d}");
    assert_eq!(d.matches("Partition: ").count(), 3, "{d}");
    tool(
        TOPICS,
        &[
            "--bootstrap-server",
            b,
            "--alter",
            "--topic",
            "tools.a",
            "--partitions",
            "5",
        ],
        "",
    );
    let d = tool(
        TOPICS,
        &["--bootstrap-server", b, "--describe", "--topic", "tools.a"],
        "",
    );
    assert!(d.contains("PartitionCount: 5"), "{d}");
    assert_eq!(topic_id(&d), Some(id), "{d}");
    let l = tool(TOPICS, &["--bootstrap-server", b, "--list"], "");
    assert!(l.lines().any(|t| t == "tools.a"), "{l}");

    // kafka-configs: alter, then describe shows it.
    tool(
        CONFIGS,
        &[
            "--bootstrap-server",
            b,
            "--entity-type",
            "topics",
            "--entity-name",
            "tools.a",
            "--alter",
            "--add-config",
            "retention.ms=7200000",
        ],
        "",
    );
    let c = tool(
        CONFIGS,
        &[
            "--bootstrap-server",
            b,
            "--entity-type",
            "topics",
            "--entity-name",
            "tools.a",
            "--describe",
        ],
        "",
    );
    assert!(c.contains("retention.ms=7200000"), "{c}");

    // The console producer and consumer (a group, keys printed).
    let lines: String = (0..100).map(|i| format!("k{}:v{i}\n", i % 10)).collect();
    tool(
        PRODUCER,
        &[
            "--bootstrap-server",
            b,
            "--topic",
            "tools.a",
            "--property",
            "parse.key=true",
            "--property",
            "key.separator=:",
        ],
        &lines,
    );
    let consumed = tool(
        CONSUMER,
        &[
            "--bootstrap-server",
            b,
            "--topic",
            "tools.a",
            "--from-beginning",
            "--max-messages",
            "100",
            "--group",
            "tools-g",
            "--property",
            "print.key=true",
            "--property",
            "key.separator=:",
            "--timeout-ms",
            "30000",
        ],
        "",
    );
    let mut got: Vec<&str> = consumed.lines().filter(|l| l.contains(':')).collect();
    got.sort_unstable();
    let mut want: Vec<String> = (0..100).map(|i| format!("k{}:v{i}", i % 10)).collect();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "the console consumer reads what the console producer wrote"
    );

    // kafka-consumer-groups: list, describe with lag, reset offsets.
    let g = tool(GROUPS, &["--bootstrap-server", b, "--list"], "");
    assert!(g.lines().any(|l| l.trim() == "tools-g"), "{g}");
    let d = tool(
        GROUPS,
        &["--bootstrap-server", b, "--describe", "--group", "tools-g"],
        "",
    );
    assert_eq!(total_lag(&d), 0, "{d}");
    let more: String = (0..10).map(|i| format!("m{i}\n")).collect();
    tool(
        PRODUCER,
        &["--bootstrap-server", b, "--topic", "tools.a"],
        &more,
    );
    let d = tool(
        GROUPS,
        &["--bootstrap-server", b, "--describe", "--group", "tools-g"],
        "",
    );
    assert_eq!(total_lag(&d), 10, "{d}");
    let r = tool(
        GROUPS,
        &[
            "--bootstrap-server",
            b,
            "--reset-offsets",
            "--group",
            "tools-g",
            "--topic",
            "tools.a",
            "--to-earliest",
            "--execute",
        ],
        "",
    );
    assert!(r.contains("tools.a"), "{r}");
    let d = tool(
        GROUPS,
        &["--bootstrap-server", b, "--describe", "--group", "tools-g"],
        "",
    );
    assert_eq!(total_lag(&d), 110, "{d}");
    // --delete-offsets: the group's positions in tools.a go (OffsetDelete).
    let log = node.running.as_ref().expect("running").log.clone();
    let before = log.group_offsets("tools-g").expect("offsets");
    assert!(before.iter().any(|o| o.topic == "tools.a"), "{before:?}");
    let r = tool(
        GROUPS,
        &[
            "--bootstrap-server",
            b,
            "--delete-offsets",
            "--group",
            "tools-g",
            "--topic",
            "tools.a",
        ],
        "",
    );
    assert!(r.contains("Successful") && !r.contains("Error"), "{r}");
    let after = log.group_offsets("tools-g").expect("offsets");
    assert!(after.iter().all(|o| o.topic != "tools.a"), "{after:?}");

    // The producer perf test in transactions, then kafka-transactions.
    let p = tool(
        PRODUCER_PERF,
        &[
            "--topic",
            "tools.t",
            "--num-records",
            "2000",
            "--record-size",
            "100",
            "--throughput",
            "-1",
            "--transactional-id",
            "tools-tx",
            "--transaction-duration-ms",
            "50",
            "--command-property",
            &format!("bootstrap.servers={b}"),
            "acks=all",
        ],
        "",
    );
    assert!(p.contains("2000 records sent"), "{p}");
    let t = tool(TRANSACTIONS, &["--bootstrap-server", b, "list"], "");
    assert!(t.contains("tools-tx"), "{t}");
    let t = tool(
        TRANSACTIONS,
        &[
            "--bootstrap-server",
            b,
            "describe",
            "--transactional-id",
            "tools-tx",
        ],
        "",
    );
    assert!(
        t.contains("CompleteCommit") || t.contains("Empty"),
        "the transaction ended committed: {t}"
    );
    // describe-producers (DescribeProducers): the perf test's one producer
    // in the partitions it wrote to, no transaction left open.
    let mut rows: Vec<Vec<String>> = Vec::new();
    let partitions = node
        .running
        .as_ref()
        .expect("running")
        .log
        .topic("tools.t")
        .expect("tools.t")
        .config
        .partitions;
    for partition in 0..partitions {
        let partition = partition.to_string();
        let t = tool(
            TRANSACTIONS,
            &[
                "--bootstrap-server",
                b,
                "describe-producers",
                "--topic",
                "tools.t",
                "--partition",
                &partition,
            ],
            "",
        );
        // ProducerId ProducerEpoch LatestCoordinatorEpoch LastSequence
        // LastTimestamp CurrentTransactionStartOffset
        rows.extend(
            t.lines()
                .skip_while(|l| !l.contains("ProducerId"))
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().map(str::to_owned).collect()),
        );
    }
    assert!(!rows.is_empty(), "the producer is described");
    for r in &rows {
        assert_eq!(r.len(), 6, "{rows:?}");
        assert_eq!(r[0], rows[0][0], "one producer id: {rows:?}");
        assert_eq!(r[5], "None", "no transaction open: {rows:?}");
        assert!(r[3].parse::<i32>().is_ok_and(|s| s >= 0), "{rows:?}");
        assert!(r[4].parse::<i64>().is_ok_and(|t| t > 0), "{rows:?}");
    }
    let c = tool(
        CONSUMER_PERF,
        &[
            "--bootstrap-server",
            b,
            "--topic",
            "tools.t",
            "--num-records",
            "2000",
            "--timeout",
            "30000",
        ],
        "",
    );
    let row = c.lines().last().expect("a result row");
    // start, end, MB, MB/s, records, ...
    let records: u64 = row
        .split(',')
        .nth(4)
        .expect("records column")
        .trim()
        .parse()
        .expect("count");
    assert_eq!(records, 2000, "{c}");

    // kafka-delete-records moves partition 0's start; kafka-get-offsets sees it.
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("offsets.json");
    std::fs::write(
        &json,
        r#"{"partitions": [{"topic": "tools.a", "partition": 0, "offset": 3}], "version": 1}"#,
    )
    .expect("write");
    let d = tool(
        DELETE_RECORDS,
        &[
            "--bootstrap-server",
            b,
            "--offset-json-file",
            &json.display().to_string(),
        ],
        "",
    );
    assert!(d.contains("low_watermark: 3"), "{d}");
    let o = tool(
        OFFSETS,
        &[
            "--bootstrap-server",
            b,
            "--topic",
            "tools.a",
            "--time",
            "earliest",
        ],
        "",
    );
    assert!(o.lines().any(|l| l == "tools.a:0:3"), "{o}");

    // kafka-topics --delete.
    tool(
        TOPICS,
        &["--bootstrap-server", b, "--delete", "--topic", "tools.a"],
        "",
    );
    let l = tool(TOPICS, &["--bootstrap-server", b, "--list"], "");
    assert!(!l.lines().any(|t| t == "tools.a"), "{l}");
}
