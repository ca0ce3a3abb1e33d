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
    let run = |bootstrap: String, name: &'static str| {
        let cp = cp.clone();
        let file = results.path().join(name);
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new("java")
                    .args(["-Xmx512m", "-cp", &cp, "Differential", &bootstrap])
                    .arg(&file)
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

    // The reference: auto-creation off, as a Tributary core.
    let kafka = Kafka::start(&["auto.create.topics.enable=false"]);
    run(kafka.bootstrap.clone(), "kafka.json").await;
    kafka.run("stop");

    let dir = tempfile::tempdir().expect("tempdir");
    let node = common::InProcessNode::start_in(dir.path(), Mode::Core, "").await;
    run(node.kafka.to_string(), "tributary.json").await;
    node.stop().await;

    let out = Command::new("java")
        .args(["-cp", &cp, "Differential", "compare"])
        .arg(results.path().join("kafka.json"))
        .arg(results.path().join("tributary.json"))
        .arg(root().join("docs/kafka-compatibility.md"))
        .output()
        .expect("java");
    assert!(
        out.status.success(),
        "differences not in docs/kafka-compatibility.md (or entries there that no longer \
         match one):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
