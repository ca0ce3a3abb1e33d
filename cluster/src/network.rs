//! Node to node: TCP on `cluster.listen`, postcard frames (a 4-byte
//! big-endian length, then the message; at most [`MAX_FRAME`] bytes).
//! With [`NodeTls`], every connection is mutual TLS: each node presents its
//! certificate and accepts only peers whose certificate the nodes' CA
//! signed; a connection that does not complete the handshake is closed.
//!
//! - Raft's own calls (append entries, vote) go one at a time on a
//!   connection per replication stream, each under openraft's deadline.
//! - Writes a follower forwards to the leader go on one connection per
//!   leader, pipelined: requests are written as they come, answers come back
//!   in the same order, so a client's writes stay in its order.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::SnapshotResponse;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, Snapshot, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Mutex};
use tributary_storage::{Applied, Error, Op};

use crate::gate::Gate;
use crate::types::{NodeId, Raft, TypeConfig};

/// The largest message between nodes (a batch of entries or a forwarded
/// write; writes are bounded far below by the front ends' limits).
pub const MAX_FRAME: usize = 64 << 20;

/// A message to a node.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    /// Raft: entries (or a heartbeat).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: a vote.
    Vote(VoteRequest<NodeId>),
    /// A write forwarded to the leader.
    Forward(Op),
    /// A change of voters, asked of the leader.
    Membership(crate::MembershipChange),
    /// Raft: a chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Its answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To [`Rpc::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Rpc::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Rpc::Forward`]: what applying it gave, and its index.
    Forward(Result<(Applied, u64), Error>),
    /// To [`Rpc::Membership`]: done, or why not.
    Membership(Result<(), String>),
    /// To [`Rpc::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

impl Rpc {
    /// A vote request no node grants (term 0, from node 0): every node
    /// answers it and nothing changes, so it tells whether a node-to-node
    /// port takes a connection (tests, probes).
    pub fn probe() -> Rpc {
        Rpc::Vote(VoteRequest::new(openraft::Vote::new(0, 0), None))
    }
}

/// Writes one frame: its length, then `msg` in postcard.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> io::Result<()> {
    let bytes = postcard::to_allocvec(msg).map_err(io::Error::other)?;
    if bytes.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a message of {} bytes is over the {MAX_FRAME}-byte limit",
            bytes.len()
        )));
    }
    w.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Reads one frame, refusing one over [`MAX_FRAME`] before buffering it.
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    postcard::from_bytes(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// TLS between nodes: one certificate per node, used as server and as
/// client, and the CA that signed every node's (`[tls]` `cert`, `key`,
/// `client_ca`).
#[derive(Clone)]
pub struct NodeTls {
    /// Accepts peers: requires a client certificate the CA signed.
    pub server: Arc<rustls::ServerConfig>,
    /// Dials peers: trusts the CA, presents this node's certificate.
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTls")
    }
}

/// A connection between nodes: TCP, or TLS over TCP.
pub trait Link: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Link for T {}

