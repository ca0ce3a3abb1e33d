//! The operator a pipeline runs: one input record in, result rows out.
//! Everything it remembers is in [`State`], which the runner checkpoints
//! with the input positions; given the same state and the same records in
//! the same order it emits the same rows, which is what recovery relies on.
//!
//! Event time: the watermark is the newest event time seen minus the
//! lateness. An event older than the watermark is late (counted, and
//! written to the late topic when set); a window's row is emitted once the
//! watermark reaches the window's end, so a window never changes after it
//! was emitted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tributary_storage::{Event, Record};

use crate::agg::{Acc, Aggregate};
use crate::expr::{truth, EvalError, Input, Scope};
use crate::plan::{Column, JoinKind, Plan, Window};
use crate::value::{Key, Value};

/// Where an emitted record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The output topic.
    Output,
    /// The late topic.
    Late,
    /// The dead-letter topic.
    Dead,
}

/// Counters of one processing run (added to the pipeline's totals).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Records read.
    pub rows_in: u64,
    /// Rows written to the output.
    pub rows_out: u64,
    /// Events behind the watermark.
    pub late: u64,
    /// Rows whose expressions failed.
    pub errors: u64,
    /// Events refused because the state was full.
    pub dropped: u64,
}

/// A record kept in state (a table's row, a join buffer's event).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kept {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    ts: i64,
    partition: u32,
    offset: u64,
    headers: Vec<(String, Vec<u8>)>,
}

impl Kept {
    fn of(r: &Record) -> Kept {
        Kept {
            key: r.key.clone(),
            value: r.value.clone(),
            ts: r.timestamp,
            partition: r.partition,
            offset: r.offset,
            headers: r.headers.clone(),
        }
    }

    fn record(&self) -> Record {
        Record {
            partition: self.partition,
            offset: self.offset,
            key: self.key.clone(),
            value: self.value.clone(),
            timestamp: self.ts,
            headers: self.headers.clone(),
        }
    }

    fn size(&self) -> usize {
        64 + self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// A session window of one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    start: i64,
    /// The newest event's time.
    last: i64,
    accs: Vec<Acc>,
}

/// A count window of one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Counted {
    n: u64,
    first: i64,
    last: i64,
    accs: Vec<Acc>,
}

/// A stream–stream join's buffer: join key → (time, arrival) → event.
type Buffer = HashMap<Vec<u8>, BTreeMap<(i64, u64), Kept>>;

/// A row's group key, aggregate inputs and window time.
type Grouped = (Key, Vec<Option<Value>>, Option<i64>);

/// Everything a pipeline remembers between records.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The newest event time seen (the watermark is this minus the lateness).
    max_ts: Option<i64>,
    /// Arrival order, for FIRST_VALUE / LAST_VALUE across merged sessions.
    seq: u64,
    /// Tumbling and hopping windows: (end, start) → groups.
    windows: BTreeMap<(i64, i64), HashMap<Key, Vec<Acc>>>,
    /// Session windows per group, by start.
    sessions: HashMap<Key, BTreeMap<i64, Session>>,
    /// Count windows per group.
    counts: HashMap<Key, Counted>,
    /// Groups of an aggregate query without a window.
    groups: HashMap<Key, Vec<Acc>>,
    /// A stream–table join's table: key → latest record.
    table: HashMap<Vec<u8>, Kept>,
    /// A stream–stream join's buffers, per side: join key → (time, seq) → event.
    buffers: [Buffer; 2],
    /// Open groups, windows, table rows and buffered events.
    open: usize,
}

impl State {
    /// Open groups (windows × keys, sessions, table rows, buffered events).
    pub fn open(&self) -> usize {
        self.open
    }

    /// The watermark, if an event was seen.
    pub fn watermark(&self, lateness: i64) -> Option<i64> {
        self.max_ts.map(|m| m.saturating_sub(lateness))
    }
}

