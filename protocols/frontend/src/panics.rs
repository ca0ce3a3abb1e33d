//! Containing a bug to the connection it hit.
//!
//! The release build unwinds (`panic = "unwind"`): every connection runs in a
//! task of its own, so a panic ends that task, which closes that connection, and
//! tokio keeps every other task running. [`install_hook`] replaces the default
//! hook (which writes to stderr, and would panic again if stderr failed) with one
//! that logs through tracing and counts into [`count`], shown in `/metrics` as
//! `tributary_panics_total`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Panics caught since start.
pub fn count() -> u64 {
    PANICS.load(Relaxed)
}

/// Logs and counts every panic from now on (idempotent enough: the last
/// installed hook wins, and each counts once).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Relaxed);
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            %message,
            %location,
            thread = thread.name().unwrap_or("unnamed"),
            "a task panicked: its connection is closed, the node keeps serving"
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_counted_and_the_runtime_goes_on() {
        install_hook();
        let before = count();
        let task = tokio::spawn(async {
            let v: Vec<u8> = Vec::new();
            // An out-of-bounds index: a bug, as a peer might trigger one.
            v[std::hint::black_box(3)]
        });
        assert!(task.await.expect_err("panicked").is_panic());
        assert!(count() > before);
        let ok = tokio::spawn(async { 7 }).await.expect("other tasks run");
        assert_eq!(ok, 7);
        let _ = std::panic::take_hook();
    }
}
