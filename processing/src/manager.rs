//! The node's pipelines: those of the config file (`[[pipelines]]`) and
//! those created over the API (kept in the log's metadata, so they survive
//! a restart), each a task with counters, pause and resume; their section
//! of `/v1/stats` and their `/metrics` series.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tributary_frontend::metrics::Kind as MetricKind;
use tributary_frontend::{FrontendContext, MetricsSource, Text};
use tributary_ingest::tasks::Tasks;
use tributary_storage::util::lock;
use tributary_storage::Log;

use crate::plan::{compile, Plan, SqlError};
use crate::runner::{self, Budget, Status};

/// Node-wide bounds on pipelines (`[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    /// Pipelines at most (config file and API together).
    pub max_pipelines: usize,
    /// Every pipeline's checkpointed state together, in bytes.
    pub max_state_bytes: u64,
}

impl Default for NodeLimits {
    fn default() -> NodeLimits {
        NodeLimits {
            max_pipelines: 32,
            max_state_bytes: 256 << 20,
        }
    }
}

/// Metadata space of the pipelines created over the API.
const SPACE: &str = "__pipelines";

/// A pipeline as the config file and the API give it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// `[A-Za-z0-9._-]{1,100}`.
    pub name: String,
    /// One `INSERT INTO … SELECT …` statement.
    pub sql: String,
    /// Created paused.
    #[serde(default)]
    pub paused: bool,
}

/// Why a pipeline request is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad settings.
    #[error("{0}")]
    Invalid(String),
    /// The SQL does not compile.
    #[error("{0}")]
    Sql(#[from] SqlError),
    /// No pipeline of that name.
    #[error("no pipeline named `{0}`")]
    NotFound(String),
    /// The name is taken.
    #[error("a pipeline named `{0}` exists")]
    Exists(String),
    /// Defined in the config file: change it there.
    #[error("pipeline `{0}` is defined in the config file; change it there")]
    FromFile(String),
    /// The node runs as many pipelines as it may.
    #[error("the node runs {0} pipelines, its limit (limits.max_pipelines)")]
    Full(usize),
    /// The log could not store it.
    #[error(transparent)]
    Log(#[from] tributary_storage::Error),
}

/// Checks a pipeline's name and SQL (the config file's, at start).
pub fn check(config: &PipelineConfig) -> Result<Plan, Error> {
    let name_ok = !config.name.is_empty()
        && config.name.len() <= 100
        && config
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return Err(Error::Invalid(format!(
            "pipeline name `{}`: 1 to 100 of A-Z a-z 0-9 . _ -",
            config.name
        )));
    }
    Ok(compile(&config.sql)?)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    sql: String,
    paused: bool,
}

