//! What every protocol must know of the others: the header names each front
//! end gives a meaning to (so none lets a client forge another's), the MQTT
//! topic a stored record is delivered as ([`record_topic`]), and the ACL
//! subjects of a record that arrives other than by MQTT ([`publish_subjects`],
//! [`all_publish_subjects`]). The mappings themselves (a PUBLISH or an AMQP
//! message to an event and back) stay in their front ends.

/// Header names the MQTT front end writes and reads back.
pub mod mqtt_header {
    /// The MQTT topic a record was published to.
    pub const TOPIC: &str = "mqtt.topic";
    /// `0` or `2` for QoS 0 and 2 publishes; absent means QoS 1.
    pub const QOS: &str = "mqtt.qos";
    /// Present (`1`) when the publish had the retain flag.
    pub const RETAIN: &str = "mqtt.retain";
    /// v5 payload format indicator (`1`: UTF-8).
    pub const PAYLOAD_FORMAT: &str = "mqtt.payload_format";
    /// v5 message expiry interval, seconds from the record's timestamp.
    pub const EXPIRY: &str = "mqtt.expiry";
    /// v5 response topic.
    pub const RESPONSE_TOPIC: &str = "mqtt.response_topic";
    /// v5 correlation data.
    pub const CORRELATION: &str = "mqtt.correlation";
    /// v5 content type (shared name with AMQP and HTTP).
    pub const CONTENT_TYPE: &str = "content-type";
    /// The publishing client id, written only for v5 clients that hold a
    /// no-local subscription (so their own messages can be skipped).
    pub const CLIENT: &str = "mqtt.client";
    /// Prefix for user properties whose names collide with the names above.
    pub const USER_PREFIX: &str = "mqtt.user.";

    /// True for names the MQTT front end gives a meaning to.
    pub fn reserved(name: &str) -> bool {
        name.starts_with("mqtt.") || name == CONTENT_TYPE
    }
}

/// Header names the AMQP front end writes and reads back.
pub mod amqp_header {
    /// Content type (shared with MQTT 5 and HTTP).
    pub const CONTENT_TYPE: &str = "content-type";
    /// Prefix of every other property, and of colliding user headers.
    pub const PREFIX: &str = "amqp.";
    /// User headers whose names collide with ours.
    pub const USER_PREFIX: &str = "amqp.header.";
    /// `content-encoding`.
    pub const CONTENT_ENCODING: &str = "amqp.content_encoding";
    /// `delivery-mode` (1 transient, 2 persistent).
    pub const DELIVERY_MODE: &str = "amqp.delivery_mode";
    /// `priority`.
    pub const PRIORITY: &str = "amqp.priority";
    /// `correlation-id`.
    pub const CORRELATION_ID: &str = "amqp.correlation_id";
    /// `reply-to`.
    pub const REPLY_TO: &str = "amqp.reply_to";
    /// `expiration`.
    pub const EXPIRATION: &str = "amqp.expiration";
    /// `message-id`.
    pub const MESSAGE_ID: &str = "amqp.message_id";
    /// `type`.
    pub const TYPE: &str = "amqp.type";
    /// `user-id`.
    pub const USER_ID: &str = "amqp.user_id";
    /// `app-id`.
    pub const APP_ID: &str = "amqp.app_id";

    /// True for names the AMQP front end gives a meaning to.
    pub fn reserved(name: &str) -> bool {
        name.starts_with(PREFIX)
            || name == CONTENT_TYPE
            // MQTT delivery trusts `mqtt.topic`: no AMQP publisher may set it.
            || super::mqtt_header::reserved(name)
    }
}

