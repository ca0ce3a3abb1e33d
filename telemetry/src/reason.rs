//! Typed reasons: why one area refused or lost something, counted and logged
//! in one call.

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::marker::PhantomData;
use std::sync::{Mutex, PoisonError};

use tracing::Level;

use crate::Text;

/// Why an area refused, closed or dropped something. One enum per area; each
/// variant has a bounded label (the `reason` of the area's counter) and a
/// level it is logged at: `DEBUG` for what a client did wrong (a flood of bad
/// clients must not flood the log), `WARN` for what the node could not do.
pub trait Reason: Copy + fmt::Debug + Send + Sync + 'static {
    /// The area, logged as the `area` field (`mqtt`, `amqp`, `ws`, `sync`).
    const AREA: &'static str;

    /// The bounded label: the `reason` of the area's counter.
    fn label(self) -> &'static str;

    /// How loudly it is logged.
    fn level(self) -> Level {
        Level::DEBUG
    }
}

/// Counts of an area's reasons, each also logged when counted.
pub struct Reasons<R: Reason> {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    _reason: PhantomData<R>,
}

impl<R: Reason> Default for Reasons<R> {
    fn default() -> Self {
        Reasons {
            counts: Mutex::new(BTreeMap::new()),
            _reason: PhantomData,
        }
    }
}

impl<R: Reason> fmt::Debug for Reasons<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reasons").field("area", &R::AREA).finish()
    }
}

impl<R: Reason> Reasons<R> {
    /// Counts one `reason` and logs it.
    pub fn record(&self, reason: R) {
        self.count(reason);
        log(reason.level(), R::AREA, reason.label(), None);
    }

    /// Counts one `reason` and logs it with what went wrong.
    pub fn record_with(&self, reason: R, detail: &dyn Display) {
        self.count(reason);
        log(reason.level(), R::AREA, reason.label(), Some(detail));
    }

    fn count(&self, reason: R) {
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason.label())
            .or_insert(0) += 1;
    }

    /// How many times the reason labelled `label` was counted.
    pub fn get(&self, label: &str) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(label)
            .copied()
            .unwrap_or(0)
    }

    /// Writes the counts as counter family `name{reason=...}`.
    pub fn render(&self, out: &mut Text, name: &str, help: &str) {
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut family = out.family(name, crate::Kind::Counter, help);
        for (reason, n) in counts {
            family.sample(&[("reason", &reason)], n);
        }
    }
}

/// One log line at a level chosen at run time (tracing's macros want it fixed).
fn log(level: Level, area: &'static str, reason: &'static str, detail: Option<&dyn Display>) {
    macro_rules! at {
        ($level:expr) => {
            match detail {
                Some(d) => tracing::event!($level, area, reason, detail = %d),
                None => tracing::event!($level, area, reason),
            }
        };
    }
    if level == Level::ERROR {
        at!(Level::ERROR)
    } else if level == Level::WARN {
        at!(Level::WARN)
    } else if level == Level::INFO {
        at!(Level::INFO)
    } else if level == Level::DEBUG {
        at!(Level::DEBUG)
    } else {
        at!(Level::TRACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Why {
        Bad,
        Broken,
    }

    impl Reason for Why {
        const AREA: &'static str = "test";
        fn label(self) -> &'static str {
            match self {
                Why::Bad => "bad",
                Why::Broken => "broken",
            }
        }
        fn level(self) -> Level {
            match self {
                Why::Bad => Level::DEBUG,
                Why::Broken => Level::WARN,
            }
        }
    }

    #[test]
    fn counts_by_label_and_renders_them() {
        let r = Reasons::<Why>::default();
        r.record(Why::Bad);
        r.record(Why::Bad);
        r.record_with(Why::Broken, &"disk gone");
        assert_eq!((r.get("bad"), r.get("broken"), r.get("other")), (2, 1, 0));
        let mut t = Text::new();
        r.render(&mut t, "x_total", "Xs.");
        assert_eq!(
            t.finish(),
            "# HELP x_total Xs.\n# TYPE x_total counter\n\
             x_total{reason=\"bad\"} 2\nx_total{reason=\"broken\"} 1\n"
        );
    }
}
