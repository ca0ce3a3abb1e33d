//! A stored record batch as a damaged disk might hand it back: header and
//! records decoded, every failure an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_storage::batch;

fuzz_target!(|data: &[u8]| {
    let _ = batch::decode_header(data);
    let _ = batch::decode_records(data, 0, 0, 0, u64::MAX, |_| true);
});
