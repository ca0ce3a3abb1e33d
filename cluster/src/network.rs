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
use openraft::{BasicNode, OptionalSend, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Mutex};
use tributary_storage::{Applied, Error, Op};

use crate::gate::Gate;
use crate::types::{NodeId, Raft, TypeConfig};

/// The largest message between nodes (a batch of entries or a forwarded
/// write; writes are bounded far below by the front ends' limits).
pub const MAX_FRAME: usize = 64 << 20;

/// The largest op: one whose entry fits a frame alone (the vote, the log
/// ids and the framing around it are far below the 64 KiB kept). A bigger
/// write is refused before it is proposed ([`Error::WriteTooLarge`]): no
/// follower could receive it, and the leader would send it for ever.
pub const MAX_OP: usize = MAX_FRAME - (64 << 10);

/// Refuses an op too large to replicate (over [`MAX_OP`] encoded).
pub fn check_size(op: &Op) -> Result<(), Error> {
    let size = postcard::experimental::serialized_size(op).unwrap_or(usize::MAX);
    if size > MAX_OP {
        return Err(Error::WriteTooLarge { size, max: MAX_OP });
    }
    Ok(())
}

/// The entries one AppendEntries carries at most, in bytes (or a single
/// larger entry). openraft sends up to `max_payload_entries` entries at
/// once whatever their size, and gives each call one heartbeat to be
/// answered: a follower far behind on large entries (edge batches of
/// hundreds of kilobytes) was sent a frame over [`MAX_FRAME`], or one it
/// could not take in and write in time, again and again, and never caught
/// up. A few megabytes cross loopback or a LAN and are written well within
/// the default 50 ms; under load a call carries far less (about 40 KB at
/// 90,000 events/s).
pub const APPEND_BUDGET: usize = 4 << 20;

/// Cuts `rpc`'s entries to the longest prefix that encodes in `budget`
/// bytes (one entry at least); the last entry kept, if any were cut.
fn fit_entries(
    rpc: &mut AppendEntriesRequest<TypeConfig>,
    budget: usize,
) -> Option<openraft::LogId<NodeId>> {
    let mut total = 0usize;
    let mut keep = 0;
    for e in &rpc.entries {
        let size = postcard::experimental::serialized_size(e).unwrap_or(usize::MAX);
        total = total.saturating_add(size);
        if keep > 0 && total > budget {
            break;
        }
        keep += 1;
    }
    if keep == rpc.entries.len() {
        return None;
    }
    rpc.entries.truncate(keep);
    rpc.entries.last().map(|e| e.log_id)
}

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
    /// Sends the entries that fit [`APPEND_BUDGET`]; if that is not all of
    /// them, their success is a partial one, and openraft sends the rest
    /// next.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let cut = fit_entries(&mut rpc, APPEND_BUDGET);
        match self.peer.call(&Rpc::Append(rpc), option.hard_ttl()).await {
            Ok(Reply::Append(Ok(AppendEntriesResponse::Success))) if cut.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(cut))
            }
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

    /// Streams a snapshot taken here (a cut) to the follower, written out
    /// in full on a thread as its chunks are sent (see `snapshot_data`):
    /// nothing is written to disk on the way, and at most a few chunks wait
    /// in memory. A chunk whose call fails is tried five times at most in
    /// all, after a short pause (not one without an answer in time); a failure to write the cut out (a
    /// read of the log failing), or a follower that lost the stream, ends
    /// this send as unreachable, and openraft starts another after its
    /// backoff, from the first chunk. Left to openraft's own sender, a
    /// failure to read the snapshot would count as the node's storage
    /// failing, which stops its Raft. Giving the send up stops the writing
    /// out too.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        mut snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let Some(cut) = snapshot.snapshot.take_cut() else {
            // A file: not a snapshot taken here (none is sent as one).
            return Chunked::send_snapshot(self, vote, snapshot, cancel, option).await;
        };
        let chunk = option.snapshot_chunk_size().unwrap_or(1 << 20);
        self.stream_snapshot(vote, snapshot.meta, cut, cancel, chunk, &option)
            .await
    }
}

