//! `kind = "mqtt_sink"` and `kind = "mqtt_source"`: the bridge to an
//! outside MQTT broker (see [`crate::config::MqttSink`] and
//! [`crate::config::MqttSource`]), over [`crate::mqtt_link`].
//!
//! The sink publishes a batch (one partition's records, in order) at QoS 1
//! or 2 and reports it delivered only when every record is acknowledged
//! (PUBACK; at QoS 2 PUBREC, PUBREL, PUBCOMP); only then does the engine
//! commit its position. A connection lost mid-batch is made again with the
//! same persistent session, and the records not yet acknowledged are sent
//! again with their packet ids (DUP set; at QoS 2 a record the broker has
//! received gets its PUBREL), so QoS 2 does not double within a session.
//!
//! The source subscribes at QoS 1 and appends what arrives in batches
//! through the one write path; each message is acknowledged only after its
//! batch is durable, so a crash before the acknowledgement has the broker
//! send it again: at least once.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{Packet, PubAck, PubComp, PubRec, PubRel, Publish, Subscribe};
use rumqttc::mqttbytes::v4::{SubscribeFilter, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_ingest::mapping::mqtt_header;
use tributary_storage::util::backoff::Backoff;
use tributary_storage::{Event, Log, Record};

use crate::config::MqttSource;
use crate::mqtt_link::{Endpoint, Link, LinkError};
use crate::sink::{unpaused, wait_after_failure, DeadLetters, Deliver, Outcome, Status};

/// Bytes of payload a source gathers into one append at most.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// A piece of an `mqtt_topic` template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Key,
    Topic,
    Partition,
    Header(String),
}

fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("`{t}`: a `{{` without its `}}`"));
        };
        let name = &rest[open + 1..open + close];
        pieces.push(match name {
            "key" => Piece::Key,
            "topic" => Piece::Topic,
            "partition" => Piece::Partition,
            _ => match name.strip_prefix("header.") {
                Some(h) if !h.is_empty() => Piece::Header(h.to_owned()),
                _ => {
                    return Err(format!(
                        "`{{{name}}}` is not `{{key}}`, `{{topic}}`, `{{partition}}` or `{{header.NAME}}`"
                    ))
                }
            },
        });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    if pieces.is_empty() {
        return Err("empty".into());
    }
    if pieces
        .iter()
        .any(|p| matches!(p, Piece::Text(s) if s.contains(['+', '#', '\0'])))
    {
        return Err(format!("`{t}` has a wildcard or NUL"));
    }
    Ok(pieces)
}

/// The MQTT topic a sink with `template` publishes record `r` of `topic`
/// to.
pub fn topic_for(template: Option<&str>, topic: &str, r: &Record) -> Result<String, String> {
    let pieces = template.map(parse_template).transpose()?;
    topic_of(pieces.as_deref(), topic, r)
}

/// Checks an `mqtt_topic` template.
pub fn check_template(t: &str) -> Result<(), String> {
    parse_template(t).map(|_| ())
}

/// Checks a topic filter: levels split by `/`, `+` a whole level, `#` a
/// whole last level.
pub fn check_filter(f: &str) -> Result<(), String> {
    let bad = || Err(format!("`{f}` is not a topic filter"));
    if f.is_empty() || f.len() > 65_535 || f.contains('\0') {
        return bad();
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return bad();
        }
        if level.contains('+') && *level != "+" {
            return bad();
        }
    }
    Ok(())
}

