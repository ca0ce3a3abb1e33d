//! WebSocket endpoints (`docs/contract.md`, section 6):
//!
//! - `/v1/topics/{topic}/publish`: each client message is a record (a text
//!   message is JSON as in the HTTP API; a binary message is a raw value). Each
//!   is answered, in order, with `{"partition","offset"}` once durable, or with
//!   `{"error":{"code","message"}}`. Clients may pipeline: the messages that
//!   are ready when the server reads become one append, and appends in flight
//!   are bounded, so a fast producer is slowed, never buffered without bound.
//! - `/v1/topics/{topic}/live?from=earliest|latest|OFFSET` or
//!   `?offsets=P:O,...`: every record of every partition, in order per
//!   partition, as the fetch API renders it (`partition` and `offset` on each,
//!   so a client resumes after a reconnect). A slow client is served from the
//!   log in batches and only lags in offsets; one that falls behind retention
//!   gets `{"gap":{"partition","from","to"}}`.
//!
//! Close codes: 1008 policy (credentials or rights refused), 1009 message too
//! big, 1003 unsupported data (bad messages that keep coming), 1011 internal
//! (the log cannot write). Unknown topics are refused before the upgrade with the
//! HTTP API's 404 (on an edge, publish creates the topic like HTTP produce).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tributary_storage::util::lock;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tributary_storage::{AppendRecord, Error as LogError, Event, Position};

use super::auth::{self, refused_publish, Caller};
use super::error::ApiError;
use super::records::{Format, ProduceRecord, RecordOut};
use super::AppState;
use tributary_devices::auth::{Action, Identity};
use tributary_frontend::listener::ReadHold;
use tributary_ingest as ingest;

/// Close codes.
pub mod close {
    /// Policy violation: refused credentials or an ACL denial.
    pub const POLICY: u16 = 1008;
    /// A message over `ws_max_message_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// Unsupported data: bad messages kept coming.
    pub const UNSUPPORTED: u16 = 1003;
    /// The server cannot go on (the log cannot write).
    pub const INTERNAL: u16 = 1011;
}

/// Messages read into one batch at most.
const BATCH_MESSAGES: usize = 1024;
/// Bytes of records read into one batch at most (one message may exceed it).
const BATCH_BYTES: usize = 1024 * 1024;
/// Bytes of queued batches one append takes at most.
const MERGE_BYTES: usize = 4 * 1024 * 1024;
/// Batches queued between the stages of one connection (each bounded above).
const PIPELINE: usize = 4;
/// A peer that takes none of our bytes for this long is dropped.
const SEND_STALL: Duration = Duration::from_secs(60);
/// Consecutive bad messages before the connection is closed with 1003.
const MAX_BAD_IN_A_ROW: u32 = 16;
/// Largest message a live client may send (it only answers pings and closes).
const LIVE_CLIENT_BYTES: usize = 4096;
/// Records (and bytes) one live read takes from one partition.
const LIVE_RECORDS: usize = 1000;
const LIVE_BYTES: usize = 1024 * 1024;
/// Ping period; a peer silent for three periods is dropped.
const PING_EVERY: Duration = Duration::from_secs(20);

/// Rendered records a topic's partitions share among its live tails, most
/// recent last: N dashboards on one topic decode and render each record once,
/// and a tail that is caught up is served from memory. Bounded per partition;
/// dropped when the topic's last tail leaves.
#[derive(Debug, Default)]
pub struct TailCache {
    topics: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<TopicTail>>>,
}

/// Records kept per partition.
const RING_RECORDS: usize = 4096;
/// Bytes kept per partition.
const RING_BYTES: usize = 4 * 1024 * 1024;

