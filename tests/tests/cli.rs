//! The `tributary` command line as a user runs it: config errors, `topics`
//! (create, list, describe, alter, delete), `connectors`,
//! `produce` from stdin and `tail`, against a running node.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{ChildNode, NODE_BIN};

fn run(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(NODE_BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_are_all_reported_and_exit_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[storage]\ndurabilty = \"fsync\"\nsegment_size_bytes = 3\n[http]\nlisten = \"nope\"\n",
    )
    .expect("write");
    let out = Command::new(NODE_BIN)
        .args(["edge", "--config"])
        .arg(&cfg)
        .env("TRIBUTARY_DATA_DIR", dir.path())
        .env("TRIBUTARY_HTTP__PORTT", "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "storage.durabilty",
        "http.portt` (from TRIBUTARY_HTTP__PORTT)",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
    // Unknown keys are reported before values are judged; fix them and the
    // value problems show, all at once.
    std::fs::write(
        &cfg,
        "[storage]\nsegment_size_bytes = 3\n[http]\nlisten = \"nope\"\n",
    )
    .expect("write");
    let out = Command::new(NODE_BIN)
        .args(["edge", "--config"])
        .arg(&cfg)
        .env("TRIBUTARY_DATA_DIR", dir.path())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("segment_size_bytes") && err.contains("http.listen"),
        "{err}"
    );
}

#[test]
fn produce_then_tail_round_trips_lines_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ChildNode::start(dir.path(), &[]);
    let url = node.url.clone();
    let (code, out, err) = run(
        &[
            "topics",
            "create",
            "lines",
            "--partitions",
            "2",
            "--url",
            &url,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"partition_count\": 2"), "{out}");
    let input = b"first line\nsecond \xff\xfe binary\n{\"json\": true}\n\nlast without newline";
    let (code, _, err) = run(
        &[
            "produce", "lines", "--key", "k", "--batch", "2", "--url", &url,
        ],
        Some(input),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("produced 5 record(s)"), "{err}");
    let (code, out, err) = run(
        &["tail", "lines", "--format", "binary", "--url", &url],
        None,
    );
    assert_eq!(code, 0, "{err}");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let values: Vec<Vec<u8>> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            b64.decode(v["value"].as_str().expect("value"))
                .expect("base64")
        })
        .collect();
    let expected: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    assert_eq!(values, expected);
    let (code, out, _) = run(&["topics", "list", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("lines") && l.contains(" 5 ")),
        "{out}"
    );
    let (code, _, err) = run(&["topics", "describe", "missing", "--url", &url], None);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_topic"), "{err}");

    // Changed, then deleted.
    let alter = |args: &[&str]| {
        let mut all = vec!["topics", "alter", "lines", "--url", &url];
        all.extend_from_slice(args);
        run(&all, None)
    };
    let (code, out, err) = alter(&["--partitions", "3", "--retention-ms", "60000"]);
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).expect("the topic as JSON");
    assert_eq!(
        (t["partition_count"].as_u64(), t["retention_ms"].as_u64()),
        (Some(3), Some(60_000))
    );
    let (code, out, err) = alter(&["--retention-ms", "none"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"retention_ms\": null"), "{out}");
    let (code, _, err) = alter(&["--partitions", "1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid_topic") && err.contains("added, not removed"),
        "{err}"
    );
    let (code, _, err) = alter(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to change"), "{err}");
    let (code, out, err) = alter(&[
        "--cleanup-policy",
        "compact",
        "--min-cleanable-dirty-ratio",
        "0.25",
        "--max-compaction-lag-ms",
        "5000",
    ]);
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).expect("the topic as JSON");
    assert_eq!(
        (
            t["cleanup_policy"].as_str(),
            t["min_cleanable_dirty_ratio"].as_f64(),
            t["max_compaction_lag_ms"].as_u64()
        ),
        (Some("compact"), Some(0.25), Some(5000))
    );
    assert!(t["compaction"]["passes"].is_u64(), "{t}");
    // Compacted: a keyless record has no place.
    let (code, _, err) = run(&["produce", "lines", "--url", &url], Some(b"no key"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("key_required"), "{err}");
    let (code, out, err) = run(&["topics", "delete", "lines", "--url", &url], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("topic lines deleted"), "{out}");
    let (code, _, err) = run(&["topics", "delete", "lines", "--url", &url], None);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_topic"), "{err}");
    assert_eq!(node.terminate().code(), Some(0));
}

