//! Writing packets: [`encode`] appends an [`Out`] in the connection's
//! version's wire form.

use bytes::BytesMut;

use super::v4::encode_v4;
use super::v5::encode_v5;
use super::{Out, Version};

/// Appends `packet` to `buf` in `version`'s wire form. 3.1.1 has no
/// DISCONNECT from the server: that packet encodes to nothing (the caller closes).
pub fn encode(packet: Out, version: Version, buf: &mut BytesMut) {
    // The packets we build are always encodable; a failure would be a bug in
    // this module, and the connection would then see a short write and close.
    let result = match version {
        Version::V4 => encode_v4(packet, buf),
        Version::V5 => encode_v5(packet, buf),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "an MQTT packet could not be encoded");
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::codec::{decode, reason, In, MsgProps, PublishOut};

    #[test]
    fn encodes_every_out_packet_in_both_versions() {
        let packets = || {
            vec![
                Out::ConnAck {
                    session_present: true,
                    code: 0,
                    props: Box::default(),
                },
                Out::PubAck(1, 0),
                Out::PubRec(2, 0),
                Out::PubRel(6, 0),
                Out::PubComp(3, 0),
                Out::SubAck(4, vec![0, 1, 0x80]),
                Out::UnsubAck(5, vec![0]),
                Out::PingResp,
                Out::Publish(Box::new(PublishOut {
                    topic: "a/b".into(),
                    alias: None,
                    qos: 1,
                    retain: true,
                    dup: true,
                    pkid: 9,
                    payload: Bytes::from_static(b"x"),
                    props: MsgProps {
                        user: vec![("k".into(), "v".into())],
                        ..MsgProps::default()
                    },
                    sub_ids: vec![3],
                })),
            ]
        };
        for v in [Version::V4, Version::V5] {
            let mut buf = BytesMut::new();
            for p in packets() {
                let before = buf.len();
                encode(p, v, &mut buf);
                assert!(buf.len() > before, "{v:?}: a packet encoded to nothing");
            }
            // The PUBLISH (last) reads back with its flags and properties.
            let mut last = BytesMut::new();
            if let Some(Out::Publish(p)) = packets().pop() {
                encode(Out::Publish(p), v, &mut last);
            }
            let Some(In::Publish(p)) = decode(&mut last, v, 1024).expect("decode") else {
                panic!("not a publish")
            };
            assert_eq!(
                (p.topic.as_str(), p.qos, p.retain, p.pkid),
                ("a/b", 1, true, 9)
            );
            assert_eq!(&p.payload[..], b"x");
            if v == Version::V5 {
                assert_eq!(p.props.user, vec![("k".to_owned(), "v".to_owned())]);
            }
        }
        // v5: a delivery by topic alias (empty topic) reads back as one, and
        // PUBREC's refusal and PUBREL are understood.
        let mut b = BytesMut::new();
        encode(
            Out::Publish(Box::new(PublishOut {
                topic: String::new(),
                alias: Some(3),
                qos: 2,
                retain: false,
                dup: false,
                pkid: 7,
                payload: Bytes::from_static(b"y"),
                props: MsgProps::default(),
                sub_ids: vec![],
            })),
            Version::V5,
            &mut b,
        );
        let Some(In::Publish(p)) = decode(&mut b, Version::V5, 1024).expect("decode") else {
            panic!("not a publish")
        };
        assert_eq!((p.topic.as_str(), p.alias, p.qos), ("", Some(3), 2));
        let mut b = BytesMut::from(&[0x50, 0x03, 0x00, 0x07, 0x87][..]);
        assert!(matches!(
            decode(&mut b, Version::V5, 1024),
            Ok(Some(In::PubRec(7, reason::UNSPECIFIED)))
        ));
        let mut b = BytesMut::new();
        encode(
            Out::PubRel(9, reason::PACKET_ID_NOT_FOUND),
            Version::V5,
            &mut b,
        );
        assert_eq!(&b[..], &[0x62, 0x04, 0x00, 0x09, 0x92, 0x00]);

        let mut b = BytesMut::new();
        encode(
            Out::Disconnect(reason::SESSION_TAKEN_OVER),
            Version::V5,
            &mut b,
        );
        assert_eq!(&b[..], &[0xE0, 0x01, 0x8E]);
        let mut b = BytesMut::new();
        encode(
            Out::Disconnect(reason::SESSION_TAKEN_OVER),
            Version::V4,
            &mut b,
        );
        assert!(b.is_empty());
    }
}
