//! A TCP listener that holds at most `max_connections` connections open: the
//! next accept waits for a free slot, so excess clients queue in the kernel's
//! backlog instead of costing memory here. Connections that register as idle
//! (HTTP keep-alive with no request in progress, see [`IdleConnections`]) are
//! closed first when every slot is taken, so idle or half-sent connections
//! cannot lock out new clients.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tributary_storage::util::lock;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Idle 60 s, then 4 probes 10 s apart: a dead peer is dropped within ~100 s.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(4);

/// Connection counters of one listener.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

/// The connection counters of every listener of one front end (TCP, TLS,
/// WebSocket), summed for its metrics and its open-connection gauge.
#[derive(Debug, Default)]
pub struct ListenerSet(std::sync::Mutex<Vec<Arc<ConnectionStats>>>);

impl ListenerSet {
    /// Counts `stats` from now on.
    pub fn add(&self, stats: Arc<ConnectionStats>) {
        lock(&self.0).push(stats);
    }

    /// Connections open now, over every listener.
    pub fn open(&self) -> u64 {
        self.sum(|c| c.open.load(Relaxed))
    }

    /// Connections accepted since start, over every listener.
    pub fn accepted(&self) -> u64 {
        self.sum(|c| c.accepted.load(Relaxed))
    }

    fn sum(&self, f: impl Fn(&ConnectionStats) -> u64) -> u64 {
        let all = lock(&self.0);
        all.iter().map(|c| f(c)).sum()
    }
}

/// A listener with a connection limit.
#[derive(Debug)]
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    stats: Arc<ConnectionStats>,
    idle: Arc<IdleConnections>,
}

/// Milliseconds since a process-wide start, for timestamps in atomics (0: none).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    start.elapsed().as_millis() as u64 + 1
}

/// The state of one connection that can be idle (an HTTP connection).
#[derive(Debug)]
pub struct ConnState {
    /// Requests being served now.
    in_flight: AtomicU64,
    /// When the connection last became idle (no request in flight).
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (0: none yet).
    head_started: AtomicU64,
    /// Set to close the connection (evicted at the connection limit).
    close: tokio::sync::Notify,
    /// Upgraded (a WebSocket): reads draw from the node's memory budget.
    upgraded: std::sync::atomic::AtomicBool,
    /// Bytes read since the WebSocket handler last took a whole message.
    held: AtomicU64,
    /// The budget those bytes hold beyond the connection's own allowance.
    reserved: std::sync::Mutex<crate::budget::Reserved>,
}

/// What a WebSocket handler gets to say "a whole message was taken": the
/// bytes read for it go back to the node's memory budget (see
/// `http::serve`). Handlers extract it as `Option<Extension<ReadHold>>`.
#[derive(Debug, Clone)]
pub struct ReadHold(pub Arc<ConnState>);

impl ReadHold {
    /// Gives back what the connection read so far (one message was taken).
    pub fn release(&self) {
        self.0.release();
    }

    /// `stream`, releasing after each message it yields.
    pub fn wrap<S>(hold: Option<Self>, stream: S) -> Releasing<S> {
        Releasing { stream, hold }
    }
}

/// A WebSocket's message stream that gives each message's bytes back to the
/// node's budget as the handler takes it ([`ReadHold::wrap`]).
#[derive(Debug)]
pub struct Releasing<S> {
    stream: S,
    hold: Option<ReadHold>,
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for Releasing<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let r = Pin::new(&mut self.stream).poll_next(cx);
        if let (Poll::Ready(Some(_)), Some(h)) = (&r, &self.hold) {
            h.release();
        }
        r
    }
}

/// What a connection is doing, for its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Serving a request (reading its body, waiting, writing the response).
    Busy,
    /// Waiting for a request for this many ms.
    Idle(u64),
    /// Reading a request head for this many ms.
    ReadingHead(u64),
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            in_flight: AtomicU64::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_started: AtomicU64::new(0),
            close: tokio::sync::Notify::new(),
            upgraded: std::sync::atomic::AtomicBool::new(false),
            held: AtomicU64::new(0),
            reserved: std::sync::Mutex::new(crate::budget::Reserved::none()),
        }
    }

    /// A request starts (its head is complete).
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_started.store(0, Relaxed);
    }

    /// A request is done.
    pub fn end(&self) {
        self.idle_since.store(now_ms(), Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// Bytes arrived from the peer.
    pub fn bytes_read(&self) {
        if self.in_flight.load(Relaxed) == 0 && self.head_started.load(Relaxed) == 0 {
            self.head_started.store(now_ms(), Relaxed);
        }
    }

    /// What the connection is doing now.
    pub fn activity(&self) -> Activity {
        if self.in_flight.load(Relaxed) > 0 {
            return Activity::Busy;
        }
        let now = now_ms();
        match self.head_started.load(Relaxed) {
            0 => Activity::Idle(now.saturating_sub(self.idle_since.load(Relaxed))),
            t => Activity::ReadingHead(now.saturating_sub(t)),
        }
    }

    /// Resolves when the connection was chosen to be closed.
    pub async fn closed(&self) {
        self.close.notified().await;
    }

    /// The connection became a WebSocket.
    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Relaxed);
    }

    /// Is the connection a WebSocket?
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Relaxed)
    }

    /// Bytes read since the last whole message, and the budget they hold.
    pub fn held(&self) -> (u64, usize) {
        let reserved = lock(&self.reserved).bytes();
        (self.held.load(Relaxed), reserved)
    }

    /// Counts bytes read.
    pub fn add_held(&self, n: usize) {
        self.held.fetch_add(n as u64, Relaxed);
    }

    /// Adds budget to what the connection holds.
    pub fn add_reserved(&self, r: crate::budget::Reserved) {
        lock(&self.reserved).merge(r);
    }

    /// A whole message was taken: what was read for it goes back.
    pub fn release(&self) {
        self.held.store(0, Relaxed);
        *lock(&self.reserved) = crate::budget::Reserved::none();
    }
}