/// How long a TLS handshake between nodes may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Connects to the node at `addr` (`host:port`), over TLS when given: the
/// peer's certificate must name `host`.
pub async fn dial(addr: &str, tls: Option<&NodeTls>) -> io::Result<Box<dyn Link>> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let stream = tokio::time::timeout(HANDSHAKE, connector.connect(name, stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(Box::new(stream))
}

/// One request at a time to a node, over a connection kept between calls.
pub struct Peer {
    addr: String,
    tls: Option<NodeTls>,
    conn: Mutex<Option<Box<dyn Link>>>,
}

impl Peer {
    /// A peer at `addr` (`host:port`); connects on the first call.
    pub fn new(addr: String, tls: Option<NodeTls>) -> Peer {
        Peer {
            addr,
            tls,
            conn: Mutex::new(None),
        }
    }

    /// Sends `rpc` and waits for its reply, at most `deadline` in all.
    pub async fn call(&self, rpc: &Rpc, deadline: Duration) -> io::Result<Reply> {
        let mut conn = self.conn.lock().await;
        let result = tokio::time::timeout(deadline, async {
            if conn.is_none() {
                *conn = Some(dial(&self.addr, self.tls.as_ref()).await?);
            }
            let s = conn
                .as_mut()
                .ok_or_else(|| io::Error::other("no connection"))?;
            write_frame(s, rpc).await?;
            read_frame(s).await
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")));
        if result.is_err() {
            // Its state is unknown: the next call starts afresh.
            *conn = None;
        }
        result
    }
}

/// Connects openraft's replication streams. A node reaches another at the
/// address its own `peers` gives (each node may see the others at its own
/// addresses: through NAT, a proxy, another interface); a node the local
/// list does not name is reached at the address in the membership.
pub struct Network {
    /// This node's `peers`: id → `host:port`.
    pub peers: BTreeMap<NodeId, String>,
    /// TLS between nodes, if on.
    pub tls: Option<NodeTls>,
}

/// A replication stream's client.
pub struct PeerClient {
    target: NodeId,
    peer: Peer,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            peer: Peer::new(
                self.peers
                    .get(&target)
                    .cloned()
                    .unwrap_or_else(|| node.addr.clone()),
                self.tls.clone(),
            ),
        }
    }
}

fn rpc_error<E: std::error::Error>(e: io::Error) -> RPCError<NodeId, BasicNode, E> {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&io::Error::other(
        "a node answered with the wrong kind of message",
    )))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.peer.call(&Rpc::Append(rpc), option.hard_ttl()).await {
            Ok(Reply::Append(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected()),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.peer.call(&Rpc::Vote(rpc), option.hard_ttl()).await {
            Ok(Reply::Vote(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected()),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.peer.call(&Rpc::Snapshot(rpc), option.hard_ttl()).await {
            Ok(Reply::Snapshot(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected()),
            Err(e) => Err(rpc_error(e)),
        }
    }

    /// Sends a snapshot with openraft's chunked sender, once it is written
    /// out in full (see `snapshot_data`): a failure to write it out (no
    /// room, a read of the log failing) is this send's, tried again after
    /// the backoff, where openraft would take it, met by its sender, as the
    /// node's storage failing, which stops the node's Raft. Giving the send
    /// up stops the writing out too.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        mut snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut cancel = Box::pin(cancel);
        tokio::select! {
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            written = snapshot.snapshot.seek(io::SeekFrom::End(0)) => {
                if let Err(e) = written {
                    return Err(StreamingError::Unreachable(Unreachable::new(&e)));
                }
            }
        }
        Chunked::send_snapshot(self, vote, snapshot, cancel, option).await
    }
}

type Answer = oneshot::Sender<Result<(Applied, u64), Error>>;

/// Writes forwarded to one leader, pipelined on one connection.
pub struct Forwarder {
    tx: mpsc::Sender<(Op, Answer)>,
}

impl Forwarder {
    /// Connects to the leader at `addr` (within `deadline`) and starts the
    /// connection's task. Requests queue (at most `depth` waiting to be
    /// written).
    pub async fn connect(
        addr: &str,
        depth: usize,
        deadline: Duration,
        tls: Option<&NodeTls>,
    ) -> io::Result<Forwarder> {
        let stream = tokio::time::timeout(deadline, dial(addr, tls))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"))??;
        let (tx, rx) = mpsc::channel(depth);
        tokio::spawn(forward_loop(stream, rx, depth));
        Ok(Forwarder { tx })
    }

    /// Queues `op`; the answer comes once the leader applied it.
    pub async fn send(
        &self,
        op: Op,
    ) -> Result<oneshot::Receiver<Result<(Applied, u64), Error>>, Error> {
        let (answer, rx) = oneshot::channel();
        self.tx
            .send((op, answer))
            .await
            .map_err(|_| unavailable("the link to the leader is closed"))?;
        Ok(rx)
    }

    /// Is its task gone (the connection failed)?
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

pub(crate) fn unavailable(why: &str) -> Error {
    Error::Unwritable(format!("the cluster cannot take writes now: {why}"))
}

async fn forward_loop(stream: Box<dyn Link>, mut rx: mpsc::Receiver<(Op, Answer)>, depth: usize) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Answers owed, in the order the requests were written.
    let owed: Arc<std::sync::Mutex<VecDeque<Answer>>> = Arc::default();
    let (room_tx, mut room) = mpsc::channel::<()>(depth.max(1));
    let reader = {
        let owed = owed.clone();
        tokio::spawn(async move {
            loop {
                let reply: io::Result<Reply> = read_frame(&mut rd).await;
                let next = owed.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let _ = room.try_recv();
                match (reply, next) {
                    (Ok(Reply::Forward(r)), Some(answer)) => {
                        let _ = answer.send(r);
                    }
                    (_, next) => {
                        if let Some(answer) = next {
                            let _ = answer.send(Err(unavailable("the link to the leader failed")));
                        }
                        return;
                    }
                }
            }
        })
    };
    while let Some((op, answer)) = rx.recv().await {
        if reader.is_finished() {
            let _ = answer.send(Err(unavailable("the link to the leader failed")));
            break;
        }
        // At most `depth` answers owed.
        if room_tx.send(()).await.is_err() {
            let _ = answer.send(Err(unavailable("the link to the leader failed")));
            break;
        }
        owed.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(answer);
        if write_frame(&mut wr, &Rpc::Forward(op)).await.is_err() {
            break;
        }
    }
    reader.abort();
    let _ = reader.await;
    // Whatever is still owed has an unknown outcome.
    for answer in owed.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        let _ = answer.send(Err(unavailable("the link to the leader failed")));
    }
    rx.close();
    while let Some((_, answer)) = rx.recv().await {
        let _ = answer.send(Err(unavailable("the link to the leader failed")));
    }
}

/// A write on its way: resolves with what applying it gave, and its index.
pub type Applying =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Applied, u64), Error>> + Send>>;

