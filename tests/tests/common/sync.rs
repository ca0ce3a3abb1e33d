//! Helpers for the store-and-forward tests: start a core and edges as child
//! processes, produce records with keys, headers and timestamps, read whole
//! topics back, and check that what an edge holds reached the core exactly
//! once, byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::{client, get, ChildNode};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Starts a core on `dir`, with quick heartbeats (dead links found in ~1.5 s).
pub fn start_core(dir: &Path, extra: &[(&str, &str)]) -> ChildNode {
    let mut env = vec![("TRIBUTARY_SYNC__HEARTBEAT_MS", "500")];
    env.extend_from_slice(extra);
    ChildNode::start_mode("core", dir, &env)
}

/// The sync URL of a core (or of a proxy in front of it) at `addr`.
pub fn sync_url(addr: &str) -> String {
    format!("ws://{addr}/v1/sync")
}

/// The `host:port` of a node's HTTP API.
pub fn http_addr(node: &ChildNode) -> String {
    node.url.trim_start_matches("http://").to_owned()
}

/// Starts an edge on `dir` forwarding to `url` as `edge_id`, with quick
/// heartbeats, timeouts and backoff, so tests see failures in seconds.
pub fn start_edge(dir: &Path, url: &str, edge_id: &str, extra: &[(&str, &str)]) -> ChildNode {
    let mut env = vec![
        ("TRIBUTARY_UPSTREAM__URL", url),
        ("TRIBUTARY_UPSTREAM__EDGE_ID", edge_id),
        ("TRIBUTARY_UPSTREAM__HEARTBEAT_MS", "300"),
        ("TRIBUTARY_UPSTREAM__TIMEOUT_MS", "2000"),
        ("TRIBUTARY_UPSTREAM__MIN_BACKOFF_MS", "50"),
        ("TRIBUTARY_UPSTREAM__MAX_BACKOFF_MS", "1000"),
    ];
    env.extend_from_slice(extra);
    ChildNode::start_mode("edge", dir, &env)
}

/// A stored record as the HTTP API returns it (`format=binary`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Vec<u8>,
    /// Timestamp (ms).
    pub timestamp: i64,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Rec {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// (edge id, edge partition, edge offset) from the sync headers.
    pub fn origin(&self) -> Option<(String, u32, u64)> {
        let text = |n| String::from_utf8(self.header(n)?.to_vec()).ok();
        Some((
            text("tributary.edge")?,
            text("tributary.edge.partition")?.parse().ok()?,
            text("tributary.edge.offset")?.parse().ok()?,
        ))
    }
}

/// Produces `n` records to `topic` over HTTP: keys `k{seed}-{i % 7}`, JSON
/// values naming `tag` and a sequence number, a header, and an explicit
/// timestamp. Returns the acknowledged positions (empty when refused).
pub async fn produce(
    c: &reqwest::Client,
    base: &str,
    topic: &str,
    tag: &str,
    seq: u64,
    n: u64,
) -> Result<Vec<(u32, u64)>, (u16, Value)> {
    let records: Vec<Value> = (seq..seq + n)
        .map(|i| {
            json!({
                "key": format!("k-{}", i % 7),
                "value": {"tag": tag, "seq": i, "temp": 20.0 + (i % 100) as f64 / 10.0},
                "headers": [{"key": "src", "value": tag}, {"key": "n", "value": i.to_string()}],
                "timestamp": 1_700_000_000_000i64 + i as i64,
            })
        })
        .collect();
    // A node killed mid-request is an answer too (status 0), not a test failure.
    let sent = c
        .post(format!("{base}/v1/topics/{topic}/records"))
        .json(&json!({"records": records}))
        .send()
        .await;
    let (s, body) = match sent {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({"error": e.to_string()})),
    };
    if s != 200 {
        return Err((s, body));
    }
    Ok(body["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| {
            (
                o["partition"].as_u64().expect("p") as u32,
                o["offset"].as_u64().expect("o"),
            )
        })
        .collect())
}

/// Every record of `topic`, partition by partition, in offset order (empty
/// when the topic does not exist).
pub async fn read_topic(base: &str, topic: &str) -> Vec<Rec> {
    read_topic_as(base, topic, None).await
}

/// [`read_topic`] with a bearer token.
pub async fn read_topic_as(base: &str, topic: &str, token: Option<&str>) -> Vec<Rec> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    let c = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let (s, t) = get(&c, &format!("{base}/v1/topics/{topic}")).await;
    if s == 404 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for p in t["partitions"].as_array().expect("partitions") {
        let id = p["partition"].as_u64().expect("id") as u32;
        let mut offset = p["start_offset"].as_u64().expect("start");
        loop {
            let (s, page) = get(&c, &format!("{base}/v1/topics/{topic}/partitions/{id}/records?offset={offset}&limit=5000&format=binary")).await;
            assert_eq!(s, 200, "fetch {topic}/{id}@{offset}: {page}");
            let records = page["records"].as_array().expect("records");
            for r in records {
                let b = |v: &Value| {
                    B64.decode(v.as_str().expect("base64 text"))
                        .expect("base64")
                };
                out.push(Rec {
                    partition: id,
                    offset: r["offset"].as_u64().expect("offset"),
                    key: r["key"].as_str().map(|k| B64.decode(k).expect("key")),
                    value: b(&r["value"]),
                    timestamp: r["timestamp"].as_i64().expect("timestamp"),
                    headers: r["headers"]
                        .as_array()
                        .expect("headers")
                        .iter()
                        .map(|h| (h["key"].as_str().expect("name").to_owned(), b(&h["value"])))
                        .collect(),
                });
            }
            let next = page["next_offset"].as_u64().expect("next");
            if records.is_empty() || next >= page["end_offset"].as_u64().expect("end") {
                break;
            }
            offset = next;
        }
    }
    out
}

