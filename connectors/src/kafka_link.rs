//! A Kafka client of our own for the Kafka connectors, on the
//! `kafka-protocol` crate's messages (the crate the Kafka front end
//! decodes with) and tokio-rustls: connections to the brokers of one
//! cluster, SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and TLS, metadata,
//! and the requests the sink and the source send. No librdkafka: nothing
//! to cross-compile beyond Rust.
//!
//! Each request is sent at one fixed version that Apache Kafka 4.x and
//! Tributary both serve (flexible versions, topics by name): Produce 9,
//! Fetch 12, ListOffsets 7, Metadata 12, FindCoordinator 3,
//! InitProducerId 4, AddPartitionsToTxn 3, EndTxn 3, CreateTopics 5,
//! SaslHandshake 1, SaslAuthenticate 2.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, BrokerId, MetadataRequest, MetadataResponse, RequestHeader, ResponseHeader,
    SaslAuthenticateRequest, SaslHandshakeRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use tokio::net::TcpStream;

use crate::mqtt_link::Io;

/// The largest answer read (a fetch asks for far less; one batch larger
/// than the fetch size still comes whole).
const MAX_RESPONSE: usize = 128 << 20;

/// Versions sent (see the module's text).
pub mod version {
    pub const PRODUCE: i16 = 9;
    pub const FETCH: i16 = 12;
    pub const LIST_OFFSETS: i16 = 7;
    pub const METADATA: i16 = 12;
    pub const FIND_COORDINATOR: i16 = 3;
    pub const INIT_PRODUCER_ID: i16 = 4;
    pub const ADD_PARTITIONS_TO_TXN: i16 = 3;
    pub const END_TXN: i16 = 3;
    pub const CREATE_TOPICS: i16 = 5;
}

/// Kafka error codes the connectors act on.
pub mod code {
    pub const NONE: i16 = 0;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const RECORD_LIST_TOO_LARGE: i16 = 18;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
    pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
    pub const INVALID_RECORD: i16 = 87;
    pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
    pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const CONCURRENT_TRANSACTIONS: i16 = 51;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const SASL_AUTHENTICATION_FAILED: i16 = 58;
    pub const PRODUCER_FENCED: i16 = 90;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const UNKNOWN_LEADER_EPOCH: i16 = 76;
    pub const FENCED_LEADER_EPOCH: i16 = 74;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const THROTTLING_QUOTA_EXCEEDED: i16 = 89;

    /// Codes a client retries after refreshing what it knows (leaders,
    /// coordinators), as Kafka's own clients do.
    pub fn retriable(code: i16) -> bool {
        matches!(
            code,
            UNKNOWN_TOPIC_OR_PARTITION
                | LEADER_NOT_AVAILABLE
                | NOT_LEADER_OR_FOLLOWER
                | REQUEST_TIMED_OUT
                | COORDINATOR_LOAD_IN_PROGRESS
                | COORDINATOR_NOT_AVAILABLE
                | NOT_COORDINATOR
                | NOT_ENOUGH_REPLICAS
                | NOT_ENOUGH_REPLICAS_AFTER_APPEND
                | CONCURRENT_TRANSACTIONS
                | UNKNOWN_LEADER_EPOCH
                | FENCED_LEADER_EPOCH
                | KAFKA_STORAGE_ERROR
                | THROTTLING_QUOTA_EXCEEDED
        )
    }

    /// Codes that mean the settings are wrong (credentials, rights).
    pub fn refused(code: i16) -> bool {
        matches!(
            code,
            TOPIC_AUTHORIZATION_FAILED
                | CLUSTER_AUTHORIZATION_FAILED
                | TRANSACTIONAL_ID_AUTHORIZATION_FAILED
                | SASL_AUTHENTICATION_FAILED
        )
    }
}

/// What went wrong talking to the cluster.
#[derive(Debug, Clone)]
pub enum LinkError {
    /// No connection, or it broke, or an answer did not come in time: try
    /// again later.
    Unreachable(String),
    /// The cluster refused the settings (login, rights, TLS name).
    Refused(String),
    /// The cluster answered with an error code.
    Kafka {
        /// Kafka's error code.
        code: i16,
        /// Where it came from.
        context: String,
    },
}

impl LinkError {
    /// An error code's error, refusals told apart.
    pub fn kafka(code: i16, context: impl Into<String>) -> LinkError {
        let context = context.into();
        if code::refused(code) {
            LinkError::Refused(format!("{context}: Kafka error {code}"))
        } else {
            LinkError::Kafka { code, context }
        }
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Unreachable(e) | LinkError::Refused(e) => f.write_str(e),
            LinkError::Kafka { code, context } => write!(f, "{context}: Kafka error {code}"),
        }
    }
}

