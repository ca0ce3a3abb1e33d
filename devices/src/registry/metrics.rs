//! Metrics: the login, refusal, delay and rate-limit counters, and their
//! Prometheus text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use tributary_telemetry::{Kind, MetricsSource, Text};

use super::Registry;

/// Login outcomes, per protocol and result.
#[derive(Debug, Default)]
pub(super) struct AuthCounters {
    pub(super) logins: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub(super) delayed: AtomicU64,
    pub(super) denied: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) limited: AtomicU64,
}

impl MetricsSource for Registry {
    fn render(&self, out: &mut Text) {
        let c = &self.counters;
        let logins = c.logins.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut family = out.family(
            "tributary_auth_logins_total",
            Kind::Counter,
            "Logins by protocol and result.",
        );
        for ((protocol, result), n) in logins {
            family.sample(&[("protocol", &protocol), ("result", &result)], n);
        }
        let denied = c.denied.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut family = out.family(
            "tributary_auth_denied_total",
            Kind::Counter,
            "Publishes and subscriptions refused by an ACL, by action.",
        );
        for (action, n) in denied {
            family.sample(&[("action", &action)], n);
        }
        out.counter(
            "tributary_auth_delayed_logins_total",
            "Logins delayed because their address failed recently.",
            c.delayed.load(Relaxed),
        );
        out.counter(
            "tributary_auth_rate_limited_total",
            "Publishes held back by a device's rate limit.",
            c.limited.load(Relaxed),
        );
        out.gauge(
            "tributary_auth_failure_addresses",
            "Source addresses with recent failed logins (bounded).",
            self.failures.len(),
        );
        out.gauge(
            "tributary_devices",
            "Registered devices.",
            self.read().by_id.len(),
        );
    }
}
