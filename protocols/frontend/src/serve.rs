//! One way to serve a front end over TCP: a protocol implements [`Frontend`]
//! (what to do with one connection), and [`serve`] runs the accept loop every
//! protocol shares: accept within the listener's connection limit, the TLS
//! handshake when the listener has TLS, a task per connection, until the
//! node shuts down. The HTTP API, on axum, has its own loop
//! (`tributary_http::serve`); WebSocket front ends ride on it.

use std::future::Future;
use std::sync::Arc;

use crate::listener::{ConnectionStats, LimitedListener};
use crate::tls::{self, MaybeTls, Tls};
use crate::{FrontendContext, Peer};

/// A protocol served on TCP listeners (MQTT on 1883/8883, AMQP on 5672/5671).
pub trait Frontend: Send + Sync + 'static {
    /// The node's context; its shutdown token ends the accept loop, and
    /// connections are told to stop by it too.
    fn context(&self) -> &FrontendContext;

    /// A listener of this front end starts: count its connections.
    fn listening(&self, stats: Arc<ConnectionStats>);

    /// Serves one connection (TLS established, if any) until it ends or the
    /// node shuts down.
    fn connection(self: Arc<Self>, stream: MaybeTls, peer: Peer)
        -> impl Future<Output = ()> + Send;
}

/// Serves `frontend` on `listener` until the node shuts down; with `tls`, each
/// connection starts with a TLS handshake whose verified client certificate
/// names the peer.
pub async fn serve<F: Frontend>(frontend: Arc<F>, listener: LimitedListener, tls: Option<Tls>) {
    frontend.listening(listener.stats());
    let shutdown = frontend.context().shutdown.clone();
    loop {
        let (stream, addr) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let frontend = frontend.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let shutdown = frontend.context().shutdown.clone();
            if let Some((stream, peer)) =
                tls::establish(tls.as_ref(), stream, addr, &shutdown).await
            {
                frontend.connection(stream, peer).await;
            }
        });
    }
}
