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
//!
//! This file holds the types (version, reason codes, packets in and out; what
//! the codec refuses is a [`crate::Error`]); `decode.rs` sniffs the version
//! and reads packets, with the fixed-header and v5 property checks the codecs
//! lack; `v4.rs` and `v5.rs` convert from and to each version's `mqttbytes`
//! packets; `encode.rs` writes packets out.

mod decode;
mod encode;
mod v4;
mod v5;

pub use decode::{decode, pending_len, repeated_property, sniff_version};
pub use encode::encode;

use bytes::Bytes;

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
    /// v5 topic aliases the client accepts on deliveries (3.1.1: 0).
    pub topic_alias_max: u16,
    /// v5 request response information: the client asks for a response topic base.
    pub request_response_info: bool,
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
    /// PUBREC of a QoS 2 delivery, with its reason code (3.1.1: 0).
    PubRec(u16, u8),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP of a QoS 2 delivery.
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
    /// Response information (a topic base for request/response), when asked for.
    pub response_information: Option<String>,
    /// Why, for refusals.
    pub reason_string: Option<String>,
}

/// PUBLISH to a client.
#[derive(Debug, Clone)]
pub struct PublishOut {
    /// Topic (empty when `alias` stands for a topic sent before).
    pub topic: String,
    /// v5 topic alias.
    pub alias: Option<u16>,
    /// QoS 0..=2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Redelivery.
    pub dup: bool,
    /// Packet id (QoS 1 and 2).
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
    /// PUBREL (of a QoS 2 delivery; v5 reason 0x92 when the id is unknown).
    PubRel(u16, u8),
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
