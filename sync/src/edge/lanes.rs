//! Lanes and the scheduler. When a topic is opened each partition gets its
//! lanes (a live lane from the end the edge has, a backlog lane below it,
//! split around records the core refused); the scheduler then sends batches
//! (or skips, for events evicted before they were forwarded) while the
//! window and the bandwidth cap allow: live lanes first, by topic priority,
//! round-robin among equals, a tail lane lingering for a fuller batch.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tributary_storage::Error as LogError;

use super::lock;
use super::session::{InFlight, Session};
use crate::ranges::RangeSet;
use crate::wire::{self, Batch, Frame, Opened, Skip, MAX_RANGES};
use crate::Error;

/// One lane of one partition: sends `[next, limit)` minus what the core holds.
#[derive(Debug, Clone)]
struct Lane {
    next: u64,
    limit: u64,
    /// The first batch opens a new held range at the core.
    opens: bool,
    live: bool,
    /// When data first waited for a live batch to fill.
    waiting_since: Option<Instant>,
}

pub(super) struct Part {
    pub(super) topic: Arc<str>,
    pub(super) partition: u32,
    priority: i32,
    lanes: Vec<Lane>,
    /// What the core holds, as far as this connection knows.
    pub(super) held: RangeSet,
}

impl Session<'_> {
    pub(super) fn opened(&mut self, o: Opened) -> Result<(), Error> {
        let up = self.up;
        let log = &up.inner.log;
        let Some(priority) = up.inner.config.priority(&o.topic) else {
            return Ok(());
        };
        // Not for a compacted topic: records must reach the core in the
        // edge's order, or a core copy compacted by its own offsets would
        // keep a key's older value sent after its newer one.
        let compacted = log
            .topic(&o.topic)
            .is_ok_and(|t| t.config.cleanup_policy.compacts());
        let live_first = up.inner.config.live_first && !compacted;
        if self.opening.get(&o.topic) != Some(&false) {
            return Err(Error::Peer(format!(
                "the core opened {} twice or unasked",
                o.topic
            )));
        }
        self.opening.insert(o.topic.clone(), true);
        let topic: Arc<str> = o.topic.as_str().into();
        for (p, ranges) in o.held.into_iter().enumerate() {
            let partition = p as u32;
            let held = RangeSet::from_ranges(ranges);
            let (start, end) = log.offsets(&o.topic, partition).map_err(Error::Storage)?;
            if held.ranges().last().is_some_and(|&(_, e)| e > end) {
                return Err(Error::Peer(format!(
                    "the core holds offsets of {}/{partition} beyond this edge's end {end}; is its data directory the one the core knows?",
                    o.topic
                )));
            }
            {
                let mut known = lock(&self.up.inner.known);
                let k = known.entry((o.topic.clone(), partition)).or_default();
                k.held = held.clone();
            }
            let _ = log.mark_forwarded(&o.topic, partition, held.prefix());
            let first = held.next_missing(0);
            let lanes = if first >= end {
                vec![Lane {
                    next: first,
                    limit: u64::MAX,
                    opens: false,
                    live: true,
                    waiting_since: None,
                }]
            } else if live_first && held.len() < MAX_RANGES / 2 && end > first {
                vec![
                    Lane {
                        next: end,
                        limit: u64::MAX,
                        opens: !held.continues_at(end),
                        live: true,
                        waiting_since: None,
                    },
                    Lane {
                        next: first,
                        limit: end,
                        opens: false,
                        live: false,
                        waiting_since: None,
                    },
                ]
            } else {
                vec![Lane {
                    next: first,
                    limit: u64::MAX,
                    opens: false,
                    live: false,
                    waiting_since: None,
                }]
            };
            let block = {
                let mut b = lock(&up.inner.blocked);
                b.retain(|_, (_, until, _)| *until > Instant::now());
                b.get(&(o.topic.clone(), partition)).map(|&(off, ..)| off)
            };
            let lanes = match block {
                Some(off) => around(lanes, off, &held),
                None => lanes,
            };
            tracing::debug!(topic = %o.topic, partition, start, end, ?held, "sync: partition opened");
            // Wake the session whenever the partition grows.
            if let Ok(mut rx) = log.watch_end(&o.topic, partition) {
                let (wake, stop) = (self.wake.clone(), self.stop.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            r = rx.changed() => if r.is_err() { return },
                        }
                        wake.notify_one();
                    }
                });
            }
            self.parts.push(Part {
                topic: topic.clone(),
                partition,
                priority,
                lanes,
                held,
            });
        }
        // Higher priority first; the scheduler walks this order per lane class.
        self.parts.sort_by_key(|p| std::cmp::Reverse(p.priority));
        Ok(())
    }

    /// When the session must look again without a frame or new data: a
    /// lingering live batch, or bandwidth debt paid off.
    pub(super) fn next_timer(&self) -> Option<tokio::time::Instant> {
        // A full window waits for Acks (they wake the session), bandwidth
        // debt for its payoff; only with room and tokens does a lingering
        // batch's deadline matter. Otherwise a past deadline would spin.
        if self.window_full() {
            return None;
        }
        let debt = (self.tokens < 0.0 && self.config().max_bytes_per_sec > 0).then(|| {
            Instant::now()
                + Duration::from_secs_f64(-self.tokens / self.config().max_bytes_per_sec as f64)
        });
        if let Some(d) = debt {
            return Some(d.into());
        }
        let linger = self
            .parts
            .iter()
            .flat_map(|p| &p.lanes)
            .filter_map(|l| l.waiting_since)
            .min()
            .map(|t| t + self.config().linger);
        linger.map(Into::into)
    }

    /// No room for another batch until an Ack comes.
    fn window_full(&self) -> bool {
        let c = self.config();
        let batch = c.batch_max_bytes.min(self.max_batch_bytes);
        self.in_flight.len() >= c.window_batches
            || (!self.in_flight.is_empty() && self.in_flight_bytes + batch > c.window_bytes)
    }

    fn refill(&mut self) -> bool {
        let rate = self.config().max_bytes_per_sec;
        if rate == 0 {
            return true;
        }
        let now = Instant::now();
        let burst = (rate as f64).max(self.config().batch_max_bytes as f64);
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate as f64)
            .min(burst);
        self.refilled = now;
        self.tokens >= 0.0
    }

    /// Sends batches while the window and the bandwidth allow: live lanes
    /// first, then backlog lanes; within each, by topic priority, round-robin
    /// among equals.
    pub(super) async fn fill(&mut self) -> Result<(), Error> {
        loop {
            if self.window_full() || self.stop.is_cancelled() {
                return Ok(());
            }
            if !self.refill() {
                return Ok(());
            }
            let Some((pi, li)) = self.pick() else {
                return Ok(());
            };
            self.send_from(pi, li).await?;
        }
    }

    /// The next lane with something to send now.
    fn pick(&mut self) -> Option<(usize, usize)> {
        let up = self.up;
        let log = &up.inner.log;
        let linger = up.inner.config.linger;
        let full = up.inner.config.batch_max_records as u64;
        let n = self.parts.len();
        for live in [true, false] {
            let mut best: Option<(i32, usize, usize)> = None;
            for k in 0..n {
                let pi = (self.rr + k) % n;
                let p = &mut self.parts[pi];
                let Ok((_, end)) = log.offsets(&p.topic, p.partition) else {
                    continue;
                };
                for (li, lane) in p.lanes.iter_mut().enumerate() {
                    if lane.live != live {
                        continue;
                    }
                    let from = p.held.next_missing(lane.next);
                    let limit = lane.limit.min(end);
                    if from >= limit {
                        lane.waiting_since = None;
                        continue;
                    }
                    // The tail lane waits up to `linger` for a batch to fill up.
                    if lane.limit == u64::MAX && limit - from < full {
                        let since = *lane.waiting_since.get_or_insert_with(Instant::now);
                        if since.elapsed() < linger {
                            continue;
                        }
                    }
                    if best.is_none_or(|(prio, ..)| p.priority > prio) {
                        best = Some((p.priority, pi, li));
                    }
                }
            }
            if let Some((_, pi, li)) = best {
                self.rr = (pi + 1) % n.max(1);
                return Some((pi, li));
            }
        }
        None
    }

    /// Tells the core it will not get `from..to` of a partition: evicted
    /// by the disk quota (a `Skip`), or removed by compaction (a
    /// `Compacted`, a `Skip` to a core older than that).
    async fn send_gap(
        &mut self,
        topic: Arc<str>,
        partition: u32,
        from: u64,
        to: u64,
        compacted: bool,
    ) -> Result<(), Error> {
        let skip = Skip {
            topic: topic.to_string(),
            partition,
            from,
            to,
        };
        self.in_flight.push_back(InFlight {
            topic,
            partition,
            from,
            to,
            bytes: 0,
            events: 0,
        });
        let frame = if compacted && self.version >= wire::COMPACTION {
            Frame::Compacted(skip)
        } else {
            Frame::Skip(skip)
        };
        self.link.send(frame).await.map(drop)
    }

    async fn send_from(&mut self, pi: usize, li: usize) -> Result<(), Error> {
        let inner = &self.up.inner;
        let c = &inner.config;
        let log = &inner.log;
        let p = &mut self.parts[pi];
        let (start, end) = log.offsets(&p.topic, p.partition).map_err(Error::Storage)?;
        let lane = &mut p.lanes[li];
        lane.waiting_since = None;
        let from = p.held.next_missing(lane.next);
        // Up to the next held range, the lane's limit and the partition's end.
        let hole_end = p
            .held
            .missing(from, lane.limit.min(end))
            .first()
            .map_or(from, |&(_, e)| e);
        let topic = p.topic.clone();
        let partition = p.partition;
        if from < start && lane.opens {
            // A lane not yet opened at the core whose start was evicted:
            // open it further on; the hole is the next connection's backlog.
            lane.next = start;
            return Ok(());
        }
        if from < start {
            // Evicted before it could be forwarded: tell the core, so the gap is on record.
            let to = start.min(hole_end);
            lane.next = to;
            tracing::warn!(%topic, partition, from, to, "sync: events were evicted before they were forwarded");
            inner.metrics.skipped_events.fetch_add(to - from, Relaxed);
            return self.send_gap(topic, partition, from, to, false).await;
        }
        let max_bytes = c.batch_max_bytes.min(self.max_batch_bytes);
        let want = (hole_end - from).min(c.batch_max_records as u64) as usize;
        let read = match log.read(&topic, partition, from, want, max_bytes / 2) {
            Ok(r) => r,
            // Retention or the quota moved the start meanwhile: the next round skips.
            Err(LogError::OffsetOutOfRange { .. }) => return Ok(()),
            Err(e) => return Err(Error::Storage(e)),
        };
        // Compaction leaves gaps: one is reported on its own, and a batch
        // carries a dense run of records.
        let gap_end = read
            .records
            .first()
            .map_or(read.next_offset, |r| r.offset)
            .min(hole_end);
        if gap_end > from {
            lane.next = gap_end;
            inner
                .metrics
                .compacted_offsets
                .fetch_add(gap_end - from, Relaxed);
            return self.send_gap(topic, partition, from, gap_end, true).await;
        }
        let mut raw = Vec::with_capacity(max_bytes.min(1 << 20));
        let mut count = 0u32;
        for r in &read.records {
            if r.offset >= hole_end
                || r.offset != from + u64::from(count)
                || (count > 0 && raw.len() + wire::encoded_len(r, self.version) > max_bytes)
            {
                break;
            }
            wire::encode_records(std::iter::once(r), &mut raw, self.version);
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        let opens = std::mem::take(&mut lane.opens);
        let to = from + u64::from(count);
        lane.next = to;
        let raw_len = raw.len();
        let (compression, records) = if c.compression_level > 0 {
            wire::compress(raw, c.compression_level)
        } else {
            (wire::Compression::None, raw)
        };
        let batch = Batch {
            topic: topic.to_string(),
            partition,
            base_offset: from,
            count,
            new_lane: opens,
            edge_end: end,
            compression,
            raw_len: u32::try_from(raw_len).unwrap_or(u32::MAX),
            records,
        };
        let m = &inner.metrics;
        m.batches.fetch_add(1, Relaxed);
        m.sent_events.fetch_add(u64::from(count), Relaxed);
        m.raw_bytes.fetch_add(raw_len as u64, Relaxed);
        self.in_flight.push_back(InFlight {
            topic,
            partition,
            from,
            to,
            bytes: raw_len,
            events: u64::from(count),
        });
        self.in_flight_bytes += raw_len;
        let sent = self.link.send(Frame::Batch(batch)).await?;
        if c.max_bytes_per_sec > 0 {
            self.tokens -= sent as f64;
        }
        Ok(())
    }
}