impl PeerClient {
    /// [`RaftNetwork::full_snapshot`] of a cut, in chunks of `chunk` bytes.
    async fn stream_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        meta: SnapshotMeta<NodeId, BasicNode>,
        cut: crate::snapshot_data::Expand,
        cancel: impl Future<Output = ReplicationClosed>,
        chunk: usize,
        option: &RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let started = std::time::Instant::now();
        let (mut written, mut chunks) = cut.stream(chunk);
        let mut cancel = std::pin::pin!(cancel);
        let mut offset = 0u64;
        let mut next = tokio::select! {
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            chunk = chunks.recv() => chunk,
        };
        loop {
            let Some(data) = next.take() else {
                // Ended before a first chunk: the writing out failed.
                return Err(write_out_failed((&mut written).await));
            };
            let following = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                chunk = chunks.recv() => chunk,
            };
            let done = following.is_none();
            if done {
                match (&mut written).await {
                    Ok(Ok(bytes)) => tracing::info!(
                        bytes,
                        took = ?started.elapsed(),
                        target = self.target,
                        "cluster: streamed a snapshot out to send it"
                    ),
                    failed => return Err(write_out_failed(failed)),
                }
            }
            // Never in the middle of a call: a connection left there would
            // answer the next call with this one's reply.
            tokio::select! {
                biased;
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                () = std::future::ready(()) => {}
            }
            let len = data.len() as u64;
            let rpc = Rpc::Snapshot(InstallSnapshotRequest {
                vote,
                meta: meta.clone(),
                offset,
                data,
                done,
            });
            let answer = self.send_chunk(&rpc, option).await?;
            if answer.vote > vote || done {
                return Ok(SnapshotResponse::new(answer.vote));
            }
            offset += len;
            next = following;
        }
    }
}

/// A snapshot that could not be written out to be sent: the send's
/// failure (tried again after openraft's backoff), not the node's storage.
fn write_out_failed(
    outcome: Result<io::Result<u64>, tokio::task::JoinError>,
) -> StreamingError<TypeConfig, Fatal<NodeId>> {
    let e = match outcome {
        Ok(Err(e)) => e,
        Err(e) => io::Error::other(e.to_string()),
        Ok(Ok(_)) => io::Error::other("the snapshot ended before its first chunk"),
    };
    tracing::warn!(error = %e, "cluster: cannot write a snapshot out to send it");
    StreamingError::Unreachable(Unreachable::new(&e))
}

