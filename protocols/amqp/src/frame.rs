//! AMQP 0-9-1 framing over amq-protocol's codec: we split frames ourselves so
//! the size is checked against `frame_max` from the 7-byte header, before any
//! payload is buffered (amq-protocol's `parse_frame` trusts the size field),
//! and so a parse failure can be told apart as an unknown method (540) or a
//! malformed one (502).

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame};
use amq_protocol::protocol::{basic::AMQPProperties, AMQPClass};
use amq_protocol::types::ShortString;
use bytes::{Buf, BytesMut};

use crate::Error;

/// Frame header: type (1), channel (2), payload size (4).
const HEADER: usize = 7;
/// The octet that ends every frame.
const FRAME_END: u8 = 0xCE;
/// A frame's bytes beyond its payload.
pub const OVERHEAD: usize = HEADER + 1;

/// Reply codes of the specification (section 1.2 of the XML spec).
pub mod code {
    /// Normal close.
    pub const SUCCESS: u16 = 200;
    /// Server shutting down.
    pub const CONNECTION_FORCED: u16 = 320;
    /// Mandatory message with nowhere to go.
    pub const NO_ROUTE: u16 = 312;
    /// Login refused or ACL denial.
    pub const ACCESS_REFUSED: u16 = 403;
    /// Passive declare of something that does not exist.
    pub const NOT_FOUND: u16 = 404;
    /// The request cannot be met as stated.
    pub const PRECONDITION_FAILED: u16 = 406;
    /// Malformed frame, or a frame larger than `frame_max`.
    pub const FRAME_ERROR: u16 = 501;
    /// A method frame whose fields do not parse.
    pub const SYNTAX_ERROR: u16 = 502;
    /// A method that is invalid here.
    pub const COMMAND_INVALID: u16 = 503;
    /// A channel that is not open, or opened twice.
    pub const CHANNEL_ERROR: u16 = 504;
    /// A frame out of sequence (content without a method, a method mid-content).
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// A limit of this server (channels, buffered content).
    pub const RESOURCE_ERROR: u16 = 506;
    /// A method this server does not implement.
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// The log failed.
    pub const INTERNAL_ERROR: u16 = 541;
}

/// The methods of AMQP 0-9-1 by (class id, method ids).
const METHODS: [(u16, &[u16]); 8] = [
    (
        10,
        &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
    ),
    (20, &[10, 11, 20, 21, 40, 41]),
    (30, &[10, 11]),
    (40, &[10, 11, 20, 21, 30, 31, 40, 51]),
    (50, &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51]),
    (
        60,
        &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
    ),
    (85, &[10, 11]),
    (90, &[10, 11, 20, 21, 30, 31]),
];

/// Deepest nesting of field tables and arrays accepted. amq-protocol parses
/// them recursively, so a frame of a few kilobytes of nested arrays would
/// otherwise overflow a worker thread's stack; we check iteratively first.
pub const MAX_NESTING: usize = 32;

/// Where the field table of a method frame's payload starts, for the methods
/// that carry one (the payload starts with class and method ids).
fn method_table_at(payload: &[u8], class: u16, method: u16) -> Option<usize> {
    let mut at = 4;
    let short = |at: &mut usize| -> Option<()> {
        *at += 1 + usize::from(*payload.get(*at)?);
        Some(())
    };
    match (class, method) {
        // connection.start: version major, minor, then server-properties.
        (10, 10) => at += 2,
        // connection.start-ok: client-properties first.
        (10, 11) => {}
        // exchange.declare: reserved u16, exchange, type, flags, arguments.
        (40, 10) => {
            at += 2;
            short(&mut at)?;
            short(&mut at)?;
            at += 1;
        }
        // exchange.bind/unbind, queue.bind: reserved, three names, flags, arguments.
        (40, 30) | (40, 40) | (50, 20) => {
            at += 2;
            for _ in 0..3 {
                short(&mut at)?;
            }
            at += 1;
        }
        // queue.declare: reserved, queue, flags, arguments.
        (50, 10) => {
            at += 2;
            short(&mut at)?;
            at += 1;
        }
        // queue.unbind: reserved, three names, arguments.
        (50, 50) => {
            at += 2;
            for _ in 0..3 {
                short(&mut at)?;
            }
        }
        // basic.consume: reserved, queue, consumer tag, flags, arguments.
        (60, 20) => {
            at += 2;
            short(&mut at)?;
            short(&mut at)?;
            at += 1;
        }
        _ => return None,
    }
    Some(at)
}

