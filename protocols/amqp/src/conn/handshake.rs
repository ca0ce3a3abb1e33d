//! The AMQP handshake, before a [`Connection`](super::Connection) exists: the
//! protocol header, connection.start/start-ok with the credentials of PLAIN,
//! AMQPLAIN or EXTERNAL, tune/tune-ok and open/open-ok. Also the frame
//! reading and connection.close helpers used outside the main loop (a failed
//! handshake, and the wait for close-ok at the end).

use std::time::Duration;

use amq_protocol::frame::{AMQPFrame, ProtocolVersion};
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{method_name, End};
use crate::frame::{self, code, short};
use crate::Error;
use crate::Refusal;
use crate::Server;
use tributary_devices::auth::{self, Credentials, Identity};
use tributary_frontend::Peer;

/// Frames are at most this big before tune-ok (the specification's
/// FRAME_MIN_SIZE, which every client stays within until tune).
pub(super) const HANDSHAKE_FRAME_MAX: usize = 4096;

/// What the handshake settled.
pub(super) struct Accepted {
    pub(super) identity: Identity,
    pub(super) frame_max: usize,
    pub(super) channel_max: u16,
    pub(super) heartbeat: Option<Duration>,
    pub(super) blocked_capable: bool,
}

pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    frame_max: usize,
) -> Result<AMQPFrame, End> {
    loop {
        if let Some(f) = frame::next_frame(buf, frame_max)? {
            return Ok(f);
        }
        buf.reserve(4096);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(End::Lost),
            Ok(_) => {}
        }
    }
}

pub(super) async fn drain_until_close_ok<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    frame_max: usize,
) {
    loop {
        match read_frame(reader, buf, frame_max).await {
            Ok(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))))
            | Ok(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))))
            | Err(_) => return,
            Ok(_) => {}
        }
    }
}

pub(super) fn close_frame(out: &mut Vec<u8>, code: u16, text: &str, class: u16, method: u16) {
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: code,
            reply_text: short(text),
            class_id: class,
            method_id: method,
        })),
        out,
    );
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "authentication_failure_close",
        "connection.blocked",
    ] {
        caps.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("product".into(), AMQPValue::LongString("Tributary".into()));
    props.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    props.insert("platform".into(), AMQPValue::LongString("Rust".into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}

/// Checks the protocol header, then start/start-ok, tune/tune-ok and open.
pub(super) async fn handshake<R, W>(
    server: &Server,
    reader: &mut R,
    writer: &mut W,
    buf: &mut BytesMut,
    peer: &Peer,
) -> Result<Accepted, End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while buf.len() < 8 {
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(End::Lost),
            Ok(_) => {}
        }
    }
    if buf[..8] != *b"AMQP\x00\x00\x09\x01" {
        // The specification's answer to a header we do not speak: ours, then close.
        server.metrics.refuse(Refusal::BadProtocolHeader);
        let mut out = Vec::new();
        frame::encode(
            &AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
            &mut out,
        );
        let _ = writer.write_all(&out).await;
        return Err(End::Lost);
    }
    let _ = buf.split_to(8);
    let config = &server.config;
    let mut out = Vec::new();
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            // EXTERNAL (the client certificate names the device) only where
            // TLS verified one.
            mechanisms: if peer.certificate.is_some() {
                "EXTERNAL PLAIN AMQPLAIN".into()
            } else {
                "PLAIN AMQPLAIN".into()
            },
            locales: "en_US".into(),
        })),
        &mut out,
    );
    writer.write_all(&out).await.map_err(|_| End::Lost)?;

    let start_ok = match read_frame(reader, buf, HANDSHAKE_FRAME_MAX).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(s))) => s,
        other => {
            server.metrics.refuse(Refusal::HandshakeOutOfOrder);
            return Err(unexpected_in_handshake(&other, "connection.start-ok"));
        }
    };
    let mechanism = start_ok.mechanism.as_str();
    if mechanism == "EXTERNAL" && peer.certificate.is_none() {
        server.metrics.refuse(Refusal::BadAuthMechanism);
        let why = "ACCESS_REFUSED - EXTERNAL needs a verified client certificate (AMQPS with mTLS)";
        return Err(End::Server(code::ACCESS_REFUSED, why.to_owned(), 10, 11));
    }
    let (user, pass) = match credentials(mechanism, start_ok.response.as_bytes()) {
        Ok(c) => c,
        Err(why) => {
            server.metrics.refuse(Refusal::BadAuthMechanism);
            return Err(End::Server(code::ACCESS_REFUSED, why.to_string(), 10, 11));
        }
    };
    let creds = Credentials {
        protocol: "amqp",
        username: Some(&user),
        password: Some(&pass),
        client_id: None,
        peer: peer.addr,
        certificate: peer.certificate.as_deref(),
    };
    let identity = match auth::login(&*server.cx.auth, &creds).await {
        Ok(id) => id,
        Err(refusal) => {
            server.metrics.refuse(Refusal::BadCredentials);
            let why = match refusal {
                auth::Refusal::BadCredentials => {
                    "ACCESS_REFUSED - login refused: bad user name or password"
                }
                auth::Refusal::NotAuthorized => "ACCESS_REFUSED - login refused: not authorized",
            };
            return Err(End::Server(code::ACCESS_REFUSED, why.to_owned(), 10, 11));
        }
    };
    let blocked_capable = match start_ok.client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => matches!(
            caps.inner().get("connection.blocked"),
            Some(AMQPValue::Boolean(true))
        ),
        _ => false,
    };

    out.clear();
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: config.max_channels,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat_secs,
        })),
        &mut out,
    );
    writer.write_all(&out).await.map_err(|_| End::Lost)?;
    let tune_ok = match read_frame(reader, buf, HANDSHAKE_FRAME_MAX).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => t,
        other => {
            server.metrics.refuse(Refusal::HandshakeOutOfOrder);
            return Err(unexpected_in_handshake(&other, "connection.tune-ok"));
        }
    };
    if tune_ok.frame_max != 0 && tune_ok.frame_max < 4096 {
        server.metrics.refuse(Refusal::FrameMaxTooSmall);
        return Err(End::Server(
            530,
            format!(
                "frame_max {} is below the minimum of 4096",
                tune_ok.frame_max
            ),
            10,
            31,
        ));
    }
    let frame_max = match tune_ok.frame_max {
        0 => config.frame_max,
        f => f.min(config.frame_max),
    } as usize;
    let channel_max = match tune_ok.channel_max {
        0 => config.max_channels,
        c => c.min(config.max_channels),
    };
    let heartbeat =
        (tune_ok.heartbeat > 0).then(|| Duration::from_secs(u64::from(tune_ok.heartbeat)));

    match read_frame(reader, buf, frame_max).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(_))) => {}
        other => {
            server.metrics.refuse(Refusal::HandshakeOutOfOrder);
            return Err(unexpected_in_handshake(&other, "connection.open"));
        }
    }
    out.clear();
    frame::method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        &mut out,
    );
    writer.write_all(&out).await.map_err(|_| End::Lost)?;
    Ok(Accepted {
        identity,
        frame_max,
        channel_max,
        heartbeat,
        blocked_capable,
    })
}