/// A record's MQTT topic: the template's, or its `mqtt.topic` header, or
/// its key.
fn topic_of(template: Option<&[Piece]>, topic: &str, r: &Record) -> Result<String, String> {
    let text = |what: &str, b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| format!("the {what} is not UTF-8"))
    };
    let header = |name: &str| r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let out = match template {
        Some(pieces) => {
            let mut out = String::new();
            for p in pieces {
                match p {
                    Piece::Text(s) => out.push_str(s),
                    Piece::Key => match &r.key {
                        Some(k) => out.push_str(&text("key", k)?),
                        None => return Err("`{key}`: the record has no key".into()),
                    },
                    Piece::Topic => out.push_str(topic),
                    Piece::Partition => out.push_str(&r.partition.to_string()),
                    Piece::Header(h) => match header(h) {
                        Some(v) => out.push_str(&text(&format!("header {h}"), v)?),
                        None => {
                            return Err(format!("`{{header.{h}}}`: the record has no {h} header"))
                        }
                    },
                }
            }
            out
        }
        None => match (header(mqtt_header::TOPIC), &r.key) {
            (Some(t), _) => text("mqtt.topic header", t)?,
            (None, Some(k)) => text("key", k)?,
            (None, None) => {
                return Err("no MQTT topic: no mqtt.topic header, no key, no `mqtt_topic`".into())
            }
        },
    };
    if out.is_empty() || out.len() > 65_535 || out.contains(['+', '#', '\0']) {
        return Err(format!("`{out}` is not an MQTT topic to publish to"));
    }
    Ok(out)
}

/// Where a record of the batch in flight stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not sent on any connection yet.
    New,
    /// PUBLISH sent, no answer yet.
    Sent,
    /// PUBREC received (QoS 2), PUBREL sent.
    Received,
    /// Acknowledged for good.
    Done,
}

struct Item {
    publish: Publish,
    stage: Stage,
}

/// The batch in flight: kept across tries of the same batch.
struct InFlight {
    first: u64,
    len: usize,
    items: Vec<Item>,
    by_pkid: HashMap<u16, usize>,
    refused: Vec<(usize, String)>,
}

impl InFlight {
    fn stage(&mut self, pkid: u16) -> Option<&mut Stage> {
        let i = *self.by_pkid.get(&pkid)?;
        self.items.get_mut(i).map(|i| &mut i.stage)
    }
}

/// One connection of an MQTT sink.
pub struct MqttOut {
    endpoint: Endpoint,
    qos: QoS,
    retain: bool,
    template: Option<Vec<Piece>>,
    dead: DeadLetters,
    link: Option<Link>,
    next_pkid: u16,
    batch: Option<InFlight>,
}

