//! Store and forward, edge → core, with real processes on loopback and a
//! fault-injecting TCP proxy between them. After every scenario, every
//! record the edge holds is at the core exactly once, byte for byte, in
//! order per partition and lane (`common::sync::assert_forwarded`).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::sync::*;
use common::{client, create_topic, get, metric, post, ChildNode};
use serde_json::{json, Value};

const T: &str = "sensors";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Produces `batches` requests of `per` records to the edge, acknowledged.
async fn produce_all(edge: &str, topic: &str, tag: &str, from: u64, batches: u64, per: u64) -> u64 {
    let c = client();
    for b in 0..batches {
        let acked = produce(&c, edge, topic, tag, from + b * per, per)
            .await
            .expect("the edge takes it");
        assert_eq!(acked.len() as u64, per);
    }
    batches * per
}

async fn core_proxy(core: &ChildNode) -> Proxy {
    Proxy::start(http_addr(core).parse().expect("addr")).await
}

/// 1. A steady stream: everything arrives once, each edge partition in edge
///    order (one run), in the core partition of the same number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_stream_arrives_exactly_once_and_in_order() {
    let dir = tmp();
    let core = start_core(
        &dir.path().join("core"),
        &[("TRIBUTARY_SYNC__HEARTBEAT_MS", "5000")],
    );
    // Strict order and no duplicates hold on one connection: timeouts at
    // the production scale, so a loaded machine cannot fake a dead link.
    let edge = start_edge(
        &dir.path().join("edge"),
        &sync_url(&http_addr(&core)),
        "edge-a",
        &[
            ("TRIBUTARY_UPSTREAM__HEARTBEAT_MS", "1000"),
            ("TRIBUTARY_UPSTREAM__TIMEOUT_MS", "15000"),
        ],
    );
    let c = client();
    create_topic(&c, &edge.url, T, 3).await;
    let mut producers = Vec::new();
    for w in 0..4u64 {
        let url = edge.url.clone();
        producers.push(tokio::spawn(async move {
            produce_all(&url, T, &format!("w{w}"), w * 1_000_000, 50, 20).await
        }));
    }
    let mut total = 0;
    for p in producers {
        total += p.await.expect("producer");
    }
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    let f = check_topic("edge-a", &edge.url, &core.url, T).await;
    assert_eq!(f.records as u64, total);
    for (p, runs) in &f.runs {
        assert_eq!(*runs, 1, "edge partition {p} arrives in edge order");
    }
    for ((ep, _), (cp, _)) in &f.at_core {
        assert_eq!(ep, cp, "edge partition p lands in core partition p");
    }
    assert_eq!(
        metric(&core.url, "tributary_sync_duplicate_events_total", None).await,
        0
    );
    assert_eq!(
        metric(&core.url, "tributary_sync_received_events_total", None).await,
        total
    );
    let acked = metric(&edge.url, "tributary_sync_acked_events_total", None).await;
    assert_eq!(acked, total);
    let raw = metric(&edge.url, "tributary_sync_raw_bytes_total", None).await;
    let wire = metric(&edge.url, "tributary_sync_wire_bytes_total", None).await;
    assert!(
        wire < raw,
        "zstd makes JSON smaller on the wire: {wire} vs {raw}"
    );
    let (_, stats) = get(&c, &format!("{}/v1/stats", core.url)).await;
    let edges = stats["sync"]["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0]["edge"], "edge-a");
    assert_eq!(edges[0]["connected"], true);
    assert_eq!(edges[0]["lag_events"], 0);
}

