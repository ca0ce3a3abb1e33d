//! MQTT 5: [`In`] from `mqttbytes` v5 packets (with their properties), and
//! [`Out`] as v5 packets with reason codes and properties.

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::{self as m5, v5};

use super::{reason, ConnectIn, In, MsgProps, Out, PublishIn, SubFilter, Version, Will};
use crate::Error;

pub(super) fn malformed5(e: m5::Error) -> Error {
    Error::Malformed(e.to_string())
}

fn qos5(q: m5::QoS) -> u8 {
    q as u8
}

fn props_from_publish(p: Option<v5::PublishProperties>) -> (MsgProps, Option<u16>, Vec<usize>) {
    let Some(p) = p else {
        return (MsgProps::default(), None, Vec::new());
    };
    (
        MsgProps {
            payload_format: p.payload_format_indicator,
            expiry: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation: p.correlation_data,
            user: p.user_properties,
        },
        p.topic_alias,
        p.subscription_identifiers,
    )
}

pub(super) fn from_v5(p: v5::Packet) -> Result<In, Error> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.unwrap_or_else(|| v5::ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            });
            let will = will.map(|w| {
                let wp = w.properties.unwrap_or_else(|| v5::LastWillProperties {
                    delay_interval: None,
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                });
                Ok(Will {
                    topic: String::from_utf8(w.topic.to_vec())
                        .map_err(|_| Error::Malformed("will topic is not UTF-8".into()))?,
                    payload: w.message,
                    qos: qos5(w.qos),
                    retain: w.retain,
                    delay: wp.delay_interval.unwrap_or(0),
                    props: MsgProps {
                        payload_format: wp.payload_format_indicator,
                        expiry: wp.message_expiry_interval,
                        content_type: wp.content_type,
                        response_topic: wp.response_topic,
                        correlation: wp.correlation_data,
                        user: wp.user_properties,
                    },
                })
            });
            let will = will.transpose()?;
            In::Connect(Box::new(ConnectIn {
                version: Version::V5,
                client_id: c.client_id,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                will,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
                session_expiry: props.session_expiry_interval.unwrap_or(0),
                receive_max: props.receive_maximum.unwrap_or(u16::MAX),
                max_packet_size: props.max_packet_size,
                auth_method: props.authentication_method,
                topic_alias_max: props.topic_alias_max.unwrap_or(0),
                request_response_info: props.request_response_info == Some(1),
            }))
        }
        v5::Packet::Publish(p) => {
            let (props, alias, _) = props_from_publish(p.properties);
            In::Publish(PublishIn {
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| Error::Malformed("topic name is not UTF-8".into()))?,
                qos: qos5(p.qos),
                retain: p.retain,
                pkid: p.pkid,
                payload: p.payload,
                alias,
                props,
            })
        }
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRec(a) => In::PubRec(
            a.pkid,
            match a.reason {
                v5::PubRecReason::Success => reason::SUCCESS,
                v5::PubRecReason::NoMatchingSubscribers => 0x10,
                _ => reason::UNSPECIFIED,
            },
        ),
        v5::Packet::PubRel(a) => In::PubRel(a.pkid),
        v5::Packet::PubComp(a) => In::PubComp(a.pkid),
        v5::Packet::Subscribe(s) if s.properties.as_ref().and_then(|p| p.id) == Some(0) => {
            return Err(Error::Malformed("subscription identifier 0".into()))
        }
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            id: s.properties.and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    path: f.path,
                    qos: qos5(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) if u.filters.is_empty() => {
            return Err(Error::Malformed("UNSUBSCRIBE without filters".into()))
        }
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => In::Unexpected("AUTH"),
        v5::Packet::ConnAck(_) => In::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => In::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => In::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => In::Unexpected("PINGRESP"),
    })
}

fn connack_v5(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::MALFORMED => C::MalformedPacket,
        reason::PROTOCOL_ERROR => C::ProtocolError,
        reason::UNSUPPORTED_PROTOCOL_VERSION => C::UnsupportedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::ClientIdentifierNotValid,
        reason::BAD_USERNAME_OR_PASSWORD => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        reason::SERVER_UNAVAILABLE => C::ServerUnavailable,
        reason::BAD_AUTH_METHOD => C::BadAuthenticationMethod,
        reason::PACKET_TOO_LARGE => C::PacketTooLarge,
        reason::QUOTA_EXCEEDED => C::QuotaExceeded,
        _ => C::UnspecifiedError,
    }
}