/// The connections of one listener that may be idle.
#[derive(Debug, Default)]
pub struct IdleConnections {
    conns: std::sync::Mutex<std::collections::HashMap<u64, Arc<ConnState>>>,
    next: AtomicU64,
    /// Connections closed to make room for new ones.
    pub evicted: AtomicU64,
}

/// A registration; removed when dropped.
#[derive(Debug)]
pub struct Registered {
    owner: Arc<IdleConnections>,
    id: u64,
    /// The connection's state.
    pub state: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.owner.conns).remove(&self.id);
    }
}

impl IdleConnections {
    /// Registers a new connection (idle until its first request).
    pub fn register(self: &Arc<Self>) -> Registered {
        let id = self.next.fetch_add(1, Relaxed);
        let state = Arc::new(ConnState::new());
        lock(&self.conns).insert(id, state.clone());
        Registered {
            owner: self.clone(),
            id,
            state,
        }
    }

    /// Closes the connection that has waited longest without a request in
    /// flight (idle, or sending a head); false when every one is busy.
    pub fn evict_one(&self) -> bool {
        let conns = lock(&self.conns);
        let victim = conns
            .values()
            .filter_map(|c| match c.activity() {
                Activity::Busy => None,
                Activity::Idle(ms) | Activity::ReadingHead(ms) => Some((ms, c)),
            })
            .max_by_key(|(ms, _)| *ms);
        match victim {
            Some((_, c)) => {
                c.close.notify_one();
                self.evicted.fetch_add(1, Relaxed);
                true
            }
            None => false,
        }
    }
}

impl LimitedListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, max_connections: usize) -> Self {
        LimitedListener {
            inner,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            stats: Arc::new(ConnectionStats::default()),
            idle: Arc::default(),
        }
    }

    /// Like [`LimitedListener::new`], counting into `stats` (shared with
    /// another listener of the same front end, e.g. HTTP and HTTPS).
    pub fn with_stats(
        inner: TcpListener,
        max_connections: usize,
        stats: Arc<ConnectionStats>,
    ) -> Self {
        LimitedListener {
            inner,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            stats,
            idle: Arc::default(),
        }
    }

    /// Counters, shared with whoever reports them.
    pub fn stats(&self) -> Arc<ConnectionStats> {
        self.stats.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Connections of this listener that may be closed to make room.
    pub fn idle(&self) -> Arc<IdleConnections> {
        self.idle.clone()
    }

    /// Waits for a free slot (closing an idle connection first when all are
    /// taken), then for the next connection.
    pub async fn accept(&self) -> (LimitedStream, SocketAddr) {
        // Full: close the connection idle longest (one per admitted
        // connection), else wait for a slot, looking again every second for
        // a connection that has become idle meanwhile.
        let permit = loop {
            if let Ok(p) = self.slots.clone().try_acquire_owned() {
                break Some(p);
            }
            let wait = if self.idle.evict_one() {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            // The semaphore is never closed, so an Ok is always Some.
            if let Ok(p) = tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
                break p.ok();
            }
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    // A peer that vanishes without FIN or RST (power cut, NAT
                    // timeout) is found by TCP keepalive: otherwise a client
                    // that negotiated no protocol heartbeat (AMQP heartbeat 0,
                    // MQTT keep-alive 0) would hold its slot forever.
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&KEEPALIVE);
                    self.stats.accepted.fetch_add(1, Relaxed);
                    self.stats.open.fetch_add(1, Relaxed);
                    let stream = LimitedStream {
                        stream,
                        _slot: permit,
                        stats: self.stats.clone(),
                    };
                    return (stream, addr);
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        LimitedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, LimitedListener>>
    for crate::Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, LimitedListener>) -> Self {
        crate::Peer {
            addr: Some(*stream.remote_addr()),
            certificate: None,
        }
    }
}

/// A connection that frees its slot when dropped.
#[derive(Debug)]
pub struct LimitedStream {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    stats: Arc<ConnectionStats>,
}

impl LimitedStream {
    /// The local address the client reached (what a protocol that names
    /// brokers to its clients, such as Kafka, advertises).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Relaxed);
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_tcp_keepalive() {
        let l = LimitedListener::new(TcpListener::bind("127.0.0.1:0").await.expect("bind"), 4);
        let addr = l.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = l.accept().await;
        let sock = socket2::SockRef::from(&accepted.stream);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(60)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 4);
        assert_eq!(l.stats().open.load(Relaxed), 1);
    }
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_full_listener_accepts_again_after_a_close() {
        let l = LimitedListener::new(TcpListener::bind("127.0.0.1:0").await.expect("bind"), 1);
        let addr = l.local_addr().expect("addr");
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let (s1, _) = l.accept().await;
        let _c2 = TcpStream::connect(addr).await.expect("connect");
        // The second accept cannot finish while s1 holds the only slot.
        let second = l.accept();
        tokio::pin!(second);
        assert!(futures_poll_once(&mut second).await.is_none());
        assert_eq!(l.stats().open.load(Relaxed), 1);
        drop(s1);
        let (mut s2, _) = second.await;
        assert_eq!(l.stats().accepted.load(Relaxed), 2);
        drop(_c2);
        let mut buf = [0u8; 1];
        assert_eq!(s2.read(&mut buf).await.expect("read"), 0);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match Pin::new(&mut *f).poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}
