//! Serving HTTP/1.1 connections with connection hygiene: a request head must
//! be complete `request_head_timeout` after its first byte, a keep-alive
//! connection with no request is closed after `idle_timeout`, and at the
//! connection limit the listener closes the connection idle longest (see
//! [`tributary_frontend::listener::IdleConnections`]). So neither half-sent requests nor
//! idle keep-alives can lock new clients out. Upgraded connections
//! (WebSockets) leave this loop and live on in their own task.

use std::future::Future as _;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use tributary_frontend::budget::{MemoryBudget, WAIT_FOR_ROOM};
use tributary_frontend::listener::{
    Activity, ConnState, IdleConnections, LimitedListener, LimitedStream, ReadHold,
};
use tributary_frontend::tls::TlsListener;
use tributary_frontend::Peer;

/// The timeouts of HTTP connections.
#[derive(Debug, Clone, Copy)]
pub struct Hygiene {
    /// From the first byte of a request head to its end.
    pub request_head_timeout: Duration,
    /// Between requests on a keep-alive connection.
    pub idle_timeout: Duration,
}

/// A listener the HTTP loop can serve.
pub trait HttpListener: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and who is on the other end.
    fn next(&mut self) -> impl std::future::Future<Output = (Self::Io, Peer)> + Send;
    /// Its connections that may be closed to make room.
    fn idle(&self) -> Arc<IdleConnections>;
}

impl HttpListener for LimitedListener {
    type Io = LimitedStream;
    async fn next(&mut self) -> (LimitedStream, Peer) {
        let (io, addr) = self.accept().await;
        (
            io,
            Peer {
                addr: Some(addr),
                certificate: None,
            },
        )
    }
    fn idle(&self) -> Arc<IdleConnections> {
        LimitedListener::idle(self)
    }
}

impl HttpListener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<LimitedStream>;
    async fn next(&mut self) -> (Self::Io, Peer) {
        axum::serve::Listener::accept(self).await
    }
    fn idle(&self) -> Arc<IdleConnections> {
        TlsListener::idle(self)
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets in-flight requests
/// finish (connections close as their requests end).
pub async fn serve<L: HttpListener>(
    mut listener: L,
    app: Router,
    hygiene: Hygiene,
    budget: MemoryBudget,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let idle = listener.idle();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (io, peer) = tokio::select! {
            c = listener.next() => c,
            () = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let registered = idle.register();
        let app = app.clone();
        let shutdown = shutdown.clone();
        let budget = budget.clone();
        tasks.spawn(async move {
            let state = registered.state.clone();
            serve_connection(io, peer, app, state, hygiene, budget, shutdown).await;
            drop(registered);
        });
    }
    // Connections finish their requests; each closes when idle.
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection<IO>(
    io: IO,
    peer: Peer,
    app: Router,
    state: Arc<ConnState>,
    hygiene: Hygiene,
    budget: MemoryBudget,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer.clone()));
        req.extensions_mut().insert(ReadHold(svc_state.clone()));
        let app = app.clone();
        let state = svc_state.clone();
        let guard = InFlight::new(svc_state.clone());
        async move {
            let response = app.oneshot(req.map(axum::body::Body::new)).await;
            response.map(|r| {
                if r.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                    state.set_upgraded();
                }
                // In flight until the whole body is written: a connection
                // sending a large response is not idle.
                r.map(|body| {
                    axum::body::Body::new(GuardedBody {
                        inner: body,
                        _guard: guard,
                    })
                })
            })
        }
    });
    let watched = Watched {
        io,
        state: state.clone(),
        budget,
        scratch: Vec::new(),
        retry: None,
        waiting_since: None,
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own head timer runs from the end of the previous response, so it
    // bounds idle time and head time together; ours (below) tells them apart.
    // hyper's is the backstop at the larger of the two.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(hygiene.request_head_timeout.max(hygiene.idle_timeout));
    let conn = builder
        .serve_connection(TokioIo::new(watched), service)
        .with_upgrades();
    let mut conn = pin!(conn);
    let mut shutting_down = false;
    let tick = (hygiene.request_head_timeout.min(hygiene.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                return;
            }
            () = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            () = state.closed() => {
                tracing::debug!("idle HTTP connection closed to make room for a new one");
                return;
            }
            _ = ticks.tick() => match state.activity() {
                Activity::Idle(ms) if ms >= hygiene.idle_timeout.as_millis() as u64 => return,
                Activity::ReadingHead(ms) if ms >= hygiene.request_head_timeout.as_millis() as u64 => {
                    tracing::debug!("request head not complete in time: connection closed");
                    return;
                }
                _ => {}
            },
        }
    }
}

