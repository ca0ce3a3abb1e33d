//! The AMQP crate's one error type.
//!
//! Its first variants are why the byte stream from a client cannot go on
//! ([`frame::next_frame`]); a connection closes with [`Error::reply`] and
//! counts a [`Refusal`] ([`Refusal::of_frame`]). Then a SASL response that
//! does not parse, a bridge URL that is not one, and what ends a bridge's
//! session with its broker (logged, then it reconnects).
//!
//! [`frame::next_frame`]: crate::frame::next_frame
//! [`Refusal`]: crate::Refusal
//! [`Refusal::of_frame`]: crate::Refusal::of_frame

use crate::frame::{code, MAX_NESTING};

/// Everything that can go wrong in the AMQP front end and its bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bigger than the negotiated `frame_max`.
    #[error("frame of {size} bytes exceeds frame_max {max}")]
    TooLarge {
        /// The frame's size, overhead included.
        size: usize,
        /// The negotiated `frame_max`.
        max: usize,
    },
    /// Not a method, header, body or heartbeat frame, or no frame-end octet.
    #[error("{0}")]
    Malformed(&'static str),
    /// A method frame naming a class/method the specification does not have.
    #[error("unknown method {class}.{method}")]
    UnknownMethod {
        /// Class id.
        class: u16,
        /// Method id.
        method: u16,
    },
    /// A known method (or a content header) whose fields do not parse.
    #[error("malformed fields in method {class}.{method}")]
    Syntax {
        /// Class id.
        class: u16,
        /// Method id (0: a content header).
        method: u16,
    },
    /// Field tables or arrays nested deeper than [`MAX_NESTING`].
    #[error("field tables nested deeper than {MAX_NESTING} in {class}.{method}")]
    TooDeep {
        /// Class id.
        class: u16,
        /// Method id (0: a content header).
        method: u16,
    },
    /// A connection.start-ok whose mechanism is not offered or whose
    /// response does not parse; the message is the connection.close text.
    #[error("{0}")]
    Auth(String),
    /// A bridge URL that is not an AMQP URI; the message says why.
    #[error("{0}")]
    Url(String),
    /// The bridge's broker (lapin) failed.
    #[cfg(feature = "amqp-bridge")]
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The bridge's log failed.
    #[error("log: {0}")]
    Log(#[from] tributary_storage::Error),
    /// The log refused what the bridge consumed.
    #[error("log: {0}")]
    Refused(#[from] tributary_ingest::Refused),
    /// A bridge's step did not complete in its timeout.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The broker refused a message the bridge published.
    #[error("the broker refused a message (basic.nack)")]
    Nacked,
    /// The broker could not route a message the bridge published.
    #[error("the broker could not route a message to any queue (basic.return)")]
    Unroutable,
    /// The bridge's channel closed before it could acknowledge a delivery.
    #[error("the channel closed before an ack could be sent")]
    AckLost,
    /// The broker cancelled the bridge's consumer.
    #[error("the consumer was cancelled")]
    Cancelled,
}

impl Error {
    /// The connection.close reply code and text for this error. The bridge's
    /// errors never reach a client; they would close with 541.
    pub fn reply(&self) -> (u16, String) {
        let code = match self {
            Error::TooLarge { .. } | Error::Malformed(_) => code::FRAME_ERROR,
            Error::UnknownMethod { .. } => code::NOT_IMPLEMENTED,
            Error::Syntax { .. } | Error::TooDeep { .. } => code::SYNTAX_ERROR,
            Error::Auth(_) => code::ACCESS_REFUSED,
            _ => code::INTERNAL_ERROR,
        };
        (code, self.to_string())
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
