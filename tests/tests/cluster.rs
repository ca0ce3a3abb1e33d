//! The core cluster with real processes on loopback: three `tributary core`
//! nodes started with the same peers form a cluster by themselves; writes
//! on any node are acknowledged once a majority holds them; the leader is
//! killed -9 again and again while writers go on. After each run: every
//! acknowledged record is on every node exactly once, the nodes' logs are
//! identical offset by offset, and nothing is there that no writer sent.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, get, read_all, ChildNode};
use serde_json::{json, Value};

const T: &str = "events";

/// `n` distinct free ports (held together while chosen).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// Three nodes' places: data directories and node-to-node ports.
struct Cluster {
    dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    nodes: Vec<Option<ChildNode>>,
}

impl Cluster {
    fn new(root: &Path, n: usize) -> Cluster {
        Cluster {
            dirs: (1..=n).map(|i| root.join(format!("node{i}"))).collect(),
            ports: free_ports(n),
            nodes: (0..n).map(|_| None).collect(),
        }
    }

    fn peers(&self) -> String {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (0-based) again after a kill.
    fn start(&mut self, i: usize) {
        let node = start_node(&self.dirs[i], i, self.ports[i], &self.peers());
        self.nodes[i] = Some(node);
    }

    /// Starts every node at once (a node serves once the cluster has a
    /// leader, so they cannot start one after the other).
    fn start_all(&mut self) {
        let peers = self.peers();
        let started: Vec<ChildNode> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.dirs.len())
                .map(|i| {
                    let (dir, port, peers) = (&self.dirs[i], self.ports[i], peers.clone());
                    s.spawn(move || start_node(dir, i, port, &peers))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("started"))
                .collect()
        });
        for (i, n) in started.into_iter().enumerate() {
            self.nodes[i] = Some(n);
        }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().flatten().map(|n| n.url.clone()).collect()
    }

    /// The leader's index once the running nodes agree on one.
    async fn leader(&self) -> usize {
        let c = client();
        let started = Instant::now();
        loop {
            let mut seen = BTreeSet::new();
            let mut leader_role = None;
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                let (s, st) = get(&c, &format!("{}/v1/cluster", n.url)).await;
                assert_eq!(s, 200, "{st}");
                seen.insert(st["leader"].as_u64());
                if st["role"] == "leader" {
                    leader_role = Some(i);
                }
            }
            if let (Some(i), 1) = (leader_role, seen.len()) {
                if seen.contains(&Some(i as u64 + 1)) {
                    return i;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no leader agreed on: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node has applied the same last index.
    async fn settled(&self) {
        let c = client();
        let started = Instant::now();
        loop {
            let mut applied = BTreeSet::new();
            for url in self.urls() {
                let (_, st) = get(&c, &format!("{url}/v1/cluster")).await;
                applied.insert((st["applied_index"].as_u64(), st["last_log_index"].as_u64()));
            }
            if applied.len() == 1 {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the nodes did not catch up: {applied:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts node `i` (0-based) of a cluster with these peers.
fn start_node(dir: &Path, i: usize, port: u16, peers: &str) -> ChildNode {
    let id = (i + 1).to_string();
    let listen = format!("127.0.0.1:{port}");
    ChildNode::start_mode(
        "core",
        dir,
        &[
            ("TRIBUTARY_CLUSTER__NODE_ID", id.as_str()),
            ("TRIBUTARY_CLUSTER__LISTEN", listen.as_str()),
            ("TRIBUTARY_CLUSTER__PEERS", peers),
            ("TRIBUTARY_CLUSTER__HEARTBEAT_MS", "100"),
            ("TRIBUTARY_CLUSTER__ELECTION_TIMEOUT_MS", "600"),
        ],
    )
}

/// What the writers sent: every value tried, and those acknowledged.
#[derive(Default)]
struct History {
    tried: BTreeSet<String>,
    acked: BTreeSet<String>,
}

/// Writes one record per request, to the nodes in turn, until `stop`;
/// every answer is recorded (a failed one may or may not be stored).
async fn writer(
    w: usize,
    urls: Arc<Mutex<Vec<String>>>,
    history: Arc<Mutex<History>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let targets = urls.lock().unwrap().clone();
        let url = &targets[i % targets.len()];
        let value = format!("w{w}-{i}");
        i += 1;
        history.lock().unwrap().tried.insert(value.clone());
        let body = json!({"records": [{"key": format!("k{}", i % 5), "value": value}]});
        let sent = c
            .post(format!("{url}/v1/topics/{T}/records"))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                history.lock().unwrap().acked.insert(value);
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Every node's records of the topic, by partition: (offset, value).
async fn contents(url: &str, partitions: u32) -> BTreeMap<u32, Vec<(u64, String)>> {
    let c = client();
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        let records = read_all(&c, url, T, p).await;
        out.insert(
            p,
            records
                .into_iter()
                // Sent as JSON strings, stored as their JSON text.
                .map(|(o, _, v)| (o, serde_json::from_slice(&v).expect("a JSON string")))
                .collect(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_leader_kills_on_every_node_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    let c = client();
    // Created through a follower: forwarded to the leader.
    let via = cluster.nodes[(leader + 1) % 3]
        .as_ref()
        .expect("up")
        .url
        .clone();
    let (s, b) = common::post(
        &c,
        &format!("{via}/v1/topics"),
        &json!({"name": T, "partitions": 3}),
    )
    .await;
    assert!(s == 200 || s == 201, "create: {s} {b}");

    let urls = Arc::new(Mutex::new(cluster.urls()));
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(writer(w, urls.clone(), history.clone(), stop.clone())))
        .collect();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = cluster.leader().await;
        let before = history.lock().unwrap().acked.len();
        assert!(before > 0, "round {round}: nothing acknowledged yet");
        cluster.nodes[leader].as_mut().expect("up").kill9();
        cluster.nodes[leader] = None;
        *urls.lock().unwrap() = cluster.urls();
        // The two left elect a leader and go on taking writes.
        let next = cluster.leader().await;
        assert_ne!(next, leader);
        let waited = Instant::now();
        while history.lock().unwrap().acked.len() == before {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "round {round}: no write acknowledged after the kill"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.start(leader);
        *urls.lock().unwrap() = cluster.urls();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    cluster.settled().await;

    let h = std::mem::take(&mut *history.lock().unwrap());
    let mut first: Option<BTreeMap<u32, Vec<(u64, String)>>> = None;
    for url in cluster.urls() {
        let got = contents(&url, 3).await;
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for records in got.values() {
            for (_, v) in records {
                *count.entry(v.as_str()).or_default() += 1;
            }
        }
        let sample: Vec<_> = count.keys().take(5).collect();
        for v in &h.acked {
            assert_eq!(
                count.get(v.as_str()),
                Some(&1),
                "{url}: acknowledged {v} is there once ({} stored, {} acknowledged; {sample:?})",
                count.len(),
                h.acked.len()
            );
        }
        for (v, n) in &count {
            assert!(h.tried.contains(*v), "{url}: {v} was never sent");
            assert_eq!(*n, 1, "{url}: {v} is there {n} times");
        }
        match &first {
            None => first = Some(got),
            Some(f) => {
                for (p, records) in f {
                    let other = &got[p];
                    if let Some(at) = (0..records.len().max(other.len()))
                        .find(|&i| records.get(i) != other.get(i))
                    {
                        panic!(
                            "{url} differs from the first node in partition {p} at {at}: {:?} / {:?} ({} / {} records)",
                            other.get(at.saturating_sub(1)..(at + 3).min(other.len())),
                            records.get(at.saturating_sub(1)..(at + 3).min(records.len())),
                            other.len(),
                            records.len()
                        );
                    }
                }
            }
        }
    }
    assert!(
        h.acked.len() > 50,
        "only {} writes acknowledged",
        h.acked.len()
    );
    let (_, st) = get(&c, &format!("{}/v1/cluster", cluster.urls()[0])).await;
    assert_eq!(st["nodes"].as_array().map(Vec::len), Some(3), "{st}");
    let _: Value = st;
}

/// Bytes that are no message on the node-to-node port (an announced length
/// over the limit, a frame that does not decode) close that connection and
/// nothing else: the cluster goes on taking writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_node_to_node_port_closes_that_connection_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    let c = client();
    let url = cluster.nodes[leader].as_ref().expect("up").url.clone();
    let (s, b) = common::post(
        &c,
        &format!("{url}/v1/topics"),
        &json!({"name": T, "partitions": 1}),
    )
    .await;
    assert!(s == 200 || s == 201, "create: {s} {b}");
    for port in cluster.ports.clone() {
        let garbage: [&[u8]; 3] = [
            &u32::MAX.to_be_bytes(),
            &[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            b"GET / HTTP/1.1\r\n\r\n",
        ];
        for bytes in garbage {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            s.write_all(bytes).await.expect("write");
            let mut buf = [0u8; 64];
            let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
            assert!(
                matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
                "port {port}: {bytes:?} did not close the connection: {closed:?}"
            );
        }
    }
    for (i, n) in cluster.nodes.iter().enumerate() {
        let url = &n.as_ref().expect("up").url;
        let (s, b) = common::post(
            &c,
            &format!("{url}/v1/topics/{T}/records"),
            &json!({"records": [{"value": format!("after garbage {i}")}]}),
        )
        .await;
        assert_eq!(s, 200, "node {}: {b}", i + 1);
    }
}
