//! What the connectors read from outside: a connector's JSON (API and config
//! file), an MQTT broker's packets as the bridge's client reads them, and a
//! stored record turned into a PostgreSQL COPY row and an MQTT topic (its
//! key, value and headers are a producer's bytes), and a Kafka cluster's
//! answers as the Kafka connectors' client reads them (Fetch and Metadata,
//! the record batches inside, the read_committed filter over them).
#![no_main]

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{FetchResponse, MetadataResponse};
use kafka_protocol::protocol::Decodable;
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;
use tributary_connectors::kafka::committed;
use tributary_connectors::mqtt::topic_for;
use tributary_kafka::codec::fetched_batches;
use tributary_connectors::postgres_sink::{copy_row, ColumnType, Field};
use tributary_connectors::ConnectorConfig;
use tributary_storage::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ConnectorConfig::from_json(v);
    }
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        if Packet::read(&mut buf, 1 << 20).is_err() {
            break;
        }
    }
    let (a, b) = data.split_at(data.len() / 2);
    let mut ts = [0u8; 8];
    let n = a.len().min(8);
    ts[..n].copy_from_slice(&a[..n]);
    let r = Record {
        partition: 3,
        offset: 7,
        key: Some(a.to_vec()),
        value: Some(b.to_vec()),
        timestamp: i64::from_le_bytes(ts),
        headers: vec![("mqtt.topic".into(), b.to_vec()), ("site".into(), a.to_vec())],
    };
    let columns = [
        (Field::Path(vec!["a".into()]), ColumnType::TEXT),
        (Field::Path(vec!["x".into(), "y".into()]), ColumnType::JSONB),
        (Field::Key, ColumnType::BYTEA),
        (Field::Value, ColumnType::TEXT),
        (Field::Ts, ColumnType::TIMESTAMPTZ),
        (Field::Ts, ColumnType::INT8),
        (Field::Topic, ColumnType::TEXT),
    ];
    if let Ok(row) = copy_row(&columns, "t", &r) {
        // One row: its line and field separators are the ones it put there.
        assert!(!row.contains(&b'\n'));
        assert_eq!(row.iter().filter(|&&c| c == b'\t').count(), columns.len() - 1);
    }
    let mut answer = Bytes::copy_from_slice(data);
    if let Ok(f) = FetchResponse::decode(&mut answer, 12) {
        for t in f.responses {
            for p in t.partitions {
                let aborted: Vec<(i64, i64)> = p
                    .aborted_transactions
                    .unwrap_or_default()
                    .iter()
                    .map(|a| (a.first_offset, a.producer_id.0))
                    .collect();
                if let Some(Ok(batches)) = p.records.as_ref().map(fetched_batches) {
                    let mut next = 0;
                    let _ = committed(batches, &aborted, 0, &mut next);
                }
            }
        }
    }
    let _ = MetadataResponse::decode(&mut Bytes::copy_from_slice(data), 12);
    if let Ok(batches) = fetched_batches(&Bytes::copy_from_slice(data)) {
        let mut next = 0;
        let _ = committed(batches, &[(0, 1), (5, 2)], 0, &mut next);
    }
    let template = std::str::from_utf8(a).ok();
    let _ = topic_for(template, "t", &r);
    let _ = topic_for(None, "t", &r);
});
