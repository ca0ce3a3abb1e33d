//! Slowing down guessers and fast publishers, in bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures an address may make before its logins are delayed.
const FREE_FAILURES: u32 = 3;
/// The first delay; it doubles with each further failure.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest delay.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address that made no failed login for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The source a failure counts against: an IPv4 address (also when mapped
/// into IPv6), or an IPv6 /64 (one host usually holds a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let net = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(net.into())
            }
        },
    }
}

/// Recent failed logins per source address. At most `capacity` addresses are
/// remembered; when full, forgotten ones go first, then the quietest.
#[derive(Debug)]
pub struct FailureTable {
    capacity: usize,
    table: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl FailureTable {
    /// A table for at most `capacity` addresses.
    pub fn new(capacity: usize) -> Self {
        FailureTable {
            capacity: capacity.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// How long the next login from `ip` waits before it is checked.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let ip = source(ip);
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&ip) {
            Some(f) if f.count > FREE_FAILURES && f.last.elapsed() < FORGET_AFTER => {
                let doublings = (f.count - FREE_FAILURES - 1).min(16);
                (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
            }
            _ => Duration::ZERO,
        }
    }

    /// Records a failed login. A later success does not clear it (a guesser
    /// holding one valid token could reset its count): counts fade after
    /// [`FORGET_AFTER`] without failures.
    pub fn failed(&self, ip: IpAddr) {
        let ip = source(ip);
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.contains_key(&ip) && table.len() >= self.capacity {
            table.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if table.len() >= self.capacity {
                let quietest = table.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k);
                if let Some(k) = quietest {
                    table.remove(&k);
                }
            }
        }
        let f = table.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Nothing remembered?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Recent successful logins per (source, device), so a device that logs in
/// from an address is not slowed by another client's failures there. At
/// most `capacity` pairs; when full, the oldest goes.
#[derive(Debug)]
pub struct RecentLogins {
    capacity: usize,
    table: Mutex<HashMap<(IpAddr, String), Instant>>,
}

impl RecentLogins {
    /// A table for at most `capacity` pairs.
    pub fn new(capacity: usize) -> Self {
        RecentLogins {
            capacity: capacity.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers that `device` logged in from `ip`.
    pub fn succeeded(&self, ip: IpAddr, device: &str) {
        let now = Instant::now();
        let key = (source(ip), device.to_owned());
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.contains_key(&key) && table.len() >= self.capacity {
            table.retain(|_, t| now.duration_since(*t) < FORGET_AFTER);
            if table.len() >= self.capacity {
                let oldest = table
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    table.remove(&k);
                }
            }
        }
        table.insert(key, now);
    }

    /// Did `device` log in from `ip` within [`FORGET_AFTER`]?
    pub fn recent(&self, ip: IpAddr, device: &str) -> bool {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .get(&(source(ip), device.to_owned()))
            .is_some_and(|t| t.elapsed() < FORGET_AFTER)
    }
}

/// A token bucket of `rate` events per second with one second of burst.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Bucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// If the bucket is in debt, how long until it is not (nothing taken);
    /// otherwise takes `events` (possibly into debt) and returns zero. A batch
    /// larger than the burst is let through once and paid for afterwards.
    pub fn admit(&mut self, events: u32) -> Duration {
        self.refill();
        let debt = self.debt();
        if debt.is_zero() {
            self.tokens -= f64::from(events);
        }
        debt
    }
}

impl Bucket {
    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
    }

    fn debt(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate).max(Duration::from_millis(1))
        }
    }

    /// Takes `events` whatever the balance; returns how long until the
    /// bucket is out of debt.
    pub fn take(&mut self, events: u32) -> Duration {
        self.refill();
        self.tokens -= f64::from(events);
        self.debt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_free_failures_and_clear_on_success() {
        let t = FailureTable::new(8);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..FREE_FAILURES {
            t.failed(ip);
        }
        assert_eq!(t.delay(ip), Duration::ZERO);
        t.failed(ip);
        assert_eq!(t.delay(ip), FIRST_DELAY);
        t.failed(ip);
        assert_eq!(t.delay(ip), FIRST_DELAY * 2);
        for _ in 0..40 {
            t.failed(ip);
        }
        assert_eq!(t.delay(ip), MAX_DELAY);
        assert_eq!(t.delay("10.0.0.2".parse().expect("ip")), Duration::ZERO);
    }

    #[test]
    fn recent_logins_are_bounded() {
        let r = RecentLogins::new(4);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        r.succeeded(ip, "a");
        assert!(r.recent(ip, "a"));
        assert!(!r.recent(ip, "b"));
        for d in ["b", "c", "d", "e"] {
            r.succeeded(ip, d);
        }
        assert!(!r.recent(ip, "a"), "the oldest pair goes first");
        assert!(r.recent(ip, "e"));
    }

    #[test]
    fn ipv6_counts_per_64() {
        let t = FailureTable::new(8);
        for i in 0..=FREE_FAILURES {
            t.failed(format!("2001:db8:0:1::{i:x}").parse().expect("ip"));
        }
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.delay("2001:db8:0:1::ffff".parse().expect("ip")),
            FIRST_DELAY
        );
        assert_eq!(
            t.delay("2001:db8:0:2::1".parse().expect("ip")),
            Duration::ZERO
        );
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().expect("ip");
        t.failed(mapped);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn table_is_bounded() {
        let t = FailureTable::new(16);
        for i in 0..10_000u32 {
            t.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(t.len(), 16);
        // The newest address is remembered.
        let newest = IpAddr::from(9_999u32.to_be_bytes());
        for _ in 0..FREE_FAILURES {
            t.failed(newest);
        }
        assert!(t.delay(newest) > Duration::ZERO);
    }

    #[test]
    fn bucket_lets_a_burst_through_then_asks_to_wait() {
        let mut b = Bucket::new(10);
        assert_eq!(b.admit(10), Duration::ZERO);
        // Empty but not in debt: taken, now in debt.
        assert_eq!(b.admit(5), Duration::ZERO);
        let wait = b.admit(1);
        assert!(
            wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Refusals take nothing: the wait does not grow.
        let again = b.admit(1);
        assert!(again <= wait);
    }

    #[test]
    fn take_paces_a_stream() {
        let mut b = Bucket::new(100);
        assert_eq!(b.take(100), Duration::ZERO);
        let wait = b.take(50);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Taking goes on into debt.
        assert!(b.take(50) > wait);
    }
}
