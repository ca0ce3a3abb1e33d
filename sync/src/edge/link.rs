//! The link to the core: parsing the upstream URL, connecting (TCP, TLS with
//! optional mTLS, WebSocket), one session's Hello/Welcome handshake, the
//! writing half with a deadline on every write, and the reader task that
//! turns messages into frames and notes when the core was last heard.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::session::Session;
use super::{lock, now_ms, End, Uploader, UpstreamConfig};
use crate::wire::{self, code, ErrorFrame, Frame, Hello};
use crate::Error;

pub(super) struct Target {
    tls: bool,
    host: String,
    port: u16,
}

pub(super) fn parse_url(url: &str) -> Result<Target, Error> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url
        .parse()
        .map_err(|e| Error::Url(format!("`{url}` is not a URL: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => {
            return Err(Error::Url(format!(
                "`{url}` must start with ws:// or wss://"
            )))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| Error::Url(format!("`{url}` has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target { tls, host, port })
}

impl Uploader {
    pub(super) async fn session(&self, shutdown: &CancellationToken) -> End {
        let c = &self.inner.config;
        let connect = tokio::time::timeout(c.timeout, self.connect());
        let ws = tokio::select! {
            () = shutdown.cancelled() => return End::Shutdown,
            r = connect => match r {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => return End::Failed(e),
                Err(_) => return End::Failed(Error::Link("connecting timed out".into())),
            },
        };
        self.inner.metrics.connects.fetch_add(1, Relaxed);
        let (sink, stream) = ws.split();
        let mut link = Link {
            sink,
            timeout: c.timeout,
            wire_bytes: &self.inner.metrics.wire_bytes,
        };
        let hello = Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::VERSION,
            edge_id: c.edge_id.clone(),
            instance: self.inner.instance,
            token: c.token.clone(),
        };
        if let Err(e) = link.send(Frame::Hello(hello)).await.map(drop) {
            return End::Failed(e);
        }
        let (frames_tx, mut frames) = mpsc::channel(1024);
        let heard = Arc::new(AtomicU64::new(now_ms() as u64));
        let session_stop = shutdown.child_token();
        let reader = tokio::spawn(read_frames(
            stream,
            frames_tx,
            heard.clone(),
            session_stop.clone(),
        ));
        let welcome = tokio::select! {
            () = shutdown.cancelled() => { session_stop.cancel(); return End::Shutdown }
            f = tokio::time::timeout(c.timeout, frames.recv()) => f,
        };
        let end = match welcome {
            Ok(Some(Ok(Frame::Welcome(w))))
                if !(wire::MIN_VERSION..=wire::VERSION).contains(&w.version) =>
            {
                End::Failed(Error::Peer(format!(
                    "the core chose sync version {}, this edge speaks {}..={}",
                    w.version,
                    wire::MIN_VERSION,
                    wire::VERSION
                )))
            }
            Ok(Some(Ok(Frame::Welcome(w)))) => {
                tracing::info!(version = w.version, url = %self.url(), "sync: connected to the core");
                self.inner.connected.store(true, Relaxed);
                let mut s = Session::new(self, link, &w, session_stop.clone());
                s.run(&mut frames, &heard, shutdown).await
            }
            Ok(Some(Ok(Frame::Error(e)))) => End::Failed(self.error(&e)),
            Ok(Some(Ok(_))) => End::Failed(Error::Peer(
                "the core did not answer Hello with Welcome".into(),
            )),
            Ok(Some(Err(e))) => End::Failed(e),
            Ok(None) => End::Failed(Error::Link("the connection closed before Welcome".into())),
            Err(_) => End::Failed(Error::Link("no Welcome in time".into())),
        };
        session_stop.cancel();
        let _ = reader.await;
        self.inner.metrics.disconnects.fetch_add(1, Relaxed);
        end
    }

    /// Counts an error frame from the core, as the error it is here.
    pub(super) fn error(&self, e: &ErrorFrame) -> Error {
        *lock(&self.inner.metrics.errors)
            .entry(code::name(e.code))
            .or_insert(0) += 1;
        Error::Refused {
            code: e.code,
            message: e.message.clone(),
        }
    }

    async fn connect(&self) -> Result<WsStream, Error> {
        let c = &self.inner.config;
        let url = self.url();
        let target = parse_url(url)?;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| {
                Error::Link(format!(
                    "cannot connect to {}:{}: {e}",
                    target.host, target.port
                ))
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = if target.tls {
            let config = client_tls(c)?;
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| Error::Url(format!("bad TLS server name {}: {e}", target.host)))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| Error::Link(format!("TLS handshake with the core failed: {e}")))?;
            MaybeTls::Tls(Box::new(tls))
        } else {
            MaybeTls::Plain(tcp)
        };
        let mut ws_config = WebSocketConfig::default();
        ws_config.max_message_size = Some(64 << 20);
        ws_config.max_frame_size = Some(64 << 20);
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config))
            .await
            .map_err(|e| Error::Link(format!("WebSocket handshake with the core failed: {e}")))?;
        Ok(ws)
    }
}

