//! MQTT 3.1.1 and 5 packets as the session layer sees them, over rumqttc's
//! `mqttbytes` codecs.
//!
//! Why rumqttc's `mqttbytes` and not `rumqttd::protocol`: both come from the
//! same project and parse the same bytes, but rumqttd's `Publish` keeps `qos`,
//! `pkid` and `dup` crate-private, while every `mqttbytes` field is public; and
//! rumqttc is already the client our tests and `tributary bench mqtt` use, so
//! one crate serves both ends instead of two.
//!
//! The session layer works on [`In`] and [`Out`] only; the version decides the
//! wire form here and nowhere else.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

/// Protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// MQTT 5 reason codes the server sends (3.1.1 maps or closes).
pub mod reason {
    /// Success / granted QoS 0 / normal disconnection.
    pub const SUCCESS: u8 = 0x00;
    /// SUBACK: granted QoS 1.
    pub const GRANTED_QOS1: u8 = 0x01;
    /// Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Implementation-specific error (the log refused a write).
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    /// CONNACK: unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    /// CONNACK: client identifier not valid.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// CONNACK: bad user name or password.
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// CONNACK: bad authentication method.
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    /// Keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Packet identifier in use.
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    /// Packet identifier not found.
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// Shared subscriptions not supported.
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
}

/// Message properties (MQTT 5; empty for 3.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsgProps {
    /// 1 when the payload is UTF-8.
    pub payload_format: Option<u8>,
    /// Seconds the message stays valid.
    pub expiry: Option<u32>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Request/response: where to answer.
    pub response_topic: Option<String>,
    /// Request/response: correlation data.
    pub correlation: Option<Bytes>,
    /// User properties, in order.
    pub user: Vec<(String, String)>,
}

/// A will message from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS (0..=2).
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// v5 will delay, seconds.
    pub delay: u32,
    /// v5 properties.
    pub props: MsgProps,
}

/// CONNECT, whatever the version.
#[derive(Debug, Clone)]
pub struct ConnectIn {
    /// Version the client speaks.
    pub version: Version,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// 3.1.1 clean session / v5 clean start.
    pub clean: bool,
    /// Keep alive in seconds (0 = none).
    pub keep_alive: u16,
    /// Will message.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// v5 session expiry interval (3.1.1: 0 when clean, forever otherwise).
    pub session_expiry: u32,
    /// v5 receive maximum (3.1.1: 65535).
    pub receive_max: u16,
    /// v5 largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// v5 enhanced authentication method (unsupported).
    pub auth_method: Option<String>,
}

/// PUBLISH from a client.
#[derive(Debug, Clone)]
pub struct PublishIn {
    /// Topic name (empty when a v5 topic alias stands for it).
    pub topic: String,
    /// QoS 0..=2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Packet identifier (QoS > 0).
    pub pkid: u16,
    /// Payload.
    pub payload: Bytes,
    /// v5 topic alias.
    pub alias: Option<u16>,
    /// v5 properties.
    pub props: MsgProps,
}

/// One SUBSCRIBE filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubFilter {
    /// The filter.
    pub path: String,
    /// Requested QoS.
    pub qos: u8,
    /// v5 no local.
    pub no_local: bool,
    /// v5 retain as published.
    pub retain_as_published: bool,
    /// v5 retain handling: 0 send, 1 send if new, 2 don't send.
    pub retain_handling: u8,
}

