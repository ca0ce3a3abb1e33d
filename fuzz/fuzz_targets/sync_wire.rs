//! Sync frames from an edge (postcard), and a batch's records block after
//! decompression (zstd, bounded), as the core reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_sync::wire::{self, Frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::Batch(batch)) = Frame::decode(data) {
        if let Ok(block) = wire::decompress(&batch, 1 << 20) {
            let _ = wire::decode_records(&block, batch.count, wire::VERSION);
        }
    }
    // The records block on its own, whatever count a peer claims.
    // Both versions of the records.
    if let Some((&n, block)) = data.split_first() {
        let _ = wire::decode_records(block, u32::from(n), wire::VERSION);
        let _ = wire::decode_records(block, u32::from(n), 1);
    }
});