/// One topic's shared rings, one per partition.
#[derive(Debug)]
pub struct TopicTail {
    rings: Vec<std::sync::Mutex<Ring>>,
    /// One tail at a time reads the log into a partition's ring; the others
    /// wait for it and take the result from the ring (no thundering herd).
    fill: Vec<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Ring {
    /// The first offset the ring covers.
    start: u64,
    /// One past the last offset it covers: `start..end` was read, and every
    /// record in it is in `msgs` (a compacted partition has gaps, so records
    /// carry their offsets).
    end: u64,
    msgs: std::collections::VecDeque<(u64, Utf8Bytes)>,
    bytes: usize,
}

/// Rendered records and where the next read starts (past any gap).
#[derive(Debug, PartialEq)]
struct Page {
    msgs: Vec<Utf8Bytes>,
    next: u64,
}

impl Ring {
    /// Up to `max` rendered records from `from`, if the ring covers `from`.
    fn get(&self, from: u64, max: usize) -> Option<Page> {
        if from < self.start || from >= self.end {
            return None;
        }
        let skip = self.msgs.partition_point(|(o, _)| *o < from);
        let msgs: Vec<_> = self.msgs.iter().skip(skip).take(max).collect();
        let next = match msgs.last() {
            Some((o, _)) if msgs.len() == max => o + 1,
            _ => self.end,
        };
        Some(Page {
            msgs: msgs.into_iter().map(|(_, m)| m.clone()).collect(),
            next,
        })
    }

