//! The front-end crate's one error type.

use std::io;
use std::path::PathBuf;

/// Why the TLS files could not be loaded (see [`crate::tls`]): the only
/// failure the crate reports. A peer that fails its handshake or breaks a
/// limit is an I/O error of its connection, not an [`Error`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A file was read but holds nothing usable.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `require_client_cert` without a `client_ca` to verify them against.
    #[error("client certificates are required but no client CA file is set")]
    NoClientCa,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}
