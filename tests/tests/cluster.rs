//! The core cluster with real processes on loopback: `tributary core` nodes
//! started with the same peers form a cluster by themselves; writes on any
//! node are acknowledged once a majority holds them. While writers go on,
//! the faults: the leader killed -9 ten times; the leader cut off
//! from the majority (it must acknowledge nothing, and what it took then
//! must vanish); a follower stalled, then one wiped; two of five nodes
//! killed at once. Between nodes sit fault-injecting proxies, one per
//! direction of each pair. After each run the history is checked: every
//! acknowledged record is on every node exactly once, the nodes' logs are
//! identical offset by offset, and nothing is there that no writer sent.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::lazyfs::LazyFs;
use common::proxy::Proxy;
use common::{client, get, read_all, ChildNode};
use serde_json::{json, Value};

const T: &str = "events";

/// `n` free ports for the nodes' node-to-node listeners, known before the
/// nodes start (each node's peers name them). Taken below Linux's
/// ephemeral range (32768 and up), so no listener bound to port 0 (HTTP,
/// proxies, tests running beside this one) can take one between the
/// choice and the node's start; one counter per test process keeps its
/// tests apart, its start (from the pid) keeps processes apart.
fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() % 8_000,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = 20_000 + (NEXT.fetch_add(1, Ordering::SeqCst) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// The nodes' places: data directories, node-to-node ports, and (when
/// asked for) the proxies between them.
struct Cluster {
    dirs: Vec<PathBuf>,
    ports: Vec<u16>,
    nodes: Vec<Option<ChildNode>>,
    /// `proxies[i][j]`: what node `i` connects through to reach node `j`.
    proxies: Vec<Vec<Option<Proxy>>>,
    /// The first this many nodes form the cluster; the others join it.
    members: usize,
    /// More environment for every node.
    extra: Vec<(String, String)>,
    /// More environment for node `i` alone (`node_env[i]`, when there).
    node_env: Vec<Vec<(String, String)>>,
}

impl Cluster {
    fn new(root: &Path, n: usize) -> Cluster {
        Cluster {
            dirs: (1..=n).map(|i| root.join(format!("node{i}"))).collect(),
            ports: free_ports(n),
            nodes: (0..n).map(|_| None).collect(),
            proxies: Vec::new(),
            members: n,
            extra: Vec::new(),
            node_env: Vec::new(),
        }
    }

    /// Like [`Cluster::new`], with a proxy for each direction of each pair.
    async fn proxied(root: &Path, n: usize) -> Cluster {
        let mut c = Cluster::new(root, n);
        for i in 0..n {
            let mut row = Vec::new();
            for j in 0..n {
                row.push(if i == j {
                    None
                } else {
                    let to = format!("127.0.0.1:{}", c.ports[j]).parse().expect("addr");
                    Some(Proxy::start(to).await)
                });
            }
            c.proxies.push(row);
        }
        c
    }

    /// The peers as node `i` sees them: itself where it listens, the
    /// others through its proxies when there are any.
    fn peers(&self, i: usize) -> String {
        // A forming node names the members; a joining one, itself too.
        let known = self.members.max(i + 1);
        self.ports[..known]
            .iter()
            .enumerate()
            .map(
                |(j, p)| match self.proxies.get(i).and_then(|r| r[j].as_ref()) {
                    Some(proxy) => format!("{}@{}", j + 1, proxy.addr()),
                    None => format!("{}@127.0.0.1:{p}", j + 1),
                },
            )
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every link to and from node `i` goes silent (a half-open
    /// partition: nothing is closed, nothing arrives).
    fn isolate(&self, i: usize) {
        for j in 0..self.dirs.len() {
            if i != j {
                self.cut(i, j);
            }
        }
    }

    /// The environment node `i` starts with.
    fn env(&self, i: usize) -> Vec<(String, String)> {
        let mut env = self.extra.clone();
        env.extend(self.node_env.get(i).into_iter().flatten().cloned());
        env
    }

    /// Every link works again.
    fn heal(&self) {
        for p in self.proxies.iter().flatten().flatten() {
            p.resume();
        }
    }

    /// Kills node `i` with SIGKILL; it stays down until started again.
    fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill9();
        }
    }

    /// Starts node `i` (0-based) again after a kill.
    fn start(&mut self, i: usize) {
        let node = start_node(
            &self.dirs[i],
            i,
            self.ports[i],
            &self.peers(i),
            &self.env(i),
        );
        self.nodes[i] = Some(node);
    }

    /// Starts node `i` in the background to join the running cluster: it
    /// serves once a voter has added it and it has caught up.
    fn start_joining(&self, i: usize) -> std::thread::JoinHandle<ChildNode> {
        let (dir, port, peers) = (self.dirs[i].clone(), self.ports[i], self.peers(i));
        let mut extra = self.env(i);
        extra.push(("TRIBUTARY_CLUSTER__JOIN".into(), "true".into()));
        std::thread::spawn(move || start_node(&dir, i, port, &peers, &extra))
    }

    /// Starts node `i` in the background (it serves only once it has
    /// caught up, which may need links that are cut now).
    fn start_later(&self, i: usize) -> std::thread::JoinHandle<ChildNode> {
        let (dir, port, peers) = (self.dirs[i].clone(), self.ports[i], self.peers(i));
        let extra = self.env(i);
        std::thread::spawn(move || start_node(&dir, i, port, &peers, &extra))
    }

    /// Every link between `a` and `b` goes silent.
    fn cut(&self, a: usize, b: usize) {
        for p in [&self.proxies[a][b], &self.proxies[b][a]] {
            p.as_ref().expect("a proxied cluster").stall();
        }
    }

    /// Starts every node at once (a node serves once the cluster has a
    /// leader, so they cannot start one after the other).
    fn start_all(&mut self) {
        let started: Vec<ChildNode> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.members)
                .map(|i| {
                    let (dir, port, peers) = (&self.dirs[i], self.ports[i], self.peers(i));
                    let extra = self.env(i);
                    s.spawn(move || start_node(dir, i, port, &peers, &extra))
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

    fn url(&self, i: usize) -> String {
        self.nodes[i].as_ref().expect("running").url.clone()
    }

    /// The leader's index once the running nodes agree on one.
    async fn leader(&self) -> usize {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.leader_of(&all).await
    }

    /// The leader's index once the running nodes among `members` agree on
    /// one of them.
    async fn leader_of(&self, members: &[usize]) -> usize {
        let c = client();
        let started = Instant::now();
        loop {
            let mut seen = BTreeSet::new();
            let mut leader_role = None;
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(n) = n.as_ref().filter(|_| members.contains(&i)) else {
                    continue;
                };
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
fn start_node(
    dir: &Path,
    i: usize,
    port: u16,
    peers: &str,
    extra: &[(String, String)],
) -> ChildNode {
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    common::start_cluster_node(dir, i + 1, port, peers, &extra)
}

/// What the writers sent: every value tried, and those acknowledged.
#[derive(Default)]
struct History {
    tried: BTreeSet<String>,
    acked: BTreeSet<String>,
    /// Every attempt, timed, with the position it was answered with.
    appends: Vec<Attempt>,
}

/// One write: by writer `client`, called and answered at these times
/// (nanoseconds since [`epoch`]); its partition and offset if it was
/// acknowledged.
struct Attempt {
    client: usize,
    value: String,
    call: i64,
    ret: i64,
    at: Option<(u32, u64)>,
}

/// The time every history counts from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
fn now_ns() -> i64 {
    epoch().elapsed().as_nanos() as i64
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
        let call = now_ns();
        let sent = c
            .post(format!("{url}/v1/topics/{T}/records"))
            .json(&body)
            .send()
            .await;
        let answer = match sent {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            _ => None,
        };
        let ret = now_ns();
        let at = answer.as_ref().and_then(|a| {
            let o = &a["offsets"][0];
            Some((o["partition"].as_u64()? as u32, o["offset"].as_u64()?))
        });
        let acked = answer.is_some();
        {
            let mut h = history.lock().unwrap();
            if acked {
                h.acked.insert(value.clone());
            }
            h.appends.push(Attempt {
                client: w,
                value,
                call,
                ret,
                at,
            });
        }
        if !acked {
            tokio::time::sleep(Duration::from_millis(50)).await;
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

/// Writers going on through every fault, each writing to the nodes in
/// turn.
struct Writers {
    urls: Arc<Mutex<Vec<String>>>,
    history: Arc<Mutex<History>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(n: usize, urls: Vec<String>) -> Writers {
        Writers::numbered(0..n, urls)
    }

    /// Writers numbered so (their values unlike those of writers before).
    fn numbered(ids: std::ops::Range<usize>, urls: Vec<String>) -> Writers {
        let urls = Arc::new(Mutex::new(urls));
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = ids
            .map(|w| tokio::spawn(writer(w, urls.clone(), history.clone(), stop.clone())))
            .collect();
        Writers {
            urls,
            history,
            stop,
            tasks,
        }
    }

    /// Writes go to these nodes from now on.
    fn to(&self, urls: Vec<String>) {
        *self.urls.lock().unwrap() = urls;
    }

    fn acked(&self) -> usize {
        self.history.lock().unwrap().acked.len()
    }

    /// Waits until `more` writes past `since` are acknowledged.
    async fn progress(&self, since: usize, more: usize, what: &str) {
        let waited = Instant::now();
        while self.acked() < since + more {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "{what}: only {} writes acknowledged in 30 s",
                self.acked() - since
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> History {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer");
        }
        let mut h = self.history.lock().unwrap();
        std::mem::take(&mut *h)
    }
}

/// Kills node `i`, deletes its data directory, waits for `while_down`
/// more acknowledged writes, starts it again (it rebuilds from the others)
/// and waits for 20 more.
async fn wipe_and_restart(cluster: &mut Cluster, writers: &Writers, i: usize, while_down: usize) {
    cluster.kill(i);
    std::fs::remove_dir_all(&cluster.dirs[i]).expect("wipe");
    writers.to(cluster.urls());
    let before = writers.acked();
    writers
        .progress(before, while_down, "with a node wiped")
        .await;
    cluster.start(i);
    writers.to(cluster.urls());
    let before = writers.acked();
    writers
        .progress(before, 20, "after the wiped node came back")
        .await;
}

/// Creates the topic through `via`.
async fn create(via: &str, partitions: u32) {
    let (s, b) = common::post(
        &client(),
        &format!("{via}/v1/topics"),
        &json!({"name": T, "partitions": partitions}),
    )
    .await;
    assert!(s == 200 || s == 201, "create: {s} {b}");
}

/// The history check, once every node has caught up: each acknowledged
/// write is on every running node exactly once, nothing is there that was
/// not sent or that `refused` names, and the nodes' logs are identical
/// offset by offset.
async fn check(cluster: &Cluster, h: &History, refused: &BTreeSet<String>, partitions: u32) {
    cluster.settled().await;
    let mut first: Option<BTreeMap<u32, Vec<(u64, String)>>> = None;
    for url in cluster.urls() {
        let got = contents(&url, partitions).await;
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
            assert!(
                !refused.contains(*v),
                "{url}: {v} was taken by a leader cut off from the majority, and is stored"
            );
            assert_eq!(*n, 1, "{url}: {v} is there {n} times");
        }
        let stored: BTreeMap<(u32, u64), &str> = got
            .iter()
            .flat_map(|(p, records)| records.iter().map(move |(o, v)| ((*p, *o), v.as_str())))
            .collect();
        for a in &h.appends {
            if let Some(at) = a.at {
                assert_eq!(
                    stored.get(&at).copied(),
                    Some(a.value.as_str()),
                    "{url}: {} was acknowledged at partition {}, offset {}",
                    a.value,
                    at.0,
                    at.1
                );
            }
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_leader_kills_on_every_node_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    // Snapshots are taken (and interrupted by kills) throughout.
    cluster.extra = small_snapshots();
    cluster.start_all();
    let leader = cluster.leader().await;
    // Created through a follower: forwarded to the leader.
    create(&cluster.url((leader + 1) % 3), 3).await;

    let writers = Writers::start(3, cluster.urls());
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let leader = cluster.leader().await;
        let before = writers.acked();
        assert!(before > 0, "round {round}: nothing acknowledged yet");
        cluster.kill(leader);
        writers.to(cluster.urls());
        // The two left elect a leader and go on taking writes.
        let next = cluster.leader().await;
        assert_ne!(next, leader);
        writers
            .progress(before, 1, &format!("round {round}, after the kill"))
            .await;
        cluster.start(leader);
        writers.to(cluster.urls());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;
    let (_, st) = get(&client(), &format!("{}/v1/cluster", cluster.url(0))).await;
    assert_eq!(st["nodes"].as_array().map(Vec::len), Some(3), "{st}");
    // Every node took writes from the writers since its last start and
    // timed each one it acknowledged.
    for url in cluster.urls() {
        let n = common::metric(&url, "tributary_cluster_write_seconds_count", None).await;
        let within = common::metric(
            &url,
            "tributary_cluster_write_seconds_bucket{le=\"+Inf\"}",
            None,
        )
        .await;
        assert_eq!(n, within, "{url}: the +Inf bucket counts every write");
        assert!(n > 0, "{url}: no write timed");
    }
}

/// A power cut of every node at once. Each node's data directory is on a
/// filesystem that forgets every write not fsynced ([`LazyFs`]); the
/// nodes are killed -9 together while writers go on, the unsynced writes
/// of all three are dropped, and the nodes start again on what is left.
/// Every acknowledged write must be there: an acknowledgement means a
/// majority's disks, not their page caches. Snapshots are taken
/// throughout, so the cut also meets half-made ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with fusepy, libfuse2, and /dev/fuse with the right to mount (root) for tests/lazyfs; scripts/test installs fusepy and libfuse2"]
async fn acknowledged_writes_survive_a_power_cut_of_every_node() {
    let root = tempfile::tempdir().expect("tempdir");
    // Before the cluster, so that its nodes are gone before they unmount.
    let mut disks: Vec<LazyFs> = (1..=3)
        .map(|i| {
            LazyFs::mount(
                &root.path().join(format!("disk{i}")),
                &root.path().join(format!("node{i}")),
            )
        })
        .collect();
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.extra = small_snapshots();
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url((leader + 1) % 3), 3).await;
    let mut all = History::default();
    for cut in 0..2 {
        let writers = Writers::numbered(cut * 4..cut * 4 + 4, cluster.urls());
        writers.progress(0, 150, &format!("before cut {cut}")).await;
        for i in 0..3 {
            cluster.kill(i);
        }
        let h = writers.finish().await;
        let dropped: Vec<u64> = disks.iter_mut().map(LazyFs::cut).collect();
        eprintln!(
            "cut {cut}: {} writes acknowledged; bytes not synced and dropped per node: {dropped:?}",
            h.acked.len()
        );
        all.tried.extend(h.tried);
        all.acked.extend(h.acked);
        all.appends.extend(h.appends);
        cluster.start_all();
        cluster.leader().await;
    }
    check(&cluster, &all, &BTreeSet::new(), 3).await;
}

/// An edge and the cluster it forwards to lose their power together, twice,
/// while the edge takes events and forwards them. All four data directories
/// are on [`LazyFs`]; after each cut and restart, every event the edge
/// acknowledged is in its log and at every node exactly once (the edge's
/// log and each node's records from it match one to one), so neither
/// side's sync state outran what its disk held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with fusepy, libfuse2, and /dev/fuse with the right to mount (root) for tests/lazyfs; scripts/test installs fusepy and libfuse2"]
async fn an_edge_and_its_cluster_cut_together_still_forward_exactly_once() {
    use common::sync::{check_topic, edge_sync_stats, produce, start_edge, sync_url, wait_drained};
    let root = tempfile::tempdir().expect("tempdir");
    let mut disks: Vec<LazyFs> = ["node1", "node2", "node3", "edge"]
        .iter()
        .map(|d| LazyFs::mount(&root.path().join(format!("{d}-disk")), &root.path().join(d)))
        .collect();
    let mut cluster = Cluster::new(root.path(), 3);
    // Fixed HTTP ports: the edge names the nodes once, across restarts.
    let http = free_ports(3);
    cluster.node_env = http
        .iter()
        .map(|p| {
            vec![(
                "TRIBUTARY_HTTP__LISTEN".to_owned(),
                format!("127.0.0.1:{p}"),
            )]
        })
        .collect();
    cluster.start_all();
    cluster.leader().await;
    let urls: Vec<String> = http
        .iter()
        .map(|p| sync_url(&format!("127.0.0.1:{p}")))
        .collect();
    let more = urls[1..].join(",");
    let edge_dir = root.path().join("edge");
    let start = || {
        start_edge(
            &edge_dir,
            &urls[0],
            "edge-p",
            &[("TRIBUTARY_UPSTREAM__URLS", more.as_str())],
        )
    };
    let mut edge = start();
    let c = client();
    common::create_topic(&c, &edge.url, T, 2).await;
    let mut acked: Vec<(u32, u64)> = Vec::new();
    let mut seq = 0u64;
    for cut in 0..2 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let producer = {
            let (base, stop) = (edge.url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut acked = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match produce(&c, &base, T, "p", seq, 20).await {
                        Ok(at) => {
                            seq += at.len() as u64;
                            acked.extend(at);
                        }
                        // The node is gone: what it did not answer may or may not be there.
                        Err(_) => break,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (acked, seq)
            })
        };
        let waited = Instant::now();
        while edge_sync_stats(&edge.url).await["acked_events"]
            .as_u64()
            .unwrap_or(0)
            < 300
        {
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "cut {cut}: the edge forwards nothing: {}",
                edge_sync_stats(&edge.url).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        edge.kill9();
        for i in 0..3 {
            cluster.kill(i);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (more_acked, next) = producer.await.expect("producer");
        acked.extend(more_acked);
        seq = next;
        let dropped: Vec<u64> = disks.iter_mut().map(LazyFs::cut).collect();
        eprintln!(
            "cut {cut}: {} events acknowledged by the edge; bytes not synced and dropped (nodes, edge): {dropped:?}",
            acked.len()
        );
        cluster.start_all();
        cluster.leader().await;
        edge = start();
    }
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    cluster.settled().await;
    for url in cluster.urls() {
        let f = check_topic("edge-p", &edge.url, &url, T).await;
        for at in &acked {
            assert!(
                f.at_core.contains_key(at),
                "{url}: the edge acknowledged {at:?}, which is not at the core"
            );
        }
    }
    assert!(
        acked.len() > 300,
        "only {} events acknowledged",
        acked.len()
    );
}

/// Many writers at once, through the leader and a follower: their writes
/// queue behind the entries in flight and go into Raft entries together
/// (the `merge` module of the cluster crate). Each write is still answered
/// its own offset, stored there on every node, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_at_once_share_entries_and_each_keeps_its_offset() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 3).await;
    let follower = (leader + 1) % 3;
    let writers = Writers::start(24, vec![cluster.url(leader), cluster.url(follower)]);
    writers.progress(0, 1500, "24 writers").await;
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;
    for i in [leader, follower] {
        let st = status(&cluster.url(i)).await;
        let (entries, writes) = (
            st["proposed_entries"].as_u64().expect("proposed_entries"),
            st["proposed_writes"].as_u64().expect("proposed_writes"),
        );
        assert!(
            writes > entries && entries > 0,
            "node {i}: {writes} writes in {entries} entries: none merged"
        );
        let metric = common::metric(
            &cluster.url(i),
            "tributary_cluster_proposed_writes_total",
            None,
        )
        .await;
        assert!(metric >= writes, "node {i}: the metric counts them too");
    }
}

/// Faults between live nodes, one after the other under writers: the
/// leader cut off from the majority, a follower stalled, a follower's data
/// directory wiped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_acknowledges_nothing_and_followers_recover() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::proxied(root.path(), 3).await;
    cluster.start_all();
    let old = cluster.leader().await;
    create(&cluster.url(old), 3).await;
    let writers = Writers::start(3, cluster.urls());
    writers.progress(0, 20, "before the faults").await;
    // A Kafka group member at the leader, its coordinator.
    let old_kafka = cluster.nodes[old].as_ref().expect("running").kafka;
    let (mut member, member_id, generation) = kafka_member(old_kafka, "cut").await;
    assert_eq!(
        kafka_heartbeat(&mut member, "cut", &member_id, generation).await,
        0
    );

    // 1. The leader is cut off. The writers go to the majority; probes go
    //    to the old leader, which must acknowledge none of them.
    cluster.isolate(old);
    let majority: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    writers.to(majority.iter().map(|&i| cluster.url(i)).collect());
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let old_url = cluster.url(old);
    let probes: Vec<_> = (0..5)
        .map(|k| {
            let (c, url) = (c.clone(), old_url.clone());
            let value = format!("cut-off-{k}");
            tokio::spawn(async move {
                let r = c
                    .post(format!("{url}/v1/topics/{T}/records"))
                    .json(&json!({"records": [{"value": value}]}))
                    .send()
                    .await;
                (value, r.map(|r| r.status().as_u16()))
            })
        })
        .collect();
    let new = cluster.leader_of(&majority).await;
    assert_ne!(new, old);
    // The old leader, cut off, stops coordinating the group within a few
    // election timeouts (it has not heard of the new term): its member is
    // told the coordinator is not available, and so is a client looking
    // for a group's or a transactional id's coordinator there; its
    // Metadata names no partition leader.
    const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    let started = Instant::now();
    loop {
        let beat = kafka_heartbeat(&mut member, "cut", &member_id, generation).await;
        let (found, _, _) = kafka_coordinator(old_kafka, "cut", 0).await;
        let (txn, _, _) = kafka_coordinator(old_kafka, "cut-txn", 1).await;
        let (_, leaders, _) = kafka_metadata(old_kafka).await;
        let leaderless = !leaders.is_empty() && leaders.iter().all(|l| *l == -1);
        if [beat, found, txn] == [COORDINATOR_NOT_AVAILABLE; 3] && leaderless {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cut-off leader still coordinates: heartbeat {beat}, FindCoordinator {found} \
             (transactions {txn}), partition leaders {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = writers.acked();
    writers
        .progress(before, 20, "the majority, while the leader is cut off")
        .await;
    let mut refused = BTreeSet::new();
    for p in probes {
        let (value, answer) = p.await.expect("probe");
        let status = answer.expect("the cut-off leader answers within its write timeout");
        assert!(
            status >= 500,
            "the cut-off leader acknowledged {value} with {status}"
        );
        refused.insert(value);
    }
    writers
        .history
        .lock()
        .unwrap()
        .tried
        .extend(refused.iter().cloned());
    cluster.heal();
    writers.to(cluster.urls());
    cluster.leader().await;

    // 2. A follower goes silent for a while, then comes back.
    let leader = cluster.leader().await;
    let stalled = (leader + 1) % 3;
    cluster.isolate(stalled);
    writers.to((0..3)
        .filter(|&i| i != stalled)
        .map(|i| cluster.url(i))
        .collect());
    let before = writers.acked();
    writers
        .progress(before, 50, "with a follower stalled")
        .await;
    cluster.heal();
    writers.to(cluster.urls());

    // 3. A follower loses its data directory and is started again: it
    //    rebuilds from the others.
    let leader = cluster.leader().await;
    let wiped = (leader + 2) % 3;
    wipe_and_restart(&mut cluster, &writers, wiped, 20).await;

    let h = writers.finish().await;
    check(&cluster, &h, &refused, 3).await;
}

/// A node whose data directory is wiped has forgotten entries it helped
/// commit: it must not vote before it holds them again. Writes are
/// acknowledged by the leader and node W while node F is cut off; W is
/// wiped and started again while it cannot hear the leader; the leader is
/// killed. F (which lacks those writes) must not be elected with W's vote;
/// the leader comes back, and every acknowledged write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_does_not_vote_before_it_holds_what_it_lost() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::proxied(root.path(), 3).await;
    cluster.start_all();
    let l = cluster.leader().await;
    let (w, f) = ((l + 1) % 3, (l + 2) % 3);
    create(&cluster.url(l), 3).await;
    cluster.isolate(f);
    let writers = Writers::start(3, vec![cluster.url(l), cluster.url(w)]);
    writers
        .progress(0, 100, "the leader and W, F cut off")
        .await;
    let h = writers.finish().await;

    cluster.kill(w);
    std::fs::remove_dir_all(&cluster.dirs[w]).expect("wipe");
    cluster.cut(l, w);
    let w_started = cluster.start_later(w);
    cluster.kill(l);
    cluster.heal();
    cluster.cut(l, w);
    cluster.cut(l, f);
    // F asks W for its vote again and again; W keeps it.
    let c = client();
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(4) {
        let (_, st) = get(&c, &format!("{}/v1/cluster", cluster.url(f))).await;
        assert_ne!(
            st["role"], "leader",
            "F lacks acknowledged writes and was elected: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The leader comes back; with F's vote it leads again, W catches up.
    let l_started = cluster.start_later(l);
    cluster.heal();
    cluster.nodes[l] = Some(l_started.join().expect("the leader restarts"));
    cluster.nodes[w] = Some(w_started.join().expect("the wiped node starts"));
    check(&cluster, &h, &BTreeSet::new(), 3).await;
}

/// An edge forwards to the cluster, given every node's URL, while the link
/// it uses is cut (the node at its end may still be appending the edge's
/// last round when the edge reconnects to another node) and the leader is
/// killed -9: every record the edge holds is on every node exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_forwards_to_the_cluster_exactly_once_through_failovers() {
    use common::sync::{
        check_topic, edge_sync_stats, http_addr, produce, start_edge, sync_url, wait_drained,
    };
    let root = tempfile::tempdir().expect("tempdir");

    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    cluster.leader().await;
    let mut links = Vec::new();
    for n in cluster.nodes.iter().flatten() {
        links.push(Proxy::start(http_addr(n).parse().expect("addr")).await);
    }
    let urls: Vec<String> = links
        .iter()
        .map(|p| sync_url(&p.addr().to_string()))
        .collect();
    let more = urls[1..].join(",");
    let edge = start_edge(
        &root.path().join("edge"),
        &urls[0],
        "edge-c",
        &[("TRIBUTARY_UPSTREAM__URLS", more.as_str())],
    );
    let c = client();
    common::create_topic(&c, &edge.url, T, 2).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (base, stop) = (edge.url.clone(), stop.clone());
        tokio::spawn(async move {
            let c = client();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let acked = produce(&c, &base, T, "e", n, 20)
                    .await
                    .expect("the edge takes it");
                n += acked.len() as u64;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };
    let forwarded = || async {
        edge_sync_stats(&edge.url).await["acked_events"]
            .as_u64()
            .unwrap_or(0)
    };
    for round in 0..4 {
        let before = forwarded().await;
        let waited = Instant::now();
        while forwarded().await < before + 200 {
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "round {round}: the edge forwards nothing: {}",
                edge_sync_stats(&edge.url).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if round % 2 == 0 {
            // Cut the link in use: the edge moves to the next node.
            let using = edge_sync_stats(&edge.url).await["upstream"].clone();
            let i = urls
                .iter()
                .position(|u| using == u.as_str())
                .expect("the edge names the URL it uses");
            links[i].cut();
        } else {
            let leader = cluster.leader().await;
            cluster.kill(leader);
            cluster.leader().await;
            cluster.start(leader);
            let addr = http_addr(cluster.nodes[leader].as_ref().expect("up"));
            links[leader].set_target(addr.parse().expect("addr"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let produced = producer.await.expect("producer");
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    cluster.settled().await;
    for url in cluster.urls() {
        let f = check_topic("edge-c", &edge.url, &url, T).await;
        assert_eq!(f.records as u64, produced, "{url}");
    }
}

/// Membership while writes go on: a fourth node joins (started with
/// `cluster.join`, added through a follower; it catches up as a learner,
/// then votes), then the leader is removed and stopped. The three voters
/// left hold every acknowledged write, identically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_the_leader_leaves_while_writes_go_on() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 4);
    cluster.members = 3;
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 3).await;
    let writers = Writers::start(3, cluster.urls());
    writers.progress(0, 20, "three voters").await;

    let joining = cluster.start_joining(3);
    let follower = (leader + 1) % 3;
    let c = client();
    // Bad requests are refused with 400 and change nothing.
    let nodes_url = format!("{}/v1/cluster/nodes", cluster.url(follower));
    for bad in [
        json!({"id": 0, "address": "127.0.0.1:1"}),
        json!({"id": 9, "address": ""}),
        json!({"id": 9, "address": "127.0.0.1:1", "voter": true}),
        json!("not an object"),
    ] {
        let (s, b) = common::post(&c, &nodes_url, &bad).await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert_eq!(b["error"]["code"], "bad_request", "{bad}: {b}");
    }
    let r = c
        .post(&nodes_url)
        .header("content-type", "application/json")
        .body("{\"id\": 9, \"addr")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400, "a truncated body");
    let (s, st) = common::post(
        &c,
        &format!("{}/v1/cluster/nodes", cluster.url(follower)),
        &json!({"id": 4, "address": format!("127.0.0.1:{}", cluster.ports[3])}),
    )
    .await;
    assert_eq!(s, 200, "add: {st}");
    cluster.nodes[3] = Some(joining.join().expect("the new node starts"));
    let (_, st) = get(&c, &format!("{}/v1/cluster", cluster.url(3))).await;
    let voters: Vec<u64> = st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["role"] != "learner")
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4], "{st}");
    writers.to(cluster.urls());
    let before = writers.acked();
    writers.progress(before, 20, "four voters").await;
    // Adding a voter twice is refused with the reason.
    let (s, st) = common::post(
        &c,
        &format!("{}/v1/cluster/nodes", cluster.url(3)),
        &json!({"id": 4, "address": format!("127.0.0.1:{}", cluster.ports[3])}),
    )
    .await;
    assert_eq!(s, 409, "{st}");

    let leader = cluster.leader().await;
    let other = (0..4).find(|&i| i != leader).expect("another node");
    let r = c
        .delete(format!(
            "{}/v1/cluster/nodes/{}",
            cluster.url(other),
            leader + 1
        ))
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    cluster.kill(leader);
    writers.to(cluster.urls());
    let next = cluster.leader().await;
    assert_ne!(next, leader);
    let before = writers.acked();
    writers.progress(before, 20, "after the leader left").await;
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;
    let (_, st) = get(&c, &format!("{}/v1/cluster", cluster.url(next))).await;
    let ids: Vec<u64> = st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(ids.len(), 3, "{st}");
    assert!(!ids.contains(&(leader as u64 + 1)), "{st}");
}

/// Five nodes lose two at once (the leader and a follower): the three
/// left go on, and the two rejoin.
/// Small snapshots: one once the entries since the last weigh 2 KiB (a few
/// dozen writes), 10 entries kept before it.
fn small_snapshots() -> Vec<(String, String)> {
    vec![
        (
            "TRIBUTARY_CLUSTER__SNAPSHOT_MIN_BYTES".into(),
            "2048".into(),
        ),
        ("TRIBUTARY_CLUSTER__SNAPSHOT_KEEP".into(), "10".into()),
    ]
}

/// This node's view of the cluster, as `GET /v1/cluster` answers it.
async fn status(url: &str) -> Value {
    let (s, st) = get(&client(), &format!("{url}/v1/cluster")).await;
    assert_eq!(s, 200, "{st}");
    st
}

/// With small snapshots the nodes drop their Raft logs behind each one. A
/// node that was down meanwhile, whose missing entries no log holds any
/// more, gets the snapshot and then the entries after it; so does one
/// whose data directory was wiped. Every acknowledged write is then on
/// every node once, the logs identical offset by offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_behind_the_kept_log_install_a_snapshot() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.extra = small_snapshots();
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 3).await;
    let writers = Writers::start(3, cluster.urls());
    writers.progress(0, 30, "three nodes").await;

    let down = (leader + 1) % 3;
    let had = status(&cluster.url(down)).await["last_log_index"]
        .as_u64()
        .expect("an index");
    cluster.kill(down);
    writers.to(cluster.urls());
    let waited = Instant::now();
    loop {
        let st = status(&cluster.url(leader)).await;
        if st["purged_index"].as_u64().is_some_and(|p| p > had + 1) {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the leader kept its log past {had}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.start(down);
    writers.to(cluster.urls());
    let before = writers.acked();
    writers
        .progress(before, 20, "after the node came back")
        .await;
    let st = status(&cluster.url(down)).await;
    assert!(
        st["snapshot_index"].as_u64().is_some_and(|s| s > had),
        "the node that was down has no snapshot past {had}: {st}"
    );

    let wiped = (leader + 2) % 3;
    wipe_and_restart(&mut cluster, &writers, wiped, 60).await;
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;
    for i in [down, wiped] {
        let log = std::fs::read_to_string(cluster.dirs[i].join("node.log")).expect("node.log");
        assert!(
            log.contains("installed a snapshot"),
            "node {} caught up without a snapshot",
            i + 1
        );
    }
    // What was sent was a cut written out in full with the records then,
    // streamed.
    let sent = cluster.dirs.iter().any(|dir| {
        std::fs::read_to_string(dir.join("node.log"))
            .is_ok_and(|log| log.contains("streamed a snapshot out to send it"))
    });
    assert!(sent, "no node streamed a snapshot out to send it");
    // Nothing left over (a snapshot the last writes started may still be
    // being taken: `taking-N.snap` until it is done).
    for dir in &cluster.dirs {
        let started = Instant::now();
        loop {
            let mut files: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
                .expect("snapshots")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let taking = files.iter().any(|f| f.starts_with("taking-"));
            if !taking || started.elapsed() > Duration::from_secs(30) {
                assert_eq!(files, ["current.snap"], "{}", dir.display());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_go_on_after_losing_two_at_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 5);
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 3).await;
    let writers = Writers::start(3, cluster.urls());
    writers.progress(0, 20, "five nodes").await;
    let killed = [leader, (leader + 1) % 5];
    for k in killed {
        cluster.kill(k);
    }
    writers.to(cluster.urls());
    let next = cluster.leader().await;
    assert!(!killed.contains(&next));
    let before = writers.acked();
    writers.progress(before, 20, "three of five").await;
    for k in killed {
        cluster.start(k);
    }
    writers.to(cluster.urls());
    let before = writers.acked();
    writers.progress(before, 20, "five again").await;
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;
}

/// Kafka's DeleteRecords through a follower moves the start on every node,
/// one that was down at the time included (it applies the entry when it
/// comes back), and nothing else changes: every other acknowledged write
/// is still on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_through_one_node_are_gone_on_every_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 1).await;
    let writers = Writers::start(2, cluster.urls());
    writers.progress(0, 30, "three nodes").await;
    writers.finish().await;
    let before = contents(&cluster.url(leader), 1).await;
    let end = before[&0].len() as u64;
    assert!(end >= 30, "{end} records");
    let expected: Vec<(u64, String)> = before[&0].iter().skip(10).cloned().collect();
    let (follower, down) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.kill(down);
    let kafka = cluster.nodes[follower].as_ref().expect("running").kafka;
    assert_eq!(kafka_delete_records(kafka, 10).await, (0, 10));
    // Past the end: refused, as Kafka refuses it, and nothing moves.
    let (code, _) = kafka_delete_records(kafka, 1_000_000).await;
    assert_eq!(code, 1, "OFFSET_OUT_OF_RANGE");
    cluster.start(down);
    for i in 0..3 {
        let url = cluster.url(i);
        let waited = Instant::now();
        loop {
            let (s, t) = get(&client(), &format!("{url}/v1/topics/{T}")).await;
            assert_eq!(s, 200, "{t}");
            let p = &t["partitions"][0];
            if p["start_offset"] == 10 && p["end_offset"] == end {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "node {}: {p} (the records below 10 were deleted)",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            contents(&url, 1).await[&0],
            expected,
            "node {}: from offset 10 on, the records as they were",
            i + 1
        );
    }
}

/// A follower that was down while more entries were written than one
/// node-to-node message holds (40 writes of 1.8 MB: 72 MB; no snapshot
/// taken) catches up from the Raft log: the leader sends them in several
/// messages. Before, it sent them all in one message over the limit, at
/// every try, and the follower never caught up (an edge draining a
/// backlog into a cluster stopped it this way: with a second node behind,
/// no write had a majority).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_by_more_than_one_message_of_entries_catches_up() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.extra = vec![(
        "TRIBUTARY_CLUSTER__SNAPSHOT_MIN_BYTES".into(),
        "1000000000000".into(),
    )];
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 1).await;
    let down = (leader + 1) % 3;
    cluster.kill(down);
    let (c, filler) = (client(), "x".repeat(900_000));
    for i in 0..40 {
        let records = json!({"records": [
            {"value": format!("{i}a{filler}")},
            {"value": format!("{i}b{filler}")},
        ]});
        let url = format!("{}/v1/topics/{T}/records", cluster.url(leader));
        let (s, b) = common::post(&c, &url, &records).await;
        assert_eq!(s, 200, "write {i}: {b}");
    }
    cluster.start(down);
    cluster.settled().await;
    // The same partition on every node (its records are compared in full
    // by the other tests; 72 MB read back three times is slow here).
    let mut seen = BTreeSet::new();
    for i in 0..3 {
        let (s, t) = get(&c, &format!("{}/v1/topics/{T}", cluster.url(i))).await;
        assert_eq!(s, 200, "{t}");
        let p = &t["partitions"][0];
        seen.insert((p["end_offset"].as_u64(), p["bytes"].as_u64()));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen.first().and_then(|s| s.0), Some(80));
    let url = format!(
        "{}/v1/topics/{T}/partitions/0/records?offset=79&limit=1",
        cluster.url(down)
    );
    let (s, last) = get(&c, &url).await;
    assert_eq!(s, 200, "{last}");
    assert_eq!(last["records"][0]["value"], format!("39b{filler}"));
}

/// DeleteRecords of partition 0 below `offset`: (error, low watermark).
async fn kafka_delete_records(addr: std::net::SocketAddr, offset: i64) -> (i16, i64) {
    use kafka_protocol::messages::delete_records_request::{
        DeleteRecordsPartition, DeleteRecordsTopic,
    };
    use kafka_protocol::messages::{ApiKey, DeleteRecordsRequest, DeleteRecordsResponse};
    use kafka_protocol::protocol::Decodable;
    let mut c = common::kafka::Client::at(addr).await;
    let req = DeleteRecordsRequest::default()
        .with_topics(vec![DeleteRecordsTopic::default()
            .with_name(common::kafka::name(T))
            .with_partitions(vec![DeleteRecordsPartition::default()
                .with_partition_index(0)
                .with_offset(offset)])])
        .with_timeout_ms(10_000);
    let mut b = c.call(ApiKey::DeleteRecords, 2, &req).await;
    let r = DeleteRecordsResponse::decode(&mut b, 2).expect("delete records");
    let p = &r.topics[0].partitions[0];
    (p.error_code, p.low_watermark)
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

/// Development certificates from the node binary (`tributary tls
/// self-signed`): a CA, and a node certificate for 127.0.0.1 it signed.
fn certificates(dir: &Path) -> PathBuf {
    let status = std::process::Command::new(common::NODE_BIN)
        .args(["tls", "self-signed", "--out"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tributary tls self-signed");
    assert!(status.success(), "tributary tls self-signed: {status}");
    dir.to_owned()
}

/// Whether a node answers a vote probe sent over `link`.
async fn answers<L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut link: L) -> bool {
    use tributary_cluster::network::{read_frame, write_frame, Reply, Rpc};
    if write_frame(&mut link, &Rpc::probe()).await.is_err() {
        return false;
    }
    let reply =
        tokio::time::timeout(Duration::from_secs(10), read_frame::<_, Reply>(&mut link)).await;
    matches!(reply, Ok(Ok(Reply::Vote(_))))
}

/// Whether the node-to-node port at `port` answers a TLS client with
/// `dir`'s certificate (`server.pem`) that trusts `ca`'s CA.
async fn answers_over_tls(port: u16, dir: &Path, ca: &Path) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca.join("ca.pem")).expect("ca.pem") {
        roots.add(c.expect("a CA certificate")).expect("add the CA");
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("server.pem")
        .map(|c| c.expect("a certificate"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).expect("the key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .expect("client config");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(tls) => answers(tls).await,
        Err(_) => false, // refused in the handshake
    }
}

/// Mutual TLS between nodes (`cluster.tls`): three nodes whose
/// certificates one CA signed form the cluster and replicate writes; the
/// node-to-node port answers nothing to plain bytes or to a client whose
/// certificate another CA signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_speak_mutual_tls_and_refuse_other_peers() {
    let root = tempfile::tempdir().expect("tempdir");
    let ours = certificates(&root.path().join("tls"));
    let theirs = certificates(&root.path().join("other-ca"));
    let mut cluster = Cluster::new(root.path(), 3);
    let file = |name: &str| ours.join(name).display().to_string();
    cluster.extra = vec![
        ("TRIBUTARY_TLS__CERT".into(), file("server.pem")),
        ("TRIBUTARY_TLS__KEY".into(), file("server-key.pem")),
        ("TRIBUTARY_TLS__CLIENT_CA".into(), file("ca.pem")),
        ("TRIBUTARY_CLUSTER__TLS".into(), "true".into()),
        ("TRIBUTARY_HTTP__TLS_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIBUTARY_MQTT__TLS_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIBUTARY_AMQP__TLS_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIBUTARY_KAFKA__TLS_LISTEN".into(), "127.0.0.1:0".into()),
    ];
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url((leader + 1) % 3), 3).await;
    let writers = Writers::start(3, cluster.urls());
    writers.progress(0, 60, "over TLS").await;
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;

    for port in cluster.ports.clone() {
        // A node's own kind of certificate: the probe is answered (so the
        // refusals below are TLS refusing, not a port that answers nobody).
        assert!(
            answers_over_tls(port, &ours, &ours).await,
            "port {port}: no answer over TLS with a certificate of the nodes' CA"
        );
        // Plain TCP: no answer.
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        assert!(!answers(tcp).await, "port {port}: answered over plain TCP");
        // Another CA's certificate (trusting the nodes' CA, so the client
        // side would go on): no answer.
        assert!(
            !answers_over_tls(port, &theirs, &ours).await,
            "port {port}: answered a certificate of another CA"
        );
    }
    // The cluster still takes writes.
    let (s, b) = common::post(
        &client(),
        &format!("{}/v1/topics/{T}/records", cluster.url(leader)),
        &json!({"records": [{"value": "after the strangers"}]}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

/// One read of a whole partition, timed: the values in offset order (a gap
/// in the offsets shows as a value no writer sent, which the checker
/// refuses).
struct Read {
    client: usize,
    partition: u32,
    values: Vec<String>,
    call: i64,
    ret: i64,
}

/// Every record of partition `p` on the node at `url`, page by page; `None`
/// if the node did not answer (killed, or not serving yet).
async fn try_read(c: &reqwest::Client, url: &str, p: u32) -> Option<Vec<String>> {
    let mut values = Vec::new();
    let mut offset = 0u64;
    loop {
        let page: Value = c
            .get(format!(
                "{url}/v1/topics/{T}/partitions/{p}/records?offset={offset}&limit=1000"
            ))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())?
            .json()
            .await
            .ok()?;
        let records = page["records"].as_array()?;
        for r in records {
            let at = r["offset"].as_u64()?;
            if at != values.len() as u64 {
                values.push(format!("a gap before offset {at}"));
            }
            values.push(r["value"].as_str()?.to_owned());
        }
        offset = page["next_offset"].as_u64()?;
        if records.is_empty() || offset >= page["end_offset"].as_u64()? {
            return Some(values);
        }
    }
}

/// Readers reading whole partitions from the running nodes in turn until
/// `stop`.
fn start_readers(
    n: usize,
    urls: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    partitions: u32,
) -> Vec<tokio::task::JoinHandle<Vec<Read>>> {
    (0..n)
        .map(|k| {
            let (urls, stop) = (urls.clone(), stop.clone());
            tokio::spawn(async move {
                let c = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                let mut reads = Vec::new();
                let mut i = k;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let targets = urls.lock().unwrap().clone();
                    let url = &targets[i % targets.len()];
                    let partition = (i as u32 / 2) % partitions;
                    i += 1;
                    let call = now_ns();
                    if let Some(values) = try_read(&c, url, partition).await {
                        reads.push(Read {
                            client: 100 + k,
                            partition,
                            values,
                            call,
                            ret: now_ns(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                reads
            })
        })
        .collect()
}

/// The history of writes and reads under leader kills, checked by
/// porcupine (tests/porcupine): offsets follow the real-time order of
/// acknowledgements and are never handed out twice, and every read from
/// any node is a prefix of the log as it was at some moment while the
/// read ran. A write whose answer was lost counts as answered at the end
/// if the final log holds it, and as never made if not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs go (runs the porcupine checker in tests/porcupine; scripts/test installs go)"]
async fn the_history_under_leader_kills_is_linearizable() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.extra = small_snapshots();
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 3).await;
    let writers = Writers::start(3, cluster.urls());
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers = start_readers(2, writers.urls.clone(), reading.clone(), 3);
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let leader = cluster.leader().await;
        let before = writers.acked();
        cluster.kill(leader);
        writers.to(cluster.urls());
        cluster.leader().await;
        writers
            .progress(before, 1, &format!("round {round}, after the kill"))
            .await;
        cluster.start(leader);
        writers.to(cluster.urls());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    reading.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await.expect("reader"));
    }
    let h = writers.finish().await;
    check(&cluster, &h, &BTreeSet::new(), 3).await;

    // Where each value ended up (the same on every node, `check` says).
    let final_log = contents(&cluster.url(0), 3).await;
    let mut found: BTreeMap<&str, (u32, u64)> = BTreeMap::new();
    for (p, records) in &final_log {
        for (o, v) in records {
            found.insert(v.as_str(), (*p, *o));
        }
    }
    let end = now_ns();
    let mut ops = Vec::new();
    let mut lost = 0;
    for a in &h.appends {
        let (at, ret) = match (a.at, found.get(a.value.as_str())) {
            (Some(at), stored) => {
                assert_eq!(stored, Some(&at), "{} was answered with {at:?}", a.value);
                (at, a.ret)
            }
            (None, Some(&at)) => {
                lost += 1;
                (at, end)
            }
            (None, None) => continue,
        };
        ops.push(
            json!({"client": a.client, "kind": "append", "partition": at.0,
            "value": a.value, "offset": at.1, "call": a.call, "return": ret}),
        );
    }
    let nonempty = reads.iter().filter(|r| !r.values.is_empty()).count();
    for r in &reads {
        ops.push(
            json!({"client": r.client, "kind": "read", "partition": r.partition,
            "values": r.values, "call": r.call, "return": r.ret}),
        );
    }
    assert!(nonempty > 10, "only {nonempty} reads returned records");
    let file = root.path().join("history.json");
    std::fs::write(&file, serde_json::to_vec(&ops).expect("json")).expect("write");
    let out = std::process::Command::new("go")
        .args(["run", "."])
        .arg(&file)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/porcupine"))
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go (the porcupine checker) runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "porcupine: {said} ({} appends, {lost} of them answered late, {} reads)",
        h.appends.len(),
        reads.len()
    );
    assert!(said.contains(": Ok"), "{said}");
    eprintln!("porcupine: {said}({lost} appends answered late, {nonempty} reads with records)");
}

/// What a raw Kafka client is told by the node at `addr`: the brokers (id,
/// port) and each partition's leader of topic [`T`].
async fn kafka_metadata(addr: std::net::SocketAddr) -> (Vec<(i32, i32)>, Vec<i32>, uuid::Uuid) {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
    use kafka_protocol::protocol::Decodable;
    let mut c = common::kafka::Client::at(addr).await;
    let req = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default().with_name(Some(common::kafka::name(T)))
    ]));
    let mut b = c.call(ApiKey::Metadata, 10, &req).await;
    let m = MetadataResponse::decode(&mut b, 10).expect("metadata");
    let brokers = m.brokers.iter().map(|b| (b.node_id.0, b.port)).collect();
    let leaders = m.topics[0]
        .partitions
        .iter()
        .map(|p| p.leader_id.0)
        .collect();
    (brokers, leaders, m.topics[0].topic_id)
}

/// A member of group `group` joined through the node at `addr` (JoinGroup
/// v5: handed its id first): the connection, its id and generation.
async fn kafka_member(
    addr: std::net::SocketAddr,
    group: &str,
) -> (common::kafka::Client, String, i32) {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::{ApiKey, GroupId, JoinGroupRequest, JoinGroupResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let mut k = common::kafka::Client::at(addr).await;
    let join = |member: String| {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_owned())))
            .with_session_timeout_ms(60_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(StrBytes::from_string(member))
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(bytes::Bytes::from_static(b"subscription"))])
    };
    let mut b = k.call(ApiKey::JoinGroup, 5, &join(String::new())).await;
    let first = JoinGroupResponse::decode(&mut b, 5).expect("join");
    let member = first.member_id.to_string();
    let mut b = k.call(ApiKey::JoinGroup, 5, &join(member.clone())).await;
    let joined = JoinGroupResponse::decode(&mut b, 5).expect("join");
    assert_eq!(joined.error_code, 0, "{joined:?}");
    (k, member, joined.generation_id)
}

/// A member's Heartbeat: the error code.
async fn kafka_heartbeat(
    k: &mut common::kafka::Client,
    group: &str,
    member: &str,
    generation: i32,
) -> i16 {
    use kafka_protocol::messages::{ApiKey, GroupId, HeartbeatRequest, HeartbeatResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let req = HeartbeatRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_owned())))
        .with_generation_id(generation)
        .with_member_id(StrBytes::from_string(member.to_owned()));
    let mut b = k.call(ApiKey::Heartbeat, 4, &req).await;
    HeartbeatResponse::decode(&mut b, 4)
        .expect("heartbeat")
        .error_code
}

/// The coordinator the node at `addr` names for a group or (`key_type` 1)
/// a transactional id: (error, node id, port).
async fn kafka_coordinator(addr: std::net::SocketAddr, key: &str, key_type: i8) -> (i16, i32, i32) {
    use kafka_protocol::messages::{ApiKey, FindCoordinatorRequest, FindCoordinatorResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let mut c = common::kafka::Client::at(addr).await;
    let req = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_string(key.to_owned()))
        .with_key_type(key_type);
    let mut b = c.call(ApiKey::FindCoordinator, 3, &req).await;
    let r = FindCoordinatorResponse::decode(&mut b, 3).expect("find coordinator");
    (r.error_code, r.node_id.0, r.port)
}

/// OffsetCommit of partition 0 at `offset` outside the group protocol:
/// its error code.
async fn kafka_commit(addr: std::net::SocketAddr, group: &str, offset: i64) -> i16 {
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::{ApiKey, GroupId, OffsetCommitRequest, OffsetCommitResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let mut c = common::kafka::Client::at(addr).await;
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_owned())))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(common::kafka::name(T))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(offset)])]);
    let mut b = c.call(ApiKey::OffsetCommit, 8, &req).await;
    let r = OffsetCommitResponse::decode(&mut b, 8).expect("offset commit");
    r.topics[0].partitions[0].error_code
}