    /// Adds what a read of `first..next` rendered. Older records than the
    /// ring holds are not kept (a lagging tail must not push the live ones
    /// out); a jump past the ring's end starts it over.
    fn extend(&mut self, first: u64, next: u64, msgs: &[(u64, Utf8Bytes)]) {
        if self.end == self.start || first > self.end {
            self.msgs.clear();
            self.bytes = 0;
            self.start = first;
            self.end = first;
        } else if first < self.start {
            return;
        }
        for (o, m) in msgs.iter().filter(|(o, _)| *o >= self.end) {
            self.bytes += m.len();
            self.msgs.push_back((*o, m.clone()));
        }
        self.end = self.end.max(next);
        while self.msgs.len() > RING_RECORDS || self.bytes > RING_BYTES {
            match self.msgs.pop_front() {
                Some((o, m)) => {
                    self.bytes -= m.len();
                    self.start = o + 1;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(from: u64, n: u64) -> Vec<(u64, Utf8Bytes)> {
        (from..from + n)
            .map(|i| (i, Utf8Bytes::from(i.to_string())))
            .collect()
    }

    fn page(from: u64, n: u64) -> Page {
        Page {
            msgs: msgs(from, n).into_iter().map(|(_, m)| m).collect(),
            next: from + n,
        }
    }

    #[test]
    fn the_ring_serves_what_it_holds_and_stays_bounded() {
        let mut r = Ring::default();
        assert!(r.get(0, 10).is_none());
        r.extend(10, 15, &msgs(10, 5));
        assert_eq!(r.get(12, 10).expect("held"), page(12, 3));
        assert!(r.get(15, 10).is_none(), "past the end: read the log");
        assert!(r.get(9, 10).is_none(), "before the start: read the log");
        // Overlapping extension keeps each offset once.
        r.extend(13, 17, &msgs(13, 4));
        assert_eq!(r.get(10, 100).expect("held"), page(10, 7));
        // Older data is not cached; a jump restarts the ring.
        r.extend(0, 3, &msgs(0, 3));
        assert_eq!(r.start, 10);
        r.extend(100, 102, &msgs(100, 2));
        assert_eq!((r.start, r.msgs.len()), (100, 2));
        r.extend(
            102,
            102 + RING_RECORDS as u64 + 10,
            &msgs(102, RING_RECORDS as u64 + 10),
        );
        assert_eq!(r.msgs.len(), RING_RECORDS);
        assert_eq!(r.end, 102 + RING_RECORDS as u64 + 10);
    }

    #[test]
    fn the_ring_steps_over_a_compacted_partitions_gaps() {
        let mut r = Ring::default();
        let sparse: Vec<_> = [3u64, 7, 8]
            .iter()
            .map(|&o| (o, Utf8Bytes::from(o.to_string())))
            .collect();
        // A read from 0 found records at 3, 7 and 8, and went on to 12.
        r.extend(0, 12, &sparse);
        let all = r.get(0, 10).expect("covered");
        assert_eq!(all.msgs.len(), 3);
        assert_eq!(all.next, 12, "past the trailing gap");
        let from_gap = r.get(4, 10).expect("covered");
        assert_eq!(
            from_gap.msgs,
            vec![Utf8Bytes::from("7"), Utf8Bytes::from("8")]
        );
        let one = r.get(0, 1).expect("covered");
        assert_eq!(
            (one.msgs.len(), one.next),
            (1, 4),
            "the cursor moves past what was sent"
        );
        let none = r.get(9, 10).expect("covered");
        assert_eq!((none.msgs.len(), none.next), (0, 12));
    }
}

impl TailCache {
    /// The shared rings of `topic`, created for the first tail.
    fn topic(&self, topic: &str, partitions: usize) -> Arc<TopicTail> {
        let mut map = lock(&self.topics);
        if let Some(t) = map.get(topic).and_then(std::sync::Weak::upgrade) {
            if t.rings.len() == partitions {
                return t;
            }
        }
        map.retain(|_, w| w.strong_count() > 0);
        let t = Arc::new(TopicTail {
            rings: (0..partitions)
                .map(|_| std::sync::Mutex::new(Ring::default()))
                .collect(),
            fill: (0..partitions)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        });
        map.insert(topic.to_owned(), Arc::downgrade(&t));
        t
    }
}

/// Open WebSocket connections (for stats and metrics).
#[derive(Debug, Default)]
pub struct WsCounters {
    /// Open now.
    pub open: AtomicU64,
    /// Records appended over WebSockets.
    pub published: AtomicU64,
    /// Records sent to live tails.
    pub delivered: AtomicU64,
}

impl tributary_frontend::MetricsSource for WsCounters {
    fn render(&self, out: &mut tributary_frontend::Text) {
        out.gauge(
            "tributary_ws_connections",
            "Open WebSocket connections (publish and live).",
            self.open.load(Relaxed),
        );
        out.counter(
            "tributary_ws_published_total",
            "Records appended over WebSockets.",
            self.published.load(Relaxed),
        );
        out.counter(
            "tributary_ws_delivered_total",
            "Records sent to live tails.",
            self.delivered.load(Relaxed),
        );
    }
}

struct OpenGuard(Arc<WsCounters>);

impl OpenGuard {
    fn new(c: &Arc<WsCounters>) -> Self {
        c.open.fetch_add(1, Relaxed);
        OpenGuard(c.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

fn error_text(code: &str, message: &str) -> Message {
    Message::Text(Utf8Bytes::from(
        json!({"error": {"code": code, "message": message}}).to_string(),
    ))
}

fn close_frame(code: u16, reason: &str) -> Message {
    // A close reason is at most 123 bytes; cut at a character boundary.
    let mut cut = reason.len().min(120);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..cut]),
    }))
}

fn too_big(e: &axum::Error) -> bool {
    let s = e.to_string();
    s.contains("too long") || s.contains("Space limit")
}

/// Sends (or feeds, then flushes) with a deadline: a peer that stops reading
/// does not hold the session forever.
async fn send_within<S>(tx: &mut S, msg: Message) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    matches!(
        tokio::time::timeout(SEND_STALL, tx.send(msg)).await,
        Ok(Ok(()))
    )
}

/// `GET /v1/topics/{topic}/publish`.
pub(super) async fn publish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    hold: Option<Extension<ReadHold>>,
    ws: WebSocketUpgrade,
) -> Response {
    let hold = hold.map(|Extension(h)| h);
    let topic = match path {
        Ok(Path(t)) => t,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let who = match caller.identity() {
        Ok(who) => who.clone(),
        Err(e) => return refuse(ws, e),
    };
    // Unknown topics are only told to those who may know the name.
    if !state.cx.auth.may_see(&who, &topic) {
        return refuse(ws, auth::forbidden(&who, Action::Publish, &topic));
    }
    if state.cx.log.topic(&topic).is_err() && !state.cx.log.config().auto_create_topics {
        return ApiError::from(LogError::UnknownTopic(topic)).into_response();
    }
    let max = state.config.ws_max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| publish_session(state, who, topic, socket, hold))
}

/// Completes the upgrade and closes with 1008 and the reason: a browser sees
/// the close reason, never the status of a refused upgrade.
fn refuse(ws: WebSocketUpgrade, e: ApiError) -> Response {
    ws.on_upgrade(move |mut socket| async move {
        let why = format!("{}: {}", e.code, e.message);
        let _ = send_within(&mut socket, close_frame(close::POLICY, &why)).await;
    })
}

/// One answer slot per client message, in order.
enum Slot {
    Record,
    Refused(ApiError),
}

/// What one read produced: an answer slot per message, and the records.
struct Parsed {
    slots: Vec<Slot>,
    records: Vec<AppendRecord>,
    bytes: usize,
}

/// On its way to the writer.
enum Answer {
    Batch {
        slots: Vec<Slot>,
        result: Result<Vec<Position>, ApiError>,
    },
    Close(u16, String),
}

/// Checks what the log would refuse for one record alone, so one bad record
/// does not fail the others appended with it.
fn precheck(limits: Option<(usize, u32)>, r: &AppendRecord) -> Result<(), ApiError> {
    let Some((max_event, partitions)) = limits else {
        return Ok(());
    };
    let size = r.event.size();
    if size > max_event {
        return Err(ApiError::from(LogError::EventTooLarge {
            size,
            max: max_event,
        }));
    }
    match r.partition {
        Some(p) if p >= partitions => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "unknown_partition",
            format!("partition {p} does not exist (the topic has {partitions})"),
        )),
        _ => Ok(()),
    }
}

