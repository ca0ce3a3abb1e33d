//! Running a node: open the log, declare topics, start the front ends, wait
//! for SIGINT/SIGTERM, then shut down in order: stop accepting, let in-flight
//! requests finish (up to the grace period), make the log durable, exit 0.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tributary_amqp as amqp;
use tributary_devices::{Registry, RegistryConfig};
use tributary_frontend::listener::LimitedListener;
use tributary_frontend::tls;
use tributary_frontend::FrontendContext;
use tributary_frontend::{self as frontend, Frontend};
use tributary_http as http;
use tributary_kafka as kafka;
use tributary_mqtt as mqtt;
use tributary_storage::{Error as LogError, Log};

use crate::config::{AuthMode, Config, Mode};

/// Runs a node until a signal asks it to stop.
pub async fn run(mode: Mode, config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        signals.cancel();
    });
    run_until(mode, config, shutdown).await
}

/// Runs a node until `shutdown` is cancelled (tests cancel it themselves).
pub async fn run_until(
    mode: Mode,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node = start(mode, config, shutdown).await?;
    // One machine-readable line on stdout, so scripts and tests learn the bound ports.
    let mut line = format!(
        "tributary {} listening: http={}",
        mode.as_str(),
        node.http_addr
    );
    if let Some(mqtt) = node.mqtt_addr {
        line.push_str(&format!(" mqtt={mqtt}"));
    }
    if let Some(amqp) = node.amqp_addr {
        line.push_str(&format!(" amqp={amqp}"));
    }
    if let Some(kafka) = node.kafka_addr {
        line.push_str(&format!(" kafka={kafka}"));
    }
    for (name, addr) in [
        ("https", node.https_addr),
        ("mqtts", node.mqtts_addr),
        ("amqps", node.amqps_addr),
        ("kafkas", node.kafkas_addr),
    ] {
        if let Some(a) = addr {
            line.push_str(&format!(" {name}={a}"));
        }
    }
    // Not println!: a stdout that cannot be written must not panic the node.
    let _ = writeln!(std::io::stdout(), "{line}");
    let _ = std::io::stdout().flush();
    node.wait().await
}

/// A started node.
#[derive(Debug)]
pub struct RunningNode {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where MQTT listens (if enabled).
    pub mqtt_addr: Option<SocketAddr>,
    /// Where AMQP listens (if enabled).
    pub amqp_addr: Option<SocketAddr>,
    /// Where HTTPS listens (with `[tls]`).
    pub https_addr: Option<SocketAddr>,
    /// Where MQTT over TLS listens (with `[tls]`).
    pub mqtts_addr: Option<SocketAddr>,
    /// Where AMQPS listens (with `[tls]`).
    pub amqps_addr: Option<SocketAddr>,
    /// Where Kafka listens (if enabled).
    pub kafka_addr: Option<SocketAddr>,
    /// Where Kafka over TLS listens (with `[tls]`).
    pub kafkas_addr: Option<SocketAddr>,
    /// The log (for in-process tests and tools).
    pub log: Log,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningNode {
    /// Waits until the node has shut down (after `shutdown` is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        drop(self.log);
        self.task.await?
    }
}

/// The log cannot take writes now: in a cluster, while a leader is being
/// elected (the write's outcome is unknown).
fn unavailable(e: &LogError) -> bool {
    matches!(e, LogError::Unwritable(_))
}

