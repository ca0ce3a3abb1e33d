//! The node's memory budget for bytes in flight from peers.
//!
//! Every front end holds a peer's partially received request, message or
//! frame in memory until it is whole: an HTTP body, an AMQP message's content,
//! a large MQTT packet, a WebSocket message. Per-connection limits do not bound
//! the sum (a thousand connections each holding almost 8 MiB), so all of them
//! draw from one budget, `limits.max_buffered_bytes`, before they buffer.
//! When it is spent, a reader waits a little (backpressure); if no room comes,
//! the newest request is refused with its protocol's own code. The budget is
//! never exceeded: bytes are reserved before they are read into memory.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The shared budget (cheap to clone).
#[derive(Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    permits: Arc<Semaphore>,
    total: usize,
    refused: AtomicU64,
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("total", &self.inner.total)
            .field("available", &self.available())
            .finish()
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget::new(DEFAULT_MAX_BUFFERED_BYTES)
    }
}

/// 64 MiB: sized for a Pi-class board.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;

/// How long a reader waits for room before its request is refused.
pub const WAIT_FOR_ROOM: Duration = Duration::from_secs(2);

/// Bytes held from the budget; given back when dropped.
#[derive(Debug)]
pub struct Reserved {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Reserved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Nothing held (for requests with no body).
    pub fn none() -> Reserved {
        Reserved {
            _permit: None,
            bytes: 0,
        }
    }

    /// Takes `other`'s bytes into this reservation.
    pub fn merge(&mut self, other: Reserved) {
        match (&mut self._permit, other._permit) {
            (Some(p), Some(o)) => p.merge(o),
            (slot @ None, o) => *slot = o,
            (Some(_), None) => {}
        }
        self.bytes += other.bytes;
    }
}

impl MemoryBudget {
    /// A budget of `total` bytes (at most u32::MAX).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, u32::MAX as usize);
        MemoryBudget {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(total)),
                total,
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// The configured size.
    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// Requests refused because the budget was spent.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Relaxed)
    }

    /// Reserves `bytes` now, or `None` (counted as refused).
    pub fn try_reserve(&self, bytes: usize) -> Option<Reserved> {
        if bytes == 0 {
            return Some(Reserved::none());
        }
        let r = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.inner.permits.clone().try_acquire_many_owned(n).ok());
        match r {
            Some(p) => Some(Reserved {
                _permit: Some(p),
                bytes,
            }),
            None => {
                self.inner.refused.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Reserves `bytes`, waiting up to `wait` for room (backpressure), or
    /// `None` (counted as refused). More than the whole budget is refused at once.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Option<Reserved> {
        if bytes == 0 {
            return Some(Reserved::none());
        }
        let Some(n) = u32::try_from(bytes)
            .ok()
            .filter(|&n| n as usize <= self.inner.total)
        else {
            self.inner.refused.fetch_add(1, Relaxed);
            return None;
        };
        let acquire = self.inner.permits.clone().acquire_many_owned(n);
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(p)) => Some(Reserved {
                _permit: Some(p),
                bytes,
            }),
            _ => {
                self.inner.refused.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reservations_never_exceed_the_budget_and_come_back() {
        let b = MemoryBudget::new(1000);
        let a = b.try_reserve(600).expect("room");
        assert!(b.try_reserve(500).is_none(), "600 + 500 > 1000");
        assert_eq!(b.refused(), 1);
        let mut c = b.try_reserve(400).expect("exactly full");
        assert_eq!(b.available(), 0);
        // A waiting reader gets room when another lets go...
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(300, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        drop(a);
        let w = waiter.await.expect("task").expect("room came");
        assert_eq!(w.bytes(), 300);
        // ...and gives up after the wait.
        assert!(b.reserve(400, Duration::from_secs(1)).await.is_none());
        assert!(
            b.reserve(2000, Duration::from_secs(1)).await.is_none(),
            "more than all"
        );
        c.merge(w);
        assert_eq!(c.bytes(), 700);
        drop(c);
        assert_eq!(b.available(), 1000);
    }
}