/// Three tasks joined by bounded channels: the reader parses what is ready
/// into batches (bounded by count and bytes), one appender appends batches in
/// order (merging those that queued while the previous append was on its way
/// to disk), and this task writes the answers in order, pings, and notices a
/// silent peer. Each stage waits for the next when it is full.
async fn publish_session(
    state: AppState,
    who: Identity,
    topic: String,
    socket: WebSocket,
    hold: Option<ReadHold>,
) {
    let _open = OpenGuard::new(&state.ws);
    let (mut tx, rx) = socket.split();
    let mut rx = ReadHold::wrap(hold, rx);
    let (parsed_tx, mut parsed_rx) = mpsc::channel::<Result<Parsed, (u16, String)>>(PIPELINE);
    let (answer_tx, mut answer_rx) = mpsc::channel::<Answer>(PIPELINE);
    let activity = Arc::new(AtomicU64::new(0));
    let log = state.cx.log.clone();
    let limits = || {
        log.topic(&topic)
            .ok()
            .map(|t| (t.config.max_event_bytes, t.config.partitions))
    };
    let reader = {
        let shutdown = state.cx.shutdown.clone();
        let activity = activity.clone();
        let limits_now = limits();
        let log = log.clone();
        let topic = topic.clone();
        let auth = state.cx.auth.clone();
        tokio::spawn(async move {
            let mut limits_now = limits_now;
            let mut bad_in_a_row = 0u32;
            loop {
                let first = tokio::select! {
                    () = shutdown.cancelled() => {
                        let _ = parsed_tx.send(Err((1001, "server shutting down".into()))).await;
                        return;
                    }
                    m = rx.next() => m,
                };
                if !auth.still_valid(&who) {
                    let why = "the device was disabled, removed or given a new token";
                    let _ = parsed_tx.send(Err((close::POLICY, why.into()))).await;
                    return;
                }
                if limits_now.is_none() {
                    limits_now = log
                        .topic(&topic)
                        .ok()
                        .map(|t| (t.config.max_event_bytes, t.config.partitions));
                }
                let mut batch = Parsed {
                    slots: Vec::new(),
                    records: Vec::new(),
                    bytes: 0,
                };
                let mut next = Some(first);
                let mut end = None;
                while let Some(m) = next.take() {
                    activity.fetch_add(1, Relaxed);
                    let parsed = match m {
                        None | Some(Ok(Message::Close(_))) => {
                            end = Some(None);
                            break;
                        }
                        Some(Err(e)) if too_big(&e) => {
                            end = Some(Some((close::TOO_BIG, "message too big".to_owned())));
                            break;
                        }
                        Some(Err(_)) => {
                            end = Some(None);
                            break;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                        Some(Ok(Message::Binary(b))) => {
                            Some(Ok(AppendRecord::from(Event::new(Vec::from(b)))))
                        }
                        Some(Ok(Message::Text(t))) => Some(
                            match serde_json::from_str::<ProduceRecord<'_>>(t.as_str()) {
                                Ok(r) => r.into_append(),
                                Err(e) => Err(ApiError::bad_request(format!(
                                    "not a record: {e} (expected {{\"key\",\"value\",\"headers\",...}})"
                                ))),
                            },
                        ),
                    };
                    match parsed.map(|r| r.and_then(|r| precheck(limits_now, &r).map(|()| r))) {
                        None => {}
                        Some(Ok(r)) => {
                            if let Some(subject) = refused_publish(&*auth, &who, &topic, &r.event) {
                                let why =
                                    format!("device `{}` may not publish to `{subject}`", who.id);
                                end = Some(Some((close::POLICY, why)));
                                break;
                            }
                            bad_in_a_row = 0;
                            batch.bytes += r.event.size();
                            batch.slots.push(Slot::Record);
                            batch.records.push(r);
                        }
                        Some(Err(e)) => {
                            bad_in_a_row += 1;
                            batch.slots.push(Slot::Refused(e));
                            if bad_in_a_row >= MAX_BAD_IN_A_ROW {
                                end = Some(Some((
                                    close::UNSUPPORTED,
                                    format!("{MAX_BAD_IN_A_ROW} bad messages in a row"),
                                )));
                                break;
                            }
                        }
                    }
                    // Everything already received joins this batch, within bounds.
                    if batch.slots.len() < BATCH_MESSAGES && batch.bytes < BATCH_BYTES {
                        next = rx.next().now_or_never();
                    }
                }
                // A device over its rate limit: this batch goes on, reading
                // pauses until the limit has caught up.
                let wait = auth.pace(&who, u32::try_from(batch.records.len()).unwrap_or(u32::MAX));
                if !batch.slots.is_empty() && parsed_tx.send(Ok(batch)).await.is_err() {
                    return;
                }
                // Paced in steps that count as activity: the writer must not
                // take a paused reader for a silent peer.
                let resume = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < resume && !shutdown.is_cancelled() {
                    let step = (tokio::time::Instant::now() + Duration::from_secs(5)).min(resume);
                    tokio::select! {
                        () = tokio::time::sleep_until(step) => {}
                        () = shutdown.cancelled() => {}
                    }
                    activity.fetch_add(1, Relaxed);
                }
                match end {
                    None => {}
                    Some(None) => return,
                    Some(Some(close)) => {
                        let _ = parsed_tx.send(Err(close)).await;
                        return;
                    }
                }
            }
        })
    };
    let appender = {
        let log = log.clone();
        let topic = topic.clone();
        let counters = state.ws.clone();
        tokio::spawn(async move {
            while let Some(first) = parsed_rx.recv().await {
                let mut group = Vec::new();
                let mut close = None;
                let mut bytes = 0;
                match first {
                    Ok(p) => {
                        bytes += p.bytes;
                        group.push(p);
                    }
                    Err(c) => close = Some(c),
                }
                while close.is_none() && bytes < MERGE_BYTES {
                    match parsed_rx.try_recv() {
                        Ok(Ok(p)) => {
                            bytes += p.bytes;
                            group.push(p);
                        }
                        Ok(Err(c)) => close = Some(c),
                        Err(_) => break,
                    }
                }
                let counts: Vec<usize> = group.iter().map(|p| p.records.len()).collect();
                let records: Vec<AppendRecord> = group
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.records))
                    .collect();
                let result = if records.is_empty() {
                    Ok(Vec::new())
                } else {
                    ingest::append_topic(&log, &topic, records)
                        .await
                        .map_err(ApiError::from)
                };
                if let Ok(p) = &result {
                    counters.published.fetch_add(p.len() as u64, Relaxed);
                }
                let mut at = 0;
                for (p, n) in group.into_iter().zip(counts) {
                    let result = match &result {
                        Ok(positions) => Ok(positions.get(at..at + n).unwrap_or_default().to_vec()),
                        Err(e) => Err(e.clone()),
                    };
                    at += n;
                    let answer = Answer::Batch {
                        slots: p.slots,
                        result,
                    };
                    if answer_tx.send(answer).await.is_err() {
                        return;
                    }
                }
                if let Some((code, why)) = close {
                    let _ = answer_tx.send(Answer::Close(code, why)).await;
                    return;
                }
            }
        })
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_activity = (activity.load(Relaxed), 0u32);
    loop {
        let answer = tokio::select! {
            a = answer_rx.recv() => a,
            _ = ping.tick() => {
                let now = activity.load(Relaxed);
                if now == last_activity.0 {
                    last_activity.1 += 1;
                    if last_activity.1 >= 3 {
                        let _ = send_within(&mut tx, close_frame(1001, "no answer to pings")).await;
                        break;
                    }
                } else {
                    last_activity = (now, 0);
                }
                if !send_within(&mut tx, Message::Ping(Default::default())).await {
                    break;
                }
                continue;
            }
        };
        match answer {
            None => {
                let _ = send_within(&mut tx, Message::Close(None)).await;
                break;
            }
            Some(Answer::Close(code, why)) => {
                let _ = send_within(&mut tx, close_frame(code, &why)).await;
                break;
            }
            Some(Answer::Batch { slots, result }) => {
                let mut positions = result.as_ref().ok().map(|p| p.iter());
                let msgs: Vec<Message> = slots
                    .into_iter()
                    .map(|slot| match (slot, &result) {
                        (Slot::Refused(e), _) => error_text(e.code, &e.message),
                        (Slot::Record, Ok(_)) => {
                            match positions.as_mut().and_then(Iterator::next) {
                                Some(p) => Message::Text(Utf8Bytes::from(format!(
                                    "{{\"partition\":{},\"offset\":{}}}",
                                    p.partition, p.offset
                                ))),
                                None => error_text("internal", "no position for this record"),
                            }
                        }
                        (Slot::Record, Err(e)) => error_text(e.code, &e.message),
                    })
                    .collect();
                let sent = tokio::time::timeout(SEND_STALL, async {
                    for m in msgs {
                        tx.feed(m).await?;
                    }
                    tx.flush().await
                })
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
                match &result {
                    Err(e) if e.code == "shutting_down" => {
                        let _ =
                            send_within(&mut tx, close_frame(1001, "server shutting down")).await;
                        break;
                    }
                    Err(e) if e.code == "unwritable" => {
                        let _ = send_within(
                            &mut tx,
                            close_frame(close::INTERNAL, "the log cannot write"),
                        )
                        .await;
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    // Unblock and end both stages: nothing is left waiting on this connection.
    drop(answer_rx);
    reader.abort();
    appender.abort();
}

/// Query of the live endpoint.
#[derive(Debug, Deserialize)]
pub(super) struct LiveParams {
    from: Option<String>,
    offsets: Option<String>,
}

/// Where each partition starts: `from` for all, `offsets` per partition.
fn starts(log: &tributary_storage::Log, topic: &str, q: &LiveParams) -> Result<Vec<u64>, ApiError> {
    let info = log.topic(topic)?;
    let mut out = Vec::with_capacity(info.partitions.len());
    let from = q.from.as_deref().unwrap_or("latest");
    for p in &info.partitions {
        out.push(match from {
            "latest" => p.end_offset,
            "earliest" => p.start_offset,
            n => n.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "from must be earliest, latest or an offset, got {n:?}"
                ))
            })?,
        });
    }
    let check = |out: &[u64]| -> Result<(), ApiError> {
        for (p, (o, info)) in out.iter().zip(&info.partitions).enumerate() {
            if *o > info.end_offset {
                return Err(ApiError::bad_request(format!(
                    "offset {o} is past the end of {topic}/{p} (end offset {})",
                    info.end_offset
                )));
            }
        }
        Ok(())
    };
    if let Some(list) = &q.offsets {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (p, o) = item
                .split_once(':')
                .and_then(|(p, o)| Some((p.parse::<usize>().ok()?, o.parse::<u64>().ok()?)))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("offsets must look like 0:15,1:7, got {item:?}"))
                })?;
            let slot = out.get_mut(p).ok_or_else(|| {
                ApiError::bad_request(format!("topic {topic} has no partition {p}"))
            })?;
            *slot = o;
        }
    }
    check(&out)?;
    Ok(out)
}