/// Where the `headers` table of a content header's payload starts, if present.
fn header_table_at(payload: &[u8]) -> Option<usize> {
    // class id, weight, body size, one property-flags word. amq-protocol reads
    // exactly one flags word (0-9-1's basic class has 14 properties and no
    // continuation), so the properties start at 14 whatever bit 0 says: the
    // check must look where the parser will.
    let flags = u16::from_be_bytes([*payload.get(12)?, *payload.get(13)?]);
    let mut at = 14;
    for flag in [0x8000u16, 0x4000] {
        if flags & flag != 0 {
            at += 1 + usize::from(*payload.get(at)?);
        }
    }
    (flags & 0x2000 != 0).then_some(at)
}

/// False when the field table at `start` nests tables or arrays deeper than
/// [`MAX_NESTING`]. Malformed input answers true: the parser refuses it, and
/// it cannot recurse deeper than this walk got.
pub fn nesting_ok(buf: &[u8], start: usize) -> bool {
    let len_at = |at: usize| -> Option<usize> {
        let b = buf.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let Some(len) = len_at(start) else {
        return true;
    };
    // (is a table, end offset) of every open container.
    let mut stack = vec![(true, start + 4 + len)];
    let mut at = start + 4;
    while let Some(&(table, end)) = stack.last() {
        if at >= end {
            stack.pop();
            continue;
        }
        if table {
            let Some(&key) = buf.get(at) else {
                return true;
            };
            at += 1 + usize::from(key);
        }
        let Some(&kind) = buf.get(at) else {
            return true;
        };
        at += 1;
        at += match kind {
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'V' => 0,
            b'S' | b'x' => match len_at(at) {
                Some(n) => 4 + n,
                None => return true,
            },
            b'A' | b'F' => {
                let Some(n) = len_at(at) else {
                    return true;
                };
                if stack.len() >= MAX_NESTING {
                    return false;
                }
                stack.push((kind == b'F', at + 4 + n));
                4
            }
            _ => return true,
        };
    }
    true
}

fn known_method(class: u16, method: u16) -> bool {
    METHODS
        .iter()
        .any(|(c, ms)| *c == class && ms.contains(&method))
}

/// Takes the next whole frame off `buf`: `Ok(None)` until one is complete.
/// `frame_max` bounds a frame including its 8 bytes of overhead. An error is
/// one of [`Error`]'s frame variants, and ends the connection.
pub fn next_frame(buf: &mut BytesMut, frame_max: usize) -> Result<Option<AMQPFrame>, Error> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let kind = buf[0];
    if !matches!(kind, 1 | 2 | 3 | 8) {
        return Err(Error::Malformed("unknown frame type"));
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size.saturating_add(OVERHEAD) > frame_max {
        return Err(Error::TooLarge {
            size: size.saturating_add(OVERHEAD),
            max: frame_max,
        });
    }
    let total = HEADER + size + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(Error::Malformed("frame does not end with 0xCE"));
    }
    let ids = |b: &BytesMut| {
        let at = |i: usize| b.get(HEADER + i).copied().unwrap_or(0);
        (
            u16::from_be_bytes([at(0), at(1)]),
            u16::from_be_bytes([at(2), at(3)]),
        )
    };
    let payload = &buf[HEADER..total - 1];
    let table_at = match kind {
        1 => {
            let (class, method) = ids(buf);
            method_table_at(payload, class, method)
        }
        2 => header_table_at(payload),
        _ => None,
    };
    if let Some(at) = table_at {
        if !nesting_ok(payload, at) {
            let (class, method) = ids(buf);
            let method = if kind == 2 { 0 } else { method };
            buf.advance(total);
            return Err(Error::TooDeep { class, method });
        }
    }
    let parsed = parse_frame(&buf[..total]).map(|(_, f)| f);
    let result = match parsed {
        Ok(frame) => Ok(Some(frame)),
        Err(_) if kind == 1 => {
            let (class, method) = ids(buf);
            if known_method(class, method) {
                Err(Error::Syntax { class, method })
            } else {
                Err(Error::UnknownMethod { class, method })
            }
        }
        Err(_) if kind == 2 => {
            let (class, _) = ids(buf);
            Err(Error::Syntax { class, method: 0 })
        }
        Err(_) => Err(Error::Malformed("unparsable frame")),
    };
    buf.advance(total);
    result
}