/// A row being built: the inputs it came from.
struct Joined<'a> {
    inputs: [Option<&'a Input<'a>>; 2],
    ts: i64,
}

/// The operator.
pub struct Engine {
    plan: Arc<Plan>,
    /// Its state (checkpointed by the runner).
    pub state: State,
    /// Session close times: (close_at, key, start). Rebuilt from `state`.
    session_index: BTreeSet<(i64, Key, i64)>,
    /// Set by the runner when the checkpointed state exceeds its byte limit:
    /// new groups are refused until it shrinks.
    pub over_bytes: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// The value of a record as JSON (`None`: not JSON; a null or empty value
/// reads as JSON null).
pub fn parse_value(r: &Record) -> Option<serde_json::Value> {
    match r.value.as_deref() {
        None | Some([]) => Some(serde_json::Value::Null),
        Some(v) => serde_json::from_slice(v).ok(),
    }
}

impl Engine {
    /// An engine with `state` (fresh or from a checkpoint).
    pub fn new(plan: Arc<Plan>, state: State) -> Engine {
        let mut session_index = BTreeSet::new();
        if let Some(Window::Session { gap, .. }) =
            plan.grouping.as_ref().and_then(|g| g.window.as_ref())
        {
            for (k, sessions) in &state.sessions {
                for s in sessions.values() {
                    session_index.insert((s.last.saturating_add(*gap), k.clone(), s.start));
                }
            }
        }
        Engine {
            plan,
            state,
            session_index,
            over_bytes: false,
        }
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn room(&self) -> bool {
        !self.over_bytes && self.state.open < self.plan.options.max_groups
    }

    /// Processes one record of input `src` (0: the stream, 1: a join's
    /// other side) read from `topic`, pushing what it emits to `out`.
    pub fn process(
        &mut self,
        src: usize,
        topic: &str,
        record: &Record,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) {
        counts.rows_in += 1;
        let json = if self.plan.reads_value[src.min(1)] {
            parse_value(record)
        } else {
            Some(serde_json::Value::Null)
        };
        let input = Input {
            topic,
            record,
            json: json.as_ref(),
        };
        let plan = self.plan.clone();
        let Some(join) = &plan.join else {
            let row = Joined {
                inputs: [Some(&input), None],
                ts: record.timestamp,
            };
            self.row(&row, record, out, counts);
            return;
        };
        match join.kind {
            JoinKind::Table if src == 1 => {
                let Some(key) = record.key.clone() else {
                    return;
                };
                if record.value.is_none() {
                    if self.state.table.remove(&key).is_some() {
                        self.state.open -= 1;
                    }
                } else if let Some(k) = self.state.table.get_mut(&key) {
                    *k = Kept::of(record);
                } else if self.room() {
                    self.state.table.insert(key, Kept::of(record));
                    self.state.open += 1;
                } else {
                    counts.dropped += 1;
                    dead(out, record, topic, "state full: table key not kept");
                }
            }
            JoinKind::Table => {
                let key = match join.left_key.eval(&Scope {
                    inputs: [Some(&input), None],
                    ..Scope::default()
                }) {
                    Ok(Value::Null) => None,
                    Ok(v) => Some(v.text().into_bytes()),
                    Err(e) => {
                        counts.errors += 1;
                        dead(out, record, topic, &e.0);
                        return;
                    }
                };
                let found = key.and_then(|k| self.state.table.get(&k)).map(Kept::record);
                let other_json = found.as_ref().and_then(parse_value);
                let other = found.as_ref().map(|r| Input {
                    topic: &join.topic,
                    record: r,
                    json: other_json.as_ref(),
                });
                if other.is_none() && !join.left_outer {
                    return;
                }
                let row = Joined {
                    inputs: [Some(&input), other.as_ref()],
                    ts: record.timestamp,
                };
                if !self.residual(&row, record, topic, out, counts) {
                    return;
                }
                self.row(&row, record, out, counts);
            }
            JoinKind::Interval { lower, upper } => {
                self.interval_join(src, &input, lower, upper, out, counts)
            }
        }
    }

    fn residual(
        &self,
        row: &Joined,
        record: &Record,
        topic: &str,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) -> bool {
        let Some(r) = self.plan.join.as_ref().and_then(|j| j.residual.as_ref()) else {
            return true;
        };
        match r
            .eval(&Scope {
                inputs: row.inputs,
                ..Scope::default()
            })
            .and_then(|v| truth(&v))
        {
            Ok(Some(true)) => true,
            // LEFT JOIN: a failed extra condition leaves the other side out.
            Ok(_) => false,
            Err(e) => {
                counts.errors += 1;
                dead(out, record, topic, &e.0);
                false
            }
        }
    }

    fn interval_join(
        &mut self,
        src: usize,
        input: &Input,
        lower: i64,
        upper: i64,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) {
        let plan = self.plan.clone();
        let Some(join) = &plan.join else { return };
        let record = input.record;
        let ts = record.timestamp;
        let lateness = plan.options.lateness;
        if let Some(wm) = self.state.watermark(lateness) {
            if ts < wm {
                counts.late += 1;
                late(out, record, input.topic, wm);
                return;
            }
        }
        let key_expr = if src == 0 {
            &join.left_key
        } else {
            &join.right_key
        };
        let mut inputs: [Option<&Input>; 2] = [None, None];
        inputs[src] = Some(input);
        let key = match key_expr.eval(&Scope {
            inputs,
            ..Scope::default()
        }) {
            Ok(Value::Null) => None,
            Ok(v) => Some(v.text().into_bytes()),
            Err(e) => {
                counts.errors += 1;
                dead(out, record, input.topic, &e.0);
                None
            }
        };
        if let Some(key) = key {
            // The other side's events in the time bound: other.ts − s.ts ∈ [lower, upper].
            let (lo, hi) = if src == 0 {
                (ts.saturating_add(lower), ts.saturating_add(upper))
            } else {
                (ts.saturating_sub(upper), ts.saturating_sub(lower))
            };
            let other_topic = if src == 0 {
                join.topic.as_str()
            } else {
                plan.input.as_str()
            };
            let matches: Vec<Record> = self.state.buffers[1 - src]
                .get(&key)
                .map(|b| {
                    b.range((lo, 0)..=(hi, u64::MAX))
                        .map(|(_, k)| k.record())
                        .collect()
                })
                .unwrap_or_default();
            for m in &matches {
                let json = if plan.reads_value[1 - src] {
                    parse_value(m)
                } else {
                    Some(serde_json::Value::Null)
                };
                let other = Input {
                    topic: other_topic,
                    record: m,
                    json: json.as_ref(),
                };
                let mut inputs: [Option<&Input>; 2] = [None, None];
                inputs[src] = Some(input);
                inputs[1 - src] = Some(&other);
                let row = Joined {
                    inputs,
                    ts: ts.max(m.timestamp),
                };
                if self.residual(&row, record, input.topic, out, counts) {
                    self.row(&row, record, out, counts);
                }
            }
            if self.room() {
                self.state.seq += 1;
                let seq = self.state.seq;
                self.state.buffers[src]
                    .entry(key)
                    .or_default()
                    .insert((ts, seq), Kept::of(record));
                self.state.open += 1;
            } else {
                counts.dropped += 1;
                dead(
                    out,
                    record,
                    input.topic,
                    "state full: event not buffered for the join",
                );
            }
        }
        self.advance(ts, out, counts);
    }

    /// WHERE, then a stateless row or the aggregate.
    fn row(
        &mut self,
        row: &Joined,
        record: &Record,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) {
        let plan = self.plan.clone();
        let topic = row.inputs[0].map_or("", |i| i.topic);
        let scope = Scope {
            inputs: row.inputs,
            ..Scope::default()
        };
        if let Some(f) = &plan.filter {
            match f.eval(&scope).and_then(|v| truth(&v)) {
                Ok(Some(true)) => {}
                Ok(_) => return,
                Err(e) => {
                    counts.errors += 1;
                    dead(out, record, topic, &e.0);
                    return;
                }
            }
        }
        let Some(g) = &plan.grouping else {
            match project(&plan, &scope, row.inputs[0]) {
                Ok(value) => {
                    counts.rows_out += 1;
                    out.push((
                        Dest::Output,
                        Event {
                            key: record.key.clone(),
                            value: Some(value),
                            timestamp: Some(row.ts),
                            headers: Vec::new(),
                        },
                    ));
                }
                Err(e) => {
                    counts.errors += 1;
                    dead(out, record, topic, &e.0);
                }
            }
            return;
        };
        // The group's key and the aggregates' inputs, before any state changes.
        let evaluated = (|| -> Result<Grouped, EvalError> {
            let key = Key(g
                .keys
                .iter()
                .map(|k| k.eval(&scope))
                .collect::<Result<_, _>>()?);
            let values = g
                .aggs
                .iter()
                .map(|a| a.input(&scope))
                .collect::<Result<_, _>>()?;
            let time = match g.window.as_ref().and_then(Window::time) {
                None => None,
                Some(t) => match t.eval(&scope)? {
                    Value::Int(ms) => Some(ms),
                    Value::Float(f) if f.is_finite() => Some(f as i64),
                    other => {
                        return Err(EvalError(format!(
                            "the window's time is a {}, not epoch milliseconds",
                            other.type_name()
                        )))
                    }
                },
            };
            Ok((key, values, time))
        })();
        let (key, values, time) = match evaluated {
            Ok(x) => x,
            Err(e) => {
                counts.errors += 1;
                dead(out, record, topic, &e.0);
                return;
            }
        };
        let lateness = plan.options.lateness;
        if let (Some(t), Some(wm)) = (time, self.state.watermark(lateness)) {
            if t < wm {
                counts.late += 1;
                late(out, record, topic, wm);
                return;
            }
        }
        self.state.seq += 1;
        let seq = self.state.seq;
        let result = match (&g.window, time) {
            (None, _) => self.add_plain(key, &values, seq, row.ts, out, counts),
            (Some(Window::Count { n }), _) => {
                self.add_counted(key, &values, seq, *n, record.timestamp, out, counts)
            }
            (Some(Window::Tumble { size, .. }), Some(t)) => {
                self.add_hop(key, &values, seq, t, *size, *size)
            }
            (Some(Window::Hop { slide, size, .. }), Some(t)) => {
                self.add_hop(key, &values, seq, t, *slide, *size)
            }
            (Some(Window::Session { gap, .. }), Some(t)) => {
                self.add_session(key, &values, seq, t, *gap)
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => {}
            Err(Refused::Full) => {
                counts.dropped += 1;
                dead(out, record, topic, "state full: new group refused");
            }
            Err(Refused::Eval(e)) => {
                counts.errors += 1;
                dead(out, record, topic, &e.0);
            }
        }
        if let Some(t) = time {
            self.advance(t, out, counts);
        }
    }

    /// Moves the event-time clock to `t` and emits the windows it closes.
    fn advance(&mut self, t: i64, out: &mut Vec<(Dest, Event)>, counts: &mut Counts) {
        if self.state.max_ts.is_some_and(|m| m >= t) {
            return;
        }
        self.state.max_ts = Some(t);
        let plan = self.plan.clone();
        let Some(wm) = self.state.watermark(plan.options.lateness) else {
            return;
        };
        if let Some(g) = &plan.grouping {
            match &g.window {
                Some(Window::Tumble { .. } | Window::Hop { .. }) => {
                    while let Some(entry) = self.state.windows.first_entry() {
                        let (end, start) = *entry.key();
                        if end > wm {
                            break;
                        }
                        let groups = entry.remove();
                        self.state.open -= groups.len();
                        let mut groups: Vec<_> = groups.into_iter().collect();
                        groups.sort_by(|a, b| a.0.cmp(&b.0));
                        for (key, accs) in groups {
                            self.emit(&key, &accs, Some((start, end)), end, out, counts);
                        }
                    }
                }
                Some(Window::Session { gap, .. }) => {
                    while let Some(first) = self.session_index.first() {
                        if first.0 > wm {
                            break;
                        }
                        let Some((_, key, start)) = self.session_index.pop_first() else {
                            break;
                        };
                        let session = self
                            .state
                            .sessions
                            .get_mut(&key)
                            .and_then(|s| s.remove(&start));
                        if self
                            .state
                            .sessions
                            .get(&key)
                            .is_some_and(BTreeMap::is_empty)
                        {
                            self.state.sessions.remove(&key);
                        }
                        if let Some(s) = session {
                            self.state.open -= 1;
                            let end = s.last.saturating_add(*gap);
                            self.emit(&key, &s.accs, Some((s.start, end)), end, out, counts);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(JoinKind::Interval { lower, upper }) = plan.join.as_ref().map(|j| j.kind) {
            // Events no future event can match: the stream's once their time
            // + upper is behind the watermark, the other side's once their
            // time − lower is.
            for (side, reach) in [(0usize, upper), (1, lower.saturating_neg())] {
                let mut removed = 0;
                self.state.buffers[side].retain(|_, events| {
                    while let Some(e) = events.first_entry() {
                        if e.key().0.saturating_add(reach) >= wm {
                            break;
                        }
                        e.remove();
                        removed += 1;
                    }
                    !events.is_empty()
                });
                self.state.open -= removed;
            }
        }
    }

    fn new_accs(&self, aggs: &[Aggregate]) -> Vec<Acc> {
        aggs.iter().map(Aggregate::start).collect()
    }

    fn add_plain(
        &mut self,
        key: Key,
        values: &[Option<Value>],
        seq: u64,
        ts: i64,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) -> Result<(), Refused> {
        let plan = self.plan.clone();
        let Some(g) = &plan.grouping else {
            return Ok(());
        };
        if !self.state.groups.contains_key(&key) {
            if !self.room() {
                return Err(Refused::Full);
            }
            self.state.open += 1;
            self.state
                .groups
                .insert(key.clone(), self.new_accs(&g.aggs));
        }
        let Some(accs) = self.state.groups.get_mut(&key) else {
            return Ok(());
        };
        fold(&g.aggs, accs, values, seq)?;
        let accs = accs.clone();
        self.emit(&key, &accs, None, ts, out, counts);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_counted(
        &mut self,
        key: Key,
        values: &[Option<Value>],
        seq: u64,
        n: u64,
        ts: i64,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) -> Result<(), Refused> {
        let plan = self.plan.clone();
        let Some(g) = &plan.grouping else {
            return Ok(());
        };
        if !self.state.counts.contains_key(&key) {
            if !self.room() {
                return Err(Refused::Full);
            }
            self.state.open += 1;
            self.state.counts.insert(
                key.clone(),
                Counted {
                    n: 0,
                    first: ts,
                    last: ts,
                    accs: self.new_accs(&g.aggs),
                },
            );
        }
        let Some(c) = self.state.counts.get_mut(&key) else {
            return Ok(());
        };
        fold(&g.aggs, &mut c.accs, values, seq)?;
        c.n += 1;
        c.last = ts;
        if c.n >= n {
            if let Some(c) = self.state.counts.remove(&key) {
                self.state.open -= 1;
                self.emit(&key, &c.accs, Some((c.first, c.last)), c.last, out, counts);
            }
        }
        Ok(())
    }

    fn add_hop(
        &mut self,
        key: Key,
        values: &[Option<Value>],
        seq: u64,
        t: i64,
        slide: i64,
        size: i64,
    ) -> Result<(), Refused> {
        let plan = self.plan.clone();
        let Some(g) = &plan.grouping else {
            return Ok(());
        };
        let last_start = t.div_euclid(slide).saturating_mul(slide);
        let mut start = last_start.saturating_sub(size - slide);
        // Check room for every new group first, so an event is in all its
        // windows or in none.
        let mut new = 0;
        while start <= last_start {
            let end = start.saturating_add(size);
            if !self
                .state
                .windows
                .get(&(end, start))
                .is_some_and(|w| w.contains_key(&key))
            {
                new += 1;
            }
            match start.checked_add(slide) {
                Some(s) => start = s,
                None => break,
            }
        }
        if new > 0 && (self.over_bytes || self.state.open + new > plan.options.max_groups) {
            return Err(Refused::Full);
        }
        let mut start = last_start.saturating_sub(size - slide);
        while start <= last_start {
            let end = start.saturating_add(size);
            let groups = self.state.windows.entry((end, start)).or_default();
            let accs = match groups.get_mut(&key) {
                Some(a) => a,
                None => {
                    self.state.open += 1;
                    groups
                        .entry(key.clone())
                        .or_insert_with(|| g.aggs.iter().map(Aggregate::start).collect())
                }
            };
            fold(&g.aggs, accs, values, seq)?;
            match start.checked_add(slide) {
                Some(s) => start = s,
                None => break,
            }
        }
        Ok(())
    }

    fn add_session(
        &mut self,
        key: Key,
        values: &[Option<Value>],
        seq: u64,
        t: i64,
        gap: i64,
    ) -> Result<(), Refused> {
        let plan = self.plan.clone();
        let Some(g) = &plan.grouping else {
            return Ok(());
        };
        let sessions = self.state.sessions.entry(key.clone()).or_default();
        // Sessions this event touches: [start, last + gap) overlaps [t, t + gap).
        let touching: Vec<i64> = sessions
            .values()
            .filter(|s| t < s.last.saturating_add(gap) && s.start < t.saturating_add(gap))
            .map(|s| s.start)
            .collect();
        if touching.is_empty() && (self.over_bytes || self.state.open >= plan.options.max_groups) {
            if sessions.is_empty() {
                self.state.sessions.remove(&key);
            }
            return Err(Refused::Full);
        }
        let mut merged = Session {
            start: t,
            last: t,
            accs: g.aggs.iter().map(Aggregate::start).collect(),
        };
        let mut first = true;
        for start in touching {
            let Some(s) = sessions.remove(&start) else {
                continue;
            };
            self.session_index
                .remove(&(s.last.saturating_add(gap), key.clone(), s.start));
            if first {
                merged.accs = s.accs;
                first = false;
            } else {
                for (a, (acc, other)) in g.aggs.iter().zip(merged.accs.iter_mut().zip(s.accs)) {
                    a.merge(acc, other);
                }
                self.state.open -= 1;
            }
            merged.start = merged.start.min(s.start);
            merged.last = merged.last.max(s.last);
        }
        if first {
            self.state.open += 1;
        }
        fold(&g.aggs, &mut merged.accs, values, seq)?;
        self.session_index
            .insert((merged.last.saturating_add(gap), key.clone(), merged.start));
        sessions.insert(merged.start, merged);
        Ok(())
    }

    /// A group's row: HAVING, then the SELECT list.
    fn emit(
        &self,
        key: &Key,
        accs: &[Acc],
        window: Option<(i64, i64)>,
        ts: i64,
        out: &mut Vec<(Dest, Event)>,
        counts: &mut Counts,
    ) {
        let Some(g) = &self.plan.grouping else { return };
        let results: Vec<Value> = g
            .aggs
            .iter()
            .zip(accs)
            .map(|(a, acc)| a.result(acc))
            .collect();
        let scope = Scope {
            inputs: [None, None],
            aggs: &results,
            groups: &key.0,
            window,
        };
        if let Some(h) = &g.having {
            match h.eval(&scope).and_then(|v| truth(&v)) {
                Ok(Some(true)) => {}
                Ok(_) => return,
                Err(e) => {
                    counts.errors += 1;
                    dead_row(out, key, ts, &e.0);
                    return;
                }
            }
        }
        match project(&self.plan, &scope, None) {
            Ok(value) => {
                counts.rows_out += 1;
                out.push((
                    Dest::Output,
                    Event {
                        key: key.record_key(),
                        value: Some(value),
                        timestamp: Some(ts),
                        headers: Vec::new(),
                    },
                ));
            }
            Err(e) => {
                counts.errors += 1;
                dead_row(out, key, ts, &e.0);
            }
        }
    }
}

enum Refused {
    Full,
    Eval(EvalError),
}

impl From<EvalError> for Refused {
    fn from(e: EvalError) -> Refused {
        Refused::Eval(e)
    }
}

fn fold(
    aggs: &[Aggregate],
    accs: &mut [Acc],
    values: &[Option<Value>],
    seq: u64,
) -> Result<(), EvalError> {
    for ((a, acc), v) in aggs.iter().zip(accs.iter_mut()).zip(values) {
        a.add_at(acc, v.as_ref(), seq)?;
    }
    Ok(())
}

/// The SELECT list as a JSON object.
fn project(plan: &Plan, scope: &Scope, input: Option<&Input>) -> Result<Vec<u8>, EvalError> {
    let mut obj = serde_json::Map::new();
    for c in &plan.columns {
        match c {
            Column::Named(name, e) => {
                obj.insert(name.clone(), e.eval(scope)?.to_json());
            }
            Column::Wildcard => match input.and_then(|i| i.json) {
                Some(serde_json::Value::Object(m)) => {
                    for (k, v) in m {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                Some(serde_json::Value::Null) => {}
                _ => return Err(EvalError("SELECT *: the value is not a JSON object".into())),
            },
        }
    }
    serde_json::to_vec(&serde_json::Value::Object(obj)).map_err(|e| EvalError(e.to_string()))
}

/// A record for the dead-letter topic: the input with the error.
fn dead(out: &mut Vec<(Dest, Event)>, r: &Record, topic: &str, error: &str) {
    let mut headers = r.headers.clone();
    headers.push(("tributary.error".into(), error.as_bytes().to_vec()));
    headers.push((
        "tributary.source".into(),
        format!("{topic}/{}/{}", r.partition, r.offset).into_bytes(),
    ));
    out.push((
        Dest::Dead,
        Event {
            key: r.key.clone(),
            value: r.value.clone(),
            timestamp: Some(r.timestamp),
            headers,
        },
    ));
}

/// A dead letter for a group's row whose HAVING or SELECT failed.
fn dead_row(out: &mut Vec<(Dest, Event)>, key: &Key, ts: i64, error: &str) {
    out.push((
        Dest::Dead,
        Event {
            key: key.record_key(),
            value: None,
            timestamp: Some(ts),
            headers: vec![("tributary.error".into(), error.as_bytes().to_vec())],
        },
    ));
}

/// A record for the late topic: the input as it was, with the watermark.
fn late(out: &mut Vec<(Dest, Event)>, r: &Record, topic: &str, watermark: i64) {
    let mut headers = r.headers.clone();
    headers.push((
        "tributary.watermark".into(),
        watermark.to_string().into_bytes(),
    ));
    headers.push((
        "tributary.source".into(),
        format!("{topic}/{}/{}", r.partition, r.offset).into_bytes(),
    ));
    out.push((
        Dest::Late,
        Event {
            key: r.key.clone(),
            value: r.value.clone(),
            timestamp: Some(r.timestamp),
            headers,
        },
    ));
}

impl State {
    /// An approximate size of the state's kept records (the checkpoint's
    /// encoded size is the measure the limit uses).
    pub fn kept_bytes(&self) -> usize {
        self.table.values().map(Kept::size).sum::<usize>()
            + self
                .buffers
                .iter()
                .flat_map(|b| b.values())
                .flat_map(|e| e.values())
                .map(Kept::size)
                .sum::<usize>()
    }
}
