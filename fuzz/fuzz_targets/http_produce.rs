//! The HTTP produce body (JSON records in every encoding, headers as an
//! object or a list), and the round trip of arbitrary stored bytes through
//! fetch's rendering in both formats: the output must parse again with
//! serde_json's default limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_http::records::{Format, ProduceBody, RecordOut};
use tributary_storage::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(body) = serde_json::from_str::<ProduceBody>(text) {
            for r in body.records {
                let _ = r.into_append();
            }
        }
    }
    let (key, value) = match data.split_first() {
        Some((&k, rest)) => {
            let k = usize::from(k).min(rest.len());
            (Some(rest[..k].to_vec()), rest[k..].to_vec())
        }
        None => (None, Vec::new()),
    };
    // A null value too (the first byte's low bit), in both formats.
    let null = data.first().is_some_and(|b| b & 1 == 1);
    for format in [Format::Json, Format::Binary] {
        let record = Record {
            partition: 0,
            offset: 0,
            key: key.clone(),
            value: (!null).then(|| value.clone()),
            timestamp: 0,
            headers: vec![("h".into(), value.clone())],
        };
        let text = serde_json::to_string(&RecordOut::new(record, format)).expect("renders");
        serde_json::from_str::<serde_json::Value>(&text).expect("parses back");
    }
});
