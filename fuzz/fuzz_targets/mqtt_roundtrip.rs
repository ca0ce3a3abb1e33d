//! Structure-aware: valid client packets (3.1.1 CONNECT, PUBLISH, SUBSCRIBE,
//! UNSUBSCRIBE; 5 PUBLISH with properties, SUBSCRIBE with options) built from
//! the fuzzer's input, written by rumqttc's encoder (a codec we did not
//! write), read back by ours: every one must decode, to the same fields.
#![no_main]

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::{v4, QoS};
use rumqttc::v5::mqttbytes::{v5, QoS as QoS5};
use tributary_mqtt::codec::{self, In, Version};

const MAX: usize = 1024 * 1024;

#[derive(Debug, Arbitrary)]
enum Packet {
    Connect {
        client_id: Text,
        clean: bool,
        keep_alive: u16,
        will: Option<(Name, Vec<u8>, Q, bool)>,
        login: Option<(String, String)>,
    },
    Publish(Publish),
    Publish5 {
        publish: Publish,
        payload_format: Option<bool>,
        expiry: Option<u32>,
        content_type: Option<String>,
        response_topic: Option<Name>,
        correlation: Option<Vec<u8>>,
        user: Vec<(String, String)>,
    },
    Subscribe {
        pkid: u16,
        first: (Filter, Q),
        more: Vec<(Filter, Q)>,
    },
    Subscribe5 {
        pkid: u16,
        first: (Filter, Q, bool, bool, u8),
        id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        first: Filter,
        more: Vec<Filter>,
    },
}

