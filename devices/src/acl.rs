//! ACL patterns: MQTT-style filters (`+` one level, `#` the rest) over a
//! subject. Subjects are MQTT topic names for MQTT, and `topic` or
//! `topic/key` for AMQP, HTTP and WebSockets (README, "Devices").

/// A valid ACL pattern: an MQTT filter of at most 1,024 bytes.
pub fn valid_pattern(pattern: &str) -> bool {
    pattern.len() <= 1024 && valid_filter(pattern)
}

/// An MQTT topic filter: non-empty, `+` alone in its level, `#` alone and
/// last, no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Does the name `topic` match `filter`? Filters starting with a wildcard do
/// not match names starting with `$` (MQTT-4.7.2-1).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Could one topic match both filters?
pub fn overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does `pattern` allow everything `filter` can match? A name is a filter
/// without wildcards, so this also answers "may publish to this name".
pub fn covers(pattern: &str, filter: &str) -> bool {
    if filter.starts_with('$') && (pattern.starts_with('+') || pattern.starts_with('#')) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            // `a/#` also matches `a` itself.
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(pl), Some(fl)) if pl == fl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_checked() {
        assert!(valid_pattern("sensors/#"));
        assert!(valid_pattern("+/temp"));
        assert!(valid_pattern("#"));
        assert!(!valid_pattern(""));
        assert!(!valid_pattern("a/#/b"));
        assert!(!valid_pattern("a/b+"));
        assert!(!valid_pattern("a\0"));
    }

    #[test]
    fn names_match_filters() {
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(matches("a/b", "a/+"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(!matches("$SYS/x", "#"));
        assert!(matches("$SYS/x", "$SYS/#"));
    }

    #[test]
    fn covering() {
        // Names.
        assert!(covers("sensors/#", "sensors"));
        assert!(covers("sensors/#", "sensors/t1/temp"));
        assert!(covers("sensors/+/temp", "sensors/t1/temp"));
        assert!(!covers("sensors/+/temp", "sensors/t1/hum"));
        assert!(!covers("sensors", "sensors/t1"));
        assert!(covers("sensors", "sensors"));
        // Filters.
        assert!(covers("sensors/#", "sensors/#"));
        assert!(covers("sensors/#", "sensors/+/temp"));
        assert!(covers("#", "anything/#"));
        assert!(covers("+/temp", "+/temp"));
        assert!(!covers("sensors/+", "sensors/#"));
        assert!(!covers("sensors/t1", "sensors/+"));
        assert!(!covers("sensors/+/temp", "sensors/#"));
        assert!(!covers("a/b", "a/b/#"));
        // `$` names are not covered by leading wildcards.
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn covers_agrees_with_matches_on_names() {
        let patterns = ["#", "a/#", "a/+", "a/+/c", "+/b/#", "a", "a/b/c", "+"];
        let names = ["a", "a/b", "a/b/c", "x/b/c", "x/b", "a/x/c", "b"];
        for p in patterns {
            for n in names {
                assert_eq!(covers(p, n), matches(n, p), "{p} vs {n}");
            }
        }
    }
}
