//! Publishing: basic.publish's content header and body frames assembled per
//! channel (bounded by `max_message_bytes`, `max_content_bytes` and the node's
//! memory budget), a whole message routed and turned into an event, and the
//! batch of events one socket read completed appended to the log.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, AMQPClass};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tributary_storage::AppendRecord;

use super::confirm::Outcome;
use super::{Connection, End};
use crate::frame::{self, code, short};
use crate::Refusal;
use crate::{mapping, Server};
use tributary_ingest as ingest;

/// A batch gathered behind a waiting append goes at this size anyway.
const GATHER_BYTES: usize = 256 * 1024;
const GATHER_COUNT: usize = 4096;
/// Topics whose limits one connection remembers.
const KNOWN_TOPICS: usize = 1024;

/// A publish whose header or body frames are still arriving.
pub(super) struct Content {
    pub(super) publish: basic::Publish,
    /// Announced body size and properties, once the header frame came.
    pub(super) header: Option<(u64, AMQPProperties)>,
    pub(super) body: Vec<u8>,
    pub(super) received: u64,
    /// Bytes of `max_content_bytes` this message holds (its announced size).
    pub(super) reserved: u64,
    /// Set when the message is refused already; its body is read and dropped.
    pub(super) refused: Option<String>,
    /// Its announced size, held from the node's memory budget until it is done.
    pub(super) _budget: Option<tributary_frontend::budget::Reserved>,
}

/// Where an appended message came from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin {
    pub(super) channel: u16,
    pub(super) epoch: u64,
    pub(super) tag: Option<u64>,
}

/// Publishes completed by one socket read.
#[derive(Default)]
pub(super) struct Batch {
    records: ingest::Batch<Origin>,
    bytes: usize,
}

/// The outcome of one append batch.
pub(super) struct Appended {
    pub(super) results: Vec<(Origin, Option<ingest::Refused>)>,
    pub(super) started: Instant,
}

