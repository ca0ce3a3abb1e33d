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
//! - [`TlsListener`] puts TLS in front of a
//!   [`LimitedListener`](crate::listener::LimitedListener) for
//!   `axum::serve`; handshakes run in their own tasks, so a silent client
//!   cannot hold up the next one.
//!
//! Crypto is rustls on the `ring` provider, passed explicitly (no process-wide
//! default provider). No ALPN protocol is advertised.
//!
//! This file holds [`Tls`] (loading, reload, the handshake, metrics) and its
//! files (what goes wrong loading them is a [`crate::Error`]); `config.rs`
//! turns the PEM files into a rustls server configuration and names a client
//! certificate's identity; `listener.rs` starts connections: [`establish`]
//! for MQTT and AMQP, [`TlsListener`] for HTTPS.

mod config;
mod listener;

#[cfg(test)]
mod fixture;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Kind, MetricsSource, Text};
use crate::Error;
use config::build;

pub use config::{certificate_identity, node_configs, server_config};
pub use listener::{establish, MaybeTls, TlsListener};
pub use tokio_rustls::server::TlsStream;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
    pub fn load(files: TlsFiles) -> Result<Tls, Error> {
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
    pub fn reload(&self) -> Result<bool, Error> {
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
    fn render(&self, out: &mut Text) {
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
            out.family(name, Kind::Counter, help)
                .sample(&[("result", &"ok")], ok)
                .sample(&[("result", &"failed")], failed);
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

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncWriteExt;

    use super::fixture::{handshake, round_trip, server_identity, Fixture};

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
        assert!(matches!(err, Error::Read { .. }), "{err}");

        assert_eq!(tls.stats().reloads_failed, 3);
        let (server, client) = handshake(&tls, f.client(None)).await;
        server.expect("server handshake with the old configuration");
        let client = client.expect("client handshake");
        assert_eq!(server_identity(&client).as_deref(), Some("server-1"));
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
}