/// A packet from a client.
#[derive(Debug, Clone)]
pub enum In {
    /// CONNECT.
    Connect(Box<ConnectIn>),
    /// PUBLISH.
    Publish(PublishIn),
    /// PUBACK.
    PubAck(u16),
    /// PUBREC (we never send QoS 2, so this is a protocol error).
    PubRec(u16),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP (never expected).
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<SubFilter>,
        /// v5 subscription identifier.
        id: Option<usize>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect {
        /// v5 reason (0 normal, 4 with will).
        reason: u8,
        /// v5 new session expiry.
        session_expiry: Option<u32>,
    },
    /// A packet only servers send, or AUTH.
    Unexpected(&'static str),
}

/// CONNACK properties we send (v5).
#[derive(Debug, Clone, Default)]
pub struct ConnAckProps {
    /// Identifier we assigned.
    pub assigned_client_id: Option<String>,
    /// Our receive maximum.
    pub receive_max: u16,
    /// Largest packet we accept.
    pub max_packet_size: u32,
    /// Topic aliases we accept.
    pub topic_alias_max: u16,
    /// Session expiry we grant when it differs from the request.
    pub session_expiry: Option<u32>,
    /// Keep alive we impose when it differs from the request.
    pub server_keep_alive: Option<u16>,
    /// Why, for refusals.
    pub reason_string: Option<String>,
}

/// PUBLISH to a client.
#[derive(Debug, Clone)]
pub struct PublishOut {
    /// Topic.
    pub topic: String,
    /// QoS 0 or 1.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Redelivery.
    pub dup: bool,
    /// Packet id (QoS 1).
    pub pkid: u16,
    /// Payload.
    pub payload: Bytes,
    /// v5 properties.
    pub props: MsgProps,
    /// v5 subscription identifiers.
    pub sub_ids: Vec<usize>,
}

/// A packet to a client.
#[derive(Debug, Clone)]
pub enum Out {
    /// CONNACK with a v5 reason code (mapped for 3.1.1).
    ConnAck {
        /// Session present flag.
        session_present: bool,
        /// v5 reason code.
        code: u8,
        /// v5 properties.
        props: Box<ConnAckProps>,
    },
    /// PUBLISH.
    Publish(Box<PublishOut>),
    /// PUBACK.
    PubAck(u16, u8),
    /// PUBREC.
    PubRec(u16, u8),
    /// PUBCOMP.
    PubComp(u16, u8),
    /// SUBACK with v5 reason codes (granted QoS or ≥ 0x80).
    SubAck(u16, Vec<u8>),
    /// UNSUBACK with v5 reason codes.
    UnsubAck(u16, Vec<u8>),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (v5 only; 3.1.1 just closes).
    Disconnect(u8),
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The first packet is CONNECT for a protocol level we do not speak.
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    /// The first packet is not CONNECT, or names another protocol.
    #[error("{0}")]
    NotMqtt(String),
    /// The declared length exceeds the limit.
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Declared size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Anything else the codec refuses.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// Well formed, but a protocol error (v5 reason 0x82): a property the
    /// spec allows once given twice, a packet type only servers send.
    #[error("protocol error: {detail}")]
    Protocol {
        /// A short reason for metrics.
        why: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// Looks at a buffer that should start with CONNECT: `Ok(None)` wants more
/// bytes; otherwise the protocol version to decode it with.
pub fn sniff_version(buf: &[u8], max: usize) -> Result<Option<Version>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(DecodeError::NotMqtt(format!(
            "the first packet must be CONNECT, got type {}",
            first >> 4
        )));
    }
    let Some((remaining, header_len)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    if 1 + header_len + remaining > max {
        return Err(DecodeError::TooLarge {
            size: 1 + header_len + remaining,
            max,
        });
    }
    let body = &buf[1 + header_len..];
    if body.len() < 2 {
        return Ok(None);
    }
    let name_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    if body.len() < 2 + name_len + 1 {
        return if remaining < 2 + name_len + 1 {
            Err(DecodeError::Malformed("CONNECT is truncated".into()))
        } else {
            Ok(None)
        };
    }
    let name = &body[2..2 + name_len];
    let level = body[2 + name_len];
    if let Some(flags) = body.get(2 + name_len + 1) {
        // MQTT-3.1.2-3: the reserved flag is 0.
        if flags & 1 != 0 && name == b"MQTT" {
            return Err(DecodeError::Malformed("reserved CONNECT flag set".into()));
        }
    }
    match (name, level) {
        (b"MQTT", 4) => Ok(Some(Version::V4)),
        (b"MQTT", 5) => Ok(Some(Version::V5)),
        (b"MQTT", l) | (b"MQIsdp", l) => Err(DecodeError::UnsupportedVersion(l)),
        (other, _) => Err(DecodeError::NotMqtt(format!(
            "protocol name {:?} is not MQTT",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// Variable-length remaining length: (value, bytes used), `None` if incomplete.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, b) in buf.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        return Err(DecodeError::Malformed(
            "remaining length over 4 bytes".into(),
        ));
    }
    Ok(None)
}

/// The whole size of the packet that starts `buf`, once its fixed header is
/// there (`None` before; also for a malformed length, which decode reports).
pub fn pending_len(buf: &[u8]) -> Option<usize> {
    let (remaining, header_len) = remaining_length(buf.get(1..)?).ok()??;
    Some(1 + header_len + remaining)
}

/// Decodes the next packet from `buf`: `Ok(None)` when more bytes are needed.
/// The declared size is checked against `max` before anything is buffered.
///
/// The first byte is judged as soon as it arrives: a reserved packet type
/// (0; 15 in 3.1.1), flags the type forbids, or a type only servers send is
/// refused before its body is waited for, whatever length it announces.
/// v5 property blocks are scanned before decoding ([`repeated_property`]).
pub fn decode(buf: &mut BytesMut, version: Version, max: usize) -> Result<Option<In>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = first >> 4;
    let flags = first & 0x0F;
    // Fixed-header flags the codecs do not check (MQTT-2.2.2-1/2).
    let flags_ok = match kind {
        3 => (flags >> 1) & 0b11 != 3,
        6 | 8 | 10 => flags == 0b0010,
        0 | 15 if version == Version::V4 => false,
        0 => false,
        _ => flags == 0,
    };
    if !flags_ok {
        return Err(DecodeError::Malformed(format!(
            "packet type {kind} with flags {flags:#06b}"
        )));
    }
    // CONNACK, SUBACK, UNSUBACK, PINGRESP, and AUTH (we offer no enhanced
    // authentication, so a client never has a reason to send it).
    if matches!(kind, 2 | 9 | 11 | 13 | 15) {
        return Err(DecodeError::Protocol {
            why: "protocol_error",
            detail: format!("a client does not send packet type {kind}"),
        });
    }
    let Some((remaining, header_len)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    let size = 1 + header_len + remaining;
    if size > max {
        return Err(DecodeError::TooLarge { size, max });
    }
    if buf.len() < size {
        return Ok(None);
    }
    if version == Version::V5 {
        match repeated_property(kind, flags, &buf[1 + header_len..size]) {
            Ok(None) => {}
            Ok(Some(id)) => {
                return Err(DecodeError::Protocol {
                    why: "duplicate_property",
                    detail: format!("property {id:#04x} given more than once"),
                })
            }
            Err(why) => return Err(DecodeError::Malformed(why.to_owned())),
        }
    }
    // v5 DISCONNECT may omit the reason code, or the property length after it
    // (remaining length 0 or 1); rumqttc wants both.
    if kind == 14 && remaining <= 1 {
        let reason = if remaining == 1 {
            buf[1 + header_len]
        } else {
            0
        };
        let _ = buf.split_to(size);
        return Ok(Some(In::Disconnect {
            reason,
            session_expiry: None,
        }));
    }
    let packet = match version {
        Version::V4 => from_v4(v4::Packet::read(buf, max).map_err(malformed4)?)?,
        Version::V5 => from_v5(v5::Packet::read(buf, Some(max as u32)).map_err(malformed5)?)?,
    };
    Ok(Some(packet))
}

/// MQTT 5 User Property: the one property a client may give more than once
/// in a packet (Subscription Identifier repeats only in a server's PUBLISH).
const USER_PROPERTY: u8 = 0x26;

/// Reads a packet body just far enough to find its property blocks. Every
/// read is bounds-checked: peer bytes never make it panic.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or("a property block runs past its packet")?;
        let bytes = self.buf.get(self.pos..end).ok_or("truncated packet")?;
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        self.take(1)?.first().copied().ok_or("truncated packet")
    }