/// OffsetFetch of the group's partition 0: (error, offset).
async fn kafka_fetch_offset(addr: std::net::SocketAddr, group: &str) -> (i16, i64) {
    use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
    use kafka_protocol::messages::{ApiKey, GroupId, OffsetFetchRequest, OffsetFetchResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let mut c = common::kafka::Client::at(addr).await;
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_owned())))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(common::kafka::name(T))
            .with_partition_indexes(vec![0])]));
    let mut b = c.call(ApiKey::OffsetFetch, 7, &req).await;
    let r = OffsetFetchResponse::decode(&mut b, 7).expect("offset fetch");
    let offset = r
        .topics
        .first()
        .map_or(-1, |t| t.partitions[0].committed_offset);
    (r.error_code, offset)
}

/// CreateTopics of one topic, validated only: its error code. With
/// `replicas`, one partition per list placed on those brokers; else one
/// partition and `factor`.
async fn kafka_create(
    addr: std::net::SocketAddr,
    factor: i16,
    replicas: Option<Vec<Vec<i32>>>,
) -> i16 {
    use kafka_protocol::messages::create_topics_request::{
        CreatableReplicaAssignment, CreatableTopic,
    };
    use kafka_protocol::messages::{ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse};
    use kafka_protocol::protocol::Decodable;
    let mut c = common::kafka::Client::at(addr).await;
    let topic = CreatableTopic::default().with_name(common::kafka::name("placed"));
    let topic = match replicas {
        Some(lists) => topic
            .with_num_partitions(-1)
            .with_replication_factor(-1)
            .with_assignments(
                lists
                    .into_iter()
                    .enumerate()
                    .map(|(i, brokers)| {
                        CreatableReplicaAssignment::default()
                            .with_partition_index(i as i32)
                            .with_broker_ids(brokers.into_iter().map(BrokerId).collect())
                    })
                    .collect(),
            ),
        None => topic.with_num_partitions(1).with_replication_factor(factor),
    };
    let req = CreateTopicsRequest::default()
        .with_topics(vec![topic])
        .with_timeout_ms(5000)
        .with_validate_only(true);
    let mut b = c.call(ApiKey::CreateTopics, 7, &req).await;
    let r = CreateTopicsResponse::decode(&mut b, 7).expect("create topics");
    r.topics[0].error_code
}

