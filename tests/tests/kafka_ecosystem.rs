//! The Kafka ecosystem on Tributary, from Apache Kafka 4.4's own jars
//! (Maven Central, scripts/kafka-reference): Kafka Streams' WordCount with
//! `processing.guarantee=exactly_once_v2` — its repartition and changelog
//! topics created by Streams itself — counting exactly while the node is
//! killed -9 mid-run; and a distributed Kafka Connect worker keeping its
//! config, offset and status topics (compacted) on Tributary, running a
//! source and a sink connector end to end across a worker restart, also
//! with exactly-once source support; and MirrorMaker 2 copying a topic from
//! Tributary into the reference broker and another back. The Java programs are in
//! `tests/clients/java/` (each proven against the reference broker first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::{Duration, Instant};

use common::{client, clients_dir, get};

/// The jars of the reference (scripts/kafka-reference fetch).
fn lib() -> PathBuf {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kafka-reference/lib");
    assert!(
        lib.is_dir(),
        "{} is missing (scripts/kafka-reference fetch puts Apache Kafka's jars there)",
        lib.display()
    );
    lib
}

/// Compiles the named programs of `tests/clients/java`; the class path to
/// run them with, and the class directory (kept while it lives).
fn compile(files: &[&str]) -> (tempfile::TempDir, String) {
    let classes = tempfile::tempdir().expect("tempdir");
    let jars = format!("{}/*", lib().display());
    let out = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .arg("-cp")
        .arg(&jars)
        .args(files.iter().map(|f| clients_dir().join("java").join(f)))
        .output()
        .expect("javac (scripts/test installs a JDK)");
    assert!(
        out.status.success(),
        "javac {files:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp = format!("{}:{jars}", classes.path().display());
    (classes, cp)
}

fn java(cp: &str, args: &[&str]) -> Command {
    let mut c = Command::new("java");
    c.args(["-Xmx512m", "-cp", cp]).args(args);
    c
}

fn ok(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // Shown with --nocapture (and by the harness on a failure).
    println!("{what}:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("OK"),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The two JVM-heavy checks run one at a time (2 cores).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a JDK and Apache Kafka 4.4's jars from Maven Central (scripts/kafka-reference fetch); scripts/test installs them"]
async fn kafka_streams_counts_words_exactly_once_while_the_node_is_killed() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_classes, cp) = compile(&["StreamsWordCount.java"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("TRIBUTARY_KAFKA__LISTEN", listen.as_str()),
        ("TRIBUTARY_GROUPS__INITIAL_REBALANCE_DELAY_MS", "0"),
    ];
    let mut node = common::ChildNode::start(dir.path(), &env);
    let b = node.kafka.to_string();
    let n = "60000";
    ok(
        "StreamsWordCount produce",
        &java(
            &cp,
            &["StreamsWordCount", "produce", &b, "wc-in", "wc-out", n],
        )
        .output()
        .expect("java"),
    );
    let state = tempfile::tempdir().expect("state dir");
    let run = java(
        &cp,
        &[
            "StreamsWordCount",
            "run",
            &b,
            "wc-in",
            "wc-out",
            "wc-app",
            &state.path().display().to_string(),
            n,
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("java");
    // Kill the node once Streams has written counts, start it again on the
    // same port and data: Streams reconnects, its open transaction is
    // decided by the restarted node, and it goes on.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, t) = get(&client(), &format!("{}/v1/topics/wc-out", node.url)).await;
        let written: u64 = if s == 200 {
            t["partitions"]
                .as_array()
                .map(|ps| ps.iter().filter_map(|p| p["end_offset"].as_u64()).sum())
                .unwrap_or(0)
        } else {
            0
        };
        if written > 500 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node = common::ChildNode::start(dir.path(), &env);
    let out = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("the Streams run ends");
    ok("StreamsWordCount run (node killed -9 during it)", &out);
    let verified = ok(
        "StreamsWordCount verify",
        &java(
            &cp,
            &["StreamsWordCount", "verify", &b, "wc-in", "wc-out", n],
        )
        .output()
        .expect("java"),
    );
    assert!(verified.contains("OK"), "{verified}");
    // Streams purged its repartition topic (DeleteRecords) as it went.
    let (s, t) = get(
        &client(),
        &format!("{}/v1/topics/wc-app-words-repartition", node.url),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    let purged = t["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .any(|p| p["start_offset"].as_u64().unwrap_or(0) > 0);
    assert!(purged, "the repartition topic was purged: {t}");
    let (_, c) = get(
        &client(),
        &format!("{}/v1/topics/wc-app-counts-changelog", node.url),
    )
    .await;
    assert_eq!(c["cleanup_policy"], "compact", "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a JDK and Apache Kafka 4.4's jars from Maven Central (scripts/kafka-reference fetch); scripts/test installs them"]
async fn kafka_connect_keeps_its_topics_on_tributary_and_moves_records_end_to_end() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_classes, cp) = compile(&["ConnectCheck.java"]);
    let node = common::InProcessNode::start("[groups]\ninitial_rebalance_delay_ms = 0\n").await;
    let b = node.kafka.to_string();
    for (prefix, eos) in [("cc", None), ("cce", Some("eos"))] {
        let work = tempfile::tempdir().expect("workdir");
        let w = work.path().display().to_string();
        let mut args = vec!["ConnectCheck", &b, prefix, &w, "3000", "auto"];
        args.extend(eos);
        let out = tokio::task::spawn_blocking({
            let mut cmd = java(&cp, &args);
            move || cmd.output()
        })
        .await
        .expect("join")
        .expect("java");
        ok(&format!("ConnectCheck {prefix}"), &out);
        for t in ["configs", "offsets", "status"] {
            let (s, v) = get(&client(), &format!("{}/v1/topics/{prefix}-{t}", node.url)).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["cleanup_policy"], "compact", "{prefix}-{t}: {v}");
        }
    }
}

/// MirrorMaker 2 (its own 4.3.1 set of jars: no connect-mirror 4.4.0 on
/// Maven Central) between Tributary (`edge`) and the reference broker
/// (`central`): a Tributary topic into Kafka, a Kafka topic into Tributary,
/// counts and contents equal, each read by kcat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a JDK, Apache Kafka 4.4 and MirrorMaker 2 from Maven Central (scripts/kafka-reference) and kcat; scripts/test installs them"]
async fn mirror_maker_2_copies_a_topic_each_way_between_tributary_and_apache_kafka() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mm2_lib = common::reference::root().join("target/kafka-reference/mirror-maker-lib");
    assert!(
        mm2_lib.is_dir(),
        "scripts/kafka-reference fetch puts MirrorMaker 2 in {}",
        mm2_lib.display()
    );
    let kafka = common::reference::Kafka::start(&[]);
    let node = common::InProcessNode::start("[groups]\ninitial_rebalance_delay_ms = 0\n").await;
    let edge = node.kafka.to_string();
    common::create_topic(&client(), &node.url, "readings", 2).await;
    let n = 5000u64;
    common::reference::produce(
        &edge,
        "readings",
        (0..n).map(|i| format!("s{}:e{i}", i % 5)),
    );
    let tool = |args: &[&str]| {
        let out = Command::new(common::reference::root().join("scripts/kafka-reference"))
            .arg("tool")
            .args(args)
            .output()
            .expect("kafka-reference tool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tool(&[
        "org.apache.kafka.tools.TopicCommand",
        "--bootstrap-server",
        &kafka.bootstrap,
        "--create",
        "--topic",
        "commands",
        "--partitions",
        "2",
    ]);
    kafka.produce("commands", (0..n).map(|i| format!("c{}:k{i}", i % 5)));
    let work = tempfile::tempdir().expect("workdir");
    let properties = work.path().join("mm2.properties");
    std::fs::write(
        &properties,
        format!(
            "clusters = edge, central\nedge.bootstrap.servers = {edge}\n\
             central.bootstrap.servers = {}\n\
             edge->central.enabled = true\nedge->central.topics = readings\n\
             central->edge.enabled = true\ncentral->edge.topics = commands\n\
             replication.factor = 1\ncheckpoints.topic.replication.factor = 1\n\
             heartbeats.topic.replication.factor = 1\noffset-syncs.topic.replication.factor = 1\n\
             offset.storage.replication.factor = 1\nstatus.storage.replication.factor = 1\n\
             config.storage.replication.factor = 1\nsync.topic.acls.enabled = false\n\
             emit.heartbeats.interval.seconds = 1\nrefresh.topics.interval.seconds = 5\n",
            kafka.bootstrap
        ),
    )
    .expect("write mm2.properties");
    let log_config = work.path().join("log4j2.properties");
    std::fs::write(
        &log_config,
        format!(
            "rootLogger.level = WARN\nrootLogger.appenderRef.f.ref = F\nappender.f.type = File\n\
             appender.f.name = F\nappender.f.fileName = {}\nappender.f.layout.type = PatternLayout\n\
             appender.f.layout.pattern = %d %p %c{{1}} %m%n\n",
            work.path().join("mm2.log").display()
        ),
    )
    .expect("write log4j2.properties");
    let mut mm2 = Command::new("java")
        .arg("-Xmx512m")
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            log_config.display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", mm2_lib.display()))
        .arg("org.apache.kafka.connect.mirror.MirrorMaker")
        .arg(&properties)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("java");
    // MirrorMaker names a copy after its source cluster.
    let want_central: std::collections::BTreeMap<Vec<u8>, usize> =
        (0..n).map(|i| (format!("e{i}").into_bytes(), 1)).collect();
    let want_edge: std::collections::BTreeMap<Vec<u8>, usize> =
        (0..n).map(|i| (format!("k{i}").into_bytes(), 1)).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut central, mut at_edge) = Default::default();
    while Instant::now() < deadline {
        central = kafka.committed_values("edge.readings");
        at_edge = common::reference::committed_values(&edge, "central.commands");
        if central == want_central && at_edge == want_edge {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = mm2.kill();
    let _ = mm2.wait();
    let log = std::fs::read_to_string(work.path().join("mm2.log")).unwrap_or_default();
    assert_eq!(
        central.values().sum::<usize>() as u64,
        n,
        "Tributary's topic on Apache Kafka (edge.readings); MirrorMaker's log:\n{log}"
    );
    assert!(
        central == want_central,
        "every record once, the same values"
    );
    assert_eq!(
        at_edge.values().sum::<usize>() as u64,
        n,
        "Apache Kafka's topic on Tributary (central.commands); MirrorMaker's log:\n{log}"
    );
    assert!(at_edge == want_edge, "every record once, the same values");
}