fn puback_v5(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_v5(code: u8) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecificError,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::PACKET_ID_IN_USE => R::PacketIdentifierInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn suback_v5(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as R;
    match code {
        0 => R::Success(m5::QoS::AtMostOnce),
        1 => R::Success(m5::QoS::AtLeastOnce),
        2 => R::Success(m5::QoS::ExactlyOnce),
        reason::IMPLEMENTATION_SPECIFIC => R::ImplementationSpecific,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_FILTER_INVALID => R::TopicFilterInvalid,
        reason::PACKET_ID_IN_USE => R::PkidInUse,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        _ => R::Unspecified,
    }
}

fn disconnect_v5(code: u8) -> v5::DisconnectReasonCode {
    v5::DisconnectReasonCode::try_from(code).unwrap_or(v5::DisconnectReasonCode::UnspecifiedError)
}

fn q5(q: u8) -> m5::QoS {
    match q {
        0 => m5::QoS::AtMostOnce,
        1 => m5::QoS::AtLeastOnce,
        _ => m5::QoS::ExactlyOnce,
    }
}

fn some_if<T>(cond: bool, v: T) -> Option<T> {
    cond.then_some(v)
}

pub(super) fn encode_v5(packet: Out, buf: &mut BytesMut) -> Result<usize, Error> {
    let r = match packet {
        Out::ConnAck {
            session_present,
            code,
            props,
        } => {
            let properties = if code == reason::SUCCESS {
                Some(v5::ConnAckProperties {
                    session_expiry_interval: props.session_expiry,
                    receive_max: Some(props.receive_max),
                    max_qos: None,
                    retain_available: Some(1),
                    max_packet_size: Some(props.max_packet_size),
                    assigned_client_identifier: props.assigned_client_id,
                    topic_alias_max: Some(props.topic_alias_max),
                    reason_string: props.reason_string,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(1),
                    subscription_identifiers_available: Some(1),
                    shared_subscription_available: Some(1),
                    server_keep_alive: props.server_keep_alive,
                    response_information: props.response_information,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                })
            } else {
                props.reason_string.map(|r| v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: None,
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: Some(r),
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                })
            };
            v5::ConnAck {
                session_present,
                code: connack_v5(code),
                properties,
            }
            .write(buf)
        }
        Out::Publish(p) => {
            let props = p.props;
            let has_props =
                props != MsgProps::default() || !p.sub_ids.is_empty() || p.alias.is_some();
            let properties = some_if(
                has_props,
                v5::PublishProperties {
                    payload_format_indicator: props.payload_format,
                    message_expiry_interval: props.expiry,
                    topic_alias: p.alias,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation,
                    user_properties: props.user,
                    subscription_identifiers: p.sub_ids,
                    content_type: props.content_type,
                },
            );
            let mut out = v5::Publish::new(p.topic, q5(p.qos), p.payload, properties);
            out.retain = p.retain;
            out.dup = p.dup;
            out.pkid = p.pkid;
            out.write(buf)
        }
        Out::PubAck(pkid, code) => {
            let mut a = v5::PubAck::new(pkid, None);
            a.reason = puback_v5(code);
            a.write(buf)
        }
        Out::PubRec(pkid, code) => {
            let mut a = v5::PubRec::new(pkid, None);
            a.reason = pubrec_v5(code);
            a.write(buf)
        }
        Out::PubRel(pkid, code) => {
            let mut a = v5::PubRel::new(pkid, None);
            if code != reason::SUCCESS {
                a.reason = v5::PubRelReason::PacketIdentifierNotFound;
            }
            a.write(buf)
        }
        Out::PubComp(pkid, code) => {
            let mut a = v5::PubComp::new(pkid, None);
            if code != reason::SUCCESS {
                a.reason = v5::PubCompReason::PacketIdentifierNotFound;
            }
            a.write(buf)
        }
        Out::SubAck(pkid, codes) => v5::SubAck {
            pkid,
            return_codes: codes.into_iter().map(suback_v5).collect(),
            properties: None,
        }
        .write(buf),
        Out::UnsubAck(pkid, codes) => v5::UnsubAck {
            pkid,
            reasons: codes
                .into_iter()
                .map(|c| match c {
                    reason::SUCCESS => v5::UnsubAckReason::Success,
                    0x11 => v5::UnsubAckReason::NoSubscriptionExisted,
                    reason::TOPIC_FILTER_INVALID => v5::UnsubAckReason::TopicFilterInvalid,
                    _ => v5::UnsubAckReason::UnspecifiedError,
                })
                .collect(),
            properties: None,
        }
        .write(buf),
        Out::PingResp => v5::PingResp::write(buf),
        // rumqttc 0.25 writes a properties length after the reason code while
        // declaring a remaining length of 1; the two-byte form is exact.
        Out::Disconnect(code) => {
            buf.extend_from_slice(&[0xE0, 0x01, disconnect_v5(code) as u8]);
            Ok(3)
        }
    };
    r.map_err(|e| Error::Encode(e.to_string()))
}
