//! The WebSocket endpoints driven by tokio-tungstenite: pipelined publish with
//! acks in order, live tails from earliest/latest/offset, resume without gap
//! or duplicate, a slow reader that costs no memory, and bad input.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{client, create_topic, get, post, ChildNode, InProcessNode};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(20);

fn ws_url(base: &str, path: &str) -> String {
    format!("{}{path}", base.replacen("http://", "ws://", 1))
}

async fn open(base: &str, path: &str) -> Ws {
    let (ws, _) = connect_async(ws_url(base, path))
        .await
        .expect("websocket upgrade");
    ws
}

/// The next text message as JSON (pings and pongs skipped).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("no protocol error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Waits for the close frame and returns its code.
async fn close_code(ws: &mut Ws) -> CloseCode {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code,
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("error instead of a close frame: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_are_acknowledged_in_order_once_durable() {
    let node = InProcessNode::start("").await;
    create_topic(&client(), &node.url, "wsp", 3).await;
    let mut ws = open(&node.url, "/v1/topics/wsp/publish").await;
    for i in 0..500 {
        let m = if i % 5 == 4 {
            Message::Binary(format!("raw-{i}").into_bytes().into())
        } else {
            Message::Text(
                json!({"key": format!("k{}", i % 7), "value": {"i": i}, "headers": {"src": "ws"}})
                    .to_string()
                    .into(),
            )
        };
        ws.send(m).await.expect("send");
    }
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    let mut acked = Vec::new();
    for _ in 0..500 {
        let a = next_json(&mut ws).await;
        let (p, o) = (
            a["partition"].as_u64().expect("partition"),
            a["offset"].as_u64().expect("offset"),
        );
        if let Some(prev) = last.insert(p, o) {
            assert!(
                o > prev,
                "acks out of order in partition {p}: {prev} then {o}"
            );
        }
        acked.push((p, o));
    }
    // Every ack is a record that is really there.
    let c = client();
    let mut total = 0;
    for p in 0..3 {
        let (s, r) = get(
            &c,
            &format!(
                "{}/v1/topics/wsp/partitions/{p}/records?offset=0&limit=1000",
                node.url
            ),
        )
        .await;
        assert_eq!(s, 200);
        total += r["records"].as_array().expect("records").len();
    }
    assert_eq!(total, 500);
    assert_eq!(acked.len(), 500);
    let m = c
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(m.contains("tributary_ws_published_total 500"), "{m}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_repeated_ones_close_with_1003() {
    let node = InProcessNode::start("[http]\nws_max_message_bytes = 4096\n").await;
    let mut ws = open(&node.url, "/v1/topics/bad/publish").await;
    ws.send(Message::Text("this is not json".into()))
        .await
        .expect("send");
    ws.send(Message::Text(
        json!({"value": 1, "nonsense": true}).to_string().into(),
    ))
    .await
    .expect("send");
    ws.send(Message::Text(json!({"value": "ok"}).to_string().into()))
        .await
        .expect("send");
    let a = next_json(&mut ws).await;
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    let b = next_json(&mut ws).await;
    assert_eq!(b["error"]["code"], "bad_request", "{b}");
    let c = next_json(&mut ws).await;
    assert_eq!(
        c["offset"], 0,
        "a good message after bad ones is stored: {c}"
    );
    for _ in 0..20 {
        if ws.send(Message::Text("garbage".into())).await.is_err() {
            break;
        }
    }
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Unsupported);
                break;
            }
            Some(Ok(Message::Text(_))) => {}
            other => panic!("expected close 1003, got {other:?}"),
        }
    }

    // Over ws_max_message_bytes: 1009.
    let mut ws = open(&node.url, "/v1/topics/bad/publish").await;
    ws.send(Message::Binary(vec![7u8; 10_000].into()))
        .await
        .expect("send");
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);

    // Still serving.
    let mut ws = open(&node.url, "/v1/topics/bad/publish").await;
    ws.send(Message::Text(json!({"value": "after"}).to_string().into()))
        .await
        .expect("send");
    assert_eq!(next_json(&mut ws).await["offset"], 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_are_refused_before_the_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = InProcessNode::start_in(dir.path(), tributary_gateway::config::Mode::Core, "").await;
    for path in ["/v1/topics/nope/publish", "/v1/topics/nope/live"] {
        match connect_async(ws_url(&node.url, path)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 404, "{path}")
            }
            other => panic!("{path}: expected 404, got {:?}", other.map(|_| ())),
        }
    }
    create_topic(&client(), &node.url, "t", 1).await;
    match connect_async(ws_url(&node.url, "/v1/topics/t/live?from=soon")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
    node.stop().await;
}

