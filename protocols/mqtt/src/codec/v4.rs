//! MQTT 3.1.1: [`In`] from `mqttbytes` v4 packets, and [`Out`] as v4
//! packets (v5 reason codes mapped to 3.1.1's return codes).

use bytes::BytesMut;
use rumqttc::mqttbytes::{self as m4, v4};

use super::{reason, ConnectIn, In, MsgProps, Out, PublishIn, SubFilter, Version, Will};
use crate::Error;

pub(super) fn malformed4(e: m4::Error) -> Error {
    Error::Malformed(e.to_string())
}

fn qos4(q: m4::QoS) -> u8 {
    q as u8
}

pub(super) fn from_v4(p: v4::Packet) -> Result<In, Error> {
    Ok(match p {
        v4::Packet::Connect(c) => In::Connect(Box::new(ConnectIn {
            version: Version::V4,
            session_expiry: if c.clean_session { 0 } else { u32::MAX },
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
                delay: 0,
                props: MsgProps::default(),
            }),
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
            receive_max: u16::MAX,
            max_packet_size: None,
            auth_method: None,
            topic_alias_max: 0,
            request_response_info: false,
        })),
        v4::Packet::Publish(p) => In::Publish(PublishIn {
            topic: p.topic,
            qos: qos4(p.qos),
            retain: p.retain,
            pkid: p.pkid,
            payload: p.payload,
            alias: None,
            props: MsgProps::default(),
        }),
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRec(a) => In::PubRec(a.pkid, 0),
        v4::Packet::PubRel(a) => In::PubRel(a.pkid),
        v4::Packet::PubComp(a) => In::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    path: f.path,
                    qos: qos4(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) if u.topics.is_empty() => {
            return Err(Error::Malformed("UNSUBSCRIBE without filters".into()))
        }
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => In::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => In::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => In::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => In::Unexpected("PINGRESP"),
    })
}

/// CONNACK return code for 3.1.1 from a v5 reason code.
fn connack_v4(code: u8) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::UNSUPPORTED_PROTOCOL_VERSION => C::RefusedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::BadClientId,
        reason::BAD_USERNAME_OR_PASSWORD => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

fn q4(q: u8) -> m4::QoS {
    match q {
        0 => m4::QoS::AtMostOnce,
        1 => m4::QoS::AtLeastOnce,
        _ => m4::QoS::ExactlyOnce,
    }
}

pub(super) fn encode_v4(packet: Out, buf: &mut BytesMut) -> Result<usize, Error> {
    let r = match packet {
        Out::ConnAck {
            session_present,
            code,
            ..
        } => v4::ConnAck::new(connack_v4(code), session_present).write(buf),
        Out::Publish(p) => {
            let mut out = v4::Publish::from_bytes(p.topic, q4(p.qos), p.payload);
            out.retain = p.retain;
            out.dup = p.dup;
            out.pkid = p.pkid;
            out.write(buf)
        }
        Out::PubAck(pkid, _) => v4::PubAck::new(pkid).write(buf),
        Out::PubRec(pkid, _) => v4::PubRec::new(pkid).write(buf),
        Out::PubRel(pkid, _) => v4::PubRel::new(pkid).write(buf),
        Out::PubComp(pkid, _) => v4::PubComp::new(pkid).write(buf),
        Out::SubAck(pkid, codes) => v4::SubAck::new(
            pkid,
            codes
                .into_iter()
                .map(|c| match c {
                    0..=2 => v4::SubscribeReasonCode::Success(q4(c)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )
        .write(buf),
        Out::UnsubAck(pkid, _) => v4::UnsubAck::new(pkid).write(buf),
        Out::PingResp => v4::PingResp.write(buf),
        Out::Disconnect(_) => Ok(0),
    };
    r.map_err(|e| Error::Encode(e.to_string()))
}
