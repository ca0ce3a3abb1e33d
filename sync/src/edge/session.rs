//! One connection's session: its state (opened topics, batches in flight,
//! bandwidth tokens), its event loop (frames from the core, new data, new
//! topics, heartbeats, timers), opening topics, and what the core answers:
//! Acks and errors (a gap resynchronizes, a refused record is gone around).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::lanes::{Part, BLOCK_RETRY};
use super::link::Link;
use super::{lock, now_ms, End, Uploader, UpstreamConfig};
use crate::wire::{self, code, Compaction, Frame, Open, OpenTopic, Welcome};
use crate::Error;

pub(super) struct InFlight {
    pub(super) topic: Arc<str>,
    pub(super) partition: u32,
    pub(super) from: u64,
    pub(super) to: u64,
    pub(super) bytes: usize,
    pub(super) events: u64,
}

pub(super) struct Session<'a> {
    pub(super) up: &'a Uploader,
    pub(super) link: Link<'a>,
    pub(super) max_batch_bytes: usize,
    /// The wire version the core chose (how records are encoded).
    pub(super) version: u16,
    pub(super) parts: Vec<Part>,
    /// Topics opened or being opened on this connection.
    pub(super) opening: HashMap<String, bool>,
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) in_flight_bytes: usize,
    pub(super) wake: Arc<Notify>,
    pub(super) stop: CancellationToken,
    /// Bandwidth tokens (bytes; negative: in debt).
    pub(super) tokens: f64,
    pub(super) refilled: Instant,
    pub(super) rr: usize,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        up: &'a Uploader,
        link: Link<'a>,
        welcome: &Welcome,
        stop: CancellationToken,
    ) -> Self {
        Session {
            up,
            link,
            max_batch_bytes: welcome.max_batch_bytes as usize,
            version: welcome.version,
            parts: Vec::new(),
            opening: HashMap::new(),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            wake: Arc::new(Notify::new()),
            stop,
            tokens: 0.0,
            refilled: Instant::now(),
            rr: 0,
        }
    }

    pub(super) fn config(&self) -> &UpstreamConfig {
        &self.up.inner.config
    }

    pub(super) async fn run(
        &mut self,
        frames: &mut mpsc::Receiver<Result<Frame, Error>>,
        heard: &AtomicU64,
        shutdown: &CancellationToken,
    ) -> End {
        let log = self.up.inner.log.clone();
        let mut topics_rx = log.watch_topics();
        let mut ping = tokio::time::interval(self.config().heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Err(e) = self.open_new_topics().await {
            return End::Failed(e);
        }
        loop {
            if let Err(e) = self.fill().await {
                return End::Failed(e);
            }
            let timer = self.next_timer();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = self.link.write(Message::Close(None)).await;
                    return End::Shutdown;
                }
                f = frames.recv() => match f {
                    Some(Ok(frame)) => if let Err(end) = self.handle(frame).await { return end },
                    Some(Err(e)) => return End::Failed(e),
                    None => return End::Failed(Error::Link("the link ended".into())),
                },
                () = self.wake.notified() => {}
                r = topics_rx.changed() => {
                    if r.is_ok() {
                        if let Err(e) = self.open_new_topics().await { return End::Failed(e) }
                    }
                }
                _ = ping.tick() => {
                    let silent = (now_ms() as u64).saturating_sub(heard.load(Relaxed));
                    if silent > self.config().timeout.as_millis() as u64 {
                        return End::Failed(Error::Link(format!("nothing heard from the core for {silent} ms (half-open link?)")));
                    }
                    if let Err(e) = self.link.write(Message::Ping(Vec::new().into())).await {
                        return End::Failed(e);
                    }
                }
                () = sleep_opt(timer) => {}
            }
        }
    }

    async fn open_new_topics(&mut self) -> Result<(), Error> {
        let up = self.up;
        for t in up.inner.log.topics() {
            let name = t.config.name.clone();
            if up.inner.config.priority(&name).is_none() {
                continue;
            }
            if self.opening.get(&name) == Some(&true) {
                // Opened with fewer partitions than it has now: the next
                // connection opens it again, with all of them.
                let open = self.parts.iter().filter(|p| *p.topic == *name).count();
                if open < t.config.partitions as usize {
                    return Err(Error::Link(format!(
                        "topic {name} has {} partitions now ({open} forwarded): reconnecting to forward them all",
                        t.config.partitions
                    )));
                }
                continue;
            }
            if self.opening.contains_key(&name) {
                continue;
            }
            self.opening.insert(name.clone(), false);
            let open = Open {
                topic: name,
                partitions: t.config.partitions,
            };
            let c = &t.config;
            let frame = if self.version >= wire::COMPACTION {
                Frame::OpenTopic(OpenTopic {
                    open,
                    compaction: c.cleanup_policy.compacts().then(|| Compaction {
                        policy: c.cleanup_policy.as_str().to_owned(),
                        delete_retention_ms: c.delete_retention_ms,
                        min_compaction_lag_ms: c.min_compaction_lag_ms,
                        max_compaction_lag_ms: c.max_compaction_lag_ms,
                        min_cleanable_dirty_ratio_ppm: (c.min_cleanable_dirty_ratio * 1e6) as u32,
                    }),
                })
            } else {
                Frame::Open(open)
            };
            self.link.send(frame).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), End> {
        match frame {
            Frame::Opened(o) => self.opened(o).map_err(End::Failed),
            Frame::Ack(a) => {
                let Some(i) = self.in_flight.iter().position(|f| {
                    *f.topic == *a.topic
                        && f.partition == a.partition
                        && f.from == a.base_offset
                        && f.to == a.next_offset
                }) else {
                    return Err(End::Failed(Error::Peer(format!(
                        "the core acknowledged {}/{} {}..{}, which is not in flight",
                        a.topic, a.partition, a.base_offset, a.next_offset
                    ))));
                };
                let Some(f) = self.in_flight.remove(i) else {
                    return Ok(());
                };
                self.in_flight_bytes -= f.bytes;
                if let Some(p) = self
                    .parts
                    .iter_mut()
                    .find(|p| *p.topic == *f.topic && p.partition == f.partition)
                {
                    p.held.insert(f.from, f.to);
                }
                self.up
                    .note_ack(&f.topic, f.partition, f.from, f.to, f.events);
                Ok(())
            }
            Frame::Error(e) => {
                let msg = self.up.error(&e);
                match (e.code, &e.topic) {
                    (code::FORBIDDEN | code::UNKNOWN_TOPIC, Some(t))
                        if self.opening.get(t) == Some(&false) =>
                    {
                        // Refused alone: the others go on; retried on the next connection.
                        tracing::warn!(topic = %t, "{msg}");
                        Ok(())
                    }
                    (code::GAP, _) => Err(End::Resync(msg)),
                    (code::TOO_LARGE, Some(t)) => {
                        // One record the core cannot store: the next
                        // connection forwards around it (see `opened`).
                        if let (Some(p), Some(o)) = (e.partition, e.expected) {
                            let until = Instant::now() + BLOCK_RETRY;
                            lock(&self.up.inner.blocked)
                                .insert((t.clone(), p), (o, until, e.message.clone()));
                            tracing::warn!(topic = %t, partition = p, offset = o, "sync: the core refuses a record as too large; forwarding around it, retrying in {BLOCK_RETRY:?}");
                        }
                        Err(End::Failed(msg))
                    }
                    _ => Err(End::Failed(msg)),
                }
            }
            other => Err(End::Failed(Error::Peer(
                format!("unexpected frame from the core: {other:?}")
                    .chars()
                    .take(200)
                    .collect(),
            ))),
        }
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
