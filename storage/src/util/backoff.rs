//! Reconnect delays: exponential backoff with full jitter (AWS's "Exponential
//! Backoff And Jitter"): the n-th retry waits a uniformly random time in
//! `[0, min(max, min * 2^n)]`. Thousands of edges cut off by one core restart
//! spread their reconnects over the whole window instead of arriving in waves.
//! Used by the edge's links to the core and by the AMQP bridges.

use std::time::Duration;

/// Backoff state of one link.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Delays between `0` and `min * 2^n`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// With a fixed seed (tests).
    pub fn with_seed(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            rng: fastrand::Rng::with_seed(seed),
            ..Backoff::new(min, max)
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay (and one more attempt counted).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// After a connection that worked: start from the bottom again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(5), 1);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(*ceilings.last().unwrap_or(&0) as u64));
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(5),
            "no overflow after many attempts"
        );
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        // 1,000 edges retrying after the same outage: full jitter spreads them
        // evenly over [0, ceiling], not in a wave at the ceiling.
        let mut buckets = [0u32; 10];
        for seed in 0..1000 {
            let mut b = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(1), seed);
            let d = b.next_delay();
            buckets[(d.as_secs_f64() * 10.0).min(9.0) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (50..=150).contains(n),
                "bucket {i} has {n} of 1000: {buckets:?}"
            );
        }
    }
}
