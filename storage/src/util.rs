//! Small things every crate of ours needs, kept in one place: the wall
//! clock in the log's unit (milliseconds since the Unix epoch), a lock
//! that a panicked holder does not poison for everyone after it (a panic
//! ends only its connection's task, and the state it guarded stays usable),
//! and reconnect delays ([`backoff`]: the edge's links and the AMQP bridges).

pub mod backoff;

use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Locks `m`, taking the data over from a holder that panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