async fn produce(base: &str, topic: &str, from: usize, n: usize) {
    let records: Vec<Value> = (from..from + n)
        .map(|i| json!({"value": {"i": i}}))
        .collect();
    let (s, b) = post(
        &client(),
        &format!("{base}/v1/topics/{topic}/records"),
        &json!({"records": records}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

fn seq(v: &Value) -> u64 {
    v["value"]["i"].as_u64().expect("i")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tails_start_where_asked_and_resume_without_gap_or_duplicate() {
    let node = InProcessNode::start("").await;
    create_topic(&client(), &node.url, "live", 1).await;
    produce(&node.url, "live", 0, 10).await;

    let mut earliest = open(&node.url, "/v1/topics/live/live?from=earliest").await;
    let mut latest = open(&node.url, "/v1/topics/live/live").await;
    let mut from5 = open(&node.url, "/v1/topics/live/live?from=5").await;
    for i in 0..10 {
        assert_eq!(seq(&next_json(&mut earliest).await), i);
    }
    for i in 5..10 {
        let r = next_json(&mut from5).await;
        assert_eq!((seq(&r), r["offset"].as_u64()), (i, Some(i)));
    }
    produce(&node.url, "live", 10, 3).await;
    for ws in [&mut earliest, &mut latest, &mut from5] {
        for i in 10..13 {
            assert_eq!(
                seq(&next_json(ws).await),
                i,
                "latest starts after what was there"
            );
        }
    }
    // Resume: read some, drop, reconnect from the last offset + 1.
    drop(earliest);
    produce(&node.url, "live", 13, 37).await;
    let mut got = Vec::new();
    let mut ws = open(&node.url, "/v1/topics/live/live?offsets=0:0").await;
    for _ in 0..20 {
        got.push(next_json(&mut ws).await);
    }
    drop(ws);
    let next = got.last().expect("some")["offset"]
        .as_u64()
        .expect("offset")
        + 1;
    let mut ws = open(&node.url, &format!("/v1/topics/live/live?offsets=0:{next}")).await;
    for _ in 20..50 {
        got.push(next_json(&mut ws).await);
    }
    let seqs: Vec<u64> = got.iter().map(seq).collect();
    assert_eq!(seqs, (0..50).collect::<Vec<u64>>(), "no gap, no duplicate");
    node.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Floods `topic` with 64 MiB of 1 KB records over HTTP; returns the node's RSS after, in MiB.
async fn flood(node: &ChildNode, topic: &str) -> u64 {
    let value = "x".repeat(1000);
    for batch in 0..64 {
        let records: Vec<Value> = (0..1024)
            .map(|i| json!({"value": format!("{:06}-{value}", batch * 1024 + i), "encoding": "string"}))
            .collect();
        let (s, _) = post(
            &client(),
            &format!("{}/v1/topics/{topic}/records", node.url),
            &json!({"records": records}),
        )
        .await;
        assert_eq!(s, 200);
    }
    rss_kib(node.pid()) / 1024
}

#[test]
fn a_reader_that_does_not_read_costs_no_memory_and_still_gets_everything() {
    let rt = common::runtime();
    let env = [("TRIBUTARY_STORAGE__CACHE_CAPACITY_BYTES", "8388608")];
    // The same flood twice: once with nobody tailing (sled's own memory under
    // this load is the baseline), once with a live client that reads nothing.
    let control_dir = tempfile::tempdir().expect("tempdir");
    let control = ChildNode::start(control_dir.path(), &env);
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &env);
    rt.block_on(async {
        create_topic(&client(), &control.url, "flood", 1).await;
        let baseline = flood(&control, "flood").await;
        create_topic(&client(), &node.url, "flood", 1).await;
        let mut slow = open(&node.url, "/v1/topics/flood/live?from=earliest").await;
        let with_slow_reader = flood(&node, "flood").await;
        assert!(
            with_slow_reader < baseline + 32,
            "64 MiB unread by one live client: {with_slow_reader} MiB vs {baseline} MiB without it"
        );
        eprintln!("RSS after the flood: {baseline} MiB without a tail, {with_slow_reader} MiB with a slow one");
        // The slow reader then gets every record, in order.
        let mut n = 0u64;
        while n < 64 * 1024 {
            let r = next_json(&mut slow).await;
            assert_eq!(r["offset"].as_u64(), Some(n));
            n += 1;
        }
    });
}

async fn ws_gauge(base: &str) -> u64 {
    common::metric(base, "tributary_ws_connections", None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tail_holds_back_no_other_and_dropped_clients_free_their_sessions() {
    let node = InProcessNode::start("").await;
    create_topic(&client(), &node.url, "stall", 1).await;
    // A tail that reads nothing while 24 MiB arrive: its socket fills and it blocks.
    let stalled = open(&node.url, "/v1/topics/stall/live?from=earliest").await;
    let value = "y".repeat(1000);
    for _ in 0..24 {
        let records: Vec<Value> = (0..1024)
            .map(|_| json!({"value": value, "encoding": "string"}))
            .collect();
        let (s, _) = post(
            &client(),
            &format!("{}/v1/topics/stall/records", node.url),
            &json!({"records": records}),
        )
        .await;
        assert_eq!(s, 200);
    }
    // Another tail of the same partition is served at once.
    let mut live = open(&node.url, "/v1/topics/stall/live").await;
    let (s, _) = post(
        &client(),
        &format!("{}/v1/topics/stall/records", node.url),
        &json!({"records": [{"value": {"fresh": 1}}]}),
    )
    .await;
    assert_eq!(s, 200);
    let r = next_json(&mut live).await;
    assert_eq!(r["value"]["fresh"], 1, "{r}");

    // A publisher that vanishes mid-pipeline, and the stalled tail, end their sessions.
    let mut p = open(&node.url, "/v1/topics/stall/publish").await;
    for i in 0..3000 {
        if p.send(Message::Text(json!({"value": i}).to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(p);
    drop(stalled);
    drop(live);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let open_now = ws_gauge(&node.url).await;
        if open_now == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open_now} WebSocket sessions still open after their clients left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

/// A live tail over a compacted partition: the offsets it sends are those
/// the log kept (gaps stepped over, nothing twice), also from the shared
/// ring a second tail reads, and new records follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_over_a_compacted_topic_sends_what_was_kept_once() {
    let node = InProcessNode::start("[storage]\nretention_check_ms = 100\n").await;
    let c = client();
    let topic = json!({"name": "state", "partitions": 1, "cleanup_policy": "compact",
        "min_cleanable_dirty_ratio": 0.0});
    let (s, b) = post(&c, &format!("{}/v1/topics", node.url), &topic).await;
    assert_eq!(s, 201, "{b}");
    for round in 0..20 {
        let records: Vec<Value> = (0..5)
            .map(|k| json!({"key": format!("k{k}"), "value": {"i": round * 5 + k}}))
            .collect();
        let url = format!("{}/v1/topics/state/records", node.url);
        let (s, b) = post(&c, &url, &json!({ "records": records })).await;
        assert_eq!(s, 200, "{b}");
    }
    let deadline = std::time::Instant::now() + WAIT;
    let kept: Vec<u64> = loop {
        let (_, t) = get(&c, &format!("{}/v1/topics/state", node.url)).await;
        let url = format!(
            "{}/v1/topics/state/partitions/0/records?offset=0&limit=1000",
            node.url
        );
        let (_, page) = get(&c, &url).await;
        let offsets: Vec<u64> = page["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| r["offset"].as_u64().expect("offset"))
            .collect();
        if t["compaction"]["passes"].as_u64() >= Some(1) && offsets.len() < 100 {
            break offsets;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction pass: {t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(kept.len() <= 10, "5 keys, the last batch aside: {kept:?}");
    // The second tail is served from the ring the first one filled.
    let mut tails = Vec::new();
    for _ in 0..2 {
        let mut ws = open(&node.url, "/v1/topics/state/live?from=earliest").await;
        let mut got = Vec::new();
        for _ in 0..kept.len() {
            got.push(next_json(&mut ws).await["offset"].as_u64().expect("offset"));
        }
        assert_eq!(got, kept, "the kept records, each once, in order");
        tails.push(ws);
    }
    let url = format!("{}/v1/topics/state/records", node.url);
    let (s, b) = post(
        &c,
        &url,
        &json!({"records": [{"key": "k9", "value": {"i": 999}}]}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let new = b["offsets"][0]["offset"].as_u64().expect("offset");
    for ws in &mut tails {
        let r = next_json(ws).await;
        assert_eq!(
            r["offset"].as_u64(),
            Some(new),
            "the next is the new record: {r}"
        );
    }
    node.stop().await;
}