struct Running {
    plan: Arc<Plan>,
    from_file: bool,
    status: Arc<Status>,
    paused: watch::Sender<bool>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// The node's pipelines.
pub struct Manager {
    log: Log,
    limits: NodeLimits,
    budget: Arc<Budget>,
    shutdown: CancellationToken,
    pipelines: Mutex<BTreeMap<String, Running>>,
    /// Tasks of pipelines replaced or relaunched, and the follower of the
    /// stored ones: awaited, with the running ones, when the node stops.
    tasks: Tasks,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl Manager {
    /// Starts the config file's pipelines and the stored ones, and adds the
    /// `pipelines` section to `/v1/stats` and their series to `/metrics`.
    pub fn start(
        cx: &FrontendContext,
        from_file: Vec<PipelineConfig>,
        limits: NodeLimits,
    ) -> Result<Arc<Manager>, Error> {
        if from_file.len() > limits.max_pipelines {
            return Err(Error::Full(limits.max_pipelines));
        }
        let m = Arc::new(Manager {
            log: cx.log.clone(),
            limits,
            budget: Arc::new(Budget::new(limits.max_state_bytes)),
            shutdown: cx.shutdown.clone(),
            pipelines: Mutex::new(BTreeMap::new()),
            tasks: Tasks::default(),
        });
        for config in from_file {
            let plan = check(&config)?;
            m.launch(&config.name, plan, true, config.paused);
        }
        for (k, v) in cx.log.meta(SPACE)? {
            let name = String::from_utf8_lossy(&k).into_owned();
            let stored: Stored = match serde_json::from_slice(&v) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(pipeline = %name, error = %e, "a stored pipeline is unreadable: skipped");
                    continue;
                }
            };
            if lock(&m.pipelines).contains_key(&name) {
                tracing::warn!(pipeline = %name, "a pipeline created over the API has the name of one in the config file: the file's runs");
                continue;
            }
            if lock(&m.pipelines).len() >= limits.max_pipelines {
                tracing::warn!(pipeline = %name, max = limits.max_pipelines, "a stored pipeline is over limits.max_pipelines: not started");
                continue;
            }
            match compile(&stored.sql) {
                Ok(plan) => m.launch(&name, plan, false, stored.paused),
                Err(e) => {
                    tracing::warn!(pipeline = %name, error = %e, "a stored pipeline no longer compiles: skipped")
                }
            }
        }
        if m.log.is_replicated() {
            m.tasks
                .spawn(follow_stored(Arc::downgrade(&m), m.shutdown.clone()));
        }
        let weak = Arc::downgrade(&m);
        cx.stats.register(
            "pipelines",
            Arc::new(move || {
                weak.upgrade()
                    .map_or_else(|| json!([]), |m| json!(m.list()))
            }),
        );
        cx.metrics.register(Arc::new(Metrics(Arc::downgrade(&m))));
        Ok(m)
    }

    /// On a cluster: the pipelines created, deleted, paused or resumed
    /// over the API of another node are launched, stopped, paused or
    /// resumed here too (each node has every pipeline; the leader runs
    /// them).
    fn reconcile(&self) {
        let decode = |v: &[u8]| serde_json::from_slice::<Stored>(v).ok();
        let Some(stored) = tributary_ingest::leader::by_name(&self.log, SPACE, decode) else {
            return;
        };
        let mut launch = Vec::new();
        {
            let mut p = lock(&self.pipelines);
            p.retain(|name, r| {
                let keep = r.from_file || stored.contains_key(name);
                if !keep {
                    r.cancel.cancel();
                    self.budget.release(r.status.state_bytes.load(Relaxed));
                }
                keep
            });
            for (name, s) in &stored {
                match p.get(name) {
                    Some(r) if r.from_file => {}
                    Some(r) if r.plan.sql == s.sql => {
                        if *r.paused.borrow() != s.paused {
                            r.paused.send_replace(s.paused);
                        }
                    }
                    _ if p.len() >= self.limits.max_pipelines && !p.contains_key(name) => {}
                    _ => launch.push((name.clone(), s.clone())),
                }
            }
        }
        for (name, s) in launch {
            match compile(&s.sql) {
                Ok(plan) => self.launch(&name, plan, false, s.paused),
                Err(e) => {
                    tracing::warn!(pipeline = %name, error = %e, "a stored pipeline no longer compiles: skipped")
                }
            }
        }
    }

    fn launch(&self, name: &str, plan: Plan, from_file: bool, paused: bool) {
        let plan = Arc::new(plan);
        let status = Arc::new(Status::default());
        let cancel = self.shutdown.child_token();
        let (paused_tx, paused_rx) = watch::channel(paused);
        let task = tokio::spawn(runner::run(
            self.log.clone(),
            name.to_owned(),
            plan.clone(),
            status.clone(),
            cancel.clone(),
            paused_rx,
            self.budget.clone(),
        ));
        let old = lock(&self.pipelines).insert(
            name.to_owned(),
            Running {
                plan,
                from_file,
                status,
                paused: paused_tx,
                cancel,
                task: Some(task),
            },
        );
        if let Some(mut old) = old {
            old.cancel.cancel();
            if let Some(t) = old.task.take() {
                self.tasks.keep(t);
            }
        }
    }

