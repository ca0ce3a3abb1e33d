//! The node's connectors: those of the config file (`[[connectors]]`) and
//! those created over the API (kept in the log's metadata, so they survive
//! a restart), each a task with a state, counters, pause and restart.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_frontend::metrics::Kind as MetricKind;
use tributary_frontend::{FrontendContext, MetricsSource, Text};
use tributary_ingest::tasks::Tasks;
use tributary_storage::util::lock;
use tributary_storage::Log;

use std::time::Duration;

use tributary_amqp::bridge::{BridgeConfig, BridgeStats, Direction};

use crate::config::{resolve, ConnectorConfig, Kind};
use crate::http_sink::Webhook;
use crate::kafka::{self, KafkaOut};
use crate::kafka_link::LinkError as KafkaError;
use crate::mqtt::{self, MqttOut};
use crate::mqtt_link::{Endpoint, LinkError};
use crate::postgres_sink::{ConnectError as PgError, PgSink};
use crate::sink::{self, Settings, Status};

/// Metadata space of the connectors created over the API.
const SPACE: &str = "__connectors";
/// On a cluster: which leader's term runs each connector (its claim).
const OWNER_SPACE: &str = "__connector_owner";

/// Why a connector request is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad settings (the message names the key).
    #[error("{0}")]
    Invalid(String),
    /// No connector of that name.
    #[error("no connector named `{0}`")]
    NotFound(String),
    /// The name is taken.
    #[error("a connector named `{0}` exists")]
    Exists(String),
    /// Defined in the config file: change it there.
    #[error("connector `{0}` is defined in the config file; change it there")]
    FromFile(String),
    /// The log could not store it.
    #[error(transparent)]
    Log(#[from] tributary_storage::Error),
}

/// What is stored per API-created connector.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    config: serde_json::Value,
    paused: bool,
}

/// A connector's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Delivering (or waiting for records).
    Running,
    /// Held by `pause`.
    Paused,
    /// Could not start (the error says why); `restart` tries again.
    Failed(String),
    /// On a cluster node that does not lead: the leader runs it.
    Standby,
}

struct Running {
    config: ConnectorConfig,
    from_file: bool,
    status: Arc<Status>,
    /// An AMQP kind: the bridge's own counters.
    bridge: Option<Arc<BridgeStats>>,
    paused: watch::Sender<bool>,
    cancel: CancellationToken,
    failed: Option<String>,
    /// Not started here: on a cluster, only the leader runs connectors.
    standby: bool,
}