/// InitProducerId for a transactional id: (error, producer id, epoch).
async fn kafka_init_txn(addr: std::net::SocketAddr, id: &str) -> (i16, i64, i16) {
    use kafka_protocol::messages::{
        ApiKey, InitProducerIdRequest, InitProducerIdResponse, TransactionalId,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let mut c = common::kafka::Client::at(addr).await;
    let req = InitProducerIdRequest::default()
        .with_transactional_id(Some(TransactionalId(StrBytes::from_string(id.to_owned()))))
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(kafka_protocol::messages::ProducerId(-1))
        .with_producer_epoch(-1);
    let mut b = c.call(ApiKey::InitProducerId, 4, &req).await;
    let r = InitProducerIdResponse::decode(&mut b, 4).expect("init producer id");
    (r.error_code, r.producer_id.0, r.producer_epoch)
}

/// Kafka clients see the cluster as Kafka's: every node a broker at its
/// own Kafka port, the leader leading every partition and coordinating
/// groups and transactions. Elsewhere the coordinator APIs answer
/// NOT_COORDINATOR (16); after the leader is killed, the new leader is
/// named, and it holds the committed positions and the transactional
/// ids' state (the same producer id, fenced to the next epoch). A topic
/// may ask for as many replicas as there are nodes, or name them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clients_find_every_node_and_the_leader_coordinates() {
    const NOT_COORDINATOR: i16 = 16;
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 3).await;
    let kafka = |c: &Cluster, i: usize| c.nodes[i].as_ref().expect("running").kafka;
    // Every node names all three (each publishes its endpoint at start).
    let expected = |c: &Cluster| -> Vec<(i32, i32)> {
        (0..3)
            .filter(|i| c.nodes[*i].is_some())
            .map(|i| (i as i32 + 1, i32::from(kafka(c, i).port())))
            .collect()
    };
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..3 {
        loop {
            let (brokers, leaders, id) = kafka_metadata(kafka(&cluster, i)).await;
            // (A follower may not have applied the topic yet.)
            if brokers == expected(&cluster) && !leaders.is_empty() {
                assert_eq!(leaders, vec![leader as i32 + 1; 3], "node {}", i + 1);
                ids.push(id);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "node {} names {brokers:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The topic's id, given once by whoever created it, is the same on all.
    assert!(
        !ids[0].is_nil() && ids.iter().all(|id| *id == ids[0]),
        "{ids:?}"
    );
    let follower = (leader + 1) % 3;
    // Every partition is kept on all three: a topic may ask for up to
    // three replicas, or name distinct brokers of the three.
    const INVALID_REPLICATION_FACTOR: i16 = 38;
    const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
    let at = kafka(&cluster, follower);
    for (factor, code) in [(3, 0), (1, 0), (-1, 0), (4, INVALID_REPLICATION_FACTOR)] {
        assert_eq!(
            kafka_create(at, factor, None).await,
            code,
            "factor {factor}"
        );
    }
    for (replicas, code) in [
        (vec![vec![2, 3, 1], vec![1]], 0),
        (vec![vec![1, 1]], INVALID_REPLICA_ASSIGNMENT),
        (vec![vec![4]], INVALID_REPLICA_ASSIGNMENT),
        (vec![vec![]], INVALID_REPLICA_ASSIGNMENT),
    ] {
        assert_eq!(
            kafka_create(at, -1, Some(replicas.clone())).await,
            code,
            "{replicas:?}"
        );
    }
    for key_type in [0, 1] {
        let (code, node, port) = kafka_coordinator(kafka(&cluster, follower), "g", key_type).await;
        assert_eq!(
            (code, node, port),
            (
                0,
                leader as i32 + 1,
                i32::from(kafka(&cluster, leader).port())
            )
        );
    }
    // Coordinator APIs on a follower are refused; on the leader they work.
    assert_eq!(
        kafka_commit(kafka(&cluster, follower), "g", 0).await,
        NOT_COORDINATOR
    );
    assert_eq!(
        kafka_fetch_offset(kafka(&cluster, follower), "g").await.0,
        NOT_COORDINATOR
    );
    assert_eq!(
        kafka_init_txn(kafka(&cluster, follower), "t").await.0,
        NOT_COORDINATOR
    );
    // (No position reads as -1.)
    assert_eq!(
        kafka_fetch_offset(kafka(&cluster, leader), "g").await,
        (0, -1)
    );
    assert_eq!(kafka_commit(kafka(&cluster, leader), "g", 0).await, 0);
    assert_eq!(
        kafka_fetch_offset(kafka(&cluster, leader), "g").await,
        (0, 0)
    );
    let (code, pid, epoch) = kafka_init_txn(kafka(&cluster, leader), "t").await;
    assert_eq!((code, epoch), (0, 0));

    // The leader dies: the others name the new one, which has it all.
    cluster.kill(leader);
    let next = cluster.leader().await;
    assert_ne!(next, leader);
    let survivor = (0..3)
        .find(|i| *i != leader && *i != next)
        .expect("a follower");
    let started = Instant::now();
    loop {
        let (brokers, leaders, _) = kafka_metadata(kafka(&cluster, survivor)).await;
        let found = kafka_coordinator(kafka(&cluster, survivor), "g", 0).await;
        if leaders == vec![next as i32 + 1; 3]
            && found == (0, next as i32 + 1, i32::from(kafka(&cluster, next).port()))
        {
            // The dead node is still a voter: it is named at its last
            // endpoint, the leader is not it.
            assert_eq!(brokers.len(), 3, "{brokers:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "after the kill: {leaders:?} {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kafka_fetch_offset(kafka(&cluster, next), "g").await, (0, 0));
    assert_eq!(
        kafka_commit(kafka(&cluster, survivor), "g", 0).await,
        NOT_COORDINATOR
    );
    let started = Instant::now();
    let again = loop {
        let a = kafka_init_txn(kafka(&cluster, next), "t").await;
        // COORDINATOR_NOT_AVAILABLE while the new coordinator loads.
        if a.0 != 15 || started.elapsed() > Duration::from_secs(30) {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        again,
        (0, pid, 1),
        "the transactional id's state moved with the leader"
    );
    assert_eq!(
        kafka_init_txn(kafka(&cluster, survivor), "t").await.0,
        NOT_COORDINATOR
    );
}

/// Three nodes started, each keeping its Kafka port across restarts, with
/// this first-rebalance delay; the cluster and the clients' bootstrap list
/// (all three).
fn kafka_cluster(root: &Path, rebalance_delay_ms: u32) -> (Cluster, String) {
    let mut cluster = Cluster::new(root, 3);
    let kafka_ports = free_ports(3);
    cluster.node_env = kafka_ports
        .iter()
        .map(|p| vec![("TRIBUTARY_KAFKA__LISTEN".into(), format!("127.0.0.1:{p}"))])
        .collect();
    cluster.extra = vec![(
        "TRIBUTARY_GROUPS__INITIAL_REBALANCE_DELAY_MS".into(),
        rebalance_delay_ms.to_string(),
    )];
    cluster.start_all();
    let bootstrap = kafka_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    (cluster, bootstrap)
}

/// A librdkafka consume-transform-produce loop (confluent-kafka,
/// `tests/clients/kafka_txn_check.py ctp`) bootstrapped on all three
/// nodes, while the leader is killed -9 again and again: its group and its
/// transactions move to each new leader. Each input record must come out
/// exactly once, in order per partition, with the group's committed
/// positions at the inputs' ends, and every node must hold the same logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
async fn a_librdkafka_transactional_loop_through_leader_kills_turns_each_input_into_one_output() {
    use std::process::Command;
    const CHUNK: u64 = 1500;
    let root = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let statefile = scratch.path().join("ctp-state.json");
    let (mut cluster, bootstrap) = kafka_cluster(root.path(), 300);
    let leader = cluster.leader().await;
    let c = client();
    common::create_topic(&c, &cluster.url(leader), "ctpin", 3).await;
    common::create_topic(&c, &cluster.url(leader), "ctpout", 3).await;
    let script = common::clients_dir().join("kafka_txn_check.py");
    let seed = |from: u64| {
        let out = Command::new("python3")
            .arg(&script)
            .args(["ctp-seed", &bootstrap, "ctpin", "3"])
            .args([from.to_string(), CHUNK.to_string()])
            .output()
            .expect("python3");
        let s = common::summary_of("kafka_txn_check.py ctp-seed", &out);
        assert_eq!(s["seeded"], CHUNK, "{s}");
    };
    let log = |ext: &str| scratch.path().join(format!("ctp.{ext}"));
    let file = |ext| std::fs::File::create(log(ext)).expect("log file");
    let mut ctp = Command::new("python3")
        .arg(&script)
        .args(["ctp", &bootstrap, "ctpin", "ctpout", "ctp-group"])
        .arg(&statefile)
        .args(["--follow", "--deadline-s", "1800"])
        .stdout(file("out"))
        .stderr(file("err"))
        .spawn()
        .expect("python3");
    let output = || {
        let out = std::fs::read_to_string(log("out")).unwrap_or_default();
        let err = std::fs::read_to_string(log("err")).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        format!(
            "{out}\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    let mut rng = fastrand::Rng::with_seed(47);
    let mut seeded = 0;
    let kills = 4;
    for kill in 0..kills {
        seed(seeded);
        seeded += CHUNK;
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
        let leader = cluster.leader().await;
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(rng.u64(100..500))).await;
        cluster.start(leader);
        if let Some(status) = ctp.try_wait().expect("try_wait") {
            panic!(
                "the loop ended by itself ({status}) after kill {kill}:\n{}",
                output()
            );
        }
    }
    seed(seeded);
    seeded += CHUNK;
    // It stops between transactions, and a loop that ends at the inputs'
    // ends does the rest.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = Command::new("kill")
        .args(["-TERM", &ctp.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let waited = Instant::now();
    let status = loop {
        if let Some(status) = ctp.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "the loop did not stop on SIGTERM:\n{}",
            output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}:\n{}", output());
    let out = Command::new("python3")
        .arg(&script)
        .args(["ctp", &bootstrap, "ctpin", "ctpout", "ctp-group"])
        .arg(&statefile)
        .args(["--deadline-s", "300"])
        .output()
        .expect("python3");
    let s = common::summary_of("kafka_txn_check.py ctp (the rest)", &out);
    assert_eq!(s["done"], true, "{s}");
    eprintln!(
        "consume-transform-produce across {kills} leader kills: {}",
        s["state"]
    );
    common::assert_ctp_verified(&bootstrap, seeded);
    // Every node holds the same logs, offset by offset.
    cluster.settled().await;
    for topic in ["ctpin", "ctpout"] {
        for p in 0..3 {
            let mut first = None;
            for url in cluster.urls() {
                let got = read_all(&c, &url, topic, p).await;
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(*f == got, "{topic}/{p} differs on {url}"),
                }
            }
        }
    }
}

/// A group's members are the leader's, and every node knows which groups
/// have some: a follower's HTTP API refuses a plain commit to such a group
/// (409, as the leader's does, and as Kafka refuses it) and takes one once
/// the members have left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_an_http_commit_to_a_group_whose_members_are_on_the_leader() {
    use kafka_protocol::messages::leave_group_request::MemberIdentity;
    use kafka_protocol::messages::{ApiKey, GroupId, LeaveGroupRequest, LeaveGroupResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let root = tempfile::tempdir().expect("tempdir");
    let (cluster, _) = kafka_cluster(root.path(), 0);
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 1).await;
    let follower = (leader + 1) % 3;
    let c = client();
    let commit = |node: usize| {
        let (c, url) = (c.clone(), cluster.url(node));
        async move {
            common::post(
                &c,
                &format!("{url}/v1/groups/g/offsets"),
                &json!({"offsets": [{"topic": T, "partition": 0, "offset": 0}]}),
            )
            .await
        }
    };
    // Waits until a commit on `node` is answered `status`.
    let answered = |node: usize, status: u16| {
        let commit = &commit;
        async move {
            let started = Instant::now();
            loop {
                let (s, b) = commit(node).await;
                if s == status {
                    return;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "node {}: still {s} {b}",
                    node + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    answered(follower, 200).await;
    // A member joins at the leader.
    let (mut k, member, _) =
        kafka_member(cluster.nodes[leader].as_ref().expect("running").kafka, "g").await;
    assert_eq!(commit(leader).await.0, 409);
    answered(follower, 409).await;
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_static_str("g")))
        .with_members(vec![
            MemberIdentity::default().with_member_id(StrBytes::from_string(member))
        ]);
    let mut b = k.call(ApiKey::LeaveGroup, 3, &leave).await;
    let left = LeaveGroupResponse::decode(&mut b, 3).expect("leave");
    assert_eq!(left.error_code, 0, "{left:?}");
    answered(follower, 200).await;
    assert_eq!(commit(leader).await.0, 200);
}

/// A group of librdkafka consumers (`tests/clients/kafka_group_check.py`:
/// members join, one leaves, one is killed, one joins late), bootstrapped
/// on all three nodes while the leader, their coordinator, is killed -9
/// twice: they find each new leader and rejoin there; every record is
/// stored and consumed once and the committed positions end at the
/// partitions' ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs confluent-kafka (scripts/test installs it)"]
async fn a_group_of_librdkafka_consumers_follows_the_leader_through_kills() {
    let root = tempfile::tempdir().expect("tempdir");
    let (mut cluster, bootstrap) = kafka_cluster(root.path(), 500);
    let leader = cluster.leader().await;
    let c = client();
    common::create_topic(&c, &cluster.url(leader), "grp", 6).await;
    let script = common::clients_dir().join("kafka_group_check.py");
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .args([bootstrap.as_str(), "grp", "g-cluster", "range"])
            .output()
            .expect("python3")
    });
    for pause in [2, 3] {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        let leader = cluster.leader().await;
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.start(leader);
    }
    let out = run.await.expect("join");
    let s = common::summary_of("kafka_group_check.py", &out);
    eprintln!("group through leader kills: {s}");
    assert_eq!(s["produced"], 1800, "{s}");
    // The producer is idempotent: a batch it sent again to a new leader,
    // its first answer lost with the old one, is stored once.
    assert_eq!(s["ends"], 1800, "{s}");
    assert_eq!(s["consumed_distinct"], 1800, "{s}");
    assert_eq!(s["consumed_keys"], 1800, "{s}");
    assert_eq!(s["committed"], 1800, "{s}");
    // The leader's view of the group: every member gone, nothing to read.
    let leader = cluster.leader().await;
    let (status, g) = get(&c, &format!("{}/v1/groups/g-cluster", cluster.url(leader))).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["lag"], 0, "{g}");
}

/// An MQTT client (rumqttc, 3.1.1) of node `i` with a persistent session.
fn mqtt_client(
    cluster: &Cluster,
    i: usize,
    id: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let addr = cluster.nodes[i].as_ref().expect("running").mqtt;
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    rumqttc::AsyncClient::new(o, 100)
}

/// Polls until CONNACK: its session-present flag.
async fn mqtt_connack(el: &mut rumqttc::EventLoop) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("CONNACK in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success);
                return a.session_present;
            }
            Ok(_) => {}
            Err(e) => panic!("connection failed: {e}"),
        }
    }
}

/// Polls until `n` distinct payloads have come (acknowledging each).
async fn mqtt_receive(el: &mut rumqttc::EventLoop, n: usize) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    while got.len() < n {
        let Ok(polled) = tokio::time::timeout(Duration::from_secs(20), el.poll()).await else {
            panic!("only {got:?} came");
        };
        match polled {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                got.insert(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(_) => {}
            Err(e) => panic!("connection failed after {got:?}: {e}"),
        }
    }
    got
}

/// Publishes `values` at QoS 1 to `{T}/room` through node `i`, each
/// acknowledged.
async fn mqtt_publish(cluster: &Cluster, i: usize, values: &[&str]) {
    let messages: Vec<(String, String)> = values
        .iter()
        .map(|v| (format!("{T}/room"), (*v).to_owned()))
        .collect();
    mqtt_publish_to(cluster, i, &messages).await;
}

/// Publishes `(MQTT topic, value)` messages at QoS 1 through node `i`,
/// each acknowledged.
async fn mqtt_publish_to(cluster: &Cluster, i: usize, messages: &[(String, String)]) {
    let (c, mut el) = mqtt_client(cluster, i, &format!("pub-{i}"));
    mqtt_connack(&mut el).await;
    // Handed to the client's bounded queue while this task polls below.
    let publisher = c.clone();
    let messages_to = messages.to_vec();
    let sending = tokio::spawn(async move {
        for (topic, v) in messages_to {
            publisher
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, v.into_bytes())
                .await
                .expect("publish");
        }
    });
    let mut acked = 0;
    while acked < messages.len() {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("PUBACK in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("publishing failed: {e}"),
        }
    }
    sending.await.expect("publisher");
    let _ = c.disconnect().await;
}

/// A persistent MQTT session follows its client from node to node: what
/// was published while it was away, through any node, comes when it
/// reconnects to another one (session present); and when the same client
/// id connects to a third node, the connection on the second is taken
/// over (closed), as on a single broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_session_follows_its_client_across_nodes() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 1).await;
    let (a, b, c) = (0, 1, 2);

    let (sub, mut el) = mqtt_client(&cluster, a, "roamer");
    assert!(!mqtt_connack(&mut el).await, "a new session");
    sub.subscribe(format!("{T}/#"), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("SUBACK in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("subscribing failed: {e}"),
        }
    }
    // Published on another node, delivered here (the log is replicated).
    mqtt_publish(&cluster, b, &["one", "two"]).await;
    let got = mqtt_receive(&mut el, 2).await;
    assert_eq!(got, BTreeSet::from(["one".into(), "two".into()]));
    sub.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while el.poll().await.is_ok() {}
    })
    .await;

    // Away: two more, through the third node.
    mqtt_publish(&cluster, c, &["three", "four"]).await;
    let (_sub, mut el) = mqtt_client(&cluster, b, "roamer");
    assert!(
        mqtt_connack(&mut el).await,
        "the session moved to node {}",
        b + 1
    );
    let got = mqtt_receive(&mut el, 2).await;
    assert_eq!(got, BTreeSet::from(["three".into(), "four".into()]));

    // The same client id on node c: node b lets its connection go.
    let (_taker, mut el_c) = mqtt_client(&cluster, c, "roamer");
    assert!(mqtt_connack(&mut el_c).await);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if el.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the connection on node {} was not taken over",
        b + 1
    );
}