/// The MQTT topic of a stored record: its `mqtt.topic` header when it came in
/// over MQTT; otherwise its key when that already starts with the log topic,
/// else `log_topic/key` (or the log topic alone for keyless records).
pub fn record_topic<'a>(
    log_topic: &str,
    key: Option<&'a [u8]>,
    header: Option<&'a [u8]>,
) -> String {
    if let Some(t) = header.and_then(|h| std::str::from_utf8(h).ok()) {
        return t.to_owned();
    }
    match key.and_then(|k| std::str::from_utf8(k).ok()) {
        Some(k) if k == log_topic || k.starts_with(&format!("{log_topic}/")) => k.to_owned(),
        Some(k) if !k.is_empty() => format!("{log_topic}/{k}"),
        _ => log_topic.to_owned(),
    }
}

/// The ACL subjects of a record that arrives other than by MQTT (HTTP,
/// WebSockets, AMQP): the MQTT topic it is delivered as, and, when it carries
/// an `mqtt.topic` header, the topic that header claims. Both must be allowed,
/// so no front end can place an event where its device may not publish, nor
/// make it reach MQTT subscribers as another topic.
pub fn publish_subjects(
    log_topic: &str,
    key: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
) -> (String, Option<String>) {
    let plain = record_topic(log_topic, key, None);
    let claimed = claimed_topics(log_topic, key, headers, &plain).next();
    (plain, claimed)
}

/// Like [`publish_subjects`], with every `mqtt.topic` occurrence: the plain
/// subject first, then each distinct topic any occurrence claims. A check
/// over all of them cannot be passed by an allowed first occurrence while
/// another one names a topic the device may not publish to.
pub fn all_publish_subjects(
    log_topic: &str,
    key: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
) -> Vec<String> {
    let plain = record_topic(log_topic, key, None);
    let mut out: Vec<String> = Vec::with_capacity(1);
    for c in claimed_topics(log_topic, key, headers, &plain) {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out.insert(0, plain);
    out
}

/// The topics `mqtt.topic` headers claim, one per occurrence, except `plain`.
fn claimed_topics<'a>(
    log_topic: &'a str,
    key: Option<&'a [u8]>,
    headers: &'a [(String, Vec<u8>)],
    plain: &'a str,
) -> impl Iterator<Item = String> + 'a {
    headers
        .iter()
        .filter(|(n, _)| n == mqtt_header::TOPIC)
        .map(move |(_, v)| record_topic(log_topic, key, Some(v)))
        .filter(move |c| c != plain)
}

/// The ACL subject a consumer group is authorized under (subscribe on it):
/// the same for every protocol that has groups.
pub fn group_subject(group: &str) -> String {
    format!("$groups/{group}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_delivered_to_mqtt_as_its_header_or_key_topic() {
        assert_eq!(record_topic("a", Some(b"x"), Some(b"a/b/c")), "a/b/c");
        assert_eq!(record_topic("a", Some(b"a/b"), None), "a/b");
        assert_eq!(record_topic("a", Some(b"k1"), None), "a/k1");
        assert_eq!(record_topic("a", None, None), "a");
    }

    #[test]
    fn publish_subjects_are_the_plain_topic_and_the_claimed_ones() {
        let h = |t: &str| vec![("mqtt.topic".to_owned(), t.as_bytes().to_vec())];
        assert_eq!(
            publish_subjects("s", Some(b"x/1"), &[]),
            ("s/x/1".to_owned(), None)
        );
        assert_eq!(
            publish_subjects("s", Some(b"s/x"), &[]),
            ("s/x".to_owned(), None)
        );
        let mut twice = h("s/d1/cmd");
        twice.extend(h("s"));
        twice.extend(h("s/d2/cmd"));
        twice.extend(h("s/d1/cmd"));
        assert_eq!(
            all_publish_subjects("s", None, &twice),
            ["s", "s/d1/cmd", "s/d2/cmd"]
        );
        assert_eq!(
            publish_subjects("s", None, &h("s/d2/cmd")),
            ("s".to_owned(), Some("s/d2/cmd".to_owned()))
        );
        assert_eq!(
            publish_subjects("s", Some(b"s/x"), &h("s/x")),
            ("s/x".to_owned(), None)
        );
    }
}