/// The node's connectors.
pub struct Manager {
    log: Log,
    shutdown: CancellationToken,
    connectors: Mutex<BTreeMap<String, Running>>,
    /// Every connector's task, awaited when the node stops.
    tasks: Tasks,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl Manager {
    /// Starts the config file's connectors and the stored ones, and adds
    /// the `connectors` section to `/v1/stats` and their series to
    /// `/metrics`.
    pub fn start(
        cx: &FrontendContext,
        from_file: Vec<ConnectorConfig>,
    ) -> Result<Arc<Manager>, Error> {
        let m = Arc::new(Manager {
            log: cx.log.clone(),
            shutdown: cx.shutdown.clone(),
            connectors: Mutex::new(BTreeMap::new()),
            tasks: Tasks::default(),
        });
        for config in from_file {
            m.launch(config, true, false);
        }
        for (k, v) in cx.log.meta(SPACE)? {
            let name = String::from_utf8_lossy(&k).into_owned();
            let stored: Stored = match serde_json::from_slice(&v) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(connector = %name, error = %e, "a stored connector is unreadable: skipped");
                    continue;
                }
            };
            if lock(&m.connectors).contains_key(&name) {
                tracing::warn!(connector = %name, "a connector created over the API has the name of one in the config file: the file's runs");
                continue;
            }
            match ConnectorConfig::from_json(stored.config) {
                Ok(config) => m.launch(config, false, stored.paused),
                Err(e) => {
                    tracing::warn!(connector = %name, error = %e, "a stored connector is no longer valid: skipped")
                }
            }
        }
        if let Some(leadership) = m.log.leadership() {
            m.tasks.spawn(follow_cluster(
                Arc::downgrade(&m),
                leadership,
                m.shutdown.clone(),
            ));
        }
        let weak = Arc::downgrade(&m);
        cx.stats.register(
            "connectors",
            Arc::new(move || {
                weak.upgrade()
                    .map_or_else(|| json!([]), |m| json!(m.list()))
            }),
        );
        cx.metrics.register(Arc::new(Metrics(Arc::downgrade(&m))));
        Ok(m)
    }

    /// Starts `config`'s task (or records why it cannot run).
    fn launch(&self, config: ConnectorConfig, from_file: bool, paused: bool) {
        let status = Arc::new(Status::default());
        let cancel = self.shutdown.child_token();
        let (paused_tx, paused_rx) = watch::channel(paused);
        // On a cluster a connector runs on the leader alone (it reads and
        // writes the one log; run on every node it would deliver or take
        // everything once per node): elsewhere it waits, and
        // `follow_leadership` launches it when this node is elected.
        if !self.leads() {
            let old = lock(&self.connectors).insert(
                config.name.clone(),
                Running {
                    config,
                    from_file,
                    status,
                    bridge: None,
                    paused: paused_tx,
                    cancel,
                    failed: None,
                    standby: true,
                },
            );
            if let Some(old) = old {
                old.cancel.cancel();
            }
            return;
        }
        // On a cluster its writes carry the claim of this leader's term
        // (taken before it starts): a deposed leader's late appends and
        // positions are refused once the next leader has claimed it.
        let claim = self.claim_for(&config.name);
        let guarded = match &claim {
            Some(g) => self.log.guarded(g.clone()),
            None => self.log.clone(),
        };
        let log = &guarded;
        let mut bridge = None;
        let started = match &config.kind {
            Kind::HttpSink(h) => Webhook::new(h).map(|hook| {
                let settings = Settings::new(&config.name, &h.delivery, (100, 1));
                let hooks = vec![hook; settings.concurrency];
                let run = sink::run(
                    log.clone(),
                    settings,
                    hooks,
                    status.clone(),
                    cancel.clone(),
                    paused_rx,
                );
                self.spawn_claimed(claim.clone(), cancel.clone(), run);
            }),
            Kind::PostgresSink(p) => {
                let settings = Settings::new(&config.name, &p.delivery, (5000, 4));
                (0..settings.concurrency)
                    .map(|_| PgSink::new(&config.name, p, settings.dead_letters(log)))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|sinks| {
                        let run = sink::run(
                            log.clone(),
                            settings,
                            sinks,
                            status.clone(),
                            cancel.clone(),
                            paused_rx,
                        );
                        self.spawn_claimed(claim.clone(), cancel.clone(), run);
                    })
            }
            Kind::MqttSink(m) => {
                let settings = Settings::new(&config.name, &m.delivery, (500, 1));
                let id = m.broker.client_id(&config.name);
                (0..settings.concurrency)
                    .map(|i| {
                        // One session per connection.
                        let id = if i == 0 {
                            id.clone()
                        } else {
                            format!("{id}-{i}")
                        };
                        let endpoint = Endpoint::new(&m.broker, id)?;
                        MqttOut::new(
                            endpoint,
                            m.qos,
                            m.retain,
                            m.mqtt_topic.as_deref(),
                            settings.dead_letters(log),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|outs| {
                        let run = sink::run(
                            log.clone(),
                            settings,
                            outs,
                            status.clone(),
                            cancel.clone(),
                            paused_rx,
                        );
                        self.spawn_claimed(claim.clone(), cancel.clone(), run);
                    })
            }
            Kind::MqttSource(m) => {
                Endpoint::new(&m.broker, m.broker.client_id(&config.name)).map(|endpoint| {
                    let run = mqtt::run_source(
                        log.clone(),
                        m.clone(),
                        endpoint,
                        status.clone(),
                        cancel.clone(),
                        paused_rx,
                    );
                    self.spawn_claimed(claim.clone(), cancel.clone(), run);
                })
            }
            Kind::KafkaSink(k) => {
                let settings = Settings::new(&config.name, &k.delivery, (5000, 1));
                (0..settings.concurrency)
                    .map(|i| {
                        KafkaOut::new(&config.name, i, k, log.clone(), settings.dead_letters(log))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|outs| {
                        let run = sink::run(
                            log.clone(),
                            settings,
                            outs,
                            status.clone(),
                            cancel.clone(),
                            paused_rx,
                        );
                        self.spawn_claimed(claim.clone(), cancel.clone(), run);
                    })
            }
            Kind::KafkaSource(k) => k.cluster.options(&config.name).map(|_| {
                let run = kafka::run_source(
                    log.clone(),
                    config.name.clone(),
                    k.clone(),
                    status.clone(),
                    cancel.clone(),
                    paused_rx,
                );
                self.spawn_claimed(claim.clone(), cancel.clone(), run);
            }),
            Kind::AmqpSink(_) | Kind::AmqpSource(_) => amqp_bridge(&config).map(|bridge_config| {
                let stats = Arc::new(BridgeStats::default());
                bridge = Some(stats.clone());
                let log = log.clone();
                let run = pausable(cancel.clone(), paused_rx, move |cancel| {
                    tributary_amqp::bridge::run(
                        log.clone(),
                        bridge_config.clone(),
                        stats.clone(),
                        cancel,
                    )
                });
                self.spawn_claimed(claim.clone(), cancel.clone(), run);
            }),
        };
        let failed = started.err();
        if let Some(e) = &failed {
            tracing::error!(connector = %config.name, error = %e, "connector cannot start");
        }
        let name = config.name.clone();
        let old = lock(&self.connectors).insert(
            name,
            Running {
                config,
                from_file,
                status,
                bridge,
                paused: paused_tx,
                cancel,
                failed,
                standby: false,
            },
        );
        if let Some(old) = old {
            old.cancel.cancel();
        }
    }

    /// On a cluster: the claim a connector named `name` takes for this
    /// leader's term.
    fn claim_for(&self, name: &str) -> Option<tributary_storage::Guard> {
        let l = self.log.leadership()?;
        let l = l.borrow();
        Some(tributary_storage::Guard {
            space: OWNER_SPACE.into(),
            key: name.as_bytes().to_vec(),
            value: format!("{}:{}", l.node, l.term).into_bytes(),
        })
    }

    /// Spawns a connector's task, after taking its claim (on a cluster).
    fn spawn_claimed<F>(
        &self,
        claim: Option<tributary_storage::Guard>,
        cancel: CancellationToken,
        run: F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let log = self.log.clone();
        self.tasks.spawn(async move {
            if let Some(g) = claim {
                while let Err(e) = log.claim(&g).await {
                    tracing::warn!(error = %e, "cannot claim a connector for this leader's term; trying again");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
            run.await;
        });
    }

    /// Waits until every connector's task has ended, after the node's
    /// shutdown: they hold the log.
    pub async fn stopped(&self) {
        self.tasks.stopped().await;
    }

    /// Whether connectors run here: on a single node, or on a cluster's
    /// leader.
    fn leads(&self) -> bool {
        self.log.leadership().is_none_or(|l| l.borrow().leads())
    }

    /// Launches every connector again (each starts, or waits, as this
    /// node leads or not).
    fn relaunch_all(&self) {
        let all: Vec<(ConnectorConfig, bool, bool)> = lock(&self.connectors)
            .values()
            .map(|r| (r.config.clone(), r.from_file, *r.paused.borrow()))
            .collect();
        for (config, from_file, paused) in all {
            self.launch(config, from_file, paused);
        }
    }

    /// On a cluster: the connectors created, deleted, paused or resumed
    /// over the API of another node are launched, stopped, paused or
    /// resumed here too.
    fn reconcile(&self) {
        let decode = |v: &[u8]| serde_json::from_slice::<Stored>(v).ok();
        let Some(stored) = tributary_ingest::leader::by_name(&self.log, SPACE, decode) else {
            return;
        };
        let mut launch = Vec::new();
        {
            let mut c = lock(&self.connectors);
            c.retain(|name, r| {
                let keep = r.from_file || stored.contains_key(name);
                if !keep {
                    r.cancel.cancel();
                }
                keep
            });
            for (name, s) in stored {
                let config = match ConnectorConfig::from_json(s.config) {
                    Ok(config) => config,
                    Err(_) => continue,
                };
                match c.get(&name) {
                    Some(r) if r.from_file => {}
                    Some(r)
                        if serde_json::to_value(&r.config).ok()
                            == serde_json::to_value(&config).ok() =>
                    {
                        if *r.paused.borrow() != s.paused {
                            r.paused.send_replace(s.paused);
                        }
                    }
                    _ => launch.push((config, s.paused)),
                }
            }
        }
        for (config, paused) in launch {
            self.launch(config, false, paused);
        }
    }

    fn state_of(r: &Running) -> State {
        match &r.failed {
            _ if r.standby => State::Standby,
            Some(e) => State::Failed(e.clone()),
            None if *r.paused.borrow() => State::Paused,
            None => State::Running,
        }
    }

    /// A connector's counters: delivered records and batches, retries,
    /// dead letters, lag.
    fn counters(&self, r: &Running) -> [u64; 5] {
        let s = &r.status;
        match (&r.bridge, &r.config.kind) {
            (Some(b), kind) => {
                let lag = match kind {
                    Kind::AmqpSink(a) => {
                        group_lag(&self.log, &sink::group_of(&r.config.name), &a.topic)
                    }
                    _ => 0,
                };
                [
                    b.messages.load(Relaxed),
                    b.batches.load(Relaxed),
                    b.errors.load(Relaxed),
                    b.rejected.load(Relaxed),
                    lag,
                ]
            }
            (None, _) => [
                s.delivered.load(Relaxed),
                s.batches.load(Relaxed),
                s.retries.load(Relaxed),
                s.dead_letters.load(Relaxed),
                s.lag(&self.log),
            ],
        }
    }

    fn info(&self, r: &Running) -> serde_json::Value {
        let s = &r.status;
        let last_error = match &r.bridge {
            Some(b) => lock(&b.last_error).clone(),
            None => lock(&s.last_error).clone(),
        };
        let (state, error) = match Self::state_of(r) {
            State::Running => ("running", last_error),
            State::Paused => ("paused", last_error),
            State::Failed(e) => ("failed", Some(e)),
            State::Standby => ("standby", last_error),
        };
        let [delivered, batches, retries, dead_letters, lag] = self.counters(r);
        json!({
            "name": r.config.name,
            "kind": r.config.kind.label(),
            "source": if r.from_file { "config" } else { "api" },
            "state": state,
            "last_error": error,
            "group": sink::group_of(&r.config.name),
            "delivered_records": delivered,
            "delivered_batches": batches,
            "retries": retries,
            "dead_letters": dead_letters,
            "lag_records": lag,
            "config": r.config,
        })
    }

    /// Every connector, as `GET /v1/connectors` lists them.
    pub fn list(&self) -> Vec<serde_json::Value> {
        lock(&self.connectors)
            .values()
            .map(|r| self.info(r))
            .collect()
    }

    /// One connector.
    pub fn get(&self, name: &str) -> Result<serde_json::Value, Error> {
        lock(&self.connectors)
            .get(name)
            .map(|r| self.info(r))
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    async fn store(&self, config: &ConnectorConfig, paused: bool) -> Result<(), Error> {
        let stored = Stored {
            config: serde_json::to_value(config).map_err(|e| Error::Invalid(e.to_string()))?,
            paused,
        };
        let v = serde_json::to_vec(&stored).map_err(|e| Error::Invalid(e.to_string()))?;
        self.log
            .put_meta(SPACE, vec![(config.name.as_bytes().to_vec(), Some(v))])
            .await?;
        Ok(())
    }

    /// Creates and starts a connector (stored durably first).
    pub async fn create(&self, v: serde_json::Value) -> Result<serde_json::Value, Error> {
        let config = ConnectorConfig::from_json(v).map_err(Error::Invalid)?;
        if lock(&self.connectors).contains_key(&config.name) {
            return Err(Error::Exists(config.name));
        }
        // The operator is there to see it: a target that cannot be
        // reached is refused too.
        probe(&config)
            .await
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.store(&config, false).await?;
        let name = config.name.clone();
        self.launch(config, false, false);
        self.get(&name)
    }

    fn api_created(&self, name: &str) -> Result<(), Error> {
        match lock(&self.connectors).get(name) {
            None => Err(Error::NotFound(name.to_owned())),
            Some(r) if r.from_file => Err(Error::FromFile(name.to_owned())),
            Some(_) => Ok(()),
        }
    }

    /// Stops and removes a connector created over the API, and its
    /// consumer group's positions.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        self.api_created(name)?;
        self.log
            .put_meta(SPACE, vec![(name.as_bytes().to_vec(), None)])
            .await?;
        if let Some(r) = lock(&self.connectors).remove(name) {
            r.cancel.cancel();
        }
        if self.log.is_replicated() {
            // The task may run on another node (the leader) and still be
            // committing: its claim is taken from it, so that nothing it
            // writes lands after this, positions included.
            let fence = tributary_storage::Guard {
                space: OWNER_SPACE.into(),
                key: name.as_bytes().to_vec(),
                value: format!("deleted:{}", tributary_storage::util::now_ms()).into_bytes(),
            };
            self.log.claim(&fence).await?;
        }
        self.log.forget_group(&sink::group_of(name)).await?;
        Ok(())
    }

    /// Holds (`true`) or lets go (`false`) a connector; kept across
    /// restarts for API-created ones.
    pub async fn pause(&self, name: &str, paused: bool) -> Result<serde_json::Value, Error> {
        let config = {
            let c = lock(&self.connectors);
            let r = c
                .get(name)
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            (!r.from_file).then(|| r.config.clone())
        };
        if let Some(config) = config {
            self.store(&config, paused).await?;
        }
        if let Some(r) = lock(&self.connectors).get(name) {
            r.paused.send_replace(paused);
        }
        self.get(name)
    }

    /// Stops a connector's task and starts it again (secrets read again;
    /// a failed one tries to start).
    pub fn restart(&self, name: &str) -> Result<serde_json::Value, Error> {
        let (config, from_file, paused) = {
            let c = lock(&self.connectors);
            let r = c
                .get(name)
                .ok_or_else(|| Error::NotFound(name.to_owned()))?;
            let paused = *r.paused.borrow();
            (r.config.clone(), r.from_file, paused)
        };
        self.launch(config, from_file, paused);
        self.get(name)
    }
}

/// On a cluster: launches every connector when this node is elected and
/// stops them when it is no longer the leader; every second, follows the
/// connectors other nodes' APIs created, changed or deleted.
async fn follow_cluster(
    m: std::sync::Weak<Manager>,
    mut leadership: watch::Receiver<tributary_storage::Leadership>,
    shutdown: CancellationToken,
) {
    let mut led: Option<u64> = None;
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let now = leadership.borrow_and_update().clone();
        let leading = now.leads().then_some(now.term);
        let Some(manager) = m.upgrade() else { return };
        if leading != led {
            manager.relaunch_all();
            led = leading;
        }
        drop(manager);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = leadership.changed() => if changed.is_err() { return },
            _ = every.tick() => {
                let Some(manager) = m.upgrade() else { return };
                manager.reconcile();
            }
        }
    }
}

/// Records of `topic` not yet past `group`'s committed positions.
fn group_lag(log: &Log, group: &str, topic: &str) -> u64 {
    let Ok(info) = log.topic(topic) else {
        return 0;
    };
    let committed: BTreeMap<u32, u64> = log
        .group_offsets(group)
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.topic == topic)
        .map(|o| (o.partition, o.offset))
        .collect();
    info.partitions
        .iter()
        .map(|p| {
            let at = committed
                .get(&p.partition)
                .copied()
                .unwrap_or(p.start_offset);
            p.end_offset.saturating_sub(at.max(p.start_offset))
        })
        .sum()
}

