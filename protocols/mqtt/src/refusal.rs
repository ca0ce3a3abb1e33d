//! Why the MQTT front end refuses, closes or skips something: one
//! [`Refusal`] per cause, counted under its label in
//! `tributary_mqtt_rejections_total{reason}` and logged in the same call
//! ([`crate::MqttMetrics::refuse`]).

use tracing::Level;
use tributary_ingest::Rejection;
use tributary_telemetry::Reason;

use crate::Error;

/// Why something was refused, closed or skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The log failed an append; the connection is closed.
    AppendFailed,
    /// The task appending a batch ended abnormally.
    AppendTaskFailed,
    /// CONNECT with a wrong user name or password.
    BadCredentials,
    /// CONNECT with a client id we do not accept.
    ClientIdInvalid,
    /// No CONNECT within the connect timeout.
    ConnectTimeout,
    /// A delivery larger than the client's maximum packet size (skipped).
    DeliveryOverClientMaxPacket,
    /// A v5 property the spec allows once, given twice.
    DuplicateProperty,
    /// CONNECT asking for enhanced authentication.
    EnhancedAuthUnsupported,
    /// Nothing from the client within 1.5 keep-alive intervals.
    KeepAliveTimeout,
    /// The log cannot write (failed, or shutting down).
    LogUnwritable,
    /// A CONNECT that does not parse.
    MalformedConnect,
    /// A packet that does not parse.
    MalformedPacket,
    /// The node's memory budget for received bytes is used up.
    MemoryBudget,
    /// Refused by authentication or an ACL.
    NotAuthorized,
    /// A first packet other than CONNECT.
    NotConnect,
    /// Bytes that are not MQTT.
    NotMqtt,
    /// A packet over `mqtt.max_packet_bytes`.
    PacketTooLarge,
    /// A publish declaring UTF-8 whose payload is not.
    PayloadFormatInvalid,
    /// A packet the protocol does not allow here.
    ProtocolError,
    /// More unacknowledged QoS 1/2 publishes than the receive maximum.
    ReceiveMaximumExceeded,
    /// A retained message that could not be kept.
    RetainRefused,
    /// A second CONNECT on one connection.
    SecondConnect,
    /// A shared subscription with no-local (not allowed).
    SharedNoLocal,
    /// The node is shutting down (not counted).
    Shutdown,
    /// A subscription refused (ACL, filter, limit).
    SubscribeRefused,
    /// Retention removed records a session had not read yet.
    SubscriberFellBehindRetention,
    /// A publish under `$SYS/`.
    SysTopicReserved,
    /// Another connection took the session over.
    TakenOver,
    /// CONNECT beyond `mqtt.max_sessions`.
    TooManySessions,
    /// A topic alias outside what we offered.
    TopicAliasInvalid,
    /// A topic alias used before it was set.
    TopicAliasUnknown,
    /// A publish to an invalid topic name.
    TopicNameInvalid,
    /// A stored record whose topic is no MQTT topic name (skipped).
    UndeliverableTopic,
    /// CONNECT for a protocol level we do not speak.
    UnsupportedProtocolVersion,
    /// CONNECT with an invalid will.
    WillInvalid,
    /// A will the device may not publish (dropped).
    WillNotAuthorized,
    /// A will the log did not store.
    WillNotStored,
    /// The client stopped reading; writes stalled.
    WriteStalled,
    /// The log refused a publish.
    Log(Rejection),
}

impl Refusal {
    /// The `reason` label it is counted under.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::AppendFailed => "append_failed",
            Refusal::AppendTaskFailed => "append_task_failed",
            Refusal::BadCredentials => "bad_credentials",
            Refusal::ClientIdInvalid => "client_id_invalid",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::DeliveryOverClientMaxPacket => "delivery_over_client_max_packet",
            Refusal::DuplicateProperty => "duplicate_property",
            Refusal::EnhancedAuthUnsupported => "enhanced_auth_unsupported",
            Refusal::KeepAliveTimeout => "keep_alive_timeout",
            Refusal::LogUnwritable => "log_unwritable",
            Refusal::MalformedConnect => "malformed_connect",
            Refusal::MalformedPacket => "malformed_packet",
            Refusal::MemoryBudget => "memory_budget",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::NotConnect => "not_connect",
            Refusal::NotMqtt => "not_mqtt",
            Refusal::PacketTooLarge => "packet_too_large",
            Refusal::PayloadFormatInvalid => "payload_format_invalid",
            Refusal::ProtocolError => "protocol_error",
            Refusal::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            Refusal::RetainRefused => "retain_refused",
            Refusal::SecondConnect => "second_connect",
            Refusal::SharedNoLocal => "shared_no_local",
            Refusal::Shutdown => "shutdown",
            Refusal::SubscribeRefused => "subscribe_refused",
            Refusal::SubscriberFellBehindRetention => "subscriber_fell_behind_retention",
            Refusal::SysTopicReserved => "sys_topic_reserved",
            Refusal::TakenOver => "taken_over",
            Refusal::TooManySessions => "too_many_sessions",
            Refusal::TopicAliasInvalid => "topic_alias_invalid",
            Refusal::TopicAliasUnknown => "topic_alias_unknown",
            Refusal::TopicNameInvalid => "topic_name_invalid",
            Refusal::UndeliverableTopic => "undeliverable_topic",
            Refusal::UnsupportedProtocolVersion => "unsupported_protocol_version",
            Refusal::WillInvalid => "will_invalid",
            Refusal::WillNotAuthorized => "will_not_authorized",
            Refusal::WillNotStored => "will_not_stored",
            Refusal::WriteStalled => "write_stalled",
            Refusal::Log(r) => r.label(),
        }
    }

    /// The refusal of a packet the codec could not read. The broker's own
    /// errors, which the codec never returns, map to what they are closest to.
    pub fn of_decode(e: &Error) -> Refusal {
        match e {
            Error::TooLarge { .. } => Refusal::PacketTooLarge,
            Error::Protocol {
                why: "duplicate_property",
                ..
            } => Refusal::DuplicateProperty,
            Error::Protocol { .. } => Refusal::ProtocolError,
            Error::NotMqtt(_) => Refusal::NotMqtt,
            Error::UnsupportedVersion(_) => Refusal::UnsupportedProtocolVersion,
            Error::Malformed(_) => Refusal::MalformedPacket,
            Error::RetainedFull(_) => Refusal::RetainRefused,
            Error::Log(error) | Error::Load { error, .. } => Refusal::Log(Rejection::of(error)),
            Error::Encode(_) | Error::Config(_) => Refusal::ProtocolError,
        }
    }
}

impl Reason for Refusal {
    const AREA: &'static str = "mqtt";

    fn label(self) -> &'static str {
        Refusal::label(self)
    }

    fn level(self) -> Level {
        match self {
            Refusal::AppendFailed
            | Refusal::AppendTaskFailed
            | Refusal::LogUnwritable
            | Refusal::MemoryBudget
            | Refusal::RetainRefused
            | Refusal::WillNotStored => Level::WARN,
            Refusal::Log(r) if r.is_node_fault() => Level::WARN,
            _ => Level::DEBUG,
        }
    }
}
