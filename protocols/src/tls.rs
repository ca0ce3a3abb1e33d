//! TLS for every front end: one [`Tls`] (certificate, key, optional client CA
//! for mTLS) shared by the MQTT, AMQP and HTTPS listeners.
//!
//! - [`Tls::accept`] runs one server handshake with the configuration current at
//!   that moment, bounded by [`HANDSHAKE_TIMEOUT`], and returns the verified
//!   client certificate's identity ([`certificate_identity`]) when there is one.
//! - [`Tls::reload`] re-reads the files and swaps the configuration: open
//!   connections keep the one they started with, the next handshake gets the
//!   new one, and a bad file leaves the old configuration in place.
//!   [`Tls::spawn_reloader`] calls it when the files change and on `SIGHUP`.
//! - [`TlsListener`] puts TLS in front of a [`LimitedListener`] for
//!   `axum::serve`; handshakes run in their own tasks, so a silent client
//!   cannot hold up the next one.
//!
//! Crypto is rustls on the `ring` provider, passed explicitly (no process-wide
//! default provider). No ALPN protocol is advertised.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::listener::{ConnectionStats, LimitedListener, LimitedStream};
use crate::{MetricsSource, Peer};

pub use tokio_rustls::server::TlsStream;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for `TlsListener::accept`.
const ACCEPTED_QUEUE: usize = 64;

/// Where the certificate, key and client CA live (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1). May be the same file as `cert`.
    pub key: PathBuf,
    /// CA certificates that sign client certificates; enables mTLS.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate (needs `client_ca`). When false, a
    /// client may present none, but one it presents must still verify.
    pub require_client_cert: bool,
}

/// Why the TLS files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A file was read but holds nothing usable.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `require_client_cert` without a `client_ca` to verify them against.
    #[error("client certificates are required but no client CA file is set")]
    NoClientCa,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Counters since start, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes_ok: u64,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: u64,
    /// Reloads that read valid files (changed or not).
    pub reloads_ok: u64,
    /// Reloads that kept the old configuration because of a bad file.
    pub reloads_failed: u64,
}

/// The server side of TLS, cheap to clone and shared by every listener.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    current: RwLock<Loaded>,
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

