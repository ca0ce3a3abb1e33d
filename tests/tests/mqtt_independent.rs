//! MQTT through clients we did not write: mosquitto_pub/mosquitto_sub
//! (Debian mosquitto-clients), paho-mqtt (PyPI) in 3.1.1 and 5, and mqtt.js
//! (npm) over WebSockets. Ignored by plain `cargo test`; `scripts/test`
//! installs the clients and runs them.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{clients_dir, ChildNode};

#[test]
#[ignore = "needs mosquitto-clients (scripts/test installs it)"]
fn mosquitto_pub_and_sub_round_trip_qos1_and_retained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let port = node.mqtt.port().to_string();
    for (v, id) in [("mqttv311", "311"), ("mqttv5", "5")] {
        let topic = format!("mosq/{id}/temp");
        let sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                v,
                "-q",
                "1",
                "-t",
                "mosq/#",
            ])
            .args(["-C", "5", "-v", "-W", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub is installed (scripts/test installs it)");
        // Give the subscription time to be in place before publishing.
        std::thread::sleep(Duration::from_millis(700));
        for i in 0..5 {
            let out = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    v,
                    "-q",
                    "1",
                    "-t",
                    &topic,
                ])
                .args(["-m", &format!("{{\"i\":{i}}}")])
                .output()
                .expect("mosquitto_pub");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = sub
            .wait_with_output()
            .expect("mosquitto_sub ends after 5 messages");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..5 {
            assert!(
                text.contains(&format!("{topic} {{\"i\":{i}}}")),
                "{v}: {text}"
            );
        }
    }
    // Retained: published before the subscriber exists, delivered on subscribe.
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-r",
            "-t",
            "mosq/state",
            "-m",
            "ready",
        ])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success());
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "mosq/state",
            "-C",
            "1",
            "-W",
            "10",
            "-v",
        ])
        .output()
        .expect("mosquitto_sub");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "mosq/state ready"
    );
}

fn run_within(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client is installed (scripts/test installs it)");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.success(), format!("{out}{err}"));
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            return (false, "timed out".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs python3 with paho-mqtt (scripts/test installs it)"]
fn paho_publishes_and_subscribes_in_3_1_1_and_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    for version in ["3", "5"] {
        let (ok, out) = run_within(
            Command::new("python3")
                .arg(clients_dir().join("paho_check.py"))
                .args(["127.0.0.1", &node.mqtt.port().to_string(), version]),
            Duration::from_secs(60),
        );
        assert!(ok, "paho MQTT {version}: {out}");
        assert!(out.contains("20 acknowledged, 20 delivered"), "{out}");
    }
}

/// Runs an mqtt.js script against a fresh node's `/mqtt`; its output must
/// contain `expect`.
fn mqtt_js(script: &str, expect: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let ws = format!("{}/mqtt", node.url.replacen("http://", "ws://", 1));
    let (ok, out) = run_within(
        Command::new("node")
            .current_dir(clients_dir())
            .arg(script)
            .arg(&ws),
        Duration::from_secs(60),
    );
    assert!(ok, "mqtt.js {script}: {out}");
    assert!(out.contains(expect), "{out}");
}

#[test]
#[ignore = "needs node with npm package mqtt in tests/clients (scripts/test installs it)"]
fn mqtt_js_over_websockets() {
    mqtt_js("mqttjs_ws.js", "10 acknowledged and delivered");
}

#[test]
#[ignore = "needs node with npm package mqtt in tests/clients (scripts/test installs it)"]
fn mqtt_js_qos2_unusual_topics_and_a_shared_group() {
    mqtt_js("mqttjs_complete.js", "mqtt.js complete: 4 QoS 2 topics");
}
