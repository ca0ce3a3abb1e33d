//! A stored record batch as a damaged disk might hand it back: header and
//! records decoded, every failure an error, never a panic. Twice: as it
//! came (the checksum refuses almost everything), and with magic, version
//! and checksum made right (versions 1 to 4), so the records decoder meets
//! every body a write bug could have sealed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_storage::batch;

fn decode(value: &[u8]) {
    let _ = batch::decode_header(value);
    let _ = batch::decode_records(value, 0, 0, 0, u64::MAX, |_| true);
    let _ = batch::decode_records(value, 5, 0, 7, 9, |_| true);
}

fuzz_target!(|data: &[u8]| {
    decode(data);
    if data.len() >= batch::HEADER_LEN {
        let mut sealed = data.to_vec();
        sealed[0] = 0x54;
        // Every version the decoder reads: 1, 2, 3 (compacted) and 4
        // (transactional).
        sealed[1] = 1 + data[1] % 4;
        let crc = if sealed[1] >= 3 {
            batch::compacted_crc(&sealed)
        } else {
            crc32fast::hash(&sealed[6..])
        };
        sealed[2..6].copy_from_slice(&crc.to_le_bytes());
        decode(&sealed);
    }
});
