//! Helpers shared by the end-to-end tests: start a node as a child process or
//! in process, kill it, and talk to its HTTP API.
#![allow(dead_code)]

pub mod crash;
pub mod kafka;
pub mod lazyfs;
pub mod mqtt5;
pub mod reference;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tributary_gateway::config::{Config, Mode};
use tributary_gateway::node::{self, RunningNode};

/// Path of the node binary built for these tests.
pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_tributary-node");

/// A node running as a child process.
pub struct ChildNode {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its MQTT address.
    pub mqtt: SocketAddr,
    /// Its AMQP address.
    pub amqp: SocketAddr,
    /// Its HTTPS address (with `[tls]`).
    pub https: Option<SocketAddr>,
    /// Its MQTT-over-TLS address (with `[tls]`).
    pub mqtts: Option<SocketAddr>,
    /// Its AMQPS address (with `[tls]`).
    pub amqps: Option<SocketAddr>,
    /// Its Kafka address.
    pub kafka: SocketAddr,
}

impl ChildNode {
    /// Starts `tributary-node edge` on `data_dir` with an ephemeral HTTP port and
    /// extra `TRIBUTARY_*` variables; returns once it listens.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> ChildNode {
        Self::start_mode("edge", data_dir, env)
    }

    /// Like [`ChildNode::start`] with `edge` or `core`.
    pub fn start_mode(mode: &str, data_dir: &Path, env: &[(&str, &str)]) -> ChildNode {
        std::fs::create_dir_all(data_dir).expect("create data dir");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("node.log"))
            .expect("open node.log");
        let mut cmd = Command::new(NODE_BIN);
        cmd.arg(mode)
            .env("TRIBUTARY_DATA_DIR", data_dir)
            .env("TRIBUTARY_HTTP__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY_MQTT__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY_AMQP__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY_KAFKA__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the node binary");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.contains(" listening: ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(data_dir.join("node.log")).unwrap_or_default();
                panic!("node did not report its address; its log:\n{log}");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let addr = field("http=").expect("http address");
        let mqtt = field("mqtt=")
            .and_then(|a| a.parse().ok())
            .expect("mqtt address");
        let amqp = field("amqp=")
            .and_then(|a| a.parse().ok())
            .expect("amqp address");
        ChildNode {
            child: Some(child),
            url: format!("http://{addr}"),
            data_dir: data_dir.to_owned(),
            mqtt,
            amqp,
            https: field("https=").and_then(|a| a.parse().ok()),
            mqtts: field("mqtts=").and_then(|a| a.parse().ok()),
            amqps: field("amqps=").and_then(|a| a.parse().ok()),
            kafka: field("kafka=")
                .and_then(|a| a.parse().ok())
                .expect("kafka address"),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let rc = unsafe_free_kill(c.id(), libc::SIGTERM);
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        c.wait().expect("wait for the node")
    }
}

