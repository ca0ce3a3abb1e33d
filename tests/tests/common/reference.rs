//! Apache Kafka 4.4, the reference broker (scripts/kafka-reference): a
//! private one-node KRaft broker per test, and kcat (librdkafka) to read and
//! write it as a client we did not write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn script() -> PathBuf {
    root().join("scripts/kafka-reference")
}

/// A running reference broker; crashed (kill -9) when dropped.
pub struct Kafka {
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub bootstrap: String,
}

impl Kafka {
    /// Starts one with extra server properties (`key=value`).
    pub fn start(properties: &[&str]) -> Kafka {
        let dir = tempfile::Builder::new()
            .prefix("tributary-kafka-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .args(properties)
            .output()
            .expect("run scripts/kafka-reference");
        assert!(
            out.status.success(),
            "the reference broker did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bootstrap = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Kafka { dir, bootstrap }
    }

    /// Its data directory (the broker's log is `server.log` in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `stop`, `restart` or `crash`.
    pub fn run(&self, what: &str) {
        let out = Command::new(script())
            .arg(what)
            .arg(self.dir.path())
            .output()
            .expect("run scripts/kafka-reference");
        assert!(
            out.status.success(),
            "kafka-reference {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every value of `topic` as a read_committed consumer (kcat, on
    /// librdkafka) reads it, with how often.
    pub fn committed_values(&self, topic: &str) -> BTreeMap<Vec<u8>, usize> {
        committed_values(&self.bootstrap, topic)
    }

    /// Appends `lines` (`key:value` each) to `topic` with kcat.
    pub fn produce(&self, topic: &str, lines: impl Iterator<Item = String>) {
        produce(&self.bootstrap, topic, lines);
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("crash")
            .arg(self.dir.path())
            .output();
    }
}

/// Every value of `topic` at `bootstrap` read_committed with kcat.
pub fn committed_values(bootstrap: &str, topic: &str) -> BTreeMap<Vec<u8>, usize> {
    let out = Command::new("kcat")
        .args(["-C", "-b", bootstrap, "-t", topic, "-e", "-q", "-u"])
        .args(["-X", "isolation.level=read_committed", "-f", "%s\\n"])
        .output()
        .expect("kcat (Debian kcat)");
    let mut values = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.is_empty() {
            *values.entry(line.as_bytes().to_vec()).or_insert(0) += 1;
        }
    }
    values
}

/// Appends `lines` (`key:value` each) to `topic` at `bootstrap` with kcat.
pub fn produce(bootstrap: &str, topic: &str, lines: impl Iterator<Item = String>) {
    use std::io::Write;
    let mut child = Command::new("kcat")
        .args(["-P", "-b", bootstrap, "-t", topic, "-K", ":"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kcat (Debian kcat)");
    let mut stdin = child.stdin.take().expect("stdin");
    for line in lines {
        writeln!(stdin, "{line}").expect("write");
    }
    drop(stdin);
    assert!(child.wait().expect("kcat").success(), "kcat produced");
}