/// The bridge settings of an `amqp_sink` or `amqp_source` (its URL's
/// secret resolved).
fn amqp_bridge(c: &ConnectorConfig) -> Result<BridgeConfig, String> {
    let (direction, url, topic, queue, exchange, routing_key, batch, timeout, min, max) =
        match &c.kind {
            Kind::AmqpSink(a) => (
                Direction::Out,
                &a.url,
                &a.topic,
                String::new(),
                a.exchange.clone(),
                a.routing_key.clone(),
                a.batch_size,
                a.timeout_ms,
                a.min_backoff_ms,
                a.max_backoff_ms,
            ),
            Kind::AmqpSource(a) => (
                Direction::In,
                &a.url,
                &a.topic,
                a.queue.clone(),
                String::new(),
                None,
                a.batch_size,
                a.timeout_ms,
                a.min_backoff_ms,
                a.max_backoff_ms,
            ),
            _ => return Err("not an AMQP connector".into()),
        };
    Ok(BridgeConfig {
        name: c.name.clone(),
        direction,
        url: resolve(url).map_err(|e| format!("`url`: {e}"))?,
        topic: topic.clone(),
        queue,
        exchange,
        routing_key,
        batch,
        timeout: Duration::from_millis(timeout),
        min_backoff: Duration::from_millis(min),
        max_backoff: Duration::from_millis(max.max(min)),
        group: sink::group_of(&c.name),
    })
}

