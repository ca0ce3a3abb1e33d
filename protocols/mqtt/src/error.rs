//! The MQTT crate's one error type.
//!
//! Its first variants are what the codec refuses to read ([`codec::decode`],
//! [`codec::sniff_version`]); a connection answers each with its own
//! reason code and [`Refusal`] ([`Refusal::of_decode`]). The others are the
//! broker's: its settings, loading its state, retaining a message, and an
//! encoder failure (a bug).
//!
//! [`codec::decode`]: crate::codec::decode
//! [`codec::sniff_version`]: crate::codec::sniff_version
//! [`Refusal`]: crate::Refusal
//! [`Refusal::of_decode`]: crate::Refusal::of_decode

/// Everything that can go wrong in the MQTT front end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// A packet could not be encoded (a bug: the packets the broker builds
    /// are always encodable); the encoder's message.
    #[error("{0}")]
    Encode(String),
    /// A setting is invalid (a `[[mqtt.routes]]` entry); the message names
    /// what is wrong.
    #[error("{0}")]
    Config(String),
    /// The broker's stored state could not be loaded at start.
    #[error("cannot load {what}: {error}")]
    Load {
        /// What: sessions, retained messages, shared subscription groups.
        what: &'static str,
        /// What the log said.
        error: tributary_storage::Error,
    },
    /// A retained message was not kept: the limit of topics holding one
    /// (`max_retained`) is reached.
    #[error("the retained-message limit ({0}) is reached")]
    RetainedFull(usize),
    /// The log failed.
    #[error(transparent)]
    Log(tributary_storage::Error),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
