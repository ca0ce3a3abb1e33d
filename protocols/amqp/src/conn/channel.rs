//! Channels of one connection: the per-channel state, channel.open/close
//! (ours and the client's), and the methods a channel answers besides the
//! content of a publish: confirm.select, qos, exchange.declare (an exchange is
//! a topic), the queue methods accepted for compatibility, and the consuming
//! and transaction methods refused as not implemented.

use std::collections::BTreeMap;
use std::time::Duration;

use amq_protocol::protocol::{access, basic, channel, confirm, exchange, queue, AMQPClass};
use tokio::io::{AsyncRead, AsyncWrite};
use tributary_storage::Error as LogError;

use super::confirm::Outcome;
use super::publish::Content;
use super::{method_name, Connection, End};
use crate::frame::{self, code, short};
use crate::Refusal;
use tributary_devices::auth::Action;

pub(super) struct Channel {
    /// Distinguishes reopenings of one channel number, so late append results
    /// for a closed channel are dropped.
    pub(super) epoch: u64,
    /// We sent channel.close and wait for close-ok.
    pub(super) closing: bool,
    pub(super) confirm: bool,
    /// Delivery tag of the next publish (confirm mode).
    pub(super) next_tag: u64,
    /// Every tag up to this one has been confirmed to the client.
    pub(super) confirmed_through: u64,
    /// Resolved tags not yet sent (an earlier tag is still waiting).
    pub(super) resolved: BTreeMap<u64, Outcome>,
    pub(super) content: Option<Content>,
}

