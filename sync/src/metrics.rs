//! Prometheus text for both sides of the link.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A sample's type.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Counter,
    Gauge,
}

/// Appends unlabelled samples with their `# HELP` and `# TYPE` lines.
pub(crate) fn render(out: &mut String, samples: &[(Kind, &str, &str, u64)]) {
    for (kind, name, help, v) in samples {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

/// Appends a counter labelled by error code (a bounded set of names).
pub(crate) fn render_by_code(
    out: &mut String,
    name: &str,
    help: &str,
    counts: &BTreeMap<&'static str, u64>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (code, n) in counts {
        let _ = writeln!(out, "{name}{{code=\"{code}\"}} {n}");
    }
}
