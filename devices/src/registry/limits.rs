//! Limits: the delay a source address waits after failed logins (admin token
//! included, in every auth mode) and the per-device rate limits.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Registry;
use crate::auth::{Identity, ADMIN};
use crate::throttle::Bucket;

impl Registry {
    /// Counts a wrong admin token from `peer` as a failed login of that
    /// address (in every auth mode).
    pub fn admin_failure(&self, peer: Option<SocketAddr>) {
        *self
            .counters
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(("admin", "bad_credentials"))
            .or_default() += 1;
        if let Some(p) = peer {
            self.failures.failed(p.ip());
        }
    }

    /// How long the answer to an admin-token check from `peer` waits (in
    /// every auth mode; `ok`: the token was right).
    pub fn admin_delay(&self, peer: Option<SocketAddr>, ok: bool) -> Duration {
        self.delay_for(peer, ok.then_some(ADMIN))
    }

    /// The delay for `peer` (see
    /// [`Authenticator::login_delay`](crate::auth::Authenticator::login_delay));
    /// remembers a success of `device`.
    pub(super) fn delay_for(&self, peer: Option<SocketAddr>, device: Option<&str>) -> Duration {
        let Some(ip) = peer.map(|p| p.ip()) else {
            return Duration::ZERO;
        };
        let delay = self.failures.delay(ip);
        if delay.is_zero() {
            // Nothing to exempt from: successes are remembered only for
            // sources that are slowed, so a fleet of good logins costs nothing.
            return delay;
        }
        if let Some(d) = device {
            if self.recent.recent(ip, d) {
                return Duration::ZERO;
            }
            self.recent.succeeded(ip, d);
        }
        self.counters.delayed.fetch_add(1, Relaxed);
        delay
    }

    pub(super) fn limit(
        &self,
        who: &Identity,
        f: impl FnOnce(&mut Bucket) -> Duration,
    ) -> Duration {
        if !self.enforce {
            return Duration::ZERO;
        }
        let Some(entry) = self.entry(&who.id) else {
            return Duration::ZERO;
        };
        let Some(bucket) = &entry.bucket else {
            return Duration::ZERO;
        };
        let wait = f(&mut bucket.lock().unwrap_or_else(|e| e.into_inner()));
        if !wait.is_zero() {
            self.counters.limited.fetch_add(1, Relaxed);
        }
        wait
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{creds, enforcing, open};
    use super::super::NewDevice;
    use super::*;
    use crate::auth::{Authenticator, Credentials};

    #[tokio::test]
    async fn failed_logins_slow_their_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        let (_, token) = reg
            .add(NewDevice {
                id: "legit".into(),
                ..NewDevice::default()
            })
            .await
            .unwrap();
        let guesser: SocketAddr = "10.9.9.9:1".parse().unwrap();
        let from = |user, pass| Credentials {
            peer: Some(guesser),
            ..creds(user, pass)
        };
        // Presenting nothing is refused but never counted.
        for _ in 0..20 {
            assert!(reg.authenticate(&from(None, None)).is_err());
        }
        assert_eq!(reg.login_delay(Some(guesser), None), Duration::ZERO);
        for _ in 0..6 {
            assert!(reg.authenticate(&from(Some("x"), Some("y"))).is_err());
        }
        assert!(reg.login_delay(Some(guesser), None) >= Duration::from_millis(100));
        let other: SocketAddr = "10.9.9.8:1".parse().unwrap();
        assert_eq!(reg.login_delay(Some(other), None), Duration::ZERO);
        // A success from the slowed source waits once (a hit answers no
        // faster than a miss), then that device is let through at once.
        let who = reg
            .authenticate(&from(Some("legit"), Some(&token)))
            .unwrap();
        assert!(reg.login_delay(Some(guesser), Some(&who)) >= Duration::from_millis(100));
        assert_eq!(reg.login_delay(Some(guesser), Some(&who)), Duration::ZERO);
        // The guesses still count: the source stays slowed for others.
        assert!(reg.login_delay(Some(guesser), None) >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn rate_limit_asks_to_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, reg) = open(dir.path(), enforcing()).await;
        reg.add(NewDevice {
            id: "slow".into(),
            rate_limit: Some(5),
            ..NewDevice::default()
        })
        .await
        .unwrap();
        let who = Identity::new("slow");
        assert_eq!(reg.admit(&who, 5), Duration::ZERO);
        assert_eq!(reg.admit(&who, 5), Duration::ZERO);
        assert!(reg.admit(&who, 1) > Duration::ZERO);
        // Unlimited devices never wait.
        assert_eq!(
            reg.admit(&Identity::new("other"), 1_000_000),
            Duration::ZERO
        );
    }
}
