//! Connectors: an HTTP sink delivering to a webhook server that fails,
//! stalls and answers 429 (every record delivered, at least once, each
//! idempotency key naming exactly its records), dead letters for what is
//! refused for good, and the connector API (create, describe, pause,
//! resume, restart, delete), its checks, and connectors surviving a
//! restart of the node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{client, create_topic, get, post, InProcessNode};
use serde_json::{json, Value};
use tributary_gateway::config::Mode;

/// What the test webhook server received: one entry per request.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    key: String,
    records: Vec<Value>,
    answered: u16,
}

/// How the test server answers request number `n` (from 0, in order of
/// arrival) carrying
/// `records`: a status, an optional `Retry-After`, and a delay first.
type Script = Arc<dyn Fn(usize, &[Value]) -> (u16, Option<u64>, Duration) + Send + Sync>;

#[derive(Clone)]
struct Hook {
    seen: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<std::sync::atomic::AtomicUsize>,
    script: Script,
}

async fn hook(State(h): State<Hook>, headers: HeaderMap, body: String) -> Response {
    let v: Value = serde_json::from_str(&body).expect("the sink posts JSON");
    let records = match v.get("records") {
        Some(Value::Array(a)) => a.clone(),
        _ => vec![v],
    };
    let n = h.arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (status, retry_after, delay) = (h.script)(n, &records);
    tokio::time::sleep(delay).await;
    h.seen.lock().expect("lock").push(Received {
        at: Instant::now(),
        key: headers
            .get("idempotency-key")
            .and_then(|k| k.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        records,
        answered: status,
    });
    let mut r = (StatusCode::from_u16(status).expect("status"), "answer").into_response();
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert("retry-after", s.to_string().parse().expect("header"));
    }
    r
}

