//! The HTTP API against an in-process node on port 0, with reqwest (and raw
//! TCP where a client library would refuse to send the bad input): every
//! endpoint, every documented error, garbage bodies, wrong content types, huge
//! declared lengths, unknown partitions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{client, create_topic, get, post, InProcessNode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_frontend::listener::LimitedListener;
use tributary_frontend::FrontendContext;
use tributary_http::{HttpConfig, OPENAPI, ROUTES};
use tributary_storage::{Log, LogConfig, MemStore};

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an API error: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_create_list_describe_and_their_errors() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    let (s, t) = post(
        &c,
        &format!("{u}/v1/topics"),
        &json!({"name": "temps", "partitions": 4, "retention_ms": 60000}),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["partition_count"], 4);
    assert_eq!(t["retention_ms"], 60000);
    assert_eq!(t["partitions"].as_array().map(Vec::len), Some(4));
    let (s, b) = post(&c, &format!("{u}/v1/topics"), &json!({"name": "temps"})).await;
    assert_eq!((s, error_code(&b)), (409, "topic_exists"));
    for bad in [
        json!({"name": "a/b"}),
        json!({"name": ""}),
        json!({"name": "x", "partitions": 0}),
        json!({"name": "y", "retention_ms": 0}),
    ] {
        let (s, b) = post(&c, &format!("{u}/v1/topics"), &bad).await;
        assert_eq!((s, error_code(&b)), (400, "invalid_topic"), "{bad}");
    }
    let (s, b) = post(
        &c,
        &format!("{u}/v1/topics"),
        &json!({"name": "z", "colour": "red"}),
    )
    .await;
    assert_eq!((s, error_code(&b)), (400, "malformed_body"));
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("colour")),
        "{b}"
    );
    let (s, list) = get(&c, &format!("{u}/v1/topics")).await;
    assert_eq!(s, 200);
    assert_eq!(list["topics"][0]["name"], "temps");
    let (s, b) = get(&c, &format!("{u}/v1/topics/nope")).await;
    assert_eq!((s, error_code(&b)), (404, "unknown_topic"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_changed_and_deleted_and_their_errors() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "temps", 2).await;
    let patch = |body: Value| {
        let c = c.clone();
        let url = format!("{u}/v1/topics/temps");
        async move {
            let r = c.patch(url).json(&body).send().await.expect("patch");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, t) =
        patch(json!({"partitions": 3, "retention_bytes": 4096, "on_full": "drop_oldest"})).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["partition_count"], 3);
    assert_eq!(t["partitions"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        (t["retention_bytes"].clone(), t["on_full"].clone()),
        (json!(4096), json!("drop_oldest"))
    );
    let (s, t) = patch(json!({"retention_bytes": null})).await;
    assert_eq!(
        (
            s,
            t["retention_bytes"].clone(),
            t["partition_count"].clone()
        ),
        (200, Value::Null, json!(3))
    );
    for (bad, code) in [
        (json!({"partitions": 2}), "invalid_topic"),
        (json!({"max_event_bytes": 0}), "invalid_topic"),
        (json!({"name": "other"}), "malformed_body"),
        (json!({"partitions": "many"}), "malformed_body"),
    ] {
        let (s, b) = patch(bad.clone()).await;
        assert_eq!((s, error_code(&b)), (400, code), "{bad}");
    }
    let r = c
        .patch(format!("{u}/v1/topics/nope"))
        .json(&json!({"partitions": 5}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 404);
    post(
        &c,
        &format!("{u}/v1/topics/temps/records"),
        &json!({"records": [{"value": "x"}]}),
    )
    .await;
    let r = c
        .delete(format!("{u}/v1/topics/temps"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (s, b) = get(&c, &format!("{u}/v1/topics/temps")).await;
    assert_eq!((s, error_code(&b)), (404, "unknown_topic"));
    let r = c
        .delete(format!("{u}/v1/topics/temps"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 404);
    // The name is free again at once, for a new empty topic (its offsets
    // go on where the deleted one's ended).
    create_topic(&c, &u, "temps", 3).await;
    let (_, t) = get(&c, &format!("{u}/v1/topics/temps")).await;
    let parts = t["partitions"].as_array().expect("partitions");
    assert!(
        parts.iter().all(|p| p["start_offset"] == p["end_offset"]),
        "{t}"
    );
    let ends: u64 = parts.iter().filter_map(|p| p["end_offset"].as_u64()).sum();
    assert_eq!(ends, 1, "{t}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_json_in_every_encoding_and_fetch_it_back() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "t", 1).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = json!({"records": [
        {"key": "k1", "value": {"temp": 21.5, "ok": true}, "timestamp": 1700000000000i64},
        {"value": "plain", "encoding": "string", "headers": {"h1": "v1"}},
        {"value": b64.encode([0u8, 255, 1]), "key": b64.encode([9u8]), "encoding": "base64",
         "headers": [{"key": "dup", "value": b64.encode("a")}, {"key": "dup", "value": b64.encode("b")}]},
        {"value": 42},
    ]});
    let (s, b) = post(&c, &format!("{u}/v1/topics/t/records"), &body).await;
    assert_eq!(s, 200, "{b}");
    let offsets: Vec<u64> = b["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o["offset"].as_u64().expect("n"))
        .collect();
    assert_eq!(offsets, vec![0, 1, 2, 3]);

    let (s, page) = get(
        &c,
        &format!("{u}/v1/topics/t/partitions/0/records?offset=0"),
    )
    .await;
    assert_eq!(s, 200, "{page}");
    let r = page["records"].as_array().expect("records");
    assert_eq!(r.len(), 4);
    assert_eq!(r[0]["value"], json!({"temp": 21.5, "ok": true}));
    assert_eq!(r[0]["key"], "k1");
    assert_eq!(r[0]["timestamp"], 1700000000000i64);
    assert_eq!(r[1]["value"], "plain");
    assert_eq!(r[1]["headers"], json!([{"key": "h1", "value": "v1"}]));
    assert_eq!(r[2]["encoding"], "base64");
    assert_eq!(r[2]["value"], b64.encode([0u8, 255, 1]));
    assert_eq!(r[2]["key"], b64.encode([9u8]));
    assert_eq!(
        r[2]["headers"],
        json!([{"key": "dup", "value": "a"}, {"key": "dup", "value": "b"}])
    );
    assert_eq!(r[3]["value"], 42);
    assert!(
        r[1]["timestamp"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000),
        "stamped at ingest"
    );
    assert_eq!(page["next_offset"], 4);

    // Paging and the binary format.
    let (_, page) = get(
        &c,
        &format!("{u}/v1/topics/t/partitions/0/records?offset=1&limit=2&format=binary"),
    )
    .await;
    let r = page["records"].as_array().expect("records");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["value"], b64.encode("plain"));
    assert_eq!(r[0]["encoding"], "base64");
    assert_eq!(page["next_offset"], 3);
    let (_, page) = get(
        &c,
        &format!("{u}/v1/topics/t/partitions/0/records?offset=latest"),
    )
    .await;
    assert_eq!(page["records"], json!([]));
    assert_eq!(page["next_offset"], 4);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octet_stream_keys_and_partitions() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "raw", 3).await;
    let payload: Vec<u8> = (0..=255u8).collect();
    let r = c
        .post(format!("{u}/v1/topics/raw/records?key=dev-1&timestamp=5"))
        .header("content-type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.expect("json");
    let p = b["offsets"][0]["partition"].as_u64().expect("partition") as u32;
    assert_eq!(
        p,
        tributary_storage::partitioner::partition_for_key(b"dev-1", 3),
        "Kafka's partition for the key"
    );
    let all = common::read_all(&c, &u, "raw", p).await;
    assert_eq!(all, vec![(0, Some(b"dev-1".to_vec()), payload)]);
    let r = c
        .post(format!("{u}/v1/topics/raw/records?partition=2"))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .expect("send");
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["offsets"][0]["partition"], 2);
    let r = c
        .post(format!("{u}/v1/topics/raw/records?partition=7"))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{u}/v1/topics/raw/records?bogus=1"))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let node =
        InProcessNode::start("[http]\nmax_body_bytes = 2000000\n[storage]\nmax_event_bytes = 1000")
            .await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "t", 1).await;
    let records = format!("{u}/v1/topics/t/records");
    let send = |ct: Option<&'static str>, body: Vec<u8>| {
        let mut r = c.post(&records).body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        async move {
            let r = r.send().await.expect("send");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.expect("error body is JSON"))
        }
    };
    let (s, b) = send(
        Some("application/json"),
        b"{\"records\": [{\"value\": 1}".to_vec(),
    )
    .await;
    assert_eq!((s, error_code(&b)), (400, "malformed_body"));
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("line 1")),
        "says where: {b}"
    );
    let (s, b) = send(Some("application/json"), vec![0xff, 0xfe, 0x00, 0x13]).await;
    assert_eq!((s, error_code(&b)), (400, "malformed_body"));
    let (s, b) = send(Some("application/json"), br#"{"records": []}"#.to_vec()).await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    let (s, b) = send(
        Some("application/json"),
        br#"{"records": [{"value": 1, "partition": "one"}]}"#.to_vec(),
    )
    .await;
    assert_eq!((s, error_code(&b)), (400, "malformed_body"));
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("records[0].partition")),
        "{b}"
    );
    let (s, b) = send(
        Some("application/json"),
        br#"{"records": [{"value": "%%", "encoding": "base64"}]}"#.to_vec(),
    )
    .await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("records[0]")),
        "{b}"
    );
    let (s, b) = send(Some("text/plain"), b"hello".to_vec()).await;
    assert_eq!((s, error_code(&b)), (415, "unsupported_media_type"));
    let (s, b) = send(None, b"hello".to_vec()).await;
    assert_eq!((s, error_code(&b)), (415, "unsupported_media_type"));
    let big = json!({"records": [{"value": "x".repeat(1500), "encoding": "string"}]})
        .to_string()
        .into_bytes();
    let (s, b) = send(Some("application/json"), big).await;
    assert_eq!((s, error_code(&b)), (413, "event_too_large"));
    // Over max_body_bytes: 413 body_too_large. The server may answer and close
    // before the client has written the whole body; the client then sees the
    // pipe break instead of the answer (a race of the client, not a refusal
    // we failed to send), so that outcome is accepted too.
    let over = c
        .post(&records)
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 2_100_000])
        .send()
        .await;
    match over {
        Ok(r) => {
            let s = r.status().as_u16();
            let b: Value = r.json().await.expect("error body is JSON");
            assert_eq!((s, error_code(&b)), (413, "body_too_large"));
        }
        Err(e) => {
            let text = format!("{e:?}");
            assert!(
                text.contains("BrokenPipe") || text.contains("ConnectionReset"),
                "{text}"
            );
        }
    }

    // A declared length far over the limit is refused before any body is read.
    let mut tcp = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"POST /v1/topics/t/records HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{",
    )
    .await
    .expect("write");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");

    // Garbage instead of HTTP: the connection is answered or closed, and the node keeps serving.
    let mut tcp = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    tcp.write_all(&[
        0x10, 0x00, 0xde, 0xad, 0xbe, 0xef, b'\r', b'\n', b'\r', b'\n',
    ])
    .await
    .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut sink))
        .await
        .expect("closed");
    assert!(sink.is_empty() || String::from_utf8_lossy(&sink).starts_with("HTTP/1.1 400"));

    // Fetch errors.
    let fetch = |q: &str| {
        let url = format!("{u}/v1/topics/t/partitions/0/records?{q}");
        let c = c.clone();
        async move { get(&c, &url).await }
    };
    let (s, b) = fetch("offset=99").await;
    assert_eq!((s, error_code(&b)), (400, "offset_out_of_range"));
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("0..=0")),
        "names the range: {b}"
    );
    let (s, b) = fetch("offset=abc").await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    let (s, b) = fetch("limit=0").await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    let (s, b) = fetch("format=xml").await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    let (s, b) = fetch("wait_ms=99999999").await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    let (s, b) = get(&c, &format!("{u}/v1/topics/t/partitions/5/records")).await;
    assert_eq!((s, error_code(&b)), (404, "unknown_partition"));
    let (s, b) = get(&c, &format!("{u}/v1/topics/t/partitions/-1/records")).await;
    assert_eq!((s, error_code(&b)), (400, "bad_request"));
    let (s, b) = get(&c, &format!("{u}/v1/topics/none/partitions/0/records")).await;
    assert_eq!((s, error_code(&b)), (404, "unknown_topic"));
    let (s, b) = get(&c, &format!("{u}/v2/anything")).await;
    assert_eq!((s, error_code(&b)), (404, "not_found"));
    let r = c
        .delete(format!("{u}/v1/topics/t/records"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(
        error_code(&r.json().await.expect("json")),
        "method_not_allowed"
    );

    let (s, b) = get(&c, &format!("{u}/health")).await;
    assert_eq!((s, &b["status"]), (200, &json!("ok")));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_are_created_or_refused_per_config() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    let (s, b) = post(
        &c,
        &format!("{u}/v1/topics/fresh/records"),
        &json!({"records": [{"value": 1}]}),
    )
    .await;
    assert_eq!(s, 200, "edge auto-creates: {b}");
    node.stop().await;
    let node = InProcessNode::start("[storage]\nauto_create_topics = false").await;
    let (s, b) = post(
        &c,
        &format!("{}/v1/topics/fresh/records", node.url),
        &json!({"records": [{"value": 1}]}),
    )
    .await;
    assert_eq!((s, error_code(&b)), (404, "unknown_topic"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_when_a_record_arrives() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "lp", 1).await;
    let waiting = {
        let (c, u) = (c.clone(), u.clone());
        tokio::spawn(async move {
            get(
                &c,
                &format!("{u}/v1/topics/lp/partitions/0/records?offset=0&wait_ms=30000"),
            )
            .await
        })
    };
    // The poll is parked on the partition's end offset; the append wakes it.
    let (s, _) = post(
        &c,
        &format!("{u}/v1/topics/lp/records"),
        &json!({"records": [{"value": "wake"}]}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, page) = waiting.await.expect("join");
    assert_eq!(s, 200);
    assert_eq!(page["records"][0]["value"], "wake");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_offsets() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "g", 2).await;
    for p in 0..2 {
        let (s, _) = post(
            &c,
            &format!("{u}/v1/topics/g/records"),
            &json!({"records": [{"value": 1, "partition": p}, {"value": 2, "partition": p}]}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let commit = json!({"offsets": [{"topic": "g", "partition": 0, "offset": 2}, {"topic": "g", "partition": 1, "offset": 1}]});
    let (s, b) = post(&c, &format!("{u}/v1/groups/readers/offsets"), &commit).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = get(&c, &format!("{u}/v1/groups/readers/offsets")).await;
    assert_eq!(s, 200);
    assert_eq!(
        b["offsets"],
        json!([{"topic": "g", "partition": 0, "offset": 2}, {"topic": "g", "partition": 1, "offset": 1}])
    );
    let (_, b) = get(&c, &format!("{u}/v1/groups/nobody/offsets")).await;
    assert_eq!(b["offsets"], json!([]));
    let (s, b) = post(
        &c,
        &format!("{u}/v1/groups/readers/offsets"),
        &json!({"offsets": [{"topic": "g", "partition": 0, "offset": 99}]}),
    )
    .await;
    assert_eq!((s, error_code(&b)), (400, "offset_out_of_range"));
    let (s, b) = post(
        &c,
        &format!("{u}/v1/groups/readers/offsets"),
        &json!({"offsets": [{"topic": "nope", "partition": 0, "offset": 0}]}),
    )
    .await;
    assert_eq!((s, error_code(&b)), (404, "unknown_topic"));
    let (s, b) = post(
        &c,
        &format!("{u}/v1/groups/readers/offsets"),
        &json!({"offsets": "all"}),
    )
    .await;
    assert_eq!((s, error_code(&b)), (400, "malformed_body"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_log() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "m", 1).await;
    let (s, _) = post(
        &c,
        &format!("{u}/v1/topics/m/records"),
        &json!({"records": [{"value": 1}, {"value": 2}]}),
    )
    .await;
    assert_eq!(s, 200);
    let text = c
        .get(format!("{u}/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    for needle in [
        "tributary_append_events_total 2",
        "tributary_commit_duration_seconds_bucket{le=\"+Inf\"}",
        "tributary_topic_events_appended_total{topic=\"m\"} 2",
        "tributary_partition_end_offset{topic=\"m\",partition=\"0\"} 2",
        "tributary_http_requests_total{method=\"POST\",route=\"/v1/topics/{topic}/records\",status=\"2xx\"} 1",
        "tributary_log_writable 1",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    node.stop().await;
}

/// Every route the router serves is in the OpenAPI document and the other way
/// round, and each documented route answers (not the 404/405 fallbacks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_real_routes() {
    let node = InProcessNode::start("").await;
    let (c, u) = (client(), node.url.clone());
    create_topic(&c, &u, "topic", 1).await;
    let served: Value = c
        .get(format!("{u}/openapi.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let doc: Value = serde_json::from_str(OPENAPI).expect("valid JSON");
    assert_eq!(served, doc);
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(documented, routes);
    for (method, path) in routes {
        let url = format!(
            "{u}{}",
            path.replace("{topic}", "topic")
                .replace("{partition}", "0")
                .replace("{group}", "g")
        );
        let req = match method.as_str() {
            "GET" => c.get(&url),
            "DELETE" => c.delete(&url),
            "PATCH" => c
                .patch(&url)
                .header("content-type", "application/json")
                .body("{}"),
            _ => c
                .post(&url)
                .header("content-type", "application/json")
                .body("{}"),
        };
        let r = req.send().await.expect("send");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert!(
            !body.contains("\"not_found\"") && !body.contains("method_not_allowed"),
            "{method} {path}: {status} {body}"
        );
    }
    node.stop().await;
}

/// When the log cannot write, produce and health answer 503 and nothing is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_write_answers_503() {
    let store = MemStore::new();
    let log = Log::with_store(Arc::new(store.clone()), LogConfig::default()).expect("log");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cx = FrontendContext::new(log, shutdown.clone(), "edge");
    let listener = LimitedListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        16,
    );
    let u = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(tributary_http::serve(
        listener,
        None,
        cx,
        HttpConfig::default(),
        tributary_http::Router::new(),
        tributary_http::Router::new(),
    ));
    let c = client();
    create_topic(&c, &u, "t", 1).await;
    store.fail_sync(Some("disk unplugged"));
    let (s, b) = post(
        &c,
        &format!("{u}/v1/topics/t/records"),
        &json!({"records": [{"value": 1}]}),
    )
    .await;
    assert_eq!((s, error_code(&b)), (503, "unwritable"));
    let (s, b) = get(&c, &format!("{u}/health")).await;
    assert_eq!((s, error_code(&b)), (503, "unwritable"));
    store.fail_sync(None);
    let (s, _) = post(
        &c,
        &format!("{u}/v1/topics/t/records"),
        &json!({"records": [{"value": 1}]}),
    )
    .await;
    assert_eq!(
        s, 503,
        "stays unwritable until restarted: the failed cycle's outcome is unknown"
    );
    shutdown.cancel();
    server.await.expect("join").expect("serve");
}