/// The ACL subject of a publish: the topic, or `topic/routing-key` for a named exchange.
fn acl_subject(exchange: &str, routing_key: &str) -> String {
    // The MQTT topic the message is delivered as: one subject for every front end.
    let key = (!routing_key.is_empty()).then_some(routing_key.as_bytes());
    tributary_ingest::mapping::record_topic(mapping::topic_of(exchange, routing_key), key, None)
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    pub(super) fn content_header(&mut self, ch: u16, h: AMQPContentHeader) -> Result<(), End> {
        let Some(c) = self.channels.get_mut(&ch) else {
            self.server.metrics.refuse(Refusal::ChannelError);
            return Err(End::server(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - channel {ch} is not open"),
            ));
        };
        if c.closing {
            return Ok(());
        }
        let confirm = c.confirm;
        let Some(content) = c.content.as_mut().filter(|c| c.header.is_none()) else {
            self.server.metrics.refuse(Refusal::UnexpectedFrame);
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - content header on channel {ch} without basic.publish"),
            ));
        };
        if h.class_id != 60 {
            self.server.metrics.refuse(Refusal::UnexpectedFrame);
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - content header of class {} for basic.publish",
                    h.class_id
                ),
            ));
        }
        let max = self.server.config.max_message_bytes;
        if h.body_size > max {
            self.server.metrics.refuse(Refusal::MessageTooLarge);
            let why = format!(
                "PRECONDITION_FAILED - message of {} bytes exceeds max_message_bytes {max}",
                h.body_size
            );
            if !confirm {
                self.close_channel(ch, code::PRECONDITION_FAILED, why, None);
                return Ok(());
            }
            content.refused = Some(why);
        } else {
            // The node-wide budget (all connections, all protocols) first: the
            // newest message is refused when it is spent.
            let Some(held) = self.server.cx.budget.try_reserve(h.body_size as usize) else {
                self.server.metrics.refuse(Refusal::MemoryBudget);
                let why = format!(
                    "RESOURCE_ERROR - the node holds limits.max_buffered_bytes ({}) of unfinished messages",
                    self.server.cx.budget.total()
                );
                if !confirm {
                    self.close_channel(ch, code::RESOURCE_ERROR, why, None);
                    return Ok(());
                }
                content.refused = Some(why);
                content.header = Some((h.body_size, h.properties));
                if h.body_size == 0 {
                    self.complete(ch);
                }
                return Ok(());
            };
            content._budget = Some(held);
            if self.buffered + h.body_size > self.server.config.max_content_bytes {
                self.server.metrics.refuse(Refusal::ContentBufferFull);
                return Err(End::server(
                    code::RESOURCE_ERROR,
                    format!(
                        "RESOURCE_ERROR - more than {} bytes of unfinished messages on one connection",
                        self.server.config.max_content_bytes
                    ),
                ));
            }
            // Reserved now, filled as body frames come: memory follows what
            // arrived, the budget what was announced.
            content.reserved = h.body_size;
            self.buffered += h.body_size;
            content.body = Vec::with_capacity((h.body_size as usize).min(self.frame_max));
        }
        content.header = Some((h.body_size, h.properties));
        if h.body_size == 0 {
            self.complete(ch);
        }
        Ok(())
    }

    pub(super) fn content_body(&mut self, ch: u16, data: Vec<u8>) -> Result<(), End> {
        let Some(c) = self.channels.get_mut(&ch) else {
            self.server.metrics.refuse(Refusal::ChannelError);
            return Err(End::server(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - channel {ch} is not open"),
            ));
        };
        if c.closing {
            return Ok(());
        }
        let Some(content) = c.content.as_mut().filter(|c| c.header.is_some()) else {
            self.server.metrics.refuse(Refusal::UnexpectedFrame);
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - content body on channel {ch} without a content header"),
            ));
        };
        let size = content.header.as_ref().map_or(0, |(s, _)| *s);
        content.received += data.len() as u64;
        if content.received > size {
            self.server.metrics.refuse(Refusal::UnexpectedFrame);
            return Err(End::server(
                code::UNEXPECTED_FRAME,
                format!("UNEXPECTED_FRAME - body frames on channel {ch} exceed the announced {size} bytes"),
            ));
        }
        if content.refused.is_none() {
            content.body.extend_from_slice(&data);
        }
        if content.received == size {
            self.complete(ch);
        }
        Ok(())
    }

    /// A whole message arrived on `ch`: route it, or refuse it now.
    fn complete(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        let Some(content) = c.content.take() else {
            return;
        };
        self.buffered = self.buffered.saturating_sub(content.reserved);
        let tag = c.confirm.then(|| {
            let t = c.next_tag;
            c.next_tag += 1;
            t
        });
        let origin = Origin {
            channel: ch,
            epoch: c.epoch,
            tag,
        };
        self.server.metrics.publishes.fetch_add(1, Relaxed);
        let Content {
            publish,
            header,
            body,
            refused,
            ..
        } = content;
        let props = header.map(|(_, p)| p).unwrap_or_default();
        if let Some(why) = refused {
            tracing::debug!(%why, "an AMQP publish was refused");
            self.resolve(origin, Outcome::Nack);
            return;
        }
        let exchange = publish.exchange.as_str();
        let routing_key = publish.routing_key.as_str();
        let topic = mapping::topic_of(exchange, routing_key);
        // For error replies only (they name the method).
        let publish_method = || AMQPClass::Basic(basic::AMQPMethod::Publish(publish.clone()));
        let subject = acl_subject(exchange, routing_key);
        if !self.may_publish(ch, &subject, "publishing to", Some(&publish_method())) {
            return;
        }
        let log = &self.server.cx.log;
        let existing = match self.known_topics.get(topic) {
            Some(&max) => Some(max),
            None => {
                let found = log.topic(topic).ok().map(|t| t.config.max_event_bytes);
                if let Some(max) = found {
                    if self.known_topics.len() >= KNOWN_TOPICS {
                        self.known_topics.clear();
                    }
                    self.known_topics.insert(topic.to_owned(), max);
                }
                found
            }
        };
        let routable = existing.is_some()
            || (log.config().auto_create_topics
                && tributary_storage::topic::validate_name(topic).is_ok());
        if !routable {
            self.server.metrics.refuse(Refusal::NoRoute);
            if publish.mandatory {
                self.server.metrics.returns.fetch_add(1, Relaxed);
                let mut frames = Vec::new();
                frame::method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: code::NO_ROUTE,
                        reply_text: short(&format!("NO_ROUTE - no topic '{topic}'")),
                        exchange: publish.exchange.clone(),
                        routing_key: publish.routing_key.clone(),
                    })),
                    &mut frames,
                );
                frame::content(ch, props, &body, self.frame_max, &mut frames);
                if tag.is_some() {
                    self.resolve(origin, Outcome::Returned(frames));
                } else {
                    self.out.extend_from_slice(&frames);
                }
            } else if tag.is_some() {
                self.resolve(origin, Outcome::Nack);
            } else {
                self.close_channel(
                    ch,
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no topic '{topic}', and this node does not create topics on publish"),
                    Some(&publish_method()),
                );
            }
            return;
        }
        let event = mapping::event_from(routing_key, &props, body);
        let max_event = existing.unwrap_or(log.config().topic_defaults.max_event_bytes);
        if event.size() > max_event {
            self.server.metrics.refuse(Refusal::MessageTooLarge);
            if tag.is_some() {
                self.resolve(origin, Outcome::Nack);
            } else {
                self.close_channel(
                    ch,
                    code::PRECONDITION_FAILED,
                    format!(
                        "PRECONDITION_FAILED - event of {} bytes exceeds the topic's max_event_bytes {max_event}",
                        event.size()
                    ),
                    Some(&publish_method()),
                );
            }
            return;
        }
        let size = event.size();
        self.batch
            .records
            .push(topic, origin, AppendRecord::from(event));
        self.batch.bytes += size;
    }

    /// Hands the gathered publishes to the log unless an append of this
    /// connection is already waiting for the disk and the batch is small: then
    /// it keeps gathering and goes when that append completes. Pipelining
    /// clients send a few messages per read; this makes one append (not one
    /// per read) per commit cycle, which is what costs CPU.
    pub(super) fn flush_batch_unless_busy(&mut self) {
        if self.appends.is_empty()
            || self.batch.bytes >= GATHER_BYTES
            || self.batch.records.len() >= GATHER_COUNT
        {
            self.flush_batch();
        }
    }

    pub(super) fn flush_batch(&mut self) {
        if self.batch.records.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        // A device over its rate limit: this batch goes on, reading pauses
        // until the limit has caught up (TCP pushes back on the client).
        let wait = self.server.cx.auth.pace(
            &self.identity,
            u32::try_from(batch.records.len()).unwrap_or(u32::MAX),
        );
        if !wait.is_zero() {
            self.paused_until = Some(Instant::now() + wait);
        }
        let server = self.server.clone();
        self.appends
            .push_back(tokio::spawn(append_batch(server, batch)));
    }
}

async fn append_batch(server: Arc<Server>, batch: Batch) -> Appended {
    let started = Instant::now();
    let outcomes = ingest::append(&server.cx.log, batch.records).await;
    let results = outcomes
        .into_iter()
        .map(|(origin, outcome)| {
            let error = outcome.err();
            if let Some(refused) = &error {
                server
                    .metrics
                    .refuse(Refusal::of_rejection(refused.rejection));
            }
            (origin, error)
        })
        .collect();
    Appended { results, started }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_subject_names_topic_and_key() {
        assert_eq!(acl_subject("", "sensors"), "sensors");
        assert_eq!(acl_subject("plant", "line.3"), "plant/line.3");
        assert_eq!(acl_subject("plant", ""), "plant");
    }
}