/// Starts the test webhook server; its URL and what it saw.
async fn webhook(script: Script) -> (String, Arc<Mutex<Vec<Received>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Hook {
            seen: seen.clone(),
            arrived: Arc::default(),
            script,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Produces `n` records `{"n": i}` (key `k<i>`) to `topic` over HTTP.
async fn produce(base: &str, topic: &str, from: u64, n: u64) {
    let c = client();
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(500) {
        let records: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"key": format!("k{i}"), "value": {"n": i}}))
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

/// Waits until `name` has delivered or dead-lettered `n` records and has
/// no lag.
async fn wait_delivered(base: &str, name: &str, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = connector(base, name).await;
        let done =
            v["delivered_records"].as_u64().unwrap_or(0) + v["dead_letters"].as_u64().unwrap_or(0);
        if done >= n && v["lag_records"] == 0 {
            return v;
        }
        assert!(Instant::now() < deadline, "not delivered in 90 s: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `n` values the server accepted (2xx), with how often each came.
fn accepted(seen: &Mutex<Vec<Received>>) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for r in seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|r| r.answered < 300)
    {
        for rec in &r.records {
            *out.entry(rec["value"]["n"].as_u64().expect("n"))
                .or_insert(0) += 1;
        }
    }
    out
}

/// Creates a connector over the API; its answer (201 asserted).
async fn create(base: &str, body: &Value) -> Value {
    let (s, v) = post(&client(), &format!("{base}/v1/connectors"), body).await;
    assert_eq!(s, 201, "{v}");
    v
}

fn http_sink(name: &str, url: &str, extra: Value) -> Value {
    let mut v = json!({"name": name, "kind": "http_sink", "topics": ["events"], "url": url});
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sink_delivers_every_record_through_errors_stalls_and_429() {
    let node = InProcessNode::start("").await;
    create_topic(&client(), &node.url, "events", 3).await;
    produce(&node.url, "events", 0, 2000).await;
    // Request 3, 7, 11, …: 500; 5: 429 with Retry-After 1 s; 9: stalls
    // past the sink's timeout; the rest 200.
    let script: Script = Arc::new(|n, _| match n {
        5 => (429, Some(1), Duration::ZERO),
        9 => (200, None, Duration::from_millis(1500)),
        n if n % 4 == 3 => (500, None, Duration::ZERO),
        _ => (200, None, Duration::ZERO),
    });
    let (url, seen) = webhook(script).await;
    let v = create(&node.url, &http_sink(
            "hooks",
            &url,
            json!({"batch_size": 50, "timeout_ms": 700, "min_backoff_ms": 10, "max_backoff_ms": 2000,
                   "headers": {"X-Token": "plain-secret"}}),
        )).await;
    assert_eq!(v["state"], "running", "{v}");
    let v = wait_delivered(&node.url, "hooks", 2000).await;
    assert_eq!(v["dead_letters"], 0, "{v}");
    assert!(v["retries"].as_u64().unwrap_or(0) >= 3, "{v}");
    let got = accepted(&seen);
    let want: BTreeSet<u64> = (0..2000).collect();
    assert_eq!(
        got.keys().copied().collect::<BTreeSet<_>>(),
        want,
        "every record delivered"
    );
    // At least once: repeats only where an answer was lost (the stalled
    // request), and every key names exactly its records' positions.
    let seen = seen.lock().expect("lock").clone();
    for r in &seen {
        let (topic, rest) = r.key.split_once('/').expect("topic/partition/first-last");
        assert_eq!(topic, "events");
        let (p, range) = rest.split_once('/').expect("partition/range");
        let (first, last) = range.split_once('-').expect("first-last");
        let offsets: Vec<u64> = r
            .records
            .iter()
            .map(|x| x["offset"].as_u64().expect("offset"))
            .collect();
        assert_eq!(
            offsets.first().map(|o| o.to_string()).as_deref(),
            Some(first),
            "{}",
            r.key
        );
        assert_eq!(
            offsets.last().map(|o| o.to_string()).as_deref(),
            Some(last),
            "{}",
            r.key
        );
        assert!(r.records.iter().all(|x| x["partition"]
            .as_u64()
            .map(|v| v.to_string())
            .as_deref()
            == Some(p)
            && x["topic"] == "events"));
    }
    let by_key: BTreeSet<&str> = seen
        .iter()
        .filter(|r| r.answered < 300)
        .map(|r| r.key.as_str())
        .collect();
    let distinct: usize = seen
        .iter()
        .filter(|r| r.answered < 300)
        .map(|r| (r.key.as_str(), r.records.len()))
        .collect::<BTreeMap<_, _>>()
        .values()
        .sum();
    assert_eq!(
        distinct,
        2000,
        "deduplicated by key, each record once ({} keys)",
        by_key.len()
    );
    // The 429's Retry-After was honoured: the next request waited 1 s.
    assert!(
        seen[6].at.duration_since(seen[5].at) >= Duration::from_millis(950),
        "Retry-After 1 s"
    );
    // The secret header value is never shown back.
    let (_, stats) = get(&client(), &format!("{}/v1/stats", node.url)).await;
    let listed = &stats["connectors"][0];
    assert_eq!(listed["name"], "hooks", "{stats}");
    assert!(
        common::metric(
            &node.url,
            "tributary_connector_delivered_records_total{connector=\"hooks\",kind=\"http_sink\"}",
            None
        )
        .await
            >= 2000
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_refused_for_good_or_failing_too_long_go_to_the_dead_letter_topic() {
    let node = InProcessNode::start("").await;
    create_topic(&client(), &node.url, "events", 1).await;
    produce(&node.url, "events", 0, 20).await;
    // n = 7: 400 (refused for good); n = 13: 503 every time.
    let script: Script =
        Arc::new(
            |_, records| match records.first().and_then(|r| r["value"]["n"].as_u64()) {
                Some(7) => (400, None, Duration::ZERO),
                Some(13) => (503, None, Duration::ZERO),
                _ => (200, None, Duration::ZERO),
            },
        );
    let (url, seen) = webhook(script).await;
    create(
        &node.url,
        &http_sink(
            "dl",
            &url,
            json!({"batch_size": 1, "max_attempts": 3, "min_backoff_ms": 5}),
        ),
    )
    .await;
    let v = wait_delivered(&node.url, "dl", 20).await;
    assert_eq!(
        (v["delivered_records"].as_u64(), v["dead_letters"].as_u64()),
        (Some(18), Some(2)),
        "{v}"
    );
    let got = accepted(&seen);
    assert_eq!(got.len(), 18);
    assert!(!got.contains_key(&7) && !got.contains_key(&13));
    let tries_13 = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|r| r.records[0]["value"]["n"] == 13)
        .count();
    assert_eq!(tries_13, 3, "max_attempts");
    let (s, page) = get(
        &client(),
        &format!(
            "{}/v1/topics/dl.dead-letter/partitions/0/records?offset=0",
            node.url
        ),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    let dead = page["records"].as_array().expect("records");
    assert_eq!(dead.len(), 2, "{page}");
    let header = |r: &Value, name: &str| -> String {
        r["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|x| x["key"] == name))
            .and_then(|x| x["value"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(dead[0]["value"], json!({"n": 7}));
    assert_eq!(dead[0]["key"], "k7");
    assert!(
        header(&dead[0], "dead_letter.error").starts_with("HTTP 400"),
        "{page}"
    );
    assert_eq!(header(&dead[0], "dead_letter.offset"), "7");
    assert_eq!(header(&dead[0], "dead_letter.topic"), "events");
    assert!(
        header(&dead[1], "dead_letter.error").contains("503"),
        "{page}"
    );
    assert!(
        header(&dead[1], "dead_letter.error").contains("after 3 attempts"),
        "{page}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_api_checks_pauses_resumes_restarts_deletes_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let c = client();
    create_topic(&c, &node.url, "events", 2).await;
    let (url, seen) = webhook(Arc::new(|_, _| (200, None, Duration::ZERO))).await;
    let api = format!("{}/v1/connectors", node.url);
    // Refused, each naming what is wrong.
    for (bad, names) in [
        (json!({"name": "x", "kind": "smtp_sink"}), "kind"),
        (http_sink("x", "gopher://h", json!({})), "url"),
        (http_sink("x", &url, json!({"batch": 5})), "batch"),
        (http_sink("bad name", &url, json!({})), "name"),
    ] {
        let (s, b) = post(&c, &api, &bad).await;
        assert_eq!(s, 400, "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(names),
            "{b}"
        );
    }
    let (s, b) = post(
        &c,
        &api,
        &http_sink("hooks", &url, json!({"batch_size": 10})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = post(&c, &api, &http_sink("hooks", &url, json!({}))).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("connector_exists")),
        "{b}"
    );
    produce(&node.url, "events", 0, 100).await;
    wait_delivered(&node.url, "hooks", 100).await;
    // Paused: nothing more goes out; resumed: the rest does.
    let (s, b) = post(&c, &format!("{api}/hooks/pause"), &json!({})).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("paused")), "{b}");
    produce(&node.url, "events", 100, 50).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(accepted(&seen).len(), 100, "nothing delivered while paused");
    assert_eq!(connector(&node.url, "hooks").await["lag_records"], 50);
    let (s, b) = post(&c, &format!("{api}/hooks/resume"), &json!({})).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("running")), "{b}");
    wait_delivered(&node.url, "hooks", 150).await;
    let (s, b) = post(&c, &format!("{api}/hooks/restart"), &json!({})).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("running")), "{b}");
    // Stopped and started again: the connector is back, from its position.
    node.stop().await;
    let node = InProcessNode::start_in(dir.path(), Mode::Edge, "").await;
    let v = connector(&node.url, "hooks").await;
    assert_eq!(
        (v["state"].as_str(), v["source"].as_str()),
        (Some("running"), Some("api")),
        "{v}"
    );
    produce(&node.url, "events", 150, 50).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted(&seen).len() < 200 {
        assert!(Instant::now() < deadline, "not delivered after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = accepted(&seen);
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    assert!(
        got.values().all(|&n| n == 1),
        "a clean stop delivers nothing twice"
    );
    let api = format!("{}/v1/connectors", node.url);
    let r = client()
        .delete(format!("{api}/hooks"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (s, _) = get(&c, &format!("{api}/hooks")).await;
    assert_eq!(s, 404);
    let (s, b) = get(&c, &api).await;
    assert_eq!(
        (s, b["connectors"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{b}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_from_the_config_file_run_and_are_changed_only_there() {
    let (url, seen) = webhook(Arc::new(|_, _| (200, None, Duration::ZERO))).await;
    let toml = format!(
        "[[topics]]\nname = \"events\"\npartitions = 1\n\n[[connectors]]\nname = \"filed\"\nkind = \"http_sink\"\ntopics = [\"events\"]\nurl = \"{url}\"\n"
    );
    let node = InProcessNode::start(&toml).await;
    produce(&node.url, "events", 0, 10).await;
    let v = wait_delivered(&node.url, "filed", 10).await;
    assert_eq!(v["source"], "config", "{v}");
    assert_eq!(accepted(&seen).len(), 10);
    let r = client()
        .delete(format!("{}/v1/connectors/filed", node.url))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 409);
    node.stop().await;
    // A bad one is refused before anything runs, naming where.
    let bad = "[[connectors]]\nname = \"x\"\nkind = \"http_sink\"\ntopics = [\"t\"]\nurl = \"http://h\"\nbatch_size = 0\n";
    let e = tributary_gateway::config::Config::from_parts(bad, Vec::new()).expect_err("invalid");
    let e = e.to_string();
    assert!(
        e.contains("connectors[0]") && e.contains("batch_size"),
        "{e}"
    );
}

/// At least once across kill -9: the node is killed three times while its
/// sink delivers; afterwards every record has reached the webhook, and a
/// record came twice only in a batch whose delivery a kill cut off before
/// its position was committed (at most one batch per kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sink_killed_9_again_and_again_delivers_every_record_at_least_once() {
    let (url, seen) = webhook(Arc::new(|_, _| (200, None, Duration::from_millis(15)))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = common::ChildNode::start(dir.path(), &[]);
    create_topic(&client(), &node.url, "events", 2).await;
    produce(&node.url, "events", 0, 3000).await;
    create(
        &node.url,
        &http_sink("crashy", &url, json!({"batch_size": 20})),
    )
    .await;
    for _ in 0..3 {
        // Mid-delivery: the webhook has taken some, not all.
        let before = accepted(&seen).len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while accepted(&seen).len() < before + 100 {
            assert!(Instant::now() < deadline, "the sink does not deliver");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node.kill9();
        node = common::ChildNode::start(dir.path(), &[]);
    }
    wait_delivered(&node.url, "crashy", 0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted(&seen).len() < 3000 {
        assert!(Instant::now() < deadline, "not every record delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = accepted(&seen);
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (0..3000).collect::<Vec<_>>()
    );
    let twice: usize = got.values().map(|&n| n - 1).sum();
    assert!(
        twice <= 3 * 20,
        "{twice} records came twice: more than a batch per kill"
    );
    assert_eq!(connector(&node.url, "crashy").await["lag_records"], 0);
}

/// With device auth, the connector API takes the admin token: a connector
/// sends topics out of the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_device_auth_connectors_take_the_admin_token() {
    const ADMIN: &str = "admin-token-for-connectors-0123";
    let node = InProcessNode::start(&format!(
        "[auth]\nmode = \"devices\"\nadmin_token = \"{ADMIN}\"\n"
    ))
    .await;
    let url = format!("{}/v1/connectors", node.url);
    let r = client().get(&url).send().await.expect("get");
    assert_eq!(r.status(), 401);
    let r = client()
        .get(&url)
        .bearer_auth("not-the-admin-token")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let r = client()
        .get(&url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    node.stop().await;
}
