//! MQTT 3.1.1 and 5 front end: our own session layer over rumqttc's packet
//! codecs ([`codec`]): the [`Server`] holds what every connection shares and
//! is served by the one accept loop ([`tributary_frontend::serve()`]); a `conn::Connection`
//! per client runs its session.
//!
//! - PUBLISH appends to the log; PUBACK/PUBREC go out only once the log says
//!   durable. Every PUBLISH read from one socket read joins one append, and
//!   appends from many connections share one group commit.
//! - Subscriptions are served from the log: a filter tails the log topics it
//!   can match and filters by MQTT topic, from a per-session cursor. A slow
//!   subscriber only lags in offsets; a persistent session's cursors and
//!   subscriptions are stored in the log's metadata, so an offline device gets
//!   what was published meanwhile, across restarts too.
//! - Retained messages live in the log's metadata (`mqtt.retained`).
//! - The handler is generic over the byte stream: TCP, TLS and WebSocket
//!   (`/mqtt` on the HTTP port) wrap the same code.
//! - What goes wrong, from a packet the codec refuses to a broker that
//!   cannot load its state, is one [`Error`].

pub mod codec;
mod conn;
pub mod error;
pub mod mapping;
mod refusal;
mod session;
pub mod shared;
mod sys;
pub mod topic;
pub mod wills;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tributary_storage::util::lock;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router as HttpRouter;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

pub use error::{Error, Result};
pub use refusal::Refusal;
pub use session::{PendingWill, SessionStore};
pub use topic::Route;
use tributary_devices::auth::Identity;
use tributary_frontend::listener::{ConnectionStats, ListenerSet};
use tributary_frontend::metrics::Kind;
use tributary_frontend::tls::MaybeTls;
use tributary_frontend::Frontend;
use tributary_frontend::{AckHistogram, FrontendContext, MetricsSource, Peer, Reasons, Text};
use tributary_ingest as ingest;

/// MQTT front-end settings (`[mqtt]`).
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Largest packet accepted (and advertised to v5 clients).
    pub max_packet_bytes: usize,
    /// Connections held open at most.
    pub max_connections: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// Unacknowledged QoS 1/2 publishes per connection, each way (v5 receive maximum).
    pub max_inflight: u16,
    /// Topic aliases a v5 client may use.
    pub topic_alias_max: u16,
    /// Longest session expiry granted, seconds (`u32::MAX`: never expires).
    pub max_session_expiry_secs: u32,
    /// Sessions kept at most (online and offline); CONNECTs beyond are refused.
    pub max_sessions: usize,
    /// Retained messages kept at most.
    pub max_retained: usize,
    /// Subscriptions one session may hold (more are refused with 0x97).
    pub max_subscriptions: usize,
    /// Filter → topic/key routes, first match wins.
    pub routes: Vec<Route>,
    /// Log topic of MQTT topics whose first level is no log topic name
    /// (`/a/b`, `Café/x`, `$foo/x`), keyed by the whole MQTT topic.
    pub default_topic: String,
    /// Longest keep-alive a client may ask for, seconds (0: no limit). A
    /// client asking for more, or for none, is told this one (v5 server
    /// keep alive; 3.1.1 clients are held to it without being told).
    pub max_keep_alive_secs: u16,
    /// How often `$SYS/broker/...` statistics are published, seconds (0: never).
    pub sys_interval_secs: u32,
    /// How a shared subscription group picks the member of a message.
    pub shared_policy: shared::Policy,
    /// Shared subscription groups kept at most (more are refused with 0x97).
    pub max_shared_groups: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_bytes: 1024 * 1024,
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(10),
            max_inflight: 1024,
            topic_alias_max: 64,
            max_session_expiry_secs: u32::MAX,
            max_sessions: 100_000,
            max_retained: 100_000,
            max_subscriptions: 100,
            routes: Vec::new(),
            default_topic: "mqtt".to_owned(),
            max_keep_alive_secs: 0,
            sys_interval_secs: 10,
            shared_policy: shared::Policy::RoundRobin,
            max_shared_groups: 1_000,
        }
    }
}