/// Appends `frame`'s bytes to `out`.
pub fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) {
    let before = out.len();
    let buf = std::mem::take(out);
    match cookie_factory::gen(gen_frame(frame), buf) {
        Ok((buf, _)) => *out = buf,
        // Writing into a Vec cannot fail, and the frames we build keep every
        // short string within 255 bytes; were it to fail, only this frame is lost.
        Err(e) => {
            tracing::error!(error = ?e, "an AMQP frame could not be encoded");
            out.truncate(before);
        }
    }
}

/// A method frame on `channel`.
pub fn method(channel: u16, m: AMQPClass, out: &mut Vec<u8>) {
    encode(&AMQPFrame::Method(channel, m), out);
}

/// A content header and body frames (split to fit `frame_max`).
pub fn content(
    channel: u16,
    properties: AMQPProperties,
    body: &[u8],
    frame_max: usize,
    out: &mut Vec<u8>,
) {
    encode(
        &AMQPFrame::Header(
            channel,
            amq_protocol::frame::AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties,
            },
        ),
        out,
    );
    let chunk = frame_max.saturating_sub(OVERHEAD).max(1);
    for part in body.chunks(chunk) {
        encode(&AMQPFrame::Body(channel, part.to_vec()), out);
    }
}

/// A short string from any text: cut at a character boundary to 255 bytes.
pub fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&s[..end]).unwrap_or_else(|_| "".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{basic, connection};
    use amq_protocol::types::{AMQPValue, FieldTable};

    fn bytes_of(frame: &AMQPFrame) -> BytesMut {
        let mut v = Vec::new();
        encode(frame, &mut v);
        BytesMut::from(&v[..])
    }

    #[test]
    fn round_trip_and_partial_input() {
        let f = AMQPFrame::Method(
            3,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "e".into(),
                routing_key: "k".into(),
                mandatory: true,
                immediate: false,
            })),
        );
        let full = bytes_of(&f);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert!(
                matches!(next_frame(&mut b, 131_072), Ok(None)),
                "cut at {cut}"
            );
        }
        let mut b = full.clone();
        b.extend_from_slice(&full);
        assert_eq!(next_frame(&mut b, 131_072).expect("frame"), Some(f.clone()));
        assert_eq!(next_frame(&mut b, 131_072).expect("frame"), Some(f));
        assert!(b.is_empty());
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        // Only the 7-byte header: the size field says 1 MiB.
        let mut b = BytesMut::from(&[3u8, 0, 1, 0, 0x10, 0, 0][..]);
        assert!(matches!(
            next_frame(&mut b, 131_072),
            Err(Error::TooLarge {
                size,
                max: 131_072
            }) if size == 1_048_576 + OVERHEAD
        ));
    }

    #[test]
    fn unknown_and_malformed_methods_are_told_apart() {
        // class 60, method 99 does not exist.
        let mut b = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, 0xCE][..]);
        assert!(matches!(
            next_frame(&mut b, 131_072),
            Err(Error::UnknownMethod {
                class: 60,
                method: 99
            })
        ));
        assert!(b.is_empty());
        // channel.close (20.40) cut short.
        let mut b = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 5, 0, 20, 0, 40, 1, 0xCE][..]);
        assert!(matches!(
            next_frame(&mut b, 131_072),
            Err(Error::Syntax {
                class: 20,
                method: 40
            })
        ));
        // A wrong frame-end octet, and an unknown frame type.
        let mut b = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0xCD][..]);
        assert!(matches!(
            next_frame(&mut b, 131_072),
            Err(Error::Malformed(_))
        ));
        let mut b = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        assert!(matches!(
            next_frame(&mut b, 131_072),
            Err(Error::Malformed(_))
        ));
    }

    /// `depth` arrays nested inside one header value, as a content header payload.
    fn nested_header(depth: usize) -> BytesMut {
        nested_header_with_flags(depth, 0x2000)
    }

    fn nested_header_with_flags(depth: usize, flags: u16) -> BytesMut {
        let mut value = vec![b'V'];
        for _ in 0..depth {
            let mut outer = vec![b'A'];
            outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
            outer.extend_from_slice(&value);
            value = outer;
        }
        let mut table = vec![1u8, b'h'];
        table.extend_from_slice(&value);
        let mut payload = vec![0u8, 60, 0, 0];
        payload.extend_from_slice(&0u64.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
        payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
        payload.extend_from_slice(&table);
        let mut f = vec![2u8, 0, 1];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&payload);
        f.push(0xCE);
        BytesMut::from(&f[..])
    }

    #[test]
    fn deep_nesting_is_refused_before_the_recursive_parser_sees_it() {
        let mut ok = nested_header(MAX_NESTING - 2);
        assert!(matches!(
            next_frame(&mut ok, 1 << 20),
            Ok(Some(AMQPFrame::Header(..)))
        ));
        for depth in [MAX_NESTING + 1, 100_000] {
            let mut deep = nested_header(depth);
            assert!(matches!(
                next_frame(&mut deep, 1 << 20),
                Err(Error::TooDeep {
                    class: 60,
                    method: 0
                })
            ));
            assert!(deep.is_empty());
        }
        // A set continuation bit must not move the check away from where
        // the parser reads (it reads one flags word).
        let mut sneaky = nested_header_with_flags(800, 0x2001);
        assert!(matches!(
            next_frame(&mut sneaky, 1 << 20),
            Err(Error::TooDeep {
                class: 60,
                method: 0
            })
        ));
        // The same in connection.start-ok's client properties.
        let mut props = FieldTable::default();
        let mut v = AMQPValue::Void;
        for _ in 0..MAX_NESTING + 5 {
            v = AMQPValue::FieldArray(vec![v].into());
        }
        props.insert("deep".into(), v);
        let f = AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: "\0a\0b".into(),
                locale: "en_US".into(),
            })),
        );
        let mut b = bytes_of(&f);
        assert!(matches!(
            next_frame(&mut b, 1 << 20),
            Err(Error::TooDeep {
                class: 10,
                method: 11
            })
        ));
    }

    #[test]
    fn content_is_split_to_frame_max() {
        let mut out = Vec::new();
        content(1, AMQPProperties::default(), &[7u8; 10_000], 4096, &mut out);
        let mut b = BytesMut::from(&out[..]);
        let mut bodies = 0;
        let mut total = 0;
        while let Some(f) = next_frame(&mut b, 4096).expect("valid") {
            if let AMQPFrame::Body(_, data) = f {
                assert!(data.len() + OVERHEAD <= 4096);
                bodies += 1;
                total += data.len();
            }
        }
        assert_eq!((bodies, total), (3, 10_000));
    }

    #[test]
    fn short_strings_are_cut_at_a_character_boundary() {
        let s = "é".repeat(200);
        let cut = short(&s);
        assert!(cut.as_str().len() <= 255);
        assert!(s.starts_with(cut.as_str()));
    }
}
