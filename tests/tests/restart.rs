//! Graceful stop and restart of the real binary: SIGTERM exits 0 after
//! in-flight work, and a restarted node serves every record and group offset.

mod common;

use common::{client, create_topic, get, post, read_all, ChildNode};
use serde_json::json;

#[test]
fn sigterm_then_restart_keeps_records_and_group_offsets() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ChildNode::start(dir.path(), &[]);
    let c = client();
    let expected: Vec<Vec<u8>> = (0..2000u32)
        .map(|i| format!("event-{i}-{}", "x".repeat((i % 97) as usize)).into_bytes())
        .collect();
    rt.block_on(async {
        create_topic(&c, &node.url, "keep", 2).await;
        for chunk in expected.chunks(250) {
            let records: Vec<_> = chunk
                .iter()
                .map(|v| json!({"value": String::from_utf8_lossy(v), "encoding": "string", "partition": 1}))
                .collect();
            let (s, b) = post(&c, &format!("{}/v1/topics/keep/records", node.url), &json!({"records": records})).await;
            assert_eq!(s, 200, "{b}");
        }
        let (s, b) = post(
            &c,
            &format!("{}/v1/groups/billing/offsets", node.url),
            &json!({"offsets": [{"topic": "keep", "partition": 1, "offset": 1234}]}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    });
    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");
    let log = std::fs::read_to_string(dir.path().join("node.log")).expect("node.log");
    assert!(log.contains("stopped cleanly"), "{log}");

    let node = ChildNode::start(dir.path(), &[]);
    rt.block_on(async {
        let got = read_all(&c, &node.url, "keep", 1).await;
        assert_eq!(got.len(), expected.len());
        for (i, (offset, key, value)) in got.iter().enumerate() {
            assert_eq!(*offset, i as u64);
            assert_eq!(key, &None);
            assert_eq!(value, &expected[i]);
        }
        assert!(read_all(&c, &node.url, "keep", 0).await.is_empty());
        let (s, b) = get(&c, &format!("{}/v1/groups/billing/offsets", node.url)).await;
        assert_eq!(s, 200);
        assert_eq!(
            b["offsets"],
            json!([{"topic": "keep", "partition": 1, "offset": 1234}])
        );
        let (s, b) = post(
            &c,
            &format!("{}/v1/topics/keep/records", node.url),
            &json!({"records": [{"value": 1, "partition": 1}]}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            b["offsets"][0]["offset"], 2000,
            "offsets continue after a restart"
        );
    });
}
