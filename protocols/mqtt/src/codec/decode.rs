//! Reading packets: [`sniff_version`] on the first bytes of a connection,
//! [`pending_len`] for the size of a packet still arriving, and [`decode`],
//! which checks the fixed header (reserved types and flags, server-only
//! types, the size limit) and scans v5 property blocks for repeats
//! ([`repeated_property`]) before handing the bytes to `mqttbytes`.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::v4::{from_v4, malformed4};
use super::v5::{from_v5, malformed5};
use super::{In, Version};
use crate::Error;

/// Looks at a buffer that should start with CONNECT: `Ok(None)` wants more
/// bytes; otherwise the protocol version to decode it with.
pub fn sniff_version(buf: &[u8], max: usize) -> Result<Option<Version>, Error> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(Error::NotMqtt(format!(
            "the first packet must be CONNECT, got type {}",
            first >> 4
        )));
    }
    let Some((remaining, header_len)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    if 1 + header_len + remaining > max {
        return Err(Error::TooLarge {
            size: 1 + header_len + remaining,
            max,
        });
    }
    let body = &buf[1 + header_len..];
    if body.len() < 2 {
        return Ok(None);
    }
    let name_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    if body.len() < 2 + name_len + 1 {
        return if remaining < 2 + name_len + 1 {
            Err(Error::Malformed("CONNECT is truncated".into()))
        } else {
            Ok(None)
        };
    }
    let name = &body[2..2 + name_len];
    let level = body[2 + name_len];
    if let Some(flags) = body.get(2 + name_len + 1) {
        // MQTT-3.1.2-3: the reserved flag is 0.
        if flags & 1 != 0 && name == b"MQTT" {
            return Err(Error::Malformed("reserved CONNECT flag set".into()));
        }
    }
    match (name, level) {
        (b"MQTT", 4) => Ok(Some(Version::V4)),
        (b"MQTT", 5) => Ok(Some(Version::V5)),
        (b"MQTT", l) | (b"MQIsdp", l) => Err(Error::UnsupportedVersion(l)),
        (other, _) => Err(Error::NotMqtt(format!(
            "protocol name {:?} is not MQTT",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// Variable-length remaining length: (value, bytes used), `None` if incomplete.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, Error> {
    let mut value = 0usize;
    for (i, b) in buf.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        return Err(Error::Malformed("remaining length over 4 bytes".into()));
    }
    Ok(None)
}

/// The whole size of the packet that starts `buf`, once its fixed header is
/// there (`None` before; also for a malformed length, which decode reports).
pub fn pending_len(buf: &[u8]) -> Option<usize> {
    let (remaining, header_len) = remaining_length(buf.get(1..)?).ok()??;
    Some(1 + header_len + remaining)
}

/// Decodes the next packet from `buf`: `Ok(None)` when more bytes are needed.
/// The declared size is checked against `max` before anything is buffered.
///
/// The first byte is judged as soon as it arrives: a reserved packet type
/// (0; 15 in 3.1.1), flags the type forbids, or a type only servers send is
/// refused before its body is waited for, whatever length it announces.
/// v5 property blocks are scanned before decoding ([`repeated_property`]).
pub fn decode(buf: &mut BytesMut, version: Version, max: usize) -> Result<Option<In>, Error> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = first >> 4;
    let flags = first & 0x0F;
    // Fixed-header flags the codecs do not check (MQTT-2.2.2-1/2).
    let flags_ok = match kind {
        3 => (flags >> 1) & 0b11 != 3,
        6 | 8 | 10 => flags == 0b0010,
        0 | 15 if version == Version::V4 => false,
        0 => false,
        _ => flags == 0,
    };
    if !flags_ok {
        return Err(Error::Malformed(format!(
            "packet type {kind} with flags {flags:#06b}"
        )));
    }
    // CONNACK, SUBACK, UNSUBACK, PINGRESP, and AUTH (we offer no enhanced
    // authentication, so a client never has a reason to send it).
    if matches!(kind, 2 | 9 | 11 | 13 | 15) {
        return Err(Error::Protocol {
            why: "protocol_error",
            detail: format!("a client does not send packet type {kind}"),
        });
    }
    let Some((remaining, header_len)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    let size = 1 + header_len + remaining;
    if size > max {
        return Err(Error::TooLarge { size, max });
    }
    if buf.len() < size {
        return Ok(None);
    }
    if version == Version::V5 {
        match repeated_property(kind, flags, &buf[1 + header_len..size]) {
            Ok(None) => {}
            Ok(Some(id)) => {
                return Err(Error::Protocol {
                    why: "duplicate_property",
                    detail: format!("property {id:#04x} given more than once"),
                })
            }
            Err(e) => return Err(e),
        }
    }
    // v5 DISCONNECT may omit the reason code, or the property length after it
    // (remaining length 0 or 1); rumqttc wants both.
    if kind == 14 && remaining <= 1 {
        let reason = if remaining == 1 {
            buf[1 + header_len]
        } else {
            0
        };
        let _ = buf.split_to(size);
        return Ok(Some(In::Disconnect {
            reason,
            session_expiry: None,
        }));
    }
    let packet = match version {
        Version::V4 => from_v4(v4::Packet::read(buf, max).map_err(malformed4)?)?,
        Version::V5 => from_v5(v5::Packet::read(buf, Some(max as u32)).map_err(malformed5)?)?,
    };
    Ok(Some(packet))
}

/// MQTT 5 User Property: the one property a client may give more than once
/// in a packet (Subscription Identifier repeats only in a server's PUBLISH).
const USER_PROPERTY: u8 = 0x26;

/// Reads a packet body just far enough to find its property blocks. Every
/// read is bounds-checked: peer bytes never make it panic.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or("a property block runs past its packet")?;
        let bytes = self.buf.get(self.pos..end).ok_or("truncated packet")?;
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        self.take(1)?.first().copied().ok_or("truncated packet")
    }

    fn two(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        match b {
            [hi, lo] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err("truncated packet"),
        }
    }

    /// A variable byte integer (at most 4 bytes).
    fn varint(&mut self) -> Result<usize, &'static str> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.byte()?;
            value |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("variable byte integer over 4 bytes")
    }

    /// A UTF-8 string or binary data: a two-byte length, then the bytes.
    fn prefixed(&mut self) -> Result<(), &'static str> {
        let n = self.two()?;
        self.take(usize::from(n)).map(|_| ())
    }
}