fn unexpected_in_handshake(f: &AMQPFrame, wanted: &str) -> End {
    match f {
        // A client that gives up answers close: nothing more to say.
        AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => End::Lost,
        AMQPFrame::Method(_, m) => End::for_method(
            code::COMMAND_INVALID,
            format!("expected {wanted}, got {}", method_name(m)),
            m,
        ),
        _ => End::server(code::UNEXPECTED_FRAME, format!("expected {wanted}")),
    }
}

/// User and password from a PLAIN or AMQPLAIN response; an [`Error::Auth`]
/// holds the connection.close text.
fn credentials(mechanism: &str, response: &[u8]) -> Result<(String, String), Error> {
    match mechanism {
        "PLAIN" => {
            // [authzid] NUL authcid NUL passwd (RFC 4616).
            let mut parts = response.split(|b| *b == 0);
            let (Some(_), Some(user), Some(pass), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(Error::Auth(
                    "ACCESS_REFUSED - malformed PLAIN response".to_owned(),
                ));
            };
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(pass).into_owned(),
            ))
        }
        "AMQPLAIN" => {
            // A field table without its length prefix: LOGIN and PASSWORD.
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let malformed =
                || Error::Auth("ACCESS_REFUSED - malformed AMQPLAIN response".to_owned());
            if !frame::nesting_ok(&framed, 0) {
                return Err(malformed());
            }
            let table = amq_protocol::types::parsing::parse_field_table(&framed[..])
                .map(|(_, t)| t)
                .map_err(|_| malformed())?;
            let field = |name: &str| match table.inner().get(name) {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
                _ => String::new(),
            };
            Ok((field("LOGIN"), field("PASSWORD")))
        }
        // The certificate speaks for the client; a response, if any, is the
        // identity it asks for (it must be the certificate's).
        "EXTERNAL" => Ok((String::from_utf8_lossy(response).into_owned(), String::new())),
        other => Err(Error::Auth(format!(
            "ACCESS_REFUSED - mechanism {} is not offered (PLAIN, AMQPLAIN; EXTERNAL with a client certificate)",
            short(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain_credentials() {
        assert_eq!(
            credentials("PLAIN", b"\0guest\0secret").expect("PLAIN"),
            ("guest".into(), "secret".into())
        );
        assert_eq!(
            credentials("PLAIN", b"admin\0dev-1\0tok").expect("PLAIN"),
            ("dev-1".into(), "tok".into())
        );
        assert!(credentials("PLAIN", b"guest").is_err());
        assert!(credentials("PLAIN", b"\0a\0b\0c").is_err());
        // LOGIN "u" (long string), PASSWORD "p".
        let mut t = Vec::new();
        for (k, v) in [("LOGIN", "u"), ("PASSWORD", "p")] {
            t.push(k.len() as u8);
            t.extend_from_slice(k.as_bytes());
            t.push(b'S');
            t.extend_from_slice(&(v.len() as u32).to_be_bytes());
            t.extend_from_slice(v.as_bytes());
        }
        assert_eq!(
            credentials("AMQPLAIN", &t).expect("AMQPLAIN"),
            ("u".into(), "p".into())
        );
        assert!(credentials("AMQPLAIN", b"\x05LOG").is_err());
        // EXTERNAL parses (the handshake refuses it without a certificate).
        assert_eq!(
            credentials("EXTERNAL", b"").expect("EXTERNAL"),
            (String::new(), String::new())
        );
        let Err(e) = credentials("CRAM-MD5", b"x") else {
            panic!("CRAM-MD5 is not offered")
        };
        assert_eq!(
            e.reply(),
            (
                code::ACCESS_REFUSED,
                "ACCESS_REFUSED - mechanism CRAM-MD5 is not offered (PLAIN, AMQPLAIN; EXTERNAL with a client certificate)".to_owned()
            )
        );
    }
}
