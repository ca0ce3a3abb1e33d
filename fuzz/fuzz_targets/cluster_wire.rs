//! The cluster's node-to-node frames as a node reads them (length checked
//! before buffering, postcard), and a replicated op applied to a log: a
//! malformed append from a peer is refused, never a panic.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::runtime;
use tributary_cluster::network::{read_frame, write_frame, Reply, Rpc};
use tributary_storage::{Log, LogConfig, MemStore, Op, TopicConfig};

/// A fresh log per input: what an op stores must not pile up across runs.
async fn log() -> Log {
    let log = Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
    log.create_topic(TopicConfig::new("t", 2)).await.expect("topic");
    log
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    rt.block_on(async {
        let mut input = data;
        if let Ok(rpc) = read_frame::<_, Rpc>(&mut input).await {
            let mut out = Vec::new();
            let _ = write_frame(&mut out, &rpc).await;
        }
        let mut input = data;
        if let Ok(reply) = read_frame::<_, Reply>(&mut input).await {
            let mut out = Vec::new();
            let _ = write_frame(&mut out, &reply).await;
        }
        if let Ok(op) = postcard::from_bytes::<Op>(data) {
            // Appends, markers, offsets, metadata and id blocks go to the
            // committer; topic changes are the log's own checked calls.
            if !op.is_topic_change() {
                let log = log().await;
                let _ = log.apply_all(vec![(1, op)]).await;
                let _ = log.close().await;
            }
        }
    });
});