/// 2. The core is down for 30 s: the backlog waits on the edge (with its lag
///    visible), drains when the core is back, and live events produced
///    after the reconnect reach the core before the backlog has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_outage_drains_with_live_events_first() {
    let dir = tmp();
    let core_dir = dir.path().join("core");
    let mut core = start_core(&core_dir, &[]);
    let proxy = core_proxy(&core).await;
    // Uncompressed and capped at 400 KB/s, so the drain takes seconds.
    let edge = start_edge(
        &dir.path().join("edge"),
        &sync_url(&proxy.addr().to_string()),
        "edge-a",
        &[
            ("TRIBUTARY_UPSTREAM__COMPRESSION", "none"),
            ("TRIBUTARY_UPSTREAM__MAX_BYTES_PER_SEC", "400000"),
            ("TRIBUTARY_UPSTREAM__BATCH_MAX_RECORDS", "200"),
        ],
    );
    let c = client();
    create_topic(&c, &edge.url, T, 2).await;
    let before = produce_all(&edge.url, T, "before", 0, 10, 20).await;
    wait_drained(&edge.url, Duration::from_secs(60)).await;

    core.kill9();
    let down = Instant::now();
    let mut backlog = 0;
    while down.elapsed() < Duration::from_secs(30) {
        if backlog < 24_000 {
            backlog += produce_all(&edge.url, T, "backlog", 1_000_000 + backlog, 1, 400).await;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let s = edge_sync_stats(&edge.url).await;
    assert_eq!(s["connected"], false, "{s}");
    let lag = &s["topics"][0];
    assert_eq!(lag["lag_events"].as_u64(), Some(backlog), "{s}");
    assert!(lag["lag_bytes"].as_u64().unwrap_or(0) > backlog * 50, "{s}");
    assert!(
        lag["oldest_unforwarded_age_ms"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
    let lag_metric = common::metrics_text(&edge.url, None).await;
    assert!(
        lag_metric.contains(&format!(
            "tributary_sync_lag_events{{topic=\"{T}\"}} {backlog}"
        )),
        "{lag_metric}"
    );

    core = start_core(&core_dir, &[]);
    proxy.set_target(http_addr(&core).parse().expect("addr"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while edge_sync_stats(&edge.url).await["connected"] != true {
        assert!(Instant::now() < deadline, "the edge did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = produce_all(&edge.url, T, "live", 2_000_000, 20, 5).await;
    wait_drained(&edge.url, Duration::from_secs(180)).await;

    let f = check_topic("edge-a", &edge.url, &core.url, T).await;
    assert_eq!(f.records as u64, before + backlog + live);
    for (p, runs) in &f.runs {
        assert!(*runs <= 2, "partition {p}: two lanes at most, got {runs}");
    }
    let core_records = read_topic(&core.url, T).await;
    let mut overtook = 0;
    for p in 0..2u32 {
        let tagged = |tag: &[u8]| {
            core_records
                .iter()
                .filter(|r| r.partition == p && r.header("src") == Some(tag))
                .map(|r| r.offset)
                .collect::<Vec<_>>()
        };
        let (live_at, backlog_at) = (tagged(b"live"), tagged(b"backlog"));
        if let (Some(first_live), Some(last_backlog)) =
            (live_at.iter().min(), backlog_at.iter().max())
        {
            if first_live < last_backlog {
                overtook += 1;
            }
        }
    }
    assert_eq!(
        overtook, 2,
        "in both partitions live events reached the core before the backlog finished"
    );
}

/// 3. The core is SIGKILLed again and again while a backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_killed_during_the_drain_again_and_again_loses_and_doubles_nothing() {
    let dir = tmp();
    let core_dir = dir.path().join("core");
    let mut core = start_core(&core_dir, &[]);
    let proxy = core_proxy(&core).await;
    proxy.refuse(true);
    let edge = start_edge(
        &dir.path().join("edge"),
        &sync_url(&proxy.addr().to_string()),
        "edge-a",
        &[
            ("TRIBUTARY_UPSTREAM__COMPRESSION", "none"),
            ("TRIBUTARY_UPSTREAM__MAX_BYTES_PER_SEC", "1000000"),
        ],
    );
    let c = client();
    create_topic(&c, &edge.url, T, 3).await;
    let mut total = produce_all(&edge.url, T, "backlog", 0, 60, 500).await;
    proxy.refuse(false);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut killed_mid_drain = 0;
    for cycle in 0..6u64 {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        total += produce_all(&edge.url, T, "during", 1_000_000 + cycle * 100, 1, 100).await;
        let at_core = end_total(&core.url, T).await;
        core.kill9();
        if at_core > 0 && at_core < total {
            killed_mid_drain += 1;
        }
        core = start_core(&core_dir, &[]);
        proxy.set_target(http_addr(&core).parse().expect("addr"));
    }
    assert!(
        killed_mid_drain >= 3,
        "only {killed_mid_drain} kills landed mid-drain"
    );
    wait_drained(&edge.url, Duration::from_secs(180)).await;
    let f = check_topic("edge-a", &edge.url, &core.url, T).await;
    assert_eq!(f.records as u64, total);
}

/// 4. The edge is SIGKILLed again and again while it uploads and takes
///    writes: every write it acknowledged reaches the core once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_killed_during_upload_again_and_again_loses_and_doubles_nothing() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let edge_dir = dir.path().join("edge");
    let url = sync_url(&http_addr(&core));
    let mut acked: HashMap<(u32, u64), u64> = HashMap::new();
    let mut rng = fastrand::Rng::with_seed(5);
    let mut seq = 0u64;
    for cycle in 0..6 {
        let mut edge = start_edge(&edge_dir, &url, "edge-a", &[]);
        if cycle == 0 {
            create_topic(&client(), &edge.url, T, 2).await;
        }
        let base = edge.url.clone();
        let start = seq;
        let writer = tokio::spawn(async move {
            let c = client();
            let mut got = Vec::new();
            let mut s = start;
            loop {
                match produce(&c, &base, T, "crash", s, 50).await {
                    Ok(pos) => {
                        for (i, p) in pos.into_iter().enumerate() {
                            got.push((p, s + i as u64));
                        }
                        s += 50;
                    }
                    Err(_) => return (got, s),
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
        edge.kill9();
        let (got, next) = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("the writer notices the kill")
            .expect("writer");
        for (pos, s) in got {
            assert!(
                acked.insert(pos, s).is_none(),
                "position {pos:?} acknowledged twice"
            );
        }
        seq = next;
    }
    let edge = start_edge(&edge_dir, &url, "edge-a", &[]);
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    let edge_records = read_topic(&edge.url, T).await;
    for r in &edge_records {
        if let Some(s) = acked.remove(&(r.partition, r.offset)) {
            assert_eq!(
                r.header("n"),
                Some(s.to_string().as_bytes()),
                "acked record at {}/{}",
                r.partition,
                r.offset
            );
        }
    }
    assert!(
        acked.is_empty(),
        "{} acknowledged records are gone from the edge",
        acked.len()
    );
    let core_records = read_topic(&core.url, T).await;
    let f = assert_forwarded("edge-a", &edge_records, &core_records);
    assert_eq!(f.records, edge_records.len());
}

/// 5. The proxy cuts the link in the middle of a frame, then stalls it
///    silently (half-open, no FIN, no RST): both sides notice by heartbeat
///    and the edge reconnects once the path works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_frame_and_a_silent_stall_are_survived() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let proxy = core_proxy(&core).await;
    let edge = start_edge(
        &dir.path().join("edge"),
        &sync_url(&proxy.addr().to_string()),
        "edge-a",
        &[],
    );
    let c = client();
    create_topic(&c, &edge.url, T, 2).await;
    let base = edge.url.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let producer = tokio::spawn(async move {
        let mut n = 0;
        while !stopped.is_cancelled() {
            n += produce_all(&base, T, "steady", n, 1, 20).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    });
    wait_for(|| async { metric(&edge.url, "tributary_sync_acked_events_total", None).await > 200 })
        .await;
    let connects = metric(&edge.url, "tributary_sync_connects_total", None).await;
    proxy.cut_after(3000);
    wait_for(|| async {
        metric(&edge.url, "tributary_sync_connects_total", None).await > connects
    })
    .await;
    wait_for(|| async { edge_sync_stats(&edge.url).await["connected"] == true }).await;

    // Half-open: bytes stop, nothing closes.
    let disconnects = metric(&edge.url, "tributary_sync_disconnects_total", None).await;
    let stalled_at = Instant::now();
    proxy.stall();
    wait_for(|| async {
        metric(&edge.url, "tributary_sync_disconnects_total", None).await > disconnects
    })
    .await;
    let noticed = stalled_at.elapsed();
    // The core drops the silent edge too.
    wait_for(|| async { metric(&core.url, "tributary_sync_edges_connected", None).await == 0 })
        .await;
    assert!(
        noticed < Duration::from_secs(20),
        "the stall went unnoticed for {noticed:?}"
    );
    proxy.resume();
    wait_for(|| async { edge_sync_stats(&edge.url).await["connected"] == true }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let produced = producer.await.expect("producer");
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    let f = check_topic("edge-a", &edge.url, &core.url, T).await;
    assert_eq!(f.records as u64, produced);
}

/// An edge given several core URLs (`upstream.urls`) links to the next one
/// when its link fails: here two routes (proxies) to one core, the first
/// refusing from the start, then the second cut for good while events
/// flow. Everything arrives exactly once, whichever route carried it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_fails_over_between_the_core_urls_it_was_given() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let (first, second) = (core_proxy(&core).await, core_proxy(&core).await);
    first.refuse(true);
    let (url_a, url_b) = (
        sync_url(&first.addr().to_string()),
        sync_url(&second.addr().to_string()),
    );
    let edge = start_edge(
        &dir.path().join("edge"),
        &url_a,
        "edge-a",
        &[("TRIBUTARY_UPSTREAM__URLS", url_b.as_str())],
    );
    let c = client();
    create_topic(&c, &edge.url, T, 2).await;
    let before = produce_all(&edge.url, T, "before", 0, 10, 20).await;
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    let stats = edge_sync_stats(&edge.url).await;
    assert_eq!(stats["upstream"], url_b.as_str(), "{stats}");
    assert_eq!(stats["upstreams"], json!([url_a, url_b]), "{stats}");
    assert_eq!(first.bytes(), (0, 0), "the refusing route carried nothing");

    // The route in use fails for good while events flow: back to the first.
    first.refuse(false);
    let base = edge.url.clone();
    let producer = tokio::spawn(async move {
        let mut n = 0;
        for _ in 0..40 {
            n += produce_all(&base, T, "during", n, 1, 20).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    });
    wait_for(|| async { metric(&edge.url, "tributary_sync_acked_events_total", None).await > 400 })
        .await;
    second.refuse(true);
    second.cut();
    let during = producer.await.expect("producer");
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    let stats = edge_sync_stats(&edge.url).await;
    assert_eq!(stats["upstream"], url_a.as_str(), "{stats}");
    assert!(first.bytes().0 > 0, "the first route carries the link now");
    let f = check_topic("edge-a", &edge.url, &core.url, T).await;
    assert_eq!(f.records as u64, before + during);
}

/// Polls `f` until it holds (60 s at most).
async fn wait_for<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "condition not reached in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A core, a proxy refusing connections to it, and an edge behind the proxy
/// (so the edge is cut off until `proxy.refuse(false)`).
async fn offline_edge(env: &[(&str, &str)]) -> (tempfile::TempDir, ChildNode, Proxy, ChildNode) {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let proxy = core_proxy(&core).await;
    proxy.refuse(true);
    let url = sync_url(&proxy.addr().to_string());
    let edge = start_edge(&dir.path().join("edge"), &url, "edge-a", env);
    (dir, core, proxy, edge)
}

fn quota_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TRIBUTARY_STORAGE__MAX_EVENT_BYTES", "16384"),
        ("TRIBUTARY_STORAGE__MAX_DISK_BYTES", "262144"),
        ("TRIBUTARY_STORAGE__RETENTION_CHECK_MS", "200"),
    ]
}

/// 6a. `on_full = "reject"` at the edge quota while the core is away:
///     producers are refused (507), retention does not free unforwarded
///     events however old, and once the core has them retention makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_reject_edge_refuses_keeps_everything_and_recovers_after_forwarding() {
    let (_dir, core, proxy, edge) = offline_edge(&quota_env()).await;
    let c = client();
    // Records carry 2023 timestamps: expired by age the moment they land.
    let (s, b) = post(
        &c,
        &format!("{}/v1/topics", edge.url),
        &json!({"name": T, "partitions": 2, "retention_ms": 1000, "on_full": "reject"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let mut acked = 0u64;
    let refused = loop {
        match produce(&c, &edge.url, T, "full", acked, 20).await {
            Ok(p) => acked += p.len() as u64,
            Err(e) => break e,
        }
        assert!(acked < 100_000, "the quota never refused");
    };
    assert_eq!(refused.0, 507, "{:?}", refused.1);
    assert_eq!(refused.1["error"]["code"], "quota_exceeded");
    // Several retention passes: nothing unforwarded goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(end_total(&edge.url, T).await, acked);
    let edge_records = read_topic(&edge.url, T).await;
    assert_eq!(
        edge_records.len() as u64,
        acked,
        "retention removed unforwarded events"
    );
    proxy.refuse(false);
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    let core_records = read_topic(&core.url, T).await;
    assert_eq!(
        assert_forwarded("edge-a", &edge_records, &core_records).records as u64,
        acked
    );
    // Forwarded now: retention frees the room, and the edge takes writes again.
    wait_for(|| async {
        produce(&client(), &edge.url, T, "after", 1_000_000, 20)
            .await
            .is_ok()
    })
    .await;
}

/// 6b. `on_full = "drop_oldest"` at the edge quota: while the core is away
///     the oldest unforwarded events go, counted; the core learns the gap
///     (its skipped count equals the edge's); with the core there, eviction
///     takes forwarded events first and nothing unforwarded is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_drop_oldest_edge_counts_what_it_lost_and_evicts_forwarded_first() {
    let (_dir, core, proxy, edge) = offline_edge(&quota_env()).await;
    let c = client();
    let (s, b) = post(
        &c,
        &format!("{}/v1/topics", edge.url),
        &json!({"name": T, "partitions": 2, "on_full": "drop_oldest"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    // About 4× the quota.
    let produced = produce_all(&edge.url, T, "ring", 0, 250, 20).await;
    let dropped = metric(&edge.url, "tributary_quota_dropped_events_total", None).await;
    let lost = metric(
        &edge.url,
        "tributary_quota_dropped_unforwarded_events_total",
        None,
    )
    .await;
    assert!(dropped > 0);
    assert_eq!(
        lost, dropped,
        "nothing was forwarded, so every eviction lost data"
    );
    let kept = read_topic(&edge.url, T).await;
    assert_eq!(kept.len() as u64 + dropped, produced);
    proxy.refuse(false);
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    let core_records = read_topic(&core.url, T).await;
    let f = assert_forwarded("edge-a", &read_topic(&edge.url, T).await, &core_records);
    assert_eq!(f.records as u64, produced - dropped);
    assert_eq!(
        metric(&edge.url, "tributary_sync_skipped_events_total", None).await,
        lost
    );
    assert_eq!(
        metric(&core.url, "tributary_sync_skipped_events_total", None).await,
        lost
    );
    // Connected: what is evicted now was forwarded first.
    for round in 0..60u64 {
        produce_all(&edge.url, T, "online", 1_000_000 + round * 20, 1, 20).await;
        wait_drained(&edge.url, Duration::from_secs(60)).await;
    }
    assert!(
        metric(&edge.url, "tributary_quota_dropped_events_total", None).await > dropped,
        "the quota was reached again"
    );
    assert_eq!(
        metric(
            &edge.url,
            "tributary_quota_dropped_unforwarded_events_total",
            None
        )
        .await,
        lost
    );
    let core_records = read_topic(&core.url, T).await;
    let online = core_records
        .iter()
        .filter(|r| r.header("src") == Some(b"online"))
        .count();
    assert_eq!(online, 1200, "every online record reached the core");
}

/// 7. Two edges with the same topic into one core: each edge's records once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_with_the_same_topics_share_one_core() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let url = sync_url(&http_addr(&core));
    let a = start_edge(&dir.path().join("a"), &url, "edge-a", &[]);
    let b = start_edge(&dir.path().join("b"), &url, "edge-b", &[]);
    let c = client();
    create_topic(&c, &a.url, T, 2).await;
    create_topic(&c, &b.url, T, 2).await;
    let (pa, pb) = tokio::join!(
        produce_all(&a.url, T, "a", 0, 40, 25),
        produce_all(&b.url, T, "b", 0, 40, 25)
    );
    wait_drained(&a.url, Duration::from_secs(120)).await;
    wait_drained(&b.url, Duration::from_secs(120)).await;
    let core_records = read_topic(&core.url, T).await;
    assert_eq!(core_records.len() as u64, pa + pb);
    for (id, edge) in [("edge-a", &a), ("edge-b", &b)] {
        let f = assert_forwarded(id, &read_topic(&edge.url, T).await, &core_records);
        assert_eq!(f.records, 1000);
    }
    let (_, stats) = get(&c, &format!("{}/v1/stats", core.url)).await;
    assert_eq!(stats["sync"]["edges_connected"], 2, "{stats}");
}

/// A null value (a tombstone) reaches the core as one, not as an empty
/// value (wire version 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_value_reaches_the_core_null() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let url = sync_url(&http_addr(&core));
    let edge = start_edge(&dir.path().join("edge"), &url, "edge-1", &[]);
    let c = client();
    create_topic(&c, &edge.url, T, 1).await;
    let records = json!({"records": [
        {"key": "pump-1", "value": null},
        {"key": "pump-2", "value": ""},
        {"key": "pump-3", "value": {"on": true}},
    ]});
    let (s, b) = post(&c, &format!("{}/v1/topics/{T}/records", edge.url), &records).await;
    assert_eq!(s, 200, "{b}");
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    let (s, page) = get(
        &c,
        &format!("{}/v1/topics/{T}/partitions/0/records?offset=0", core.url),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    let values: Vec<Value> = page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["value"].clone())
        .collect();
    assert_eq!(
        values,
        [Value::Null, json!(""), json!({"on": true})],
        "{page}"
    );
}

/// Partitions added at the edge are forwarded (the edge opens the topic
/// again), and partitions added at the core do not move a stream: each edge
/// partition's records stay in the one core partition it was given, which
/// is where the core's crash recovery looks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_at_the_edge_and_the_core_are_forwarded_exactly_once() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let url = sync_url(&http_addr(&core));
    let edge = start_edge(&dir.path().join("edge"), &url, "edge-1", &[]);
    let c = client();
    create_topic(&c, &core.url, T, 2).await;
    create_topic(&c, &edge.url, T, 4).await;
    let before = produce_all(&edge.url, T, "before", 0, 8, 25).await;
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    for (base, partitions) in [(&core.url, 3), (&edge.url, 6)] {
        let r = c
            .patch(format!("{base}/v1/topics/{T}"))
            .json(&json!({"partitions": partitions}))
            .send()
            .await
            .expect("patch");
        assert_eq!(r.status(), 200);
    }
    // Pinned to every partition, old and new.
    for p in 0..6u32 {
        let records: Vec<Value> = (0..20)
            .map(|i| json!({"value": format!("after-{p}-{i}"), "partition": p}))
            .collect();
        let (s, b) = post(
            &c,
            &format!("{}/v1/topics/{T}/records", edge.url),
            &json!({"records": records}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    wait_drained(&edge.url, Duration::from_secs(120)).await;
    let f = check_topic("edge-1", &edge.url, &core.url, T).await;
    assert_eq!(f.records as u64, before + 120);
    let mut homes: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for (&(p, _), &(cp, _)) in &f.at_core {
        homes.entry(p).or_default().insert(cp);
    }
    assert_eq!(homes.len(), 6, "{homes:?}");
    for (p, cps) in &homes {
        let want = if *p < 4 { p % 2 } else { p % 3 };
        assert_eq!(
            cps,
            &BTreeSet::from([want]),
            "edge partition {p}: {homes:?}"
        );
    }
}

/// The link over `wss://` to a core in devices mode: an edge with a device
/// token and the core's CA, an edge with only a client certificate (mTLS),
/// and an edge that does not trust the core's certificate (nothing sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_tokens_and_client_certificates() {
    let dir = tmp();
    let tls = dir.path().join("tls");
    tributary_gateway::tls_cli::self_signed(&tls, &[], 30).expect("self-signed");
    tributary_gateway::tls_cli::client_cert(&tls, "edge-m", &tls, 30).expect("client cert");
    let pem = |n: &str| tls.join(n).display().to_string();
    let admin = "sync-admin-token-0123";
    let (cert, key, ca) = (pem("server.pem"), pem("server-key.pem"), pem("ca.pem"));
    let core = start_core(
        &dir.path().join("core"),
        &[
            ("TRIBUTARY_AUTH__MODE", "devices"),
            ("TRIBUTARY_AUTH__ADMIN_TOKEN", admin),
            ("TRIBUTARY_TLS__CERT", &cert),
            ("TRIBUTARY_TLS__KEY", &key),
            ("TRIBUTARY_TLS__CLIENT_CA", &ca),
            ("TRIBUTARY_HTTP__TLS_LISTEN", "127.0.0.1:0"),
            ("TRIBUTARY_MQTT__TLS_LISTEN", "127.0.0.1:0"),
            ("TRIBUTARY_AMQP__TLS_LISTEN", "127.0.0.1:0"),
        ],
    );
    let c = client();
    let mut tokens = HashMap::new();
    for id in ["edge-t", "edge-m", "edge-x"] {
        let r = c
            .post(format!("{}/v1/devices", core.url))
            .bearer_auth(admin)
            .json(&json!({"id": id, "publish": ["sensors/#"]}))
            .send()
            .await
            .expect("add device");
        assert_eq!(r.status().as_u16(), 201);
        let body: serde_json::Value = r.json().await.expect("json");
        tokens.insert(id, body["token"].as_str().expect("token").to_owned());
    }
    let https = core.https.expect("https listener");
    let url = format!("wss://localhost:{}/v1/sync", https.port());
    let token = tokens["edge-t"].clone();
    let (edge_cert, edge_key) = (pem("edge-m.pem"), pem("edge-m-key.pem"));
    let with_token = start_edge(
        &dir.path().join("t"),
        &url,
        "edge-t",
        &[
            ("TRIBUTARY_UPSTREAM__TOKEN", &token),
            ("TRIBUTARY_UPSTREAM__CA", &ca),
        ],
    );
    let with_cert = start_edge(
        &dir.path().join("m"),
        &url,
        "edge-m",
        &[
            ("TRIBUTARY_UPSTREAM__CA", &ca),
            ("TRIBUTARY_UPSTREAM__CERT", &edge_cert),
            ("TRIBUTARY_UPSTREAM__KEY", &edge_key),
        ],
    );
    let token_x = tokens["edge-x"].clone();
    let untrusting = start_edge(
        &dir.path().join("x"),
        &url,
        "edge-x",
        &[("TRIBUTARY_UPSTREAM__TOKEN", &token_x)],
    );
    for e in [&with_token, &with_cert, &untrusting] {
        create_topic(&c, &e.url, T, 1).await;
        produce_all(&e.url, T, "tls", 0, 5, 20).await;
    }
    wait_drained(&with_token.url, Duration::from_secs(60)).await;
    wait_drained(&with_cert.url, Duration::from_secs(60)).await;
    let at_core = read_topic_as(&core.url, T, Some(admin)).await;
    for (id, e) in [("edge-t", &with_token), ("edge-m", &with_cert)] {
        let f = assert_forwarded(id, &read_topic(&e.url, T).await, &at_core);
        assert_eq!(f.records, 100, "{id}");
    }
    let s = edge_sync_stats(&untrusting.url).await;
    assert_eq!(s["connected"], false, "{s}");
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("TLS"),
        "the untrusting edge reports the TLS failure: {s}"
    );
    assert!(at_core
        .iter()
        .all(|r| r.header("tributary.edge") != Some(b"edge-x")));
}

/// A record the core cannot store (larger than its topic's max_event_bytes)
/// waits at the edge, shown in its stats; the rest of its partition and the
/// edge's other topics are forwarded around it, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_core_waits_alone() {
    let dir = tmp();
    let core = start_core(&dir.path().join("core"), &[]);
    let c = client();
    let (s, b) = post(
        &c,
        &format!("{}/v1/topics", core.url),
        &json!({"name": "big", "partitions": 1, "max_event_bytes": 2048}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let edge = start_edge(
        &dir.path().join("edge"),
        &sync_url(&http_addr(&core)),
        "edge-a",
        &[],
    );
    create_topic(&c, &edge.url, "big", 1).await;
    create_topic(&c, &edge.url, "other", 1).await;
    let records: Vec<serde_json::Value> = (0..7)
        .map(|i| json!({"value": if i == 3 { "x".repeat(3000) } else { format!("small-{i}") }}))
        .collect();
    let (s, b) = post(
        &c,
        &format!("{}/v1/topics/big/records", edge.url),
        &json!({"records": records}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    produce_all(&edge.url, "other", "other", 0, 1, 10).await;
    wait_for(|| async {
        end_total(&core.url, "big").await == 6 && end_total(&core.url, "other").await == 10
    })
    .await;
    let s = edge_sync_stats(&edge.url).await;
    let blocked = s["blocked"].as_array().expect("blocked list");
    assert_eq!(blocked.len(), 1, "{s}");
    assert_eq!(
        (blocked[0]["topic"].as_str(), blocked[0]["offset"].as_u64()),
        (Some("big"), Some(3)),
        "{s}"
    );
    assert!(
        s["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .any(|t| t["topic"] == "big" && t["lag_events"] == 1),
        "{s}"
    );
    let f = check_topic("edge-a", &edge.url, &core.url, "other").await;
    assert_eq!(f.records, 10);
    let mut edge_big = read_topic(&edge.url, "big").await;
    edge_big.retain(|r| r.offset != 3);
    let f = assert_forwarded("edge-a", &edge_big, &read_topic(&core.url, "big").await);
    assert_eq!(f.records, 6);
}

/// A compacted topic whose backlog was compacted during an outage forwards
/// only what compaction kept, reports the gaps as compacted (not lost), and
/// the core creates its copy compacted alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_backlog_forwards_only_what_survived_to_a_core_copy_compacted_alike() {
    let dir = tmp();
    let quick = [("TRIBUTARY_STORAGE__RETENTION_CHECK_MS", "100")];
    let core = start_core(&dir.path().join("core"), &quick);
    let proxy = core_proxy(&core).await;
    proxy.refuse(true);
    let url = sync_url(&proxy.addr().to_string());
    let edge = start_edge(&dir.path().join("edge"), &url, "edge-c", &quick);
    let c = client();
    let topic = json!({"name": "state", "partitions": 1, "cleanup_policy": "compact",
        "min_cleanable_dirty_ratio": 0.1, "delete_retention_ms": 3_600_000});
    let (s, b) = post(&c, &format!("{}/v1/topics", edge.url), &topic).await;
    assert_eq!(s, 201, "{b}");
    // 40 rounds of 10 keys, each round its own request (and batch).
    let mut latest: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for round in 0..40 {
        let records: Vec<Value> = (0..10)
            .map(|k| json!({"key": format!("dev-{k}"), "value": format!("r{round}")}))
            .collect();
        let (s, b) = post(
            &c,
            &format!("{}/v1/topics/state/records", edge.url),
            &json!({ "records": records }),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        for (k, o) in b["offsets"].as_array().expect("offsets").iter().enumerate() {
            let offset = o["offset"].as_u64().expect("offset");
            latest.insert(format!("dev-{k}"), (offset, format!("r{round}")));
        }
    }
    // The edge compacts its backlog while it cannot forward it.
    wait_for(|| async { read_topic(&edge.url, "state").await.len() <= 20 }).await;
    let survivors = read_topic(&edge.url, "state").await;
    proxy.refuse(false);
    wait_drained(&edge.url, Duration::from_secs(60)).await;
    let at_core: Vec<Rec> = read_topic(&core.url, "state").await;
    assert!(
        at_core.len() <= survivors.len() && !at_core.is_empty(),
        "{} at the core, {} kept at the edge of 400",
        at_core.len(),
        survivors.len()
    );
    let by_edge_offset: HashMap<u64, &Rec> = survivors.iter().map(|r| (r.offset, r)).collect();
    let mut newest: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = BTreeMap::new();
    for r in &at_core {
        let (edge_id, _, offset) = r.origin().expect("origin headers");
        assert_eq!(edge_id, "edge-c");
        let kept = by_edge_offset
            .get(&offset)
            .expect("an edge record compaction kept");
        assert_eq!((&r.key, &r.value), (&kept.key, &kept.value));
        let k = r.key.clone().expect("key");
        if newest.get(&k).is_none_or(|(o, _)| *o < offset) {
            newest.insert(k, (offset, r.value.clone()));
        }
    }
    for (k, (offset, value)) in &latest {
        let got = newest.get(k.as_bytes()).expect("every key at the core");
        assert_eq!(got.0, *offset, "{k}: its latest record");
        assert_eq!(
            serde_json::from_slice::<Value>(&got.1).expect("json"),
            json!(value)
        );
    }
    let (s, t) = get(&c, &format!("{}/v1/topics/state", core.url)).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["cleanup_policy"], "compact", "{t}");
    assert_eq!(t["min_cleanable_dirty_ratio"], 0.1, "{t}");
    let edge_stats = edge_sync_stats(&edge.url).await;
    assert!(
        edge_stats["compacted_offsets"].as_u64().expect("count") > 0,
        "{edge_stats}"
    );
    assert_eq!(
        edge_stats["skipped_events"], 0,
        "nothing was lost: {edge_stats}"
    );
    let (_, core_stats) = get(&c, &format!("{}/v1/stats", core.url)).await;
    assert!(
        core_stats["sync"]["compacted_offsets"]
            .as_u64()
            .expect("count")
            > 0,
        "{core_stats}"
    );
    assert_eq!(core_stats["sync"]["skipped_events"], 0, "{core_stats}");
}
