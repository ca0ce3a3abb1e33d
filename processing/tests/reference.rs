//! Pipelines against a reference computed here by a plain fold over the
//! same events (not by the engine): 100,000 readings with out-of-order and
//! late timestamps through every window type, the aggregates, HAVING, a
//! stream–table join and a stream–stream join, run by the manager through
//! the runner and the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tributary_frontend::FrontendContext;
use tributary_processing::manager::{NodeLimits, PipelineConfig};
use tributary_processing::Manager;
use tributary_storage::{AppendRecord, Event, Log, LogConfig, MemStore};

const BASE: i64 = 1_700_000_000_000;

struct Reading {
    key: String,
    ts: i64,
    temp: Option<f64>,
    hum: i64,
}

/// 100,000 readings of 40 devices, 10 ms apart on average, most a little
/// out of order, one in fifty far behind (late for a 2 s lateness).
fn readings(n: usize) -> Vec<Reading> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..n)
        .map(|i| {
            let mut ts = BASE + i as i64 * 10 + rng.i64(-1500..=300);
            if rng.u32(0..50) == 0 {
                ts -= rng.i64(3000..=20_000);
            }
            Reading {
                key: format!("dev-{}", rng.u32(0..40)),
                ts,
                temp: if rng.u32(0..100) == 0 {
                    None
                } else {
                    Some(f64::from(rng.i32(-200..=600)) / 10.0)
                },
                hum: rng.i64(0..=100),
            }
        })
        .collect()
}

fn log() -> Log {
    Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).unwrap()
}

async fn create(log: &Log, topic: &str) {
    let mut c = log.config().topic_defaults.config(topic);
    c.partitions = 1;
    log.create_topic(c).await.unwrap();
}

async fn append(log: &Log, topic: &str, events: Vec<Event>) {
    for chunk in events.chunks(5000) {
        let records = chunk.iter().cloned().map(AppendRecord::from).collect();
        log.append(topic, records).await.unwrap();
    }
}

fn event(key: &str, value: Value, ts: i64) -> Event {
    Event {
        key: Some(key.as_bytes().to_vec()),
        value: Some(serde_json::to_vec(&value).unwrap()),
        timestamp: Some(ts),
        headers: Vec::new(),
    }
}

/// Every record of a topic: (key, value, timestamp).
fn read_all(log: &Log, topic: &str) -> Vec<(String, Value, i64)> {
    let mut out = Vec::new();
    let Ok(info) = log.topic(topic) else {
        return out;
    };
    for p in 0..info.config.partitions {
        let mut at = 0;
        loop {
            let r = log.read(topic, p, at, 10_000, 64 << 20).unwrap();
            for rec in &r.records {
                out.push((
                    String::from_utf8_lossy(rec.key.as_deref().unwrap_or_default()).into_owned(),
                    serde_json::from_slice(rec.value.as_deref().unwrap_or(b"null"))
                        .unwrap_or(Value::Null),
                    rec.timestamp,
                ));
            }
            if r.next_offset <= at || r.records.is_empty() {
                break;
            }
            at = r.next_offset;
        }
    }
    out
}