impl std::fmt::Debug for MqttOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttOut")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl MqttOut {
    /// A sink connection (it connects when it first delivers).
    pub fn new(
        endpoint: Endpoint,
        qos: u8,
        retain: bool,
        template: Option<&str>,
        dead: DeadLetters,
    ) -> Result<MqttOut, String> {
        Ok(MqttOut {
            endpoint,
            qos: if qos == 2 {
                QoS::ExactlyOnce
            } else {
                QoS::AtLeastOnce
            },
            retain,
            template: template
                .map(parse_template)
                .transpose()
                .map_err(|e| format!("`mqtt_topic`: {e}"))?,
            dead,
            link: None,
            next_pkid: 0,
            batch: None,
        })
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// The batch in flight for `records`: the one kept from an earlier
    /// try of the same records, or a new one.
    fn prepare(&mut self, topic: &str, records: &[Record]) {
        let first = records.first().map_or(0, |r| r.offset);
        if self
            .batch
            .as_ref()
            .is_some_and(|b| b.first == first && b.len == records.len())
        {
            return;
        }
        let mut items = Vec::with_capacity(records.len());
        let mut by_pkid = HashMap::with_capacity(records.len());
        let mut refused = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match topic_of(self.template.as_deref(), topic, r) {
                Ok(t) => {
                    let mut publish = Publish::from_bytes(
                        t,
                        self.qos,
                        Bytes::from(r.value.clone().unwrap_or_default()),
                    );
                    publish.retain = self.retain;
                    publish.pkid = self.pkid();
                    by_pkid.insert(publish.pkid, items.len());
                    items.push(Item {
                        publish,
                        stage: Stage::New,
                    });
                }
                Err(e) => refused.push((i, e)),
            }
        }
        self.batch = Some(InFlight {
            first,
            len: records.len(),
            items,
            by_pkid,
            refused,
        });
    }

    /// Sends what the batch still needs and waits for every
    /// acknowledgement.
    async fn attempt(&mut self) -> Result<(), String> {
        let fresh = self.link.is_none()
            || self
                .link
                .as_ref()
                .is_some_and(|l| l.idle() >= self.endpoint.keep_alive());
        let mut session = true;
        if fresh {
            self.link = None;
            let (link, present) = self.endpoint.connect().await.map_err(|e| e.to_string())?;
            self.link = Some(link);
            session = present;
        }
        let (Some(link), Some(batch)) = (self.link.as_mut(), self.batch.as_mut()) else {
            return Err("not connected".into());
        };
        for item in &mut batch.items {
            match item.stage {
                Stage::Done => {}
                Stage::Received if session => {
                    link.queue(&Packet::PubRel(PubRel::new(item.publish.pkid)))?;
                }
                Stage::New => {
                    link.queue(&Packet::Publish(item.publish.clone()))?;
                    item.stage = Stage::Sent;
                }
                Stage::Sent | Stage::Received => {
                    // Sent on a connection that broke: again, as a duplicate
                    // if the broker kept the session.
                    let mut again = item.publish.clone();
                    again.dup = session;
                    link.queue(&Packet::Publish(again))?;
                    item.stage = Stage::Sent;
                }
            }
        }
        link.flush().await?;
        let timeout = self.endpoint.timeout();
        let mut left = batch
            .items
            .iter()
            .filter(|i| i.stage != Stage::Done)
            .count();
        while left > 0 {
            let packet = match tokio::time::timeout(timeout, link.next()).await {
                Ok(p) => p?,
                Err(_) => {
                    return Err(format!(
                        "{left} records not acknowledged within {} ms",
                        timeout.as_millis()
                    ))
                }
            };
            match packet {
                Packet::PubAck(a) => {
                    if let Some(stage) = batch.stage(a.pkid) {
                        if *stage == Stage::Sent {
                            *stage = Stage::Done;
                            left -= 1;
                        }
                    }
                }
                Packet::PubRec(r) => {
                    if let Some(stage) = batch.stage(r.pkid) {
                        if *stage == Stage::Sent {
                            *stage = Stage::Received;
                        }
                    }
                    link.queue(&Packet::PubRel(PubRel::new(r.pkid)))?;
                    link.flush().await?;
                }
                Packet::PubComp(c) => {
                    if let Some(stage) = batch.stage(c.pkid) {
                        if *stage != Stage::Done {
                            *stage = Stage::Done;
                            left -= 1;
                        }
                    }
                }
                Packet::Disconnect => return Err("the broker disconnected".into()),
                // Nothing else is expected of a publisher's connection.
                _ => {}
            }
        }
        Ok(())
    }
}

impl Deliver for MqttOut {
    async fn deliver(&mut self, topic: &str, records: &[Record], _next: u64) -> Outcome {
        self.prepare(topic, records);
        if let Err(e) = self.attempt().await {
            self.link = None;
            return Outcome::Unavailable(e);
        }
        let Some(batch) = self.batch.take() else {
            return Outcome::Delivered;
        };
        for (i, error) in &batch.refused {
            if let Some(r) = records.get(*i) {
                if let Err(e) = self.dead.send(topic, std::slice::from_ref(r), error).await {
                    // Published already; the refused ones are tried again.
                    let mut batch = batch;
                    batch.items.iter_mut().for_each(|i| i.stage = Stage::Done);
                    self.batch = Some(batch);
                    return Outcome::Unavailable(format!(
                        "cannot write the dead-letter topic {}: {e}",
                        self.dead.topic()
                    ));
                }
            }
        }
        if batch.refused.is_empty() {
            Outcome::Delivered
        } else {
            Outcome::DeliveredExcept {
                dead_lettered: batch.refused.len() as u64,
            }
        }
    }
}

/// Connects and disconnects: the broker is there and takes the
/// credentials.
pub async fn probe(endpoint: &Endpoint) -> Result<(), LinkError> {
    let (mut link, _) = endpoint.connect().await?;
    let _ = link.queue(&Packet::Disconnect);
    let _ = link.flush().await;
    Ok(())
}