/// Sum of a topic's end offsets (0 when it does not exist).
pub async fn end_total(base: &str, topic: &str) -> u64 {
    let (s, t) = get(&client(), &format!("{base}/v1/topics/{topic}")).await;
    if s == 404 {
        return 0;
    }
    t["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["end_offset"].as_u64().expect("end"))
        .sum()
}

/// The edge's `/v1/stats` `sync` section.
pub async fn edge_sync_stats(base: &str) -> Value {
    let (s, v) = get(&client(), &format!("{base}/v1/stats")).await;
    assert_eq!(s, 200, "stats: {v}");
    v["sync"].clone()
}

/// Waits (up to `limit`) until the edge is connected and reports no lag on
/// any forwarded topic. Panics with the last stats otherwise.
pub async fn wait_drained(edge: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let s = edge_sync_stats(edge).await;
        let lagging = s["topics"]
            .as_array()
            .map(|t| t.iter().any(|t| t["lag_events"].as_u64() != Some(0)))
            .unwrap_or(true);
        if s["connected"] == json!(true) && !lagging {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "edge did not drain in {limit:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What [`assert_forwarded`] found.
#[derive(Debug, Default)]
pub struct Forwarded {
    /// Records of this edge at the core.
    pub records: usize,
    /// Per edge partition, how many in-order runs the core's sequence of
    /// edge offsets splits into (1: strictly in edge order; each live lane
    /// opened during a backlog adds one).
    pub runs: BTreeMap<u32, usize>,
    /// Core positions of each edge (partition, offset).
    pub at_core: HashMap<(u32, u64), (u32, u64)>,
}

/// Checks that the records the edge holds (`edge`, e.g. read from its log)
/// and the core's records that came from `edge_id` (`core`) match one to
/// one: each edge record exactly once at the core, with the same key, value,
/// timestamp and headers (plus the three sync headers naming its origin),
/// and nothing at the core the edge does not have.
pub fn assert_forwarded(edge_id: &str, edge: &[Rec], core: &[Rec]) -> Forwarded {
    let mut out = Forwarded::default();
    let mut seen: HashMap<(u32, u64), &Rec> = HashMap::new();
    let mut sequences: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in core {
        let Some((id, p, o)) = r.origin() else {
            continue;
        };
        if id != edge_id {
            continue;
        }
        assert!(
            seen.insert((p, o), r).is_none(),
            "edge {edge_id} {p}/{o} is at the core twice"
        );
        sequences.entry(p).or_default().push(o);
        out.at_core.insert((p, o), (r.partition, r.offset));
    }
    for e in edge {
        let Some(c) = seen.remove(&(e.partition, e.offset)) else {
            panic!(
                "edge {edge_id} record {}/{} never reached the core",
                e.partition, e.offset
            );
        };
        assert_eq!(
            (&c.key, &c.value, c.timestamp),
            (&e.key, &e.value, e.timestamp),
            "record {}/{} differs",
            e.partition,
            e.offset
        );
        let n = e.headers.len();
        assert_eq!(
            &c.headers[..n],
            &e.headers[..],
            "headers of {}/{}",
            e.partition,
            e.offset
        );
        assert_eq!(
            c.headers.len(),
            n + 3,
            "three sync headers on {}/{}",
            e.partition,
            e.offset
        );
        out.records += 1;
    }
    assert!(
        seen.is_empty(),
        "the core has {} records of {edge_id} the edge does not: {:?}",
        seen.len(),
        seen.keys().take(5).collect::<Vec<_>>()
    );
    for (p, seq) in sequences {
        // Greedy: each offset extends the run that ended just below it, or starts one.
        let mut ends: Vec<u64> = Vec::new();
        for o in seq {
            match ends.iter_mut().find(|e| **e + 1 == o) {
                Some(e) => *e = o,
                None => ends.push(o),
            }
        }
        out.runs.insert(p, ends.len());
    }
    out
}

/// Reads `topic` at the edge and at the core and checks them with
/// [`assert_forwarded`].
pub async fn check_topic(edge_id: &str, edge_url: &str, core_url: &str, topic: &str) -> Forwarded {
    let edge = read_topic(edge_url, topic).await;
    let core = read_topic(core_url, topic).await;
    assert_forwarded(edge_id, &edge, &core)
}
