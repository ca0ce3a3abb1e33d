//! The Raft log's segment files as a node reads them at open
//! (`cluster/src/wal.rs`): whatever a segment holds, a torn write, a
//! flipped byte or garbage, opening the log cuts it or refuses it with an
//! error, never a panic or a runaway allocation, and what it keeps reads
//! back. The input is read two ways: as the segment file itself, and as
//! record bodies (a 2-byte length before each) framed with correct lengths
//! and checksums, so that mutations reach the log ids and their order. The
//! first byte picks the purged index (0: none).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use tributary_cluster::wal::Wal;

/// The input's bodies as records.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    tributary_fuzz::framed_records(data, &mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&purged, data)) = data.split_first() else {
        return;
    };
    let purged = (purged > 0).then_some(u64::from(purged % 8));
    let dir = std::env::temp_dir().join(format!("raft_wal-{}", std::process::id()));
    for bytes in [data.to_vec(), framed(data)] {
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        // Two segments: the input, and the same again after it, so that
        // the step from one segment to the next is read too.
        let second = 1 + bytes.len() as u64 % 5;
        let written = std::fs::write(dir.join(format!("{:020}.wal", 1)), &bytes)
            .and_then(|()| std::fs::write(dir.join(format!("{second:020}.wal")), &bytes));
        if written.is_err() {
            return;
        }
        if let Ok(wal) = Wal::open_with(&dir, purged, 1 << 20) {
            let first = wal.first_index().unwrap_or(0);
            let kept = wal.len();
            let wal = Mutex::new(wal);
            let read = Wal::read(&wal, first, u64::MAX).expect("what open kept reads back");
            assert_eq!(read.len(), kept, "every entry open kept reads back");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
});
