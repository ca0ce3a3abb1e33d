//! The tasks a manager of connectors or pipelines spawns, kept so that the
//! node can wait for them when it stops: each holds the log, and a node
//! started again in the same data directory finds it in use until the last
//! of them has ended.

use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinHandle;
use tributary_storage::util::lock;

/// Spawned tasks, the ended ones pruned at each spawn (so as many are kept
/// as run at once).
#[derive(Debug, Default)]
pub struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    /// Spawns `task` and keeps its handle.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.keep(tokio::spawn(task));
    }

    /// Keeps a task spawned elsewhere (one its owner may also wait for
    /// alone: it hands the handle over when it stops waiting).
    pub fn keep(&self, handle: JoinHandle<()>) {
        let mut held = lock(&self.0);
        held.retain(|h| !h.is_finished());
        held.push(handle);
    }

    /// Waits until every task spawned so far has ended (their cancellation
    /// is their owner's business: a node's shutdown token).
    pub async fn stopped(&self) {
        let held = std::mem::take(&mut *lock(&self.0));
        for h in held {
            let _ = h.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn stopped_waits_for_every_task_and_ended_ones_are_not_kept() {
        let tasks = Tasks::default();
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..3u64 {
            let done = done.clone();
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(20 * i)).await;
                done.fetch_add(1, SeqCst);
            });
        }
        tasks.stopped().await;
        assert_eq!(done.load(SeqCst), 3);
        tasks.spawn(async {});
        tokio::time::sleep(Duration::from_millis(20)).await;
        tasks.spawn(async {});
        assert_eq!(lock(&tasks.0).len(), 1, "the ended task is pruned");
    }
}
