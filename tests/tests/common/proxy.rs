//! A fault-injecting TCP proxy for end-to-end tests.
//!
//! [`Proxy`] sits on 127.0.0.1 between two nodes (for instance the WebSocket
//! link from an edge node to its core) and forwards bytes both ways until a
//! test asks it to misbehave: cut every connection abruptly ([`Proxy::cut`],
//! [`Proxy::cut_after`]), turn the link half-open ([`Proxy::stall`] /
//! [`Proxy::resume`]), refuse new connections as if the far end were down
//! ([`Proxy::refuse`]), or send new connections elsewhere
//! ([`Proxy::set_target`]).
//!
//! Memory is bounded: each connection owns one fixed buffer per direction and
//! nothing is queued beyond it, so a slow or stalled peer sees ordinary TCP
//! backpressure. Every task the proxy spawns ends when the [`Proxy`] is
//! dropped.
//!
//! ```ignore
//! let proxy = Proxy::start(core_addr).await;
//! // point the edge at proxy.addr() instead of core_addr, then:
//! proxy.stall(); // the link goes silent, both ends still think it is up
//! proxy.resume(); // the stalled connections are reset, new ones flow again
//! ```

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwarding buffer, one per direction and connection.
const BUF_SIZE: usize = 64 * 1024;
/// What a connection accepted during a stall may read before it stops reading.
const STALL_BUF_SIZE: usize = 8 * 1024;

/// Faults every connection task watches.
#[derive(Clone, Copy, Debug, Default)]
struct Ctl {
    /// Bumped by every cut: a connection is cut when this differs from the value
    /// it saw when it was accepted.
    epoch: u64,
    /// Nothing is forwarded while set.
    stalled: bool,
}

/// The forwarding direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Client to target.
    Up,
    /// Target to client.
    Down,
}

/// State shared by the proxy handle, the accept loop and the connections.
struct Shared {
    target: Mutex<SocketAddr>,
    ctl: watch::Sender<Ctl>,
    refusing: AtomicBool,
    /// Client→target bytes left before an armed [`Proxy::cut_after`] fires.
    budget: Mutex<Option<u64>>,
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
}

impl Shared {
    fn cut(&self) {
        self.ctl.send_modify(|c| c.epoch += 1);
    }