    /// Waits until every pipeline's task has ended, after the node's
    /// shutdown: they hold the log.
    pub async fn stopped(&self) {
        let running: Vec<JoinHandle<()>> = lock(&self.pipelines)
            .values_mut()
            .filter_map(|r| r.task.take())
            .collect();
        for t in running {
            self.tasks.keep(t);
        }
        self.tasks.stopped().await;
    }

    fn info(&self, name: &str, r: &Running, recent: bool) -> serde_json::Value {
        let s = &r.status;
        let wm = s.watermark.load(Relaxed);
        let mut v = json!({
            "name": name,
            "sql": r.plan.sql,
            "state": if *r.paused.borrow() {
                "paused"
            } else if self.log.leadership().is_some_and(|l| !l.borrow().leads()) {
                // On a cluster the leader runs the pipelines.
                "standby"
            } else {
                "running"
            },
            "from_file": r.from_file,
            "inputs": r.plan.inputs(),
            "output": r.plan.output,
            "rows_in": s.rows_in.load(Relaxed),
            "rows_out": s.rows_out.load(Relaxed),
            "late": s.late.load(Relaxed),
            "errors": s.errors.load(Relaxed),
            "dropped": s.dropped.load(Relaxed),
            "skipped": s.skipped.load(Relaxed),
            "recovered": s.recovered.load(Relaxed),
            "lag": s.lag(&self.log),
            "state_bytes": s.state_bytes.load(Relaxed),
            "open_groups": s.open_groups.load(Relaxed),
            "watermark": if wm == i64::MIN { None } else { Some(wm) },
            "step": s.step.load(Relaxed),
            "checkpoints": s.checkpoints.load(Relaxed),
            "last_error": lock(&s.last_error).clone(),
        });
        if recent {
            let rows: Vec<serde_json::Value> = lock(&s.recent)
                .iter()
                .map(|(ts, row)| json!({"ts": ts, "row": row}))
                .collect();
            v["recent"] = json!(rows);
        }
        v
    }

    /// Every pipeline, by name.
    pub fn list(&self) -> Vec<serde_json::Value> {
        lock(&self.pipelines)
            .iter()
            .map(|(n, r)| self.info(n, r, false))
            .collect()
    }

    /// One pipeline, with its newest output rows.
    pub fn get(&self, name: &str) -> Result<serde_json::Value, Error> {
        let p = lock(&self.pipelines);
        let r = p
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        Ok(self.info(name, r, true))
    }

    /// Creates a pipeline from the API's JSON (`{"name", "sql", "paused"?}`).
    pub async fn create(&self, body: serde_json::Value) -> Result<serde_json::Value, Error> {
        let config: PipelineConfig =
            serde_json::from_value(body).map_err(|e| Error::Invalid(format!("the body: {e}")))?;
        let plan = check(&config)?;
        {
            let p = lock(&self.pipelines);
            if p.contains_key(&config.name) {
                return Err(Error::Exists(config.name));
            }
            if p.len() >= self.limits.max_pipelines {
                return Err(Error::Full(self.limits.max_pipelines));
            }
        }
        let stored = Stored {
            sql: config.sql.clone(),
            paused: config.paused,
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| Error::Invalid(e.to_string()))?;
        self.log
            .put_meta(SPACE, vec![(config.name.as_bytes().to_vec(), Some(bytes))])
            .await?;
        // A pipeline of this name deleted before left no checkpoint.
        self.launch(&config.name, plan, false, config.paused);
        self.get(&config.name)
    }

