//! The HTTP API driven by a client we did not write: curl. Ignored by plain
//! `cargo test`; `scripts/test` installs curl and runs it.

mod common;

use std::process::Command;

use common::ChildNode;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (body.to_owned(), code.to_owned())
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
#[ignore = "needs curl (scripts/test installs it)"]
fn curl_creates_produces_and_fetches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ChildNode::start(dir.path(), &[]);
    let u = node.url.clone();
    let ct = "content-type: application/json";
    let (b, code) = curl(&[
        "-XPOST",
        &format!("{u}/v1/topics"),
        "-H",
        ct,
        "-d",
        r#"{"name":"sensors","partitions":2}"#,
    ]);
    assert_eq!(code, "201", "{b}");
    let (b, code) = curl(&[
        "-XPOST",
        &format!("{u}/v1/topics/sensors/records"),
        "-H",
        ct,
        "-d",
        r#"{"records":[{"key":"pump-7","value":{"temp":21.5}},{"value":"hi","encoding":"string","partition":0}]}"#,
    ]);
    assert_eq!(code, "200", "{b}");
    let offsets = json(&b)["offsets"].clone();
    let p = offsets[0]["partition"].as_u64().expect("partition");
    assert_eq!(
        p as u32,
        tributary_storage::partitioner::partition_for_key(b"pump-7", 2)
    );

    // A binary file, sent as it is on disk.
    let blob: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &blob).expect("write blob");
    let (b, code) = curl(&[
        "-XPOST",
        &format!("{u}/v1/topics/raw/records?key=k1"),
        "-H",
        "content-type: application/octet-stream",
        "--data-binary",
        &format!("@{}", file.display()),
    ]);
    assert_eq!(code, "200", "{b}");
    let (b, code) = curl(&[&format!(
        "{u}/v1/topics/raw/partitions/0/records?offset=0&format=binary"
    )]);
    assert_eq!(code, "200", "{b}");
    use base64::Engine as _;
    let got = base64::engine::general_purpose::STANDARD
        .decode(json(&b)["records"][0]["value"].as_str().expect("value"))
        .expect("base64");
    assert_eq!(got, blob);

    let (b, code) = curl(&[&format!(
        "{u}/v1/topics/sensors/partitions/{p}/records?offset=0"
    )]);
    assert_eq!(code, "200", "{b}");
    assert_eq!(
        json(&b)["records"][0]["value"],
        serde_json::json!({"temp": 21.5})
    );

    // curl's default form encoding is refused with a clear 415.
    let (b, code) = curl(&[
        "-XPOST",
        &format!("{u}/v1/topics/sensors/records"),
        "-d",
        "x=1",
    ]);
    assert_eq!(code, "415", "{b}");
    assert_eq!(json(&b)["error"]["code"], "unsupported_media_type");
    let (b, code) = curl(&[&format!("{u}/health")]);
    assert_eq!(
        (code.as_str(), json(&b)["status"].as_str()),
        ("200", Some("ok"))
    );
    let (b, code) = curl(&[&format!("{u}/metrics")]);
    assert_eq!(code, "200");
    assert!(b.contains("tributary_append_events_total 3"), "{b}");
    assert_eq!(node.terminate().code(), Some(0));
}
