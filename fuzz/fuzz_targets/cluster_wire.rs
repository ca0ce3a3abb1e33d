//! The cluster's node-to-node frames as a node reads them (length checked
//! before buffering, postcard), and a replicated op applied to a log: a
//! malformed append from a peer is refused, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tributary_cluster::network::{read_frame, write_frame, Reply, Rpc};
use tributary_storage::{Log, LogConfig, MemStore, Op, TopicConfig};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log");
        runtime()
            .block_on(log.create_topic(TopicConfig::new("t", 2)))
            .expect("topic");
        log
    })
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
            // Topic changes and id blocks are the log's own checks; appends,
            // markers and metadata go to the committer.
            if !matches!(op, Op::DeleteTopic(_)) {
                let _ = log().apply_all(vec![(1, op)]).await;
            }
        }
    });
});