    fn two(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        match b {
            [hi, lo] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err("truncated packet"),
        }
    }

    /// A variable byte integer (at most 4 bytes).
    fn varint(&mut self) -> Result<usize, &'static str> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.byte()?;
            value |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("variable byte integer over 4 bytes")
    }

    /// A UTF-8 string or binary data: a two-byte length, then the bytes.
    fn prefixed(&mut self) -> Result<(), &'static str> {
        let n = self.two()?;
        self.take(usize::from(n)).map(|_| ())
    }
}

/// Scans one property block (its length, then the properties): the first
/// property given twice that the spec allows once, if any. Bounded by the
/// block: every step consumes at least one byte; no recursion.
fn scan_properties(c: &mut Cursor<'_>) -> Result<Option<u8>, &'static str> {
    let len = c.varint()?;
    let mut p = Cursor::new(c.take(len)?);
    // Every property identifier is below 64.
    let mut seen = 0u64;
    while p.left() > 0 {
        let id = u8::try_from(p.varint()?).map_err(|_| "unknown property")?;
        match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                p.take(1)?;
            }
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => {
                p.take(2)?;
            }
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => {
                p.take(4)?;
            }
            // Variable byte integer (subscription identifier).
            0x0B => {
                p.varint()?;
            }
            // UTF-8 string or binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => p.prefixed()?,
            USER_PROPERTY => {
                p.prefixed()?;
                p.prefixed()?;
                continue;
            }
            _ => return Err("unknown property"),
        }
        let bit = 1u64 << id;
        if seen & bit != 0 {
            return Ok(Some(id));
        }
        seen |= bit;
    }
    Ok(None)
}

/// The first property an MQTT 5 packet from a client repeats although the
/// spec allows it once (a protocol error), in any of its property blocks
/// (CONNECT has two: its own and the will's). `Err`: a property block that
/// does not parse (a malformed packet). `body` is the packet after its
/// fixed header; packets without properties give `Ok(None)`.
pub fn repeated_property(kind: u8, flags: u8, body: &[u8]) -> Result<Option<u8>, &'static str> {
    let mut c = Cursor::new(body);
    match kind {
        // CONNECT: protocol name, level, flags, keep alive, properties;
        // then the client id and, with the will flag, the will's properties.
        1 => {
            c.prefixed()?;
            c.take(1)?;
            let connect_flags = c.byte()?;
            c.take(2)?;
            if let Some(id) = scan_properties(&mut c)? {
                return Ok(Some(id));
            }
            c.prefixed()?;
            if connect_flags & 0x04 != 0 {
                return scan_properties(&mut c);
            }
            Ok(None)
        }
        // PUBLISH: topic, packet id when QoS > 0, properties.
        3 => {
            c.prefixed()?;
            if (flags >> 1) & 0b11 > 0 {
                c.take(2)?;
            }
            scan_properties(&mut c)
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then a reason code and
        // properties only when the remaining length says so.
        4..=7 if body.len() >= 4 => {
            c.take(3)?;
            scan_properties(&mut c)
        }
        // SUBSCRIBE, UNSUBSCRIBE: packet id, properties.
        8 | 10 => {
            c.take(2)?;
            scan_properties(&mut c)
        }
        // DISCONNECT, AUTH: a reason code, then properties when present.
        14 | 15 if body.len() >= 2 => {
            c.take(1)?;
            scan_properties(&mut c)
        }
        _ => Ok(None),
    }
}

