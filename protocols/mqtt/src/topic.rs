//! MQTT topic names and filters, and how they map onto log topics and keys
//! (and back: the MQTT topic of a stored record, [`record_topic`]). The
//! headers and the event a PUBLISH becomes are in [`super::mapping`].
//!
//! Default mapping (`docs/contract.md`, section 4): `a/b/c` → log topic `a`,
//! key `a/b/c`, header `mqtt.topic`. `[[mqtt.routes]]` map a filter to another log topic and a key
//! template; the first matching route wins. Topics whose first level is no
//! log topic name go to `mqtt.default_topic` (key: the whole MQTT topic),
//! `$SYS/...` is the node's own (not in the log; see `super::sys`).

use tributary_storage::topic::validate_name;

use crate::Error;

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= 65_535
}

pub use tributary_devices::acl::{matches, overlap, valid_filter};
pub use tributary_ingest::mapping::record_topic;

/// Topics under `$SYS/` are the node's own statistics.
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// One `[[mqtt.routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Topic filter the route applies to.
    pub filter: String,
    /// Log topic the messages go to.
    pub topic: String,
    /// Key template: `{topic}` is the whole MQTT topic, `{N}` its level N
    /// (0-based). Default `{topic}`.
    pub key: String,
}

impl Route {
    /// Checks the route; an [`Error::Config`] whose message names what is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        if !valid_filter(&self.filter) {
            return Err(Error::Config(format!(
                "route filter `{}` is not a valid MQTT filter",
                self.filter
            )));
        }
        validate_name(&self.topic).map_err(|e| Error::Config(e.to_string()))?;
        let mut rest = self.key.as_str();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err(Error::Config(format!(
                    "route key `{}` has an unclosed `{{`",
                    self.key
                )));
            };
            let name = &rest[open + 1..open + close];
            if name != "topic" && name.parse::<usize>().is_err() {
                return Err(Error::Config(format!(
                    "route key `{}`: `{{{name}}}` is neither {{topic}} nor a level number",
                    self.key
                )));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(())
    }

    fn key_for(&self, topic: &str) -> String {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = String::with_capacity(self.key.len() + topic.len());
        let mut rest = self.key.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let name = &rest[open + 1..open + close];
            if name == "topic" {
                out.push_str(topic);
            } else if let Some(l) = name.parse::<usize>().ok().and_then(|i| levels.get(i)) {
                out.push_str(l);
            }
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// The router: routes in config order, then the default mapping.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
    /// Where topics whose first level is no log topic name go.
    default_topic: String,
}

impl Router {
    /// A router over validated routes and a valid default log topic.
    pub fn new(routes: Vec<Route>, default_topic: String) -> Self {
        Router {
            routes,
            default_topic,
        }
    }

    /// Log topic and key for a published MQTT topic: the first route that
    /// matches; else the first level, when it is a valid log topic name;
    /// else the default topic. The key is the whole MQTT topic unless a
    /// route's template says otherwise.
    pub fn target(&self, topic: &str) -> (String, String) {
        if let Some(r) = self.routes.iter().find(|r| matches(topic, &r.filter)) {
            return (r.topic.clone(), r.key_for(topic));
        }
        let first = topic.split('/').next().unwrap_or_default();
        if validate_name(first).is_ok() {
            (first.to_owned(), topic.to_owned())
        } else {
            (self.default_topic.clone(), topic.to_owned())
        }
    }

    /// Log topics a filter must tail; `None` means every topic.
    pub fn sources(&self, filter: &str) -> Option<Vec<String>> {
        let first = filter.split('/').next().unwrap_or_default();
        if first == "+" || first == "#" {
            return None;
        }
        let mut out: Vec<String> = Vec::new();
        if first == "$SYS" {
            // The node's statistics are not in the log (see `sys.rs`).
        } else if validate_name(first).is_ok() {
            out.push(first.to_owned());
        } else {
            out.push(self.default_topic.clone());
        }
        for r in &self.routes {
            if overlap(filter, &r.filter) && !out.contains(&r.topic) {
                out.push(r.topic.clone());
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_matching_follow_the_spec() {
        for f in ["a", "a/+/c", "#", "+", "a/#", "+/+", "/", "a//b"] {
            assert!(valid_filter(f), "{f}");
        }
        for f in ["", "a/#/b", "a+", "a/b#", "#/a", "a\0"] {
            assert!(!valid_filter(f), "{f}");
        }
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"), "# also matches the parent level");
        assert!(!matches("a/b", "a/+/c"));
        assert!(matches("a/b", "+/+"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
        assert!(matches("/x", "+/x"), "an empty level is a level");
        assert!(!valid_name("a/+"));
        assert!(!valid_name(""));
    }

    #[test]
    fn overlap_is_symmetric_and_exact_enough() {
        for (a, b, want) in [
            ("a/+/c", "a/b/#", true),
            ("a/+", "b/+", false),
            ("#", "x/y", true),
            ("a/b", "a/b/c", false),
            ("+/b", "a/+", true),
        ] {
            assert_eq!(overlap(a, b), want, "{a} {b}");
            assert_eq!(overlap(b, a), want, "{b} {a}");
        }
    }

    #[test]
    fn routes_map_to_topics_and_key_templates() {
        let r = Router::new(
            vec![Route {
                filter: "factory/+/+/temp".into(),
                topic: "temps".into(),
                key: "{1}-{2}".into(),
            }],
            "mqtt".into(),
        );
        let t = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            r.target("factory/north/line3/temp"),
            t("temps", "north-line3")
        );
        assert_eq!(
            r.target("factory/north/line3/rpm"),
            t("factory", "factory/north/line3/rpm")
        );
        // Every other MQTT topic name lands in the default topic, keyed by itself.
        for name in [
            "bad topic/x",
            "/x",
            "$SYSTEM/x",
            "Café/temp",
            "$share",
            "a b",
        ] {
            assert_eq!(r.target(name), t("mqtt", name));
        }
        assert_eq!(r.sources("/leading/#"), Some(vec!["mqtt".into()]));
        assert_eq!(r.sources("$SYS/#"), Some(vec![]));
        assert_eq!(
            r.sources("factory/+/+/temp"),
            Some(vec!["factory".into(), "temps".into()])
        );
        assert_eq!(r.sources("factory/a/b/rpm"), Some(vec!["factory".into()]));
        assert_eq!(r.sources("+/x"), None);
        for bad in [
            Route {
                filter: "a/#/b".into(),
                topic: "t".into(),
                key: "{topic}".into(),
            },
            Route {
                filter: "a".into(),
                topic: "bad name".into(),
                key: "{topic}".into(),
            },
            Route {
                filter: "a".into(),
                topic: "t".into(),
                key: "{x}".into(),
            },
            Route {
                filter: "a".into(),
                topic: "t".into(),
                key: "{1".into(),
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_from_other_protocols_get_an_mqtt_topic() {}
}
