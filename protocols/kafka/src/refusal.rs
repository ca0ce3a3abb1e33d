//! Why the Kafka front end closes a connection or refuses a request: one
//! [`Refusal`] per cause, counted under its label in
//! `tributary_kafka_rejections_total{reason}` and logged in the same call.

use tracing::Level;
use tributary_ingest::Rejection;
use tributary_telemetry::Reason;

/// Why a connection was closed or a request refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A size prefix over `kafka.max_request_bytes` (refused before buffering).
    RequestTooLarge,
    /// A size prefix too small to hold a request header.
    RequestTooSmall,
    /// An API key Kafka does not define.
    UnknownApiKey,
    /// An API this node does not serve (not advertised in ApiVersions).
    UnsupportedApi,
    /// A version outside the range advertised for its API.
    UnsupportedVersion,
    /// A request that does not decode at its API and version.
    MalformedRequest,
    /// A produce batch that does not decode (bad CRC, old format, codec error).
    CorruptBatch,
    /// A produce batch that decompresses to more than allowed.
    DecompressedTooLarge,
    /// A transactional or idempotent batch (not served yet).
    UnsupportedBatch,
    /// The node's memory budget for received bytes is used up.
    MemoryBudget,
    /// Refused by authentication or an ACL.
    NotAuthorized,
    /// A response that could not be encoded (a bug).
    EncodeFailed,
    /// An idempotent producer's batch out of sequence, from a fenced epoch,
    /// or from a producer the partition does not know (answered with
    /// Kafka's code; the client recovers).
    Sequence,
    /// The log refused records.
    Log(Rejection),
    /// Already counted (with its detail) where it happened: close only.
    Counted,
}

impl Refusal {
    /// The `reason` label it is counted under.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::RequestTooLarge => "request_too_large",
            Refusal::RequestTooSmall => "request_too_small",
            Refusal::UnknownApiKey => "unknown_api_key",
            Refusal::UnsupportedApi => "unsupported_api",
            Refusal::UnsupportedVersion => "unsupported_version",
            Refusal::MalformedRequest => "malformed_request",
            Refusal::CorruptBatch => "corrupt_batch",
            Refusal::DecompressedTooLarge => "decompressed_too_large",
            Refusal::UnsupportedBatch => "unsupported_batch",
            Refusal::MemoryBudget => "memory_budget",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::EncodeFailed => "encode_failed",
            Refusal::Sequence => "producer_sequence",
            Refusal::Log(r) => r.label(),
            Refusal::Counted => "counted",
        }
    }
}

impl Reason for Refusal {
    const AREA: &'static str = "kafka";

    fn label(self) -> &'static str {
        Refusal::label(self)
    }

    fn level(self) -> Level {
        match self {
            Refusal::MemoryBudget | Refusal::EncodeFailed => Level::WARN,
            Refusal::Log(r) if r.is_node_fault() => Level::WARN,
            _ => Level::DEBUG,
        }
    }
}