fn malformed4(e: m4::Error) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

fn malformed5(e: m5::Error) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

fn qos4(q: m4::QoS) -> u8 {
    q as u8
}

fn qos5(q: m5::QoS) -> u8 {
    q as u8
}

fn from_v4(p: v4::Packet) -> Result<In, DecodeError> {
    Ok(match p {
        v4::Packet::Connect(c) => In::Connect(Box::new(ConnectIn {
            version: Version::V4,
            session_expiry: if c.clean_session { 0 } else { u32::MAX },
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
                delay: 0,
                props: MsgProps::default(),
            }),
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
            receive_max: u16::MAX,
            max_packet_size: None,
            auth_method: None,
        })),
        v4::Packet::Publish(p) => In::Publish(PublishIn {
            topic: p.topic,
            qos: qos4(p.qos),
            retain: p.retain,
            pkid: p.pkid,
            payload: p.payload,
            alias: None,
            props: MsgProps::default(),
        }),
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRec(a) => In::PubRec(a.pkid),
        v4::Packet::PubRel(a) => In::PubRel(a.pkid),
        v4::Packet::PubComp(a) => In::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    path: f.path,
                    qos: qos4(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) if u.topics.is_empty() => {
            return Err(DecodeError::Malformed("UNSUBSCRIBE without filters".into()))
        }
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => In::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => In::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => In::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => In::Unexpected("PINGRESP"),
    })
}

fn props_from_publish(p: Option<v5::PublishProperties>) -> (MsgProps, Option<u16>, Vec<usize>) {
    let Some(p) = p else {
        return (MsgProps::default(), None, Vec::new());
    };
    (
        MsgProps {
            payload_format: p.payload_format_indicator,
            expiry: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation: p.correlation_data,
            user: p.user_properties,
        },
        p.topic_alias,
        p.subscription_identifiers,
    )
}

fn from_v5(p: v5::Packet) -> Result<In, DecodeError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.unwrap_or_else(|| v5::ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            });
            let will = will.map(|w| {
                let wp = w.properties.unwrap_or_else(|| v5::LastWillProperties {
                    delay_interval: None,
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                });
                Ok(Will {
                    topic: String::from_utf8(w.topic.to_vec())
                        .map_err(|_| DecodeError::Malformed("will topic is not UTF-8".into()))?,
                    payload: w.message,
                    qos: qos5(w.qos),
                    retain: w.retain,
                    delay: wp.delay_interval.unwrap_or(0),
                    props: MsgProps {
                        payload_format: wp.payload_format_indicator,
                        expiry: wp.message_expiry_interval,
                        content_type: wp.content_type,
                        response_topic: wp.response_topic,
                        correlation: wp.correlation_data,
                        user: wp.user_properties,
                    },
                })
            });
            let will = will.transpose()?;
            In::Connect(Box::new(ConnectIn {
                version: Version::V5,
                client_id: c.client_id,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                will,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
                session_expiry: props.session_expiry_interval.unwrap_or(0),
                receive_max: props.receive_maximum.unwrap_or(u16::MAX),
                max_packet_size: props.max_packet_size,
                auth_method: props.authentication_method,
            }))
        }
        v5::Packet::Publish(p) => {
            let (props, alias, _) = props_from_publish(p.properties);
            In::Publish(PublishIn {
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| DecodeError::Malformed("topic name is not UTF-8".into()))?,
                qos: qos5(p.qos),
                retain: p.retain,
                pkid: p.pkid,
                payload: p.payload,
                alias,
                props,
            })
        }
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRec(a) => In::PubRec(a.pkid),
        v5::Packet::PubRel(a) => In::PubRel(a.pkid),
        v5::Packet::PubComp(a) => In::PubComp(a.pkid),
        v5::Packet::Subscribe(s) if s.properties.as_ref().and_then(|p| p.id) == Some(0) => {
            return Err(DecodeError::Malformed("subscription identifier 0".into()))
        }
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            id: s.properties.and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    path: f.path,
                    qos: qos5(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) if u.filters.is_empty() => {
            return Err(DecodeError::Malformed("UNSUBSCRIBE without filters".into()))
        }
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => In::Unexpected("AUTH"),
        v5::Packet::ConnAck(_) => In::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => In::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => In::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => In::Unexpected("PINGRESP"),
    })
}