/// `kill(2)` through the libc crate without an `unsafe` block in our code:
/// the `kill` command does the same and keeps `unsafe_code = "deny"` intact.
fn unsafe_free_kill(pid: u32, signal: i32) -> i32 {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    match status {
        Ok(s) if s.success() => 0,
        _ => -1,
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts node `id` of a core cluster: node-to-node on 127.0.0.1:`port`,
/// `peers` as `ID@HOST:PORT,…`, the tests' quick timeouts (heartbeat
/// 100 ms, election 500 ms, writes 4 s, sync heartbeat 500 ms), and
/// `extra` variables; returns once it serves (it has caught up).
pub fn start_cluster_node(
    dir: &Path,
    id: usize,
    port: u16,
    peers: &str,
    extra: &[(&str, &str)],
) -> ChildNode {
    let id = id.to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut env = vec![
        ("TRIBUTARY_CLUSTER__NODE_ID", id.as_str()),
        ("TRIBUTARY_CLUSTER__LISTEN", listen.as_str()),
        ("TRIBUTARY_CLUSTER__PEERS", peers),
        ("TRIBUTARY_CLUSTER__HEARTBEAT_MS", "100"),
        ("TRIBUTARY_CLUSTER__ELECTION_TIMEOUT_MS", "500"),
        ("TRIBUTARY_CLUSTER__WRITE_TIMEOUT_MS", "4000"),
        ("TRIBUTARY_SYNC__HEARTBEAT_MS", "500"),
    ];
    env.extend_from_slice(extra);
    ChildNode::start_mode("core", dir, &env)
}

/// A node running inside the test process.
pub struct InProcessNode {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Its MQTT address.
    pub mqtt: SocketAddr,
    /// Its AMQP address.
    pub amqp: SocketAddr,
    /// Its Kafka address.
    pub kafka: SocketAddr,
    /// The running node (its log, for tests that look inside).
    pub running: Option<RunningNode>,
    shutdown: CancellationToken,
    _dir: Option<tempfile::TempDir>,
}

impl InProcessNode {
    /// Starts an edge node on a fresh temp dir with TOML `extra` merged in.
    pub async fn start(extra_toml: &str) -> InProcessNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = Self::start_in(dir.path(), Mode::Edge, extra_toml).await;
        node._dir = Some(dir);
        node
    }

    /// The config of a test node in `dir` with TOML `extra_toml`: every
    /// listener on an ephemeral loopback port.
    pub fn config(dir: &Path, extra_toml: &str) -> Result<Config, String> {
        let mut env = vec![("TRIBUTARY_DATA_DIR".to_owned(), dir.display().to_string())];
        for listener in ["HTTP", "MQTT", "AMQP", "KAFKA"] {
            env.push((
                format!("TRIBUTARY_{listener}__LISTEN"),
                "127.0.0.1:0".to_owned(),
            ));
        }
        Config::from_parts(extra_toml, env).map_err(|e| e.to_string())
    }

    /// Starts a node in `dir` in `mode`.
    pub async fn start_in(dir: &Path, mode: Mode, extra_toml: &str) -> InProcessNode {
        let config = Self::config(dir, extra_toml).expect("valid test config");
        let shutdown = CancellationToken::new();
        let running = node::start(mode, config, shutdown.clone())
            .await
            .expect("node starts");
        let addr = running.http_addr;
        let mqtt = running.mqtt_addr.expect("mqtt enabled");
        let amqp = running.amqp_addr.expect("amqp enabled");
        let kafka = running.kafka_addr.expect("kafka enabled");
        InProcessNode {
            url: format!("http://{addr}"),
            addr,
            mqtt,
            amqp,
            kafka,
            shutdown,
            running: Some(running),
            _dir: None,
        }
    }

    /// Stops the node gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await.expect("clean stop");
        }
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A two-worker runtime for tests that also drive child processes synchronously.
/// `tests/clients/`: the scripts of the clients we did not write (paho-mqtt,
/// mqtt.js, pika, amqplib) that the installed tier runs.
pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A reqwest client with sane timeouts.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// POST JSON; returns (status, body as JSON).
pub async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// GET; returns (status, body as JSON).
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Creates a topic, asserting 201.
pub async fn create_topic(c: &reqwest::Client, base: &str, name: &str, partitions: u32) {
    let (s, b) = post(
        c,
        &format!("{base}/v1/topics"),
        &json!({"name": name, "partitions": partitions}),
    )
    .await;
    assert_eq!(s, 201, "create topic {name}: {b}");
}

/// Reads a whole partition, from its start, with `format=binary`: (offset,
/// key, value) in order.
pub async fn read_all(
    c: &reqwest::Client,
    base: &str,
    topic: &str,
    partition: u32,
) -> Vec<(u64, Option<Vec<u8>>, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let mut offset = "earliest".to_owned();
    loop {
        let (s, page) = get(
            c,
            &format!("{base}/v1/topics/{topic}/partitions/{partition}/records?offset={offset}&limit=1000&format=binary"),
        )
        .await;
        assert_eq!(s, 200, "fetch {topic}/{partition}@{offset}: {page}");
        let records = page["records"].as_array().expect("records array");
        for r in records {
            let key = r["key"]
                .as_str()
                .map(|k| b64.decode(k).expect("key base64"));
            let value = b64
                .decode(r["value"].as_str().expect("value"))
                .expect("value base64");
            out.push((r["offset"].as_u64().expect("offset"), key, value));
        }
        let next = page["next_offset"].as_u64().expect("next_offset");
        if records.is_empty() || next >= page["end_offset"].as_u64().expect("end_offset") {
            return out;
        }
        offset = next.to_string();
    }
}

/// How often each value of `topic` is stored, over every partition (empty
/// when the topic does not exist): what crash tests compare with their acks.
pub async fn stored_values(base: &str, topic: &str) -> std::collections::BTreeMap<Vec<u8>, usize> {
    let c = client();
    let mut out = std::collections::BTreeMap::new();
    let (s, t) = get(&c, &format!("{base}/v1/topics/{topic}")).await;
    if s == 404 {
        return out;
    }
    for p in t["partitions"].as_array().expect("partitions") {
        let id = p["partition"].as_u64().expect("id") as u32;
        for (_, _, value) in read_all(&c, base, topic, id).await {
            *out.entry(value).or_insert(0) += 1;
        }
    }
    out
}

/// A confirm-mode channel on `conn`.
pub async fn confirm_channel(conn: &lapin::Connection) -> lapin::Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    ch
}

