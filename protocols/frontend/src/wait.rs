//! Waiting on what may not be there, for the connection loops' `select!`s:
//! an optional deadline, the oldest of a queue of tasks.

use std::collections::VecDeque;

use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

/// Sleeps until `deadline`; without one, never wakes.
pub async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The result of the oldest task in `tasks` (left in the queue: the caller
/// pops it once this answers); with none, never answers.
pub async fn oldest<T>(tasks: &mut VecDeque<JoinHandle<T>>) -> Result<T, JoinError> {
    match tasks.front_mut() {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}
