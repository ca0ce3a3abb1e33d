//! Prometheus figures both sides of the link write, through the node's one
//! writer ([`Text`]).

use std::collections::BTreeMap;

use tributary_telemetry::{Kind, Text};

/// Writes unlabelled samples, each a family of its own.
pub(crate) fn render(out: &mut Text, samples: &[(Kind, &str, &str, u64)]) {
    for (kind, name, help, v) in samples {
        out.family(name, *kind, help).sample(&[], v);
    }
}

/// Writes a counter labelled by error code (a bounded set of names).
pub(crate) fn render_by_code(
    out: &mut Text,
    name: &str,
    help: &str,
    counts: &BTreeMap<&'static str, u64>,
) {
    let mut family = out.family(name, Kind::Counter, help);
    for (code, n) in counts {
        family.sample(&[("code", code)], n);
    }
}
