//! The devices crate's one error type.

/// Everything that can go wrong in the crate (the registry and its admin
/// operations). A refused login or a denied action is not an error: it is a
/// [`crate::Decision`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such device.
    #[error("device `{0}` does not exist")]
    NotFound(String),
    /// The id is taken.
    #[error("device `{0}` already exists")]
    Exists(String),
    /// Bad input; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// The log refused the write.
    #[error(transparent)]
    Storage(#[from] tributary_storage::Error),
}
