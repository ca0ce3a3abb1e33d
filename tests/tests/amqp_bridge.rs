//! The lapin bridge against a real RabbitMQ (Debian `rabbitmq-server`, run
//! privately by `scripts/rabbitmq` on loopback): a queue consumed into a topic,
//! and a topic forwarded to an exchange, each with a RabbitMQ restart in the
//! middle. Every message RabbitMQ confirmed reaches the topic; every event of
//! the topic reaches the queue (at least once, in both directions).

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::InProcessNode;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};

/// A private RabbitMQ node, stopped on drop.
struct Rabbit {
    dir: tempfile::TempDir,
    port: u16,
}

fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq")
}

impl Rabbit {
    fn start() -> Rabbit {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // A known prefix, so scripts/test can stop a node whose test was killed.
        let dir = tempfile::Builder::new()
            .prefix("tributary-rabbit-")
            .tempdir()
            .expect("tempdir");
        let r = Rabbit { dir, port };
        r.ctl(&["start", &r.path(), &port.to_string()]);
        r
    }

    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn ctl(&self, args: &[&str]) {
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .output()
            .expect("run scripts/rabbitmq");
        assert!(
            out.status.success(),
            "scripts/rabbitmq {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn restart(&self) {
        self.ctl(&["restart", &self.path()]);
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &self.path()])
            .output();
    }
}

async fn connect(url: &str) -> Option<Connection> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()
}

async fn declare_queue(url: &str, queue: &str) {
    let conn = connect(url).await.expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let _ = conn.close(200, "bye".into()).await;
}

/// Values of every record of `topic`.
async fn topic_values(url: &str, topic: &str) -> Vec<String> {
    let c = common::client();
    let (s, t) = common::get(&c, &format!("{url}/v1/topics/{topic}")).await;
    if s != 200 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for p in t["partitions"].as_array().cloned().unwrap_or_default() {
        let id = p["partition"].as_u64().unwrap_or(0);
        let mut offset = p["start_offset"].as_u64().unwrap_or(0);
        loop {
            let (_, r) = common::get(
                &c,
                &format!(
                    "{url}/v1/topics/{topic}/partitions/{id}/records?offset={offset}&limit=5000"
                ),
            )
            .await;
            let recs = r["records"].as_array().cloned().unwrap_or_default();
            if recs.is_empty() {
                break;
            }
            out.extend(
                recs.iter()
                    .map(|r| r["value"].as_str().unwrap_or_default().to_owned()),
            );
            offset = r["next_offset"].as_u64().unwrap_or(offset);
        }
    }
    out
}

