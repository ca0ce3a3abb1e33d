//! Devices and TLS through tools we did not write: mosquitto_pub (user name
//! and token, `--cafile`, a client certificate), curl (`--cacert`, Bearer,
//! client certificates), `openssl s_client` (handshake and verification on
//! every TLS port) and pika (AMQP PLAIN). The certificates and devices are
//! made with the `tributary tls` and `tributary devices` commands. Ignored by
//! plain `cargo test`; `scripts/test` installs the tools and runs them.

mod common;

use std::process::{Command, Output, Stdio};

use common::{clients_dir, ChildNode, NODE_BIN};
use serde_json::Value;

const ADMIN: &str = "admin-token-for-outside-clients";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (scripts/test installs it): {e}"));
    out
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tributary(args: &[&str], url: &str) -> Output {
    run(Command::new(NODE_BIN)
        .args(args)
        .env("TRIBUTARY_URL", url)
        .env("TRIBUTARY_ADMIN_TOKEN", ADMIN))
}

/// `tributary devices add`: prints the device and its token once.
fn add_device(url: &str, id: &str) -> String {
    let out = tributary(
        &[
            "devices",
            "add",
            id,
            "--publish",
            "sensors/#",
            "--subscribe",
            "sensors/#",
        ],
        url,
    );
    assert!(out.status.success(), "{}", text(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    answer["token"].as_str().expect("token").to_owned()
}

#[test]
#[ignore = "needs mosquitto-clients, curl, openssl and pika (scripts/test installs them)"]
fn outside_clients_meet_devices_and_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let tls_s = tls.display().to_string();
    let out = run(Command::new(NODE_BIN).args(["tls", "self-signed", "--out", &tls_s]));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(Command::new(NODE_BIN).args(["tls", "client-cert", "good", "--ca-dir", &tls_s]));
    assert!(out.status.success(), "{}", text(&out));
    let f = |name: &str| tls.join(name).display().to_string();
    let (ca, cert, key) = (f("ca.pem"), f("good.pem"), f("good-key.pem"));
    let node = ChildNode::start(
        &dir.path().join("data"),
        &[
            ("TRIBUTARY_AUTH__MODE", "devices"),
            ("TRIBUTARY_AUTH__ADMIN_TOKEN", ADMIN),
            ("TRIBUTARY_TLS__CERT", &f("server.pem")),
            ("TRIBUTARY_TLS__KEY", &f("server-key.pem")),
            ("TRIBUTARY_TLS__CLIENT_CA", &ca),
            ("TRIBUTARY_HTTP__TLS_LISTEN", "127.0.0.1:0"),
            ("TRIBUTARY_MQTT__TLS_LISTEN", "127.0.0.1:0"),
            ("TRIBUTARY_AMQP__TLS_LISTEN", "127.0.0.1:0"),
        ],
    );
    let (https, mqtts, amqps) = (
        node.https.expect("https"),
        node.mqtts.expect("mqtts"),
        node.amqps.expect("amqps"),
    );
    let token = add_device(&node.url, "good");
    let off = add_device(&node.url, "off");
    let out = tributary(&["devices", "disable", "off"], &node.url);
    assert!(out.status.success(), "{}", text(&out));
    let out = tributary(&["devices", "list"], &node.url);
    assert!(
        text(&out).contains("good") && text(&out).contains("off"),
        "{}",
        text(&out)
    );
    // Without the admin token the CLI is refused.
    let out = run(Command::new(NODE_BIN).args([
        "devices",
        "list",
        "--url",
        &node.url,
        "--admin-token",
        "wrong-wrong-wrong",
    ]));
    assert!(
        !out.status.success() && text(&out).contains("401"),
        "{}",
        text(&out)
    );

    // mosquitto_pub, plain MQTT: right, wrong, none, disabled.
    let mqtt_port = node.mqtt.port().to_string();
    let mosq = |port: &str, extra: &[&str], msg: &str| {
        run(Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-q",
                "1",
                "-t",
                "sensors/mosq",
                "-m",
                msg,
            ])
            .args(extra))
    };
    let ok = mosq(&mqtt_port, &["-u", "good", "-P", &token], "mosq-plain");
    assert!(ok.status.success(), "{}", text(&ok));
    for (extra, what) in [
        (vec!["-u", "good", "-P", "trb_wrong"], "wrong"),
        (vec![], "none"),
        (vec!["-u", "off", "-P", off.as_str()], "disabled"),
        (
            vec!["-V", "mqttv5", "-u", "good", "-P", "trb_wrong"],
            "wrong v5",
        ),
    ] {
        let refused = mosq(&mqtt_port, &extra, "never");
        assert!(!refused.status.success(), "{what}: {}", text(&refused));
    }
    // mosquitto_pub over TLS: token, then a client certificate alone.
    let mqtts_port = mqtts.port().to_string();
    let ok = mosq(
        &mqtts_port,
        &["--cafile", &ca, "-u", "good", "-P", &token],
        "mosq-tls",
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let ok = mosq(
        &mqtts_port,
        &["--cafile", &ca, "--cert", &cert, "--key", &key],
        "mosq-mtls",
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let refused = mosq(&mqtts_port, &["-u", "good", "-P", &token], "plain-on-tls");
    assert!(!refused.status.success(), "{}", text(&refused));

    // curl over HTTPS.
    let produce = format!(
        "https://127.0.0.1:{}/v1/topics/sensors/records",
        https.port()
    );
    let curl = |extra: &[&str], value: &str| {
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
            ])
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(format!(r#"{{"records":[{{"value":"{value}"}}]}}"#))
            .args(extra)
            .arg(&produce));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(curl(&["-H", &bearer], "curl-bearer"), "200");
    assert_eq!(curl(&[], "never"), "401");
    assert_eq!(
        curl(&["-H", "Authorization: Bearer trb_wrong"], "never"),
        "401"
    );
    assert_eq!(curl(&["--cert", &cert, "--key", &key], "curl-mtls"), "200");
    let basic = format!("good:{token}");
    assert_eq!(curl(&["-u", &basic], "curl-basic"), "200");

    // openssl s_client: every TLS port completes a verified handshake.
    for addr in [https, mqtts, amqps] {
        let out = run(Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-CAfile", &ca])
            .args(["-verify_return_error", "-servername", "localhost", "-brief"]));
        let t = text(&out);
        assert!(out.status.success(), "{addr}: {t}");
        assert!(
            t.contains("Verification: OK") || t.contains("Verify return code: 0"),
            "{addr}: {t}"
        );
    }
    // A client trusting another CA refuses our certificate.
    let other = dir.path().join("other");
    let out = run(Command::new(NODE_BIN).args([
        "tls",
        "self-signed",
        "--out",
        &other.display().to_string(),
    ]));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(Command::new("openssl")
        .args(["s_client", "-connect", &https.to_string(), "-CAfile"])
        .arg(other.join("ca.pem"))
        .args(["-verify_return_error", "-servername", "localhost", "-brief"]));
    assert!(!out.status.success(), "{}", text(&out));

    // pika: PLAIN with the token, and a wrong one.
    let pika = |extra: &[&str]| {
        run(Command::new("python3")
            .arg(clients_dir().join("pika_check.py"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &node.amqp.port().to_string(),
            ])
            .args([
                "--exchange",
                "sensors",
                "--routing-key",
                "pika",
                "--count",
                "3",
            ])
            .args(extra))
    };
    let ok = pika(&["--user", "good", "--password", &token]);
    assert!(ok.status.success(), "{}", text(&ok));
    let refused = pika(&[
        "--user",
        "good",
        "--password",
        "trb_wrong",
        "--expect-auth-failure",
    ]);
    assert!(refused.status.success(), "{}", text(&refused));

    // What the node stored: exactly the accepted publishes.
    let out = run(Command::new("curl")
        .args(["-sS", "-H", &format!("Authorization: Bearer {ADMIN}")])
        .arg(format!(
            "{}/v1/topics/sensors/partitions/0/records?limit=100",
            node.url
        )));
    let body: Value = serde_json::from_slice(&out.stdout).expect("records JSON");
    let mut values: Vec<String> = body["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            r["value"]
                .as_str()
                .map_or_else(|| r["value"].to_string(), str::to_owned)
        })
        .collect();
    values.sort();
    let mut want: Vec<String> = [
        "mosq-plain",
        "mosq-tls",
        "mosq-mtls",
        "curl-bearer",
        "curl-mtls",
        "curl-basic",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let pika_records = values.iter().filter(|v| v.contains("pika")).count();
    assert_eq!(pika_records, 3, "{values:?}");
    values.retain(|v| !v.contains("pika"));
    want.sort();
    assert_eq!(values, want);
}
