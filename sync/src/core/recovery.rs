//! The core's sync state in the log's metadata and its recovery: the keys
//! and format of the per-edge and per-stream checkpoints, and
//! [`SyncCore::open`], which loads them and completes each stream's held
//! ranges from the records' origin headers (what the last checkpoint before
//! a crash did not cover).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tributary_devices::auth::Authenticator;
use tributary_storage::{Error as LogError, Log, MetaEntry};

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

impl SyncCore {
    /// Loads the sync state from the log's metadata and completes it from
    /// the log itself (see the module docs).
    pub async fn open(
        log: Log,
        auth: Arc<dyn Authenticator>,
        config: CoreConfig,
    ) -> Result<SyncCore, Error> {
        let scan_log = log.clone();
        let (edges, checkpoints) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let log = scan_log;
            let mut edges: HashMap<String, EdgeState> = HashMap::new();
            for (key, value) in log.meta(META_SPACE)? {
                let corrupt = |detail: String| Error::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail,
                };
                if let Some(edge) = key.strip_prefix(b"e/") {
                    let m: EdgeMeta =
                        postcard::from_bytes(&value).map_err(|e| corrupt(e.to_string()))?;
                    let edge = String::from_utf8_lossy(edge).into_owned();
                    edges.entry(edge).or_default().instance = m.instance;
                } else if let Some((edge, topic, p)) = parse_stream_key(&key) {
                    let m: StreamMeta =
                        postcard::from_bytes(&value).map_err(|e| corrupt(e.to_string()))?;
                    let stream = Stream {
                        held: RangeSet::from_ranges(m.held),
                        core_partition: m.core_partition,
                        scan_from: m.scan_from,
                        ..Stream::default()
                    };
                    edges.entry(edge).or_default().streams.insert((topic, p), stream);
                }
            }
            let mut checkpoints = Vec::new();
            for (edge, st) in &mut edges {
                for ((topic, p), s) in &mut st.streams {
                    let before = s.held.clone();
                    recover_stream(&log, edge, topic, *p, s)?;
                    if s.held != before {
                        tracing::info!(%edge, %topic, partition = p, "sync: completed a checkpoint from the log after a crash");
                    }
                    checkpoints.push(checkpoint(edge, topic, *p, s));
                }
            }
            Ok((edges, checkpoints))
        })
        .await
        .map_err(|e| Error::Log(LogError::Io(std::io::Error::other(e.to_string()))))??;
        if !checkpoints.is_empty() {
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
            }),
        })
    }
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
