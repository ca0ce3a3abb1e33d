//! Pipelines in a node process: created over the HTTP API and the CLI,
//! killed -9 five times while they run, and after the last restart their
//! outputs hold exactly the rows an uninterrupted run gives (a reference
//! fold computed here): every window once, every projected row once, every
//! late event and dead letter once. Then the error paths of the API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{client, create_topic, get, post, read_all, ChildNode};
use serde_json::{json, Value};

const BASE: i64 = 1_700_000_000_000;
const EVENTS: usize = 100_000;

/// (key, ts, value): readings with out-of-order and late times, and one in
/// a thousand not JSON.
fn input() -> Vec<(String, i64, Vec<u8>)> {
    let mut rng = fastrand::Rng::with_seed(3);
    (0..EVENTS)
        .map(|i| {
            let mut ts = BASE + i as i64 * 20 + rng.i64(-1000..=200);
            if rng.u32(0..40) == 0 {
                ts -= 10_000;
            }
            let key = format!("dev-{}", rng.u32(0..25));
            let value = if rng.u32(0..1000) == 0 {
                b"not json".to_vec()
            } else {
                serde_json::to_vec(&json!({"id": i, "temp": rng.i32(-100..=400)})).unwrap()
            };
            (key, ts, value)
        })
        .collect()
}

const WINDOWS: &str = "INSERT INTO stats SELECT _key AS device, COUNT(*) AS n, SUM(temp) AS total, \
    MAX(temp) AS hi, window_start, window_end FROM readings \
    GROUP BY _key, TUMBLE(_ts, INTERVAL '5' SECOND) \
    WITH (lateness = '1s', late_topic = 'late', dead_letter_topic = 'bad', commit_interval = '10ms', max_batch = 500)";

const PROJECT: &str = "INSERT INTO warm SELECT id, temp / 10 AS deg FROM multi WHERE temp > 150 \
    WITH (commit_interval = '10ms', max_batch = 700)";

async fn records(base: &str, topic: &str) -> Vec<(Option<Vec<u8>>, Value)> {
    let c = client();
    let (s, t) = get(&c, &format!("{base}/v1/topics/{topic}")).await;
    if s == 404 {
        return Vec::new();
    }
    let parts = t["partitions"].as_array().map_or(1, Vec::len) as u32;
    let mut out = Vec::new();
    for p in 0..parts {
        for (_, k, v) in read_all(&c, base, topic, p).await {
            out.push((k, serde_json::from_slice(&v).unwrap_or(Value::Null)));
        }
    }
    out
}