impl PeerClient {
    /// Sends one chunk of a snapshot; one that fails for a moment (not for
    /// want of an answer in time) again.
    async fn send_chunk(
        &mut self,
        rpc: &Rpc,
        option: &RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        const TRIES: u32 = 5;
        let mut failures = 0;
        loop {
            let err = match self.peer.call(rpc, option.hard_ttl()).await {
                Ok(Reply::Snapshot(Ok(answer))) => return Ok(answer),
                Ok(Reply::Snapshot(Err(RaftError::Fatal(fatal)))) => {
                    return Err(RemoteError::new(self.target, fatal).into());
                }
                Ok(Reply::Snapshot(Err(RaftError::APIError(e)))) => {
                    // The follower lost the stream (it restarted, or
                    // another stream began): from the first chunk, later.
                    let e = io::Error::other(e.to_string());
                    return Err(StreamingError::Unreachable(Unreachable::new(&e)));
                }
                Ok(_) => io::Error::other("a node answered with the wrong kind of message"),
                Err(e) => e,
            };
            failures += 1;
            tracing::warn!(error = %err, failures, "cluster: a snapshot chunk was not sent");
            // No answer within the deadline: openraft's next attempt, with
            // its own timing, rather than more calls under this one.
            if failures >= TRIES || err.kind() == io::ErrorKind::TimedOut {
                return Err(match err.kind() {
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
                        StreamingError::Unreachable(Unreachable::new(&err))
                    }
                    _ => StreamingError::Network(NetworkError::new(&err)),
                });
            }
            tokio::time::sleep(Duration::from_millis(10 << failures.min(4))).await;
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::snapshot_data::tests::{expand, leader_with_records, restores_the_leader};
    use crate::snapshot_data::Expand;
    use crate::types::big_entry;
    use openraft::error::SnapshotMismatch;
    use openraft::{SnapshotSegmentId, StoredMembership};

    /// What the fake follower saw: each chunk as (offset, length, done).
    type Seen = Arc<StdMutex<Vec<(u64, usize, bool)>>>;

    /// A follower that writes the chunks it is sent at their offsets, and
    /// fails as `fail` says: `Some(n)`, drop the connection unanswered the
    /// first time chunk n arrives; `None`, answer every chunk but the first
    /// with a snapshot mismatch (it lost the stream).
    async fn follower(fail: Option<usize>) -> (String, Seen, Arc<StdMutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen: Seen = Arc::default();
        let file: Arc<StdMutex<Vec<u8>>> = Arc::default();
        let (s, f) = (seen.clone(), file.clone());
        tokio::spawn(async move {
            let mut failed = false;
            loop {
                let (mut conn, _) = listener.accept().await.expect("accept");
                while let Ok(Rpc::Snapshot(req)) = read_frame::<_, Rpc>(&mut conn).await {
                    let n = s.lock().unwrap().len();
                    s.lock()
                        .unwrap()
                        .push((req.offset, req.data.len(), req.done));
                    if fail == Some(n) && !failed {
                        failed = true;
                        break;
                    }
                    if fail.is_none() && n > 0 {
                        let mismatch = SnapshotMismatch {
                            expect: SnapshotSegmentId {
                                id: req.meta.snapshot_id.clone(),
                                offset: 0,
                            },
                            got: SnapshotSegmentId {
                                id: req.meta.snapshot_id.clone(),
                                offset: req.offset,
                            },
                        };
                        let e =
                            RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch));
                        let _ = write_frame(&mut conn, &Reply::Snapshot(Err(e))).await;
                        continue;
                    }
                    {
                        let mut file = f.lock().unwrap();
                        let end = req.offset as usize + req.data.len();
                        if file.len() < end {
                            file.resize(end, 0);
                        }
                        file[req.offset as usize..end].copy_from_slice(&req.data);
                    }
                    let answer = InstallSnapshotResponse { vote: req.vote };
                    write_frame(&mut conn, &Reply::Snapshot(Ok(answer)))
                        .await
                        .expect("answer");
                }
            }
        });
        (addr, seen, file)
    }

    fn meta() -> SnapshotMeta<NodeId, BasicNode> {
        SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "s".into(),
        }
    }

    /// A chunk whose call failed (the connection dropped, no answer) is
    /// sent again at the same offset; the chunks the follower holds then
    /// make the whole snapshot, which restores a node equal to the leader,
    /// and only the last says it is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_streams_whole_and_a_failed_chunk_is_sent_again() {
        let (log, dir) = leader_with_records().await;
        let cut = expand(&log, dir.path());
        let (addr, seen, file) = follower(Some(3)).await;
        let mut client = PeerClient {
            target: 2,
            peer: Peer::new(addr, None),
        };
        let vote = Vote::new(1, 1);
        let answer = client
            .stream_snapshot(
                vote,
                meta(),
                cut,
                std::future::pending(),
                1000,
                &RPCOption::new(Duration::from_secs(10)),
            )
            .await
            .expect("sent");
        assert_eq!(answer.vote, vote);
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() > 10, "{} chunks", seen.len());
        assert_eq!(seen[3].0, seen[4].0, "the failed chunk again: {seen:?}");
        let dones: Vec<usize> = (0..seen.len()).filter(|&i| seen[i].2).collect();
        assert_eq!(dones, [seen.len() - 1], "{seen:?}");
        let whole = file.lock().unwrap().clone();
        restores_the_leader(&log, &whole, dir.path()).await;
    }

    /// A follower that lost the stream ends the send as unreachable, to be
    /// started again from the first chunk; so does a cut that cannot be
    /// written out, and a send given up ends as closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_stream_or_a_failed_write_out_ends_the_send_as_unreachable() {
        let (log, dir) = leader_with_records().await;
        let (addr, seen, _) = follower(None).await;
        let mut client = PeerClient {
            target: 2,
            peer: Peer::new(addr, None),
        };
        let option = RPCOption::new(Duration::from_secs(10));
        let vote = Vote::new(1, 1);
        let e = client
            .stream_snapshot(
                vote,
                meta(),
                expand(&log, dir.path()),
                std::future::pending(),
                1000,
                &option,
            )
            .await
            .expect_err("mismatch");
        assert!(matches!(e, StreamingError::Unreachable(_)), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 2);

        std::fs::write(dir.path().join("bad"), b"not a snapshot").expect("write");
        let bad = Expand {
            log: log.clone(),
            cut: std::fs::File::open(dir.path().join("bad")).expect("open"),
        };
        let e = client
            .stream_snapshot(vote, meta(), bad, std::future::pending(), 1000, &option)
            .await
            .expect_err("damaged");
        assert!(matches!(e, StreamingError::Unreachable(_)), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 2, "nothing sent");

        let closed = async { ReplicationClosed::new("given up") };
        let e = client
            .stream_snapshot(
                vote,
                meta(),
                expand(&log, dir.path()),
                closed,
                1000,
                &option,
            )
            .await
            .expect_err("closed");
        assert!(matches!(e, StreamingError::Closed(_)), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 2, "nothing sent");
    }

    /// Entries over [`APPEND_BUDGET`] together go in several calls: the
    /// first sends those that fit and answers a partial success up to the
    /// last of them, and the rest go in the next call; an entry larger
    /// than the budget goes alone. Before, all went in one call, over the
    /// frame limit or too large to be answered in time, at every try, and
    /// a follower that far behind never caught up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_over_the_budget_are_sent_in_several_calls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let got: Arc<StdMutex<Vec<Vec<u64>>>> = Arc::default();
        let g = got.clone();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            while let Ok(Rpc::Append(req)) = read_frame::<_, Rpc>(&mut conn).await {
                let indexes = req.entries.iter().map(|e| e.log_id.index).collect();
                g.lock().unwrap().push(indexes);
                let ok = Reply::Append(Ok(AppendEntriesResponse::Success));
                write_frame(&mut conn, &ok).await.expect("answer");
            }
        });
        let mut client = PeerClient {
            target: 2,
            peer: Peer::new(addr, None),
        };
        let option = || RPCOption::new(Duration::from_secs(30));
        let entries: Vec<_> = (1..=3)
            .map(|i| big_entry(i, APPEND_BUDGET * 2 / 5))
            .collect();
        let leader = Vote::new_committed(1, 1);
        let request = |entries: Vec<openraft::Entry<TypeConfig>>| AppendEntriesRequest {
            vote: leader,
            prev_log_id: entries
                .first()
                .and_then(|e| e.log_id.index.checked_sub(1))
                .filter(|i| *i > 0)
                .map(|i| openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i)),
            entries,
            leader_commit: None,
        };
        let answer = client
            .append_entries(request(entries.clone()), option())
            .await
            .expect("sent");
        assert_eq!(
            answer,
            AppendEntriesResponse::PartialSuccess(Some(entries[1].log_id))
        );
        let answer = client
            .append_entries(request(entries[2..].to_vec()), option())
            .await
            .expect("sent");
        assert_eq!(answer, AppendEntriesResponse::Success);
        let (large, small) = (big_entry(4, APPEND_BUDGET * 3 / 2), big_entry(5, 10));
        let answer = client
            .append_entries(request(vec![large.clone(), small]), option())
            .await
            .expect("sent");
        assert_eq!(
            answer,
            AppendEntriesResponse::PartialSuccess(Some(large.log_id))
        );
        assert_eq!(*got.lock().unwrap(), [vec![1, 2], vec![3], vec![4]]);
    }

    /// A write over what one entry may hold is refused before it is
    /// proposed, with its size.
    #[test]
    fn a_write_too_large_for_one_entry_is_refused() {
        let fits = big_entry(1, 1 << 20);
        let openraft::EntryPayload::Normal(crate::types::Request(op)) = fits.payload else {
            unreachable!()
        };
        check_size(&op).expect("1 MiB fits");
        let over = big_entry(1, MAX_OP);
        let openraft::EntryPayload::Normal(crate::types::Request(op)) = over.payload else {
            unreachable!()
        };
        match check_size(&op) {
            Err(Error::WriteTooLarge { size, max }) => {
                assert_eq!(max, MAX_OP);
                assert!(size > MAX_OP, "{size}");
            }
            other => panic!("{other:?}"),
        }
    }
}