/// Runs an MQTT source until `cancel`; `paused` holds it (disconnected:
/// the broker keeps what arrives meanwhile).
pub async fn run_source(
    log: Log,
    config: MqttSource,
    endpoint: Endpoint,
    status: Arc<Status>,
    cancel: CancellationToken,
    mut paused: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(config.min_backoff_ms),
        Duration::from_millis(config.max_backoff_ms.max(config.min_backoff_ms)),
    );
    loop {
        if !unpaused(&cancel, &mut paused).await {
            return;
        }
        let error = match endpoint.connect().await {
            Ok((link, _)) => {
                let mut source = Source {
                    log: &log,
                    config: &config,
                    status: &status,
                    link,
                    awaiting_rel: Vec::new(),
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = paused.changed() => continue,
                    e = source.run(endpoint.keep_alive(), &mut backoff) => e,
                }
            }
            Err(e) => e.to_string(),
        };
        if !wait_after_failure(
            &status,
            &mut backoff,
            &cancel,
            &mut paused,
            &error,
            "MQTT source",
        )
        .await
        {
            return;
        }
    }
}

struct Source<'a> {
    log: &'a Log,
    config: &'a MqttSource,
    status: &'a Status,
    link: Link,
    /// QoS 2 messages appended, waiting for their PUBREL.
    awaiting_rel: Vec<u16>,
}