/// Runs `run` while not paused: a pause cancels it, a resume starts it
/// again; until `cancel`.
async fn pausable<F, Fut>(cancel: CancellationToken, mut paused: watch::Receiver<bool>, run: F)
where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        if !sink::unpaused(&cancel, &mut paused).await {
            return;
        }
        let child = cancel.child_token();
        tokio::select! {
            () = run(child.clone()) => return,
            _ = paused.changed() => child.cancel(),
        }
    }
}

/// Connects to a connector's target and checks its settings there (the
/// table and columns of a PostgreSQL sink); webhooks are not called.
async fn probe(config: &ConnectorConfig) -> Result<(), PgError> {
    let broker = match &config.kind {
        Kind::HttpSink(_) => return Ok(()),
        Kind::PostgresSink(p) => return PgSink::check(&config.name, p).await,
        Kind::MqttSink(m) => &m.broker,
        Kind::MqttSource(m) => &m.broker,
        Kind::KafkaSink(k) => return probe_kafka(&config.name, &k.cluster).await,
        Kind::KafkaSource(k) => return probe_kafka(&config.name, &k.cluster).await,
        Kind::AmqpSink(_) | Kind::AmqpSource(_) => {
            let bridge = amqp_bridge(config).map_err(PgError::Invalid)?;
            return tributary_amqp::bridge::probe(&bridge)
                .await
                .map_err(|e| PgError::Unreachable(format!("`url`: cannot connect: {e}")));
        }
    };
    let endpoint =
        Endpoint::new(broker, broker.client_id(&config.name)).map_err(PgError::Invalid)?;
    mqtt::probe(&endpoint).await.map_err(|e| match e {
        LinkError::Refused(e) => PgError::Invalid(format!("`url`: {e}")),
        LinkError::Unreachable(e) => PgError::Unreachable(format!("`url`: cannot connect: {e}")),
    })
}

