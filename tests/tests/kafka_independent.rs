//! Kafka through clients we did not write: kcat (Debian; librdkafka) and
//! confluent-kafka (PyPI; the librdkafka it bundles). Ignored by plain
//! `cargo test`; `scripts/test` installs the clients and runs them.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::{clients_dir, ChildNode};

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
}
