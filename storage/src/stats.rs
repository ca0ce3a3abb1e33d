//! Counters the log keeps for `/metrics`: cheap atomics, nothing labelled by key.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the commit latency histogram buckets.
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Log-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) append_requests: AtomicU64,
    pub(crate) append_events: AtomicU64,
    pub(crate) append_bytes: AtomicU64,
    pub(crate) append_errors: AtomicU64,
    pub(crate) commit_cycles: AtomicU64,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    commit_sum_micros: AtomicU64,
    pub(crate) retention_removed_batches: AtomicU64,
    pub(crate) retention_removed_events: AtomicU64,
    pub(crate) quota_dropped_batches: AtomicU64,
    pub(crate) quota_dropped_events: AtomicU64,
    pub(crate) quota_rejected_appends: AtomicU64,
    pub(crate) quota_dropped_unforwarded_events: AtomicU64,
    pub(crate) disk_full_rejected_appends: AtomicU64,
    pub(crate) compaction_passes: AtomicU64,
    pub(crate) compaction_records_removed: AtomicU64,
    pub(crate) compaction_bytes_reclaimed: AtomicU64,
    txn_open: AtomicU64,
    txn_committed: AtomicU64,
    txn_aborted: AtomicU64,
    txn_timed_out: AtomicU64,
    txn_fenced: AtomicU64,
}

/// What a transaction coordinator tells the log's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnEvent {
    /// A transaction began.
    Begun,
    /// A transaction committed (its markers durable).
    Committed,
    /// A transaction aborted (its markers durable).
    Aborted,
    /// A transaction ran past its timeout and was aborted.
    TimedOut,
    /// A request from a fenced producer (an older epoch) was refused.
    Fenced,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// Append calls completed.
    pub append_requests: u64,
    /// Events appended.
    pub append_events: u64,
    /// Encoded bytes appended.
    pub append_bytes: u64,
    /// Append calls that failed.
    pub append_errors: u64,
    /// Commit cycles (each one flush + fsync covering many appends).
    pub commit_cycles: u64,
    /// Cumulative histogram counts per [`COMMIT_BUCKETS`] bound.
    pub commit_buckets: Vec<u64>,
    /// Sum of commit durations in seconds.
    pub commit_seconds_sum: f64,
    /// Batches removed by retention.
    pub retention_removed_batches: u64,
    /// Events removed by retention.
    pub retention_removed_events: u64,
    /// Batches evicted to stay within the disk quota (`on_full = "drop_oldest"`).
    pub quota_dropped_batches: u64,
    /// Events evicted to stay within the disk quota.
    pub quota_dropped_events: u64,
    /// Appends refused by the disk quota.
    pub quota_rejected_appends: u64,
    /// Of [`StatsSnapshot::quota_dropped_events`], those not yet forwarded
    /// upstream when they were evicted (the core never gets them).
    pub quota_dropped_unforwarded_events: u64,
    /// Appends refused because the disk was under the free-space reserve.
    pub disk_full_rejected_appends: u64,
    /// Compaction passes.
    pub compaction_passes: u64,
    /// Records compaction removed.
    pub compaction_records_removed: u64,
    /// Bytes compaction gave back.
    pub compaction_bytes_reclaimed: u64,
    /// Transactions begun and not yet committed or aborted.
    pub transactions_open: u64,
    /// Transactions committed.
    pub transactions_committed: u64,
    /// Transactions aborted (timed out ones too).
    pub transactions_aborted: u64,
    /// Of the aborted, those aborted by their timeout.
    pub transactions_timed_out: u64,
    /// Requests refused because their producer was fenced by a newer epoch.
    pub transactions_fenced: u64,
}

impl Stats {
    pub(crate) fn observe_commit(&self, took: Duration) {
        self.commit_cycles.fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = COMMIT_BUCKETS.iter().position(|&b| secs <= b) {
            self.commit_buckets[i].fetch_add(1, Relaxed);
        }
        self.commit_sum_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// Counts a transaction coordinator's `event`.
    pub(crate) fn transaction(&self, event: TxnEvent) {
        match event {
            TxnEvent::Begun => {
                self.txn_open.fetch_add(1, Relaxed);
            }
            TxnEvent::Committed | TxnEvent::Aborted => {
                let _ = self
                    .txn_open
                    .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
                let done = if event == TxnEvent::Committed {
                    &self.txn_committed
                } else {
                    &self.txn_aborted
                };
                done.fetch_add(1, Relaxed);
            }
            TxnEvent::TimedOut => {
                self.txn_timed_out.fetch_add(1, Relaxed);
            }
            TxnEvent::Fenced => {
                self.txn_fenced.fetch_add(1, Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let mut cumulative = 0;
        let commit_buckets = self
            .commit_buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Relaxed);
                cumulative
            })
            .collect();
        StatsSnapshot {
            append_requests: self.append_requests.load(Relaxed),
            append_events: self.append_events.load(Relaxed),
            append_bytes: self.append_bytes.load(Relaxed),
            append_errors: self.append_errors.load(Relaxed),
            commit_cycles: self.commit_cycles.load(Relaxed),
            commit_buckets,
            commit_seconds_sum: self.commit_sum_micros.load(Relaxed) as f64 / 1e6,
            retention_removed_batches: self.retention_removed_batches.load(Relaxed),
            retention_removed_events: self.retention_removed_events.load(Relaxed),
            quota_dropped_batches: self.quota_dropped_batches.load(Relaxed),
            quota_dropped_events: self.quota_dropped_events.load(Relaxed),
            quota_rejected_appends: self.quota_rejected_appends.load(Relaxed),
            quota_dropped_unforwarded_events: self.quota_dropped_unforwarded_events.load(Relaxed),
            disk_full_rejected_appends: self.disk_full_rejected_appends.load(Relaxed),
            compaction_passes: self.compaction_passes.load(Relaxed),
            compaction_records_removed: self.compaction_records_removed.load(Relaxed),
            compaction_bytes_reclaimed: self.compaction_bytes_reclaimed.load(Relaxed),
            transactions_open: self.txn_open.load(Relaxed),
            transactions_committed: self.txn_committed.load(Relaxed),
            transactions_aborted: self.txn_aborted.load(Relaxed),
            transactions_timed_out: self.txn_timed_out.load(Relaxed),
            transactions_fenced: self.txn_fenced.load(Relaxed),
        }
    }
}
