//! MQTT 3.1.1 and 5 packets as the session layer reads them: the version
//! sniffed from a CONNECT, then packets decoded one after another from the
//! same buffer until it needs more bytes or refuses; every SUBSCRIBE and
//! UNSUBSCRIBE filter also through the shared-subscription parser and the
//! router (as the session does). Never a panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tributary_mqtt::codec::{self, In, Version};
use tributary_mqtt::{shared, topic};

const MAX: usize = 1024 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = codec::sniff_version(data, MAX);
    let _ = codec::pending_len(data);
    for version in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        for _ in 0..1024 {
            match codec::decode(&mut buf, version, MAX) {
                Ok(Some(In::Subscribe { filters, .. })) => {
                    for f in filters {
                        filter(&f.path);
                    }
                }
                Ok(Some(In::Unsubscribe { filters, .. })) => filters.iter().for_each(|f| filter(f)),
                Ok(Some(In::Publish(p))) => {
                    let router = topic::Router::new(Vec::new(), "mqtt".into());
                    let (log_topic, key) = router.target(&p.topic);
                    assert!(!log_topic.is_empty());
                    assert_eq!(key, p.topic, "the default mapping keys by the whole topic");
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});

/// A filter as SUBSCRIBE sees it: shared or not, valid or not, and the log
/// topics it would tail.
fn filter(path: &str) {
    let inner = match shared::parse(path) {
        Some(Ok((group, inner))) => {
            assert!(!group.is_empty() && !group.contains(['/', '+', '#']));
            assert!(topic::valid_filter(inner));
            inner
        }
        Some(Err(())) => return,
        None => path,
    };
    if topic::valid_filter(inner) {
        let _ = topic::Router::new(Vec::new(), "mqtt".into()).sources(inner);
    }
}