#[test]
fn bench_http_counts_acknowledged_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let pid = node.pid().to_string();
    let (code, out, err) = run(
        &[
            "bench",
            "http",
            "--url",
            &node.url,
            "--connections",
            "2",
            "--batch",
            "10",
            "--duration",
            "300ms",
            "--server-pid",
            &pid,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let result = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("RESULT line");
    let v: serde_json::Value = serde_json::from_str(result).expect("json");
    let events = v["events"].as_u64().expect("events");
    assert!(events > 0);
    let c = common::client();
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let stored = rt
        .block_on(common::get(&c, &format!("{}/v1/topics/bench", node.url)))
        .1;
    // Every acknowledged event is in the log (a request may still have been in
    // flight when the clock stopped, so the log may hold a batch more).
    let end = stored["partitions"][0]["end_offset"].as_u64().expect("end");
    assert!(
        end >= events && end <= events + 2 * 10,
        "log {end} vs acked {events}"
    );
}

/// `tributary connectors`: create from stdin, list, describe, pause,
/// resume, restart, delete; a bad connector's error names the key.
#[test]
fn connectors_are_created_listed_described_paused_and_deleted_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let url = node.url.clone();
    // Nothing listens on port 9: the sink keeps retrying, which is fine here.
    let hook = br#"{"name": "cli-hook", "kind": "http_sink", "topics": ["t"], "url": "http://127.0.0.1:9/x"}"#;
    let (code, out, err) = run(&["connectors", "create", "-", "--url", &url], Some(hook));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"name\": \"cli-hook\""), "{out}");
    let (code, out, _) = run(&["connectors", "list", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli-hook") && l.contains("http_sink")),
        "{out}"
    );
    let (code, out, _) = run(&["connectors", "pause", "cli-hook", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(out.contains("\"state\": \"paused\""), "{out}");
    for op in ["resume", "restart"] {
        let (code, out, _) = run(&["connectors", op, "cli-hook", "--url", &url], None);
        assert_eq!(code, 0);
        assert!(out.contains("\"state\": \"running\""), "{op}: {out}");
    }
    let (code, out, _) = run(&["connectors", "describe", "cli-hook", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(out.contains("\"group\": \"connector-cli-hook\""), "{out}");
    let bad =
        br#"{"name": "x", "kind": "http_sink", "topics": ["t"], "url": "http://h", "retries": 3}"#;
    let (code, _, err) = run(&["connectors", "create", "-", "--url", &url], Some(bad));
    assert_ne!(code, 0);
    assert!(err.contains("`retries`"), "{err}");
    let (code, _, err) = run(&["connectors", "delete", "cli-hook", "--url", &url], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["connectors", "describe", "cli-hook", "--url", &url], None);
    assert_ne!(code, 0);
    assert!(err.contains("unknown_connector"), "{err}");
}

/// `tributary pipelines`: create (SQL from an argument and from stdin),
/// list, describe with its rows, pause, resume, delete; bad SQL is refused
/// with its place; a config file's `[[pipelines]]` with bad SQL stops the
/// node before it starts, naming the pipeline.
#[test]
fn pipelines_are_created_listed_described_paused_and_deleted_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ChildNode::start(dir.path(), &[]);
    let url = node.url.clone();
    let sql = "INSERT INTO cli_hot SELECT _key AS k, v * 2 AS v2 FROM cli_in WHERE v > 1";
    let (code, out, err) = run(&["pipelines", "create", "hot", sql, "--url", &url], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"name\": \"hot\""), "{out}");
    let (code, _, err) = run(
        &[
            "pipelines",
            "create",
            "from-stdin",
            "-",
            "--paused",
            "--url",
            &url,
        ],
        Some(b"INSERT INTO cli_all SELECT * FROM cli_in"),
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(
        &["produce", "cli_in", "--key", "a", "--url", &url],
        Some(b"{\"v\": 1}\n{\"v\": 5}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let (code, out, _) = run(&["pipelines", "describe", "hot", "--url", &url], None);
        assert_eq!(code, 0);
        if out.contains("\"v2\": 10") {
            assert!(out.contains("\"rows_out\": 1"), "{out}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, out, _) = run(&["pipelines", "list", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("from-stdin") && l.contains("paused")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("hot") && l.contains("running")),
        "{out}"
    );
    let (code, out, _) = run(&["pipelines", "resume", "from-stdin", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(out.contains("\"state\": \"running\""), "{out}");
    let (code, out, _) = run(&["pipelines", "pause", "hot", "--url", &url], None);
    assert_eq!(code, 0);
    assert!(out.contains("\"state\": \"paused\""), "{out}");
    let (code, _, err) = run(
        &[
            "pipelines",
            "create",
            "bad",
            "INSERT INTO o SELECT FROM s",
            "--url",
            &url,
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("bad_sql") && err.contains("line 1, column"),
        "{err}"
    );
    let (code, _, err) = run(&["pipelines", "delete", "hot", "--url", &url], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["pipelines", "describe", "hot", "--url", &url], None);
    assert_ne!(code, 0);
    assert!(err.contains("unknown_pipeline"), "{err}");

    let cfg = dir.path().join("pipelines.toml");
    std::fs::write(
        &cfg,
        "[[pipelines]]\nname = \"broken\"\nsql = \"INSERT INTO o SELECT x, COUNT(*) FROM s GROUP BY y\"\n",
    )
    .expect("write");
    let out = Command::new(NODE_BIN)
        .args(["edge", "--config"])
        .arg(&cfg)
        .env("TRIBUTARY_DATA_DIR", dir.path().join("other"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pipelines[0]")
            && err.contains("broken")
            && err.contains("neither in GROUP BY"),
        "{err}"
    );
}
