//! A pipeline's SQL (the API's and the config file's text) through the
//! compiler, and when it compiles, the engine over records whose keys,
//! values, headers and times come from the same input.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tributary_processing::compile;
use tributary_processing::engine::{Counts, Engine, State};
use tributary_storage::Record;

fuzz_target!(|data: &[u8]| {
    // The SQL up to the first NUL; the rest makes the records.
    let (sql, rest) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(plan) = compile(&String::from_utf8_lossy(sql)) else {
        return;
    };
    let plan = Arc::new(plan);
    let mut engine = Engine::new(plan.clone(), State::default());
    let mut out = Vec::new();
    let mut counts = Counts::default();
    for (i, chunk) in rest.split(|b| *b == b'\n').enumerate().take(256) {
        let mut ts = [0u8; 8];
        let n = chunk.len().min(8);
        ts[..n].copy_from_slice(&chunk[..n]);
        let r = Record {
            partition: 0,
            offset: i as u64,
            key: chunk.first().map(|b| vec![b % 8]),
            value: Some(chunk.get(8..).unwrap_or_default().to_vec()),
            timestamp: i64::from_le_bytes(ts),
            headers: vec![("h".into(), chunk.to_vec())],
        };
        let src = usize::from(plan.join.is_some() && i % 2 == 1);
        engine.process(src, "s", &r, &mut out, &mut counts);
    }
});