/// A SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl Mechanism {
    /// The mechanism Kafka's `sasl.mechanism` names so.
    pub fn parse(s: &str) -> Result<Mechanism, String> {
        match s {
            "PLAIN" => Ok(Mechanism::Plain),
            "SCRAM-SHA-256" => Ok(Mechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(Mechanism::ScramSha512),
            other => Err(format!(
                "`{other}` is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// How to reach and log in to one cluster.
#[derive(Clone)]
pub struct Options {
    /// `host:port` of brokers to ask first.
    pub bootstrap: Vec<(String, u16)>,
    /// TLS, verified against the configured roots.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// SASL mechanism, user and password.
    pub sasl: Option<(Mechanism, String, String)>,
    /// Time limit of connecting and of each answer.
    pub timeout: Duration,
    /// The client id sent with every request.
    pub client_id: String,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("bootstrap", &self.bootstrap)
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl.as_ref().map(|s| s.0))
            .finish_non_exhaustive()
    }
}

/// `host:port` parsed; the port is required.
pub fn parse_server(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{s}`: the port is not a number"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("`{s}` is not host:port"));
    }
    Ok((host.to_owned(), port))
}

impl Options {
    /// Options from settings; `ca_file` only with TLS.
    pub fn new(
        servers: &[String],
        tls: bool,
        ca_file: Option<&Path>,
        sasl: Option<(Mechanism, String, String)>,
        timeout: Duration,
        client_id: String,
    ) -> Result<Options, String> {
        let bootstrap = servers
            .iter()
            .map(|s| parse_server(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("`bootstrap_servers`: {e}"))?;
        let tls = if tls {
            let config = tributary_sync::tls_client_config(ca_file, None)
                .map_err(|e| format!("`ca_file`: {e}"))?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Options {
            bootstrap,
            tls,
            sasl,
            timeout,
            client_id,
        })
    }
}

/// One connection to one broker, logged in.
pub struct Conn {
    io: Io,
    addr: String,
    correlation: i32,
    timeout: Duration,
    client_id: StrBytes,
    rbuf: BytesMut,
}

impl Conn {
    /// Connects to `host:port`, TLS and SASL as the options say.
    pub async fn open(host: &str, port: u16, options: &Options) -> Result<Conn, LinkError> {
        let addr = format!("{host}:{port}");
        let connect = async {
            let unreachable = |e: std::io::Error| LinkError::Unreachable(format!("{addr}: {e}"));
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(unreachable)?;
            let _ = tcp.set_nodelay(true);
            let io = match &options.tls {
                Some(connector) => {
                    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| LinkError::Refused(format!("`{host}`: {e}")))?;
                    Io::Tls(Box::new(
                        connector.connect(name, tcp).await.map_err(unreachable)?,
                    ))
                }
                None => Io::Plain(tcp),
            };
            let mut conn = Conn {
                io,
                addr: addr.clone(),
                correlation: 0,
                timeout: options.timeout,
                client_id: StrBytes::from_string(options.client_id.clone()),
                rbuf: BytesMut::with_capacity(8192),
            };
            if let Some((mechanism, user, password)) = &options.sasl {
                conn.login(*mechanism, user, password).await?;
            }
            Ok(conn)
        };
        match tokio::time::timeout(options.timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(LinkError::Unreachable(format!(
                "{addr}: no connection within {} ms",
                options.timeout.as_millis()
            ))),
        }
    }

    /// The broker's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `req` at `version` and reads its answer.
    pub async fn call<R: Request>(
        &mut self,
        version: i16,
        req: &R,
    ) -> Result<R::Response, LinkError> {
        self.call_within(version, req, self.timeout).await
    }

    /// [`Conn::call`] waiting up to `wait` (a fetch that waits on the
    /// broker's side needs its wait on top).
    pub async fn call_within<R: Request>(
        &mut self,
        version: i16,
        req: &R,
        wait: Duration,
    ) -> Result<R::Response, LinkError> {
        let key = ApiKey::try_from(R::KEY)
            .map_err(|()| LinkError::Unreachable(format!("unknown API key {}", R::KEY)))?;
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(self.client_id.clone()));
        let mut frame = BytesMut::with_capacity(256);
        frame.put_i32(0);
        let encode = |frame: &mut BytesMut| -> anyhow::Result<()> {
            header.encode(frame, key.request_header_version(version))?;
            req.encode(frame, version)
        };
        encode(&mut frame)
            .map_err(|e| LinkError::Unreachable(format!("cannot encode a {key:?} request: {e}")))?;
        let len = i32::try_from(frame.len() - 4)
            .map_err(|_| LinkError::Unreachable(format!("a {key:?} request too large")))?;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let addr = self.addr.clone();
        let exchange = async {
            self.io
                .write_all(&frame)
                .await
                .map_err(|e| LinkError::Unreachable(format!("{addr}: {e}")))?;
            self.read_frame().await
        };
        let mut body = match tokio::time::timeout(wait, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(LinkError::Unreachable(format!(
                    "{addr}: no answer to {key:?} within {} ms",
                    wait.as_millis()
                )))
            }
        };
        let bad = |e: anyhow::Error| {
            LinkError::Unreachable(format!("{addr}: an unreadable {key:?} answer: {e}"))
        };
        let header =
            ResponseHeader::decode(&mut body, key.response_header_version(version)).map_err(bad)?;
        if header.correlation_id != self.correlation {
            return Err(LinkError::Unreachable(format!(
                "{addr}: an answer out of order ({} for {})",
                header.correlation_id, self.correlation
            )));
        }
        R::Response::decode(&mut body, version).map_err(bad)
    }

    async fn read_frame(&mut self) -> Result<Bytes, LinkError> {
        loop {
            if self.rbuf.len() >= 4 {
                let len =
                    i32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > MAX_RESPONSE {
                    return Err(LinkError::Unreachable(format!(
                        "{}: an answer of {len} bytes (at most {MAX_RESPONSE})",
                        self.addr
                    )));
                }
                if self.rbuf.len() >= 4 + len {
                    self.rbuf.advance(4);
                    return Ok(self.rbuf.split_to(len).freeze());
                }
                self.rbuf.reserve(4 + len - self.rbuf.len());
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| LinkError::Unreachable(format!("{}: {e}", self.addr)))?;
            if n == 0 {
                return Err(LinkError::Unreachable(format!(
                    "{}: the broker closed the connection",
                    self.addr
                )));
            }
        }
    }

    async fn login(&mut self, m: Mechanism, user: &str, password: &str) -> Result<(), LinkError> {
        let h = self
            .call(
                1,
                &SaslHandshakeRequest::default()
                    .with_mechanism(StrBytes::from_static_str(m.name())),
            )
            .await?;
        if h.error_code != 0 {
            return Err(LinkError::Refused(format!(
                "{}: SASL {} not enabled (the broker offers {:?})",
                self.addr,
                m.name(),
                h.mechanisms.iter().map(|m| m.as_str()).collect::<Vec<_>>()
            )));
        }
        match m {
            Mechanism::Plain => {
                let mut token = Vec::with_capacity(user.len() + password.len() + 2);
                token.push(0);
                token.extend_from_slice(user.as_bytes());
                token.push(0);
                token.extend_from_slice(password.as_bytes());
                self.authenticate(token).await.map(|_| ())
            }
            Mechanism::ScramSha256 => self.scram::<sha2::Sha256>(user, password).await,
            Mechanism::ScramSha512 => self.scram::<sha2::Sha512>(user, password).await,
        }
    }

    async fn authenticate(&mut self, token: Vec<u8>) -> Result<Bytes, LinkError> {
        let a = self
            .call(
                2,
                &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token)),
            )
            .await?;
        if a.error_code != 0 {
            return Err(LinkError::Refused(format!(
                "{}: login refused: {}",
                self.addr,
                a.error_message.as_ref().map_or("", |m| m.as_str())
            )));
        }
        Ok(a.auth_bytes)
    }

    /// SCRAM (RFC 5802, as Kafka's KIP-84): client-first, server-first,
    /// client-final with the proof, server-final checked.
    async fn scram<D>(&mut self, user: &str, password: &str) -> Result<(), LinkError>
    where
        D: sha2::Digest + hmac::digest::core_api::BlockSizeUser + Clone,
    {
        use base64::Engine as _;
        let mut raw = [0u8; 24];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut raw)
            .map_err(|_| LinkError::Refused("SCRAM: no random nonce".into()))?;
        let nonce = base64::engine::general_purpose::STANDARD.encode(raw);
        let name = user.replace('=', "=3D").replace(',', "=2C");
        let first_bare = format!("n={name},r={nonce}");
        let server_first = self
            .authenticate(format!("n,,{first_bare}").into_bytes())
            .await?;
        let server_first = std::str::from_utf8(&server_first)
            .map_err(|_| LinkError::Refused("SCRAM: a server-first not UTF-8".into()))?;
        let (client_final, expected) =
            scram_final::<D>(&first_bare, server_first, &nonce, password)
                .map_err(|e| LinkError::Refused(format!("SCRAM: {e}")))?;
        let server_final = self.authenticate(client_final.into_bytes()).await?;
        if String::from_utf8_lossy(&server_final) != expected {
            return Err(LinkError::Refused(
                "SCRAM: the server's signature does not match".into(),
            ));
        }
        Ok(())
    }
}

/// SCRAM's client-final message for `server_first` and the server-final
/// message expected back (RFC 5802 section 3).
fn scram_final<D>(
    first_bare: &str,
    server_first: &str,
    nonce: &str,
    password: &str,
) -> Result<(String, String), &'static str>
where
    D: sha2::Digest + hmac::digest::core_api::BlockSizeUser + Clone,
{
    use base64::Engine as _;
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let field = |k: &str| {
        server_first
            .split(',')
            .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let (Some(r), Some(s), Some(i)) = (field("r"), field("s"), field("i")) else {
        return Err("a server-first without r, s, i");
    };
    if !r.starts_with(nonce) || r.len() == nonce.len() {
        return Err("the server's nonce does not extend ours");
    }
    let salt = b64.decode(s).map_err(|_| "a salt not base64")?;
    let iterations: u32 = i.parse().map_err(|_| "a bad iteration count")?;
    if !(1..=1_000_000).contains(&iterations) {
        return Err("an iteration count out of range");
    }
    let mac = |key: &[u8], data: &[u8]| -> Result<Vec<u8>, &'static str> {
        let mut m = <hmac::SimpleHmac<D> as hmac::digest::KeyInit>::new_from_slice(key)
            .map_err(|_| "an HMAC key")?;
        m.update(data);
        Ok(m.finalize().into_bytes().to_vec())
    };
    // Hi(password, salt, i)
    let mut block = salt;
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = mac(password.as_bytes(), &block)?;
    let mut salted = u.clone();
    for _ in 1..iterations {
        u = mac(password.as_bytes(), &u)?;
        salted.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
    }
    let client_key = mac(&salted, b"Client Key")?;
    let stored_key = D::digest(&client_key).to_vec();
    let without_proof = format!("c=biws,r={r}");
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let signature = mac(&stored_key, auth_message.as_bytes())?;
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(a, b)| a ^ b)
        .collect();
    let server_key = mac(&salted, b"Server Key")?;
    let expected = format!(
        "v={}",
        b64.encode(mac(&server_key, auth_message.as_bytes())?)
    );
    Ok((format!("{without_proof},p={}", b64.encode(proof)), expected))
}

/// A partition's leader as metadata last said.
#[derive(Debug, Clone, Copy)]
pub struct PartitionInfo {
    pub leader: i32,
}

/// Connections to one cluster's brokers, and what metadata said of it.
pub struct Cluster {
    options: Options,
    brokers: HashMap<i32, (String, u16)>,
    conns: HashMap<i32, Conn>,
    /// A connection to a bootstrap server (before metadata named brokers).
    bootstrap: Option<Conn>,
    /// Partitions per topic, as last asked.
    pub topics: HashMap<String, Vec<PartitionInfo>>,
}

impl Cluster {
    pub fn new(options: Options) -> Cluster {
        Cluster {
            options,
            brokers: HashMap::new(),
            conns: HashMap::new(),
            bootstrap: None,
            topics: HashMap::new(),
        }
    }

    /// A connection to any broker: a live one, else a bootstrap server.
    pub async fn any(&mut self) -> Result<&mut Conn, LinkError> {
        if let Some(&id) = self.conns.keys().next() {
            return self.broker(id).await;
        }
        if self.bootstrap.is_none() {
            let mut last = LinkError::Unreachable("no `bootstrap_servers`".into());
            for (host, port) in self.options.bootstrap.clone() {
                match Conn::open(&host, port, &self.options).await {
                    Ok(c) => {
                        self.bootstrap = Some(c);
                        break;
                    }
                    Err(e @ LinkError::Refused(_)) => return Err(e),
                    Err(e) => last = e,
                }
            }
            if self.bootstrap.is_none() {
                return Err(last);
            }
        }
        self.bootstrap
            .as_mut()
            .ok_or_else(|| LinkError::Unreachable("no bootstrap connection".into()))
    }

    /// The connection to broker `id` (opened if needed).
    pub async fn broker(&mut self, id: i32) -> Result<&mut Conn, LinkError> {
        if !self.conns.contains_key(&id) {
            let (host, port) =
                self.brokers.get(&id).cloned().ok_or_else(|| {
                    LinkError::Unreachable(format!("no broker {id} in the metadata"))
                })?;
            let conn = Conn::open(&host, port, &self.options).await?;
            self.conns.insert(id, conn);
        }
        self.conns
            .get_mut(&id)
            .ok_or_else(|| LinkError::Unreachable(format!("no broker {id}")))
    }

    /// Forgets every connection (after an error whose connection state is
    /// unknown).
    pub fn reset(&mut self) {
        self.conns.clear();
        self.bootstrap = None;
    }

    /// Learns where broker `id` is (a coordinator's answer names it).
    pub fn learn(&mut self, id: i32, host: String, port: u16) {
        let addr = (host, port);
        if self.brokers.get(&id) != Some(&addr) {
            self.conns.remove(&id);
            self.brokers.insert(id, addr);
        }
    }

    /// Drops broker `id`'s connection.
    pub fn drop_broker(&mut self, id: i32) {
        self.conns.remove(&id);
    }

    /// Asks for `topics`' partitions and leaders (and learns the brokers);
    /// a topic the cluster lacks is left out of [`Cluster::topics`].
    pub async fn refresh(&mut self, topics: &[String]) -> Result<MetadataResponse, LinkError> {
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                            .with_name(Some(topic_name(t)))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let result = self.any().await?.call(version::METADATA, &req).await;
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                self.reset();
                return Err(e);
            }
        };
        for b in &m.brokers {
            let port = u16::try_from(b.port).unwrap_or(0);
            let addr = (b.host.to_string(), port);
            if self.brokers.get(&b.node_id.0) != Some(&addr) {
                self.conns.remove(&b.node_id.0);
                self.brokers.insert(b.node_id.0, addr);
            }
        }
        for t in &m.topics {
            let Some(name) = &t.name else { continue };
            if t.error_code != code::NONE {
                if code::refused(t.error_code) {
                    return Err(LinkError::kafka(t.error_code, format!("topic {}", name.0)));
                }
                self.topics.remove(name.0.as_str());
                continue;
            }
            let mut parts = vec![PartitionInfo { leader: -1 }; t.partitions.len()];
            for p in &t.partitions {
                if let Some(slot) = usize::try_from(p.partition_index)
                    .ok()
                    .and_then(|i| parts.get_mut(i))
                {
                    slot.leader = p.leader_id.0;
                }
            }
            self.topics.insert(name.0.to_string(), parts);
        }
        Ok(m)
    }

    /// Partition `p`'s leader; refreshes metadata when it is not known.
    pub async fn leader(&mut self, topic: &str, p: i32) -> Result<i32, LinkError> {
        let known = |c: &Cluster| {
            c.topics
                .get(topic)
                .and_then(|ps| ps.get(usize::try_from(p).ok()?))
                .map(|i| i.leader)
                .filter(|&l| l >= 0)
        };
        if let Some(l) = known(self) {
            return Ok(l);
        }
        self.refresh(&[topic.to_owned()]).await?;
        known(self).ok_or_else(|| {
            LinkError::kafka(
                code::LEADER_NOT_AVAILABLE,
                format!("no leader of {topic}/{p}"),
            )
        })
    }
}

/// A topic name for a request.
pub fn topic_name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_owned()))
}

/// A broker id for a request.
pub fn broker_id(id: i32) -> BrokerId {
    BrokerId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_their_port() {
        assert_eq!(
            parse_server("kafka-1.example:9093").expect("valid"),
            ("kafka-1.example".into(), 9093)
        );
        assert_eq!(
            parse_server("[::1]:9092").expect("v6"),
            ("::1".into(), 9092)
        );
        for bad in ["kafka", "kafka:", "kafka:x", ":9092", "kafka:0"] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Mechanism::parse("SCRAM-SHA-512"),
            Ok(Mechanism::ScramSha512)
        );
        assert!(Mechanism::parse("GSSAPI").is_err());
    }

    #[test]
    fn scram_sha_256_matches_rfc_7677() {
        let (client_final, server_final) = scram_final::<sha2::Sha256>(
            "n=user,r=rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "rOprNGfwEbeRWgbNEkqO",
            "pencil",
        )
        .expect("valid");
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        // A server that does not extend our nonce is refused.
        assert!(
            scram_final::<sha2::Sha256>("n=u,r=abc", "r=xyz1,s=QUJD,i=4096", "abc", "p").is_err()
        );
    }
}