/// Publishes `body` and waits (bounded) for the broker's answer: whether it
/// was acked, or the error (a closed channel, a refused publish).
pub async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
) -> Result<bool, lapin::Error> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await?;
    tokio::time::timeout(Duration::from_secs(20), confirm)
        .await
        .expect("a confirm in time")
        .map(|c| c.is_ack())
}

/// One unlabelled sample of `/metrics` (with `token` as bearer, if given).
/// Adds device `id` with these ACL patterns through the admin API and
/// returns its token.
pub async fn add_device(
    base: &str,
    admin_token: &str,
    id: &str,
    publish: &[&str],
    subscribe: &[&str],
) -> String {
    let created: Value = client()
        .post(format!("{base}/v1/devices"))
        .bearer_auth(admin_token)
        .json(&json!({"id": id, "publish": publish, "subscribe": subscribe}))
        .send()
        .await
        .expect("create device")
        .json()
        .await
        .expect("json");
    created["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {created}"))
        .to_owned()
}

pub async fn metric(base: &str, name: &str, token: Option<&str>) -> u64 {
    metrics_text(base, token)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The whole `/metrics` text (with `token` as bearer, if given).
pub async fn metrics_text(base: &str, token: Option<&str>) -> String {
    let mut r = client().get(format!("{base}/metrics"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}
pub mod proxy;
pub mod sync;

/// Asserts a client run succeeded and returns its summary line (the last
/// line of its standard output); a failure shows that line and the end of
/// its standard error (librdkafka logs every lost connection there).
pub fn summary_of(what: &str, out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}\n{}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("summary line")
}

/// Runs `kafka_txn_check.py ctp-verify` against `bootstrap` and asserts that
/// each of the `seeded` inputs of `ctpin` came out of `ctpout` exactly once,
/// in order, with `ctp-group`'s positions at the inputs' ends; its summary.
pub fn assert_ctp_verified(bootstrap: &str, seeded: u64) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg(clients_dir().join("kafka_txn_check.py"))
        .args(["ctp-verify", bootstrap, "ctpin", "ctpout", "ctp-group"])
        .output()
        .expect("python3");
    let v = summary_of("kafka_txn_check.py ctp-verify", &out);
    assert_eq!(v["in_records"], seeded, "{v}");
    assert_eq!(v["out_records"], seeded, "{v}");
    for zero in ["missing", "duplicates", "unexpected"] {
        assert_eq!(v[zero], 0, "{zero}: {v}");
    }
    for yes in ["equal", "to_end", "committed_ok", "ok"] {
        assert_eq!(v[yes], true, "{yes}: {v}");
    }
    v
}
