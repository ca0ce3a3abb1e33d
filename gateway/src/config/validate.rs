//! The one validation pass over a parsed [`Config`]: every section's ranges,
//! listener addresses and port clashes, the limits that must cover each other,
//! the AMQP bridges, MQTT routes, upstream and declared topics. Every problem
//! is collected, none stops the pass.

use std::net::SocketAddr;

use super::protocols::bridge_config;
use super::{Config, DurabilityMode};

impl Config {
    /// The `[[connectors]]`, parsed (the invalid ones are left out; the
    /// validation names them).
    #[cfg(feature = "connectors")]
    pub fn connector_configs(&self) -> Vec<tributary_connectors::ConnectorConfig> {
        self.connectors
            .iter()
            .filter_map(|c| tributary_connectors::ConnectorConfig::from_json(c.clone()).ok())
            .collect()
    }

    #[cfg(not(feature = "connectors"))]
    fn validate_connectors(&self, errors: &mut Vec<String>) {
        if !self.connectors.is_empty() {
            errors.push(
                "`connectors`: this build has no connectors (cargo feature `connectors`)".into(),
            );
        }
    }

    #[cfg(feature = "connectors")]
    fn validate_connectors(&self, errors: &mut Vec<String>) {
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.connectors.iter().enumerate() {
            match tributary_connectors::ConnectorConfig::from_json(c.clone()) {
                Ok(c) if !names.insert(c.name.clone()) => {
                    errors.push(format!(
                        "`connectors[{i}]`: a second connector named `{}`",
                        c.name
                    ));
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("`connectors[{i}]`: {e}")),
            }
        }
    }

    /// The `[[pipelines]]`, parsed (the invalid ones are left out; the
    /// validation names them).
    #[cfg(feature = "processing")]
    pub fn pipeline_configs(&self) -> Vec<tributary_processing::manager::PipelineConfig> {
        self.pipelines
            .iter()
            .filter_map(|c| serde_json::from_value(c.clone()).ok())
            .collect()
    }

    #[cfg(not(feature = "processing"))]
    fn validate_pipelines(&self, errors: &mut Vec<String>) {
        if !self.pipelines.is_empty() {
            errors.push(
                "`pipelines`: this build has no stream processing (cargo feature `processing`)"
                    .into(),
            );
        }
    }