/// Polls `el` in the background, keeping every payload that comes (its
/// client acknowledges each); reconnects after a failure.
fn mqtt_collect(el: rumqttc::EventLoop) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    mqtt_collect_as(el, |p| String::from_utf8_lossy(&p.payload).into_owned())
}

/// [`mqtt_collect`], keeping what `keep` makes of each message.
fn mqtt_collect_as(
    mut el: rumqttc::EventLoop,
    keep: fn(&rumqttc::Publish) -> String,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let into = got.clone();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    into.lock().unwrap().push(keep(&p));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    (got, task)
}

/// Waits until every one of `want` has come to one of `members`.
async fn mqtt_all_came(members: &[&Arc<Mutex<Vec<String>>>], want: &BTreeSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got: BTreeSet<String> = members
            .iter()
            .flat_map(|m| m.lock().unwrap().clone())
            .collect();
        let missing = want.difference(&got).count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} never came; each member got {:?}",
            want.len(),
            members
                .iter()
                .map(|m| m.lock().unwrap().len())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An MQTT shared subscription whose members are connected to two nodes:
/// the nodes share the group's partitions out, so each message goes to one
/// member of the group (before, each node delivered every message to its
/// own members: twice in all). When the node of one member is killed, the
/// other takes its partitions from the cursors it stored and delivers
/// what is published next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_across_nodes_delivers_each_message_to_one_member() {
    const N: usize = 200;
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    create(&cluster.url(leader), 4).await;
    // The member of node b is killed later: b is not the leader.
    let (a, b, c) = (leader, (leader + 1) % 3, (leader + 2) % 3);
    let mut clients = Vec::new();
    let mut got = Vec::new();
    let mut tasks = Vec::new();
    for (i, id) in [(a, "share-a"), (b, "share-b")] {
        let (client, mut el) = mqtt_client(&cluster, i, id);
        mqtt_connack(&mut el).await;
        client
            .subscribe(format!("$share/g/{T}/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let (g, t) = mqtt_collect(el);
        clients.push(client);
        got.push(g);
        tasks.push(t);
    }
    // Each node announces its member, then takes its share.
    tokio::time::sleep(shared_handover()).await;

    let batch = |phase: usize| -> Vec<(String, String)> {
        (0..N)
            .map(|i| (format!("{T}/room{}", i % 50), format!("{phase}-{i}")))
            .collect()
    };
    let first = batch(1);
    mqtt_publish_to(&cluster, c, &first).await;
    let want: BTreeSet<String> = first.iter().map(|(_, v)| v.clone()).collect();
    mqtt_all_came(&[&got[0], &got[1]], &want).await;
    // Late duplicates would come within this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (at_a, at_b) = (
        got[0].lock().unwrap().clone(),
        got[1].lock().unwrap().clone(),
    );
    assert_eq!(
        at_a.len() + at_b.len(),
        N,
        "each message once across the group: {} at node {}, {} at node {}",
        at_a.len(),
        a + 1,
        at_b.len(),
        b + 1
    );
    assert!(
        !at_a.is_empty() && !at_b.is_empty(),
        "the nodes share the partitions: {} and {}",
        at_a.len(),
        at_b.len()
    );

    // Node b dies with its member; node a takes b's partitions once b's
    // beat has stopped, from b's stored cursors.
    cluster.kill(b);
    let second = batch(2);
    mqtt_publish_to(&cluster, c, &second).await;
    let want: BTreeSet<String> = second.iter().map(|(_, v)| v.clone()).collect();
    mqtt_all_came(&[&got[0]], &want).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at_a = got[0].lock().unwrap().clone();
    let firsts = at_a.iter().filter(|v| v.starts_with("1-")).count();
    let seconds = at_a.iter().filter(|v| v.starts_with("2-")).count();
    assert_eq!(
        seconds,
        N,
        "each of the second batch once at node {}",
        a + 1
    );
    // Node b had stored its acknowledgements before it died: nothing of
    // the first batch comes again.
    assert_eq!(
        firsts,
        N - at_b.len(),
        "the first batch given again after node {}'s death",
        b + 1
    );
    for t in tasks {
        t.abort();
    }
}

