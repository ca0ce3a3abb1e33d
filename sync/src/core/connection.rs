//! One edge's connection ([`SyncCore::serve`]): the Hello and the version
//! check, login, taking over from the edge's previous connection, the read
//! loop (heartbeats, Open, Batch and Skip frames handed to the appender),
//! opening topics (creating them at the core, first checkpoints of new
//! streams), and the writer task that sends frames, pings and the close.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_devices::auth::{self, Action, Credentials, Identity};
use tributary_storage::{CleanupPolicy, Error as LogError, MetaEntry, TopicConfig};

use super::appender::{charge, Appender, Work};
use super::recovery::{checkpoint, edge_key, stream_key, EdgeMeta};
use super::{
    lock, now_ms, storage_error, valid_edge_id, write_error, EdgeSlot, EdgeStream, OnMessage,
    Stream, SyncCore, SyncPeer, HELLO_TIMEOUT, MAX_EDGES, MAX_STREAMS_PER_EDGE,
    MAX_TOPICS_PER_CONNECTION, META_SPACE, ORIGIN_HEADER_ROOM, PIPELINE, QUEUED_BYTES, SEND_STALL,
    TAKEOVER_TIMEOUT,
};
use crate::wire::{self, code, Compaction, ErrorFrame, Frame, Hello, Open, Opened, Welcome};