struct Loaded {
    config: Arc<ServerConfig>,
    /// Hash of the files' contents, to tell whether a reload changed anything.
    fingerprint: u64,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the files. Errors name the file and what is wrong.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let (config, fingerprint) = build(&files)?;
        Ok(Tls {
            inner: Arc::new(Inner {
                files,
                current: RwLock::new(Loaded {
                    config,
                    fingerprint,
                }),
                handshakes_ok: AtomicU64::new(0),
                handshakes_failed: AtomicU64::new(0),
                reloads_ok: AtomicU64::new(0),
                reloads_failed: AtomicU64::new(0),
            }),
        })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// Re-reads the files. `Ok(true)` when their contents changed and the next
    /// handshake uses them, `Ok(false)` when they are as before. On error the
    /// previous configuration stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        match build(&self.inner.files) {
            Ok((config, fingerprint)) => {
                self.inner.reloads_ok.fetch_add(1, Relaxed);
                let mut current = self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                if current.fingerprint == fingerprint {
                    return Ok(false);
                }
                *current = Loaded {
                    config,
                    fingerprint,
                };
                Ok(true)
            }
            Err(e) => {
                self.inner.reloads_failed.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// Reloads (and logs the outcome) when a file's modification time or
    /// length changes and has then stayed put for one more `poll` (so a file
    /// caught half-written is read once complete), and on every `SIGHUP`.
    /// Ends when `shutdown` is cancelled. The `SIGHUP` handler is installed
    /// before this returns. Must be called within a tokio runtime.
    pub fn spawn_reloader(&self, shutdown: CancellationToken, poll: Duration) -> JoinHandle<()> {
        let tls = self.clone();
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; TLS files are reloaded only when they change");
                None
            }
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut loaded = tls.stamps();
            let mut previous = loaded.clone();
            loop {
                let cause = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => "files changed",
                    _ = next_hangup(&mut hangup) => "SIGHUP",
                };
                let now = tls.stamps();
                if cause == "SIGHUP" || (now != loaded && now == previous) {
                    tls.reload_and_log(cause);
                    loaded = now.clone();
                }
                previous = now;
            }
        })
    }

    fn reload_and_log(&self, cause: &str) {
        let cert = self.inner.files.cert.display();
        match self.reload() {
            Ok(true) => tracing::info!(%cert, cause, "TLS certificates reloaded"),
            Ok(false) => tracing::debug!(%cert, cause, "TLS files unchanged"),
            Err(e) => tracing::error!(
                error = %e,
                cause,
                "TLS reload failed; still serving the previous certificates"
            ),
        }
    }

    /// (modification time, length) of each file; `None` for one that is gone.
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let files = &self.inner.files;
        [
            Some(&files.cert),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
    }

    /// The configuration new handshakes use now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone()
    }

    /// Runs the server handshake on `stream` with the current configuration,
    /// within [`HANDSHAKE_TIMEOUT`]. Returns the stream and, when the client
    /// presented a certificate (which the handshake has verified against the
    /// client CA), its identity ([`certificate_identity`]).
    pub async fn accept<S>(&self, stream: S) -> io::Result<(TlsStream<S>, Option<String>)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.inner.handshakes_failed.fetch_add(1, Relaxed);
                return Err(e);
            }
            Err(_) => {
                self.inner.handshakes_failed.fetch_add(1, Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
        };
        self.inner.handshakes_ok.fetch_add(1, Relaxed);
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(certificate_identity);
        Ok((stream, identity))
    }

    /// Handshake and reload counters.
    pub fn stats(&self) -> TlsStats {
        let i = &self.inner;
        TlsStats {
            handshakes_ok: i.handshakes_ok.load(Relaxed),
            handshakes_failed: i.handshakes_failed.load(Relaxed),
            reloads_ok: i.reloads_ok.load(Relaxed),
            reloads_failed: i.reloads_failed.load(Relaxed),
        }
    }
}

/// `tributary_tls_handshakes_total{result}` and `tributary_tls_reloads_total{result}`.
/// Register one `Tls` once, however many listeners share it.
impl MetricsSource for Tls {
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = self.stats();
        for (name, help, ok, failed) in [
            (
                "tributary_tls_handshakes_total",
                "TLS handshakes by result.",
                s.handshakes_ok,
                s.handshakes_failed,
            ),
            (
                "tributary_tls_reloads_total",
                "TLS certificate reloads by result.",
                s.reloads_ok,
                s.reloads_failed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n\
                 {name}{{result=\"ok\"}} {ok}\n{name}{{result=\"failed\"}} {failed}"
            );
        }
    }
}

/// Waits for the next `SIGHUP`; never, without a handler.
async fn next_hangup(hangup: &mut Option<Signal>) {
    if let Some(s) = hangup {
        if s.recv().await.is_some() {
            return;
        }
    }
    *hangup = None;
    std::future::pending().await
}

/// The identity a client certificate stands for: its subject common name, or
/// failing that its first DNS subject alternative name.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x509
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty());
    if let Some(cn) = cn {
        return Some(cn.to_owned());
    }
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) if !dns.is_empty() => {
            Some((*dns).to_owned())
        }
        _ => None,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Reads the files and builds the server configuration and the fingerprint of
/// what was read.
fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, u64), TlsError> {
    if files.require_client_cert && files.client_ca.is_none() {
        return Err(TlsError::NoClientCa);
    }
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let ca_pem = match &files.client_ca {
        Some(path) => Some(read(path)?),
        None => None,
    };
    let ca = ca_pem.as_deref();
    let mut hasher = DefaultHasher::new();
    (&cert_pem, &key_pem, ca).hash(&mut hasher);
    files.require_client_cert.hash(&mut hasher);
    let fingerprint = hasher.finish();
    Ok((server_config(files, &cert_pem, &key_pem, ca)?, fingerprint))
}

