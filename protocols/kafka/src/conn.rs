//! One Kafka connection: requests are read by their size prefix (checked and
//! reserved from the node's memory budget before the body is buffered),
//! handled concurrently up to `kafka.max_in_flight`, and answered strictly in
//! the order they came, as the protocol requires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_devices::auth::{self, Credentials, Identity};
use tributary_frontend::budget::Reserved;
use tributary_frontend::tls::MaybeTls;
use tributary_frontend::Peer;

use crate::{handlers, Refusal, Server};

/// How long a request waits for room in the node's memory budget.
const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// What every request of a connection needs.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) server: Arc<Server>,
    /// Who is connected (anonymous, or the device a client certificate names).
    pub(crate) who: Identity,
    /// The address the client reached us at: what Metadata advertises.
    pub(crate) local: Option<SocketAddr>,
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
    // SASL is not served yet: a node that requires credentials admits only
    // clients a verified certificate names.
    let who = match auth::login(&*server.cx.auth, &creds).await {
        Ok(who) => who,
        Err(_) => {
            server.metrics.refuse(Refusal::NotAuthorized);
            return;
        }
    };
    let session = Arc::new(Session {
        server: server.clone(),
        who,
        local,
    });
    let (mut rd, mut wr) = tokio::io::split(stream);
    let shutdown = server.cx.shutdown.clone();
    let max_in_flight = server.config.max_in_flight.max(1);
    let mut buf = BytesMut::with_capacity(4096);
    let mut held = Reserved::none();
    let mut pending = FuturesOrdered::new();
    let mut reading = true;
    loop {
        // Whole requests already read go to the queue first.
        while reading && pending.len() < max_in_flight {
            match next_request(&mut buf, &mut held, &server).await {
                Ok(Some((frame, reserved))) => {
                    pending.push_back(handlers::handle(session.clone(), frame, reserved));
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
            read = rd.read_buf(&mut buf), if reading && pending.len() < max_in_flight => {
                match read {
                    Ok(0) | Err(_) => reading = false,
                    Ok(_) => {}
                }
            }
            answer = pending.next(), if !pending.is_empty() => {
                match answer {
                    Some(Ok(Some(bytes))) => {
                        if wr.write_all(&bytes).await.is_err() {
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
