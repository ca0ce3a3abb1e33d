//! Why the AMQP front end refuses or closes something: one [`Refusal`] per
//! cause, counted under its label in `tributary_amqp_rejections_total{reason}`
//! and logged in the same call ([`crate::AmqpMetrics::refuse`]).

use tracing::Level;
use tributary_ingest::Rejection;
use tributary_telemetry::Reason;

use crate::Error;

/// Why something was refused or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A mechanism other than PLAIN, or a malformed PLAIN response.
    BadAuthMechanism,
    /// A wrong user name or password.
    BadCredentials,
    /// A protocol header other than AMQP 0-9-1.
    BadProtocolHeader,
    /// A method on a channel that is not open, or opened twice.
    ChannelError,
    /// A method not allowed in the state it came in.
    CommandInvalid,
    /// A channel buffering more unfinished message content than allowed.
    ContentBufferFull,
    /// A frame_max below the protocol minimum in tune-ok.
    FrameMaxTooSmall,
    /// A frame over the negotiated frame_max.
    FrameTooLarge,
    /// A handshake method out of its order.
    HandshakeOutOfOrder,
    /// No completed handshake within the timeout.
    HandshakeTimeout,
    /// Nothing from the client within two heartbeat intervals.
    HeartbeatTimeout,
    /// The log cannot write (failed, or shutting down).
    LogUnwritable,
    /// A frame that does not parse.
    MalformedFrame,
    /// A method frame whose arguments do not parse.
    MalformedMethod,
    /// The node's memory budget for received bytes is used up.
    MemoryBudget,
    /// A message larger than the topic allows.
    MessageTooLarge,
    /// A field table nested deeper than we read.
    NestingTooDeep,
    /// A publish to a topic that does not exist.
    NoRoute,
    /// Refused by an ACL.
    NotAuthorized,
    /// A method of a consumer (consume, get, transactions).
    NotImplemented,
    /// A frame of a kind not expected here.
    UnexpectedFrame,
    /// An ack or nack for a delivery tag we never sent.
    UnknownDeliveryTag,
    /// A method class or id AMQP 0-9-1 does not define.
    UnknownMethod,
    /// The log refused a publish for another reason (quota, disk, unwritable).
    Log(Rejection),
}

impl Refusal {
    /// The refusal of a frame that could not be read. The other errors,
    /// which reading frames never returns, map to what they are closest to.
    pub fn of_frame(e: &Error) -> Refusal {
        match e {
            Error::TooLarge { .. } => Refusal::FrameTooLarge,
            Error::UnknownMethod { .. } => Refusal::UnknownMethod,
            Error::Syntax { .. } => Refusal::MalformedMethod,
            Error::Malformed(_) => Refusal::MalformedFrame,
            Error::TooDeep { .. } => Refusal::NestingTooDeep,
            Error::Auth(_) => Refusal::BadAuthMechanism,
            Error::Refused(r) => Refusal::of_rejection(r.rejection),
            Error::Log(e) => Refusal::of_rejection(Rejection::of(e)),
            _ => Refusal::LogUnwritable,
        }
    }

    /// The refusal of a publish the log refused.
    pub fn of_rejection(r: Rejection) -> Refusal {
        match r {
            Rejection::UnknownTopic => Refusal::NoRoute,
            Rejection::TooLarge => Refusal::MessageTooLarge,
            other => Refusal::Log(other),
        }
    }

    /// The `reason` label it is counted under.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadAuthMechanism => "bad_auth_mechanism",
            Refusal::BadCredentials => "bad_credentials",
            Refusal::BadProtocolHeader => "bad_protocol_header",
            Refusal::ChannelError => "channel_error",
            Refusal::CommandInvalid => "command_invalid",
            Refusal::ContentBufferFull => "content_buffer_full",
            Refusal::FrameMaxTooSmall => "frame_max_too_small",
            Refusal::FrameTooLarge => "frame_too_large",
            Refusal::HandshakeOutOfOrder => "handshake_out_of_order",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HeartbeatTimeout => "heartbeat_timeout",
            Refusal::LogUnwritable => "log_unwritable",
            Refusal::MalformedFrame => "malformed_frame",
            Refusal::MalformedMethod => "malformed_method",
            Refusal::MemoryBudget => "memory_budget",
            Refusal::MessageTooLarge => "message_too_large",
            Refusal::NestingTooDeep => "nesting_too_deep",
            Refusal::NoRoute => "no_route",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::NotImplemented => "not_implemented",
            Refusal::UnexpectedFrame => "unexpected_frame",
            Refusal::UnknownDeliveryTag => "unknown_delivery_tag",
            Refusal::UnknownMethod => "unknown_method",
            Refusal::Log(r) => r.label(),
        }
    }
}

impl Reason for Refusal {
    const AREA: &'static str = "amqp";

    fn label(self) -> &'static str {
        Refusal::label(self)
    }

    fn level(self) -> Level {
        match self {
            Refusal::LogUnwritable | Refusal::MemoryBudget => Level::WARN,
            Refusal::Log(r) if r.is_node_fault() => Level::WARN,
            _ => Level::DEBUG,
        }
    }
}