async fn wait_caught_up(base: &str, names: &[&str]) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut done = true;
        for n in names {
            let (s, p) = get(&c, &format!("{base}/v1/pipelines/{n}")).await;
            assert_eq!(s, 200, "{p}");
            done &= p["lag"] == 0 && p["step"].as_u64().unwrap_or(0) > 0;
        }
        if done {
            return;
        }
        if Instant::now() > deadline {
            let (_, all) = get(&c, &format!("{base}/v1/pipelines")).await;
            panic!("pipelines did not catch up: {all}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of a topic over HTTP: (key, timestamp, value).
async fn stored(base: &str, topic: &str) -> Vec<(String, i64, Vec<u8>)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let c = client();
    let (s, t) = get(&c, &format!("{base}/v1/topics/{topic}")).await;
    assert_eq!(s, 200, "{t}");
    let mut out = Vec::new();
    for p in 0..t["partitions"].as_array().map_or(1, Vec::len) {
        let mut offset = 0u64;
        loop {
            let (s, page) = get(
                &c,
                &format!("{base}/v1/topics/{topic}/partitions/{p}/records?offset={offset}&limit=1000&format=binary"),
            )
            .await;
            assert_eq!(s, 200, "{page}");
            let records = page["records"].as_array().unwrap();
            for r in records {
                let key = b64.decode(r["key"].as_str().unwrap_or_default()).unwrap();
                out.push((
                    String::from_utf8(key).unwrap(),
                    r["timestamp"].as_i64().unwrap(),
                    b64.decode(r["value"].as_str().unwrap()).unwrap(),
                ));
            }
            let next = page["next_offset"].as_u64().unwrap();
            if records.is_empty() || next >= page["end_offset"].as_u64().unwrap() {
                break;
            }
            offset = next;
        }
    }
    out
}

/// Produces `events` from `from` on, in batches, until done or the node
/// goes away; returns where it stopped (a batch cut off by the kill may or
/// may not be stored: the reference reads the inputs back).
async fn produce_from(base: String, events: Vec<(String, i64, Vec<u8>)>, from: usize) -> usize {
    let b64 = base64::engine::general_purpose::STANDARD;
    let c = client();
    let mut at = from;
    while at < events.len() {
        let chunk = &events[at..(at + 500).min(events.len())];
        let records: Vec<Value> = chunk
            .iter()
            .map(|(k, ts, v)| json!({"key": b64.encode(k), "value": b64.encode(v), "encoding": "base64", "timestamp": ts}))
            .collect();
        for topic in ["readings", "multi"] {
            let sent = c
                .post(format!("{base}/v1/topics/{topic}/records"))
                .json(&json!({"records": records}))
                .send()
                .await;
            if !sent.is_ok_and(|r| r.status().is_success()) {
                return at;
            }
        }
        at += chunk.len();
    }
    at
}

#[test]
fn pipelines_survive_kill_9_with_exactly_once_output() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let events = input();
    let mut rng = fastrand::Rng::with_seed(5);
    rt.block_on(async {
        let mut node = ChildNode::start(dir.path(), &[]);
        let c = client();
        create_topic(&c, &node.url, "readings", 1).await;
        create_topic(&c, &node.url, "multi", 3).await;
        for (name, sql) in [("windows", WINDOWS), ("project", PROJECT)] {
            let (s, b) = post(
                &c,
                &format!("{}/v1/pipelines", node.url),
                &json!({"name": name, "sql": sql}),
            )
            .await;
            assert_eq!(s, 201, "{b}");
        }
        // Five lives ended by kill -9 while records arrive and the
        // pipelines work through them.
        let mut at = 0;
        for kill in 0..5 {
            let producer = tokio::spawn(produce_from(node.url.clone(), events.clone(), at));
            tokio::time::sleep(Duration::from_millis(rng.u64(200..700))).await;
            let (_, p) = get(&c, &format!("{}/v1/pipelines/windows", node.url)).await;
            eprintln!(
                "kill {kill}: produced from {at}, windows lag {} step {}",
                p["lag"], p["step"]
            );
            node.kill9();
            at = producer.await.unwrap();
            node = ChildNode::start(dir.path(), &[]);
        }
        produce_from(node.url.clone(), events.clone(), at).await;
        wait_caught_up(&node.url, &["windows", "project"]).await;
        let (_, p) = get(&c, &format!("{}/v1/pipelines/windows", node.url)).await;
        eprintln!("after the kills: {p}");

        // The reference: one uninterrupted fold over the stored input.
        let input = stored(&node.url, "readings").await;
        assert!(input.len() >= EVENTS, "{}", input.len());
        let mut max: Option<i64> = None;
        let mut windows: BTreeMap<(String, i64), (u64, i64, i64)> = BTreeMap::new();
        let (mut late, mut bad) = (0usize, 0usize);
        for (k, ts, v) in &input {
            let Ok(j) = serde_json::from_slice::<Value>(v) else {
                bad += 1;
                continue;
            };
            if max.is_some_and(|m| *ts < m - 1000) {
                late += 1;
                continue;
            }
            max = Some(max.map_or(*ts, |m| m.max(*ts)));
            let t = j["temp"].as_i64().unwrap();
            let w = windows
                .entry((k.clone(), ts.div_euclid(5000) * 5000))
                .or_insert((0, 0, i64::MIN));
            w.0 += 1;
            w.1 += t;
            w.2 = w.2.max(t);
        }
        let watermark = max.unwrap() - 1000;
        windows.retain(|(_, start), _| start + 5000 <= watermark);

        let stats = records(&node.url, "stats").await;
        let mut got: HashMap<(String, i64), Value> = HashMap::new();
        for (_, v) in &stats {
            let w = (
                v["device"].as_str().unwrap().to_owned(),
                v["window_start"].as_i64().unwrap(),
            );
            assert!(
                got.insert(w.clone(), v.clone()).is_none(),
                "window {w:?} written twice"
            );
        }
        assert_eq!(got.len(), windows.len());
        for (w, (n, total, hi)) in &windows {
            let v = &got[w];
            assert_eq!(
                (v["n"].as_u64(), v["total"].as_i64(), v["hi"].as_i64()),
                (Some(*n), Some(*total), Some(*hi)),
                "{w:?}"
            );
        }
        assert!(late > 100 && bad > 10, "late {late}, bad {bad}");
        assert_eq!(
            records(&node.url, "late").await.len(),
            late,
            "late events, once each"
        );
        assert_eq!(
            records(&node.url, "bad").await.len(),
            bad,
            "dead letters, once each"
        );

        // The projection over three partitions: each stored warm reading
        // once (an input sent twice around a kill is two readings).
        let mut expected: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, _, v) in stored(&node.url, "multi").await {
            if let Ok(j) = serde_json::from_slice::<Value>(&v) {
                if j["temp"].as_i64().unwrap() > 150 {
                    *expected.entry(j["id"].as_u64().unwrap()).or_default() += 1;
                }
            }
        }
        let mut warm: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, v) in records(&node.url, "warm").await {
            *warm.entry(v["id"].as_u64().unwrap()).or_default() += 1;
        }
        assert!(expected.len() > 10_000);
        assert_eq!(warm, expected);
    });
}

