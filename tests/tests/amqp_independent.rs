//! AMQP through clients we did not write: pika (PyPI) and amqplib (npm), both
//! with publisher confirms. Ignored by plain `cargo test`; `scripts/test`
//! installs the clients and runs them.
//!
//! Each script publishes, waits for every confirm, then reads the records
//! back over the HTTP fetch API (`--verify-url`) and checks body, key,
//! headers and timestamp. See tests/clients/{pika_check.py,amqplib_check.js}.

mod common;

use std::process::Command;

use common::{clients_dir, ChildNode};

/// Runs a client script; returns its stdout (the JSON summary line).
fn run(program: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .arg(clients_dir().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON summary ({e}): {stdout}"))
}

fn clients() -> [(&'static str, &'static str); 2] {
    [("python3", "pika_check.py"), ("node", "amqplib_check.js")]
}

#[test]
#[ignore = "needs python3 with pika and node with amqplib (scripts/test installs them)"]
fn pika_and_amqplib_publish_with_confirms_and_read_back_over_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let port = node.amqp.port().to_string();
    for (program, script) in clients() {
        let name = script.split('_').next().unwrap_or("client");
        // A named exchange (topic = exchange, key = routing key) ...
        let exchange = format!("{name}-plant");
        let out = run(
            program,
            script,
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--exchange",
                &exchange,
                "--routing-key",
                "line.1",
                "--count",
                "200",
                "--verify-url",
                &node.url,
            ],
        );
        assert_eq!(summary(&out)["published"], 200, "{out}");
        // ... the default exchange (topic = routing key), and bodies of three frames.
        let queue = format!("{name}-blobs");
        let out = run(
            program,
            script,
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--exchange",
                "",
                "--routing-key",
                &queue,
                "--count",
                "5",
                "--body-size",
                "300000",
                "--verify-url",
                &node.url,
            ],
        );
        assert_eq!(summary(&out)["published"], 5, "{out}");
    }
    let out = run(
        "node",
        "amqplib_check.js",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--exchange",
            "amqplain",
            "--routing-key",
            "k",
            "--count",
            "10",
            "--amqplain",
            "--verify-url",
            &node.url,
        ],
    );
    assert_eq!(summary(&out)["published"], 10, "{out}");
}

#[test]
#[ignore = "needs python3 with pika and node with amqplib (scripts/test installs them)"]
fn pika_and_amqplib_see_returns_and_nacks_from_a_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A core does not create topics on publish: unknown exchanges route nowhere.
    let node = ChildNode::start_mode("core", dir.path(), &[]);
    let port = node.amqp.port().to_string();
    for (program, script) in clients() {
        let out = run(
            program,
            script,
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--exchange",
                "nowhere",
                "--routing-key",
                "k",
                "--count",
                "3",
                "--mandatory-unroutable",
            ],
        );
        let s = summary(&out);
        assert_eq!(
            (s["unroutable"].as_u64(), s["reply_code"].as_u64()),
            (Some(3), Some(312)),
            "{out}"
        );
        let out = run(
            program,
            script,
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--exchange",
                "nowhere",
                "--routing-key",
                "k",
                "--count",
                "3",
                "--expect-nack",
            ],
        );
        assert_eq!(summary(&out)["nacked"], 3, "{out}");
    }
}
