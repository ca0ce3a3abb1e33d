//! The node's configuration: TOML file, then `TRIBUTARY_<SECTION>__<KEY>`
//! environment overrides, parsed once and validated in one pass that reports
//! every problem, naming the key (and the environment variable it came from).
//!
//! This file holds [`Config`], [`Mode`], [`Profile`], loading and the
//! environment overrides; the sections and their conversion into each crate's
//! settings are by concern:
//!
//! - `storage.rs`: `[storage]` and `[[topics]]`, the log's and sled's settings.
//! - `protocols.rs`: `[http]`, `[mqtt]`, `[amqp]` (and its bridges), `[tls]`
//!   and `[limits]`, the front ends' settings.
//! - `sync.rs`: `[upstream]` (edge) and `[sync]` (core), the sync link's settings.
//! - `auth.rs`: `[auth]`.
//! - `validate.rs`: the one validation pass.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod auth;
mod cluster;
mod protocols;
mod storage;
mod sync;
mod validate;

pub use auth::{AuthMode, AuthSection};
pub use cluster::ClusterSection;
pub use protocols::{
    AmqpSection, BridgeSection, GroupsSection, HttpSection, KafkaSection, LimitsSection,
    MqttSection, RouteSection, TlsSection,
};
pub use storage::{DurabilityMode, StorageSection, TopicSection};
pub use sync::{CompressionMode, SyncSection, UpstreamSection, UpstreamTopic};

/// Which role the node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A field gateway: auto-creates topics, forwards upstream (when configured).
    Edge,
    /// A central node receiving edges' streams.
    Core,
}

impl Mode {
    /// `edge` or `core`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Edge => "edge",
            Mode::Core => "core",
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace_ms: u64,
    /// The log.
    pub storage: StorageSection,
    /// The HTTP API.
    pub http: HttpSection,
    /// The MQTT front end.
    pub mqtt: MqttSection,
    /// The AMQP 0-9-1 front end and its bridges.
    pub amqp: AmqpSection,
    /// The Kafka wire-protocol front end.
    pub kafka: KafkaSection,
    /// Consumer groups (Kafka's group protocol).
    pub groups: GroupsSection,
    /// Topics declared up front (created at start if missing).
    pub topics: Vec<TopicSection>,
    /// Who may connect: anonymous access or device credentials.
    pub auth: AuthSection,
    /// Certificates for the TLS listeners (MQTT 8883, AMQP 5671, HTTPS 8443).
    pub tls: TlsSection,
    /// Edge: where to forward topics (store and forward).
    pub upstream: UpstreamSection,
    /// Core: how edges' streams are received at `/v1/sync`.
    pub sync: SyncSection,
    /// Core: this node as one of a replicated cluster.
    pub cluster: ClusterSection,
    /// Node-wide limits across every front end.
    pub limits: LimitsSection,
    /// Connectors (`[[connectors]]`: the JSON of `POST /v1/connectors`).
    pub connectors: Vec<serde_json::Value>,
    /// Pipelines (`[[pipelines]]`: `name`, `sql`, `paused`; the JSON of
    /// `POST /v1/pipelines`).
    pub pipelines: Vec<serde_json::Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./tributary-data"),
            shutdown_grace_ms: 10_000,
            storage: StorageSection::default(),
            http: HttpSection::default(),
            mqtt: MqttSection::default(),
            amqp: AmqpSection::default(),
            kafka: KafkaSection::default(),
            groups: GroupsSection::default(),
            topics: Vec::new(),
            auth: AuthSection::default(),
            tls: TlsSection::default(),
            upstream: UpstreamSection::default(),
            sync: SyncSection::default(),
            cluster: ClusterSection::default(),
            limits: LimitsSection::default(),
            connectors: Vec::new(),
            pipelines: Vec::new(),
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "TRIBUTARY_";

/// Maps an environment variable to a config key path, if it is one:
/// `TRIBUTARY_HTTP__LISTEN` → `http.listen`, `TRIBUTARY_DATA_DIR` → `data_dir`.
fn env_key(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains("__") {
        Some(rest.split("__").map(str::to_ascii_lowercase).collect())
    } else if matches!(rest, "DATA_DIR" | "SHUTDOWN_GRACE_MS") {
        Some(vec![rest.to_ascii_lowercase()])
    } else {
        None
    }
}

/// An environment value as TOML: numbers, booleans and arrays keep their type,
/// anything else is a string.
fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

impl Config {
    /// Reads the file (if any), applies overrides from `env`, and validates.
    pub fn load(
        profile: Profile,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigErrors(vec![format!(
                    "cannot read config file {}: {e}",
                    path.display()
                )])
            })?,
            None => String::new(),
        };
        Self::from_profile_parts(profile, &text, env)
    }

    /// Parses TOML text plus environment overrides over the default profile.
    pub fn from_parts(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        Self::from_profile_parts(Profile::Default, text, env)
    }

    /// Parses TOML text plus environment overrides, then validates.
    /// Parses a profile preset, then TOML text over it, then environment
    /// overrides over both, and validates the result.
    pub fn from_profile_parts(
        profile: Profile,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let file: toml::Table = text
            .parse()
            .map_err(|e| ConfigErrors(vec![format!("config file: {e}")]))?;
        let mut table: toml::Table = profile
            .preset()
            .parse()
            .map_err(|e| ConfigErrors(vec![format!("built-in profile: {e}")]))?;
        merge(&mut table, file);
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in env {
            let Some(path) = env_key(&name) else { continue };
            if path.iter().any(String::is_empty) {
                errors.push(format!(
                    "{name}: malformed variable name (empty key between `__`)"
                ));
                continue;
            }
            let joined = path.join(".");
            if let Err(e) = set_path(&mut table, &path, env_value(&raw)) {
                errors.push(format!("{name}: {e}"));
            }
            from_env.insert(joined, name);
        }
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> = {
            let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
            let de = serde_ignored::Deserializer::new(toml::Value::Table(table), &mut on_unknown);
            serde_path_to_error::deserialize(de)
        };
        for key in unknown {
            match from_env.get(&key) {
                Some(var) => errors.push(format!("unknown key `{key}` (from {var})")),
                None => errors.push(format!("unknown key `{key}`")),
            }
        }
        let config = match parsed {
            Ok(c) => Some(c),
            Err(e) => {
                let key = e.path().to_string();
                let via = from_env
                    .get(&key)
                    .map(|v| format!(" (from {v})"))
                    .unwrap_or_default();
                errors.push(format!("`{key}`{via}: {}", e.into_inner()));
                None
            }
        };
        if let Some(c) = &config {
            c.validate(&mut errors);
        }
        match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// Presets that sit under the config file and the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Profile {
    /// The defaults documented in the README.
    #[default]
    Default,
    /// Pi-class boards (1 GB of RAM or less): an 8 MiB sled cache, a smaller
    /// queue of pending appends, smaller bodies and events, fewer connections.
    Small,
}