/// A refused record: its offset, when to offer it again, the core's reason.
pub(super) type Blocked = (u64, Instant, String);

/// How long a record the core refused as too large is gone around before
/// it is offered again (the core's limit may have been raised meanwhile).
pub(super) const BLOCK_RETRY: Duration = Duration::from_secs(600);

/// Splits the lanes that would send offset `off` so that they stop before
/// it and go on after it: one record waits, its partition does not. When the
/// core's ranges leave no room for one more, the lane just stops there.
fn around(lanes: Vec<Lane>, off: u64, held: &RangeSet) -> Vec<Lane> {
    let mut out = Vec::with_capacity(lanes.len() + 1);
    for lane in lanes {
        if off < lane.next || off >= lane.limit {
            out.push(lane);
            continue;
        }
        let after = off + 1;
        let room = held.len() + out.len() + 2 < MAX_RANGES;
        out.push(Lane {
            limit: off,
            ..lane.clone()
        });
        if room && after < lane.limit {
            // The part after it keeps the lane's class (a tail stays live).
            out.push(Lane {
                next: after,
                opens: !held.continues_at(after),
                waiting_since: None,
                ..lane
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(next: u64, limit: u64, live: bool) -> Lane {
        Lane {
            next,
            limit,
            opens: false,
            live,
            waiting_since: None,
        }
    }

    #[test]
    fn lanes_go_around_a_refused_record() {
        let held = RangeSet::from_ranges([(0, 3)]);
        // A backlog lane over the record splits around it; the part after
        // it opens a new range at the core. A live lane above it is untouched.
        let out = around(
            vec![lane(100, u64::MAX, true), lane(3, 100, false)],
            10,
            &held,
        );
        let spans: Vec<(u64, u64, bool, bool)> = out
            .iter()
            .map(|l| (l.next, l.limit, l.opens, l.live))
            .collect();
        assert_eq!(
            spans,
            [
                (100, u64::MAX, false, true),
                (3, 10, false, false),
                (11, 100, true, false)
            ]
        );
        // A tail lane stays a tail after the record.
        let out = around(vec![lane(3, u64::MAX, true)], 3, &held);
        let spans: Vec<(u64, u64, bool, bool)> = out
            .iter()
            .map(|l| (l.next, l.limit, l.opens, l.live))
            .collect();
        assert_eq!(spans, [(3, 3, false, true), (4, u64::MAX, true, true)]);
        // No room for another range at the core: the lane stops at the record.
        let crowded =
            RangeSet::from_ranges((0..MAX_RANGES as u64 - 2).map(|i| (i * 10, i * 10 + 1)));
        let out = around(vec![lane(500, u64::MAX, true)], 600, &crowded);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].limit, 600);
    }
}