/// `GET /v1/topics/{topic}/live`.
pub(super) async fn live(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<LiveParams>, axum::extract::rejection::QueryRejection>,
    hold: Option<Extension<ReadHold>>,
    ws: WebSocketUpgrade,
) -> Response {
    let hold = hold.map(|Extension(h)| h);
    let topic = match path {
        Ok(Path(t)) => t,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let allowed = caller.identity().and_then(|who| {
        auth::allow(&state, who, Action::Subscribe, &auth::whole_topic(&topic))?;
        Ok(who.clone())
    });
    let who = match allowed {
        Ok(who) => who,
        Err(e) => return refuse(ws, e),
    };
    let cursors = match starts(&state.cx.log, &topic, &q) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // A live client only answers pings and closes: small frames are plenty.
    ws.max_message_size(LIVE_CLIENT_BYTES)
        .max_frame_size(LIVE_CLIENT_BYTES)
        .on_upgrade(move |socket| live_session(state, who, topic, cursors, socket, hold))
}

async fn live_session(
    state: AppState,
    who: Identity,
    topic: String,
    mut cursors: Vec<u64>,
    socket: WebSocket,
    hold: Option<ReadHold>,
) {
    let filter = auth::whole_topic(&topic);
    // A device disabled, removed or narrowed meanwhile stops receiving.
    let allowed = || {
        state.cx.auth.still_valid(&who)
            && state
                .cx
                .auth
                .authorize(&who, Action::Subscribe, &filter)
                .allowed()
    };
    let _open = OpenGuard::new(&state.ws);
    let log = state.cx.log.clone();
    let shared = state.tails.topic(&topic, cursors.len());
    let (mut tx, rx) = socket.split();
    let mut rx = ReadHold::wrap(hold, rx);
    let notify = Arc::new(Notify::new());
    let mut watchers = Vec::new();
    for p in 0..cursors.len() as u32 {
        if let Ok(mut end) = log.watch_end(&topic, p) {
            let n = notify.clone();
            watchers.push(tokio::spawn(async move {
                while end.changed().await.is_ok() {
                    n.notify_one();
                }
            }));
        }
    }
    // The client only closes or answers pings; anything else is ignored.
    let gone = CancellationToken::new();
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let gone = gone.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                seen.fetch_add(1, Relaxed);
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
            gone.cancel();
        })
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_seen = (0u64, 0u32);
    notify.notify_one();
    let farewell: Option<Message> = 'serve: loop {
        tokio::select! {
            () = gone.cancelled() => break None,
            () = state.cx.shutdown.cancelled() => break Some(close_frame(1001, "server shutting down")),
            _ = ping.tick() => {
                if !allowed() {
                    break Some(close_frame(close::POLICY, "no longer authorized"));
                }
                let now = seen.load(Relaxed);
                if now == last_seen.0 {
                    last_seen.1 += 1;
                    if last_seen.1 >= 3 {
                        break Some(close_frame(1001, "no answer to pings"));
                    }
                } else {
                    last_seen = (now, 0);
                }
                if !send_within(&mut tx, Message::Ping(Default::default())).await {
                    break None;
                }
                continue;
            }
            () = notify.notified() => {}
        }
        if !allowed() {
            break Some(close_frame(close::POLICY, "no longer authorized"));
        }
        // One round: a batch per partition, then back to the select (pings,
        // shutdown), coming straight back if a partition has more.
        let mut more = false;
        for (p, cursor) in cursors.iter_mut().enumerate() {
            let ring = &shared.rings[p];
            let fill = &shared.fill[p];
            let p = p as u32;
            let Ok((_, end)) = log.offsets(&topic, p) else {
                continue;
            };
            if *cursor >= end {
                continue;
            }
            let batch = match fetch_rendered(&log, &topic, p, *cursor, ring, fill).await {
                Fetched::Records(page) => page,
                Fetched::Gap(to) => {
                    let gap = json!({"gap": {"partition": p, "from": *cursor, "to": to}});
                    if !send_within(&mut tx, Message::Text(Utf8Bytes::from(gap.to_string()))).await
                    {
                        break 'serve None;
                    }
                    *cursor = to;
                    more = true;
                    continue;
                }
                Fetched::Failed(e) => {
                    let _ = send_within(&mut tx, error_text(e.code, &e.message)).await;
                    break 'serve Some(close_frame(close::INTERNAL, &e.message));
                }
            };
            let n = batch.msgs.len() as u64;
            if n > 0 {
                // Waits while the client's socket is full: a slow client slows
                // its own reads, nothing piles up here (and no lock is held).
                let sent = tokio::time::timeout(SEND_STALL, async {
                    for text in batch.msgs {
                        tx.feed(Message::Text(text)).await?;
                    }
                    tx.flush().await
                })
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break 'serve None;
                }
                state.ws.delivered.fetch_add(n, Relaxed);
            }
            // Past what was sent and any gap compaction left after it.
            *cursor = batch.next.max(*cursor);
            if *cursor < end {
                more = true;
            }
        }
        if more {
            notify.notify_one();
        }
    };
    if let Some(frame) = farewell {
        let _ = send_within(&mut tx, frame).await;
    }
    for w in watchers {
        w.abort();
    }
    reader.abort();
}