/// Logs in to a Kafka connector's cluster and reads its metadata.
async fn probe_kafka(name: &str, cluster: &crate::config::KafkaCluster) -> Result<(), PgError> {
    let options = cluster.options(name).map_err(PgError::Invalid)?;
    kafka::probe(&options).await.map_err(|e| match e {
        KafkaError::Refused(e) => PgError::Invalid(format!("`bootstrap_servers`: {e}")),
        e => PgError::Unreachable(format!("`bootstrap_servers`: cannot connect: {e}")),
    })
}

/// Checks the config file's connectors against their targets before the
/// node starts: a target that answers that the settings are wrong (no such
/// table or column, login refused) stops the start with the message; one
/// that cannot be reached is only logged — a gateway must start while the
/// database is down, and its sink retries until it is back.
pub async fn check_at_start(configs: &[ConnectorConfig]) -> Result<(), String> {
    for c in configs {
        match probe(c).await {
            Ok(()) => {}
            Err(PgError::Invalid(e)) => return Err(format!("connector `{}`: {e}", c.name)),
            Err(PgError::Unreachable(e)) => {
                tracing::warn!(connector = %c.name, error = %e, "connector's target unreachable at start; it retries");
            }
        }
    }
    Ok(())
}

/// `/metrics` series of every connector.
struct Metrics(std::sync::Weak<Manager>);