    /// Deletes a pipeline and its state (its output stays).
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let task = {
            let mut p = lock(&self.pipelines);
            let r = p
                .get(name)
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            if r.from_file {
                return Err(Error::FromFile(name.to_owned()));
            }
            let Some(mut r) = p.remove(name) else {
                return Err(Error::NotFound(name.to_owned()));
            };
            r.cancel.cancel();
            (r.task.take(), r.status.clone())
        };
        let (task, status) = task;
        // The task must have stopped before its checkpoint goes, or it could
        // write it back.
        if let Some(t) = task {
            let _ = t.await;
        }
        // On a cluster the leader's task may be running on another node:
        // a claim of its own refuses that task's writes from now on.
        runner::fence(&self.log, name).await?;
        self.budget.release(status.state_bytes.load(Relaxed));
        self.log
            .put_meta(SPACE, vec![(name.as_bytes().to_vec(), None)])
            .await?;
        runner::forget(&self.log, name).await?;
        Ok(())
    }

    /// Pauses (`true`) or resumes a pipeline.
    pub async fn pause(&self, name: &str, paused: bool) -> Result<serde_json::Value, Error> {
        let from_file = {
            let p = lock(&self.pipelines);
            let r = p
                .get(name)
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            r.paused.send_replace(paused);
            r.from_file
        };
        if !from_file {
            let sql = lock(&self.pipelines)
                .get(name)
                .map(|r| r.plan.sql.clone())
                .unwrap_or_default();
            let bytes = serde_json::to_vec(&Stored { sql, paused })
                .map_err(|e| Error::Invalid(e.to_string()))?;
            self.log
                .put_meta(SPACE, vec![(name.as_bytes().to_vec(), Some(bytes))])
                .await?;
        }
        self.get(name)
    }
}

/// Follows the stored pipelines on a cluster (see [`Manager::reconcile`]).
async fn follow_stored(m: std::sync::Weak<Manager>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let Some(m) = m.upgrade() else { return };
        m.reconcile();
    }
}

struct Metrics(std::sync::Weak<Manager>);

impl MetricsSource for Metrics {
    fn render(&self, out: &mut Text) {
        let Some(m) = self.0.upgrade() else { return };
        let rows: Vec<(String, [u64; 8])> = lock(&m.pipelines)
            .iter()
            .map(|(n, r)| {
                let s = &r.status;
                (
                    n.clone(),
                    [
                        s.rows_in.load(Relaxed),
                        s.rows_out.load(Relaxed),
                        s.late.load(Relaxed),
                        s.errors.load(Relaxed),
                        s.dropped.load(Relaxed),
                        s.lag(&m.log),
                        s.state_bytes.load(Relaxed),
                        s.open_groups.load(Relaxed),
                    ],
                )
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let series: [(&str, MetricKind, &str); 8] = [
            (
                "tributary_pipeline_rows_in_total",
                MetricKind::Counter,
                "Records a pipeline read.",
            ),
            (
                "tributary_pipeline_rows_out_total",
                MetricKind::Counter,
                "Rows a pipeline wrote to its output.",
            ),
            (
                "tributary_pipeline_late_total",
                MetricKind::Counter,
                "Events behind a pipeline's watermark.",
            ),
            (
                "tributary_pipeline_errors_total",
                MetricKind::Counter,
                "Rows whose expressions failed.",
            ),
            (
                "tributary_pipeline_dropped_total",
                MetricKind::Counter,
                "Events refused because a pipeline's state was full.",
            ),
            (
                "tributary_pipeline_lag_records",
                MetricKind::Gauge,
                "Records a pipeline has yet to read.",
            ),
            (
                "tributary_pipeline_state_bytes",
                MetricKind::Gauge,
                "A pipeline's checkpointed state, in bytes.",
            ),
            (
                "tributary_pipeline_open_groups",
                MetricKind::Gauge,
                "A pipeline's open windows, groups, table rows and buffered events.",
            ),
        ];
        for (i, (name, kind, help)) in series.into_iter().enumerate() {
            let mut family = out.family(name, kind, help);
            for (pipeline, values) in &rows {
                family.sample(&[("pipeline", pipeline)], values[i]);
            }
        }
    }
}
