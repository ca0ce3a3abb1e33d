//! A pipeline's task: reads its inputs in steps, runs the engine, writes
//! the rows through the log's write path, and checkpoints — exactly once
//! across crashes.
//!
//! The checkpoint (one metadata value, so it is written whole or not at
//! all) holds, for step `n`: the input positions `P(n)`, the engine's state
//! after everything before them, the output partitions' ends `O(n)` when it
//! was written, and the step's end `P(n+1)`, chosen before the step runs.
//! Every row step `n` writes carries `tributary.pipeline: NAME:n:i`, `i`
//! its place among the step's rows. After a crash the pipeline loads the
//! checkpoint, reads the outputs from `O(n)` to collect the rows of step
//! `n` already written, runs the same records from the same state again —
//! the engine is deterministic, so it emits the same rows — and writes only
//! the missing ones. Then it checkpoints step `n+1` and goes on.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_storage::util::lock;
use tributary_storage::{AppendRecord, Error as LogError, Event, Guard, Isolation, Log};

use tributary_ingest::leader::Lease;

use crate::engine::{Counts, Dest, Engine, State};
use crate::plan::{JoinKind, Plan, Start};

/// Metadata space of the checkpoints (key: the pipeline's name).
pub const STATE_SPACE: &str = "__pipeline_state";
/// On a cluster: which leader's term runs each pipeline (its claim).
const OWNER_SPACE: &str = "__pipeline_owner";
/// The header naming a row's pipeline, step and place.
pub const ORIGIN: &str = "tributary.pipeline";
const VERSION: u32 = 1;
/// Rows kept for the dashboard's chart.
const RECENT: usize = 240;

/// A pipeline's counters and state, shared with the manager.
#[derive(Debug)]
pub struct Status {
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
    pub late: AtomicU64,
    pub errors: AtomicU64,
    pub dropped: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Records skipped because retention removed them before they were read.
    pub skipped: AtomicU64,
    /// Rows found already written after a restart (not written again).
    pub recovered: AtomicU64,
    pub state_bytes: AtomicU64,
    pub open_groups: AtomicU64,
    /// The watermark (`i64::MIN`: none yet).
    pub watermark: AtomicI64,
    pub step: AtomicU64,
    /// The last error, cleared by a step that succeeds.
    pub last_error: Mutex<Option<String>>,
    /// Input positions, for the lag.
    pub positions: Mutex<BTreeMap<(String, u32), u64>>,
    /// The newest output rows: (timestamp, value).
    pub recent: Mutex<VecDeque<(i64, serde_json::Value)>>,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            late: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            state_bytes: AtomicU64::new(0),
            open_groups: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            step: AtomicU64::new(0),
            last_error: Mutex::new(None),
            positions: Mutex::new(BTreeMap::new()),
            recent: Mutex::new(VecDeque::new()),
        }
    }
}

impl Status {
    /// Records the inputs hold beyond the pipeline's positions.
    pub fn lag(&self, log: &Log) -> u64 {
        lock(&self.positions)
            .iter()
            .map(|((t, p), pos)| log.last_stable(t, *p).unwrap_or(*pos).saturating_sub(*pos))
            .sum()
    }

    fn add(&self, c: &Counts) {
        self.rows_in.fetch_add(c.rows_in, Relaxed);
        self.rows_out.fetch_add(c.rows_out, Relaxed);
        self.late.fetch_add(c.late, Relaxed);
        self.errors.fetch_add(c.errors, Relaxed);
        self.dropped.fetch_add(c.dropped, Relaxed);
    }
}

/// The node's budget for every pipeline's state together.
#[derive(Debug)]
pub struct Budget {
    /// The checkpoints' sizes, summed over the node's pipelines.
    pub used: AtomicU64,
    /// `limits.max_pipeline_state_bytes`.
    pub max: u64,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            max,
        }
    }

    /// Moves one pipeline's share from `old` to `new` bytes.
    fn change(&self, old: u64, new: u64) {
        if new >= old {
            self.used.fetch_add(new - old, Relaxed);
        } else {
            self.used
                .fetch_sub((old - new).min(self.used.load(Relaxed)), Relaxed);
        }
    }

    /// Gives back a removed pipeline's share.
    pub fn release(&self, bytes: u64) {
        self.change(bytes, 0);
    }
}

