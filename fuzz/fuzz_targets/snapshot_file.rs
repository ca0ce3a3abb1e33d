//! A snapshot file as a follower receives it from a peer, restored into a
//! log: a damaged or hostile file is refused (before the log changes),
//! never a panic or a runaway allocation. The input is read two ways: as
//! the file itself (the header, the frames and their checksums), and as a
//! list of item bodies (a 2-byte length before each) framed with correct
//! checksums, so that mutations reach the items and the restore itself.
#![no_main]

use std::io::Write;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::runtime;
use tributary_storage::{Log, LogConfig, MemStore, TopicConfig};

/// The input's bodies as a framed file.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut out = b"TRIBSNAP".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    tributary_fuzz::framed_records(data, &mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("snapshot_file-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("in.snap");
    runtime().block_on(async {
        for bytes in [data.to_vec(), framed(data)] {
            let written = std::fs::File::create(&path).and_then(|mut f| f.write_all(&bytes));
            if written.is_err() {
                return;
            }
            let log =
                Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
            log.create_topic(TopicConfig::new("mine", 1))
                .await
                .expect("topic");
            if log.restore(&path).await.is_err() {
                // Refused: the log is as it was.
                assert!(
                    log.topic("mine").is_ok(),
                    "a refused snapshot changed the log"
                );
            }
            let _ = log.close().await;
        }
    });
});