/// CONNACK return code for 3.1.1 from a v5 reason code.
fn connack_v4(code: u8) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::UNSUPPORTED_PROTOCOL_VERSION => C::RefusedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::BadClientId,
        reason::BAD_USERNAME_OR_PASSWORD => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

fn connack_v5(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::MALFORMED => C::MalformedPacket,
        reason::PROTOCOL_ERROR => C::ProtocolError,
        reason::UNSUPPORTED_PROTOCOL_VERSION => C::UnsupportedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::ClientIdentifierNotValid,
        reason::BAD_USERNAME_OR_PASSWORD => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        reason::SERVER_UNAVAILABLE => C::ServerUnavailable,
        reason::BAD_AUTH_METHOD => C::BadAuthenticationMethod,
        reason::PACKET_TOO_LARGE => C::PacketTooLarge,
        reason::QUOTA_EXCEEDED => C::QuotaExceeded,
        _ => C::UnspecifiedError,
    }
}

fn puback_v5(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_v5(code: u8) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn suback_v5(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as R;
    match code {
        0 => R::Success(m5::QoS::AtMostOnce),
        1 => R::Success(m5::QoS::AtLeastOnce),
        2 => R::Success(m5::QoS::ExactlyOnce),
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecific,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_FILTER_INVALID => R::TopicFilterInvalid,
        reason::PACKET_ID_IN_USE => R::PkidInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => R::SharedSubscriptionsNotSupported,
        _ => R::Unspecified,
    }
}

fn disconnect_v5(code: u8) -> v5::DisconnectReasonCode {
    v5::DisconnectReasonCode::try_from(code).unwrap_or(v5::DisconnectReasonCode::UnspecifiedError)
}

fn q4(q: u8) -> m4::QoS {
    match q {
        0 => m4::QoS::AtMostOnce,
        1 => m4::QoS::AtLeastOnce,
        _ => m4::QoS::ExactlyOnce,
    }
}

fn q5(q: u8) -> m5::QoS {
    match q {
        0 => m5::QoS::AtMostOnce,
        1 => m5::QoS::AtLeastOnce,
        _ => m5::QoS::ExactlyOnce,
    }
}

fn some_if<T>(cond: bool, v: T) -> Option<T> {
    cond.then_some(v)
}

/// Appends `packet` to `buf` in `version`'s wire form. 3.1.1 has no
/// DISCONNECT from the server: that packet encodes to nothing (the caller closes).
pub fn encode(packet: Out, version: Version, buf: &mut BytesMut) {
    // The packets we build are always encodable; a failure would be a bug in
    // this module, and the connection would then see a short write and close.
    let result = match version {
        Version::V4 => encode_v4(packet, buf),
        Version::V5 => encode_v5(packet, buf),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "an MQTT packet could not be encoded");
    }
}

