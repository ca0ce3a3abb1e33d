//! One Kafka connection: requests are read by their size prefix (checked and
//! reserved from the node's memory budget before the body is buffered),
//! handled concurrently up to `kafka.max_in_flight`, and answered strictly in
//! the order they came, as the protocol requires.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_devices::auth::{Credentials, Identity};
use tributary_frontend::budget::Reserved;
use tributary_frontend::tls::MaybeTls;
use tributary_frontend::Peer;
use tributary_ingest as ingest;

use crate::{handlers, Refusal, Server};

/// How long a request waits for room in the node's memory budget.
const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// What every request of a connection needs.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) server: Arc<Server>,
    /// Who is connected (anonymous, the device a client certificate names,
    /// or the one SASL PLAIN logged in); `None` until SASL succeeds when the
    /// node requires credentials.
    pub(crate) who: Mutex<Option<Identity>>,
    /// SASL: PLAIN was chosen with SaslHandshake.
    pub(crate) plain: AtomicBool,
    /// SASL: a v0 handshake chose PLAIN, so the next frame is the bare
    /// PLAIN token, not a Kafka request.
    pub(crate) bare_token: AtomicBool,
    /// SASL failed: the connection closes once its answer is sent.
    pub(crate) closing: AtomicBool,
    /// The address the client reached us at: what Metadata advertises.
    pub(crate) local: Option<SocketAddr>,
    /// The client reached a TLS listener (Metadata names TLS ports).
    pub(crate) tls: bool,
    /// The client's address (DescribeGroups names it).
    pub(crate) peer: Option<SocketAddr>,
}

/// Serves one connection until the client leaves, a request is refused, or
/// the node shuts down.
pub(crate) async fn run(server: Arc<Server>, stream: MaybeTls, peer: Peer) {
    let local = match &stream {
        MaybeTls::Left(s) => s.local_addr().ok(),
        MaybeTls::Right(s) => s.get_ref().0.local_addr().ok(),
    };
    let creds = Credentials {
        protocol: "kafka",
        peer: peer.addr,
        certificate: peer.certificate.as_deref(),
        ..Credentials::default()
    };
    // Anonymous access or a verified client certificate logs in now; else
    // the client must log in with SASL PLAIN before anything but
    // ApiVersions and SASL (no login delay here: nothing was guessed).
    let who = server.cx.auth.authenticate(&creds).ok();
    let session = Arc::new(Session {
        server: server.clone(),
        who: Mutex::new(who),
        plain: AtomicBool::new(false),
        bare_token: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        local,
        tls: matches!(stream, MaybeTls::Right(_)),
        peer: peer.addr,
    });
    let (mut rd, mut wr) = tokio::io::split(stream);
    let shutdown = server.cx.shutdown.clone();
    let max_in_flight = server.config.max_in_flight.max(1);
    let mut buf = BytesMut::with_capacity(4096);
    let mut held = Reserved::none();
    let mut pending = FuturesOrdered::new();
    let mut last_produce = None;
    let mut alone = false;
    let mut reading = true;
    loop {
        // Whole requests already read go to the queue first. A SASL request
        // is handled alone: nothing after it starts before its answer, so
        // requests that follow a login run as the one logged in.
        while reading && pending.len() < max_in_flight && !alone {
            match next_request(&mut buf, &mut held, &server).await {
                Ok(Some((frame, reserved))) => {
                    alone = is_sasl(&frame) || session.bare_token.load(Relaxed);
                    // A produce takes its turn now, as it is read: its records
                    // are queued after the ones of produces read before it.
                    let turn = if frame.starts_with(&[0, 0]) {
                        ingest::Turn::next(&mut last_produce)
                    } else {
                        ingest::Turn::default()
                    };
                    pending.push_back(handlers::handle(session.clone(), frame, reserved, turn));
                }
                Ok(None) => break,
                Err(why) => {
                    server.metrics.refuse(why);
                    return;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            read = rd.read_buf(&mut buf), if reading && pending.len() < max_in_flight && !alone => {
                match read {
                    Ok(0) | Err(_) => reading = false,
                    Ok(_) => {}
                }
            }
            answer = pending.next(), if !pending.is_empty() => {
                match answer {
                    Some(Ok(Some(bytes))) => {
                        if wr.write_all(&bytes).await.is_err()
                            || session.closing.load(Relaxed)
                        {
                            return;
                        }
                    }
                    Some(Ok(None)) | None => {}
                    Some(Err(why)) => {
                        if why != Refusal::Counted {
                            server.metrics.refuse(why);
                        }
                        return;
                    }
                }
            }
            else => return,
        }
        if pending.is_empty() {
            alone = false;
        }
    }
}

/// SaslHandshake (17) or SaslAuthenticate (36).
fn is_sasl(frame: &[u8]) -> bool {
    frame.starts_with(&[0, 17]) || frame.starts_with(&[0, 36])
}

impl Session {
    /// Who is logged in; checked by [`crate::handlers::handle`] before any
    /// request but ApiVersions and SASL, so `None` does not reach here but
    /// would authorize nothing.
    pub(crate) fn who(&self) -> Identity {
        self.who
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| Identity {
                id: String::new(),
                credential: 0,
            })
    }

    /// Whether someone is logged in.
    pub(crate) fn logged_in(&self) -> bool {
        self.who
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

/// The next whole request in `buf` (without its size prefix) and the budget
/// it holds; `None` when more bytes are needed. Room for the rest of a
/// request is reserved (budget and buffer) once its prefix has been checked.
async fn next_request(
    buf: &mut BytesMut,
    held: &mut Reserved,
    server: &Server,
) -> Result<Option<(Bytes, Reserved)>, Refusal> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let size = usize::try_from(size).map_err(|_| Refusal::RequestTooSmall)?;
    if size > server.config.max_request_bytes {
        return Err(Refusal::RequestTooLarge);
    }
    // api key, api version, correlation id: 8 bytes before anything else.
    if size < 8 {
        return Err(Refusal::RequestTooSmall);
    }
    if held.bytes() < size {
        *held = server
            .cx
            .budget
            .reserve(size, BUDGET_WAIT)
            .await
            .ok_or(Refusal::MemoryBudget)?;
    }
    if buf.len() < 4 + size {
        buf.reserve(4 + size - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(size).freeze();
    Ok(Some((frame, std::mem::replace(held, Reserved::none()))))
}