/// What the server hands a forwarded write to (the node's proposer).
pub trait Submit: Send + Sync + 'static {
    /// Queues `op` as the leader; resolves once queued, with what resolves
    /// once it is applied here.
    fn submit_as_leader(
        &self,
        op: Op,
    ) -> impl std::future::Future<Output = Result<Applying, Error>> + Send;

    /// Makes a change of voters as the leader.
    fn change_as_leader(
        &self,
        change: crate::MembershipChange,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Connections the node-to-node port serves at once (each node opens one
/// per replication stream, one for forwarding and one for votes): with
/// [`MAX_FRAME`], what the port can hold is bounded.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves other nodes on `listener` until the task is dropped.
pub async fn serve<S: Submit>(
    listener: TcpListener,
    raft: Raft,
    submit: Arc<S>,
    gate: Arc<Gate>,
    tls: Option<NodeTls>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "cluster port: {MAX_CONNECTIONS} connections open, refusing one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (raft, submit, gate, tls) = (raft.clone(), submit.clone(), gate.clone(), tls.clone());
        tokio::spawn(async move {
            let link: Box<dyn Link> = match tls {
                None => Box::new(stream),
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "cluster port: a TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "cluster port: a TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = connection(link, raft, submit, gate).await {
                tracing::debug!(error = %e, "cluster connection closed");
            }
            drop(slot);
        });
    }
}

async fn connection<S: Submit>(
    stream: Box<dyn Link>,
    raft: Raft,
    submit: Arc<S>,
    gate: Arc<Gate>,
) -> io::Result<()> {
    let (mut rd, wr) = tokio::io::split(stream);
    let wr = Arc::new(Mutex::new(wr));
    // Forwarded writes are answered in order by one task per connection.
    let (owed_tx, mut owed_rx) = mpsc::channel::<Applying>(1024);
    let answers = {
        let wr = wr.clone();
        tokio::spawn(async move {
            while let Some(pending) = owed_rx.recv().await {
                let r = pending.await;
                let mut w = wr.lock().await;
                if write_frame(&mut *w, &Reply::Forward(r)).await.is_err() {
                    return;
                }
            }
        })
    };
    let result = async {
        loop {
            let rpc: Rpc = read_frame(&mut rd).await?;
            match rpc {
                Rpc::Append(req) => {
                    let commit = req.leader_commit.map(|l| l.index);
                    let r = raft.append_entries(req).await;
                    if r.is_ok() && !gate.is_open() {
                        let last = raft.metrics().borrow().last_log_index;
                        gate.heard(commit, last).await.map_err(io::Error::other)?;
                    }
                    write_frame(&mut *wr.lock().await, &Reply::Append(r)).await?;
                }
                Rpc::Vote(req) if !gate.may_vote(&req) => {
                    // No answer: to the candidate, this node is unreachable.
                    return Err(io::Error::other(
                        "a vote request while this node catches up after starting empty",
                    ));
                }
                Rpc::Vote(req) => {
                    let r = raft.vote(req).await;
                    write_frame(&mut *wr.lock().await, &Reply::Vote(r)).await?;
                }
                Rpc::Snapshot(req) => {
                    let r = raft.install_snapshot(req).await;
                    write_frame(&mut *wr.lock().await, &Reply::Snapshot(r)).await?;
                }
                Rpc::Membership(change) => {
                    // Asked on a connection of its own (`Peer::call`), so
                    // no forwarded write's answer is owed on this one.
                    let r = submit.change_as_leader(change).await;
                    write_frame(&mut *wr.lock().await, &Reply::Membership(r)).await?;
                }
                Rpc::Forward(op) => {
                    let pending = match submit.submit_as_leader(op).await {
                        Ok(p) => p,
                        Err(e) => Box::pin(async move { Err(e) }),
                    };
                    if owed_tx.send(pending).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    drop(owed_tx);
    let _ = answers.await;
    result
}
