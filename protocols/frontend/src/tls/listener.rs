//! Starting the connections of a TLS listener: [`establish`] runs the
//! handshake for an MQTT or AMQP connection ([`MaybeTls`]), and
//! [`TlsListener`] accepts HTTPS connections for `axum::serve`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{Tls, TlsStream};
use crate::listener::{ConnectionStats, LimitedListener, LimitedStream};
use crate::Peer;

/// Finished handshakes waiting for `TlsListener::accept`.
const ACCEPTED_QUEUE: usize = 64;
type Accepted = (TlsStream<LimitedStream>, Peer);

/// A connection of a listener that may speak TLS (MQTT 8883, AMQP 5671).
pub type MaybeTls = tokio_util::either::Either<LimitedStream, TlsStream<LimitedStream>>;

/// Starts a connection of the MQTT and AMQP listeners: with `tls`, the
/// handshake (bounded by [`HANDSHAKE_TIMEOUT`](super::HANDSHAKE_TIMEOUT),
/// abandoned at shutdown), whose verified client certificate names the peer.
/// `None`: the handshake failed (logged, counted in the TLS metrics) or the
/// node is shutting down.
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

    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::fixture::{localhost, round_trip, ClientSide, Fixture};

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