type Positions = BTreeMap<(String, u32), u64>;

/// A checkpoint as stored.
#[derive(Deserialize)]
struct Checkpoint {
    version: u32,
    sql: String,
    step: u64,
    positions: Positions,
    next: Option<Positions>,
    outputs: Positions,
    counters: Counters,
    state: State,
}

/// The counters a checkpoint keeps, so they survive a restart.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Counters {
    rows_in: u64,
    rows_out: u64,
    late: u64,
    errors: u64,
    dropped: u64,
    skipped: u64,
    recovered: u64,
    checkpoints: u64,
}

impl Counters {
    fn of(s: &Status) -> Counters {
        Counters {
            rows_in: s.rows_in.load(Relaxed),
            rows_out: s.rows_out.load(Relaxed),
            late: s.late.load(Relaxed),
            errors: s.errors.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            skipped: s.skipped.load(Relaxed),
            recovered: s.recovered.load(Relaxed),
            checkpoints: s.checkpoints.load(Relaxed),
        }
    }

    fn restore(&self, s: &Status) {
        s.rows_in.store(self.rows_in, Relaxed);
        s.rows_out.store(self.rows_out, Relaxed);
        s.late.store(self.late, Relaxed);
        s.errors.store(self.errors, Relaxed);
        s.dropped.store(self.dropped, Relaxed);
        s.skipped.store(self.skipped, Relaxed);
        s.recovered.store(self.recovered, Relaxed);
        s.checkpoints.store(self.checkpoints, Relaxed);
    }
}

/// A checkpoint being written (the state borrowed from the engine).
#[derive(Serialize)]
struct CheckpointRef<'a> {
    version: u32,
    sql: &'a str,
    step: u64,
    positions: &'a Positions,
    next: &'a Option<Positions>,
    outputs: &'a Positions,
    counters: Counters,
    state: &'a State,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the checkpoint cannot be encoded: {0}")]
    Encode(String),
    #[error("stopped")]
    Stopped,
    #[error("the log refused the rows: {0}")]
    Refused(String),
}

/// The topic rows of `dest` go to (`None`: only counted).
fn destination(plan: &Plan, dest: Dest) -> Option<&str> {
    match dest {
        Dest::Output => Some(plan.output.as_str()),
        Dest::Late => plan.options.late_topic.as_deref(),
        Dest::Dead => plan.options.dead_letter_topic.as_deref(),
    }
}

/// Where the task is between steps.
struct Progress {
    step: u64,
    positions: Positions,
    next: Option<Positions>,
    outputs: Positions,
    /// On a cluster: the claim the step's rows and checkpoints carry.
    guard: Option<Guard>,
}

