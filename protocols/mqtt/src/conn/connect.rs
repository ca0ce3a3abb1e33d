//! The start of a connection: reading CONNECT (under the node's memory
//! budget), login and the will's rights, taking over or resuming the client
//! id's session, and CONNACK.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::budgeted_len;
use crate::codec::{self, reason, ConnAckProps, ConnectIn, In, Out, Version};
use crate::session::{self, Session};
use crate::Error;
use crate::Refusal;
use crate::{topic, wills, Server, Slot};
use tributary_devices::auth::{self, Action, Credentials, Identity};
use tributary_frontend::budget::{MemoryBudget, Reserved, WAIT_FOR_ROOM};
use tributary_frontend::Peer;

pub(super) enum ConnectFailure {
    Io,
    /// CONNACK with this code in this version's form, then close.
    Refuse(u8, Refusal, Version),
    /// Close without a word (not MQTT at all).
    Drop(Refusal),
}

pub(super) async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
    budget: &MemoryBudget,
) -> Result<ConnectIn, ConnectFailure> {
    // A large CONNECT (a will with a big payload) holds node budget while it
    // arrives, like any other large packet.
    let mut held = Reserved::none();
    loop {
        match codec::sniff_version(buf, max) {
            Ok(Some(v)) => match codec::decode(buf, v, max) {
                Ok(Some(In::Connect(c))) => return Ok(*c),
                Ok(Some(_)) => return Err(ConnectFailure::Drop(Refusal::NotConnect)),
                Ok(None) => {}
                Err(Error::TooLarge { .. }) => {
                    return Err(ConnectFailure::Drop(Refusal::PacketTooLarge))
                }
                // A v5 CONNECT that repeats a property: CONNACK 0x82.
                Err(e @ Error::Protocol { .. }) => {
                    return Err(ConnectFailure::Refuse(
                        reason::PROTOCOL_ERROR,
                        Refusal::of_decode(&e),
                        v,
                    ))
                }
                Err(_) => return Err(ConnectFailure::Drop(Refusal::MalformedConnect)),
            },
            Ok(None) => {}
            Err(Error::UnsupportedVersion(_)) => {
                // A CONNACK a 3.1/3.1.1 client understands.
                return Err(ConnectFailure::Refuse(
                    reason::UNSUPPORTED_PROTOCOL_VERSION,
                    Refusal::UnsupportedProtocolVersion,
                    Version::V4,
                ));
            }
            Err(Error::TooLarge { .. }) => {
                return Err(ConnectFailure::Drop(Refusal::PacketTooLarge))
            }
            Err(Error::NotMqtt(_)) => return Err(ConnectFailure::Drop(Refusal::NotMqtt)),
            // Malformed or a protocol error (sniffing returns no other).
            Err(_) => return Err(ConnectFailure::Drop(Refusal::MalformedConnect)),
        }
        if let Some(size) = budgeted_len(buf) {
            if held.bytes() < size {
                held = budget
                    .reserve(size, WAIT_FOR_ROOM)
                    .await
                    .ok_or(ConnectFailure::Drop(Refusal::MemoryBudget))?;
            }
        }
        buf.reserve(4096);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ConnectFailure::Io),
            Ok(_) => {}
        }
    }
}

pub(super) type Accepted = (
    String,
    Identity,
    Session,
    bool,
    CancellationToken,
    watch::Sender<bool>,
);