/// MQTT counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MqttMetrics {
    connects: AtomicU64,
    publishes: [AtomicU64; 3],
    deliveries: [AtomicU64; 3],
    acks: AckHistogram,
    rejections: Reasons<Refusal>,
    connections: ListenerSet,
}

impl MqttMetrics {
    /// Counts a refused, closed or skipped thing and logs it, in one call.
    pub fn refuse(&self, why: Refusal) {
        self.rejections.record(why);
    }

    /// [`Self::refuse`], logging what went wrong too.
    pub fn refuse_with(&self, why: Refusal, detail: &dyn std::fmt::Display) {
        self.rejections.record_with(why, detail);
    }

    fn ack_latency(&self, took: Duration, n: u64) {
        self.acks.observe(took, n);
    }

    /// Rejections so far for `reason` (tests read this).
    pub fn rejections(&self, reason: &str) -> u64 {
        self.rejections.get(reason)
    }
}

impl MetricsSource for MqttMetrics {
    fn render(&self, out: &mut Text) {
        out.gauge(
            "tributary_mqtt_connections",
            "Open MQTT connections (TCP and WebSocket).",
            self.connections.open(),
        );
        out.counter(
            "tributary_mqtt_connections_accepted_total",
            "MQTT TCP connections accepted.",
            self.connections.accepted(),
        );
        out.counter(
            "tributary_mqtt_connects_total",
            "CONNECTs accepted.",
            self.connects.load(Relaxed),
        );
        for (name, help, counts) in [
            (
                "tributary_mqtt_publishes_total",
                "PUBLISH packets received, by QoS.",
                &self.publishes,
            ),
            (
                "tributary_mqtt_deliveries_total",
                "PUBLISH packets sent to subscribers, by QoS.",
                &self.deliveries,
            ),
        ] {
            let mut family = out.family(name, Kind::Counter, help);
            for (qos, c) in counts.iter().enumerate() {
                family.sample(&[("qos", &qos)], c.load(Relaxed));
            }
        }
        self.acks.render(
            out,
            "tributary_mqtt_ack_seconds",
            "Time from PUBLISH read to PUBACK/PUBREC (durable).",
        );
        self.rejections.render(
            out,
            "tributary_mqtt_rejections_total",
            "Refused connections, packets and publishes, by reason.",
        );
    }
}

/// State shared by every MQTT connection of a node.
#[derive(Debug)]
pub struct Server {
    cx: FrontendContext,
    config: MqttConfig,
    router: topic::Router,
    metrics: Arc<MqttMetrics>,
    sessions: SessionStore,
    shared: shared::Groups,
    /// The latest `$SYS/broker/...` statistics.
    sys: watch::Sender<sys::Snapshot>,
    next_conn: AtomicU64,
    /// Topics holding a retained message (bounded by `max_retained`).
    retained: Mutex<HashSet<String>>,
}