/// Delayed MQTT wills outlive their node: a client with a will delayed 2 s
/// drops its connection to a follower, which is killed -9 before the will
/// is due; the leader publishes it once that node has let it pass
/// (`wills::ORPHANED`). Another client drops its connection to a follower
/// and comes back through the leader before its delay: its will is void,
/// and the follower that held it does not publish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_outlives_its_node_and_is_void_when_its_client_is_back_elsewhere() {
    use common::mqtt5::{connect_v5_session, raw_connect};
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    // A core creates no topics for producers: the one wills go to.
    let (s, body) = common::post(
        &client(),
        &format!("{}/v1/topics", cluster.url(leader)),
        &json!({"name": "wills", "partitions": 1}),
    )
    .await;
    assert!(s == 200 || s == 201, "create: {s} {body}");
    let (b, c) = ((leader + 1) % 3, (leader + 2) % 3);
    let (watcher, mut el) = mqtt_client(&cluster, leader, "will-watch");
    mqtt_connack(&mut el).await;
    watcher
        .subscribe("wills/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (wills, task) = mqtt_collect_as(el, |p| p.topic.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mqtt = |i: usize| cluster.nodes[i].as_ref().expect("running").mqtt;

    // Back through the leader 0.5 s after leaving node c, before its 3 s.
    let (s, ack) = raw_connect(mqtt(c), &connect_v5_session("returner", 10, 300, Some(3))).await;
    assert_eq!(ack[3], 0, "connected");
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (back, ack) =
        raw_connect(mqtt(leader), &connect_v5_session("returner", 10, 300, None)).await;
    assert_eq!((ack[0], ack[3]), (0x20, 0), "back");

    // Left on node b, which dies before the will is due.
    let (s, ack) = raw_connect(mqtt(b), &connect_v5_session("leaver", 10, 300, Some(2))).await;
    assert_eq!(ack[3], 0, "connected");
    drop(s);
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.kill(b);
    let left = Instant::now();
    let deadline = left + Duration::from_secs(45);
    while !wills.lock().unwrap().iter().any(|t| t == "wills/leaver") {
        assert!(
            Instant::now() < deadline,
            "the will of a client of the killed node never came: {:?}",
            wills.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "the dead node's will came {:?} after the kill",
        left.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = wills.lock().unwrap().clone();
    assert_eq!(
        got,
        ["wills/leaver"],
        "the dead node's will once, and none for the client that came back"
    );
    drop(back);
    task.abort();
}

/// How long the nodes of a shared subscription take to share its
/// partitions out once members joined: the grace, and the records read
/// once a second.
fn shared_handover() -> Duration {
    Duration::from_secs(5)
}

/// A pipeline created over a follower's API runs on the leader alone
/// (standby elsewhere) and moves with it: through two leader kills, each
/// input row comes out exactly once, on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_on_the_leader_and_moves_with_it_exactly_once() {
    const BATCHES: usize = 30;
    const PER: usize = 100;
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    let c = client();
    common::create_topic(&c, &cluster.url(leader), "src", 1).await;
    let follower = (leader + 1) % 3;
    let (s, b) = common::post(
        &c,
        &format!("{}/v1/pipelines", cluster.url(follower)),
        &json!({"name": "p", "sql": "INSERT INTO dst SELECT id FROM src WITH (commit_interval = '10ms', max_batch = 50)"}),
    )
    .await;
    assert!(s == 200 || s == 201, "create: {s} {b}");
    // Every node has it; the leader runs it.
    let started = Instant::now();
    loop {
        let mut states = Vec::new();
        for i in 0..3 {
            let (_, p) = get(&c, &format!("{}/v1/pipelines/p", cluster.url(i))).await;
            states.push(p["state"].as_str().unwrap_or("").to_owned());
        }
        let want: Vec<&str> = (0..3)
            .map(|i| if i == leader { "running" } else { "standby" })
            .collect();
        if states == want {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "pipeline states {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut id = 0;
    for batch in 0..BATCHES {
        if batch == 10 || batch == 20 {
            let l = cluster.leader().await;
            cluster.kill(l);
            tokio::time::sleep(Duration::from_millis(200)).await;
            cluster.start(l);
        }
        let records: Vec<Value> = (0..PER)
            .map(|_| {
                id += 1;
                json!({"value": {"id": id}})
            })
            .collect();
        // Through the leader, one batch at a time: no write is in flight
        // at a kill, so each input is stored once.
        let l = cluster.leader().await;
        let (s, b) = common::post(
            &c,
            &format!("{}/v1/topics/src/records", cluster.url(l)),
            &json!({ "records": records }),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let total = BATCHES * PER;
    let started = Instant::now();
    loop {
        let l = cluster.leader().await;
        let rows = read_all(&c, &cluster.url(l), "dst", 0).await;
        if rows.len() >= total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {total} rows out",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.settled().await;
    let mut first = None;
    for url in cluster.urls() {
        let rows = read_all(&c, &url, "dst", 0).await;
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, _, v) in &rows {
            let row: Value = serde_json::from_slice(v).expect("a JSON row");
            *seen.entry(row["id"].as_u64().expect("an id")).or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "rows out twice on {url}: {twice:?}");
        assert_eq!(seen.len(), total, "rows on {url}");
        match &first {
            None => first = Some(rows),
            Some(f) => assert!(*f == rows, "dst differs on {url}"),
        }
    }
}

/// A webhook that counts the `value.n` of every record posted to it.
/// Records numbered from here on are answered a quarter second late (a
/// sink that is still delivering and committing a while).
const SLOW_FROM: u64 = 400;

async fn counting_webhook() -> (String, Arc<Mutex<BTreeMap<u64, usize>>>) {
    let seen: Arc<Mutex<BTreeMap<u64, usize>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<
                    Arc<Mutex<BTreeMap<u64, usize>>>,
                >,
                 body: String| async move {
                    let v: Value = serde_json::from_str(&body).expect("the sink posts JSON");
                    let records = match v.get("records") {
                        Some(Value::Array(a)) => a.clone(),
                        _ => vec![v],
                    };
                    let mut slow = false;
                    {
                        let mut seen = seen.lock().unwrap();
                        for r in records {
                            let n = r["value"]["n"].as_u64().expect("n");
                            *seen.entry(n).or_default() += 1;
                            slow |= n >= SLOW_FROM;
                        }
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    "ok"
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// A connector created over a follower's API runs on the leader alone
/// (standby elsewhere): a webhook gets each record once, not once per
/// node; after the leader is killed, the new leader delivers what comes
/// next. Deleted through a follower while the leader's task is still
/// delivering, its positions are gone on every node and stay gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_runs_on_the_leader_alone() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.start_all();
    let leader = cluster.leader().await;
    let c = client();
    common::create_topic(&c, &cluster.url(leader), "events", 1).await;
    let (url, seen) = counting_webhook().await;
    let follower = (leader + 1) % 3;
    let (s, b) = common::post(
        &c,
        &format!("{}/v1/connectors", cluster.url(follower)),
        &json!({"name": "hooks", "kind": "http_sink", "topics": ["events"], "url": url, "batch_size": 50}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let produce = |url: String, from: u64| {
        let c = c.clone();
        async move {
            let records: Vec<Value> = (from..from + 200)
                .map(|n| json!({"value": {"n": n}}))
                .collect();
            let (s, b) = common::post(
                &c,
                &format!("{url}/v1/topics/events/records"),
                &json!({ "records": records }),
            )
            .await;
            assert_eq!(s, 200, "{b}");
        }
    };
    let delivered = |n: usize| {
        let seen = seen.clone();
        async move {
            let started = Instant::now();
            while seen.lock().unwrap().len() < n {
                assert!(started.elapsed() < Duration::from_secs(30), "not delivered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Time for a second delivery, were a follower delivering too.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    produce(cluster.url(follower), 0).await;
    delivered(200).await;
    for i in 0..3 {
        let (_, v) = get(&c, &format!("{}/v1/connectors/hooks", cluster.url(i))).await;
        let want = if i == leader { "running" } else { "standby" };
        assert_eq!(v["state"], want, "node {}: {v}", i + 1);
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 200);
        assert!(
            seen.values().all(|n| *n == 1),
            "delivered more than once: {seen:?}"
        );
    }
    cluster.kill(leader);
    let next = cluster.leader().await;
    produce(cluster.url(next), 200).await;
    delivered(400).await;
    let (_, v) = get(&c, &format!("{}/v1/connectors/hooks", cluster.url(next))).await;
    assert_eq!(v["state"], "running", "{v}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 400);
        // At least once across the failover (an HTTP sink's promise); the
        // records after it once.
        assert!((200..400).all(|n| seen.get(&n) == Some(&1)), "{seen:?}");
    }
    // Deleted through a follower while the leader's task is delivering
    // and committing: its positions go, and the task, stopped a moment
    // later on the leader, does not write them back.
    let other = (0..3)
        .find(|&i| i != leader && i != next)
        .expect("a live follower");
    produce(cluster.url(next), SLOW_FROM).await;
    produce(cluster.url(next), SLOW_FROM + 200).await;
    let started = Instant::now();
    while seen.lock().unwrap().len() < 450 {
        assert!(started.elapsed() < Duration::from_secs(30), "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deleted = c
        .delete(format!("{}/v1/connectors/hooks", cluster.url(other)))
        .send()
        .await
        .expect("delete");
    assert!(deleted.status().is_success(), "{}", deleted.status());
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in [next, other] {
        let (s, v) = get(
            &c,
            &format!("{}/v1/groups/connector-hooks/offsets", cluster.url(i)),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["offsets"], json!([]), "node {}: {v}", i + 1);
    }
}

/// With device authentication, what one node's admin API does to a device
/// holds on every node within seconds: a device added on one logs in on
/// the others, a token rotated on another stops working everywhere (and
/// the new one works), a device disabled on the third is refused
/// everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_changed_on_one_node_is_changed_on_every_node() {
    const ADMIN: &str = "admin-token-for-the-cluster-tests-0123";
    let root = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::new(root.path(), 3);
    cluster.extra = vec![
        ("TRIBUTARY_AUTH__MODE".into(), "devices".into()),
        ("TRIBUTARY_AUTH__ADMIN_TOKEN".into(), ADMIN.into()),
    ];
    cluster.start_all();
    let c = client();
    let created = c
        .post(format!("{}/v1/topics", cluster.url(0)))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "events", "partitions": 1}))
        .send()
        .await
        .expect("create topic");
    assert!(created.status().is_success(), "{}", created.status());
    let write = |node: usize, token: String| {
        let (c, url) = (c.clone(), cluster.url(node));
        async move {
            c.post(format!("{url}/v1/topics/events/records"))
                .bearer_auth(token)
                .json(&json!({"records": [{"value": "x"}]}))
                .send()
                .await
                .expect("write")
                .status()
                .as_u16()
        }
    };
    // Waits until a write with `token` on `node` is answered `status`.
    let answered = |node: usize, token: String, status: u16, what: &'static str| {
        let write = &write;
        async move {
            let started = Instant::now();
            loop {
                let got = write(node, token.clone()).await;
                if got == status {
                    return;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "node {}: {what}: still {got}",
                    node + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let token = common::add_device(&cluster.url(0), ADMIN, "pump", &["#"], &["#"]).await;
    for node in 0..3 {
        answered(node, token.clone(), 200, "the added device").await;
    }
    let rotated: Value = c
        .post(format!("{}/v1/devices/pump/rotate", cluster.url(1)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("rotate")
        .json()
        .await
        .expect("json");
    let fresh = rotated["token"].as_str().expect("a token").to_owned();
    for node in 0..3 {
        answered(node, token.clone(), 401, "the rotated-out token").await;
        answered(node, fresh.clone(), 200, "the new token").await;
    }
    let disabled = c
        .patch(format!("{}/v1/devices/pump", cluster.url(2)))
        .bearer_auth(ADMIN)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .expect("disable");
    assert!(disabled.status().is_success(), "{}", disabled.status());
    for node in 0..3 {
        answered(node, fresh.clone(), 403, "the disabled device").await;
    }
}
