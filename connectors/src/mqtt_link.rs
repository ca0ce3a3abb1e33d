//! A small MQTT 3.1.1 client for the MQTT connectors, over rumqttc's
//! packet codec (the one our MQTT front end uses) and tokio-rustls: connect
//! with a persistent session (`clean_session = false`), credentials, TLS
//! (`mqtts://`, verified against `ca_file` or the system's roots), then
//! packets written in batches and read one at a time, every wait bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Login};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::Error as CodecError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{resolve, Broker};

/// Largest packet taken from a broker (the log's own event limit applies
/// when it is appended).
const MAX_PACKET: usize = 16 << 20;

/// The connection: TCP, or TLS over TCP (the Kafka link uses it too).
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }

    pub(crate) async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Io::Plain(s) => s.read_buf(buf).await,
            Io::Tls(s) => s.read_buf(buf).await,
        }
    }

    pub(crate) async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Io::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }
}

/// Why a connection failed.
#[derive(Debug)]
pub enum LinkError {
    /// The broker could not be reached, or the connection broke: try
    /// again later.
    Unreachable(String),
    /// The broker refused the settings (credentials, client id).
    Refused(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Unreachable(e) | LinkError::Refused(e) => f.write_str(e),
        }
    }
}

/// Where and as whom to connect.
pub struct Endpoint {
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    client_id: String,
    login: Option<(String, String)>,
    keep_alive: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Splits `mqtt://host:port` / `mqtts://host:port` into (TLS, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "`{url}` is not mqtt://host:port or mqtts://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h, p),
            _ => return Err(format!("`{url}`: `{p}` is not a port")),
        },
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "`{url}` is not mqtt://host:port or mqtts://host:port"
        ));
    }
    Ok((tls, host.to_owned(), port))
}

impl Endpoint {
    /// The endpoint of broker `s` with `client_id`, its secrets
    /// resolved; an error names the key.
    pub fn new(s: &Broker, client_id: String) -> Result<Endpoint, String> {
        let (tls, host, port) = parse_url(&s.url).map_err(|e| format!("`url`: {e}"))?;
        let tls = if tls {
            let config = tributary_sync::tls_client_config(s.ca_file.as_deref(), None)
                .map_err(|e| format!("`ca_file`: {e}"))?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let password = s
            .password
            .as_deref()
            .map(resolve)
            .transpose()
            .map_err(|e| format!("`password`: {e}"))?;
        let login = match (&s.username, password) {
            (Some(u), p) => Some((u.clone(), p.unwrap_or_default())),
            (None, Some(_)) => return Err("`password` without `username`".into()),
            (None, None) => None,
        };
        Ok(Endpoint {
            host,
            port,
            tls,
            client_id,
            login,
            keep_alive: Duration::from_secs(u64::from(s.keep_alive_s)),
            timeout: Duration::from_millis(s.timeout_ms),
        })
    }

    /// The time limit of each wait for the broker.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a connection may stay silent.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Connects with a persistent session; the link and whether the
    /// broker still had the session.
    pub async fn connect(&self) -> Result<(Link, bool), LinkError> {
        match tokio::time::timeout(self.timeout, self.open()).await {
            Ok(r) => r,
            Err(_) => Err(LinkError::Unreachable(format!(
                "no CONNACK from {}:{} within {} ms",
                self.host,
                self.port,
                self.timeout.as_millis()
            ))),
        }
    }

    async fn open(&self) -> Result<(Link, bool), LinkError> {
        let unreachable =
            |e: std::io::Error| LinkError::Unreachable(format!("{}:{}: {e}", self.host, self.port));
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let io = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| LinkError::Refused(format!("`url`: {e}")))?;
                Io::Tls(Box::new(
                    connector.connect(name, tcp).await.map_err(unreachable)?,
                ))
            }
            None => Io::Plain(tcp),
        };
        let mut link = Link {
            io,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(8192),
            last_io: Instant::now(),
        };
        let mut connect = Connect::new(self.client_id.clone());
        connect.clean_session = false;
        connect.keep_alive = u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX);
        connect.login = self
            .login
            .as_ref()
            .map(|(u, p)| Login::new(u.clone(), p.clone()));
        link.queue(&Packet::Connect(connect))
            .map_err(LinkError::Refused)?;
        link.flush().await.map_err(LinkError::Unreachable)?;
        match link.next().await.map_err(LinkError::Unreachable)? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                Ok((link, ack.session_present))
            }
            Packet::ConnAck(ack) => Err(match ack.code {
                ConnectReturnCode::ServiceUnavailable => {
                    LinkError::Unreachable("the broker answered: service unavailable".into())
                }
                code => LinkError::Refused(format!("the broker refused the connection: {code:?}")),
            }),
            other => Err(LinkError::Unreachable(format!(
                "the broker answered CONNECT with {other:?}"
            ))),
        }
    }
}

/// An open connection.
pub struct Link {
    io: Io,
    rbuf: BytesMut,
    wbuf: BytesMut,
    last_io: Instant,
}

impl Link {
    /// Encodes `p` to be sent with the next [`Link::flush`].
    pub fn queue(&mut self, p: &Packet) -> Result<(), String> {
        p.write(&mut self.wbuf, MAX_PACKET)
            .map(|_| ())
            .map_err(|e| format!("cannot encode a packet: {e}"))
    }

    /// Sends what is queued.
    pub async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let out = self.wbuf.split();
        self.io
            .write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.last_io = Instant::now();
        Ok(())
    }

    /// A packet already received, if a whole one is buffered.
    pub fn buffered(&mut self) -> Result<Option<Packet>, String> {
        match Packet::read(&mut self.rbuf, MAX_PACKET) {
            Ok(p) => Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("bad packet from the broker: {e}")),
        }
    }

    /// The next packet from the broker (no time limit: callers bound it).
    pub async fn next(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(p);
            }
            self.rbuf.reserve(8192);
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the broker closed the connection".into());
            }
            // Acknowledge at once: a broker that leaves Nagle on (mosquitto
            // does) holds its next PUBACKs until this one is acknowledged,
            // and a delayed acknowledgement costs 40 ms a batch.
            #[cfg(target_os = "linux")]
            let _ = socket2::SockRef::from(self.io.tcp()).set_tcp_quickack(true);
        }
    }

    /// How long since the last write.
    pub fn idle(&self) -> Duration {
        self.last_io.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_bad_ones_are_refused() {
        assert_eq!(
            parse_url("mqtt://broker.local").expect("ok"),
            (false, "broker.local".into(), 1883)
        );
        assert_eq!(
            parse_url("mqtts://10.0.0.1:18883/").expect("ok"),
            (true, "10.0.0.1".into(), 18883)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1884").expect("ok"),
            (false, "::1".into(), 1884)
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://h:0").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
        assert!(parse_url("mqtt://").is_err());
        assert!(parse_url("mqtt://u@h").is_err());
    }
}
