//! The PostgreSQL sink against a real PostgreSQL (Debian `postgresql`, run
//! privately by `scripts/postgres` on loopback; the table is checked with
//! `psql`): exactly once through kill -9 of the node and a crash of the
//! database, upserts keeping the latest record per key, refused rows in
//! the dead-letter topic with the database's error, and bad settings
//! refused with the key named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, create_topic, get, post};
use serde_json::{json, Value};

struct Pg {
    dir: tempfile::TempDir,
    port: u16,
}

fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres")
}

impl Pg {
    fn start() -> Pg {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::Builder::new()
            .prefix("tributary-pg-")
            .tempdir()
            .expect("tempdir");
        let pg = Pg { dir, port };
        pg.ctl(&["start", &pg.path(), &port.to_string()]);
        pg
    }

    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .output()
            .expect("run scripts/postgres");
        assert!(
            out.status.success(),
            "scripts/postgres {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs SQL with psql; its unaligned, tuples-only output.
    fn sql(&self, sql: &str) -> String {
        self.ctl(&["psql", &self.path(), "-At", "-F", ",", "-c", sql])
    }

    fn url(&self) -> String {
        format!("postgres://tributary@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["crash", &self.path()])
            .output();
    }
}

/// Produces records `{"id": i, ...extra}` (key `k<i>`) over HTTP.
async fn produce(base: &str, topic: &str, ids: std::ops::Range<u64>) {
    let c = client();
    for chunk in ids.collect::<Vec<_>>().chunks(500) {
        let records: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"key": format!("k{i}"), "value": {"id": i, "note": format!("event\t{i}\n")}}))
            .collect();
        let (s, b) = post(
            &c,
            &format!("{base}/v1/topics/{topic}/records"),
            &json!({ "records": records }),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
}

async fn connector(base: &str, name: &str) -> Value {
    let (s, v) = get(&client(), &format!("{base}/v1/connectors/{name}")).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Waits until `name` has no lag, has written or dead-lettered `records`
/// (since it last started) and `count` returns `n`.
async fn settle(base: &str, name: &str, records: u64, n: u64, count: impl Fn() -> u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = connector(base, name).await;
        let done =
            v["delivered_records"].as_u64().unwrap_or(0) + v["dead_letters"].as_u64().unwrap_or(0);
        if v["lag_records"] == 0 && done >= records && count() >= n {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "not settled in 120 s: {v}, {} rows",
            count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sink(name: &str, pg: &Pg, table: &str, columns: Value, extra: Value) -> Value {
    let mut v = json!({
        "name": name, "kind": "postgres_sink", "topics": ["events"],
        "url": pg.url(), "table": table, "columns": columns,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// Exactly once: 20,000 events, the node killed -9 three times while its
/// sink writes, PostgreSQL crashed and restarted once: every event is one
/// row, none twice, and the positions table holds the partitions' ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL's server and psql (Debian postgresql; scripts/test installs them)"]
async fn a_postgres_sink_writes_each_event_once_through_kill_9_and_a_database_crash() {
    let pg = Pg::start();
    pg.sql("CREATE TABLE events (id bigint NOT NULL, k text, note text, p int, o bigint, at timestamptz)");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = common::ChildNode::start(dir.path(), &[]);
    create_topic(&client(), &node.url, "events", 3).await;
    let (s, v) = post(
        &client(),
        &format!("{}/v1/connectors", node.url),
        &sink(
            "rows",
            &pg,
            "events",
            json!({"id": "id", "k": "_key", "note": "note", "p": "_partition", "o": "_offset", "at": "_ts"}),
            json!({"batch_size": 50, "concurrency": 2, "min_backoff_ms": 50, "max_backoff_ms": 1000}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let rows = || -> u64 {
        pg.sql("SELECT count(*) FROM events")
            .parse()
            .expect("count")
    };
    for round in 0..4u64 {
        produce(&node.url, "events", round * 5000..(round + 1) * 5000).await;
        if round == 1 {
            // The database goes down mid-stream and comes back.
            pg.ctl(&["crash", &pg.path()]);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let v = connector(&node.url, "rows").await;
            assert_eq!(v["state"], "running", "{v}");
            pg.ctl(&["start", &pg.path(), &pg.port.to_string()]);
        }
        if round < 3 {
            // Killed while it writes: some of the round is in, not all.
            let target = round * 5000 + 1000;
            let deadline = Instant::now() + Duration::from_secs(60);
            while rows() < target {
                assert!(Instant::now() < deadline, "the sink does not write");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            node.kill9();
            eprintln!(
                "killed with {} of {} rows written",
                rows(),
                (round + 1) * 5000
            );
            node = common::ChildNode::start(dir.path(), &[]);
        }
    }
    let v = settle(&node.url, "rows", 0, 20_000, rows).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pg.sql("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM events"),
        "20000,20000,0,19999",
        "{v}"
    );
    // Every column as mapped: the key, the escaped text, where it came from.
    assert_eq!(
        pg.sql("SELECT k, note = E'event\\t7\\n', at > now() - interval '1 hour' FROM events WHERE id = 7"),
        "k7,t,t"
    );
    let (_, ends) = get(&client(), &format!("{}/v1/topics/events", node.url)).await;
    let positions = pg.sql("SELECT partition, next_offset FROM tributary_offsets WHERE connector = 'rows' ORDER BY partition");
    let want: Vec<String> = ends["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| format!("{},{}", p["partition"], p["end_offset"]))
        .collect();
    assert_eq!(positions, want.join("\n"));
    assert_eq!(
        pg.sql(
            "SELECT count(*) FROM (SELECT p, o FROM events GROUP BY p, o HAVING count(*) > 1) d"
        ),
        "0"
    );
    assert_eq!(v["dead_letters"], 0, "{v}");
}

/// Upsert mode keeps the latest record per key; rows the table refuses (a
/// check constraint, a value that is not a number, a value without the
/// NOT NULL field) go to the dead-letter topic with the database's error, the rest
/// of their batch is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL's server and psql (Debian postgresql; scripts/test installs them)"]
async fn upserts_keep_the_latest_per_key_and_refused_rows_are_dead_lettered() {
    let pg = Pg::start();
    pg.sql(
        "CREATE TABLE readings (sensor text PRIMARY KEY, temp double precision NOT NULL CHECK (temp < 1000), \
         seq bigint, raw jsonb)",
    );
    let node = common::InProcessNode::start("").await;
    let base = &node.url;
    create_topic(&client(), base, "events", 1).await;
    let mut records = Vec::new();
    for seq in 0..50u64 {
        let sensor = format!("s{}", seq % 5);
        let temp: Value = match seq {
            17 => json!(5000.0),
            23 => json!("warm"),
            _ => json!(seq as f64 / 2.0),
        };
        records.push(json!({"key": sensor, "value": {"temp": temp, "seq": seq}}));
    }
    records.push(json!({"key": "s9", "value": "not json"}));
    let (s, b) = post(
        &client(),
        &format!("{base}/v1/topics/events/records"),
        &json!({ "records": records }),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, v) = post(
        &client(),
        &format!("{base}/v1/connectors"),
        &sink(
            "latest",
            &pg,
            "readings",
            json!({"sensor": "_key", "temp": "temp", "seq": "seq", "raw": "_value"}),
            json!({"mode": "upsert", "batch_size": 20}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let count = || -> u64 {
        pg.sql("SELECT count(*) FROM readings")
            .parse()
            .expect("count")
    };
    let v = settle(base, "latest", 51, 5, count).await;
    assert_eq!(v["dead_letters"], 3, "{v}");
    assert_eq!(v["delivered_records"], 48, "{v}");
    assert_eq!(
        pg.sql("SELECT sensor, temp, seq, raw->>'seq' FROM readings ORDER BY sensor"),
        "s0,22.5,45,45\ns1,23,46,46\ns2,23.5,47,47\ns3,24,48,48\ns4,24.5,49,49"
    );
    let (s, page) = get(
        &client(),
        &format!("{base}/v1/topics/latest.dead-letter/partitions/0/records?offset=0"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    let mut why: Vec<(u64, String)> = page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            let h = |n: &str| -> String {
                r["headers"]
                    .as_array()
                    .and_then(|h| h.iter().find(|x| x["key"] == n))
                    .and_then(|x| x["value"].as_str())
                    .unwrap_or_else(|| panic!("header {n} in {r}"))
                    .to_owned()
            };
            (
                h("dead_letter.offset").parse().expect("offset"),
                h("dead_letter.error"),
            )
        })
        .collect();
    why.sort();
    assert_eq!(why.len(), 3, "{why:?}");
    assert_eq!(why[0].0, 17);
    assert!(why[0].1.starts_with("23514"), "a check violation: {why:?}");
    assert_eq!(why[1].0, 23);
    assert!(why[1].1.starts_with("22P02"), "not a number: {why:?}");
    assert_eq!(why[2].0, 50);
    assert!(
        why[2].1.starts_with("23502"),
        "a JSON string, no temp: {why:?}"
    );
    node.stop().await;
}

/// Bad settings are refused with the key named: over the API (no such
/// table, no such column, upsert without a primary key, a database that
/// cannot be reached) and in the config file at start (no such table),
/// while a database down at start only delays a configured sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL's server and psql (Debian postgresql; scripts/test installs them)"]
async fn bad_postgres_settings_are_refused_naming_the_key() {
    let pg = Pg::start();
    pg.sql("CREATE TABLE t (a int, b text)");
    let node = common::InProcessNode::start("").await;
    let refused = |body: Value, key: &'static str| {
        let url = format!("{}/v1/connectors", node.url);
        async move {
            let (s, v) = post(&client(), &url, &body).await;
            assert_eq!(s, 400, "{v}");
            let m = v["error"]["message"].as_str().expect("message");
            assert!(m.contains(key), "{m} should name {key}");
        }
    };
    refused(
        sink("x", &pg, "nope", json!({"a": "a"}), json!({})),
        "`table`",
    )
    .await;
    refused(
        sink("x", &pg, "t", json!({"c": "a"}), json!({})),
        "`columns`",
    )
    .await;
    refused(
        sink("x", &pg, "t", json!({"a": "a"}), json!({"mode": "upsert"})),
        "`mode`",
    )
    .await;
    refused(sink("x", &pg, "t", json!({}), json!({})), "`columns`").await;
    refused(
        sink("x", &pg, "t", json!({"a": "a.."}), json!({})),
        "`columns.a`",
    )
    .await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut unreachable = sink(
        "x",
        &pg,
        "t",
        json!({"a": "a"}),
        json!({"timeout_ms": 2000}),
    );
    unreachable["url"] = json!(format!(
        "postgres://tributary@127.0.0.1:{dead_port}/postgres"
    ));
    refused(unreachable.clone(), "connect").await;
    refused(
        sink(
            "x",
            &pg,
            "t",
            json!({"a": "a"}),
            json!({"password": "plain"}),
        ),
        "`password`",
    )
    .await;
    node.stop().await;

    // From the config file: the node does not start with a missing table.
    let toml = |c: &Value| {
        format!(
            "[[connectors]]\n{}",
            c.as_object()
                .expect("object")
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::InProcessNode::config(
        dir.path(),
        &toml(&sink("x", &pg, "nope", json!({"a": "a"}), json!({}))),
    )
    .expect("valid config");
    let started = tributary_gateway::node::start(
        tributary_gateway::config::Mode::Edge,
        config,
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let Err(e) = started else {
        panic!("a config naming a missing table must not start")
    };
    assert!(format!("{e:#}").contains("`table`"), "{e:#}");
    // A database down at start: the node starts, the sink waits.
    let node = common::InProcessNode::start(&toml(&unreachable)).await;
    let v = connector(&node.url, "x").await;
    assert_eq!(v["state"], "running", "{v}");
    node.stop().await;
}

fn toml_value(v: &Value) -> String {
    match v {
        Value::Object(m) => format!(
            "{{ {} }}",
            m.iter()
                .map(|(k, v)| format!("{k:?} = {}", toml_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}