impl MetricsSource for Metrics {
    fn render(&self, out: &mut Text) {
        let Some(m) = self.0.upgrade() else { return };
        let rows: Vec<(String, &'static str, [u64; 6])> = lock(&m.connectors)
            .values()
            .map(|r| {
                let [delivered, batches, retries, dead_letters, lag] = m.counters(r);
                (
                    r.config.name.clone(),
                    r.config.kind.label(),
                    [
                        delivered,
                        batches,
                        retries,
                        dead_letters,
                        lag,
                        u64::from(Manager::state_of(r) == State::Running),
                    ],
                )
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let series: [(&str, MetricKind, &str); 6] = [
            (
                "tributary_connector_delivered_records_total",
                MetricKind::Counter,
                "Records a sink delivered.",
            ),
            (
                "tributary_connector_delivered_batches_total",
                MetricKind::Counter,
                "Batches a sink delivered.",
            ),
            (
                "tributary_connector_retries_total",
                MetricKind::Counter,
                "Failed deliveries tried again.",
            ),
            (
                "tributary_connector_dead_letters_total",
                MetricKind::Counter,
                "Records sent to a dead-letter topic.",
            ),
            (
                "tributary_connector_lag_records",
                MetricKind::Gauge,
                "Records written to a sink's topics and not yet delivered.",
            ),
            (
                "tributary_connector_running",
                MetricKind::Gauge,
                "1 while a connector runs (0: paused or failed).",
            ),
        ];
        for (i, (name, kind, help)) in series.into_iter().enumerate() {
            let mut family = out.family(name, kind, help);
            for (connector, label, values) in &rows {
                family.sample(&[("connector", connector), ("kind", label)], values[i]);
            }
        }
    }
}