#[derive(Debug, Arbitrary)]
struct Publish {
    topic: Name,
    qos: Q,
    retain: bool,
    pkid: u16,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Q {
    Zero,
    One,
    Two,
}

impl Q {
    fn v4(self) -> QoS {
        match self {
            Q::Zero => QoS::AtMostOnce,
            Q::One => QoS::AtLeastOnce,
            Q::Two => QoS::ExactlyOnce,
        }
    }
    fn v5(self) -> QoS5 {
        match self {
            Q::Zero => QoS5::AtMostOnce,
            Q::One => QoS5::AtLeastOnce,
            Q::Two => QoS5::ExactlyOnce,
        }
    }
    fn n(self) -> u8 {
        self as u8
    }
}

/// UTF-8 without U+0000 (MQTT-1.5.3-2), at most 64 KiB - 1 bytes.
#[derive(Debug, Arbitrary)]
struct Text(String);

impl Text {
    fn get(&self) -> String {
        let s: String = self.0.chars().filter(|&c| c != '\0').collect();
        let mut end = s.len().min(65_535);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    }
}

/// A topic name: non-empty, no wildcards.
#[derive(Debug, Arbitrary)]
struct Name(Text);

impl Name {
    fn get(&self) -> String {
        let s: String = self
            .0
            .get()
            .chars()
            .filter(|&c| c != '+' && c != '#')
            .collect();
        if s.is_empty() {
            "t".to_owned()
        } else {
            s
        }
    }
}

/// A topic filter: levels of text or `+`, perhaps ending in `#`.
#[derive(Debug, Arbitrary)]
struct Filter {
    levels: Vec<Option<Name>>,
    multi: bool,
}

impl Filter {
    fn get(&self) -> String {
        let mut levels: Vec<String> = self
            .levels
            .iter()
            .take(16)
            .map(|l| match l {
                Some(name) => name.get().replace('/', ""),
                None => "+".to_owned(),
            })
            .collect();
        if self.multi || levels.is_empty() {
            levels.push("#".to_owned());
        }
        levels.join("/")
    }
}

fn pkid(p: u16) -> u16 {
    p.max(1)
}

fn decode_one(buf: &mut BytesMut, version: Version) -> In {
    let whole = buf.len();
    match codec::decode(buf, version, MAX) {
        Ok(Some(packet)) => {
            assert!(buf.is_empty(), "{} of {whole} bytes left over", buf.len());
            packet
        }
        other => panic!("a valid packet did not decode: {other:?}"),
    }
}

fuzz_target!(|packet: Packet| {
    let mut buf = BytesMut::new();
    match packet {
        Packet::Connect {
            client_id,
            clean,
            keep_alive,
            will,
            login,
        } => {
            let will = will.map(|(topic, payload, qos, retain)| {
                v4::LastWill::new(topic.get(), payload, qos.v4(), retain)
            });
            let login = login.map(|(u, p)| v4::Login::new(Text(u).get(), Text(p).get()));
            let connect = v4::Connect {
                protocol: rumqttc::mqttbytes::Protocol::V4,
                keep_alive,
                client_id: client_id.get(),
                clean_session: clean,
                last_will: will.clone(),
                login: login.clone(),
            };
            if connect.write(&mut buf).is_err() {
                return;
            }
            assert!(matches!(
                codec::sniff_version(&buf, MAX),
                Ok(Some(Version::V4))
            ));
            let In::Connect(c) = decode_one(&mut buf, Version::V4) else {
                panic!("not a CONNECT");
            };
            assert_eq!(c.client_id, connect.client_id);
            assert_eq!(c.clean, clean);
            assert_eq!(c.keep_alive, keep_alive);
            // An empty user name or password is sent as absent (rumqttc's
            // encoder), and the codec reads an absent one as empty when the
            // other is present: the credential check sees the same either way.
            let login = login.filter(|l| !l.username.is_empty() || !l.password.is_empty());
            assert_eq!(c.username, login.as_ref().map(|l| l.username.clone()));
            assert_eq!(c.password, login.as_ref().map(|l| l.password.clone()));
            match (c.will, will) {
                (None, None) => {}
                (Some(got), Some(sent)) => {
                    assert_eq!(got.topic, sent.topic);
                    assert_eq!(got.payload, sent.message);
                    assert_eq!(got.qos, sent.qos as u8);
                    assert_eq!(got.retain, sent.retain);
                }
                (got, sent) => panic!("will {got:?} read as {sent:?}"),
            }
        }
        Packet::Publish(p) => {
            let mut sent = v4::Publish::new(p.topic.get(), p.qos.v4(), p.payload);
            sent.retain = p.retain;
            if p.qos.n() > 0 {
                sent.pkid = pkid(p.pkid);
            }
            if sent.write(&mut buf).is_err() {
                return;
            }
            let In::Publish(got) = decode_one(&mut buf, Version::V4) else {
                panic!("not a PUBLISH");
            };
            assert_eq!(got.topic, sent.topic);
            assert_eq!(got.qos, p.qos.n());
            assert_eq!(got.retain, sent.retain);
            assert_eq!(got.pkid, sent.pkid);
            assert_eq!(got.payload, sent.payload);
        }
        Packet::Publish5 {
            publish: p,
            payload_format,
            expiry,
            content_type,
            response_topic,
            correlation,
            user,
        } => {
            let props = v5::PublishProperties {
                payload_format_indicator: payload_format.map(u8::from),
                message_expiry_interval: expiry,
                topic_alias: None,
                response_topic: response_topic.map(|t| t.get()),
                correlation_data: correlation.map(Bytes::from),
                user_properties: user
                    .into_iter()
                    .take(32)
                    .map(|(k, v)| (Text(k).get(), Text(v).get()))
                    .collect(),
                subscription_identifiers: Vec::new(),
                content_type: content_type.map(|t| Text(t).get()),
            };
            let mut sent = v5::Publish::new(p.topic.get(), p.qos.v5(), p.payload, Some(props));
            sent.retain = p.retain;
            if p.qos.n() > 0 {
                sent.pkid = pkid(p.pkid);
            }
            if sent.write(&mut buf).is_err() {
                return;
            }
            let In::Publish(got) = decode_one(&mut buf, Version::V5) else {
                panic!("not a PUBLISH");
            };
            let props = sent.properties.unwrap_or_default();
            assert_eq!(got.topic.as_bytes(), &sent.topic[..]);
            assert_eq!(got.qos, p.qos.n());
            assert_eq!(got.pkid, sent.pkid);
            assert_eq!(got.payload, sent.payload);
            assert_eq!(got.alias, None);
            assert_eq!(got.props.payload_format, props.payload_format_indicator);
            assert_eq!(got.props.expiry, props.message_expiry_interval);
            assert_eq!(got.props.content_type, props.content_type);
            assert_eq!(got.props.response_topic, props.response_topic);
            assert_eq!(got.props.correlation, props.correlation_data);
            assert_eq!(got.props.user, props.user_properties);
        }
        Packet::Subscribe {
            pkid: id,
            first,
            more,
        } => {
            let filters: Vec<(String, Q)> = std::iter::once(first)
                .chain(more.into_iter().take(16))
                .map(|(f, q)| (f.get(), q))
                .collect();
            let sent = v4::Subscribe {
                pkid: pkid(id),
                filters: filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), q.v4()))
                    .collect(),
            };
            if sent.write(&mut buf).is_err() {
                return;
            }
            let In::Subscribe {
                pkid: got,
                filters: read,
                id,
            } = decode_one(&mut buf, Version::V4)
            else {
                panic!("not a SUBSCRIBE");
            };
            assert_eq!(got, sent.pkid);
            assert_eq!(id, None);
            let read: Vec<(String, u8)> = read.into_iter().map(|f| (f.path, f.qos)).collect();
            let sent: Vec<(String, u8)> = filters.into_iter().map(|(f, q)| (f, q.n())).collect();
            assert_eq!(read, sent);
        }
        Packet::Subscribe5 {
            pkid: id,
            first: (filter, qos, no_local, retain_as_published, handling),
            id: sub_id,
        } => {
            let handling = handling % 3;
            let sub_id = sub_id.map(|i| (i % 268_435_455) as usize + 1);
            let sent = v5::Subscribe {
                pkid: pkid(id),
                filters: vec![v5::Filter {
                    path: filter.get(),
                    qos: qos.v5(),
                    nolocal: no_local,
                    preserve_retain: retain_as_published,
                    retain_forward_rule: match handling {
                        0 => v5::RetainForwardRule::OnEverySubscribe,
                        1 => v5::RetainForwardRule::OnNewSubscribe,
                        _ => v5::RetainForwardRule::Never,
                    },
                }],
                properties: sub_id.map(|id| v5::SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                }),
            };
            if sent.write(&mut buf).is_err() {
                return;
            }
            let In::Subscribe {
                pkid: got,
                filters,
                id,
            } = decode_one(&mut buf, Version::V5)
            else {
                panic!("not a SUBSCRIBE");
            };
            assert_eq!(got, sent.pkid);
            assert_eq!(id, sub_id);
            let [f] = &filters[..] else {
                panic!("{} filters", filters.len());
            };
            assert_eq!(f.path, sent.filters[0].path);
            assert_eq!(f.qos, qos.n());
            assert_eq!(f.no_local, no_local);
            assert_eq!(f.retain_as_published, retain_as_published);
            assert_eq!(f.retain_handling, handling);
        }
        Packet::Unsubscribe {
            pkid: id,
            first,
            more,
        } => {
            let topics: Vec<String> = std::iter::once(first)
                .chain(more.into_iter().take(16))
                .map(|f| f.get())
                .collect();
            let sent = v4::Unsubscribe {
                pkid: pkid(id),
                topics: topics.clone(),
            };
            if sent.write(&mut buf).is_err() {
                return;
            }
            let In::Unsubscribe { pkid: got, filters } = decode_one(&mut buf, Version::V4) else {
                panic!("not an UNSUBSCRIBE");
            };
            assert_eq!(got, sent.pkid);
            assert_eq!(filters, topics);
        }
    }
});