/// Scans one property block (its length, then the properties): the first
/// property given twice that the spec allows once, if any. Bounded by the
/// block: every step consumes at least one byte; no recursion.
fn scan_properties(c: &mut Cursor<'_>) -> Result<Option<u8>, &'static str> {
    let len = c.varint()?;
    let mut p = Cursor::new(c.take(len)?);
    // Every property identifier is below 64.
    let mut seen = 0u64;
    while p.left() > 0 {
        let id = u8::try_from(p.varint()?).map_err(|_| "unknown property")?;
        match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                p.take(1)?;
            }
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => {
                p.take(2)?;
            }
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => {
                p.take(4)?;
            }
            // Variable byte integer (subscription identifier).
            0x0B => {
                p.varint()?;
            }
            // UTF-8 string or binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => p.prefixed()?,
            USER_PROPERTY => {
                p.prefixed()?;
                p.prefixed()?;
                continue;
            }
            _ => return Err("unknown property"),
        }
        let bit = 1u64 << id;
        if seen & bit != 0 {
            return Ok(Some(id));
        }
        seen |= bit;
    }
    Ok(None)
}

/// The first property an MQTT 5 packet from a client repeats although the
/// spec allows it once (a protocol error), in any of its property blocks
/// (CONNECT has two: its own and the will's). `Err`: a property block that
/// does not parse ([`Error::Malformed`]). `body` is the packet after its
/// fixed header; packets without properties give `Ok(None)`.
pub fn repeated_property(kind: u8, flags: u8, body: &[u8]) -> Result<Option<u8>, Error> {
    scan_packet(kind, flags, body).map_err(|why| Error::Malformed(why.to_owned()))
}