impl Server {
    /// Builds the broker, loading persistent sessions and registering metrics.
    pub fn new(cx: FrontendContext, config: MqttConfig) -> Result<Arc<Self>> {
        for r in &config.routes {
            r.validate()?;
        }
        let sessions = SessionStore::load(&cx.log).map_err(|error| Error::Load {
            what: "MQTT sessions",
            error,
        })?;
        sessions.load_wills(&cx.log).map_err(|error| Error::Load {
            what: "delayed MQTT wills",
            error,
        })?;
        let retained = cx
            .log
            .meta(session::RETAINED)
            .map_err(|error| Error::Load {
                what: "retained MQTT messages",
                error,
            })?
            .into_iter()
            .filter_map(|(k, _)| String::from_utf8(k).ok())
            .collect();
        let router = topic::Router::new(config.routes.clone(), config.default_topic.clone());
        let shared = shared::Groups::load(
            &cx.log,
            router.clone(),
            config.shared_policy,
            config.max_shared_groups,
        )
        .map_err(|error| Error::Load {
            what: "MQTT shared subscription groups",
            error,
        })?;
        // Groups live while a session holds them: the stored sessions say which.
        for (client, session) in sessions.lock().iter() {
            for sub in session.parked.iter().flat_map(|s| s.subs.iter()) {
                if let Some(Ok((group, filter))) = shared::parse(&sub.filter) {
                    shared.hold(&cx.log, group, filter, client);
                }
            }
        }
        let metrics = Arc::new(MqttMetrics::default());
        cx.metrics.register(metrics.clone());
        let broker = Arc::new(Server {
            router,
            shared,
            sys: sys::channel().0,
            cx,
            config,
            metrics,
            sessions,
            next_conn: AtomicU64::new(1),
            retained: Mutex::new(retained),
        });
        tokio::spawn(session::sweeper(broker.clone()));
        if broker.config.sys_interval_secs > 0 {
            let every = Duration::from_secs(u64::from(broker.config.sys_interval_secs));
            tokio::spawn(sys::publisher(broker.clone(), every));
        }
        let weak = Arc::downgrade(&broker);
        broker.cx.connections.register(
            "mqtt",
            Arc::new(move || weak.upgrade().map_or(0, |b| b.open_connections())),
        );
        Ok(broker)
    }

    /// Counters (tests and `/metrics`).
    pub fn metrics(&self) -> &Arc<MqttMetrics> {
        &self.metrics
    }

    /// MQTT connections open now (TCP and WebSocket).
    pub fn open_connections(&self) -> u64 {
        self.metrics.connections.open()
    }

    /// Sessions (online and offline).
    pub fn sessions(&self) -> &SessionStore {
        &self.sessions
    }

    /// Appends a will (and retains it if asked) for `identity`. Its rights
    /// are checked now, against the device registry's current state: the
    /// ACL it connected with may have narrowed since (a PATCH, a disable, a
    /// rotated token), and a will must not pass where a publish would not.
    async fn publish_will(&self, identity: &Identity, will: codec::Will) {
        self.publish_will_through(&self.cx.log, identity, will)
            .await;
    }

    /// [`Server::publish_will`] through `log`: a handle whose writes are
    /// refused once a stored will has changed ([`wills::take`]).
    async fn publish_will_through(
        &self,
        log: &tributary_storage::Log,
        identity: &Identity,
        will: codec::Will,
    ) {
        let auth = &self.cx.auth;
        if !auth.still_valid(identity)
            || !auth
                .authorize(
                    identity,
                    tributary_devices::auth::Action::Publish,
                    &will.topic,
                )
                .allowed()
        {
            self.metrics.refuse(Refusal::WillNotAuthorized);
            tracing::info!(device = %identity.id, topic = %will.topic, "a will is no longer allowed; dropped");
            return;
        }
        let (log_topic, record) = mapping::event_for(
            self.router.target(&will.topic),
            &will.topic,
            &will.payload,
            will.qos,
            will.retain,
            &will.props,
            None,
        );
        match ingest::append_topic(log, &log_topic, vec![record]).await {
            Ok(_) => {
                if will.retain {
                    if let Err(e) = self
                        .set_retained(&will.topic, &will.payload, will.qos, &will.props)
                        .await
                    {
                        tracing::warn!(topic = %will.topic, error = %e, "cannot retain a will");
                    }
                }
            }
            Err(e) => {
                let detail = format!("topic {}: {e}", will.topic);
                self.metrics.refuse_with(Refusal::WillNotStored, &detail);
            }
        }
    }

    /// Stores (non-empty payload) or clears (empty payload) the retained message of `topic`.
    async fn set_retained(
        &self,
        topic: &str,
        payload: &bytes::Bytes,
        qos: u8,
        props: &codec::MsgProps,
    ) -> Result<()> {
        let value = if payload.is_empty() {
            None
        } else {
            let mut set = lock(&self.retained);
            if !set.contains(topic) && set.len() >= self.config.max_retained {
                return Err(Error::RetainedFull(self.config.max_retained));
            }
            set.insert(topic.to_owned());
            Some(session::Retained::new(payload, qos, props).encode())
        };
        let clear = value.is_none();
        self.cx
            .log
            .put_meta(session::RETAINED, vec![(topic.as_bytes().to_vec(), value)])
            .await
            .map_err(Error::Log)?;
        if clear {
            lock(&self.retained).remove(topic);
        }
        Ok(())
    }