/// Runs a write made at start. In a cluster it may fail while the leader
/// changes; the writes made at start are idempotent (a topic created or
/// found, a key put unless it has one), so it is tried again, for 30 s.
/// Where clients reach this cluster node's Kafka listeners, as the other
/// nodes name it: `kafka.advertised_host`, else the host of the listener
/// when it is bound to one address, else the host the other nodes reach
/// this one at (its entry in `cluster.peers`).
fn kafka_endpoint(
    config: &Config,
    node: u64,
    bound: SocketAddr,
    tls: Option<SocketAddr>,
) -> kafka::brokers::Endpoint {
    let host = if !config.kafka.advertised_host.is_empty() {
        config.kafka.advertised_host.clone()
    } else if !bound.ip().is_unspecified() {
        bound.ip().to_string()
    } else {
        let peer = config.cluster_config().peers.get(&node).cloned();
        peer.as_deref()
            .and_then(|a| {
                a.rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            })
            .unwrap_or_else(|| "localhost".to_owned())
    };
    kafka::brokers::Endpoint {
        host,
        port: bound.port(),
        tls_port: tls.map(|a| a.port()),
    }
}

async fn at_start<T, E, F, Fut>(clustered: bool, retry_on: fn(&E) -> bool, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let started = std::time::Instant::now();
    loop {
        match f().await {
            Err(e) if clustered && retry_on(&e) && started.elapsed() < Duration::from_secs(30) => {
                tracing::info!(error = %e, "a write at start failed while the cluster is unavailable; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

/// Opens the log, declares topics, binds every listener and starts serving.
/// Returns once the node accepts connections.
pub async fn start(
    mode: Mode,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningNode> {
    #[cfg(feature = "connectors")]
    tributary_connectors::check_at_start(&config.connector_configs())
        .await
        .map_err(|e| anyhow::anyhow!("`connectors`: {e}"))?;
    let log_dir = config.data_dir.join("log");
    let log_config = config.log_config(mode);
    let sled = config.sled_options();
    let opened =
        tokio::task::spawn_blocking(move || Log::open(&log_dir, &sled, log_config)).await?;
    let log =
        opened.with_context(|| format!("cannot open the log in {}", config.data_dir.display()))?;
    let cluster = if config.clustered() {
        if mode != Mode::Core {
            anyhow::bail!(
                "`[cluster]` is set, but only cores form a cluster (run `tributary core`)"
            );
        }
        let mut cluster_config = config.cluster_config();
        if let Some(files) = config.cluster_tls_files() {
            let (server, client) = tributary_frontend::tls::node_configs(&files)
                .context("cannot load the certificates of TLS between nodes")?;
            cluster_config.tls = Some(tributary_cluster::network::NodeTls { server, client });
        }
        let c = tributary_cluster::Cluster::start(cluster_config, log.clone(), &config.data_dir)
            .await
            .context("cannot start the cluster node")?;
        tracing::info!(node = c.id(), listen = %config.cluster.listen, "cluster node started; waiting for a leader");
        c.ready().await;
        tracing::info!(node = c.id(), "cluster node caught up");
        Some(c)
    } else {
        None
    };
    let clustered = cluster.is_some();
    for t in &config.topics {
        let wanted = config.topic_config(t);
        let created = at_start(clustered, unavailable, || log.create_topic(wanted.clone())).await;
        match created {
            Ok(_) => {}
            Err(LogError::TopicExists(_)) => {
                let have = log.topic(&t.name)?.config;
                if have != wanted {
                    tracing::warn!(
                        topic = %t.name,
                        "declared topic differs from the stored one; the stored settings stay (partitions cannot change)"
                    );
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create declared topic `{}`", t.name))
            }
        }
    }

    let http_listener = TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    let http_addr = http_listener.local_addr()?;
    let mut cx = FrontendContext::with_groups(
        log.clone(),
        shutdown.clone(),
        mode.as_str(),
        config.groups_config(),
    );
    cx.metrics.register(Arc::new(cx.groups.clone()));
    if let Some(c) = &cluster {
        cx.metrics
            .register(Arc::new(crate::cluster_link::ClusterMetrics(c.clone())));
        let status = c.clone();
        cx.stats.register(
            "cluster",
            Arc::new(move || serde_json::to_value(status.status()).unwrap_or_default()),
        );
    }
    cx.budget = tributary_frontend::budget::MemoryBudget::new(config.limits.max_buffered_bytes);
    let registry_config = RegistryConfig {
        enforce: config.auth.mode == AuthMode::Devices,
        admin_token: config.auth.admin_token.clone(),
        token_key: config.auth.token_key.clone(),
    };
    let registry = Arc::new(
        at_start(
            clustered,
            |e| matches!(e, tributary_devices::Error::Storage(e) if unavailable(e)),
            || Registry::open(log.clone(), registry_config.clone()),
        )
        .await
        .context("cannot open the device registry")?,
    );
    if config.auth.mode == AuthMode::Devices {
        cx.auth = registry.clone();
        let devices = registry.list().len();
        tracing::info!(devices, "device authentication is on");
        if devices == 0 && !registry.admin_configured() {
            tracing::warn!("auth.mode = \"devices\" with no devices and no auth.admin_token: nobody can connect or add a device");
        }
    } else if !http_addr.ip().is_loopback() {
        tracing::warn!(%http_addr, "anonymous access is allowed on a non-loopback address (set auth.mode = \"devices\")");
    }
    cx.metrics.register(registry.clone());
    cx.devices = Some(registry.clone());
    let persister = registry.spawn_persister(shutdown.clone(), Duration::from_secs(10));
    if clustered {
        registry.spawn_follower(shutdown.clone());
    }
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let files = tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls.client_ca.clone(),
                require_client_cert: config.tls.require_client_cert,
            };
            let tls = tls::Tls::load(files).context("cannot load the TLS certificate")?;
            tls.spawn_reloader(
                shutdown.clone(),
                Duration::from_millis(config.tls.reload_check_ms),
            );
            cx.metrics.register(Arc::new(tls.clone()));
            Some(tls)
        }
        _ => None,
    };
    // The TLS address of a listener, bound now so a clash is reported at start.
    let bind_tls = |key: &'static str, addr: &str, on: bool| {
        let tls = tls.clone();
        let addr = addr.to_owned();
        async move {
            match tls {
                Some(tls) if on && !addr.is_empty() => {
                    let bound = TcpListener::bind(&addr)
                        .await
                        .with_context(|| format!("cannot listen on {key} = {addr}"))?;
                    anyhow::Ok(Some((bound, tls)))
                }
                _ => Ok(None),
            }
        }
    };
    let mqtts = bind_tls(
        "mqtt.tls_listen",
        &config.mqtt.tls_listen,
        config.mqtt.enabled,
    )
    .await?;
    let amqps = bind_tls(
        "amqp.tls_listen",
        &config.amqp.tls_listen,
        config.amqp.enabled,
    )
    .await?;
    let kafkas = bind_tls(
        "kafka.tls_listen",
        &config.kafka.tls_listen,
        config.kafka.enabled,
    )
    .await?;
    let https = bind_tls("http.tls_listen", &config.http.tls_listen, true).await?;
    let addr_of =
        |b: &Option<(TcpListener, tls::Tls)>| b.as_ref().and_then(|(l, _)| l.local_addr().ok());
    let (mqtts_addr, amqps_addr, https_addr) = (addr_of(&mqtts), addr_of(&amqps), addr_of(&https));
    let kafkas_addr = addr_of(&kafkas);
    if mode == Mode::Core && config.forwards() {
        anyhow::bail!(
            "`upstream.url` is set, but only edges forward upstream (run `tributary edge`)"
        );
    }
    let sync_core = if mode == Mode::Core && config.sync.enabled {
        let core =
            tributary_sync::SyncCore::open(log.clone(), cx.auth.clone(), config.sync_config())
                .await
                .context("cannot open the sync state")?;
        crate::sync_link::register_core(&cx, &core);
        Some(core)
    } else {
        None
    };
    let uploader = if mode == Mode::Edge && config.forwards() {
        let up = tributary_sync::Uploader::open(log.clone(), config.upstream_config())
            .await
            .context("cannot open the upstream cursors")?;
        crate::sync_link::register_edge(&cx, &up);
        tracing::info!(urls = ?config.upstream_urls(), edge_id = %config.upstream.edge_id, "forwarding upstream");
        Some(up.spawn(shutdown.clone()))
    } else {
        None
    };
    let mut extra_routes = crate::sync_link::routes(
        sync_core.clone(),
        shutdown.clone(),
        config.sync.max_batch_bytes,
    )
    .merge(crate::cluster_link::routes(cluster.clone()));
    let mut tasks = Vec::new();
    let mut mqtt_addr = None;
    let mut broker = None;
    if config.mqtt.enabled {
        let mqtt_config = config.mqtt_config();
        let max = mqtt_config.max_connections;
        let server = mqtt::Server::new(cx.clone(), mqtt_config)?;
        extra_routes = extra_routes.merge(server.websocket_routes());
        let listen = ("mqtt.listen", config.mqtt.listen.as_str());
        mqtt_addr = Some(start_frontend(&server, listen, mqtts, max, &mut tasks).await?);
        broker = Some(server);
    }
    let mut amqp_addr = None;
    let mut amqp_server = None;
    if config.amqp.enabled {
        let amqp_config = config.amqp_config();
        let max = amqp_config.max_connections;
        let server = amqp::Server::new(cx.clone(), amqp_config);
        let listen = ("amqp.listen", config.amqp.listen.as_str());
        amqp_addr = Some(start_frontend(&server, listen, amqps, max, &mut tasks).await?);
        amqp_server = Some(server);
    }
    let mut kafka_addr = None;
    let mut kafka_server = None;
    if config.kafka.enabled {
        let server = kafka::Server::start(cx.clone(), config.kafka_config()).await?;
        let listen = ("kafka.listen", config.kafka.listen.as_str());
        let max = config.kafka.max_connections;
        let bound = start_frontend(&server, listen, kafkas, max, &mut tasks).await?;
        if let Some(c) = &cluster {
            server.advertise(kafka_endpoint(&config, c.id(), bound, kafkas_addr));
        }
        kafka_addr = Some(bound);
        kafka_server = Some(server);
    }
    let amqp_bridges = config.amqp_bridges();
    if !amqp_bridges.is_empty() {
        tracing::warn!(
            "`[[amqp.bridges]]` is deprecated: the same bridge is a connector, \
             `[[connectors]]` with kind = \"amqp_source\" (direction in) or \"amqp_sink\" (out)"
        );
    }
    let bridges = amqp::bridge::start(&cx, amqp_bridges);
    #[cfg(feature = "connectors")]
    let connectors = tributary_connectors::Manager::start(&cx, config.connector_configs())
        .context("cannot start the connectors")?;
    #[cfg(feature = "connectors")]
    let connector_routes = tributary_connectors::api::routes(connectors.clone());
    #[cfg(not(feature = "connectors"))]
    let connector_routes = axum::Router::new();
    #[cfg(feature = "processing")]
    let pipelines = tributary_processing::Manager::start(
        &cx,
        config.pipeline_configs(),
        tributary_processing::manager::NodeLimits {
            max_pipelines: config.limits.max_pipelines,
            max_state_bytes: config.limits.max_pipeline_state_bytes,
        },
    )
    .context("cannot start the pipelines")?;
    #[cfg(feature = "processing")]
    let connector_routes =
        connector_routes.merge(tributary_processing::api::routes(pipelines.clone()));
    let http_config = config.http_config();
    let listener = LimitedListener::new(http_listener, http_config.max_connections);
    let https_listener = https.map(|(bound, tls)| {
        let limited =
            LimitedListener::with_stats(bound, http_config.max_connections, listener.stats());
        tls::TlsListener::new(limited, tls)
    });
    let http_task = tokio::spawn(http::serve(
        listener,
        https_listener,
        cx,
        http_config,
        extra_routes,
        connector_routes,
    ));
    tracing::info!(mode = mode.as_str(), http = %http_addr, mqtt = ?mqtt_addr, amqp = ?amqp_addr, kafka = ?kafka_addr, data_dir = %config.data_dir.display(), "node ready");

    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let task_log = log.clone();
    let task = tokio::spawn(async move {
        let mut http_task = http_task;
        tokio::select! {
            () = shutdown.cancelled() => {
                match tokio::time::timeout(grace, &mut http_task).await {
                    Ok(joined) => joined??,
                    Err(_) => {
                        tracing::warn!(?grace, "in-flight requests did not finish within the grace period");
                        http_task.abort();
                    }
                }
            }
            joined = &mut http_task => {
                shutdown.cancel();
                joined?.context("the HTTP server stopped")?;
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        for b in bridges {
            let _ = b.await;
        }
        // Connectors and pipelines stop at the shutdown; their tasks hold
        // the log, which must be released when this task ends (a node
        // started again in the same directory finds it in use until then).
        let stopped = async {
            #[cfg(feature = "connectors")]
            connectors.stopped().await;
            #[cfg(feature = "processing")]
            pipelines.stopped().await;
        };
        if tokio::time::timeout(grace, stopped).await.is_err() {
            tracing::warn!("connectors or pipelines did not stop within the grace period");
        }
        #[cfg(feature = "connectors")]
        drop(connectors);
        #[cfg(feature = "processing")]
        drop(pipelines);
        let _ = persister.await;
        if let Some(mut up) = uploader {
            // Its writes are bounded by upstream.timeout_ms; the grace bounds it too.
            if tokio::time::timeout(grace, &mut up).await.is_err() {
                tracing::warn!("the uploader did not stop within the grace period");
                up.abort();
            }
        }
        // MQTT connections answer DISCONNECT and store their sessions, AMQP
        // connections confirm what became durable and close with 320: the log
        // stays open until they are done (or the grace ends).
        let deadline = tokio::time::Instant::now() + grace;
        let open = || {
            broker.as_ref().map_or(0, |b| b.open_connections())
                + amqp_server
                    .as_ref()
                    .map_or(0, |s| s.metrics().open_connections())
                + kafka_server
                    .as_ref()
                    .map_or(0, |s| s.metrics().open_connections())
                + sync_core.as_ref().map_or(0, |c| c.open_connections())
        };
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(c) = &cluster {
            c.shutdown().await;
        }
        task_log.close().await.context("final flush of the log")?;
        // Dropping the last handle joins the log's threads and releases the files.
        tokio::task::spawn_blocking(move || drop(task_log)).await?;
        tracing::info!("stopped cleanly");
        Ok(())
    });
    Ok(RunningNode {
        http_addr,
        mqtt_addr,
        amqp_addr,
        https_addr,
        mqtts_addr,
        amqps_addr,
        kafka_addr,
        kafkas_addr,
        log,
        task,
    })
}

/// Binds a TCP front end's listener (`key` names its config key in errors)
/// and serves it there and on its TLS listener, bound earlier; the tasks go
/// to `tasks`. Returns the plain listener's address.
async fn start_frontend<F: Frontend>(
    frontend: &Arc<F>,
    (key, listen): (&str, &str),
    tls: Option<(TcpListener, tls::Tls)>,
    max_connections: usize,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let bound = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {key} = {listen}"))?;
    let addr = bound.local_addr()?;
    let listener = LimitedListener::new(bound, max_connections);
    tasks.push(tokio::spawn(frontend::serve(
        frontend.clone(),
        listener,
        None,
    )));
    if let Some((bound, tls)) = tls {
        let listener = LimitedListener::new(bound, max_connections);
        tasks.push(tokio::spawn(frontend::serve(
            frontend.clone(),
            listener,
            Some(tls),
        )));
    }
    Ok(addr)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