    fn target(&self) -> SocketAddr {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves up to `len` client→target bytes against an armed
    /// [`Proxy::cut_after`]; returns how many may be forwarded and whether the
    /// cut must fire once they are.
    fn reserve(&self, len: usize) -> (usize, bool) {
        let mut budget = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        match *budget {
            None => (len, false),
            Some(left) => {
                let allowed = usize::try_from(left).map_or(len, |left| left.min(len));
                let left = left - allowed as u64;
                if left == 0 {
                    *budget = None;
                    (allowed, true)
                } else {
                    *budget = Some(left);
                    (allowed, false)
                }
            }
        }
    }

    fn count(&self, dir: Dir, n: usize) {
        let counter = match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A fault-injecting TCP proxy listening on 127.0.0.1; see the module docs.
///
/// All methods take `&self`, are cheap and may be called from any thread;
/// faults apply to every connection at once.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `target`.
    ///
    /// Must be called within a tokio runtime; panics if it cannot bind.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local address");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            ctl: watch::Sender::new(Ctl::default()),
            refusing: AtomicBool::new(false),
            budget: Mutex::new(None),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        Proxy {
            addr,
            shared,
            shutdown,
            accept_task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes where NEW connections go (the core restarted on another port);
    /// open connections keep their target.
    pub fn set_target(&self, target: SocketAddr) {
        *self
            .shared
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = target;
    }

    /// Cuts every open connection now, abruptly, in the middle of whatever is
    /// being forwarded: both sockets are closed with `SO_LINGER` 0 (RST) without
    /// forwarding any buffered bytes. New connections still work afterwards.
    pub fn cut(&self) {
        self.shared.cut();
    }

    /// Cuts every open connection after forwarding `n` more bytes in the
    /// client→target direction, counted over all connections (the cut lands
    /// mid-frame). One-shot: once it has fired, forwarding is normal again.
    /// Calling it again re-arms it with the new `n`; `n == 0` cuts now.
    pub fn cut_after(&self, n: u64) {
        if n == 0 {
            *self
                .shared
                .budget
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
            self.shared.cut();
        } else {
            *self
                .shared
                .budget
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(n);
        }
    }

    /// Stalls silently: open connections stop forwarding in both directions but
    /// stay open (no FIN, no RST, not even when one end closes): a half-open
    /// link as seen by both ends. New connections are accepted and stalled the
    /// same way: they are not connected to the target, their first bytes are
    /// read into a small buffer and then reading stops, so TCP backpressure
    /// builds up.
    pub fn stall(&self) {
        self.shared.ctl.send_if_modified(|c| {
            let changed = !c.stalled;
            c.stalled = true;
            changed
        });
    }

    /// Ends a stall: every stalled connection is cut (closed abruptly, as a peer
    /// that eventually times out would be) and new connections forward normally
    /// again. Does nothing when not stalled.
    pub fn resume(&self) {
        self.shared.ctl.send_if_modified(|c| {
            let was_stalled = c.stalled;
            if was_stalled {
                c.stalled = false;
                c.epoch += 1;
            }
            was_stalled
        });
    }

    /// While refusing, new connections are accepted and closed at once (a plain
    /// close, so the client reads EOF, as if the core were down); open ones are
    /// unaffected.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Bytes forwarded so far (written to the other side), client→target and
    /// target→client. A write is counted just after it returns, so a peer can
    /// receive bytes a moment before they show here: poll rather than assert
    /// right after a read.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.shared.up.load(Ordering::Relaxed),
            self.shared.down.load(Ordering::Relaxed),
        )
    }

    /// Connections accepted so far, including refused and stalled ones.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    /// Stops the accept loop (the port is closed) and resets every open
    /// connection; all the proxy's tasks end.
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept_task.abort();
    }
}

/// Returns once the proxy is dropped.
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: that is a shutdown too.
    let _ = shutdown.wait_for(|down| *down).await;
}

/// Returns once the connection accepted at `epoch` is to be cut.
async fn wait_cut(ctl: &mut watch::Receiver<Ctl>, epoch: u64) {
    // The returned guard is dropped at once: holding it would block senders.
    let _ = ctl.wait_for(|c| c.epoch != epoch).await;
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "proxy shut down")
}

/// Returns once forwarding is allowed.
async fn wait_unstalled(ctl: &mut watch::Receiver<Ctl>) -> io::Result<()> {
    ctl.wait_for(|c| !c.stalled)
        .await
        .map(drop)
        .map_err(|_| closed())
}

/// Returns once forwarding stops.
async fn wait_stalled(ctl: &mut watch::Receiver<Ctl>) -> io::Result<()> {
    ctl.wait_for(|c| c.stalled)
        .await
        .map(drop)
        .map_err(|_| closed())
}

/// Closes `stream` with a RST instead of a FIN once it is dropped.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or the like: back off instead of spinning.
                tokio::select! {
                    _ = wait_shutdown(&mut shutdown) => return,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                }
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        if shared.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let ctl = shared.ctl.subscribe();
        let epoch = ctl.borrow().epoch;
        tokio::spawn(serve(client, shared.clone(), ctl, epoch, shutdown.clone()));
    }
}