impl Profile {
    /// The preset as TOML.
    pub fn preset(self) -> &'static str {
        match self {
            Profile::Default => "",
            Profile::Small => SMALL_PROFILE,
        }
    }
}

/// `--profile small`.
pub const SMALL_PROFILE: &str = r#"
[storage]
cache_capacity_bytes = 8388608
max_pending_bytes = 4194304
max_event_bytes = 262144

[http]
max_body_bytes = 2097152
max_connections = 128
max_fetch_records = 1000

[mqtt]
max_packet_bytes = 262144
max_connections = 1000
max_inflight = 256
max_sessions = 10000
max_retained = 10000

[amqp]
max_connections = 1000
max_channels = 64
max_message_bytes = 262144
max_content_bytes = 4194304
"#;

/// Deep-merges `over` into `base` (tables merge, everything else replaces).
/// A list of strings, given as a TOML array or as one comma-separated
/// string (how an environment variable gives it).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<String>),
        Commas(String),
    }
    Ok(match Given::deserialize(de)? {
        Given::List(l) => l,
        Given::Commas(s) => s
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{}` is not a section", path[..=i].join("."))),
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn small_profile_sits_under_file_and_env() {
        let c = Config::from_profile_parts(
            Profile::Small,
            "[storage]\nmax_pending_bytes = 8388608\n",
            env(&[("TRIBUTARY_HTTP__MAX_CONNECTIONS", "64")]),
        )
        .expect("valid");
        assert_eq!(
            c.storage.cache_capacity_bytes,
            8 * 1024 * 1024,
            "from the profile"
        );
        assert_eq!(
            c.storage.max_pending_bytes,
            8 * 1024 * 1024,
            "the file wins"
        );
        assert_eq!(c.http.max_connections, 64, "the environment wins");
        assert_eq!(c.http.max_body_bytes, 2 * 1024 * 1024);
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_parts("", env(&[])).expect("defaults are valid");
        assert_eq!(c.data_dir, PathBuf::from("./tributary-data"));
        assert_eq!(c.http.listen, "0.0.0.0:8080");
        assert_eq!(c.storage.durability, DurabilityMode::Fsync);
        assert!(c.log_config(Mode::Edge).auto_create_topics);
        assert!(!c.log_config(Mode::Core).auto_create_topics);
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let text = "[http]\nlisten = \"127.0.0.1:1\"\n";
        let c = Config::from_parts(
            text,
            env(&[
                ("TRIBUTARY_HTTP__LISTEN", "127.0.0.1:0"),
                ("TRIBUTARY_STORAGE__DEFAULT_PARTITIONS", "4"),
                ("TRIBUTARY_STORAGE__DURABILITY", "interval"),
                ("TRIBUTARY_DATA_DIR", "/tmp/x"),
                ("TRIBUTARY_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.http.listen, "127.0.0.1:0");
        assert_eq!(c.storage.default_partitions, 4);
        assert_eq!(c.storage.durability, DurabilityMode::Interval);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn every_unknown_key_is_named_at_once() {
        let text = "colour = 1\n[storage]\ndurabilty = \"fsync\"\n[http]\nlisten = \"0.0.0.0:8080\"\nport = 1\n";
        let err =
            Config::from_parts(text, env(&[("TRIBUTARY_HTTP__LISTN", "x")])).expect_err("invalid");
        let all = err.to_string();
        for needle in [
            "`colour`",
            "`storage.durabilty`",
            "`http.port`",
            "`http.listn` (from TRIBUTARY_HTTP__LISTN)",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
    }

    #[test]
    fn type_errors_name_the_key_and_variable() {
        let err = Config::from_parts("", env(&[("TRIBUTARY_STORAGE__DURABILITY", "sometimes")]))
            .expect_err("invalid");
        let all = err.to_string();
        assert!(
            all.contains("storage.durability") && all.contains("TRIBUTARY_STORAGE__DURABILITY"),
            "{all}"
        );
    }
}
