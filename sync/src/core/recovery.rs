//! The core's sync state in the log's metadata and its recovery: the keys
//! and format of the per-edge and per-stream checkpoints, and
//! [`SyncCore::open`], which loads them and completes each stream's held
//! ranges from the records' origin headers (what the last checkpoint before
//! a crash did not cover).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tributary_devices::auth::Authenticator;
use tributary_storage::{Error as LogError, Guard, Log, MetaEntry};

use super::stats::CoreMetrics;
use super::{CoreConfig, CoreInner, EdgeSlot, EdgeState, Stream, SyncCore, META_SPACE};
use crate::ranges::RangeSet;
use crate::wire::{HEADER_EDGE, HEADER_OFFSET, HEADER_PARTITION};
use crate::Error;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EdgeMeta {
    pub(super) instance: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StreamMeta {
    held: Vec<(u64, u64)>,
    core_partition: u32,
    /// Core offset from which records may be newer than `held`.
    scan_from: u64,
}

pub(super) fn edge_key(edge: &str) -> Vec<u8> {
    [b"e/", edge.as_bytes()].concat()
}

pub(super) fn stream_key(edge: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = [b"s/", edge.as_bytes(), b"\0", topic.as_bytes(), b"\0"].concat();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn parse_stream_key(key: &[u8]) -> Option<(String, String, u32)> {
    let rest = key.strip_prefix(b"s/")?;
    let mut parts = rest.splitn(3, |&b| b == 0);
    let edge = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let topic = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let p: [u8; 4] = parts.next()?.try_into().ok()?;
    Some((edge, topic, u32::from_be_bytes(p)))
}

/// The edge offset a stored record came from, if it came from `edge`'s
/// `partition`.
fn origin(headers: &[(String, Vec<u8>)], edge: &str, partition: u32) -> Option<u64> {
    // The core's own headers come last (a record may carry older ones).
    let get = |name: &str| {
        headers
            .iter()
            .rfind(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    if get(HEADER_EDGE)? != edge.as_bytes() {
        return None;
    }
    let p: u32 = std::str::from_utf8(get(HEADER_PARTITION)?)
        .ok()?
        .parse()
        .ok()?;
    if p != partition {
        return None;
    }
    std::str::from_utf8(get(HEADER_OFFSET)?).ok()?.parse().ok()
}

/// Adds to `stream` the edge offsets named by the records of its core
/// partition from `scan_from` on (what the last checkpoint did not cover).
fn recover_stream(
    log: &Log,
    edge: &str,
    topic: &str,
    partition: u32,
    s: &mut Stream,
) -> Result<(), LogError> {
    let (start, end) = match log.offsets(topic, s.core_partition) {
        Ok(r) => r,
        Err(LogError::UnknownTopic(_) | LogError::UnknownPartition { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut at = s.scan_from.clamp(start, end);
    let mut run: Option<(u64, u64)> = None;
    while at < end {
        let page = log.read(topic, s.core_partition, at, 4096, 4 << 20)?;
        for r in &page.records {
            if let Some(o) = origin(&r.headers, edge, partition) {
                run = match run {
                    Some((a, b)) if b == o => Some((a, o + 1)),
                    Some((a, b)) => {
                        s.held.insert(a, b);
                        Some((o, o + 1))
                    }
                    None => Some((o, o + 1)),
                };
            }
        }
        if page.next_offset <= at {
            break;
        }
        at = page.next_offset;
    }
    if let Some((a, b)) = run {
        s.held.insert(a, b);
    }
    s.scan_from = end;
    Ok(())
}

/// Every edge's state (or `only` this edge's) as the log holds it: the
/// checkpoints in its metadata, completed from the records' origin
/// headers. Also answers the completed checkpoints. Blocking (it reads).
fn load(
    log: &Log,
    only: Option<&str>,
) -> Result<(HashMap<String, EdgeState>, Vec<MetaEntry>), Error> {
    let mut edges: HashMap<String, EdgeState> = HashMap::new();
    let entries = match only {
        None => log.meta(META_SPACE)?,
        // One edge's keys only: `e/EDGE`, and `s/EDGE NUL …`.
        Some(edge) => {
            let key = edge_key(edge);
            let mut own: Vec<(Vec<u8>, Vec<u8>)> = log
                .meta_get(META_SPACE, &key)?
                .map(|v| (key, v))
                .into_iter()
                .collect();
            let from = [b"s/", edge.as_bytes(), b"\0"].concat();
            let to = [b"s/", edge.as_bytes(), b"\x01"].concat();
            own.extend(log.meta_range(META_SPACE, &from, &to)?);
            own
        }
    };
    for (key, value) in entries {
        let corrupt = |detail: String| Error::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            detail,
        };
        if let Some(edge) = key.strip_prefix(b"e/") {
            let edge = String::from_utf8_lossy(edge).into_owned();
            if only.is_some_and(|o| o != edge) {
                continue;
            }
            let m: EdgeMeta = postcard::from_bytes(&value).map_err(|e| corrupt(e.to_string()))?;
            edges.entry(edge).or_default().instance = m.instance;
        } else if let Some((edge, topic, p)) = parse_stream_key(&key) {
            if only.is_some_and(|o| o != edge) {
                continue;
            }
            let m: StreamMeta = postcard::from_bytes(&value).map_err(|e| corrupt(e.to_string()))?;
            let stream = Stream {
                held: RangeSet::from_ranges(m.held),
                core_partition: m.core_partition,
                scan_from: m.scan_from,
                ..Stream::default()
            };
            edges
                .entry(edge)
                .or_default()
                .streams
                .insert((topic, p), stream);
        }
    }
    let mut checkpoints = Vec::new();
    for (edge, st) in &mut edges {
        for ((topic, p), s) in &mut st.streams {
            let before = s.held.clone();
            recover_stream(log, edge, topic, *p, s)?;
            if s.held != before && only.is_none() {
                tracing::info!(%edge, %topic, partition = p, "sync: completed a checkpoint from the log after a crash");
            }
            checkpoints.push(checkpoint(edge, topic, *p, s));
        }
    }
    Ok((edges, checkpoints))
}

fn blocking_failed(e: tokio::task::JoinError) -> Error {
    Error::Log(LogError::Io(std::io::Error::other(e.to_string())))
}

impl SyncCore {
    /// Loads the sync state from the log's metadata and completes it from
    /// the log itself (see the module docs).
    pub async fn open(
        log: Log,
        auth: Arc<dyn Authenticator>,
        config: CoreConfig,
    ) -> Result<SyncCore, Error> {
        let scan_log = log.clone();
        let (edges, checkpoints) = tokio::task::spawn_blocking(move || load(&scan_log, None))
            .await
            .map_err(blocking_failed)??;
        // In a cluster each connection reloads its edge's state when it
        // claims it, so nothing needs writing here (and a write at start
        // would wait for a leader).
        if !checkpoints.is_empty() && !log.is_replicated() {
            log.put_meta(META_SPACE, checkpoints).await?;
        }
        let edges = edges
            .into_iter()
            .map(|(id, state)| {
                let slot = EdgeSlot {
                    state: Mutex::new(state),
                    ..EdgeSlot::default()
                };
                (id, Arc::new(slot))
            })
            .collect();
        Ok(SyncCore {
            inner: Arc::new(CoreInner {
                log,
                auth,
                config,
                edges: Mutex::new(edges),
                metrics: CoreMetrics::default(),
                claim_prefix: claim_prefix(),
                claims: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }
}

impl SyncCore {
    /// Claims `edge`'s streams for the connection now taking them, and (in
    /// a cluster) reloads the edge's state from the log. The claim is a
    /// write in the log's one order: once it is applied here, this node's
    /// log holds every write of the edge's earlier connections that will
    /// ever be written (on any node), and any of them ordered after the
    /// claim is refused ([`LogError::Superseded`]). So the held ranges
    /// loaded now are exactly what the log holds for the edge, and stay so
    /// while this connection appends under the claim.
    pub(super) async fn claim(&self, edge: &str, slot: &EdgeSlot) -> Result<Guard, Error> {
        let core = &self.inner;
        let mut value = core.claim_prefix.clone();
        value.extend_from_slice(
            &core
                .claims
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_be_bytes(),
        );
        let guard = Guard {
            space: META_SPACE.to_owned(),
            key: claim_key(edge),
            value,
        };
        core.log.claim(&guard).await?;
        if core.log.is_replicated() {
            // Another node may have taken this edge's writes since this one
            // last did: its memory is stale, the log is not.
            let log = core.log.clone();
            let only = edge.to_owned();
            let (mut loaded, _) = tokio::task::spawn_blocking(move || load(&log, Some(&only)))
                .await
                .map_err(blocking_failed)??;
            let fresh = loaded.remove(edge).unwrap_or_default();
            let mut st = super::lock(&slot.state);
            st.instance = fresh.instance;
            let mut streams = fresh.streams;
            for (k, s) in &mut streams {
                if let Some(old) = st.streams.get(k) {
                    s.received = old.received;
                    s.edge_end = old.edge_end;
                }
            }
            st.streams = streams;
        }
        Ok(guard)
    }
}

/// What makes this process's claims unlike any other's (on any node, before
/// or after a restart): a hash with a random key of the time and the pid.
fn claim_prefix() -> Vec<u8> {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().to_be_bytes().to_vec()
}

/// The key of an edge's claim ([`SyncCore::claim`]).
pub(super) fn claim_key(edge: &str) -> Vec<u8> {
    [b"c/", edge.as_bytes()].concat()
}

pub(super) fn checkpoint(edge: &str, topic: &str, partition: u32, s: &Stream) -> MetaEntry {
    let m = StreamMeta {
        held: s.held.ranges().to_vec(),
        core_partition: s.core_partition,
        scan_from: s.scan_from,
    };
    (
        stream_key(edge, topic, partition),
        Some(postcard::to_allocvec(&m).unwrap_or_default()),
    )
}