/// Waits until every pipeline has read its inputs to the end.
async fn settle(m: &Manager, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = names.iter().all(|n| {
            let i = m.get(n).unwrap();
            i["lag"] == 0 && i["rows_in"].as_u64().unwrap_or(0) > 0
        });
        if done {
            // One more commit interval: the step's rows are written before
            // the positions move, so lag 0 already means written.
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pipelines did not catch up: {:?}",
            m.list()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn close(a: &Value, b: f64, what: &str) {
    let a = a
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {a} is not a number"));
    assert!(
        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        "{what}: engine {a}, reference {b}"
    );
}

/// The events the engine keeps (WHERE temp IS NOT NULL, not late), in
/// arrival order, and the final watermark.
fn on_time(rs: &[Reading], lateness: i64) -> (Vec<&Reading>, i64) {
    let mut max: Option<i64> = None;
    let mut kept = Vec::new();
    for r in rs.iter().filter(|r| r.temp.is_some()) {
        if let Some(m) = max {
            if r.ts < m - lateness {
                continue;
            }
        }
        max = Some(max.map_or(r.ts, |m| m.max(r.ts)));
        kept.push(r);
    }
    (kept, max.unwrap() - lateness)
}

#[derive(Default, Clone)]
struct Agg {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: Option<f64>,
    last: f64,
    values: Vec<f64>,
    hum_sum: i64,
}

impl Agg {
    fn add(&mut self, r: &Reading) {
        let t = r.temp.unwrap();
        if self.n == 0 {
            self.min = t;
            self.max = t;
        }
        self.n += 1;
        self.sum += t;
        self.min = self.min.min(t);
        self.max = self.max.max(t);
        self.first.get_or_insert(t);
        self.last = t;
        self.values.push(t);
        self.hum_sum += r.hum;
    }

    fn stddev(&self) -> f64 {
        let mean = self.sum / self.n as f64;
        let ss: f64 = self.values.iter().map(|x| (x - mean).powi(2)).sum();
        (ss / (self.n as f64 - 1.0)).sqrt()
    }

    fn p90(&self) -> f64 {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v[(0.9 * (v.len() - 1) as f64).floor() as usize]
    }
}

fn by_window(rows: &[(String, Value, i64)]) -> BTreeMap<(String, i64, i64), Value> {
    let mut out = BTreeMap::new();
    for (k, v, _) in rows {
        let w = (
            k.clone(),
            v["window_start"].as_i64().unwrap(),
            v["window_end"].as_i64().unwrap(),
        );
        assert!(
            out.insert(w.clone(), v.clone()).is_none(),
            "a window emitted twice: {w:?}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_match_a_reference_fold() {
    let log = log();
    let rs = readings(100_000);
    create(&log, "sensors").await;
    create(&log, "devices").await;
    // The table first (a stream–table join reads the table as of each step).
    let sites: Vec<Event> = (0..40)
        .filter(|i| i % 7 != 3)
        .map(|i| {
            event(
                &format!("dev-{i}"),
                json!({"site": format!("site-{}", i % 5)}),
                BASE,
            )
        })
        .collect();
    append(&log, "devices", sites).await;
    let cx = FrontendContext::new(log.clone(), CancellationToken::new(), "core");
    let sql = |name: &str, sql: &str| PipelineConfig {
        name: name.into(),
        sql: sql.into(),
        paused: false,
    };
    let m = Manager::start(
        &cx,
        vec![
            sql(
                "tumble",
                "INSERT INTO tumble_out SELECT _key AS device, COUNT(*) AS n, SUM(temp) AS s, AVG(temp) AS a, \
                 MIN(temp) AS lo, MAX(temp) AS hi, FIRST_VALUE(temp) AS f, LAST_VALUE(temp) AS l, \
                 STDDEV(temp) AS sd, APPROX_PERCENTILE(temp, 0.9) AS p90, SUM(hum) AS h, window_start, window_end \
                 FROM sensors WHERE temp IS NOT NULL \
                 GROUP BY _key, TUMBLE(_ts, INTERVAL '10' SECOND) HAVING COUNT(*) > 3 \
                 WITH (lateness = '2s', late_topic = 'late_readings')",
            ),
            sql(
                "hop",
                "INSERT INTO hop_out SELECT _key, COUNT(*) AS n, AVG(temp) AS a, window_start, window_end \
                 FROM sensors WHERE temp IS NOT NULL \
                 GROUP BY _key, HOP(_ts, INTERVAL '5' SECOND, INTERVAL '15' SECOND) WITH (lateness = '2s')",
            ),
            sql(
                "session",
                "INSERT INTO session_out SELECT _key, COUNT(*) AS n, MAX(temp) AS hi, window_start, window_end \
                 FROM sensors WHERE temp IS NOT NULL AND _key IN ('dev-1', 'dev-2', 'dev-3') AND hum < 20 \
                 GROUP BY _key, SESSION(_ts, INTERVAL '3' SECOND) WITH (lateness = '2s')",
            ),
            sql(
                "counted",
                "INSERT INTO count_out SELECT _key, COUNT(*) AS n, SUM(hum) AS h, LAST_VALUE(hum) AS l, window_start, window_end \
                 FROM sensors WHERE temp IS NOT NULL GROUP BY _key, COUNT_WINDOW(7)",
            ),
            sql(
                "enrich",
                "INSERT INTO enriched SELECT s._key AS device, t.site, s.temp, UPPER(t.site) AS up \
                 FROM sensors s LEFT JOIN devices t ON s._key = t._key WHERE s.temp > 50",
            ),
            sql(
                "project",
                "INSERT INTO projected SELECT _key AS d, CASE WHEN temp >= 30 THEN 'hot' WHEN temp < 0 THEN 'cold' ELSE 'ok' END AS band, \
                 CAST(temp * 10 AS INT) AS deci, ROUND(temp / 3, 2) AS third, hum % 7 AS m \
                 FROM sensors WHERE hum BETWEEN 10 AND 60 AND temp IS NOT NULL",
            ),
        ], NodeLimits::default()
    )
    .unwrap();
    let events: Vec<Event> = rs
        .iter()
        .map(|r| event(&r.key, json!({"temp": r.temp, "hum": r.hum}), r.ts))
        .collect();
    append(&log, "sensors", events).await;
    settle(
        &m,
        &["tumble", "hop", "session", "counted", "enrich", "project"],
    )
    .await;

    // TUMBLE with every aggregate and HAVING.
    let lateness = 2000;
    let (kept, wm) = on_time(&rs, lateness);
    let mut tumble: BTreeMap<(String, i64, i64), Agg> = BTreeMap::new();
    for r in &kept {
        let start = r.ts.div_euclid(10_000) * 10_000;
        tumble
            .entry((r.key.clone(), start, start + 10_000))
            .or_default()
            .add(r);
    }
    tumble.retain(|(_, _, end), a| *end <= wm && a.n > 3);
    let got = by_window(&read_all(&log, "tumble_out"));
    assert_eq!(got.len(), tumble.len(), "tumbling windows");
    assert!(got.len() > 1000);
    for (w, a) in &tumble {
        let v = &got[w];
        assert_eq!(v["device"], json!(w.0));
        assert_eq!(v["n"], json!(a.n));
        close(&v["s"], a.sum, "sum");
        close(&v["a"], a.sum / a.n as f64, "avg");
        close(&v["lo"], a.min, "min");
        close(&v["hi"], a.max, "max");
        close(&v["f"], a.first.unwrap(), "first");
        close(&v["l"], a.last, "last");
        close(&v["sd"], a.stddev(), "stddev");
        assert_eq!(v["h"], json!(a.hum_sum));
        let p = v["p90"].as_f64().unwrap();
        let exact = a.p90();
        assert!(
            (p - exact).abs() <= 0.0101 * exact.abs() + 1e-9,
            "p90 {p} vs {exact}"
        );
    }
    let late_expected = rs.iter().filter(|r| r.temp.is_some()).count() - kept.len();
    assert!(late_expected > 500);
    assert_eq!(read_all(&log, "late_readings").len(), late_expected);
    assert_eq!(m.get("tumble").unwrap()["late"], json!(late_expected));

    // HOP: each event in three windows.
    let mut hop: BTreeMap<(String, i64, i64), Agg> = BTreeMap::new();
    for r in &kept {
        let last = r.ts.div_euclid(5000) * 5000;
        for start in [last - 10_000, last - 5000, last] {
            hop.entry((r.key.clone(), start, start + 15_000))
                .or_default()
                .add(r);
        }
    }
    hop.retain(|(_, _, end), _| *end <= wm);
    let got = by_window(&read_all(&log, "hop_out"));
    assert_eq!(got.len(), hop.len(), "hopping windows");
    for (w, a) in &hop {
        assert_eq!(got[w]["n"], json!(a.n), "{w:?}");
        close(&got[w]["a"], a.sum / a.n as f64, "hop avg");
    }

    // SESSION: per key, the kept events sorted by time, split at gaps ≥ 3 s.
    let session_filter =
        |r: &&Reading| ["dev-1", "dev-2", "dev-3"].contains(&r.key.as_str()) && r.hum < 20;
    let (kept_s, wm_s) = {
        let mut max: Option<i64> = None;
        let mut kept = Vec::new();
        for r in rs
            .iter()
            .filter(|r| r.temp.is_some())
            .filter(session_filter)
        {
            if max.is_some_and(|m| r.ts < m - lateness) {
                continue;
            }
            max = Some(max.map_or(r.ts, |m| m.max(r.ts)));
            kept.push(r);
        }
        (kept, max.unwrap() - lateness)
    };
    let mut per_key: HashMap<&str, Vec<&Reading>> = HashMap::new();
    for r in kept_s {
        per_key.entry(&r.key).or_default().push(r);
    }
    let mut sessions: BTreeMap<(String, i64, i64), (u64, f64)> = BTreeMap::new();
    for (k, mut v) in per_key {
        v.sort_by_key(|r| r.ts);
        let mut i = 0;
        while i < v.len() {
            let (start, mut last, mut n, mut hi) = (v[i].ts, v[i].ts, 0u64, f64::MIN);
            while i < v.len() && v[i].ts < last + 3000 {
                last = last.max(v[i].ts);
                n += 1;
                hi = hi.max(v[i].temp.unwrap());
                i += 1;
            }
            if last + 3000 <= wm_s {
                sessions.insert((k.to_owned(), start, last + 3000), (n, hi));
            }
        }
    }
    let got = by_window(&read_all(&log, "session_out"));
    assert!(sessions.len() > 100, "{}", sessions.len());
    assert_eq!(got.len(), sessions.len(), "session windows");
    for (w, (n, hi)) in &sessions {
        assert_eq!(got[w]["n"], json!(n), "{w:?}");
        close(&got[w]["hi"], *hi, "session max");
    }

    // COUNT_WINDOW(7): per key, every 7 events in arrival order (no lateness).
    let mut counting: HashMap<&str, Vec<&Reading>> = HashMap::new();
    let mut counted = Vec::new();
    for r in rs.iter().filter(|r| r.temp.is_some()) {
        let v = counting.entry(&r.key).or_default();
        v.push(r);
        if v.len() == 7 {
            counted.push((
                r.key.clone(),
                v.iter().map(|r| r.hum).sum::<i64>(),
                r.hum,
                v[0].ts,
                r.ts,
            ));
            v.clear();
        }
    }
    let got = read_all(&log, "count_out");
    assert_eq!(got.len(), counted.len(), "count windows");
    let mut got_by_key: HashMap<String, Vec<&Value>> = HashMap::new();
    for (k, v, _) in &got {
        got_by_key.entry(k.clone()).or_default().push(v);
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (k, h, l, first, last) in &counted {
        let i = seen.entry(k.clone()).or_default();
        let v = got_by_key[k][*i];
        *i += 1;
        assert_eq!(v["n"], json!(7));
        assert_eq!(v["h"], json!(h));
        assert_eq!(v["l"], json!(l));
        assert_eq!(
            (v["window_start"].as_i64(), v["window_end"].as_i64()),
            (Some(*first), Some(*last))
        );
    }

    // Stream–table LEFT JOIN.
    let enriched = read_all(&log, "enriched");
    let expected: Vec<(String, Option<String>, f64)> = rs
        .iter()
        .filter(|r| r.temp.is_some_and(|t| t > 50.0))
        .map(|r| {
            let i: u32 = r.key[4..].parse().unwrap();
            (
                r.key.clone(),
                (i % 7 != 3).then(|| format!("site-{}", i % 5)),
                r.temp.unwrap(),
            )
        })
        .collect();
    assert_eq!(enriched.len(), expected.len());
    for ((k, v, _), (ek, site, t)) in enriched.iter().zip(&expected) {
        assert_eq!(k, ek);
        assert_eq!(v["device"], json!(ek));
        assert_eq!(v["site"], json!(site));
        assert_eq!(v["up"], json!(site.as_ref().map(|s| s.to_uppercase())));
        close(&v["temp"], *t, "joined temp");
    }

    // Projection with CASE, CAST, ROUND, %.
    let projected = read_all(&log, "projected");
    let expected: Vec<&Reading> = rs
        .iter()
        .filter(|r| (10..=60).contains(&r.hum) && r.temp.is_some())
        .collect();
    assert_eq!(projected.len(), expected.len());
    for ((_, v, ts), r) in projected.iter().zip(&expected) {
        let t = r.temp.unwrap();
        let band = if t >= 30.0 {
            "hot"
        } else if t < 0.0 {
            "cold"
        } else {
            "ok"
        };
        assert_eq!(v["band"], json!(band));
        assert_eq!(v["deci"], json!((t * 10.0).trunc() as i64));
        close(&v["third"], (t / 3.0 * 100.0).round() / 100.0, "round");
        assert_eq!(v["m"], json!(r.hum % 7));
        assert_eq!(*ts, r.ts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stream_join_finds_every_pair_within_the_bound() {
    let log = log();
    create(&log, "orders").await;
    create(&log, "payments").await;
    let mut rng = fastrand::Rng::with_seed(11);
    let orders: Vec<(u32, i64)> = (0..5000)
        .map(|i| (rng.u32(0..2000), BASE + i * 20))
        .collect();
    let payments: Vec<(u32, i64)> = (0..5000)
        .map(|i| (rng.u32(0..2000), BASE + i * 20 + rng.i64(-3000..=3000)))
        .collect();
    let cx = FrontendContext::new(log.clone(), CancellationToken::new(), "core");
    let m = Manager::start(
        &cx,
        vec![PipelineConfig {
            name: "paid".into(),
            sql: "INSERT INTO paid SELECT o.id AS id, o._ts AS ordered, p._ts AS paid, p.amount \
                  FROM orders o JOIN payments p ON o.id = p.id \
                  AND p._ts BETWEEN o._ts - INTERVAL '1' SECOND AND o._ts + INTERVAL '2' SECOND \
                  WITH (lateness = '1h')"
                .into(),
            paused: false,
        }],
        NodeLimits::default(),
    )
    .unwrap();
    let ev = |(id, ts): &(u32, i64), extra: Value| {
        let mut v = json!({"id": id});
        if let Value::Object(e) = extra {
            v.as_object_mut().unwrap().extend(e);
        }
        event(&id.to_string(), v, *ts)
    };
    append(
        &log,
        "orders",
        orders.iter().map(|o| ev(o, json!({}))).collect(),
    )
    .await;
    append(
        &log,
        "payments",
        payments
            .iter()
            .map(|p| ev(p, json!({"amount": p.0 * 3})))
            .collect(),
    )
    .await;
    settle(&m, &["paid"]).await;
    let mut expected: Vec<(u32, i64, i64)> = Vec::new();
    for o in &orders {
        for p in &payments {
            if o.0 == p.0 && p.1 >= o.1 - 1000 && p.1 <= o.1 + 2000 {
                expected.push((o.0, o.1, p.1));
            }
        }
    }
    let mut got: Vec<(u32, i64, i64)> = read_all(&log, "paid")
        .iter()
        .map(|(_, v, _)| {
            assert_eq!(v["amount"], json!(v["id"].as_u64().unwrap() * 3));
            (
                v["id"].as_u64().unwrap() as u32,
                v["ordered"].as_i64().unwrap(),
                v["paid"].as_i64().unwrap(),
            )
        })
        .collect();
    expected.sort_unstable();
    got.sort_unstable();
    assert!(expected.len() > 20, "{}", expected.len());
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_new_groups_count_them_and_dead_letter_them() {
    let log = log();
    create(&log, "in").await;
    let cx = FrontendContext::new(log.clone(), CancellationToken::new(), "core");
    let m = Manager::start(
        &cx,
        vec![PipelineConfig {
            name: "capped".into(),
            sql: "INSERT INTO capped SELECT _key, COUNT(*) AS n FROM in GROUP BY _key \
                  WITH (max_groups = 5, dead_letter_topic = 'capped_bad')"
                .into(),
            paused: false,
        }],
        NodeLimits::default(),
    )
    .unwrap();
    // Ten keys, three events each: the first five keys take the five groups.
    let events: Vec<Event> = (0..30)
        .map(|i| event(&format!("k{}", i % 10), json!({"i": i}), BASE + i))
        .collect();
    append(&log, "in", events).await;
    settle(&m, &["capped"]).await;
    let info = m.get("capped").unwrap();
    assert_eq!(info["dropped"], json!(15), "{info}");
    assert_eq!(info["open_groups"], json!(5), "{info}");
    let out = read_all(&log, "capped");
    assert_eq!(out.len(), 15);
    let mut keys: Vec<&str> = out.iter().map(|(k, _, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
    let bad = read_all(&log, "capped_bad");
    assert_eq!(bad.len(), 15);
    assert!(bad.iter().all(|(k, _, _)| k.as_str() >= "k5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_rows_are_counted_and_dead_lettered_and_the_pipeline_goes_on() {
    let log = log();
    create(&log, "in").await;
    let cx = FrontendContext::new(log.clone(), CancellationToken::new(), "core");
    let m = Manager::start(
        &cx,
        vec![PipelineConfig {
            name: "strict".into(),
            sql: "INSERT INTO strict SELECT 100 / d AS q, UPPER(name) AS n FROM in \
                  WITH (dead_letter_topic = 'strict_bad')"
                .into(),
            paused: false,
        }],
        NodeLimits::default(),
    )
    .unwrap();
    let values = [
        json!({"d": 4, "name": "a"}),
        json!({"d": 0, "name": "b"}),
        json!({"d": 5, "name": 7}),
        json!({"d": "x", "name": "c"}),
        json!({"d": 10}),
    ];
    let mut events: Vec<Event> = values.iter().map(|v| event("k", v.clone(), BASE)).collect();
    events.insert(2, Event::new(b"not json".to_vec()));
    append(&log, "in", events).await;
    settle(&m, &["strict"]).await;
    let info = m.get("strict").unwrap();
    assert_eq!(
        (info["rows_in"].as_u64(), info["errors"].as_u64()),
        (Some(6), Some(4)),
        "{info}"
    );
    let out: Vec<Value> = read_all(&log, "strict")
        .into_iter()
        .map(|(_, v, _)| v)
        .collect();
    assert_eq!(
        out,
        vec![json!({"q": 25, "n": "A"}), json!({"q": 10, "n": null})]
    );
    let bad = read_all(&log, "strict_bad");
    assert_eq!(bad.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_wide_state_budget_holds_every_pipeline() {
    let log = log();
    create(&log, "in").await;
    let cx = FrontendContext::new(log.clone(), CancellationToken::new(), "core");
    let sql = |name: &str| {
        PipelineConfig {
        name: name.into(),
        sql: format!("INSERT INTO {name}_out SELECT _key, COUNT(*) AS n, LAST_VALUE(pad) AS p FROM in GROUP BY _key"),
        paused: false,
    }
    };
    // Two pipelines, each far below its own 64 MiB, together over 200 kB.
    let m = Manager::start(
        &cx,
        vec![sql("a"), sql("b")],
        NodeLimits {
            max_pipelines: 2,
            max_state_bytes: 200_000,
        },
    )
    .unwrap();
    for round in 0..20 {
        let events: Vec<Event> = (0..100)
            .map(|i| {
                event(
                    &format!("k{round}-{i}"),
                    json!({"pad": "x".repeat(100)}),
                    BASE + i,
                )
            })
            .collect();
        append(&log, "in", events).await;
        settle(&m, &["a", "b"]).await;
        // Let a checkpoint measure the state.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (a, b) = (m.get("a").unwrap(), m.get("b").unwrap());
    let dropped = a["dropped"].as_u64().unwrap() + b["dropped"].as_u64().unwrap();
    assert!(dropped > 0, "{a} {b}");
    let kept = a["state_bytes"].as_u64().unwrap() + b["state_bytes"].as_u64().unwrap();
    // Over by at most the groups of the step that crossed it.
    assert!(kept < 200_000 + 2 * 100 * 400, "{kept}");
    let more = PipelineConfig {
        name: "c".into(),
        sql: "INSERT INTO c_out SELECT * FROM in".into(),
        paused: false,
    };
    let refused = m.create(serde_json::to_value(more).unwrap()).await;
    assert!(matches!(
        refused,
        Err(tributary_processing::manager::Error::Full(2))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_output_cannot_take_are_dead_letters_not_a_stuck_pipeline() {
    let log = log();
    create(&log, "in").await;
    let mut tiny = log.config().topic_defaults.config("tiny_out");
    tiny.max_event_bytes = 120;
    log.create_topic(tiny).await.unwrap();
    let cx = FrontendContext::new(log.clone(), CancellationToken::new(), "core");
    let m = Manager::start(
        &cx,
        vec![PipelineConfig {
            name: "tiny".into(),
            sql: "INSERT INTO tiny_out SELECT s FROM in WITH (dead_letter_topic = 'tiny_bad')"
                .into(),
            paused: false,
        }],
        NodeLimits::default(),
    )
    .unwrap();
    let events: Vec<Event> = [5, 500, 7]
        .iter()
        .map(|n| event("k", json!({"s": "x".repeat(*n)}), BASE))
        .collect();
    append(&log, "in", events).await;
    settle(&m, &["tiny"]).await;
    let out = read_all(&log, "tiny_out");
    assert_eq!(out.len(), 2, "{out:?}");
    let bad = read_all(&log, "tiny_bad");
    assert_eq!(bad.len(), 1);
    let info = m.get("tiny").unwrap();
    assert_eq!(
        (info["rows_out"].as_u64(), info["errors"].as_u64()),
        (Some(2), Some(1)),
        "{info}"
    );
    assert_eq!(info["last_error"], Value::Null);
}
