//! What front ends measure alike: the ack-latency histogram every front end
//! keeps (`*_ack_seconds`). The writer, the registry and typed reasons are
//! the node's one telemetry crate (`tributary-telemetry`), re-exported here.

use std::ops::Deref;

pub use tributary_telemetry::{
    Family, Histogram, Kind, MetricsHub, MetricsSource, Reason, Reasons, Text,
};

/// Ack latency histogram bounds, seconds (every front end's `*_ack_seconds`).
pub const ACK_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0];

/// Time from a message read to its acknowledgement (durable), over [`ACK_BUCKETS`].
#[derive(Debug)]
pub struct AckHistogram(Histogram);

impl Default for AckHistogram {
    fn default() -> Self {
        AckHistogram(Histogram::new(&ACK_BUCKETS))
    }
}

impl Deref for AckHistogram {
    type Target = Histogram;
    fn deref(&self) -> &Histogram {
        &self.0
    }
}