#[test]
fn pipeline_api_refuses_bad_requests_with_the_reason() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let node = ChildNode::start(dir.path(), &[("TRIBUTARY_LIMITS__MAX_PIPELINES", "2")]);
        let c = client();
        let url = format!("{}/v1/pipelines", node.url);
        let (s, b) = post(
            &c,
            &url,
            &json!({"name": "p", "sql": "INSERT INTO o SELECT x FROM s WHERE"}),
        )
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("bad_sql")),
            "{b}"
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("line 1, column"),
            "{b}"
        );
        let (s, b) = post(
            &c,
            &url,
            &json!({"name": "p", "sql": "INSERT INTO o SELECT x, COUNT(*) FROM s GROUP BY y"}),
        )
        .await;
        assert_eq!(s, 400, "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("neither in GROUP BY"),
            "{b}"
        );
        let (s, b) = post(
            &c,
            &url,
            &json!({"name": "bad name!", "sql": "INSERT INTO o SELECT x FROM s"}),
        )
        .await;
        assert_eq!(s, 400, "{b}");
        let (s, b) = post(
            &c,
            &url,
            &json!({"name": "p", "sql": "INSERT INTO o SELECT x FROM s", "extra": 1}),
        )
        .await;
        assert_eq!(s, 400, "{b}");
        let (s, _) = post(
            &c,
            &url,
            &json!({"name": "p", "sql": "INSERT INTO o SELECT x FROM s"}),
        )
        .await;
        assert_eq!(s, 201);
        let (s, b) = post(
            &c,
            &url,
            &json!({"name": "p", "sql": "INSERT INTO o2 SELECT x FROM s"}),
        )
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (409, Some("pipeline_exists")),
            "{b}"
        );
        let (s, _) = get(&c, &format!("{url}/nope")).await;
        assert_eq!(s, 404);
        // limits.max_pipelines = 2: a third is refused.
        let (s, _) = post(
            &c,
            &url,
            &json!({"name": "q", "sql": "INSERT INTO o3 SELECT x FROM s"}),
        )
        .await;
        assert_eq!(s, 201);
        let (s, b) = post(
            &c,
            &url,
            &json!({"name": "r", "sql": "INSERT INTO o4 SELECT x FROM s"}),
        )
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (409, Some("too_many_pipelines")),
            "{b}"
        );
        let r = c.delete(format!("{url}/q")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        // Nothing ran for the refused ones.
        let (_, all) = get(&c, &url).await;
        assert_eq!(all["pipelines"].as_array().map(Vec::len), Some(1), "{all}");
        let r = c.delete(format!("{url}/p")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let (_, all) = get(&c, &url).await;
        assert_eq!(all["pipelines"], json!([]));
    });
}