/// [`repeated_property`], with the scanner's reason for a block that does
/// not parse.
fn scan_packet(kind: u8, flags: u8, body: &[u8]) -> Result<Option<u8>, &'static str> {
    let mut c = Cursor::new(body);
    match kind {
        // CONNECT: protocol name, level, flags, keep alive, properties;
        // then the client id and, with the will flag, the will's properties.
        1 => {
            c.prefixed()?;
            c.take(1)?;
            let connect_flags = c.byte()?;
            c.take(2)?;
            if let Some(id) = scan_properties(&mut c)? {
                return Ok(Some(id));
            }
            c.prefixed()?;
            if connect_flags & 0x04 != 0 {
                return scan_properties(&mut c);
            }
            Ok(None)
        }
        // PUBLISH: topic, packet id when QoS > 0, properties.
        3 => {
            c.prefixed()?;
            if (flags >> 1) & 0b11 > 0 {
                c.take(2)?;
            }
            scan_properties(&mut c)
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then a reason code and
        // properties only when the remaining length says so.
        4..=7 if body.len() >= 4 => {
            c.take(3)?;
            scan_properties(&mut c)
        }
        // SUBSCRIBE, UNSUBSCRIBE: packet id, properties.
        8 | 10 => {
            c.take(2)?;
            scan_properties(&mut c)
        }
        // DISCONNECT, AUTH: a reason code, then properties when present.
        14 | 15 if body.len() >= 2 => {
            c.take(1)?;
            scan_properties(&mut c)
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: Version) -> BytesMut {
        let mut buf = BytesMut::new();
        match version {
            Version::V4 => {
                v4::Connect::new("c1").write(&mut buf).expect("write");
            }
            Version::V5 => {
                v5::Connect {
                    keep_alive: 30,
                    client_id: "c1".into(),
                    clean_start: true,
                    properties: None,
                }
                .write(&None, &None, &mut buf)
                .expect("write");
            }
        }
        buf
    }

    #[test]
    fn sniffs_both_versions_and_waits_for_more_bytes() {
        for v in [Version::V4, Version::V5] {
            let buf = connect_bytes(v);
            assert_eq!(sniff_version(&buf, 1024).expect("sniff"), Some(v));
            assert_eq!(sniff_version(&buf[..3], 1024).expect("short"), None);
            let mut b = buf.clone();
            let Some(In::Connect(c)) = decode(&mut b, v, 1024).expect("decode") else {
                panic!("not a connect")
            };
            assert_eq!(c.client_id, "c1");
            assert!(b.is_empty());
        }
    }

    #[test]
    fn refuses_other_protocols_and_oversize_declarations() {
        assert!(matches!(
            sniff_version(b"\x30\x00", 1024),
            Err(Error::NotMqtt(_))
        ));
        assert!(matches!(
            sniff_version(b"\x10\x0a\x00\x06MQIsdp\x03", 1024),
            Err(Error::UnsupportedVersion(3))
        ));
        assert!(matches!(
            sniff_version(b"\x10\x0a\x00\x04HTTP\x04", 1024),
            Err(Error::NotMqtt(_))
        ));
        // 2 MiB declared, nothing buffered: refused from the header alone.
        assert!(matches!(
            decode(
                &mut BytesMut::from(&b"\x30\x80\x80\x80\x01"[..]),
                Version::V4,
                1 << 20
            ),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            decode(
                &mut BytesMut::from(&b"\x30\xff\xff\xff\xff\x01"[..]),
                Version::V4,
                1 << 20
            ),
            Err(Error::Malformed(_))
        ));
    }

    /// A packet: first byte, remaining length, body.
    fn packet(first: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::from(&[first][..]);
        let mut n = body.len();
        loop {
            let byte = (n & 0x7F) as u8;
            n >>= 7;
            if n == 0 {
                b.extend_from_slice(&[byte]);
                break;
            }
            b.extend_from_slice(&[byte | 0x80]);
        }
        b.extend_from_slice(body);
        b
    }

    /// A property block: its length (one byte here), then `props`.
    fn block(props: &[u8]) -> Vec<u8> {
        let mut b = vec![props.len() as u8];
        b.extend_from_slice(props);
        b
    }

    /// v5 CONNECT of client `c1`, with these properties and, if given, a will
    /// with these will properties.
    fn connect5(props: &[u8], will: Option<&[u8]>) -> BytesMut {
        let flags = if will.is_some() { 0x06 } else { 0x02 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 30];
        body.extend(block(props));
        body.extend_from_slice(&[0, 2, b'c', b'1']);
        if let Some(w) = will {
            body.extend(block(w));
            body.extend_from_slice(&[0, 3, b'w', b'/', b'x', 0, 1, b'!']);
        }
        packet(0x10, &body)
    }

    const EXPIRY_1: [u8; 5] = [0x02, 0, 0, 0, 1];
    const USER_KV: [u8; 7] = [0x26, 0, 1, b'k', 0, 1, b'v'];

    fn publish5(props: &[u8]) -> BytesMut {
        let mut body = vec![0, 3, b'a', b'/', b'b', 0, 1];
        body.extend(block(props));
        body.extend_from_slice(b"payload");
        packet(0x32, &body)
    }

    fn subscribe5(props: &[u8]) -> BytesMut {
        let mut body = vec![0, 1];
        body.extend(block(props));
        body.extend_from_slice(&[0, 3, b'a', b'/', b'b', 0x01]);
        packet(0x82, &body)
    }

    fn repeated(p: &BytesMut) -> Result<Option<u8>, Error> {
        let Some((_, header_len)) = remaining_length(&p[1..]).expect("length") else {
            panic!("incomplete test packet")
        };
        repeated_property(p[0] >> 4, p[0] & 0x0F, &p[1 + header_len..])
    }

    #[test]
    fn the_property_scanner_finds_repeats_in_every_block() {
        let twice = |p: &[u8]| [p, p].concat();
        // Once each, and user properties as often as wanted: fine.
        let fine = [EXPIRY_1.as_slice(), &USER_KV, &USER_KV, &[0x23, 0, 1]].concat();
        assert!(matches!(repeated(&publish5(&fine)), Ok(None)));
        assert!(matches!(repeated(&publish5(&[])), Ok(None)));
        assert!(matches!(
            repeated(&connect5(&[0x21, 0, 10], Some(&fine))),
            Ok(None)
        ));
        // Repeats, in each kind of block.
        assert!(matches!(
            repeated(&publish5(&twice(&EXPIRY_1))),
            Ok(Some(0x02))
        ));
        let ct = [0x03, 0, 1, b't'];
        assert!(matches!(
            repeated(&publish5(&[&ct[..], &USER_KV, &ct].concat())),
            Ok(Some(0x03))
        ));
        assert!(matches!(
            repeated(&connect5(&twice(&[0x21, 0, 10]), None)),
            Ok(Some(0x21))
        ));
        assert!(matches!(
            repeated(&connect5(&[], Some(&twice(&[0x18, 0, 0, 0, 5])))),
            Ok(Some(0x18))
        ));
        assert!(matches!(
            repeated(&subscribe5(&twice(&[0x0B, 0x81, 0x01]))),
            Ok(Some(0x0B))
        ));
        let mut unsub = vec![0, 1];
        unsub.extend(block(&twice(&[0x1F, 0, 1, b'r'])));
        unsub.extend_from_slice(&[0, 1, b'a']);
        assert!(matches!(repeated(&packet(0xA2, &unsub)), Ok(Some(0x1F))));
        let mut puback = vec![0, 1, 0x00];
        puback.extend(block(&twice(&[0x1F, 0, 0])));
        assert!(matches!(repeated(&packet(0x40, &puback)), Ok(Some(0x1F))));
        assert!(matches!(repeated(&packet(0x40, &[0, 1])), Ok(None)));
        assert!(matches!(repeated(&packet(0x40, &[0, 1, 0x10])), Ok(None)));
        let mut disconnect = vec![0x04];
        disconnect.extend(block(&twice(&[0x11, 0, 0, 0, 9])));
        assert!(matches!(
            repeated(&packet(0xE0, &disconnect)),
            Ok(Some(0x11))
        ));
        // Blocks that do not parse: unknown ids, lengths past the packet.
        assert!(repeated(&publish5(&[0x7F, 0])).is_err());
        assert!(repeated(&publish5(&[0x03, 0, 9, b'x'])).is_err());
        assert!(repeated(&publish5(&[0x0B, 0xFF, 0xFF, 0xFF, 0xFF])).is_err());
        assert!(repeated(&packet(0x32, &[0, 3, b'a', b'/', b'b', 0, 1, 40, 0x02])).is_err());
        assert!(repeated(&packet(0x10, &[0, 4, b'M'])).is_err());

        // decode: a repeat is a protocol error, before rumqttc keeps the last value.
        let mut b = publish5(&twice(&EXPIRY_1));
        assert!(matches!(
            decode(&mut b, Version::V5, 1024),
            Err(Error::Protocol {
                why: "duplicate_property",
                ..
            })
        ));
        let mut b = connect5(&[], Some(&twice(&ct)));
        assert!(matches!(
            decode(&mut b, Version::V5, 1024),
            Err(Error::Protocol { .. })
        ));
        let mut b = publish5(&fine);
        let Some(In::Publish(p)) = decode(&mut b, Version::V5, 1024).expect("decode") else {
            panic!("not a publish")
        };
        assert_eq!(p.props.user.len(), 2);
        assert!(b.is_empty());
    }

    #[test]
    fn reserved_and_server_only_types_are_refused_from_the_first_byte() {
        // A fixed header announcing about 1 MB (under the limit), no body.
        for (first, v) in [
            (0x00, Version::V4),
            (0xF0, Version::V4),
            (0x00, Version::V5),
            (0x0F, Version::V5),
        ] {
            let mut b = BytesMut::from(&[first, 0xC0, 0x84, 0x3D][..]);
            assert!(
                matches!(decode(&mut b, v, 1 << 20), Err(Error::Malformed(_))),
                "{first:#04x} {v:?}"
            );
            // The first byte alone is enough.
            let mut b = BytesMut::from(&[first][..]);
            assert!(decode(&mut b, v, 1 << 20).is_err(), "{first:#04x} {v:?}");
        }
        for first in [0x20, 0x90, 0xB0, 0xD0, 0xF0] {
            let mut b = BytesMut::from(&[first, 0xC0, 0x84, 0x3D][..]);
            assert!(
                matches!(
                    decode(&mut b, Version::V5, 1 << 20),
                    Err(Error::Protocol { .. })
                ),
                "{first:#04x}"
            );
        }
        // A PUBLISH announcing the same waits for its body.
        let mut b = BytesMut::from(&[0x30, 0xC0, 0x84, 0x3D][..]);
        assert!(matches!(decode(&mut b, Version::V5, 1 << 20), Ok(None)));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(b) = bytes.get_mut(1) {
                *b &= 0x3F;
            }
            for v in [Version::V4, Version::V5] {
                let mut buf = BytesMut::from(&bytes[..]);
                let _ = sniff_version(&buf, 1024);
                if let Some(&first) = bytes.first() {
                    let body = bytes.get(1..).unwrap_or_default();
                    let _ = repeated_property(first >> 4, first & 0x0F, body);
                }
                while let Ok(Some(_)) = decode(&mut buf, v, 1024) {}
            }
        }
    }
}