/// The TLS client settings of the link; an error is an [`Error::Tls`].
fn client_tls(c: &UpstreamConfig) -> Result<rustls::ClientConfig, Error> {
    client_config(c.ca.as_deref(), c.cert.as_deref().zip(c.key.as_deref())).map_err(Error::Tls)
}

/// TLS client settings (ring): the certificates of `ca` (PEM) as roots, or
/// the system's when none; a client certificate and key (PEM) when given.
/// An error names the file.
pub fn client_config(
    ca: Option<&std::path::Path>,
    cert_and_key: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let named = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| named(&e))? {
                roots
                    .add(cert.map_err(|e| named(&e))?)
                    .map_err(|e| named(&e))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match cert_and_key {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("{}: {e}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A plain or TLS stream under the WebSocket.
enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<MaybeTls>;

/// The writing half of a link, with a deadline on every write.
pub(super) struct Link<'a> {
    sink: futures_util::stream::SplitSink<WsStream, Message>,
    timeout: Duration,
    wire_bytes: &'a AtomicU64,
}

impl Link<'_> {
    /// Sends a frame; returns its size on the wire.
    pub(super) async fn send(&mut self, f: Frame) -> Result<usize, Error> {
        let bytes = f.encode();
        let n = bytes.len();
        self.wire_bytes.fetch_add(n as u64, Relaxed);
        self.write(Message::Binary(bytes.into())).await?;
        Ok(n)
    }

    /// Writes a message, within the link's timeout.
    pub(super) async fn write(&mut self, m: Message) -> Result<(), Error> {
        match tokio::time::timeout(self.timeout, self.sink.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Link(format!("writing to the core failed: {e}"))),
            Err(_) => Err(Error::Link(format!(
                "a write to the core did not complete in {:?} (half-open link?)",
                self.timeout
            ))),
        }
    }
}

/// Reads frames until the link ends; every message counts as heard.
async fn read_frames(
    mut stream: futures_util::stream::SplitStream<WsStream>,
    tx: mpsc::Sender<Result<Frame, Error>>,
    heard: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return,
            m = stream.next() => m,
        };
        heard.store(now_ms() as u64, Relaxed);
        let frame = match msg {
            Some(Ok(Message::Binary(b))) => {
                Frame::decode(&b).map_err(|e| Error::Peer(format!("bad frame from the core: {e}")))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(_))) => Err(Error::Peer("the core sent a text message".into())),
            Some(Ok(Message::Close(c))) => {
                Err(Error::Link(format!("the core closed the link: {c:?}")))
            }
            Some(Err(e)) => Err(Error::Link(format!("reading from the core failed: {e}"))),
            None => Err(Error::Link("the core closed the link".into())),
        };
        let last = frame.is_err();
        // The session may be gone and its queue full: never wait past `stop`.
        tokio::select! {
            () = stop.cancelled() => return,
            sent = tx.send(frame) => if sent.is_err() || last { return },
        }
    }
}