/// Runs pipeline `name` until `cancel`; `paused` holds it between steps.
pub async fn run(
    log: Log,
    name: String,
    plan: Arc<Plan>,
    status: Arc<Status>,
    cancel: CancellationToken,
    mut paused: watch::Receiver<bool>,
    budget: Arc<Budget>,
) {
    let mut backoff = Duration::from_millis(200);
    // On a cluster the pipeline runs on the leader, under a claim for its
    // term: a deposed leader's late writes are refused, and the new one
    // recovers from the checkpoint as after a crash.
    let Some(mut lease) = tributary_ingest::leader::lead(&log, OWNER_SPACE, &name, &cancel).await
    else {
        return;
    };
    loop {
        let result = run_once(&log, &name, &plan, &status, &lease, &mut paused, &budget).await;
        match result {
            // Deposed (whatever the step was doing when it noticed).
            Err(_) if lease.cancel.is_cancelled() && !cancel.is_cancelled() => {
                // No longer the leader's: wait to lead again.
                lease.cancel.cancel();
                match tributary_ingest::leader::lead(&log, OWNER_SPACE, &name, &cancel).await {
                    Some(l) => lease = l,
                    None => return,
                }
                continue;
            }
            Ok(()) | Err(StepError::Stopped) | Err(StepError::Log(LogError::Closed)) => return,
            Err(e) => {
                tracing::warn!(pipeline = %name, error = %e, "pipeline step failed; resuming from its checkpoint");
                *lock(&status.last_error) = Some(e.to_string());
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Loads the checkpoint (or starts), recovers the interrupted step, then
/// runs steps until stopped or an error.
async fn run_once(
    log: &Log,
    name: &str,
    plan: &Arc<Plan>,
    status: &Status,
    lease: &Lease,
    paused: &mut watch::Receiver<bool>,
    budget: &Budget,
) -> Result<(), StepError> {
    let cancel = &lease.cancel;
    for t in plan.inputs() {
        wait_for_topic(log, &t, cancel, status).await?;
    }
    for t in plan.outputs() {
        ensure_topic(log, &t).await?;
    }
    let before = status.state_bytes.load(Relaxed);
    let (mut engine, mut progress) = load(log, name, plan, status).await?;
    progress.guard.clone_from(&lease.guard);
    let bytes = status.state_bytes.load(Relaxed);
    budget.change(before, bytes);
    engine.over_bytes =
        bytes > plan.options.max_state_bytes as u64 || budget.used.load(Relaxed) > budget.max;
    let mut last_checkpoint = Instant::now();
    // A step chosen before a crash: run it again, writing only what is missing.
    if progress.next.is_some() {
        let present = written(log, name, progress.step, &progress.outputs)?;
        status.recovered.fetch_add(present.len() as u64, Relaxed);
        step(
            log,
            name,
            plan,
            &mut engine,
            &mut progress,
            status,
            &present,
        )
        .await?;
        progress.next = choose(log, plan, &progress.positions)?;
        checkpoint(log, name, plan, &mut engine, &progress, status, budget).await?;
    }
    loop {
        if cancel.is_cancelled() {
            return Err(StepError::Stopped);
        }
        while *paused.borrow() {
            tokio::select! {
                _ = cancel.cancelled() => return Err(StepError::Stopped),
                r = paused.changed() => if r.is_err() { return Err(StepError::Stopped) },
            }
        }
        if progress.next.is_none() {
            // Idle: wait for records, then record the step's end before it runs.
            let wait = Duration::from_millis(plan.options.commit_interval.clamp(10, 1000));
            tokio::select! {
                _ = cancel.cancelled() => return Err(StepError::Stopped),
                _ = tokio::time::sleep(wait) => {}
            }
            progress.next = choose(log, plan, &progress.positions)?;
            if progress.next.is_some() {
                checkpoint(log, name, plan, &mut engine, &progress, status, budget).await?;
                last_checkpoint = Instant::now();
            }
            continue;
        }
        step(
            log,
            name,
            plan,
            &mut engine,
            &mut progress,
            status,
            &HashSet::new(),
        )
        .await?;
        // At most one checkpoint per commit interval.
        let due = last_checkpoint + Duration::from_millis(plan.options.commit_interval);
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        progress.next = choose(log, plan, &progress.positions)?;
        checkpoint(log, name, plan, &mut engine, &progress, status, budget).await?;
        last_checkpoint = Instant::now();
        *lock(&status.last_error) = None;
    }
}

async fn wait_for_topic(
    log: &Log,
    topic: &str,
    cancel: &CancellationToken,
    status: &Status,
) -> Result<(), StepError> {
    let mut said = false;
    while log.topic(topic).is_err() {
        if !said {
            *lock(&status.last_error) = Some(format!("waiting for topic `{topic}`"));
            said = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(StepError::Stopped),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    if said {
        *lock(&status.last_error) = None;
    }
    Ok(())
}

async fn ensure_topic(log: &Log, topic: &str) -> Result<(), StepError> {
    if log.topic(topic).is_ok() {
        return Ok(());
    }
    match log
        .create_topic(log.config().topic_defaults.config(topic))
        .await
    {
        Ok(_) | Err(LogError::TopicExists(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The partitions of `topic` (0 when it is gone).
fn partitions(log: &Log, topic: &str) -> u32 {
    log.topic(topic).map_or(0, |t| t.config.partitions)
}

/// The inputs' partitions in the order a step reads them: a table before
/// the stream (so the stream meets the table as of the step's end).
fn read_order(plan: &Plan) -> Vec<String> {
    let mut inputs = plan.inputs();
    if plan
        .join
        .as_ref()
        .is_some_and(|j| j.kind == JoinKind::Table)
    {
        inputs.reverse();
    }
    inputs
}

async fn load(
    log: &Log,
    name: &str,
    plan: &Arc<Plan>,
    status: &Status,
) -> Result<(Engine, Progress), StepError> {
    let stored = log.meta_get(STATE_SPACE, name.as_bytes())?;
    let stored_len = stored.as_ref().map_or(0, |b| b.len() as u64);
    let cp = stored.and_then(|bytes| match postcard::from_bytes::<Checkpoint>(&bytes) {
        Ok(cp) if cp.version == VERSION => Some(cp),
        Ok(_) | Err(_) => {
            tracing::warn!(pipeline = %name, "the pipeline's checkpoint is unreadable: it starts over");
            None
        }
    });
    let mut positions = Positions::new();
    let mut outputs = Positions::new();
    let (state, step, next) = match cp {
        Some(cp) if cp.sql == plan.sql => {
            cp.counters.restore(status);
            status.state_bytes.store(stored_len, Relaxed);
            status.open_groups.store(cp.state.open() as u64, Relaxed);
            status.watermark.store(
                cp.state
                    .watermark(plan.options.lateness)
                    .unwrap_or(i64::MIN),
                Relaxed,
            );
            status.step.store(cp.step, Relaxed);
            positions = cp.positions;
            outputs = cp.outputs;
            (cp.state, cp.step, cp.next)
        }
        Some(cp) => {
            tracing::warn!(pipeline = %name, "the pipeline's SQL changed: its state starts empty, from the old positions");
            positions = cp.positions;
            (State::default(), cp.step + 1, None)
        }
        None => {
            for t in plan.inputs() {
                for p in 0..partitions(log, &t) {
                    let (start, _) = log.offsets(&t, p)?;
                    let at = match plan.options.start {
                        Start::Earliest => start,
                        Start::Latest => log.last_stable(&t, p)?,
                    };
                    positions.insert((t.clone(), p), at);
                }
            }
            (State::default(), 0, None)
        }
    };
    if outputs.is_empty() {
        outputs = output_ends(log, plan)?;
    }
    *lock(&status.positions) = positions.clone();
    let progress = Progress {
        step,
        positions,
        next,
        outputs,
        guard: None,
    };
    Ok((Engine::new(plan.clone(), state), progress))
}

fn output_ends(log: &Log, plan: &Plan) -> Result<Positions, StepError> {
    let mut ends = Positions::new();
    for t in plan.outputs() {
        for p in 0..partitions(log, &t) {
            ends.insert((t.clone(), p), log.offsets(&t, p)?.1);
        }
    }
    Ok(ends)
}

/// The next step's end: each input partition's readable end, at most
/// `max_batch` records in all beyond the positions; `None` when nothing is new.
fn choose(log: &Log, plan: &Plan, positions: &Positions) -> Result<Option<Positions>, StepError> {
    let mut next = Positions::new();
    let mut any = false;
    let inputs = plan.inputs();
    let parts: u32 = inputs.iter().map(|t| partitions(log, t)).sum();
    let share = (plan.options.max_batch / parts.max(1) as usize).max(1) as u64;
    for t in inputs {
        for p in 0..partitions(log, &t) {
            let from = positions.get(&(t.clone(), p)).copied().unwrap_or(0);
            let (start, _) = log.offsets(&t, p)?;
            let from = from.max(start);
            let end = log.last_stable(&t, p)?.min(from.saturating_add(share));
            any |= end > from;
            next.insert((t.clone(), p), end.max(from));
        }
    }
    Ok(any.then_some(next))
}

/// The places of step `step`'s rows already in the outputs.
fn written(
    log: &Log,
    name: &str,
    step: u64,
    outputs: &Positions,
) -> Result<HashSet<u64>, StepError> {
    let prefix = format!("{name}:{step}:");
    let mut found = HashSet::new();
    for ((topic, p), from) in outputs {
        let Ok((start, end)) = log.offsets(topic, *p) else {
            continue;
        };
        let mut at = (*from).max(start);
        while at < end {
            let r = match log.read_isolated(topic, *p, at, 10_000, 8 << 20, Isolation::Uncommitted)
            {
                Ok(r) => r,
                Err(LogError::OffsetOutOfRange { start, .. }) if start > at => {
                    at = start;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for rec in &r.records {
                for (h, v) in &rec.headers {
                    if h == ORIGIN {
                        if let Some(i) = std::str::from_utf8(v)
                            .ok()
                            .and_then(|v| v.strip_prefix(&prefix))
                            .and_then(|i| i.parse::<u64>().ok())
                        {
                            found.insert(i);
                        }
                    }
                }
            }
            if r.next_offset <= at {
                break;
            }
            at = r.next_offset;
        }
    }
    Ok(found)
}

/// Runs the step from `progress.positions` to `progress.next`, writes its
/// rows (but those in `present`), and moves the positions.
async fn step(
    log: &Log,
    name: &str,
    plan: &Plan,
    engine: &mut Engine,
    progress: &mut Progress,
    status: &Status,
    present: &HashSet<u64>,
) -> Result<(), StepError> {
    let Some(next) = progress.next.clone() else {
        return Ok(());
    };
    let mut out: Vec<(Dest, Event)> = Vec::new();
    let mut counts = Counts::default();
    let stream = plan.input.as_str();
    for topic in read_order(plan) {
        let src = usize::from(topic != stream);
        for ((t, p), end) in next.range((topic.clone(), 0)..=(topic.clone(), u32::MAX)) {
            let mut at = progress
                .positions
                .get(&(t.clone(), *p))
                .copied()
                .unwrap_or(0);
            while at < *end {
                let r = match log.read(t, *p, at, 4096, 4 << 20) {
                    Ok(r) => r,
                    Err(LogError::OffsetOutOfRange { start, .. }) if start > at => {
                        status.skipped.fetch_add(start.min(*end) - at, Relaxed);
                        at = start;
                        continue;
                    }
                    Err(LogError::UnknownTopic(_)) => break,
                    Err(e) => return Err(e.into()),
                };
                for rec in r.records.iter().filter(|r| r.offset < *end) {
                    engine.process(src, t, rec, &mut out, &mut counts);
                }
                if r.next_offset <= at {
                    break;
                }
                at = r.next_offset;
            }
        }
    }
    // Rows a topic could never take (larger than its max_event_bytes,
    // keyless for a compacted topic) become dead letters, without their
    // value if need be, or are only counted: decided from the topics'
    // settings, so a replayed step decides the same; else a step would fail
    // for ever.
    let mut limits: BTreeMap<&str, (usize, bool)> = BTreeMap::new();
    for t in [Dest::Output, Dest::Late, Dest::Dead]
        .into_iter()
        .filter_map(|d| destination(plan, d))
    {
        if let Ok(info) = log.topic(t) {
            let c = info.config;
            limits.insert(t, (c.max_event_bytes, c.cleanup_policy.compacts()));
        }
    }
    let refusal = |topic: &str, event: &Event, room: usize| {
        let (max, compacts) = limits.get(topic).copied()?;
        if event.size() + room > max {
            Some(format!(
                "a row of {} bytes is over {topic}'s max_event_bytes ({max})",
                event.size() + room
            ))
        } else if compacts && event.key.is_none() {
            Some(format!("{topic} is compacted and the row has no key"))
        } else {
            None
        }
    };
    // Write the rows, each with its origin, but those already written.
    let mut by_topic: BTreeMap<&str, Vec<AppendRecord>> = BTreeMap::new();
    'rows: for (i, (mut dest, mut event)) in out.into_iter().enumerate() {
        let i = i as u64;
        let origin = format!("{name}:{}:{i}", progress.step).into_bytes();
        let room = ORIGIN.len() + origin.len();
        let topic = loop {
            let Some(topic) = destination(plan, dest) else {
                continue 'rows;
            };
            let Some(why) = refusal(topic, &event, room) else {
                break topic;
            };
            if dest == Dest::Output {
                counts.rows_out -= 1;
                counts.errors += 1;
            }
            if dest == Dest::Dead && event.value.is_none() {
                // Not even the bare dead letter fits: counted only.
                continue 'rows;
            }
            dest = Dest::Dead;
            event.value = None;
            event.headers = vec![("tributary.error".into(), why.into_bytes())];
        };
        if present.contains(&i) {
            continue;
        }
        event.headers.push((ORIGIN.into(), origin));
        by_topic
            .entry(topic)
            .or_default()
            .push(AppendRecord::from(event));
    }
    // The newest output rows, for the dashboard's chart.
    let shown: Vec<(i64, serde_json::Value)> = by_topic
        .get(plan.output.as_str())
        .map(|rows| {
            rows[rows.len().saturating_sub(RECENT)..]
                .iter()
                .filter_map(|r| {
                    let v = serde_json::from_slice(r.event.value.as_deref()?).ok()?;
                    Some((r.event.timestamp.unwrap_or(0), v))
                })
                .collect()
        })
        .unwrap_or_default();
    for (topic, records) in by_topic {
        let options = tributary_storage::AppendOptions {
            guard: progress.guard.clone(),
            ..Default::default()
        };
        tributary_ingest::append_topic_with(log, topic, records, options)
            .await
            .map_err(|r| StepError::Refused(r.to_string()))?;
    }
    {
        let mut r = lock(&status.recent);
        for row in shown {
            if r.len() >= RECENT {
                r.pop_front();
            }
            r.push_back(row);
        }
    }
    status.add(&counts);
    status
        .open_groups
        .store(engine.state.open() as u64, Relaxed);
    status.watermark.store(
        engine
            .state
            .watermark(plan.options.lateness)
            .unwrap_or(i64::MIN),
        Relaxed,
    );
    progress.positions = next;
    progress.step += 1;
    progress.outputs = output_ends(log, plan)?;
    *lock(&status.positions) = progress.positions.clone();
    Ok(())
}

/// Writes the checkpoint (durable when this returns).
async fn checkpoint(
    log: &Log,
    name: &str,
    plan: &Plan,
    engine: &mut Engine,
    progress: &Progress,
    status: &Status,
    budget: &Budget,
) -> Result<(), StepError> {
    let bytes = postcard::to_allocvec(&CheckpointRef {
        version: VERSION,
        sql: &plan.sql,
        step: progress.step,
        positions: &progress.positions,
        next: &progress.next,
        outputs: &progress.outputs,
        // Counted as written: this checkpoint is one more.
        counters: Counters {
            checkpoints: status.checkpoints.load(Relaxed) + 1,
            ..Counters::of(status)
        },
        state: &engine.state,
    })
    .map_err(|e| StepError::Encode(e.to_string()))?;
    let old = status.state_bytes.swap(bytes.len() as u64, Relaxed);
    budget.change(old, bytes.len() as u64);
    // Over the pipeline's limit or the node's: new groups are refused until
    // the state shrinks.
    engine.over_bytes =
        bytes.len() > plan.options.max_state_bytes || budget.used.load(Relaxed) > budget.max;
    log.put_meta_guarded(
        STATE_SPACE,
        vec![(name.as_bytes().to_vec(), Some(bytes))],
        progress.guard.as_ref(),
    )
    .await?;
    status.checkpoints.fetch_add(1, Relaxed);
    status.step.store(progress.step, Relaxed);
    status
        .open_groups
        .store(engine.state.open() as u64, Relaxed);
    status.watermark.store(
        engine
            .state
            .watermark(plan.options.lateness)
            .unwrap_or(i64::MIN),
        Relaxed,
    );
    *lock(&status.positions) = progress.positions.clone();
    Ok(())
}

/// On a cluster: takes the pipeline's claim from whichever leader runs
/// it, so that none of that task's writes lands after this (a deleted
/// pipeline's checkpoint is not written back).
pub async fn fence(log: &Log, name: &str) -> Result<(), LogError> {
    if !log.is_replicated() {
        return Ok(());
    }
    let guard = Guard {
        space: OWNER_SPACE.into(),
        key: name.as_bytes().to_vec(),
        value: format!("deleted:{}", tributary_storage::util::now_ms()).into_bytes(),
    };
    log.claim(&guard).await
}

/// Removes a pipeline's checkpoint (it was deleted).
pub async fn forget(log: &Log, name: &str) -> Result<(), LogError> {
    log.put_meta(STATE_SPACE, vec![(name.as_bytes().to_vec(), None)])
        .await
}
