//! The differential suite: one list of scenarios driven by Apache Kafka's
//! Java client (`tests/clients/java/Differential.java`) against the Apache
//! Kafka 4.4 reference broker and against Tributary in the same run, the
//! observable results compared field by field. Every difference must be
//! listed, with its reason, in `docs/kafka-compatibility.md` (the README
//! links it); any other difference fails this test, and so does an entry
//! there that no longer matches a difference (fixed: delete the line).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::reference::{root, Kafka};

use tributary_gateway::config::Mode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a JDK and Apache Kafka 4.4 from Maven Central (scripts/kafka-reference); scripts/test installs them"]
async fn tributary_answers_the_java_client_as_apache_kafka_does_but_for_the_listed_differences() {
    let lib = root().join("target/kafka-reference/lib");
    assert!(
        lib.is_dir(),
        "scripts/kafka-reference fetch puts the jars in {}",
        lib.display()
    );
    let classes = tempfile::tempdir().expect("tempdir");
    let jars = format!("{}/*", lib.display());
    let out = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .args(["-cp", &jars])
        .arg(common::clients_dir().join("java/Differential.java"))
        .output()
        .expect("javac (scripts/test installs a JDK)");
    assert!(
        out.status.success(),
        "javac: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp = format!("{}:{jars}", classes.path().display());
    let results = tempfile::tempdir().expect("tempdir");
    let run = |bootstrap: String, name: &'static str, only: Vec<String>| {
        let cp = cp.clone();
        let file = results.path().join(name);
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new("java")
                    .args(["-Xmx512m", "-cp", &cp, "Differential", &bootstrap])
                    .arg(&file)
                    .args(&only)
                    .output()
            })
            .await
            .expect("join")
            .expect("java");
            assert!(
                out.status.success(),
                "Differential against {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let compare = || {
        let out = Command::new("java")
            .args(["-cp", &cp, "Differential", "compare"])
            .arg(results.path().join("kafka.json"))
            .arg(results.path().join("tributary.json"))
            .arg(root().join("docs/kafka-compatibility.md"))
            .output()
            .expect("java");
        let report = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), report)
    };

    // The reference: auto-creation off, as a Tributary core. The scenarios
    // run against both at once: each waits mostly on its broker's clocks
    // (rebalance delays, session timeouts), so this halves the time.
    let kafka = Kafka::start(&["auto.create.topics.enable=false"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let node = common::InProcessNode::start_in(dir.path(), Mode::Core, "").await;
    tokio::join!(
        run(kafka.bootstrap.clone(), "kafka.json", Vec::new()),
        run(node.kafka.to_string(), "tributary.json", Vec::new()),
    );

    let (mut same, first) = compare();
    let mut report = first.clone();
    if !same {
        // Both brokers run background work on their own clocks (Kafka's log
        // cleaner, group rebalance delays): the scenarios that differed run
        // once more on both, and their new results replace the first ones.
        // The first report is printed either way, so a difference that
        // comes and goes is seen.
        let again = differing_scenarios(&first, &results.path().join("kafka.json"));
        eprintln!("first comparison:\n{first}\nrunning again: {again:?}");
        if !again.is_empty() {
            tokio::join!(
                run(kafka.bootstrap.clone(), "kafka-again.json", again.clone()),
                run(
                    node.kafka.to_string(),
                    "tributary-again.json",
                    again.clone(),
                ),
            );
            for (name, rerun) in [
                ("kafka.json", "kafka-again.json"),
                ("tributary.json", "tributary-again.json"),
            ] {
                merge(&results.path().join(name), &results.path().join(rerun));
            }
            (same, report) = compare();
        }
    }
    kafka.run("stop");
    node.stop().await;

    // Kept for reading after the run (the notes hold wait times and error
    // messages that are never compared).
    let keep = root().join("target/kafka-differential");
    if std::fs::create_dir_all(&keep).is_ok() {
        for name in ["kafka.json", "tributary.json"] {
            let _ = std::fs::copy(results.path().join(name), keep.join(name));
        }
    }
    assert!(
        same,
        "differences not in docs/kafka-compatibility.md (or entries there that no longer \
         match one), in the first run and again when run once more (the first report is \
         above):\n{report}"
    );
}

/// The scenarios a comparison report names: each unexpected difference's,
/// and each stale allow-list entry's (its pattern's first part, `*` a
/// wildcard, matched against the scenarios of the results in `results`).
fn differing_scenarios(report: &str, results: &std::path::Path) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results).expect("results")).expect("json");
    let all: Vec<String> = json["scenarios"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for line in report.lines() {
        let pattern = if let Some(rest) = line.strip_prefix("DIFFERENT ") {
            rest.split('.').next().unwrap_or("")
        } else if let Some((_, p)) =
            line.split_once("stale allow-list entry (no such difference now): ")
        {
            p.split('.').next().unwrap_or("")
        } else {
            continue;
        };
        for name in &all {
            if glob(pattern.trim(), name) && !out.contains(name) {
                out.push(name.clone());
            }
        }
    }
    out
}

/// `*` matches any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => name.strip_prefix(head).is_some_and(|rest| {
            (0..=rest.len()).any(|i| rest.is_char_boundary(i) && glob(tail, &rest[i..]))
        }),
    }
}

/// Replaces the scenarios (and their notes and timings) in the results at
/// `into` with those of the results at `from`.
fn merge(into: &std::path::Path, from: &std::path::Path) {
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).expect("results")).expect("json")
    };
    let (mut base, rerun) = (read(into), read(from));
    for part in ["scenarios", "notes", "timings_ms"] {
        if let (Some(b), Some(r)) = (base[part].as_object_mut(), rerun[part].as_object()) {
            for (k, v) in r {
                if k != "total" {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
    }
    std::fs::write(into, serde_json::to_vec(&base).expect("json")).expect("write");
}

#[test]
fn a_report_names_the_scenarios_to_run_again() {
    assert!(glob("group_*", "group_range"));
    assert!(glob("compression_*", "compression_zstd"));
    assert!(!glob("group_*", "transactions"));
    assert!(glob("idempotence", "idempotence"));
    assert!(!glob("idempotence", "idempotence2"));
    let dir = tempfile::tempdir().expect("tempdir");
    let results = dir.path().join("a.json");
    std::fs::write(
        &results,
        r#"{"scenarios": {"compression_none": {}, "group_range": {}, "group_static": {},
            "transactions": {}, "errors": {}}}"#,
    )
    .expect("write");
    let report = "A = a\nB = b\n\nDIFFERENT transactions.describe_open.state\n    A: 1\n    B: 2\n\
                  DIFFERENT transactions.zombie\n\
                  stale allow-list entry (no such difference now): group_*.describe_empty.simple\n\n\
                  1 fields equal\n\nallowed   errors.x  [errors.x: why]\n";
    assert_eq!(
        differing_scenarios(report, &results),
        ["transactions", "group_range", "group_static"]
    );
    // The rerun's scenarios replace the first run's; the others stay.
    let rerun = dir.path().join("b.json");
    std::fs::write(
        &rerun,
        r#"{"scenarios": {"transactions": {"v": 2}}, "notes": {"transactions": {"n": 1}},
            "timings_ms": {"transactions": 5, "total": 5}}"#,
    )
    .expect("write");
    merge(&results, &rerun);
    let merged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&results).expect("read")).expect("json");
    assert_eq!(merged["scenarios"]["transactions"]["v"], 2);
    assert!(merged["scenarios"]["errors"].is_object());
}