    /// Routes that serve MQTT over WebSockets at `/mqtt` (merge into the HTTP router).
    pub fn websocket_routes(self: &Arc<Self>) -> HttpRouter {
        let stats = Arc::new(ConnectionStats::default());
        self.metrics.connections.add(stats.clone());
        HttpRouter::new()
            .route("/mqtt", get(ws_upgrade))
            .with_state((self.clone(), stats))
    }
}

/// Served on TCP listeners by [`tributary_frontend::serve()`]; each connection is
/// told to stop (v5: DISCONNECT 0x8B) at shutdown.
impl Frontend for Server {
    fn context(&self) -> &FrontendContext {
        &self.cx
    }

    fn listening(&self, stats: Arc<ConnectionStats>) {
        self.metrics.connections.add(stats);
    }

    async fn connection(self: Arc<Self>, stream: MaybeTls, peer: Peer) {
        conn::Connection::run(self, stream, peer).await;
    }
}

type WsState = (Arc<Server>, Arc<ConnectionStats>);

async fn ws_upgrade(
    State((broker, stats)): State<WsState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<tributary_frontend::Peer>>>,
    hold: Option<axum::Extension<tributary_frontend::listener::ReadHold>>,
    ws: WebSocketUpgrade,
) -> Response {
    let hold = hold.map(|axum::Extension(h)| h);
    // The HTTP listener's peer (address, and client certificate on HTTPS)
    // counts for the MQTT login like on the TCP listener.
    let peer = peer.map(|p| (p.0).0).unwrap_or_default();
    let max = broker.config.max_packet_bytes + 8;
    ws.protocols(["mqtt"])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            stats.accepted.fetch_add(1, Relaxed);
            stats.open.fetch_add(1, Relaxed);
            bridge_websocket(socket, broker, peer, hold).await;
            stats.open.fetch_sub(1, Relaxed);
        })
}

/// Runs the MQTT handler over a WebSocket: binary messages carry the byte
/// stream (a packet may span messages, a message may hold several packets).
/// A bounded in-memory pipe joins the two, so a slow side pushes back.
async fn bridge_websocket(
    socket: WebSocket,
    broker: Arc<Server>,
    peer: tributary_frontend::Peer,
    hold: Option<tributary_frontend::listener::ReadHold>,
) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut pipe_read, mut pipe_write) = tokio::io::split(theirs);
    let (mut ws_tx, ws_rx) = socket.split();
    let mut ws_rx = tributary_frontend::listener::ReadHold::wrap(hold, ws_rx);
    let inbound = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) => {
                    if pipe_write.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                // MQTT over WebSockets is binary only (MQTT-6.0.0-1).
                Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        let _ = pipe_write.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = Message::Binary(buf[..n].to_vec().into());
                    if ws_tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    let handler = conn::Connection::run(broker, ours, peer);
    tokio::join!(handler, async {
        tokio::select! {
            () = inbound => {}
            () = outbound => {}
        }
    });
}

/// Sessions map entry, shared between the connection that owns the session
/// and the broker (takeover, expiry, wills).
#[derive(Debug)]
struct Slot {
    /// The connection serving this client id, if online.
    owner: Option<u64>,
    /// Cancelled to make the owner stop (takeover).
    kick: tokio_util::sync::CancellationToken,
    /// Becomes true when the owner has put the session back.
    released: watch::Receiver<bool>,
    /// The session while offline.
    parked: Option<session::Session>,
    /// When an offline session expires.
    expires: Option<Instant>,
    /// A will waiting for its delay.
    will: Option<PendingWill>,
}

type Slots = Mutex<HashMap<String, Slot>>;
