//! AMQP 0-9-1 frames as the server reads them (frame size checked against
//! frame_max before buffering, the nested-table guard, amq-protocol's parser).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tributary_amqp::frame;

fuzz_target!(|data: &[u8]| {
    let _ = frame::nesting_ok(data, 0);
    let mut buf = BytesMut::from(data);
    for _ in 0..1024 {
        match frame::next_frame(&mut buf, 131_072) {
            Ok(Some(f)) => {
                // What parsed encodes again without a panic.
                let mut out = Vec::new();
                frame::encode(&f, &mut out);
            }
            Ok(None) | Err(_) => break,
        }
    }
});