/// A pipeline on an edge: its output is a topic like any other, forwarded
/// to the core exactly once; the same statement on the core, over the
/// readings the edge forwarded, computes the same rows.
#[test]
fn a_pipeline_on_an_edge_forwards_its_rows_and_the_core_computes_the_same() {
    use common::sync::{check_topic, http_addr, start_core, start_edge, sync_url, wait_drained};
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let core = start_core(&dir.path().join("core"), &[]);
        let url = sync_url(&http_addr(&core));
        let edge = start_edge(&dir.path().join("edge"), &url, "edge-p", &[]);
        let c = client();
        create_topic(&c, &edge.url, "readings", 1).await;
        let sql = |out: &str| {
            format!(
                "INSERT INTO {out} SELECT _key AS k, COUNT(*) AS n, AVG(temp) AS avg_temp, window_start \
                 FROM readings GROUP BY _key, TUMBLE(_ts, INTERVAL '100' MILLISECOND)"
            )
        };
        let (s, b) = post(&c, &format!("{}/v1/pipelines", edge.url), &json!({"name": "temps", "sql": sql("temps")})).await;
        assert_eq!(s, 201, "{b}");
        for seq in (0..2000).step_by(200) {
            common::sync::produce(&c, &edge.url, "readings", "p", seq, 200).await.unwrap();
        }
        wait_caught_up(&edge.url, &["temps"]).await;
        wait_drained(&edge.url, Duration::from_secs(120)).await;
        let f = check_topic("edge-p", &edge.url, &core.url, "temps").await;
        assert_eq!(f.records, 19 * 7, "the edge's windows reached the core once each");
        let (s, b) = post(&c, &format!("{}/v1/pipelines", core.url), &json!({"name": "temps-core", "sql": sql("temps_core")})).await;
        assert_eq!(s, 201, "{b}");
        wait_caught_up(&core.url, &["temps-core"]).await;
        let sorted = |mut v: Vec<(Option<Vec<u8>>, Value)>| {
            v.sort_by_key(|(k, v)| (k.clone(), v.to_string()));
            v
        };
        let at_edge = sorted(records(&edge.url, "temps").await);
        let at_core = sorted(records(&core.url, "temps_core").await);
        assert_eq!(at_core.len(), 19 * 7);
        assert_eq!(at_core, at_edge);
    });
}

/// With device auth, `/v1/pipelines` takes the admin token: a pipeline
/// reads and writes any topic.
#[test]
fn with_device_auth_pipelines_take_the_admin_token() {
    const ADMIN: &str = "admin-token-for-pipelines-0123";
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let node = ChildNode::start(
            dir.path(),
            &[
                ("TRIBUTARY_AUTH__MODE", "devices"),
                ("TRIBUTARY_AUTH__ADMIN_TOKEN", ADMIN),
            ],
        );
        let url = format!("{}/v1/pipelines", node.url);
        let body = json!({"name": "p", "sql": "INSERT INTO o SELECT x FROM s"});
        let r = client().post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = client()
            .get(&url)
            .bearer_auth("not-the-admin-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = client()
            .post(&url)
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = client()
            .get(format!("{url}/p"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
}