/// What one read for a live tail produced.
enum Fetched {
    /// Rendered records from the cursor on, and where the next read starts.
    Records(Page),
    /// Retention passed the cursor: continue here.
    Gap(u64),
    /// The log cannot serve.
    Failed(ApiError),
}

/// Rendered records from `cursor`: from the shared ring when it holds them;
/// otherwise one tail at a time reads the log and fills the ring (the lock is
/// held for the read only, never while sending). A tail behind the ring reads
/// the log on its own, without the lock and without touching the ring.
async fn fetch_rendered(
    log: &tributary_storage::Log,
    topic: &str,
    p: u32,
    cursor: u64,
    ring: &std::sync::Mutex<Ring>,
    fill: &tokio::sync::Mutex<()>,
) -> Fetched {
    if let Some(b) = lock(ring).get(cursor, LIVE_RECORDS) {
        return Fetched::Records(b);
    }
    let behind = {
        let r = lock(ring);
        !r.msgs.is_empty() && cursor < r.start
    };
    let _filling = if behind {
        None
    } else {
        let guard = fill.lock().await;
        if let Some(b) = lock(ring).get(cursor, LIVE_RECORDS) {
            return Fetched::Records(b);
        }
        Some(guard)
    };
    let read = {
        let log = log.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || log.read(&topic, p, cursor, LIVE_RECORDS, LIVE_BYTES))
            .await
    };
    let read = match read {
        Ok(Ok(r)) => r,
        Ok(Err(LogError::OffsetOutOfRange { start, .. })) if cursor < start => {
            return Fetched::Gap(start)
        }
        Ok(Err(e)) => return Fetched::Failed(ApiError::from(e)),
        Err(e) => {
            return Fetched::Failed(ApiError::from(LogError::Io(std::io::Error::other(
                e.to_string(),
            ))))
        }
    };
    let next = read.next_offset;
    let rendered: Vec<(u64, Utf8Bytes)> = read
        .records
        .into_iter()
        .map(|r| {
            let (partition, offset) = (r.partition, r.offset);
            // One message per record, always, so offsets and the cursor agree.
            let text = serde_json::to_string(&RecordOut::new(r, Format::Json))
                .unwrap_or_else(|_| {
                    json!({"partition": partition, "offset": offset, "error": "unrenderable"})
                        .to_string()
                })
                .into();
            (offset, text)
        })
        .collect();
    if !behind && next > cursor {
        lock(ring).extend(cursor, next, &rendered);
    }
    Fetched::Records(Page {
        msgs: rendered.into_iter().map(|(_, m)| m).collect(),
        next,
    })
}