/// The server configuration from the files' contents (`files` names them in
/// errors and says whether a client certificate is required). Every fault of
/// the bytes is an error naming the file.
pub fn server_config(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    if files.require_client_cert && client_ca_pem.is_none() {
        return Err(TlsError::NoClientCa);
    }
    let certs = certificates(&files.cert, cert_pem)?;
    warn_if_not_valid_now(&files.cert, &certs[0]);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            invalid(&files.key, "no PRIVATE KEY block in the file")
        }
        e => invalid(&files.key, format!("not a valid private key: {e}")),
    })?;

    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let path = files.client_ca.as_deref().unwrap_or(Path::new("client_ca"));
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, pem)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(path, format!("not a usable CA certificate: {e}")))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !files.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| invalid(path, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(
            &files.key,
            format!(
                "unusable with the certificate in {}: {e}",
                files.cert.display()
            ),
        )
    })?;
    Ok(Arc::new(config))
}

/// Serving an expired certificate is allowed (clients will refuse it) but worth a warning.
fn warn_if_not_valid_now(path: &Path, cert: &CertificateDer<'_>) {
    if let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
        if !x509.validity().is_valid() {
            tracing::warn!(
                cert = %path.display(),
                not_before = %x509.validity().not_before,
                not_after = %x509.validity().not_after,
                "the TLS server certificate is not valid now"
            );
        }
    }
}

type Accepted = (TlsStream<LimitedStream>, Peer);

/// A connection of a listener that may speak TLS (MQTT 8883, AMQP 5671).
pub type MaybeTls = tokio_util::either::Either<LimitedStream, TlsStream<LimitedStream>>;

/// Starts a connection of the MQTT and AMQP listeners: with `tls`, the
/// handshake (bounded by [`HANDSHAKE_TIMEOUT`], abandoned at shutdown), whose
/// verified client certificate names the peer. `None`: the handshake failed
/// (logged, counted in the TLS metrics) or the node is shutting down.
pub async fn establish(
    tls: Option<&Tls>,
    stream: LimitedStream,
    addr: SocketAddr,
    shutdown: &CancellationToken,
) -> Option<(MaybeTls, Peer)> {
    let Some(tls) = tls else {
        let peer = Peer {
            addr: Some(addr),
            certificate: None,
        };
        return Some((MaybeTls::Left(stream), peer));
    };
    let handshake = tokio::select! {
        r = tls.accept(stream) => r,
        () = shutdown.cancelled() => return None,
    };
    match handshake {
        Ok((stream, certificate)) => {
            let peer = Peer {
                addr: Some(addr),
                certificate,
            };
            Some((MaybeTls::Right(stream), peer))
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "TLS handshake failed");
            None
        }
    }
}

