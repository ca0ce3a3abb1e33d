//! MQTT 3.1.1 and 5 packets as the session layer reads them: the version
//! sniffed from a CONNECT, then packets decoded one after another from the
//! same buffer until it needs more bytes or refuses. Never a panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tributary_protocols::mqtt::codec::{self, Version};

const MAX: usize = 1024 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = codec::sniff_version(data, MAX);
    let _ = codec::pending_len(data);
    for version in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        for _ in 0..1024 {
            match codec::decode(&mut buf, version, MAX) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