    #[cfg(feature = "processing")]
    fn validate_pipelines(&self, errors: &mut Vec<String>) {
        use tributary_processing::manager::{check, PipelineConfig};
        if self.pipelines.len() > self.limits.max_pipelines {
            errors.push(format!(
                "`pipelines`: {} pipelines, over `limits.max_pipelines` ({})",
                self.pipelines.len(),
                self.limits.max_pipelines
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.pipelines.iter().enumerate() {
            match serde_json::from_value::<PipelineConfig>(c.clone()) {
                Ok(c) if !names.insert(c.name.clone()) => {
                    errors.push(format!(
                        "`pipelines[{i}]`: a second pipeline named `{}`",
                        c.name
                    ));
                }
                Ok(c) => {
                    if let Err(e) = check(&c) {
                        errors.push(format!("`pipelines[{i}]` (`{}`): {e}", c.name));
                    }
                }
                Err(e) => errors.push(format!("`pipelines[{i}]`: {e}")),
            }
        }
    }

    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        self.validate_connectors(errors);
        self.validate_pipelines(errors);
        self.validate_cluster(errors);
        let s = &self.storage;
        if self.data_dir.as_os_str().is_empty() {
            errors.push("`data_dir` must not be empty".into());
        }
        if s.durability == DurabilityMode::Interval && s.flush_interval_ms == 0 {
            errors.push("`storage.flush_interval_ms` must be positive".into());
        }
        if !s.segment_size_bytes.is_power_of_two() || s.segment_size_bytes < 65536 {
            errors.push(format!(
                "`storage.segment_size_bytes` must be a power of two ≥ 65536, got {}",
                s.segment_size_bytes
            ));
        }
        if s.cache_capacity_bytes < 1024 * 1024 {
            errors.push(format!(
                "`storage.cache_capacity_bytes` must be at least 1048576, got {}",
                s.cache_capacity_bytes
            ));
        }
        if s.max_pending_bytes < 65536 || s.max_pending_bytes > u32::MAX as usize {
            errors.push(format!(
                "`storage.max_pending_bytes` must be 65536..=4294967295, got {}",
                s.max_pending_bytes
            ));
        }
        if s.retention_check_ms == 0 {
            errors.push("`storage.retention_check_ms` must be positive".into());
        }
        if s.max_producer_states == 0 {
            errors.push("`storage.max_producer_states` must be positive".into());
        }
        if let Err(e) = self.topic_defaults().config("defaults").validate() {
            errors.push(format!("`storage` topic defaults: {e}"));
        }
        let h = &self.http;
        let mut listeners: Vec<(&str, SocketAddr)> = Vec::new();
        match h.listen.parse::<SocketAddr>() {
            Ok(a) => listeners.push(("http.listen", a)),
            Err(_) => errors.push(format!(
                "`http.listen`: `{}` is not an address like 0.0.0.0:8080",
                h.listen
            )),
        }
        let m = &self.mqtt;
        if m.enabled {
            match m.listen.parse::<SocketAddr>() {
                Ok(a) => listeners.push(("mqtt.listen", a)),
                Err(_) => errors.push(format!(
                    "`mqtt.listen`: `{}` is not an address like 0.0.0.0:1883",
                    m.listen
                )),
            }
        }
        if m.max_packet_bytes < 1024 || m.max_packet_bytes > 256 * 1024 * 1024 {
            errors.push(format!(
                "`mqtt.max_packet_bytes` must be 1024..=268435456, got {}",
                m.max_packet_bytes
            ));
        }
        for (key, v) in [
            ("mqtt.max_connections", m.max_connections),
            ("mqtt.max_inflight", usize::from(m.max_inflight)),
            ("mqtt.max_sessions", m.max_sessions),
            ("mqtt.connect_timeout_ms", m.connect_timeout_ms as usize),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        let k = &self.kafka;
        if k.enabled {
            match k.listen.parse::<SocketAddr>() {
                Ok(addr) => listeners.push(("kafka.listen", addr)),
                Err(_) => errors.push(format!(
                    "`kafka.listen`: `{}` is not an address like 0.0.0.0:9092",
                    k.listen
                )),
            }
        }
        for (key, v) in [
            ("kafka.max_connections", k.max_connections as u64),
            ("kafka.max_in_flight", k.max_in_flight as u64),
            ("kafka.max_fetch_bytes", k.max_fetch_bytes as u64),
            (
                "kafka.max_transactional_ids",
                k.max_transactional_ids as u64,
            ),
            (
                "kafka.transactional_id_expiration_ms",
                k.transactional_id_expiration_ms,
            ),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        if !(1024..=1 << 30).contains(&k.max_request_bytes) {
            errors.push(format!(
                "`kafka.max_request_bytes` must be 1024..=1073741824, got {}",
                k.max_request_bytes
            ));
        }
        let g = &self.groups;
        if g.min_session_timeout_ms == 0 || g.min_session_timeout_ms > g.max_session_timeout_ms {
            errors.push(format!(
                "`groups.min_session_timeout_ms` must be positive and at most \
                 `groups.max_session_timeout_ms`, got {} and {}",
                g.min_session_timeout_ms, g.max_session_timeout_ms
            ));
        }
        for (key, v) in [
            ("groups.max_members", g.max_members as u64),
            ("groups.max_state_bytes", g.max_state_bytes as u64),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        let a = &self.amqp;
        if a.enabled {
            match a.listen.parse::<SocketAddr>() {
                Ok(addr) => listeners.push(("amqp.listen", addr)),
                Err(_) => errors.push(format!(
                    "`amqp.listen`: `{}` is not an address like 0.0.0.0:5672",
                    a.listen
                )),
            }
        }
        if !(4096..=1024 * 1024).contains(&a.frame_max) {
            errors.push(format!(
                "`amqp.frame_max` must be 4096..=1048576, got {}",
                a.frame_max
            ));
        }
        for (key, v) in [
            ("amqp.max_connections", a.max_connections as u64),
            ("amqp.max_channels", u64::from(a.max_channels)),
            ("amqp.handshake_timeout_ms", a.handshake_timeout_ms),
            ("amqp.max_message_bytes", a.max_message_bytes),
            ("amqp.max_pending_appends", a.max_pending_appends as u64),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        if a.max_content_bytes < a.max_message_bytes {
            errors.push(format!(
                "`amqp.max_content_bytes` ({}) must be at least `amqp.max_message_bytes` ({})",
                a.max_content_bytes, a.max_message_bytes
            ));
        }
        let mut bridge_names = std::collections::HashSet::new();
        for (i, b) in a.bridges.iter().enumerate() {
            if let Err(e) = bridge_config(b) {
                errors.push(format!("`amqp.bridges[{i}]`: {e}"));
            }
            if !bridge_names.insert(b.name.as_str()) {
                errors.push(format!(
                    "`amqp.bridges[{i}]`: the name `{}` is used twice",
                    b.name
                ));
            }
        }
        for (i, r) in self.mqtt_routes().iter().enumerate() {
            if let Err(e) = r.validate() {
                errors.push(format!("`mqtt.routes[{i}]`: {e}"));
            }
        }
        if let Err(e) = tributary_storage::topic::validate_name(&self.mqtt.default_topic) {
            errors.push(format!("`mqtt.default_topic`: {e}"));
        }
        if !matches!(self.mqtt.shared_policy.as_str(), "round_robin" | "sticky") {
            errors.push(format!(
                "`mqtt.shared_policy` must be \"round_robin\" or \"sticky\", got {:?}",
                self.mqtt.shared_policy
            ));
        }
        let t = &self.tls;
        if t.cert.is_some() != t.key.is_some() {
            errors.push("`tls.cert` and `tls.key` go together: set both or neither".into());
        }
        if t.require_client_cert && t.client_ca.is_none() {
            errors.push("`tls.require_client_cert` needs `tls.client_ca`".into());
        }
        if t.reload_check_ms == 0 {
            errors.push("`tls.reload_check_ms` must be positive".into());
        }
        if self.tls_enabled() {
            let tls_listeners = [
                ("http.tls_listen", &self.http.tls_listen, true),
                ("mqtt.tls_listen", &self.mqtt.tls_listen, self.mqtt.enabled),
                ("amqp.tls_listen", &self.amqp.tls_listen, self.amqp.enabled),
            ];
            for (key, value, on) in tls_listeners {
                if !on || value.is_empty() {
                    continue;
                }
                match value.parse::<SocketAddr>() {
                    Ok(a) => listeners.push((key, a)),
                    Err(_) => errors.push(format!("`{key}`: `{value}` is not an address")),
                }
            }
        }
        if self
            .auth
            .admin_token
            .as_deref()
            .is_some_and(|t| t.len() < 16)
        {
            errors.push("`auth.admin_token` must be at least 16 characters".into());
        }
        if s.max_disk_bytes > 0 && s.max_disk_bytes < 4 * s.max_event_bytes as u64 {
            errors.push(format!(
                "`storage.max_disk_bytes` ({}) must be 0 (no quota) or at least 4 × `storage.max_event_bytes` ({})",
                s.max_disk_bytes,
                4 * s.max_event_bytes
            ));
        }
        if self.auth.token_key.as_deref().is_some_and(|k| k.len() < 16) {
            errors.push("`auth.token_key` must be at least 16 characters (changing it invalidates every device token)".into());
        }
        for (i, (ka, a)) in listeners.iter().enumerate() {
            for (kb, b) in &listeners[i + 1..] {
                if a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
                {
                    errors.push(format!("`{ka}` and `{kb}` both use port {}", a.port()));
                }
            }
        }
        if h.max_connections == 0 {
            errors.push("`http.max_connections` must be positive".into());
        }
        if h.max_fetch_records == 0 {
            errors.push("`http.max_fetch_records` must be positive".into());
        }
        for (key, v) in [
            ("http.request_head_timeout_ms", h.request_head_timeout_ms),
            ("http.request_timeout_ms", h.request_timeout_ms),
            ("http.idle_timeout_ms", h.idle_timeout_ms),
        ] {
            if v == 0 {
                errors.push(format!("`{key}` must be positive"));
            }
        }
        for (key, largest) in [
            ("http.max_body_bytes", h.max_body_bytes as u64),
            ("http.ws_max_message_bytes", h.ws_max_message_bytes as u64),
            ("mqtt.max_packet_bytes", self.mqtt.max_packet_bytes as u64),
            ("amqp.max_message_bytes", self.amqp.max_message_bytes),
        ] {
            if (self.limits.max_buffered_bytes as u64) < largest {
                errors.push(format!(
                    "`limits.max_buffered_bytes` ({}) must be at least `{key}` ({largest}), or the largest of those can never be read",
                    self.limits.max_buffered_bytes
                ));
            }
        }
        if h.max_body_bytes < s.max_event_bytes {
            errors.push(format!(
                "`http.max_body_bytes` ({}) must be at least `storage.max_event_bytes` ({}), or the largest events cannot be sent",
                h.max_body_bytes, s.max_event_bytes
            ));
        }
        if self.forwards() {
            errors.extend(self.upstream_config().validate());
            if s.durability == DurabilityMode::Interval {
                // Interval mode shows events before they are fsynced: a power
                // loss could give offsets the core already holds to new events.
                errors.push("`upstream.url` needs `storage.durability = \"fsync\"`: an edge forwards only what is on its disk".into());
            }
        } else if !self.upstream.edge_id.is_empty() || !self.upstream.topics.is_empty() {
            errors.push(
                "`upstream.url` is empty: set it to forward to a core (ws://HOST:PORT/v1/sync)"
                    .into(),
            );
        }
        if self.sync.heartbeat_ms == 0 {
            errors.push("`sync.heartbeat_ms` must be positive".into());
        }
        if self.sync.max_batch_bytes < 64 * 1024 {
            errors.push("`sync.max_batch_bytes` must be at least 65536".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            if !seen.insert(t.name.as_str()) {
                errors.push(format!(
                    "`topics[{i}]`: topic `{}` is declared twice",
                    t.name
                ));
            }
            if let Err(e) = self.topic_config(t).validate() {
                errors.push(format!("`topics[{i}]` ({}): {e}", t.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::env;
    use super::*;

    #[test]
    fn validation_collects_every_problem() {
        let text = r#"
            [storage]
            segment_size_bytes = 1000
            max_event_bytes = 20000000
            [http]
            listen = "nowhere"
            [[topics]]
            name = "bad name"
            [[topics]]
            name = "ok"
            [[topics]]
            name = "ok"
        "#;
        let err = Config::from_parts(text, env(&[])).expect_err("invalid");
        let all = err.to_string();
        for needle in [
            "segment_size_bytes",
            "http.listen",
            "max_body_bytes",
            "topics[0]",
            "declared twice",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert!(err.0.len() >= 5, "{all}");
    }
}
