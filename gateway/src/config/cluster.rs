//! `[cluster]`: this core as one node of a replicated core cluster, and its
//! conversion into the cluster crate's
//! [`ClusterConfig`](tributary_cluster::ClusterConfig).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::Config;

/// `[cluster]` (core only). Absent (no `peers`): a single core.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClusterSection {
    /// This node's id, one of `peers`.
    pub node_id: u64,
    /// Node-to-node address (`host:port`).
    pub listen: String,
    /// Every voter, this node included: `["1@host:port", …]` (env: one
    /// comma-separated string).
    #[serde(deserialize_with = "super::list_or_commas")]
    pub peers: Vec<String>,
    /// The leader's heartbeat period.
    pub heartbeat_ms: u64,
    /// Election timeout: a follower that heard no leader for 1.5 times it
    /// (the leader's lease), plus this to 1.5 times it again, starts an
    /// election.
    pub election_timeout_ms: u64,
    /// A write not acknowledged by a majority within this long fails.
    pub write_timeout_ms: u64,
    /// Join a running cluster instead of forming one with `peers`: the
    /// node waits until a voter adds it (`tributary cluster add`). Its
    /// `peers` name itself and the nodes it can reach.
    pub join: bool,
    /// Mutual TLS between nodes with the `[tls]` files: `cert`/`key` are
    /// this node's (serverAuth and clientAuth, its address among the
    /// names), `client_ca` the CA that signed every node's.
    pub tls: bool,
    /// A snapshot of the log is taken once the entries applied since the
    /// last one add up to this many bytes, or to half the log's stored
    /// bytes if that is more; the Raft log is then cut back to
    /// `snapshot_keep` entries before it. A node further behind, or wiped,
    /// installs the snapshot.
    pub snapshot_min_bytes: u64,
    /// Entries kept in the Raft log before the last snapshot.
    pub snapshot_keep: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            node_id: 0,
            listen: "0.0.0.0:9190".into(),
            peers: Vec::new(),
            heartbeat_ms: 50,
            election_timeout_ms: 250,
            write_timeout_ms: 10_000,
            join: false,
            tls: false,
            snapshot_min_bytes: 64 << 20,
            snapshot_keep: 1_000,
        }
    }
}

impl Config {
    /// Is this node one of a cluster?
    pub fn clustered(&self) -> bool {
        !self.cluster.peers.is_empty()
    }

    /// The peers as id → address; every problem, naming the key.
    fn cluster_peers(&self) -> Result<BTreeMap<u64, String>, Vec<String>> {
        let mut peers = BTreeMap::new();
        let mut errors = Vec::new();
        for p in &self.cluster.peers {
            match p.split_once('@') {
                Some((id, addr)) if !addr.is_empty() => match id.trim().parse::<u64>() {
                    Ok(id) if id > 0 => {
                        if peers.insert(id, addr.trim().to_owned()).is_some() {
                            errors.push(format!("`cluster.peers`: node {id} is listed twice"));
                        }
                    }
                    _ => errors.push(format!(
                        "`cluster.peers`: `{p}`: the id before @ must be a number from 1"
                    )),
                },
                _ => errors.push(format!("`cluster.peers`: `{p}` is not ID@HOST:PORT")),
            }
        }
        if errors.is_empty() {
            Ok(peers)
        } else {
            Err(errors)
        }
    }

    /// Checks `[cluster]`.
    pub(super) fn validate_cluster(&self, errors: &mut Vec<String>) {
        if !self.clustered() {
            return;
        }
        match self.cluster_peers() {
            Ok(peers) if !peers.contains_key(&self.cluster.node_id) => errors.push(format!(
                "`cluster.node_id` ({}) must be one of `cluster.peers`",
                self.cluster.node_id
            )),
            Ok(_) => {}
            Err(e) => errors.extend(e),
        }
        let c = &self.cluster;
        if c.heartbeat_ms == 0 || c.election_timeout_ms <= c.heartbeat_ms * 2 {
            errors.push(
                "`cluster.heartbeat_ms` must be positive and `cluster.election_timeout_ms` more than twice it"
                    .into(),
            );
        }
        if c.write_timeout_ms < c.election_timeout_ms {
            errors.push(
                "`cluster.write_timeout_ms` must be at least `cluster.election_timeout_ms`".into(),
            );
        }
        if c.snapshot_min_bytes < 1024 {
            errors.push("`cluster.snapshot_min_bytes` must be at least 1024".into());
        }
        if c.tls
            && (self.tls.cert.is_none() || self.tls.key.is_none() || self.tls.client_ca.is_none())
        {
            errors.push(
                "`cluster.tls` needs `tls.cert` and `tls.key` (this node's certificate) and `tls.client_ca` (the CA that signed every node's)".into(),
            );
        }
    }

    /// The files of TLS between nodes (when `cluster.tls` is on and valid).
    pub fn cluster_tls_files(&self) -> Option<tributary_frontend::tls::TlsFiles> {
        let t = &self.tls;
        match (self.cluster.tls, &t.cert, &t.key, &t.client_ca) {
            (true, Some(cert), Some(key), Some(ca)) => Some(tributary_frontend::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: Some(ca.clone()),
                require_client_cert: true,
            }),
            _ => None,
        }
    }

    /// The cluster node's settings (when [`Config::clustered`]).
    pub fn cluster_config(&self) -> tributary_cluster::ClusterConfig {
        let c = &self.cluster;
        tributary_cluster::ClusterConfig {
            node_id: c.node_id,
            listen: c.listen.clone(),
            peers: self.cluster_peers().unwrap_or_default(),
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            election_timeout: Duration::from_millis(c.election_timeout_ms),
            write_timeout: Duration::from_millis(c.write_timeout_ms),
            join: c.join,
            tls: None,
            snapshot_min_bytes: c.snapshot_min_bytes,
            snapshot_keep: c.snapshot_keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::env;
    use super::*;

    #[test]
    fn cluster_settings_come_from_the_file_or_the_environment_and_are_checked() {
        let c = Config::from_parts(
            "",
            env(&[
                ("TRIBUTARY_CLUSTER__NODE_ID", "2"),
                ("TRIBUTARY_CLUSTER__LISTEN", "127.0.0.1:9002"),
                (
                    "TRIBUTARY_CLUSTER__PEERS",
                    "1@127.0.0.1:9001,2@127.0.0.1:9002, 3@127.0.0.1:9003",
                ),
            ]),
        )
        .expect("valid");
        assert!(c.clustered());
        let cc = c.cluster_config();
        assert_eq!(cc.node_id, 2);
        assert_eq!(cc.peers.len(), 3);
        assert_eq!(cc.peers[&3], "127.0.0.1:9003");
        assert!(!Config::default().clustered());
        let err = Config::from_parts(
            "[cluster]\nnode_id = 4\npeers = [\"1@a:1\", \"x@b:2\", \"3\"]\nheartbeat_ms = 600\n",
            env(&[]),
        )
        .expect_err("invalid")
        .to_string();
        for needle in ["`x@b:2`", "`3`", "cluster.heartbeat_ms"] {
            assert!(err.contains(needle), "missing {needle} in:\n{err}");
        }
    }
}