impl SyncCore {
    /// Serves one edge connection until it ends, the edge is replaced, or
    /// `shutdown` is cancelled.
    pub async fn serve(
        &self,
        socket: WebSocket,
        peer: SyncPeer,
        shutdown: CancellationToken,
        on_message: Option<OnMessage>,
    ) {
        let m = &self.inner.metrics;
        m.connections.fetch_add(1, Relaxed);
        m.open.fetch_add(1, Relaxed);
        let (sink, stream) = socket.split();
        let mut stream = EdgeStream {
            inner: stream,
            on_message,
        };
        let (out, out_rx) = mpsc::channel(PIPELINE);
        let writer = tokio::spawn(writer(sink, out_rx));
        let hello = tokio::select! {
            h = read_hello(&mut stream) => h,
            () = shutdown.cancelled() => Err(ErrorFrame::new(code::SHUTTING_DOWN, "the core is shutting down")),
        };
        let result = match hello {
            Ok(hello) => {
                self.session(hello, peer, &mut stream, &out, &shutdown)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.count_error(e.code);
            tracing::info!(code = code::name(e.code), message = %e.message, "sync connection ended with an error");
            let close_code = match e.code {
                code::UNAUTHORIZED | code::FORBIDDEN => 1008,
                code::BAD_FRAME | code::UNSUPPORTED_VERSION | code::GAP => 1002,
                code::TOO_LARGE => 1009,
                code::SHUTTING_DOWN | code::REPLACED => 1001,
                _ => 1011,
            };
            let _ = out.send(Out::Frame(Frame::Error(e))).await;
            let _ = out.send(Out::Close(close_code)).await;
        } else {
            let _ = out.send(Out::Close(1000)).await;
        }
        drop(out);
        let _ = writer.await;
        m.open.fetch_sub(1, Relaxed);
    }

    fn slot(&self, edge: &str) -> Result<Arc<EdgeSlot>, ErrorFrame> {
        let mut edges = lock(&self.inner.edges);
        if edges.len() >= MAX_EDGES && !edges.contains_key(edge) {
            return Err(ErrorFrame::new(
                code::FORBIDDEN,
                format!("this core already knows {MAX_EDGES} edges"),
            ));
        }
        Ok(edges.entry(edge.to_owned()).or_default().clone())
    }

    async fn session(
        &self,
        hello: Hello,
        peer: SyncPeer,
        stream: &mut EdgeStream,
        out: &mpsc::Sender<Out>,
        shutdown: &CancellationToken,
    ) -> Result<(), ErrorFrame> {
        let core = &self.inner;
        let version = wire::VERSION.min(hello.max_version);
        if version < wire::MIN_VERSION.max(hello.min_version) {
            return Err(ErrorFrame::new(
                code::UNSUPPORTED_VERSION,
                format!(
                    "the core speaks sync versions {}..={}, the edge {}..={}",
                    wire::MIN_VERSION,
                    wire::VERSION,
                    hello.min_version,
                    hello.max_version
                ),
            ));
        }
        if !valid_edge_id(&hello.edge_id) {
            return Err(ErrorFrame::new(
                code::BAD_FRAME,
                "edge ids are 1..=128 characters of [A-Za-z0-9._-]",
            ));
        }
        let creds = Credentials {
            protocol: "sync",
            username: Some(&hello.edge_id),
            password: hello.token.as_deref(),
            client_id: None,
            peer: peer.addr,
            certificate: peer.certificate.as_deref(),
        };
        let who = auth::login(core.auth.as_ref(), &creds).await.map_err(|r| {
            ErrorFrame::new(code::UNAUTHORIZED, format!("login refused: {}", r.reason()))
        })?;
        if core.auth.enforcing() && who.id != hello.edge_id {
            return Err(ErrorFrame::new(
                code::UNAUTHORIZED,
                format!(
                    "logged in as device {}, not as edge {}",
                    who.id, hello.edge_id
                ),
            ));
        }
        let edge = hello.edge_id.clone();
        let slot = self.slot(&edge)?;
        let kick = CancellationToken::new();
        // The previous connection of this edge (if any) was just kicked: wait
        // until its appends are done, so the held ranges are exact.
        let previous = std::mem::replace(&mut *lock(&slot.kick), kick.clone());
        previous.cancel();
        let _conn = tokio::select! {
            g = tokio::time::timeout(TAKEOVER_TIMEOUT, slot.conn.clone().lock_owned()) => g.map_err(|_| {
                ErrorFrame::new(code::REPLACED, "the edge's previous connection is still closing")
            })?,
            () = kick.cancelled() => return Err(ErrorFrame::new(code::REPLACED, "a newer connection of this edge took over")),
        };
        let guard = self.claim(&edge, &slot).await.map_err(|e| match e {
            crate::Error::Log(e) => write_error(e),
            e => storage_error(e),
        })?;
        let reset = {
            let mut st = lock(&slot.state);
            let reset = st.instance != hello.instance;
            // Changed in memory only once these writes are durable (in `connected`).
            let dropped: Vec<MetaEntry> = if reset {
                if st.instance != 0 {
                    tracing::warn!(%edge, "sync: the edge came back with a new data directory; its offsets start again");
                }
                st.streams
                    .keys()
                    .map(|(t, p)| (stream_key(&edge, t, *p), None))
                    .collect()
            } else {
                Vec::new()
            };
            st.connected = true;
            st.claim = Some(guard);
            st.peer = peer.addr;
            st.since_ms = now_ms();
            st.last_seen_ms = st.since_ms;
            reset.then_some(dropped)
        };
        let result = self
            .connected(
                &edge,
                &who,
                &slot,
                reset,
                hello.instance,
                stream,
                out,
                shutdown,
                &kick,
                version,
            )
            .await;
        let mut st = lock(&slot.state);
        st.connected = false;
        st.last_seen_ms = now_ms();
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn connected(
        &self,
        edge: &str,
        who: &Identity,
        slot: &Arc<EdgeSlot>,
        reset: Option<Vec<MetaEntry>>,
        instance: u64,
        stream: &mut EdgeStream,
        out: &mpsc::Sender<Out>,
        shutdown: &CancellationToken,
        kick: &CancellationToken,
        version: u16,
    ) -> Result<(), ErrorFrame> {
        let core = &self.inner;
        if let Some(mut entries) = reset {
            let meta = EdgeMeta { instance };
            entries.push((
                edge_key(edge),
                Some(postcard::to_allocvec(&meta).unwrap_or_default()),
            ));
            let guard = lock(&slot.state).claim.clone();
            core.log
                .put_meta_guarded(META_SPACE, entries, guard.as_ref())
                .await
                .map_err(write_error)?;
            let mut st = lock(&slot.state);
            st.instance = instance;
            st.streams.clear();
        }
        let welcome = Welcome {
            version,
            heartbeat_ms: u32::try_from(core.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
            max_batch_bytes: u32::try_from(core.config.max_batch_bytes).unwrap_or(u32::MAX),
        };
        send(out, Frame::Welcome(welcome)).await?;
        tracing::info!(%edge, "sync: edge connected");
        let (work_tx, work_rx) = mpsc::channel(PIPELINE);
        let budget = Arc::new(tokio::sync::Semaphore::new(QUEUED_BYTES));
        let appender = Appender {
            core: self.clone(),
            edge: edge.to_owned(),
            slot: slot.clone(),
            out: out.clone(),
            accepted: HashMap::new(),
        };
        let mut appending = tokio::spawn(appender.run(work_rx));
        let mut appender_ended = None;
        // Per opened topic, the core partition of each edge partition.
        let mut opened: HashMap<String, Vec<u32>> = HashMap::new();
        let silent_after = core.config.heartbeat * 3;
        let mut last_heard = Instant::now();
        let mut ping = tokio::time::interval(core.config.heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let generation = core.auth.generation();
        let result = loop {
            let silent = tokio::time::sleep_until((last_heard + silent_after).into());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Err(ErrorFrame::new(code::SHUTTING_DOWN, "the core is shutting down")),
                () = kick.cancelled() => break Err(ErrorFrame::new(code::REPLACED, "a newer connection of this edge took over")),
                ended = &mut appending => {
                    let e = match ended {
                        Ok(Err(e)) => e,
                        _ => ErrorFrame::new(code::STORAGE, "the connection's appender ended"),
                    };
                    appender_ended = Some(());
                    break Err(e);
                }
                _ = ping.tick() => {
                    if core.auth.generation() != generation && !core.auth.still_valid(who) {
                        break Err(ErrorFrame::new(code::UNAUTHORIZED, "the edge's device was disabled, removed or given a new token"));
                    }
                    if out.send(Out::Ping).await.is_err() {
                        break Ok(());
                    }
                }
                () = silent => break Err(ErrorFrame::new(code::BAD_FRAME, format!("nothing heard from the edge for {silent_after:?}"))),
                msg = stream.next() => {
                    last_heard = Instant::now();
                    lock(&slot.state).last_seen_ms = now_ms();
                    let bytes = match msg {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Ok(()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Text(_))) => break Err(ErrorFrame::new(code::BAD_FRAME, "text messages are not sync frames")),
                        Some(Ok(Message::Binary(b))) => b,
                    };
                    core.metrics.wire_bytes.fetch_add(bytes.len() as u64, Relaxed);
                    let frame = match Frame::decode(&bytes) {
                        Ok(f) => f,
                        Err(e) => break Err(ErrorFrame::new(code::BAD_FRAME, e.to_string())),
                    };
                    // Version 3's frames are version 2's with more said.
                    let (frame, compaction, compacted) = match frame {
                        Frame::OpenTopic(t) => (Frame::Open(t.open), t.compaction, false),
                        Frame::Compacted(s) => (Frame::Skip(s), None, true),
                        f => (f, None, false),
                    };
                    match frame {
                        Frame::Open(o) => {
                            if opened.len() >= MAX_TOPICS_PER_CONNECTION && !opened.contains_key(&o.topic) {
                                break Err(ErrorFrame::new(code::BAD_FRAME, "too many topics on one connection"));
                            }
                            match self.open_topic(edge, who, &o, compaction.as_ref()).await {
                                Ok((reply, mapping)) => {
                                    opened.insert(o.topic.clone(), mapping);
                                    if let Err(e) = send(out, Frame::Opened(reply)).await { break Err(e) }
                                }
                                // A refused topic is refused alone: the edge forwards the others.
                                Err(e) if matches!(e.code, code::FORBIDDEN | code::UNKNOWN_TOPIC) => {
                                    self.count_error(e.code);
                                    if let Err(e) = send(out, Frame::Error(e)).await { break Err(e) }
                                }
                                Err(e) => break Err(e),
                            }
                        }
                        Frame::Batch(b) => {
                            // Taken before decoding: what waits is bounded in bytes.
                            let want = charge(&b).clamp(1, QUEUED_BYTES) as u32;
                            let Ok(permit) = budget.clone().acquire_many_owned(want).await else {
                                break Ok(());
                            };
                            let work = match self.check_batch(&opened, version, b, permit) {
                                Ok(w) => w,
                                Err(e) => break Err(e),
                            };
                            if work_tx.send(work).await.is_err() {
                                continue; // the appender ended: its result comes next
                            }
                        }
                        Frame::Skip(s) => {
                            let Some(mapping) = opened.get(&s.topic) else {
                                break Err(not_opened(&s.topic));
                            };
                            if s.partition as usize >= mapping.len() || s.from >= s.to {
                                break Err(ErrorFrame::new(code::BAD_FRAME, "skip of no offsets or of a partition the topic lacks").at(&s.topic, s.partition));
                            }
                            if work_tx.send(Work::Skip(s, compacted)).await.is_err() {
                                continue;
                            }
                        }
                        other => break Err(ErrorFrame::new(code::BAD_FRAME, format!("an edge does not send {}", kind(&other)))),
                    }
                }
            }
        };
        // Appends already handed to the log finish (and are acknowledged if
        // the socket still takes it) before the next connection may start.
        drop(work_tx);
        if appender_ended.is_none() {
            let ended = appending.await;
            if result.is_ok() {
                if let Ok(Err(e)) = ended {
                    return Err(e);
                }
            }
        }
        tracing::info!(%edge, "sync: edge disconnected");
        result
    }

    /// Opens a topic an edge forwards: the answer, and the core partition
    /// each edge partition's batches go to. A stream keeps the core
    /// partition it was first given (stored with its checkpoints), also
    /// when the core's topic gains partitions later: its records and the
    /// scan that recovers them after a crash stay in one partition.
    async fn open_topic(
        &self,
        edge: &str,
        who: &Identity,
        o: &Open,
        compaction: Option<&Compaction>,
    ) -> Result<(Opened, Vec<u32>), ErrorFrame> {
        let core = &self.inner;
        let refuse = |c: u16, m: String| {
            Err(ErrorFrame {
                topic: Some(o.topic.clone()),
                ..ErrorFrame::new(c, m)
            })
        };
        if !core
            .auth
            .authorize(who, Action::Publish, &o.topic)
            .allowed()
        {
            return refuse(
                code::FORBIDDEN,
                format!("edge {edge} may not forward topic {}", o.topic),
            );
        }
        if o.partitions == 0 || o.partitions > tributary_storage::topic::MAX_PARTITIONS {
            return Err(ErrorFrame::new(
                code::BAD_FRAME,
                "partition count out of range",
            ));
        }
        let partitions = match core.log.topic(&o.topic) {
            Ok(t) => t.config.partitions,
            Err(LogError::UnknownTopic(_)) if core.config.auto_create_topics => {
                let mut config: TopicConfig = core.log.config().topic_defaults.config(&o.topic);
                config.partitions = o.partitions;
                // Room for the three origin headers on an edge's largest events.
                config.max_event_bytes = (config.max_event_bytes + ORIGIN_HEADER_ROOM)
                    .min(tributary_storage::topic::MAX_EVENT_BYTES_LIMIT);
                // The core's copy of an edge's compacted topic is compacted alike.
                if let Some(c) = compaction {
                    config.cleanup_policy = CleanupPolicy::parse(&c.policy).ok_or_else(|| {
                        ErrorFrame::new(code::BAD_FRAME, format!("cleanup policy `{}`", c.policy))
                    })?;
                    config.delete_retention_ms = c.delete_retention_ms;
                    config.min_compaction_lag_ms = c.min_compaction_lag_ms;
                    config.max_compaction_lag_ms = c.max_compaction_lag_ms;
                    config.min_cleanable_dirty_ratio =
                        f64::from(c.min_cleanable_dirty_ratio_ppm.min(1_000_000)) / 1e6;
                }
                match core.log.create_topic(config).await {
                    Ok(t) => t.config.partitions,
                    Err(LogError::TopicExists(_)) => {
                        core.log
                            .topic(&o.topic)
                            .map_err(storage_error)?
                            .config
                            .partitions
                    }
                    Err(LogError::InvalidTopic(m)) => {
                        return Err(ErrorFrame::new(code::BAD_FRAME, m))
                    }
                    Err(e) => return Err(storage_error(e)),
                }
            }
            Err(LogError::UnknownTopic(_)) => {
                return refuse(
                    code::UNKNOWN_TOPIC,
                    format!(
                        "the core has no topic {} and does not create topics for edges",
                        o.topic
                    ),
                );
            }
            Err(LogError::InvalidTopic(m)) => return Err(ErrorFrame::new(code::BAD_FRAME, m)),
            Err(e) => return Err(storage_error(e)),
        };
        let slot = self.slot(edge)?;
        // A stream seen for the first time gets a durable checkpoint before
        // anything of it is acknowledged: after a crash the core then scans
        // its partition from here, never from records older than the stream
        // (another instance's, for one), and never misses its first rounds.
        let (held, fresh, mapping, guard) = {
            let mut st = lock(&slot.state);
            if !st.streams.contains_key(&(o.topic.clone(), 0))
                && st.streams.len() + o.partitions as usize > MAX_STREAMS_PER_EDGE
            {
                return refuse(
                    code::FORBIDDEN,
                    format!("edge {edge} forwards more than {MAX_STREAMS_PER_EDGE} partitions"),
                );
            }
            let mut fresh = Vec::new();
            let mut mapping = Vec::with_capacity(o.partitions as usize);
            let held: Vec<Vec<(u64, u64)>> = (0..o.partitions)
                .map(|p| {
                    let key = (o.topic.clone(), p);
                    let core_partition = st
                        .streams
                        .get(&key)
                        .map(|s| s.core_partition)
                        .filter(|&c| c < partitions)
                        .unwrap_or(p % partitions);
                    mapping.push(core_partition);
                    let s = st.streams.entry(key).or_insert_with(|| {
                        let end = core
                            .log
                            .offsets(&o.topic, core_partition)
                            .map_or(0, |(_, e)| e);
                        let s = Stream {
                            core_partition,
                            scan_from: end,
                            ..Stream::default()
                        };
                        fresh.push(checkpoint(edge, &o.topic, p, &s));
                        s
                    });
                    s.core_partition = core_partition;
                    s.held.ranges().to_vec()
                })
                .collect();
            (held, fresh, mapping, st.claim.clone())
        };
        if !fresh.is_empty() {
            core.log
                .put_meta_guarded(META_SPACE, fresh, guard.as_ref())
                .await
                .map_err(write_error)?;
        }
        let opened = Opened {
            topic: o.topic.clone(),
            partitions,
            held,
        };
        Ok((opened, mapping))
    }
}

fn kind(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Welcome(_) => "Welcome",
        Frame::Open(_) => "Open",
        Frame::Opened(_) => "Opened",
        Frame::Batch(_) => "Batch",
        Frame::Ack(_) => "Ack",
        Frame::Skip(_) => "Skip",
        Frame::Error(_) => "Error",
        Frame::OpenTopic(_) => "OpenTopic",
        Frame::Compacted(_) => "Compacted",
    }
}

pub(super) fn not_opened(topic: &str) -> ErrorFrame {
    ErrorFrame {
        topic: Some(topic.to_owned()),
        ..ErrorFrame::new(
            code::BAD_FRAME,
            format!("topic {topic} was not opened on this connection"),
        )
    }
}

async fn send(out: &mpsc::Sender<Out>, f: Frame) -> Result<(), ErrorFrame> {
    out.send(Out::Frame(f))
        .await
        .map_err(|_| ErrorFrame::new(code::BAD_FRAME, "the connection is gone"))
}

async fn read_hello(stream: &mut EdgeStream) -> Result<Hello, ErrorFrame> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| ErrorFrame::new(code::BAD_FRAME, "no Hello in time"))?;
        match msg {
            Some(Ok(Message::Binary(b))) => {
                return match Frame::decode(&b) {
                    Ok(Frame::Hello(h)) => Ok(h),
                    Ok(other) => Err(ErrorFrame::new(
                        code::BAD_FRAME,
                        format!("expected Hello, got {}", kind(&other)),
                    )),
                    Err(e) => Err(ErrorFrame::new(
                        code::BAD_FRAME,
                        format!("expected Hello: {e}"),
                    )),
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(ErrorFrame::new(
                    code::BAD_FRAME,
                    "text messages are not sync frames",
                ))
            }
            _ => return Err(ErrorFrame::new(code::BAD_FRAME, "closed before Hello")),
        }
    }
}

/// What the writer task sends.
pub(super) enum Out {
    Frame(Frame),
    Ping,
    Close(u16),
}

async fn writer(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Out>) {
    while let Some(o) = rx.recv().await {
        let (msg, last) = match o {
            Out::Frame(f) => (Message::Binary(f.encode().into()), false),
            Out::Ping => (Message::Ping(Vec::new().into()), false),
            Out::Close(c) => (
                Message::Close(Some(CloseFrame {
                    code: c,
                    reason: "".into(),
                })),
                true,
            ),
        };
        // Acks queue up while the socket is busy: feed them, flush once.
        let sent = tokio::time::timeout(SEND_STALL, async {
            sink.feed(msg).await?;
            if last || rx.is_empty() {
                sink.flush().await?;
            }
            Ok::<_, axum::Error>(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) || last {
            return;
        }
    }
}
