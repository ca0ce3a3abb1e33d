//! Structure-aware: a basic.publish with its content header (properties and
//! a headers table of any value, nested to any depth) and body frames, built
//! from the fuzzer's input and written by our encoder, read back frame by
//! frame: the same frames come out, except that a table nested deeper than
//! `MAX_NESTING` is refused (`TooDeep`) before amq-protocol's recursive
//! parser sees it, and the stream goes on after it.
#![no_main]

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, AMQPClass};
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tributary_amqp::frame::{self, MAX_NESTING};
use tributary_amqp::Error;

#[derive(Debug, Arbitrary)]
struct Input {
    channel: u16,
    exchange: Short,
    routing_key: Short,
    mandatory: bool,
    content_type: Option<Short>,
    message_id: Option<Short>,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    timestamp: Option<u64>,
    headers: Vec<(Short, Value)>,
    /// Wraps the headers in this many more tables.
    depth: u8,
    body: Vec<u8>,
    frame_max: u16,
}

/// A short string: at most 255 bytes of UTF-8.
#[derive(Debug, Arbitrary)]
struct Short(String);

impl Short {
    fn get(&self) -> ShortString {
        let mut end = self.0.len().min(255);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        ShortString::from(&self.0[..end])
    }
}

#[derive(Debug, Arbitrary)]
enum Value {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(u32),
    F64(u64),
    Decimal(u8, u32),
    Long(Vec<u8>),
    Array(Vec<Value>),
    Timestamp(u64),
    Table(Vec<(Short, Value)>),
    Bytes(Vec<u8>),
    Void,
}

fn value(v: &Value) -> AMQPValue {
    match v {
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::I8(n) => AMQPValue::ShortShortInt(*n),
        Value::U8(n) => AMQPValue::ShortShortUInt(*n),
        Value::I16(n) => AMQPValue::ShortInt(*n),
        Value::U16(n) => AMQPValue::ShortUInt(*n),
        Value::I32(n) => AMQPValue::LongInt(*n),
        Value::U32(n) => AMQPValue::LongUInt(*n),
        Value::I64(n) => AMQPValue::LongLongInt(*n),
        // Bit patterns that are not NaN, so the round trip can compare them.
        Value::F32(bits) => AMQPValue::Float(not_nan32(*bits)),
        Value::F64(bits) => AMQPValue::Double(not_nan64(*bits)),
        Value::Decimal(scale, value) => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        Value::Long(b) => AMQPValue::LongString(LongString::from(b.clone())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(value).collect::<Vec<_>>(),
        )),
        Value::Timestamp(t) => AMQPValue::Timestamp(*t),
        Value::Table(fields) => AMQPValue::FieldTable(table(fields)),
        Value::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        Value::Void => AMQPValue::Void,
    }
}

/// A table of the fields; a repeated key keeps its last value.
fn table(fields: &[(Short, Value)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in fields {
        t.insert(k.get(), value(v));
    }
    t
}

/// How deep containers nest in what was built (a table or array counts 1;
/// measured on the table, not the input, since a repeated key replaces).
fn depth(v: &AMQPValue) -> usize {
    match v {
        AMQPValue::FieldTable(t) => 1 + t.inner().values().map(depth).max().unwrap_or(0),
        AMQPValue::FieldArray(a) => 1 + a.as_slice().iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn not_nan32(bits: u32) -> f32 {
    let f = f32::from_bits(bits);
    if f.is_nan() {
        0.0
    } else {
        f
    }
}

fn not_nan64(bits: u64) -> f64 {
    let f = f64::from_bits(bits);
    if f.is_nan() {
        0.0
    } else {
        f
    }
}

fuzz_target!(|input: Input| {
    let channel = input.channel.max(1);
    let mut headers = table(&input.headers);
    for _ in 0..input.depth {
        let mut outer = FieldTable::default();
        outer.insert("n".into(), AMQPValue::FieldTable(headers));
        headers = outer;
    }
    let depth = depth(&AMQPValue::FieldTable(headers.clone()));
    let mut properties = basic::AMQPProperties::default().with_headers(headers);
    if let Some(t) = &input.content_type {
        properties = properties.with_content_type(t.get());
    }
    if let Some(id) = &input.message_id {
        properties = properties.with_message_id(id.get());
    }
    if let Some(mode) = input.delivery_mode {
        properties = properties.with_delivery_mode(mode);
    }
    if let Some(p) = input.priority {
        properties = properties.with_priority(p);
    }
    if let Some(t) = input.timestamp {
        properties = properties.with_timestamp(t);
    }
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: input.exchange.get(),
        routing_key: input.routing_key.get(),
        mandatory: input.mandatory,
        immediate: false,
    }));
    let frame_max = usize::from(input.frame_max).max(4096);
    let mut out = Vec::new();
    frame::method(channel, publish.clone(), &mut out);
    let header_at = out.len();
    frame::content(
        channel,
        properties.clone(),
        &input.body,
        frame_max,
        &mut out,
    );
    // A heartbeat after, to show the stream goes on past a refused frame.
    frame::encode(&AMQPFrame::Heartbeat, &mut out);
    let header_len = out[header_at + 3..header_at + 7]
        .try_into()
        .map(u32::from_be_bytes)
        .unwrap_or(0) as usize;

    let mut buf = BytesMut::from(&out[..]);
    let limit = frame_max.max(header_len + 8);
    match frame::next_frame(&mut buf, limit) {
        Ok(Some(f)) => assert_eq!(f, AMQPFrame::Method(channel, publish), "basic.publish"),
        other => panic!("basic.publish read as {other:?}"),
    }
    match frame::next_frame(&mut buf, limit) {
        Ok(Some(AMQPFrame::Header(ch, header))) => {
            assert!(depth <= MAX_NESTING, "depth {depth} was let through");
            assert_eq!(ch, channel);
            assert_eq!(header.body_size, input.body.len() as u64);
            assert_eq!(header.properties, properties);
        }
        Err(Error::TooDeep { .. }) => {
            assert!(depth > MAX_NESTING, "depth {depth} was refused");
        }
        other => panic!("content header read as {other:?}"),
    }
    let mut body = Vec::new();
    loop {
        match frame::next_frame(&mut buf, limit) {
            Ok(Some(AMQPFrame::Body(ch, part))) => {
                assert_eq!(ch, channel);
                body.extend_from_slice(&part);
            }
            Ok(Some(AMQPFrame::Heartbeat)) => break,
            other => panic!("body or heartbeat read as {other:?}"),
        }
    }
    assert_eq!(body, input.body);
    assert!(buf.is_empty());
});
