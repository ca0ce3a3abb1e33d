//! The sync crate's one error type.
//!
//! What the core *tells* an edge is not an error of this crate: it is an
//! [`ErrorFrame`](crate::wire::ErrorFrame) with a [`code`], part of the wire
//! protocol. The core builds those from these errors where one applies (a
//! records block that does not decode, say); the edge turns the frames it
//! receives into [`Error::Refused`].

use tributary_storage::Error as LogError;

use crate::wire::code;

/// Everything that can go wrong in sync: frames and records blocks that do
/// not decode (either side), opening the core's sync state, and the edge's
/// link to its core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a postcard frame of a known kind.
    #[error("undecodable frame: {0}")]
    Frame(#[from] postcard::Error),
    /// A records block that does not parse.
    #[error("bad records block: {0}")]
    Records(&'static str),
    /// A records block over the limit.
    #[error("records block of {size} bytes exceeds {max}")]
    TooLarge {
        /// Its size, uncompressed.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// zstd failed.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// Opening the core's sync state: the log failed.
    #[error("sync state: {0}")]
    Log(#[from] LogError),
    /// Opening the core's sync state: a stored checkpoint does not parse.
    #[error("corrupt sync checkpoint {key}: {detail}")]
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The edge's log failed (its cursors, or the events it forwards).
    #[error(transparent)]
    Storage(LogError),
    /// The edge's `upstream.url` is unusable; the message says why.
    #[error("{0}")]
    Url(String),
    /// The edge's TLS settings (CA, client certificate, key) are unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The link to the core failed: connecting, a handshake, a read or a
    /// write failed or timed out, or the link closed.
    #[error("{0}")]
    Link(String),
    /// The core broke the protocol: a frame that does not decode, or that
    /// does not fit the session.
    #[error("{0}")]
    Peer(String),
    /// The core sent an error frame (and closes the link).
    #[error("the core said {} ({code}): {message}", code::name(*.code))]
    Refused {
        /// One of [`code`].
        code: u16,
        /// The core's message.
        message: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_names_the_code() {
        let e = Error::Refused {
            code: code::GAP,
            message: "expected 7".into(),
        };
        assert_eq!(e.to_string(), "the core said gap (6): expected 7");
        let e = Error::Tls("ca.pem: no such file".into());
        assert_eq!(e.to_string(), "TLS setup: ca.pem: no such file");
    }
}