/// A response body that keeps its request in flight until it is written
/// (or dropped).
struct GuardedBody {
    inner: axum::body::Body,
    _guard: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks a request in flight for as long as it lives (also when the
/// response future is dropped half-way).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> Self {
        state.begin();
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The connection's stream, telling its state when bytes arrive. Once the
/// connection is a WebSocket, what it reads draws from the node's memory
/// budget: a connection may hold [`WS_ALLOWANCE`] bytes read since its
/// handler last took a whole message ([`ReadHold::release`]); beyond that it
/// reserves what it is about to read (at least [`WS_CHUNK`]) before reading. With no room, reading
/// pauses (backpressure) and, after [`WAIT_FOR_ROOM`], fails: the socket
/// closes. So partially received WebSocket messages, across all connections,
/// stay within `limits.max_buffered_bytes` plus each connection's allowance.
struct Watched<IO> {
    io: IO,
    state: Arc<ConnState>,
    budget: MemoryBudget,
    /// Where a WebSocket's bytes land before they are counted.
    scratch: Vec<u8>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting_since: Option<tokio::time::Instant>,
}

/// Bytes a WebSocket connection reads without the node's budget.
pub const WS_ALLOWANCE: u64 = 16 * 1024;
/// The least a WebSocket connection reserves at a time beyond its allowance.
pub const WS_CHUNK: usize = 16 * 1024;

impl<IO: AsyncRead + Unpin> Watched<IO> {
    /// Room to read now (up to `want`, the caller's buffer), reserving more
    /// when needed; `Pending` while the budget is spent, an error once it
    /// stayed spent too long. Reads stay as large as the caller asks for
    /// (a WebSocket library re-scans its buffer per read: small reads of a
    /// large message would cost it more than the budget saves).
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            let (held, reserved) = self.state.held();
            let room = usize::try_from((WS_ALLOWANCE + reserved as u64).saturating_sub(held))
                .unwrap_or(usize::MAX);
            if room < want {
                let more = (want - room).max(WS_CHUNK);
                if let Some(r) = self.budget.try_reserve(more) {
                    self.state.add_reserved(r);
                    continue;
                }
            }
            if room > 0 {
                self.waiting_since = None;
                self.retry = None;
                return Poll::Ready(Ok(room.min(want)));
            }
            let now = tokio::time::Instant::now();
            let since = *self.waiting_since.get_or_insert(now);
            if now.duration_since(since) >= WAIT_FOR_ROOM {
                return Poll::Ready(Err(io::Error::other(
                    "limits.max_buffered_bytes is spent: this WebSocket is closed",
                )));
            }
            let retry = self
                .retry
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            if retry.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.retry = None;
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.state.is_upgraded() {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.io).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.state.bytes_read();
            }
            return r;
        }
        let want = buf.remaining();
        let room = match self.poll_room(cx, want) {
            Poll::Ready(Ok(room)) => room,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if room >= want {
            // Room for the whole buffer: read straight into it.
            let before = buf.filled().len();
            let r = Pin::new(&mut self.io).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            self.state.add_held(n);
            return r;
        }
        let this = &mut *self;
        this.scratch.resize(room, 0);
        let mut limited = ReadBuf::new(&mut this.scratch);
        let r = Pin::new(&mut this.io).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if n > 0 {
            buf.put_slice(limited.filled());
            this.state.add_held(n);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
