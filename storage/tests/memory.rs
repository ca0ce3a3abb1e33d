//! Reading stays within the memory the sled cache is given: a scan of far
//! more data than the cache holds does not keep it. (Its own test binary:
//! the process's resident memory is the measure, so nothing else runs in it.)
//!
//! sled 0.34.7 as released queued up to 63 page accesses in each of 256 LRU
//! shards before accounting for them, so up to 16,128 pages read from disk
//! stayed in memory whatever `cache_capacity` said: after reading it all, a
//! node held about as much as it had read (vendor/sled/VENDORED.md). This
//! test reads 160 MB through a 32 MiB cache.
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tributary_storage::{AppendRecord, Event, Log};

const RECORDS_PER_APPEND: usize = 250;
const VALUE: usize = 4096;
const APPENDS: usize = 160;

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb / 1024
}

fn read_everything(log: &Log) -> usize {
    let (start, end) = log.offsets("scan", 0).expect("offsets");
    let mut at = start;
    let mut bytes = 0;
    while at < end {
        let r = log.read("scan", 0, at, 10_000, 1 << 20).expect("read");
        bytes += r.records.iter().map(|r| r.bytes().len()).sum::<usize>();
        at = r.next_offset;
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "reads the process's resident memory from /proc/self/status (Linux)"
)]
async fn reading_far_more_than_the_cache_holds_does_not_keep_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = sled_log(dir.path(), config());
        create(&log, "scan", 1).await;
        for round in 0..APPENDS {
            let records: Vec<AppendRecord> = (0..RECORDS_PER_APPEND)
                .map(|i| pinned(0, Event::new(vec![(round + i) as u8; VALUE])))
                .collect();
            log.append("scan", records).await.expect("append");
        }
    }
    // A fresh open: what the reads pull in is all the cache holds.
    let log = sled_log(dir.path(), config());
    let before = rss_mib();
    let total = read_everything(&log);
    assert_eq!(total, APPENDS * RECORDS_PER_APPEND * VALUE);
    let once = rss_mib();
    read_everything(&log);
    let twice = rss_mib();
    let read_mib = (total >> 20) as u64;
    println!("RSS {before} MiB before, {once} after reading {read_mib} MiB, {twice} after again");
    // The cache (32 MiB), the read buffers and the allocator's slack; as
    // released, sled kept about what was read (over 100 MiB here).
    assert!(
        once.saturating_sub(before) < 64 && twice.saturating_sub(before) < 64,
        "reading {read_mib} MiB grew the process from {before} to {once} MiB, then {twice} MiB"
    );
}