impl Channel {
    fn new(epoch: u64) -> Self {
        Channel {
            epoch,
            closing: false,
            confirm: false,
            next_tag: 1,
            confirmed_through: 0,
            resolved: BTreeMap::new(),
            content: None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection<S> {
    /// Sends channel.close and drops the channel's state until close-ok.
    /// May this connection's device publish to `subject`? If not, the
    /// channel closes with 403 ACCESS_REFUSED naming `doing` (counted).
    pub(super) fn may_publish(
        &mut self,
        ch: u16,
        subject: &str,
        doing: &str,
        m: Option<&AMQPClass>,
    ) -> bool {
        let auth = &self.server.cx.auth;
        if auth
            .authorize(&self.identity, Action::Publish, subject)
            .allowed()
        {
            return true;
        }
        self.server.metrics.refuse(Refusal::NotAuthorized);
        let text = format!(
            "ACCESS_REFUSED - {doing} '{subject}' is not authorized for {}",
            self.identity.id
        );
        self.close_channel(ch, code::ACCESS_REFUSED, text, m);
        false
    }

    pub(super) fn close_channel(
        &mut self,
        ch: u16,
        code: u16,
        text: String,
        m: Option<&AMQPClass>,
    ) {
        if let Some(c) = self.channels.get_mut(&ch) {
            c.closing = true;
            self.release(ch);
        }
        frame::method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: short(&text),
                class_id: m.map_or(0, AMQPClass::get_amqp_class_id),
                method_id: m.map_or(0, AMQPClass::get_amqp_method_id),
            })),
            &mut self.out,
        );
    }

    /// Gives back what a channel holds: its unfinished message's reservation
    /// and its held confirms (they will never be sent).
    pub(super) fn release(&mut self, ch: u16) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        if let Some(content) = c.content.take() {
            self.buffered = self.buffered.saturating_sub(content.reserved);
        }
        for (_, outcome) in std::mem::take(&mut c.resolved) {
            self.held_confirms = self.held_confirms.saturating_sub(1);
            if let Outcome::Returned(frames) = outcome {
                self.held_bytes = self.held_bytes.saturating_sub(frames.len() as u64);
            }
        }
    }

    /// Forgets a closed channel.
    fn drop_channel(&mut self, ch: u16) {
        self.release(ch);
        self.channels.remove(&ch);
    }

    fn reply(&mut self, ch: u16, m: AMQPClass) {
        frame::method(ch, m, &mut self.out);
    }

    pub(super) async fn channel_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), End> {
        if ch > self.channel_max {
            self.server.metrics.refuse(Refusal::ChannelError);
            return Err(End::for_method(
                code::CHANNEL_ERROR,
                format!(
                    "CHANNEL_ERROR - channel {ch} exceeds channel_max {}",
                    self.channel_max
                ),
                &m,
            ));
        }
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = m {
            if self.channels.contains_key(&ch) {
                self.server.metrics.refuse(Refusal::ChannelError);
                return Err(End::for_method(
                    code::CHANNEL_ERROR,
                    format!("CHANNEL_ERROR - channel {ch} is open already"),
                    &m,
                ));
            }
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            self.channels.insert(ch, Channel::new(epoch));
            self.reply(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(());
        }
        let Some(state) = self.channels.get(&ch) else {
            self.server.metrics.refuse(Refusal::ChannelError);
            return Err(End::for_method(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - channel {ch} is not open"),
                &m,
            ));
        };
        if state.closing {
            // After our channel.close only close-ok (or a crossing close) counts.
            match m {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.drop_channel(ch);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.drop_channel(ch);
                    self.reply(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                }
                _ => {}
            }
            return Ok(());
        }
        if state.content.is_some() {
            self.server.metrics.refuse(Refusal::UnexpectedFrame);
            return Err(End::for_method(
                code::UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - {} on channel {ch} while a message's content was expected",
                    method_name(&m)
                ),
                &m,
            ));
        }
        match m {
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                if p.immediate {
                    // RabbitMQ's answer too: nothing here consumes, so nothing
                    // could ever take a message immediately.
                    self.server.metrics.refuse(Refusal::NotImplemented);
                    return Err(End::for_method(
                        code::NOT_IMPLEMENTED,
                        "NOT_IMPLEMENTED - immediate=true is not supported",
                        &AMQPClass::Basic(basic::AMQPMethod::Publish(p)),
                    ));
                }
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.content = Some(Content {
                        publish: p,
                        header: None,
                        body: Vec::new(),
                        received: 0,
                        reserved: 0,
                        refused: None,
                        _budget: None,
                    });
                }
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.drop_channel(ch);
                self.reply(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))
            | AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                // We send no deliveries, so there is nothing to pause.
                self.reply(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: f.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.confirm = true;
                }
                if !s.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(_)) => Ok(()),
            AMQPClass::Basic(
                basic::AMQPMethod::Ack(basic::Ack { delivery_tag, .. })
                | basic::AMQPMethod::Nack(basic::Nack { delivery_tag, .. })
                | basic::AMQPMethod::Reject(basic::Reject { delivery_tag, .. }),
            ) => {
                // We deliver nothing, so no tag is ours to settle.
                self.server.metrics.refuse(Refusal::UnknownDeliveryTag);
                self.close_channel(
                    ch,
                    code::PRECONDITION_FAILED,
                    format!("PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"),
                    Some(&m),
                );
                Ok(())
            }
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(ref d)) => {
                let d = d.clone();
                self.declare_exchange(ch, d, &m).await;
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                // Queues hold nothing here (the exchange is the topic); declaring
                // one is accepted so publishers written for RabbitMQ run unchanged.
                let name = if d.queue.as_str().is_empty() {
                    format!(
                        "amq.gen-{:016x}{:08x}",
                        fastrand::u64(..),
                        fastrand::u32(..)
                    )
                } else {
                    d.queue.as_str().to_owned()
                };
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: short(&name),
                            message_count: 0,
                            consumer_count: 0,
                        })),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => {
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(_)) => {
                self.reply(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(p)) => {
                if !p.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: 0,
                        })),
                    );
                }
                Ok(())
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => {
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: 0,
                        })),
                    );
                }
                Ok(())
            }
            // Consuming, transactions, and changing exchanges (topics hold data;
            // deleting one is not a protocol side effect here).
            AMQPClass::Basic(
                basic::AMQPMethod::Consume(_)
                | basic::AMQPMethod::Get(_)
                | basic::AMQPMethod::Cancel(_),
            )
            | AMQPClass::Tx(_)
            | AMQPClass::Exchange(
                exchange::AMQPMethod::Delete(_)
                | exchange::AMQPMethod::Bind(_)
                | exchange::AMQPMethod::Unbind(_),
            ) => Err(self.not_implemented(&m)),
            other => {
                // Methods only a server sends (deliver, return, *-ok, ...).
                self.server.metrics.refuse(Refusal::CommandInvalid);
                Err(End::for_method(
                    code::COMMAND_INVALID,
                    format!(
                        "COMMAND_INVALID - {} is not a client method",
                        method_name(&other)
                    ),
                    &other,
                ))
            }
        }
    }

    /// exchange.declare: the exchange is a topic. Passive checks that it exists;
    /// otherwise the topic is created (with the log's defaults) if missing.
    async fn declare_exchange(&mut self, ch: u16, d: exchange::Declare, m: &AMQPClass) {
        let name = d.exchange.as_str().to_owned();
        let ok = |c: &mut Self| {
            if !d.nowait {
                c.reply(
                    ch,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                );
            }
        };
        if name.is_empty() {
            ok(self);
            return;
        }
        if !self.may_publish(ch, &name, "declaring", Some(m)) {
            return;
        }
        let log = &self.server.cx.log;
        if d.passive {
            if log.topic(&name).is_ok() {
                ok(self);
            } else {
                self.close_channel(
                    ch,
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no topic '{name}'"),
                    Some(m),
                );
            }
            return;
        }
        if let Err(why) = tributary_storage::topic::validate_name(&name) {
            self.close_channel(
                ch,
                code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - exchange '{name}' cannot be a topic: {why}"),
                Some(m),
            );
            return;
        }
        if log.topic(&name).is_ok() {
            ok(self);
            return;
        }
        // Creating a topic waits for the disk. It happens once per topic, so the
        // connection waits with it: publishes that follow find the topic.
        let config = log.config().topic_defaults.config(&name);
        // Bounded, so a stalled disk cannot hold the connection past its heartbeats.
        let created = tokio::time::timeout(Duration::from_secs(10), log.create_topic(config)).await;
        let created = created.unwrap_or_else(|_| {
            Err(LogError::Io(std::io::Error::other(
                "creating the topic took over 10 s",
            )))
        });
        match created {
            Ok(_) | Err(LogError::TopicExists(_)) => ok(self),
            Err(e) => {
                self.server.metrics.refuse_with(Refusal::LogUnwritable, &e);
                self.close_channel(
                    ch,
                    code::INTERNAL_ERROR,
                    format!("INTERNAL_ERROR - {e}"),
                    Some(m),
                );
            }
        }
    }
}