impl Source<'_> {
    /// Subscribes and moves messages until the connection fails; why.
    async fn run(&mut self, keep_alive: Duration, backoff: &mut Backoff) -> String {
        match self.serve(keep_alive, backoff).await {
            Ok(()) => "the connection ended".into(),
            Err(e) => e,
        }
    }

    async fn serve(&mut self, keep_alive: Duration, backoff: &mut Backoff) -> Result<(), String> {
        let filters = self
            .config
            .mqtt_topics
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect::<Vec<_>>();
        let mut subscribe = Subscribe::new_many(filters);
        subscribe.pkid = 1;
        self.link.queue(&Packet::Subscribe(subscribe))?;
        self.link.flush().await?;
        let mut heard = Instant::now();
        let mut batch: Vec<Publish> = Vec::new();
        loop {
            let packet = match tokio::time::timeout(keep_alive / 2, self.link.next()).await {
                Ok(p) => p?,
                Err(_) => {
                    if heard.elapsed() > keep_alive * 2 {
                        return Err("the broker went silent".into());
                    }
                    self.link.queue(&Packet::PingReq)?;
                    self.link.flush().await?;
                    continue;
                }
            };
            heard = Instant::now();
            self.take(packet, &mut batch).await?;
            // What else has arrived already goes in the same append, up to
            // `batch_size` messages and MAX_BATCH_BYTES.
            while batch.len() < self.config.batch_size
                && batch.iter().map(|p| p.payload.len()).sum::<usize>() < MAX_BATCH_BYTES
            {
                match self.link.buffered()? {
                    Some(p) => self.take(p, &mut batch).await?,
                    None => break,
                }
            }
            if !batch.is_empty() {
                self.append(&mut batch).await?;
                backoff.reset();
            }
        }
    }

    /// Handles one packet; publishes are added to `batch`.
    async fn take(&mut self, packet: Packet, batch: &mut Vec<Publish>) -> Result<(), String> {
        match packet {
            Packet::Publish(p) => batch.push(p),
            Packet::PubRel(r) => {
                self.awaiting_rel.retain(|&p| p != r.pkid);
                self.link.queue(&Packet::PubComp(PubComp::new(r.pkid)))?;
                self.link.flush().await?;
            }
            Packet::SubAck(ack) => {
                let refused: Vec<&String> = ack
                    .return_codes
                    .iter()
                    .zip(&self.config.mqtt_topics)
                    .filter(|(c, _)| matches!(c, SubscribeReasonCode::Failure))
                    .map(|(_, f)| f)
                    .collect();
                if refused.is_empty() {
                    self.status.cleared();
                } else {
                    let e = format!("the broker refused the subscription to {refused:?}");
                    tracing::warn!(error = %e, "MQTT source");
                    self.status.failed(&e);
                }
            }
            Packet::Disconnect => return Err("the broker disconnected".into()),
            _ => {}
        }
        Ok(())
    }

    /// Appends `batch` (durably) and then acknowledges it. A message larger
    /// than the topic takes is acknowledged without being appended (else
    /// the broker would send it for ever), logged and counted as a dead
    /// letter.
    async fn append(&mut self, batch: &mut Vec<Publish>) -> Result<(), String> {
        let log = self.log;
        let max_event = log
            .topic(&self.config.topic)
            .map_or(log.config().topic_defaults.max_event_bytes, |t| {
                t.config.max_event_bytes
            });
        let too_large = batch.iter().filter(|p| p.payload.len() > max_event).count();
        if too_large > 0 {
            tracing::warn!(topic = %self.config.topic, messages = too_large, max_event, "MQTT source: messages larger than the topic takes, dropped");
            self.status
                .dead_letters
                .fetch_add(too_large as u64, Relaxed);
        }
        let events = batch
            .iter()
            .filter(|p| p.payload.len() <= max_event)
            .map(|p| {
                let mut e = Event::new(p.payload.to_vec())
                    .with_key(p.topic.clone().into_bytes())
                    .with_header(mqtt_header::TOPIC, p.topic.clone().into_bytes());
                if p.qos == QoS::AtMostOnce {
                    e = e.with_header(mqtt_header::QOS, b"0".to_vec());
                }
                if p.retain {
                    e = e.with_header(mqtt_header::RETAIN, b"1".to_vec());
                }
                e.into()
            })
            .collect();
        if too_large < batch.len() {
            tributary_ingest::append_topic(log, &self.config.topic, events)
                .await
                .map_err(|e| format!("cannot append to {}: {e}", self.config.topic))?;
        }
        for p in batch.iter() {
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.link.queue(&Packet::PubAck(PubAck::new(p.pkid)))?,
                QoS::ExactlyOnce => {
                    self.awaiting_rel.push(p.pkid);
                    self.link.queue(&Packet::PubRec(PubRec::new(p.pkid)))?;
                }
            }
        }
        self.link.flush().await?;
        self.status
            .delivered
            .fetch_add((batch.len() - too_large) as u64, Relaxed);
        self.status.batches.fetch_add(1, Relaxed);
        batch.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&str>, headers: &[(&str, &str)]) -> Record {
        Record {
            partition: 2,
            offset: 0,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(b"v".to_vec()),
            timestamp: 0,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn topics_come_from_the_template_the_header_or_the_key() {
        let t = parse_template("out/{topic}/{key}/{partition}/{header.site}").expect("ok");
        let r = record(Some("s1"), &[("site", "north")]);
        assert_eq!(
            topic_of(Some(&t), "temps", &r).expect("ok"),
            "out/temps/s1/2/north"
        );
        let e = topic_of(Some(&t), "temps", &record(Some("s1"), &[])).expect_err("no header");
        assert!(e.contains("site"), "{e}");
        let r = record(Some("k"), &[(mqtt_header::TOPIC, "a/b")]);
        assert_eq!(topic_of(None, "t", &r).expect("ok"), "a/b");
        assert_eq!(
            topic_of(None, "t", &record(Some("k/1"), &[])).expect("ok"),
            "k/1"
        );
        assert!(topic_of(None, "t", &record(None, &[])).is_err());
        assert!(topic_of(None, "t", &record(Some("a/+"), &[])).is_err());
        assert!(parse_template("out/{nope}").is_err());
        assert!(parse_template("out/{key").is_err());
        assert!(parse_template("out/#").is_err());
    }

    #[test]
    fn filters_are_checked() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "+"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b#", "a/#/c", "a+/b", "a\0"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }
}