/// Checks a CONNECT, takes over or resumes the session, and writes CONNACK
/// into `out`. `None`: refused (the CONNACK says why).
pub(super) async fn accept(
    broker: &Arc<Server>,
    conn_id: u64,
    c: &ConnectIn,
    peer: &Peer,
    out: &mut BytesMut,
) -> Option<Accepted> {
    let refuse = |code: u8, why: Refusal, out: &mut BytesMut| {
        broker.metrics.refuse(why);
        codec::encode(
            Out::ConnAck {
                session_present: false,
                code,
                props: Box::new(ConnAckProps {
                    reason_string: Some(why.label().replace('_', " ")),
                    ..ConnAckProps::default()
                }),
            },
            c.version,
            out,
        );
    };
    if c.auth_method.is_some() {
        refuse(
            reason::BAD_AUTH_METHOD,
            Refusal::EnhancedAuthUnsupported,
            out,
        );
        return None;
    }
    if c.receive_max == 0 || c.max_packet_size == Some(0) {
        // MQTT-3.1.2.11: zero is a protocol error for both.
        refuse(reason::PROTOCOL_ERROR, Refusal::ProtocolError, out);
        return None;
    }

    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        if c.version == Version::V4 && !c.clean {
            // MQTT-3.1.3-8: an empty id needs clean session in 3.1.1.
            refuse(reason::CLIENT_ID_NOT_VALID, Refusal::ClientIdInvalid, out);
            return None;
        }
        let id = format!("tributary-{:016x}", fastrand::u64(..));
        assigned = Some(id.clone());
        id
    } else {
        c.client_id.clone()
    };
    if client_id.len() > 200 || client_id.contains('\0') {
        refuse(reason::CLIENT_ID_NOT_VALID, Refusal::ClientIdInvalid, out);
        return None;
    }
    if let Some(w) = &c.will {
        if !topic::valid_name(&w.topic) || w.qos > 2 {
            refuse(reason::PROTOCOL_ERROR, Refusal::WillInvalid, out);
            return None;
        }
    }
    let creds = Credentials {
        protocol: "mqtt",
        username: c.username.as_deref(),
        password: c.password.as_deref(),
        client_id: Some(&client_id),
        peer: peer.addr,
        certificate: peer.certificate.as_deref(),
    };
    let identity = match auth::login(&*broker.cx.auth, &creds).await {
        Ok(i) => i,
        Err(auth::Refusal::BadCredentials) => {
            refuse(
                reason::BAD_USERNAME_OR_PASSWORD,
                Refusal::BadCredentials,
                out,
            );
            return None;
        }
        Err(auth::Refusal::NotAuthorized) => {
            refuse(reason::NOT_AUTHORIZED, Refusal::NotAuthorized, out);
            return None;
        }
    };
    if let Some(w) = &c.will {
        if !broker
            .cx
            .auth
            .authorize(&identity, Action::Publish, &w.topic)
            .allowed()
        {
            refuse(reason::NOT_AUTHORIZED, Refusal::NotAuthorized, out);
            return None;
        }
    }
    // A session belongs to a device: another device using the same client id
    // gets a session of its own, and can neither take this one over nor kick
    // its connection. (Device ids hold no `:`.)
    let client_id = if identity.id == auth::ANONYMOUS {
        client_id
    } else {
        format!("{}:{client_id}", identity.id)
    };
    let expiry = c.session_expiry.min(broker.config.max_session_expiry_secs);

    // Take the session over from a live connection: kick it, wait until it has
    // put the session back (bounded), then claim the slot.
    // Loop: another connection with this id may have claimed it meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let previous = {
            let slots = broker.sessions.lock();
            slots
                .get(&client_id)
                .filter(|s| s.owner.is_some())
                .map(|s| (s.kick.clone(), s.released.clone()))
        };
        let Some((kick, mut released)) = previous else {
            break;
        };
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        kick.cancel();
        let _ = tokio::time::timeout_at(deadline, released.wait_for(|r| *r)).await;
    }
    // On a cluster the session may have been held on another node: claim
    // it (that connection's writes are refused from now on) and read what
    // it stored.
    // (A clean start of a session that ends with its connection, with
    // nothing stored to remove, has nothing to claim.)
    let stored_here = || {
        broker
            .cx
            .log
            .meta_get(session::SESSIONS, client_id.as_bytes())
            .map_or(true, |v| v.is_some())
    };
    let taken = if broker.cx.log.is_replicated() && (!c.clean || expiry > 0 || stored_here()) {
        match session::take_over(&broker.cx.log, &client_id, conn_id).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(%client_id, error = %e, "cannot claim an MQTT session");
                refuse(reason::SERVER_UNAVAILABLE, Refusal::LogUnwritable, out);
                return None;
            }
        }
    } else {
        None
    };
    let kick = CancellationToken::new();
    let (released_tx, released_rx) = watch::channel(false);
    let had_will;
    let (session, present, stale) = {
        let mut slots = broker.sessions.lock();
        if !slots.contains_key(&client_id) && slots.len() >= broker.config.max_sessions {
            drop(slots);
            refuse(reason::QUOTA_EXCEEDED, Refusal::TooManySessions, out);
            return None;
        }
        let old = slots.insert(
            client_id.clone(),
            Slot {
                owner: Some(conn_id),
                kick: kick.clone(),
                released: released_rx,
                parked: None,
                expires: None,
                will: None,
            },
        );
        // A pending delayed will is dropped: the client is back (MQTT-3.1.3-9).
        had_will = old.as_ref().is_some_and(|o| o.will.is_some());
        let parked = old.and_then(|o| {
            if let Some(k) = o.owner {
                tracing::warn!(%client_id, previous = k, "the previous connection did not release its session in time");
                o.kick.cancel();
            }
            o.parked
        });
        // On a cluster the stored session is the one: a copy parked here
        // may be older than what a connection to another node stored.
        let parked = match &taken {
            Some((_, stored)) => stored.clone(),
            None => parked,
        };
        match parked {
            Some(mut s) if !c.clean => {
                s.expiry = expiry;
                // The device's rights may have narrowed while it was away.
                s.subs.retain(|sub| {
                    broker
                        .cx
                        .auth
                        .authorize(&identity, Action::Subscribe, &sub.filter)
                        .allowed()
                });
                (s, true, false)
            }
            Some(s) => {
                broker
                    .shared
                    .release_all(&client_id, s.subs.iter().map(|s| s.filter.as_str()));
                (Session::new(expiry), false, s.stored)
            }
            None => (Session::new(expiry), false, false),
        }
    };
    let mut session = session;
    if stale {
        session.stored = true;
    }
    if let Some((guard, _)) = taken {
        session.guard = Some(guard);
    }
    if session.expiry > 0 || stale {
        if let Err(e) = session::persist(&broker.cx.log, &client_id, &mut session).await {
            tracing::warn!(%client_id, error = %e, "cannot store an MQTT session");
            broker.sessions.lock().remove(&client_id);
            refuse(reason::SERVER_UNAVAILABLE, Refusal::LogUnwritable, out);
            return None;
        }
    }
    // Its stored copy too, wherever it was left: on a cluster the client
    // may have left it on another node, which then finds it gone.
    if had_will || broker.cx.log.is_replicated() {
        if let Err(e) = wills::cancel(&broker.cx.log, &client_id).await {
            tracing::warn!(%client_id, error = %e, "cannot remove the stored will of a client that is back");
        }
    }
    let granted_expiry = (c.version == Version::V5 && expiry != c.session_expiry).then_some(expiry);
    let keep_alive = granted_keep_alive(broker, c);
    // Request/response: a topic base of this client's own, when asked for.
    let response_information = (c.version == Version::V5 && c.request_response_info).then(|| {
        let id = assigned.as_deref().unwrap_or(&c.client_id);
        format!("response/{id}")
    });
    codec::encode(
        Out::ConnAck {
            session_present: present,
            code: reason::SUCCESS,
            props: Box::new(ConnAckProps {
                assigned_client_id: assigned,
                receive_max: broker.config.max_inflight,
                max_packet_size: broker.config.max_packet_bytes as u32,
                topic_alias_max: broker.config.topic_alias_max,
                session_expiry: granted_expiry,
                server_keep_alive: (keep_alive != c.keep_alive).then_some(keep_alive),
                response_information,
                reason_string: None,
            }),
        },
        c.version,
        out,
    );
    Some((client_id, identity, session, present, kick, released_tx))
}

/// The keep-alive a connection gets: the client's, unless the node's
/// `max_keep_alive_secs` is lower (or the client asked for none).
pub(super) fn granted_keep_alive(broker: &Server, c: &ConnectIn) -> u16 {
    match broker.config.max_keep_alive_secs {
        0 => c.keep_alive,
        max if c.keep_alive == 0 => max,
        max => c.keep_alive.min(max),
    }
}