/// A [`LimitedListener`] with TLS, for `axum::serve`. A background task accepts
/// connections and runs each handshake in its own task (at most the
/// listener's connection limit at once); finished handshakes queue for
/// [`axum::serve::Listener::accept`]. The task ends when this is dropped.
pub struct TlsListener {
    accepted: mpsc::Receiver<Accepted>,
    task: JoinHandle<()>,
    local_addr: io::Result<SocketAddr>,
    stats: Arc<ConnectionStats>,
    idle: Arc<crate::listener::IdleConnections>,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Starts accepting on `inner`. Must be called within a tokio runtime.
    pub fn new(inner: LimitedListener, tls: Tls) -> TlsListener {
        let local_addr = inner.local_addr();
        let stats = inner.stats();
        let idle = inner.idle();
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let task = tokio::spawn(accept_loop(inner, tls, tx));
        TlsListener {
            accepted,
            task,
            local_addr,
            stats,
            idle,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.local_addr {
            Ok(addr) => Ok(*addr),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// Connections of the underlying listener that may be closed to make room.
    pub fn idle(&self) -> Arc<crate::listener::IdleConnections> {
        self.idle.clone()
    }

    /// The underlying listener's connection counters (handshakes in progress count as open).
    pub fn stats(&self) -> Arc<ConnectionStats> {
        self.stats.clone()
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(inner: LimitedListener, tls: Tls, tx: mpsc::Sender<Accepted>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            (stream, addr) = inner.accept() => {
                let tls = tls.clone();
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tls.accept(stream).await {
                        Ok((stream, certificate)) => {
                            let peer = Peer {
                                addr: Some(addr),
                                certificate,
                            };
                            let _ = tx.send((stream, peer)).await;
                        }
                        Err(e) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            _ = tx.closed() => return,
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<LimitedStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            None => {
                // Only if the accept task died; it holds the sender otherwise.
                tracing::error!("the TLS accept task ended; no more HTTPS connections");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        TlsListener::local_addr(self).map(|addr| Peer {
            addr: Some(addr),
            certificate: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::ServerName;
    use rustls::ClientConfig;
    use time::OffsetDateTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};

    type ServerSide<S> = io::Result<(TlsStream<S>, Option<String>)>;
    type ClientSide<S> = io::Result<tokio_rustls::client::TlsStream<S>>;

    /// A certificate and its key, as PEM.
    struct Leaf {
        cert: String,
        key: String,
    }

    impl Leaf {
        fn chain(&self) -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_slice_iter(self.cert.as_bytes())
                .collect::<Result<_, _>>()
                .expect("leaf PEM")
        }

        fn private_key(&self) -> PrivateKeyDer<'static> {
            PrivateKeyDer::from_pem_slice(self.key.as_bytes()).expect("key PEM")
        }
    }

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    fn days(n: i64) -> time::Duration {
        time::Duration::days(n)
    }

    fn params(cn: &str, sans: &[&str]) -> CertificateParams {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut p = CertificateParams::new(sans).expect("SANs");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = OffsetDateTime::now_utc() - days(1);
        p.not_after = OffsetDateTime::now_utc() + days(30);
        p
    }

    impl Ca {
        fn new(cn: &str) -> Ca {
            let mut p = params(cn, &[]);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().expect("CA key");
            Ca(CertifiedIssuer::self_signed(p, key).expect("CA cert"))
        }

        fn pem(&self) -> String {
            self.0.pem()
        }

        fn sign(&self, p: CertificateParams) -> Leaf {
            let key = KeyPair::generate().expect("leaf key");
            let cert = p.signed_by(&key, &self.0).expect("sign");
            Leaf {
                cert: cert.pem(),
                key: key.serialize_pem(),
            }
        }

        fn server(&self, cn: &str) -> Leaf {
            let mut p = params(cn, &["localhost"]);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.sign(p)
        }

        fn client(&self, cn: &str) -> Leaf {
            let mut p = params(cn, &[]);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.sign(p)
        }
    }

    /// A CA, a server certificate from it on disk, and the files pointing there.
    struct Fixture {
        dir: tempfile::TempDir,
        ca: Ca,
        files: TlsFiles,
    }

    impl Fixture {
        fn new(client_ca: bool, require_client_cert: bool) -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = Ca::new("test CA");
            let files = TlsFiles {
                cert: dir.path().join("server.pem"),
                key: dir.path().join("server-key.pem"),
                client_ca: client_ca.then(|| dir.path().join("ca.pem")),
                require_client_cert,
            };
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
            let f = Fixture { dir, ca, files };
            f.write_server(&f.ca.server("server-1"));
            f
        }

        fn write_server(&self, leaf: &Leaf) {
            std::fs::write(&self.files.cert, &leaf.cert).expect("write cert");
            std::fs::write(&self.files.key, &leaf.key).expect("write key");
        }

        fn tls(&self) -> Tls {
            Tls::load(self.files.clone()).expect("load")
        }

        fn client(&self, cert: Option<&Leaf>) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(self.ca.pem().as_bytes()) {
                roots.add(c.expect("CA PEM")).expect("root");
            }
            let builder = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots);
            Arc::new(match cert {
                Some(leaf) => builder
                    .with_client_auth_cert(leaf.chain(), leaf.private_key())
                    .expect("client cert"),
                None => builder.with_no_client_auth(),
            })
        }
    }

    fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").expect("server name")
    }

    /// Server and client handshakes over an in-memory pipe, side by side.
    async fn handshake(
        tls: &Tls,
        client: Arc<ClientConfig>,
    ) -> (ServerSide<DuplexStream>, ClientSide<DuplexStream>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client);
        tokio::join!(tls.accept(s), connector.connect(localhost(), c))
    }

    /// The identity of the certificate the server presented to `client`.
    fn server_identity<S>(client: &tokio_rustls::client::TlsStream<S>) -> Option<String> {
        client
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(certificate_identity)
    }

    async fn round_trip<S, C>(server: &mut TlsStream<S>, client: &mut C)
    where
        S: AsyncRead + AsyncWrite + Unpin,
        C: AsyncRead + AsyncWrite + Unpin,
    {
        client.write_all(b"ping").await.expect("client write");
        client.flush().await.expect("client flush");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("server read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.expect("server write");
        server.flush().await.expect("server flush");
        client.read_exact(&mut buf).await.expect("client read");
        assert_eq!(&buf, b"pong");
    }

    #[tokio::test]
    async fn handshake_with_a_ca_signed_server_certificate_carries_data() {
        let f = Fixture::new(false, false);
        let tls = f.tls();
        let (server, client) = handshake(&tls, f.client(None)).await;
        let (mut server, identity) = server.expect("server handshake");
        let mut client = client.expect("client handshake");
        assert_eq!(identity, None);
        assert_eq!(server_identity(&client).as_deref(), Some("server-1"));
        round_trip(&mut server, &mut client).await;
        assert_eq!(
            tls.stats(),
            TlsStats {
                handshakes_ok: 1,
                ..TlsStats::default()
            }
        );
    }

    #[tokio::test]
    async fn a_ca_signed_client_certificate_is_the_identity() {
        let f = Fixture::new(true, true);
        let device = f.ca.client("device-7");
        let (server, client) = handshake(&f.tls(), f.client(Some(&device))).await;
        let (mut server, identity) = server.expect("server handshake");
        assert_eq!(identity.as_deref(), Some("device-7"));
        round_trip(&mut server, &mut client.expect("client handshake")).await;
    }

    #[tokio::test]
    async fn no_client_certificate_fails_when_required_and_is_anonymous_otherwise() {
        let required = Fixture::new(true, true);
        let tls = required.tls();
        let (server, _client) = handshake(&tls, required.client(None)).await;
        assert!(server.is_err(), "a client without a certificate got in");
        assert_eq!(tls.stats().handshakes_failed, 1);

        let optional = Fixture::new(true, false);
        let (server, _client) = handshake(&optional.tls(), optional.client(None)).await;
        let (_, identity) = server.expect("server handshake");
        assert_eq!(identity, None);
    }

    #[tokio::test]
    async fn self_signed_foreign_and_expired_client_certificates_fail() {
        for require in [true, false] {
            let f = Fixture::new(true, require);
            let tls = f.tls();

            let mut p = params("device-7", &[]);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().expect("key");
            let self_signed = Leaf {
                cert: p.self_signed(&key).expect("self-signed").pem(),
                key: key.serialize_pem(),
            };
            let foreign = Ca::new("another CA").client("device-7");
            let mut p = params("device-7", &[]);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.not_before = OffsetDateTime::now_utc() - days(30);
            p.not_after = OffsetDateTime::now_utc() - days(1);
            let expired = f.ca.sign(p);

            for (what, leaf) in [
                ("self-signed", &self_signed),
                ("foreign CA", &foreign),
                ("expired", &expired),
            ] {
                let (server, _client) = handshake(&tls, f.client(Some(leaf))).await;
                let err = server.expect_err("the handshake failed");
                assert!(
                    err.to_string().contains("invalid peer certificate"),
                    "{what}: {err}"
                );
            }
            assert_eq!(tls.stats().handshakes_failed, 3);
        }
    }

    #[tokio::test]
    async fn plaintext_on_the_tls_port_fails_promptly() {
        let tls = Fixture::new(false, false).tls();
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
            &[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 2, 0, 60][..],
            &[0xff; 300][..],
        ] {
            let (mut c, s) = tokio::io::duplex(4096);
            c.write_all(garbage).await.expect("write");
            let outcome = tokio::time::timeout(Duration::from_secs(2), tls.accept(s))
                .await
                .expect("accept returned before the handshake timeout");
            assert!(outcome.is_err());
        }
        assert_eq!(tls.stats().handshakes_failed, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let tls = Fixture::new(false, false).tls();
        let (_c, s) = tokio::io::duplex(4096);
        let started = tokio::time::Instant::now();
        let err = tls.accept(s).await.expect_err("handshake timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), HANDSHAKE_TIMEOUT);
    }

    #[tokio::test]
    async fn reload_serves_the_new_certificate_to_new_connections_only() {
        let f = Fixture::new(false, false);
        let tls = f.tls();
        let (server, client) = handshake(&tls, f.client(None)).await;
        let (mut old_server, _) = server.expect("server handshake");
        let mut old_client = client.expect("client handshake");

        assert!(!tls.reload().expect("reload unchanged files"));
        f.write_server(&f.ca.server("server-2"));
        assert!(tls.reload().expect("reload"));

        let (server, client) = handshake(&tls, f.client(None)).await;
        server.expect("server handshake after reload");
        let client = client.expect("client handshake after reload");
        assert_eq!(server_identity(&client).as_deref(), Some("server-2"));
        assert_eq!(server_identity(&old_client).as_deref(), Some("server-1"));
        round_trip(&mut old_server, &mut old_client).await;
        assert_eq!(tls.stats().reloads_ok, 2);
    }

    #[tokio::test]
    async fn a_bad_file_on_reload_keeps_the_old_configuration() {
        let f = Fixture::new(true, false);
        let tls = f.tls();
        let good_cert = std::fs::read(&f.files.cert).expect("read cert");

        std::fs::write(&f.files.cert, "not a certificate\n").expect("write");
        let err = tls.reload().expect_err("reload of garbage failed");
        assert!(err.to_string().contains("server.pem"), "{err}");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");

        // A certificate that does not match the key.
        std::fs::write(&f.files.cert, f.ca.server("server-2").cert).expect("write");
        let err = tls
            .reload()
            .expect_err("reload of a mismatched pair failed");
        assert!(err.to_string().contains("server-key.pem"), "{err}");

        std::fs::write(&f.files.cert, &good_cert).expect("write");
        std::fs::remove_file(f.files.client_ca.as_ref().expect("CA path")).expect("rm");
        let err = tls.reload().expect_err("reload without the CA failed");
        assert!(matches!(err, TlsError::Read { .. }), "{err}");

        assert_eq!(tls.stats().reloads_failed, 3);
        let (server, client) = handshake(&tls, f.client(None)).await;
        server.expect("server handshake with the old configuration");
        let client = client.expect("client handshake");
        assert_eq!(server_identity(&client).as_deref(), Some("server-1"));
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let f = Fixture::new(true, true);
        let load = |files: TlsFiles| Tls::load(files).expect_err("load failed").to_string();

        let mut files = f.files.clone();
        files.key = f.dir.path().join("missing.pem");
        let err = load(files);
        assert!(
            err.starts_with("cannot read ") && err.contains("missing.pem"),
            "{err}"
        );

        let mut files = f.files.clone();
        files.key = f.files.cert.clone();
        let err = load(files);
        assert!(err.contains("no PRIVATE KEY"), "{err}");

        let empty = f.dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let mut files = f.files.clone();
        files.client_ca = Some(empty);
        let err = load(files);
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );

        let mut files = f.files.clone();
        files.client_ca = None;
        assert!(matches!(Tls::load(files), Err(TlsError::NoClientCa)));

        // Certificate and key in one file is fine.
        let both = f.dir.path().join("both.pem");
        let pem = [
            std::fs::read_to_string(&f.files.cert).expect("cert"),
            std::fs::read_to_string(&f.files.key).expect("key"),
        ]
        .concat();
        std::fs::write(&both, pem).expect("write");
        let mut files = f.files.clone();
        files.cert = both.clone();
        files.key = both;
        Tls::load(files).expect("cert and key in one file");
    }

    #[test]
    fn identity_is_the_common_name_else_the_first_dns_name() {
        let ca = Ca::new("test CA");
        let der = |leaf: &Leaf| leaf.chain().remove(0);
        assert_eq!(
            certificate_identity(&der(&ca.client("device-7"))).as_deref(),
            Some("device-7")
        );
        let mut p = params("", &["sensor.example", "other.example"]);
        p.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(
            certificate_identity(&der(&ca.sign(p))).as_deref(),
            Some("sensor.example")
        );
        assert_eq!(
            certificate_identity(&CertificateDer::from(vec![1, 2, 3])),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_reloader_picks_up_changed_files() {
        let f = Fixture::new(false, false);
        let tls = f.tls();
        let shutdown = CancellationToken::new();
        let reloader = tls.spawn_reloader(shutdown.clone(), Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.write_server(&f.ca.server("server-2"));
        // Seen changed at the next poll, reloaded at the one after.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(tls.stats().reloads_ok >= 1);
        let (_, client) = handshake(&tls, f.client(None)).await;
        let client = client.expect("client handshake");
        assert_eq!(server_identity(&client).as_deref(), Some("server-2"));
        shutdown.cancel();
        reloader.await.expect("reloader ended");
    }

    #[tokio::test]
    async fn sighup_reloads() {
        let f = Fixture::new(false, false);
        let tls = f.tls();
        let shutdown = CancellationToken::new();
        let reloader = tls.spawn_reloader(shutdown.clone(), Duration::from_secs(3600));
        f.write_server(&f.ca.server("server-2"));
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), async {
            while tls.stats().reloads_ok == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("reloaded after SIGHUP");
        let (_, client) = handshake(&tls, f.client(None)).await;
        let client = client.expect("client handshake");
        assert_eq!(server_identity(&client).as_deref(), Some("server-2"));
        shutdown.cancel();
        reloader.await.expect("reloader ended");
    }

    async fn tls_listener(tls: Tls) -> (TlsListener, SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = TlsListener::new(LimitedListener::new(tcp, 16), tls);
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    async fn connect(addr: SocketAddr, client: Arc<ClientConfig>) -> ClientSide<TcpStream> {
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(client)
            .connect(localhost(), tcp)
            .await
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_the_next_handshake() {
        let f = Fixture::new(true, false);
        let (mut listener, addr) = tls_listener(f.tls()).await;
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let device = f.ca.client("device-7");
        let client = tokio::spawn(connect(addr, f.client(Some(&device))));
        let (mut server, peer) = tokio::time::timeout(
            Duration::from_secs(5),
            axum::serve::Listener::accept(&mut listener),
        )
        .await
        .expect("the second client was accepted while the first stays silent");
        let mut client = client.await.expect("join").expect("client handshake");
        assert_eq!(peer.certificate.as_deref(), Some("device-7"));
        assert_eq!(
            peer.addr,
            client.get_ref().0.local_addr().ok(),
            "peer address"
        );
        round_trip(&mut server, &mut client).await;
        assert_eq!(listener.stats().open.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn axum_sees_the_peer_info() {
        use axum::extract::ConnectInfo;

        let f = Fixture::new(true, false);
        let (listener, addr) = tls_listener(f.tls()).await;
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<Peer>| async move {
                format!("certificate={:?}", peer.certificate)
            }),
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).await
        });
        let device = f.ca.client("device-7");
        let mut client = connect(addr, f.client(Some(&device)))
            .await
            .expect("client handshake");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut response = String::new();
        client
            .read_to_string(&mut response)
            .await
            .expect("response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.ends_with("certificate=Some(\"device-7\")"),
            "{response}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn dropping_the_listener_stops_accepting() {
        let (listener, addr) = tls_listener(Fixture::new(false, false).tls()).await;
        drop(listener);
        tokio::time::timeout(Duration::from_secs(5), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the port closed after the listener was dropped");
    }
}
