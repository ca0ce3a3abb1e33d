//! The kill -9 harness the crash tests share (HTTP, MQTT, AMQP): how many
//! cycles to run, one cycle of "writers run, the node dies at a random
//! moment, the writers settle", and the check that every acknowledged
//! payload is stored exactly once.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use super::ChildNode;

/// Kill cycles per crash test: `CRASH_CYCLES`, default 20.
pub fn cycles() -> usize {
    std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// One cycle: the `workers` (already spawned on `rt`, writing to `node`) run
/// for a random pause in `pause_ms`, then the node is killed with SIGKILL and
/// each worker is awaited for at most `settle` (they end when their
/// connection dies). Returns how each ended (`None`: still running at
/// `settle`), for tests whose workers assert.
pub fn kill_during<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    node: &mut ChildNode,
    rng: &mut fastrand::Rng,
    pause_ms: Range<u64>,
    workers: Vec<tokio::task::JoinHandle<T>>,
    settle: Duration,
) -> Vec<Option<Result<T, tokio::task::JoinError>>> {
    std::thread::sleep(Duration::from_millis(rng.u64(pause_ms)));
    node.kill9();
    rt.block_on(async {
        let mut ended = Vec::with_capacity(workers.len());
        for w in workers {
            ended.push(tokio::time::timeout(settle, w).await.ok());
        }
        ended
    })
}

/// Every acknowledged payload is among the stored values, and no stored
/// payload is there twice (each was sent once). `acks` names the
/// acknowledgement in messages ("PUBACKed", "confirmed").
pub fn assert_each_acked_stored_once(
    acked: &[Vec<u8>],
    stored: &BTreeMap<Vec<u8>, usize>,
    acks: &str,
) {
    assert!(
        acked.len() > 1000,
        "too few {acks} messages to prove anything: {}",
        acked.len()
    );
    let missing = acked.iter().filter(|p| !stored.contains_key(*p)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} {acks} messages are missing after {} kill -9 cycles",
        acked.len(),
        cycles()
    );
    let doubled = stored.values().filter(|&&n| n > 1).count();
    assert_eq!(doubled, 0, "{doubled} payloads stored twice");
}