#[test]
#[ignore = "needs rabbitmq-server (scripts/test installs it)"]
fn a_rabbitmq_queue_is_consumed_into_a_topic_across_a_rabbitmq_restart() {
    let rt = common::runtime();
    let rabbit = Rabbit::start();
    let url = rabbit.url();
    rt.block_on(declare_queue(&url, "bridge-in"));
    let node = rt.block_on(InProcessNode::start(&format!(
        "[[amqp.bridges]]\nname = \"in\"\ndirection = \"in\"\nurl = \"{url}\"\nqueue = \"bridge-in\"\ntopic = \"from-rabbit\"\nmin_backoff_ms = 200\nmax_backoff_ms = 2000\n"
    )));
    const TOTAL: usize = 3000;
    // Publish into RabbitMQ with confirms; restart RabbitMQ a third of the way
    // through. Unconfirmed messages are sent again after a reconnect.
    let confirmed = rt.block_on(async {
        let mut confirmed = BTreeSet::new();
        let mut next = 0;
        let mut restarted = false;
        let give_up = Instant::now() + Duration::from_secs(180);
        while confirmed.len() < TOTAL {
            assert!(
                Instant::now() < give_up,
                "RabbitMQ confirmed only {} of {TOTAL} in 3 minutes",
                confirmed.len()
            );
            let Some(conn) = connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let Ok(ch) = conn.create_channel().await else {
                continue;
            };
            if ch
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .is_err()
            {
                continue;
            }
            let mut pending: VecDeque<(usize, lapin::PublisherConfirm)> = VecDeque::new();
            let mut failed = false;
            while confirmed.len() < TOTAL && !failed {
                if !restarted && confirmed.len() >= TOTAL / 3 {
                    restarted = true;
                    // block_on's own thread: the node runs on the runtime's workers.
                    rabbit.restart();
                    break;
                }
                let i = next % TOTAL;
                next += 1;
                if confirmed.contains(&i) {
                    continue;
                }
                match ch
                    .basic_publish(
                        "".into(),
                        "bridge-in".into(),
                        BasicPublishOptions::default(),
                        format!("m{i}").as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                {
                    Ok(c) => pending.push_back((i, c)),
                    Err(_) => failed = true,
                }
                if pending.len() >= 50 || next % TOTAL == 0 {
                    while let Some((i, c)) = pending.pop_front() {
                        match tokio::time::timeout(Duration::from_secs(10), c).await {
                            Ok(Ok(c)) if c.is_ack() => {
                                confirmed.insert(i);
                            }
                            _ => failed = true,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        confirmed
    });
    // Everything RabbitMQ confirmed ends up in the topic.
    let deadline = Instant::now() + Duration::from_secs(120);
    let have: BTreeSet<String> = loop {
        let values = rt.block_on(topic_values(&node.url, "from-rabbit"));
        let have: BTreeSet<String> = values.into_iter().collect();
        if confirmed.iter().all(|i| have.contains(&format!("m{i}"))) || Instant::now() > deadline {
            break have;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let missing: Vec<_> = confirmed
        .iter()
        .filter(|i| !have.contains(&format!("m{i}")))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "confirmed by RabbitMQ but not in the topic: {missing:?} ..."
    );
    assert_eq!(confirmed.len(), TOTAL);
    // The bridge acked what it stored: the queue drains.
    let metrics = rt.block_on(async {
        let c = common::client();
        c.get(format!("{}/metrics", node.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    let connects: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("tributary_amqp_bridge_connects_total{bridge=\"in\",direction=\"in\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        connects >= 2,
        "the bridge reconnected after the restart: {connects} connects"
    );
    // What the bridge stored, it acked: the queue drains to nothing unacked.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("bash")
            .arg(script())
            .args([
                "ctl",
                &rabbit.path(),
                "list_queues",
                "name",
                "messages",
                "messages_unacknowledged",
            ])
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let drained = text.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 3 && f[0] == "bridge-in" && f[1] == "0" && f[2] == "0"
        });
        if drained {
            break;
        }
        assert!(Instant::now() < deadline, "bridge-in did not drain: {text}");
        std::thread::sleep(Duration::from_millis(500));
    }
    rt.block_on(node.stop());
}

#[test]
#[ignore = "needs rabbitmq-server (scripts/test installs it)"]
fn a_topic_is_forwarded_to_rabbitmq_across_a_rabbitmq_restart() {
    let rt = common::runtime();
    let rabbit = Rabbit::start();
    let url = rabbit.url();
    rt.block_on(declare_queue(&url, "bridge-out"));
    let node = rt.block_on(InProcessNode::start(&format!(
        "[[topics]]\nname = \"to-rabbit\"\npartitions = 2\n\n[[amqp.bridges]]\nname = \"out\"\ndirection = \"out\"\nurl = \"{url}\"\ntopic = \"to-rabbit\"\nexchange = \"\"\nrouting_key = \"bridge-out\"\nbatch = 100\nmin_backoff_ms = 200\nmax_backoff_ms = 2000\n"
    )));
    const BATCHES: usize = 30;
    const PER_BATCH: usize = 100;
    let c = common::client();
    for b in 0..BATCHES {
        let records: Vec<Value> = (0..PER_BATCH)
            .map(|i| json!({"key": format!("k{}", i % 7), "value": format!("e{}", b * PER_BATCH + i)}))
            .collect();
        let (s, r) = rt.block_on(common::post(
            &c,
            &format!("{}/v1/topics/to-rabbit/records", node.url),
            &json!({ "records": records }),
        ));
        assert_eq!(s, 200, "{r}");
        if b == BATCHES / 3 {
            rabbit.restart();
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Drain the RabbitMQ queue until every event arrived.
    // The HTTP API stores a JSON value as its JSON text: quotes included.
    let want: BTreeSet<String> = (0..BATCHES * PER_BATCH)
        .map(|i| format!("\"e{i}\""))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = BTreeSet::new();
    let mut deliveries = 0usize;
    rt.block_on(async {
        while got.len() < want.len() && Instant::now() < deadline {
            let Some(conn) = connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let Ok(ch) = conn.create_channel().await else {
                continue;
            };
            loop {
                match ch
                    .basic_get("bridge-out".into(), BasicGetOptions::default())
                    .await
                {
                    Ok(Some(m)) => {
                        deliveries += 1;
                        got.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
                        let _ = m.delivery.ack(BasicAckOptions::default()).await;
                    }
                    Ok(None) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if got.len() >= want.len() || Instant::now() > deadline {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = conn.close(200, "bye".into()).await;
        }
    });
    let missing: Vec<_> = want.difference(&got).take(10).collect();
    assert!(
        missing.is_empty(),
        "events that never reached RabbitMQ: {missing:?} ..."
    );
    // The position is a consumer group, committed after confirms.
    // RabbitMQ may hand a message out before its confirm reaches the bridge,
    // which commits after the confirm: wait for the commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, offsets) = rt.block_on(common::get(
            &c,
            &format!("{}/v1/groups/amqp-bridge-out/offsets", node.url),
        ));
        assert_eq!(s, 200, "{offsets}");
        let committed: u64 = offsets["offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(|o| o["offset"].as_u64()).sum())
            .unwrap_or(0);
        if committed as usize == BATCHES * PER_BATCH {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed}: {offsets}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "forwarded {} events in {deliveries} deliveries ({} redelivered after the restart)",
        want.len(),
        deliveries - want.len()
    );
    rt.block_on(node.stop());
}

/// The same bridge as connectors (`amqp_source`, `amqp_sink`) created over
/// the API: a queue consumed into a topic and that topic forwarded to
/// another queue, with the connectors' counters, lag and pause; a broker
/// that cannot be reached is refused when the connector is created.
#[test]
#[ignore = "needs rabbitmq-server (scripts/test installs it)"]
fn the_bridge_runs_as_amqp_source_and_amqp_sink_connectors() {
    let rt = common::runtime();
    let rabbit = Rabbit::start();
    let url = rabbit.url();
    rt.block_on(declare_queue(&url, "conn-in"));
    rt.block_on(declare_queue(&url, "conn-out"));
    let node = rt.block_on(InProcessNode::start(""));
    let c = common::client();
    let create = |body: Value| {
        let (s, v) = rt.block_on(common::post(
            &c,
            &format!("{}/v1/connectors", node.url),
            &body,
        ));
        (s, v)
    };
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (s, v) = create(
        json!({"name": "nowhere", "kind": "amqp_source", "queue": "q",
        "topic": "t", "url": format!("amqp://guest:guest@127.0.0.1:{dead}/%2f"), "timeout_ms": 2000}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`url`"),
        "{v}"
    );
    let (s, v) = create(
        json!({"name": "rabbit-in", "kind": "amqp_source", "url": url,
        "queue": "conn-in", "topic": "via-rabbit", "min_backoff_ms": 200}),
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = create(
        json!({"name": "rabbit-out", "kind": "amqp_sink", "url": url,
        "topic": "via-rabbit", "exchange": "", "routing_key": "conn-out", "batch_size": 50,
        "min_backoff_ms": 200}),
    );
    assert_eq!(s, 201, "{v}");
    const TOTAL: usize = 500;
    rt.block_on(async {
        let conn = connect(&url).await.expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        for i in 0..TOTAL {
            ch.basic_publish(
                "".into(),
                "conn-in".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
        let _ = conn.close(200, "bye".into()).await;
    });
    // In through one connector, out through the other, into conn-out.
    let want: BTreeSet<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        let conn = connect(&url).await.expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        while got.len() < TOTAL && Instant::now() < deadline {
            match ch
                .basic_get("conn-out".into(), BasicGetOptions::default())
                .await
                .expect("get")
            {
                Some(m) => {
                    got.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
                    m.delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    });
    assert_eq!(got, want);
    let connector = |name: &str| {
        let (s, v) = rt.block_on(common::get(
            &c,
            &format!("{}/v1/connectors/{name}", node.url),
        ));
        assert_eq!(s, 200, "{v}");
        v
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (i, o) = (connector("rabbit-in"), connector("rabbit-out"));
        if i["delivered_records"] == TOTAL
            && o["delivered_records"] == TOTAL
            && o["lag_records"] == 0
        {
            assert_eq!(i["state"], "running");
            assert_eq!(o["group"], "connector-rabbit-out");
            break;
        }
        assert!(Instant::now() < deadline, "{i} {o}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Paused, the sink holds; the lag shows what waits; resumed, it goes on.
    let (s, v) = rt.block_on(common::post(
        &c,
        &format!("{}/v1/connectors/rabbit-out/pause", node.url),
        &json!({}),
    ));
    assert_eq!(s, 200, "{v}");
    let records: Vec<Value> = (0..20).map(|i| json!({"value": format!("p{i}")})).collect();
    let (s, v) = rt.block_on(common::post(
        &c,
        &format!("{}/v1/topics/via-rabbit/records", node.url),
        &json!({ "records": records }),
    ));
    assert_eq!(s, 200, "{v}");
    std::thread::sleep(Duration::from_millis(500));
    let o = connector("rabbit-out");
    assert_eq!(
        (o["state"].clone(), o["lag_records"].clone()),
        (json!("paused"), json!(20)),
        "{o}"
    );
    let (s, v) = rt.block_on(common::post(
        &c,
        &format!("{}/v1/connectors/rabbit-out/resume", node.url),
        &json!({}),
    ));
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while connector("rabbit-out")["lag_records"] != 0 {
        assert!(Instant::now() < deadline, "not resumed");
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.block_on(node.stop());
}
