//! The Prometheus text exposition format (version 0.0.4), written one way.

use std::fmt::{self, Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until a restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Prometheus text being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    /// An empty page.
    pub fn new() -> Self {
        Text {
            out: String::with_capacity(4096),
        }
    }

    /// Starts family `name`: its `# HELP` and `# TYPE` lines. Add samples to
    /// the returned [`Family`]; a family without samples is valid text.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.name()
        );
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Counter, help).sample(&[], value);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Gauge, help).sample(&[], value);
    }

    /// A histogram family from per-bucket (not yet cumulative) counts:
    /// `counts[i]` observations at most `bounds[i]`, and `counts[bounds.len()]`
    /// (when present) above every bound; `count` is the total.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
        count: u64,
    ) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in bounds.iter().zip(counts) {
            cumulative += n;
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum:.6}\n{name}_count {count}"
        );
    }

    /// The text written so far.
    pub fn as_str(&self) -> &str {
        &self.out
    }

    /// The finished page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The samples of one family.
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Family<'_> {
    /// Adds a sample with `labels` (name, value); values are escaped.
    pub fn sample(&mut self, labels: &[(&str, &dyn Display)], value: impl Display) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(label);
                self.out.push_str("=\"");
                let _ = write!(Escaped(self.out), "{v}");
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

/// Escapes a label value as the format requires: `\`, `"` and newline.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '\\' => self.0.push_str("\\\\"),
                '"' => self.0.push_str("\\\""),
                '\n' => self.0.push_str("\\n"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// A histogram over fixed bounds (seconds), counted with atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram over `bounds`, ascending.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records `n` observations that each took `took`.
    pub fn observe(&self, took: Duration, n: u64) {
        let s = took.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(n, Relaxed);
        self.micros
            .fetch_add((took.as_micros() as u64).saturating_mul(n), Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// Writes the histogram as family `name`.
    pub fn render(&self, out: &mut Text, name: &str, help: &str) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        out.histogram(
            name,
            help,
            self.bounds,
            &counts,
            self.micros.load(Relaxed) as f64 / 1e6,
            self.count.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut t = Text::new();
        t.counter("a_total", "As.", 3);
        t.family("b", Kind::Gauge, "Bs by topic.")
            .sample(&[("topic", &"x")], 1)
            .sample(&[("topic", &"q\"u\\o\nte"), ("partition", &2)], 5);
        assert_eq!(
            t.finish(),
            "# HELP a_total As.\n# TYPE a_total counter\na_total 3\n\
             # HELP b Bs by topic.\n# TYPE b gauge\nb{topic=\"x\"} 1\n\
             b{topic=\"q\\\"u\\\\o\\nte\",partition=\"2\"} 5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static BOUNDS: [f64; 2] = [0.001, 0.01];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_micros(500), 2);
        h.observe(Duration::from_millis(5), 1);
        h.observe(Duration::from_secs(1), 1);
        let mut t = Text::new();
        h.render(&mut t, "h_seconds", "H.");
        assert_eq!(
            t.finish(),
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{le=\"0.001\"} 2\nh_seconds_bucket{le=\"0.01\"} 3\n\
             h_seconds_bucket{le=\"+Inf\"} 4\nh_seconds_sum 1.006000\nh_seconds_count 4\n"
        );
    }
}
