//! Metrics: the login, refusal, delay and rate-limit counters, and their
//! Prometheus text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use super::Registry;

/// Login outcomes, per protocol and result.
#[derive(Debug, Default)]
pub(super) struct AuthCounters {
    pub(super) logins: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub(super) delayed: AtomicU64,
    pub(super) denied: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) limited: AtomicU64,
}

impl Registry {
    /// Prometheus text of the login counters.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP tributary_auth_logins_total Logins by protocol and result.\n");
        out.push_str("# TYPE tributary_auth_logins_total counter\n");
        let logins = self
            .counters
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for ((protocol, result), n) in logins.iter() {
            let _ = writeln!(
                out,
                "tributary_auth_logins_total{{protocol=\"{protocol}\",result=\"{result}\"}} {n}"
            );
        }
        drop(logins);
        out.push_str("# HELP tributary_auth_denied_total Publishes and subscriptions refused by an ACL, by action.\n");
        out.push_str("# TYPE tributary_auth_denied_total counter\n");
        let denied = self
            .counters
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (action, n) in denied.iter() {
            let _ = writeln!(
                out,
                "tributary_auth_denied_total{{action=\"{action}\"}} {n}"
            );
        }
        drop(denied);
        let _ = writeln!(
            out,
            "# HELP tributary_auth_delayed_logins_total Logins delayed because their address failed recently.\n# TYPE tributary_auth_delayed_logins_total counter\ntributary_auth_delayed_logins_total {}",
            self.counters.delayed.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tributary_auth_rate_limited_total Publishes held back by a device's rate limit.\n# TYPE tributary_auth_rate_limited_total counter\ntributary_auth_rate_limited_total {}",
            self.counters.limited.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tributary_auth_failure_addresses Source addresses with recent failed logins (bounded).\n# TYPE tributary_auth_failure_addresses gauge\ntributary_auth_failure_addresses {}",
            self.failures.len()
        );
        let _ = writeln!(
            out,
            "# HELP tributary_devices Registered devices.\n# TYPE tributary_devices gauge\ntributary_devices {}",
            self.read().by_id.len()
        );
    }
}