/// Runs one connection until it ends, is cut or the proxy is dropped.
async fn serve(
    mut client: TcpStream,
    shared: Arc<Shared>,
    mut ctl: watch::Receiver<Ctl>,
    epoch: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    if ctl.borrow().stalled {
        hold_stalled(client, ctl, epoch, shutdown).await;
        return;
    }
    let connected = tokio::select! {
        biased;
        _ = wait_shutdown(&mut shutdown) => None,
        _ = wait_cut(&mut ctl, epoch) => None,
        connected = TcpStream::connect(shared.target()) => Some(connected),
    };
    let mut target = match connected {
        None => {
            reset(&client);
            return;
        }
        // The target is down: close plainly, as a refused connection would.
        Some(Err(_)) => return,
        Some(Ok(target)) => target,
    };
    let _ = target.set_nodelay(true);
    let abort = {
        let (client_rd, client_wr) = client.split();
        let (target_rd, target_wr) = target.split();
        let up = pump(client_rd, target_wr, Dir::Up, &shared, ctl.clone());
        let down = pump(target_rd, client_wr, Dir::Down, &shared, ctl.clone());
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => true,
            _ = wait_cut(&mut ctl, epoch) => true,
            // Both directions saw EOF: close plainly. An error on either side
            // resets both.
            done = async { tokio::try_join!(up, down) } => done.is_err(),
        }
    };
    if abort {
        reset(&client);
        reset(&target);
    }
}

/// A connection accepted during a stall: never connected to the target, it
/// reads a little and then nothing until it is cut (by [`Proxy::resume`] or
/// [`Proxy::cut`]) or the proxy is dropped.
async fn hold_stalled(
    mut client: TcpStream,
    mut ctl: watch::Receiver<Ctl>,
    epoch: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; STALL_BUF_SIZE];
    let mut filled = 0;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break,
            _ = wait_cut(&mut ctl, epoch) => break,
            read = client.read(&mut buf[filled..]), if open && filled < buf.len() => match read {
                Ok(0) | Err(_) => open = false,
                Ok(n) => filled += n,
            },
        }
    }
    reset(&client);
}

/// Forwards `rd` to `wr` until EOF (then shuts `wr` down) or an error. While
/// stalled nothing reaches `wr`: no data, no FIN, no error.
async fn pump<R, W>(
    mut rd: R,
    mut wr: W,
    dir: Dir,
    shared: &Shared,
    mut ctl: watch::Receiver<Ctl>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let read = rd.read(&mut buf).await;
        wait_unstalled(&mut ctl).await?;
        let n = match read? {
            0 => return wr.shutdown().await,
            n => n,
        };
        let mut pos = 0;
        while pos < n {
            wait_unstalled(&mut ctl).await?;
            let (len, fire) = match dir {
                Dir::Up => shared.reserve(n - pos),
                Dir::Down => (n - pos, false),
            };
            let guard = CutGuard::new(shared, fire);
            let end = pos + len;
            while pos < end {
                tokio::select! {
                    biased;
                    stalled = wait_stalled(&mut ctl) => {
                        stalled?;
                        wait_unstalled(&mut ctl).await?;
                    }
                    written = wr.write(&buf[pos..end]) => match written? {
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        written => {
                            pos += written;
                            shared.count(dir, written);
                        }
                    },
                }
            }
            if guard.fire() {
                // Forward nothing more: the cut just fired ends this connection.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Fires the cut of an exhausted [`Proxy::cut_after`] budget once the last
/// bytes are forwarded, or when dropped (the connection that reserved them died
/// first), unless some cut has happened since the budget ran out: that one
/// already ended every connection that was open then.
struct CutGuard<'a>(Option<(&'a Shared, u64)>);

impl<'a> CutGuard<'a> {
    fn new(shared: &'a Shared, armed: bool) -> Self {
        CutGuard(armed.then(|| (shared, shared.ctl.borrow().epoch)))
    }

    /// Fires the cut now; returns whether this guard was armed.
    fn fire(mut self) -> bool {
        self.fire_once()
    }

    fn fire_once(&mut self) -> bool {
        match self.0.take() {
            Some((shared, epoch)) => {
                shared.ctl.send_if_modified(|c| {
                    let fire = c.epoch == epoch;
                    if fire {
                        c.epoch += 1;
                    }
                    fire
                });
                true
            }
            None => false,
        }
    }
}

impl Drop for CutGuard<'_> {
    fn drop(&mut self) {
        self.fire_once();
    }
}