fn encode_v4(packet: Out, buf: &mut BytesMut) -> Result<usize, String> {
    let r = match packet {
        Out::ConnAck {
            session_present,
            code,
            ..
        } => v4::ConnAck::new(connack_v4(code), session_present).write(buf),
        Out::Publish(p) => {
            let mut out = v4::Publish::from_bytes(p.topic, q4(p.qos), p.payload);
            out.retain = p.retain;
            out.dup = p.dup;
            out.pkid = p.pkid;
            out.write(buf)
        }
        Out::PubAck(pkid, _) => v4::PubAck::new(pkid).write(buf),
        Out::PubRec(pkid, _) => v4::PubRec::new(pkid).write(buf),
        Out::PubComp(pkid, _) => v4::PubComp::new(pkid).write(buf),
        Out::SubAck(pkid, codes) => v4::SubAck::new(
            pkid,
            codes
                .into_iter()
                .map(|c| match c {
                    0..=2 => v4::SubscribeReasonCode::Success(q4(c)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )
        .write(buf),
        Out::UnsubAck(pkid, _) => v4::UnsubAck::new(pkid).write(buf),
        Out::PingResp => v4::PingResp.write(buf),
        Out::Disconnect(_) => Ok(0),
    };
    r.map_err(|e| e.to_string())
}

fn encode_v5(packet: Out, buf: &mut BytesMut) -> Result<usize, String> {
    let r = match packet {
        Out::ConnAck {
            session_present,
            code,
            props,
        } => {
            let properties = if code == reason::SUCCESS {
                Some(v5::ConnAckProperties {
                    session_expiry_interval: props.session_expiry,
                    receive_max: Some(props.receive_max),
                    max_qos: None,
                    retain_available: Some(1),
                    max_packet_size: Some(props.max_packet_size),
                    assigned_client_identifier: props.assigned_client_id,
                    topic_alias_max: Some(props.topic_alias_max),
                    reason_string: props.reason_string,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(1),
                    subscription_identifiers_available: Some(1),
                    shared_subscription_available: Some(0),
                    server_keep_alive: props.server_keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                })
            } else {
                props.reason_string.map(|r| v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: None,
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: Some(r),
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                })
            };
            v5::ConnAck {
                session_present,
                code: connack_v5(code),
                properties,
            }
            .write(buf)
        }
        Out::Publish(p) => {
            let props = p.props;
            let has_props = props != MsgProps::default() || !p.sub_ids.is_empty();
            let properties = some_if(
                has_props,
                v5::PublishProperties {
                    payload_format_indicator: props.payload_format,
                    message_expiry_interval: props.expiry,
                    topic_alias: None,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation,
                    user_properties: props.user,
                    subscription_identifiers: p.sub_ids,
                    content_type: props.content_type,
                },
            );
            let mut out = v5::Publish::new(p.topic, q5(p.qos), p.payload, properties);
            out.retain = p.retain;
            out.dup = p.dup;
            out.pkid = p.pkid;
            out.write(buf)
        }
        Out::PubAck(pkid, code) => {
            let mut a = v5::PubAck::new(pkid, None);
            a.reason = puback_v5(code);
            a.write(buf)
        }
        Out::PubRec(pkid, code) => {
            let mut a = v5::PubRec::new(pkid, None);
            a.reason = pubrec_v5(code);
            a.write(buf)
        }
        Out::PubComp(pkid, code) => {
            let mut a = v5::PubComp::new(pkid, None);
            if code != reason::SUCCESS {
                a.reason = v5::PubCompReason::PacketIdentifierNotFound;
            }
            a.write(buf)
        }
        Out::SubAck(pkid, codes) => v5::SubAck {
            pkid,
            return_codes: codes.into_iter().map(suback_v5).collect(),
            properties: None,
        }
        .write(buf),
        Out::UnsubAck(pkid, codes) => v5::UnsubAck {
            pkid,
            reasons: codes
                .into_iter()
                .map(|c| match c {
                    reason::SUCCESS => v5::UnsubAckReason::Success,
                    0x11 => v5::UnsubAckReason::NoSubscriptionExisted,
                    reason::TOPIC_FILTER_INVALID => v5::UnsubAckReason::TopicFilterInvalid,
                    _ => v5::UnsubAckReason::UnspecifiedError,
                })
                .collect(),
            properties: None,
        }
        .write(buf),
        Out::PingResp => v5::PingResp::write(buf),
        // rumqttc 0.25 writes a properties length after the reason code while
        // declaring a remaining length of 1; the two-byte form is exact.
        Out::Disconnect(code) => {
            buf.extend_from_slice(&[0xE0, 0x01, disconnect_v5(code) as u8]);
            Ok(3)
        }
    };
    r.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: Version) -> BytesMut {
        let mut buf = BytesMut::new();
        match version {
            Version::V4 => {
                v4::Connect::new("c1").write(&mut buf).expect("write");
            }
            Version::V5 => {
                v5::Connect {
                    keep_alive: 30,
                    client_id: "c1".into(),
                    clean_start: true,
                    properties: None,
                }
                .write(&None, &None, &mut buf)
                .expect("write");
            }
        }
        buf
    }

    #[test]
    fn sniffs_both_versions_and_waits_for_more_bytes() {
        for v in [Version::V4, Version::V5] {
            let buf = connect_bytes(v);
            assert_eq!(sniff_version(&buf, 1024).expect("sniff"), Some(v));
            assert_eq!(sniff_version(&buf[..3], 1024).expect("short"), None);
            let mut b = buf.clone();
            let Some(In::Connect(c)) = decode(&mut b, v, 1024).expect("decode") else {
                panic!("not a connect")
            };
            assert_eq!(c.client_id, "c1");
            assert!(b.is_empty());
        }
    }

    #[test]
    fn refuses_other_protocols_and_oversize_declarations() {
        assert!(matches!(
            sniff_version(b"\x30\x00", 1024),
            Err(DecodeError::NotMqtt(_))
        ));
        assert!(matches!(
            sniff_version(b"\x10\x0a\x00\x06MQIsdp\x03", 1024),
            Err(DecodeError::UnsupportedVersion(3))
        ));
        assert!(matches!(
            sniff_version(b"\x10\x0a\x00\x04HTTP\x04", 1024),
            Err(DecodeError::NotMqtt(_))
        ));
        // 2 MiB declared, nothing buffered: refused from the header alone.
        assert!(matches!(
            decode(
                &mut BytesMut::from(&b"\x30\x80\x80\x80\x01"[..]),
                Version::V4,
                1 << 20
            ),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode(
                &mut BytesMut::from(&b"\x30\xff\xff\xff\xff\x01"[..]),
                Version::V4,
                1 << 20
            ),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// A packet: first byte, remaining length, body.
    fn packet(first: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::from(&[first][..]);
        let mut n = body.len();
        loop {
            let byte = (n & 0x7F) as u8;
            n >>= 7;
            if n == 0 {
                b.extend_from_slice(&[byte]);
                break;
            }
            b.extend_from_slice(&[byte | 0x80]);
        }
        b.extend_from_slice(body);
        b
    }

    /// A property block: its length (one byte here), then `props`.
    fn block(props: &[u8]) -> Vec<u8> {
        let mut b = vec![props.len() as u8];
        b.extend_from_slice(props);
        b
    }

    /// v5 CONNECT of client `c1`, with these properties and, if given, a will
    /// with these will properties.
    fn connect5(props: &[u8], will: Option<&[u8]>) -> BytesMut {
        let flags = if will.is_some() { 0x06 } else { 0x02 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 30];
        body.extend(block(props));
        body.extend_from_slice(&[0, 2, b'c', b'1']);
        if let Some(w) = will {
            body.extend(block(w));
            body.extend_from_slice(&[0, 3, b'w', b'/', b'x', 0, 1, b'!']);
        }
        packet(0x10, &body)
    }

    const EXPIRY_1: [u8; 5] = [0x02, 0, 0, 0, 1];
    const USER_KV: [u8; 7] = [0x26, 0, 1, b'k', 0, 1, b'v'];

    fn publish5(props: &[u8]) -> BytesMut {
        let mut body = vec![0, 3, b'a', b'/', b'b', 0, 1];
        body.extend(block(props));
        body.extend_from_slice(b"payload");
        packet(0x32, &body)
    }

    fn subscribe5(props: &[u8]) -> BytesMut {
        let mut body = vec![0, 1];
        body.extend(block(props));
        body.extend_from_slice(&[0, 3, b'a', b'/', b'b', 0x01]);
        packet(0x82, &body)
    }

    fn repeated(p: &BytesMut) -> Result<Option<u8>, &'static str> {
        let Some((_, header_len)) = remaining_length(&p[1..]).expect("length") else {
            panic!("incomplete test packet")
        };
        repeated_property(p[0] >> 4, p[0] & 0x0F, &p[1 + header_len..])
    }

    #[test]
    fn the_property_scanner_finds_repeats_in_every_block() {
        let twice = |p: &[u8]| [p, p].concat();
        // Once each, and user properties as often as wanted: fine.
        let fine = [EXPIRY_1.as_slice(), &USER_KV, &USER_KV, &[0x23, 0, 1]].concat();
        assert_eq!(repeated(&publish5(&fine)), Ok(None));
        assert_eq!(repeated(&publish5(&[])), Ok(None));
        assert_eq!(repeated(&connect5(&[0x21, 0, 10], Some(&fine))), Ok(None));
        // Repeats, in each kind of block.
        assert_eq!(repeated(&publish5(&twice(&EXPIRY_1))), Ok(Some(0x02)));
        let ct = [0x03, 0, 1, b't'];
        assert_eq!(
            repeated(&publish5(&[&ct[..], &USER_KV, &ct].concat())),
            Ok(Some(0x03))
        );
        assert_eq!(
            repeated(&connect5(&twice(&[0x21, 0, 10]), None)),
            Ok(Some(0x21))
        );
        assert_eq!(
            repeated(&connect5(&[], Some(&twice(&[0x18, 0, 0, 0, 5])))),
            Ok(Some(0x18))
        );
        assert_eq!(
            repeated(&subscribe5(&twice(&[0x0B, 0x81, 0x01]))),
            Ok(Some(0x0B))
        );
        let mut unsub = vec![0, 1];
        unsub.extend(block(&twice(&[0x1F, 0, 1, b'r'])));
        unsub.extend_from_slice(&[0, 1, b'a']);
        assert_eq!(repeated(&packet(0xA2, &unsub)), Ok(Some(0x1F)));
        let mut puback = vec![0, 1, 0x00];
        puback.extend(block(&twice(&[0x1F, 0, 0])));
        assert_eq!(repeated(&packet(0x40, &puback)), Ok(Some(0x1F)));
        assert_eq!(repeated(&packet(0x40, &[0, 1])), Ok(None));
        assert_eq!(repeated(&packet(0x40, &[0, 1, 0x10])), Ok(None));
        let mut disconnect = vec![0x04];
        disconnect.extend(block(&twice(&[0x11, 0, 0, 0, 9])));
        assert_eq!(repeated(&packet(0xE0, &disconnect)), Ok(Some(0x11)));
        // Blocks that do not parse: unknown ids, lengths past the packet.
        assert!(repeated(&publish5(&[0x7F, 0])).is_err());
        assert!(repeated(&publish5(&[0x03, 0, 9, b'x'])).is_err());
        assert!(repeated(&publish5(&[0x0B, 0xFF, 0xFF, 0xFF, 0xFF])).is_err());
        assert!(repeated(&packet(0x32, &[0, 3, b'a', b'/', b'b', 0, 1, 40, 0x02])).is_err());
        assert!(repeated(&packet(0x10, &[0, 4, b'M'])).is_err());

        // decode: a repeat is a protocol error, before rumqttc keeps the last value.
        let mut b = publish5(&twice(&EXPIRY_1));
        assert!(matches!(
            decode(&mut b, Version::V5, 1024),
            Err(DecodeError::Protocol {
                why: "duplicate_property",
                ..
            })
        ));
        let mut b = connect5(&[], Some(&twice(&ct)));
        assert!(matches!(
            decode(&mut b, Version::V5, 1024),
            Err(DecodeError::Protocol { .. })
        ));
        let mut b = publish5(&fine);
        let Some(In::Publish(p)) = decode(&mut b, Version::V5, 1024).expect("decode") else {
            panic!("not a publish")
        };
        assert_eq!(p.props.user.len(), 2);
        assert!(b.is_empty());
    }

    #[test]
    fn reserved_and_server_only_types_are_refused_from_the_first_byte() {
        // A fixed header announcing about 1 MB (under the limit), no body.
        for (first, v) in [
            (0x00, Version::V4),
            (0xF0, Version::V4),
            (0x00, Version::V5),
            (0x0F, Version::V5),
        ] {
            let mut b = BytesMut::from(&[first, 0xC0, 0x84, 0x3D][..]);
            assert!(
                matches!(decode(&mut b, v, 1 << 20), Err(DecodeError::Malformed(_))),
                "{first:#04x} {v:?}"
            );
            // The first byte alone is enough.
            let mut b = BytesMut::from(&[first][..]);
            assert!(decode(&mut b, v, 1 << 20).is_err(), "{first:#04x} {v:?}");
        }
        for first in [0x20, 0x90, 0xB0, 0xD0, 0xF0] {
            let mut b = BytesMut::from(&[first, 0xC0, 0x84, 0x3D][..]);
            assert!(
                matches!(
                    decode(&mut b, Version::V5, 1 << 20),
                    Err(DecodeError::Protocol { .. })
                ),
                "{first:#04x}"
            );
        }
        // A PUBLISH announcing the same waits for its body.
        let mut b = BytesMut::from(&[0x30, 0xC0, 0x84, 0x3D][..]);
        assert!(matches!(decode(&mut b, Version::V5, 1 << 20), Ok(None)));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(b) = bytes.get_mut(1) {
                *b &= 0x3F;
            }
            for v in [Version::V4, Version::V5] {
                let mut buf = BytesMut::from(&bytes[..]);
                let _ = sniff_version(&buf, 1024);
                if let Some(&first) = bytes.first() {
                    let body = bytes.get(1..).unwrap_or_default();
                    let _ = repeated_property(first >> 4, first & 0x0F, body);
                }
                while let Ok(Some(_)) = decode(&mut buf, v, 1024) {}
            }
        }
    }

    #[test]
    fn encodes_every_out_packet_in_both_versions() {
        let packets = || {
            vec![
                Out::ConnAck {
                    session_present: true,
                    code: 0,
                    props: Box::default(),
                },
                Out::PubAck(1, 0),
                Out::PubRec(2, 0),
                Out::PubComp(3, 0),
                Out::SubAck(4, vec![0, 1, 0x80]),
                Out::UnsubAck(5, vec![0]),
                Out::PingResp,
                Out::Publish(Box::new(PublishOut {
                    topic: "a/b".into(),
                    qos: 1,
                    retain: true,
                    dup: true,
                    pkid: 9,
                    payload: Bytes::from_static(b"x"),
                    props: MsgProps {
                        user: vec![("k".into(), "v".into())],
                        ..MsgProps::default()
                    },
                    sub_ids: vec![3],
                })),
            ]
        };
        for v in [Version::V4, Version::V5] {
            let mut buf = BytesMut::new();
            for p in packets() {
                let before = buf.len();
                encode(p, v, &mut buf);
                assert!(buf.len() > before, "{v:?}: a packet encoded to nothing");
            }
            // The PUBLISH (last) reads back with its flags and properties.
            let mut last = BytesMut::new();
            if let Some(Out::Publish(p)) = packets().pop() {
                encode(Out::Publish(p), v, &mut last);
            }
            let Some(In::Publish(p)) = decode(&mut last, v, 1024).expect("decode") else {
                panic!("not a publish")
            };
            assert_eq!(
                (p.topic.as_str(), p.qos, p.retain, p.pkid),
                ("a/b", 1, true, 9)
            );
            assert_eq!(&p.payload[..], b"x");
            if v == Version::V5 {
                assert_eq!(p.props.user, vec![("k".to_owned(), "v".to_owned())]);
            }
        }
        let mut b = BytesMut::new();
        encode(
            Out::Disconnect(reason::SESSION_TAKEN_OVER),
            Version::V5,
            &mut b,
        );
        assert_eq!(&b[..], &[0xE0, 0x01, 0x8E]);
        let mut b = BytesMut::new();
        encode(
            Out::Disconnect(reason::SESSION_TAKEN_OVER),
            Version::V4,
            &mut b,
        );
        assert!(b.is_empty());
    }
}
